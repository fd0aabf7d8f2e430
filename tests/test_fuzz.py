"""Random and mutated requests fed to the live front (hypothesis, a fixed number of examples
and derandomized, so CI runs the same inputs every time).

The invariants: every byte the front sends is a well-formed HTTP/1.1 response (or nothing
before a clean close); the front stays up and answers a normal request afterwards; the app is
called exactly once per echo it returned, so a request refused with a 4xx never reached it,
and nothing follows a refusal on its connection.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import request
from tests.test_vectors import (
    CASES,
    LEFT_OUT,
    call_count,
    exchange,
    parse_responses,
    start_echo_server,
)

# What the front may answer: the echo, OPTIONS * and its own refusals.  A 500 or a 502 would
# mean the front or the worker tripped over the input.
ALLOWED = {100, 200, 400, 405, 408, 413, 414, 417, 431, 501, 505}

HANDWRITTEN = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /p/a%20th?q=1&r=%FF HTTP/1.1\r\nHost: a\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n",
    b"POST /form HTTP/1.1\r\nHost: a\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
    b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nHEAD /2 HTTP/1.1\r\nHost: a\r\n\r\n"
    b"DELETE /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET http://example.org:8080/abs?x HTTP/1.1\r\nHost: a\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /old2 HTTP/1.0\r\n\r\n",
    "GET /тест HTTP/1.1\r\nHost: a\r\nX-Value: café\r\n\r\n".encode(),
    b"GET /up HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
]
SEEDS = HANDWRITTEN + [entry["raw"] for name, entry in sorted(CASES.items())
                       if name not in LEFT_OUT and len(entry["raw"]) < 2000]

# Bytes and pieces that parsers trip over: line ends, separators, framing fields.
TOKENS = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b";", b",", b"\x7f", b"\x80",
          b"\xff", b"0", b"9", b"f", b"-", b"+", b"%", b"%00", b"#", b"?", b"/", b"\"", b"*",
          b"\r\n\r\n", b"0\r\n\r\n", b"Host: a\r\n", b"Host: b\r\n", b"Content-Length: 3\r\n",
          b"Content-Length: -1\r\n", b"Transfer-Encoding: chunked\r\n",
          b"Transfer-Encoding: gzip\r\n", b"Expect: 100-continue\r\n", b"HTTP/1.1",
          b"HTTP/1.0", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"ffffffffffffffff\r\n"]


@st.composite
def mutated(draw) -> bytes:
    """A seed request with a few random edits."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "token", "delete", "repeat", "splice",
                                   "cut"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            at = min(at, len(data) - 1)
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "token":
            data[at:at] = draw(st.sampled_from(TOKENS))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif op == "repeat":
            data[at:at] = data[at:at + draw(st.integers(1, 40))]
        elif op == "splice":
            other = draw(st.sampled_from(SEEDS))
            data[at:] = other[draw(st.integers(0, len(other))):]
        elif op == "cut":
            del data[at:]
    return bytes(data)


_NAMES = st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Content-Type",
                          b"Expect", b"Connection", b"Cookie", b"X-A", b"x_a", b"Upgrade",
                          b"Trailer", b"Te"])
_VALUES = st.one_of(st.sampled_from([b"a", b"5", b"0", b"chunked", b"close", b"keep-alive",
                                     b"100-continue", b"gzip, chunked", b"1, 1", b" 7 "]),
                    st.binary(max_size=12))


@st.composite
def built(draw) -> bytes:
    """One to three requests put together from plausible and broken parts."""
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        eol = draw(st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r", b"\r\r\n"]))
        method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"PATCH",
                                       b"OPTIONS", b"CONNECT", b"get", b"FOO", b"G\x00T"]))
        target = b"/" + draw(st.binary(max_size=16)).replace(b" ", b"%20")
        target = draw(st.sampled_from([target, b"*", b"http://h" + target, b"h" + target]))
        version = draw(st.sampled_from([b"HTTP/1.1"] * 4 + [b"HTTP/1.0", b"HTTP/2.0",
                                                            b"HTTP/1.", b"http/1.1", b""]))
        fields = draw(st.lists(st.tuples(_NAMES, _VALUES), max_size=5))
        if draw(st.booleans()):
            fields.insert(0, (b"Host", b"a"))
        body = draw(st.binary(max_size=30))
        framing = draw(st.sampled_from(["none", "length", "chunked", "short", "long"]))
        if framing == "chunked":
            fields.append((b"Transfer-Encoding", b"chunked"))
            body = (b"%x" % len(body) + eol + body + eol if body else b"") + b"0" + eol + eol
        elif framing != "none":
            size = len(body) + {"length": 0, "short": -1, "long": 3}[framing]
            fields.append((b"Content-Length", b"%d" % max(size, 0)))
        head = method + b" " + target + (b" " + version if version else b"") + eol
        head += b"".join(name + b": " + value + eol for name, value in fields)
        out += head + eol + body
    return out


@st.composite
def delivered(draw, inputs) -> list[bytes]:
    """An input cut into one to four writes."""
    data = draw(inputs)
    if len(data) < 2:
        return [data] if data else [b"\r\n"]
    cuts = sorted(draw(st.lists(st.integers(1, len(data) - 1), max_size=3, unique=True)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    server = start_echo_server(tmp_path_factory.mktemp("fuzz"))
    yield server
    server.stop()


def check_exchange(server, pieces: list[bytes]) -> None:
    raw = b"".join(pieces)
    before = call_count(server)
    data = exchange(server.port, pieces, [0.0] + [0.001] * (len(pieces) - 1), timeout=15)
    responses = parse_responses(data, head_possible=b"HEAD" in raw.upper())
    calls = server.calls.read_text().splitlines()[before:] if server.calls.exists() else []
    echoed = []
    for i, (status, headers, body) in enumerate(responses):
        assert status in ALLOWED, (status, body)
        if status >= 400:
            # A refusal ends the connection: nothing after it, nothing of it in the app.
            assert i == len(responses) - 1, responses
        if "x-request-method" in headers:  # the app's answer (HEAD: without the body)
            echoed.append(json.loads(body)["REQUEST_URI"] if body else None)
    assert len(calls) == len(echoed), (calls, responses)
    for logged, uri in zip(calls, echoed, strict=True):
        assert uri is None or logged == uri
    # The front is up and serves a normal client.
    assert request(server.port, b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")[0] == 200


FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(pieces=delivered(mutated()))
def test_mutated_requests(fuzz_server, pieces):
    check_exchange(fuzz_server, pieces)


@FUZZ
@given(pieces=delivered(built()))
def test_built_requests(fuzz_server, pieces):
    check_exchange(fuzz_server, pieces)


@settings(FUZZ, max_examples=100)
@given(pieces=delivered(st.binary(min_size=1, max_size=200)))
def test_random_bytes(fuzz_server, pieces):
    check_exchange(fuzz_server, pieces)


def test_the_front_survived_the_fuzzing(fuzz_server):
    assert fuzz_server.proc.poll() is None
    assert "Traceback" not in fuzz_server.log, fuzz_server.log[-3000:]
