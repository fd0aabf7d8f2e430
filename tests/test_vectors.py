"""The peer's request corpus (gunicorn's tests/requests, in tests/vectors/gunicorn) replayed
against the live front and an echo app: whole, one byte at a time and split at random points.

Valid vectors must reach the app exactly as the peer parsed them; invalid ones must get a 4xx (or
a clean close when the input is incomplete) and never reach the app.  The tables below list every
vector where corral differs from the peer on purpose, each with its reason; a vector in none of
them is held to the peer's expectation as it stands.
"""

from __future__ import annotations

import base64
import json
import random
import re
import socket
import time
import zlib
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pytest

from tests.conftest import cases_config
from tests.harness import APPS, ROOT, ServerProcess, connect, copy_app, read_to_close

# A copy of the peer's corpus (MIT, its LICENSE and NOTICE beside it; SOURCE.md
# says where it came from and how its manifest was made).
VECTORS = ROOT / "tests" / "vectors" / "gunicorn"
MANIFEST = VECTORS / "manifest.json"


def load_vectors() -> dict[str, dict]:
    """name -> manifest entry, with the wire bytes decoded into "raw"."""
    cases = json.loads(MANIFEST.read_text())["cases"]
    for entry in cases.values():
        entry["raw"] = base64.b64decode(entry["raw_b64"])
    return cases


CASES = load_vectors()

# -- vectors not replayed: they test options of the peer that corral does not have ------------

_PROXY = "PROXY protocol (gunicorn's proxy_protocol): corral's front has no PROXY listener"
LEFT_OUT = {
    **{f"valid/pp_0{i}": _PROXY for i in range(1, 6)},
    **{f"invalid/pp_0{i}": _PROXY for i in range(1, 4)},
    "valid/028": "strip_header_spaces: corral always refuses space before the colon "
                 "(invalid/020 is the same bytes, refused)",
    "valid/031compat": "permit_unconventional_http_method and casefold_http_method: "
                       "lower-case methods are refused (llhttp knows registered methods only)",
    "valid/031compat2": "permit_unconventional_http_method: as valid/031compat",
    "valid/040_compat": "header_map = dangerous: corral always drops names with '_' "
                        "(valid/040 is the same bytes under the default mode, replayed)",
    "invalid/040": "header_map = refuse: corral drops names with '_' instead (valid/040)",
    "invalid/chunked_07": "header_map = refuse: as invalid/040",
    "valid/compat_obs_fold": "permit_obsolete_folding: corral always refuses obs-fold "
                             "(invalid/obs_fold_01 is the same bytes, refused)",
    "valid/compat_obs_fold_huge": "permit_obsolete_folding: as valid/compat_obs_fold",
    "invalid/010": "limit_request_field_size = 10: corral limits the whole head (max_header), "
                   "not each field",
    "invalid/011": "limit_request_fields = 2: corral's field count is fixed (200)",
    "invalid/012": "limit_request_field_size = 98: as invalid/010",
    "invalid/013": "limit_request_field_size = 14 with permit_obsolete_folding: as invalid/010",
    "invalid/019": "forwarded_allow_ips = '*' and X-Forwarded-Ssl: corral believes "
                   "X-Forwarded-For/Proto only from configured proxies, and reads no -Ssl",
}

# -- vectors corral answers otherwise than the peer, on purpose -------------------------------

# HTTP/1.1 requests without Host: RFC 9112 3.2 says a server MUST answer them with 400, and the
# peer accepts them.  Each is replayed as it is (400, the app not called) and again with a Host
# line added to every HTTP/1.1 request line, which must then match the peer's parse (or the
# outcome in DIFFERENT, for those that differ for a second reason).
NO_HOST = {
    "valid/004", "valid/005", "valid/006", "valid/007", "valid/009", "valid/010", "valid/011",
    "valid/012", "valid/013", "valid/014", "valid/018", "valid/021", "valid/022", "valid/023",
    "valid/025", "valid/025_line", "valid/029", "valid/030", "valid/031", "valid/100",
}
HOST_LINE = b"Host: vectors.test\r\n"

# name -> (what corral answers: a status, or None for a close without a response, why).
# The app is never called for these; for those in NO_HOST, this is the outcome once the
# Host line is added.
DIFFERENT = {
    "valid/005": (400, "a fragment (#) in the request target: RFC 9112 3.2 has none"),
    "valid/009": (400, "a fragment in the target, and Content-Length with Transfer-Encoding "
                       "(a smuggling signal: RFC 9112 6.1 lets a server refuse it)"),
    "valid/025": (501, "Transfer-Encoding gzip: corral decodes no transfer coding but chunked "
                       "(RFC 9112 6.1: 501 for a coding the server does not understand)"),
    "valid/025_line": (501, "as valid/025, in one field"),
    "valid/029": (501, "Transfer-Encoding identity: not a transfer coding since RFC 7230"),
    "valid/030": (501, "as valid/029"),
    "valid/013": (400, "whitespace around ';' in chunk extensions: RFC 9112 7.1.1 lets a "
                       "recipient parse this BWS, which no sender may generate; llhttp refuses it"),
    "valid/031": (400, "an unregistered method: llhttp parses registered methods only"),
    "valid/099": (None, "the vector stops 9 KB short of its Content-Length (the peer's test "
                        "parses only the head): on a socket that is an incomplete request"),
    "valid/rfc9112_smuggle_gzip_chunked_01": (501, "as valid/025"),
    "valid/rfc9112_smuggle_te_identity_chunked_01": (501, "as valid/029"),
    "valid/rfc9112_target_absolute_userinfo_01": (
        400, "userinfo in an http(s) target: RFC 9110 4.2.4 says to treat it as an error"),
    "valid/rfc9112_target_authority_connect_01": (
        405, "CONNECT: corral is an origin server, not a proxy"),
    "valid/rfc9112_target_authority_ipv6_01": (405, "as the other CONNECT"),
    "valid/rfc9112_target_asterisk_options_01": (
        200, "OPTIONS * is about the server, so the front answers it (with Allow) itself"),
    "invalid/version_02": (505, "HTTP/2.0 is a well-formed version, only not ours: 505 "
                                "(RFC 9110 15.6.6) rather than 400"),
}

# Invalid for the peer only by its default limits (4094-byte request line, 8190-byte field,
# 100 fields); corral's are larger (max_url 8 KiB, max_header 64 KiB for the whole head, 200
# fields: see K19), so these must reach the app whole.
WITHIN_OUR_LIMITS = {
    "invalid/006": "a 4112-byte request line",
    "invalid/007": "an 8203-byte field",
    "invalid/008": "an 8189-byte field and a 4108-byte one",
    "invalid/009": "101 fields",
    "invalid/limit_header_default_01": "an 8190-byte field (its cfg restates the peer's default)",
}

# Replayed though they carry a cfg: it only raises the peer's limits to within corral's.
CFG_WITHIN_OUR_DEFAULTS = {"valid/024", "valid/026", "invalid/limit_header_default_01"}


# -- the echo server and the wire ---------------------------------------------------------------

def start_echo_server(root: Path, processes: int = 2, server: str = "") -> ServerProcess:
    """The cases app with every path echoing the request as JSON (no static mapping), calls
    logged."""
    app = copy_app(APPS / "cases", root / "cases")
    config = cases_config(app, processes, server).replace("cases:application", "cases:echo_all")
    config = config.replace('[static]\n"/files/" = "public"\n', "")
    assert "[static]" not in config
    (app / "corral.toml").write_text(config)
    started = ServerProcess(app).wait_ready()
    started.calls = app / "calls.log"
    return started


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    server = start_echo_server(tmp_path_factory.mktemp("vectors"))
    yield server
    server.stop()


def call_count(server) -> int:
    try:
        return len(server.calls.read_text().splitlines())
    except FileNotFoundError:
        return 0


def exchange(port: int, pieces: list[bytes], pause: list[float] | None = None,
             timeout: float = 10.0) -> bytes:
    """Send `pieces` (each in its own write, after `pause[i]` seconds), half-close, and read
    everything the front sends until it closes."""
    with connect(port, timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for i, piece in enumerate(pieces):
                if pause and pause[i]:
                    time.sleep(pause[i])
                sock.sendall(piece)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # refused part-way and closed: what it answered is still to be read
        data = read_to_close(sock)
    return data


_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [\x20-\x7e]*")
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\x20-\x7e\t]*)")


def parse_responses(data: bytes, head_possible: bool = False
                    ) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream from the front into its responses, checking each is well-formed
    HTTP/1.1: a status line, valid fields, and a body framed by Content-Length, chunked coding
    or the close.  AssertionError on anything else.

    An answer to HEAD has no body: the echo app names the method in X-Request-Method, and an
    error that ends the stream without its body is taken for one when `head_possible`."""
    out = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"a response head without its end: {head[:200]!r}"
        lines = head.split(b"\r\n")
        match = _STATUS_LINE.fullmatch(lines[0])
        assert match, f"not a status line: {lines[0]!r}"
        status = int(match.group(1))
        headers: dict[str, str] = {}
        for line in lines[1:]:
            field = _FIELD.fullmatch(line)
            assert field, f"not a header field: {line!r}"
            name = field.group(1).decode().lower()
            assert name not in headers or name == "set-cookie", f"{name} twice in {head!r}"
            headers[name] = field.group(2).decode("latin-1").strip()
        if 100 <= status < 200:
            out.append((status, headers, b""))
            continue
        assert not ("content-length" in headers and "transfer-encoding" in headers), head
        if status in (204, 304) or headers.get("x-request-method") == "HEAD" or (
                head_possible and status >= 400 and not data):
            body = b""
        elif "content-length" in headers:
            length = int(headers["content-length"])
            assert len(data) >= length, f"body {len(data)} bytes of {length}"
            body, data = data[:length], data[length:]
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, sep, data = data.partition(b"\r\n")
                assert sep and re.fullmatch(rb"[0-9a-f]+", size_line), size_line[:50]
                size = int(size_line, 16)
                assert data[size:size + 2] == b"\r\n", "chunk without its CRLF"
                body, data = body + data[:size], data[size + 2:]
                if size == 0:
                    break
        else:
            assert headers.get("connection") == "close", f"no framing in {head!r}"
            body, data = data, b""
        out.append((status, headers, body))
    return out


# -- what the app should see ------------------------------------------------------------------

def expected_environ(expect: dict, extra_host: bool = False) -> dict[str, str]:
    """The environ keys the echo app reports for a request the peer parsed as `expect`, built
    the way the front turns a request into FastCGI params."""
    method = expect["method"]
    target = expect["uri"]["uri_raw"].encode("latin-1")
    version = "{}.{}".format(*expect["version"])
    headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in expect["headers"]]
    if extra_host and version == "1.1":
        headers.insert(0, (b"HOST", b"vectors.test"))
    body = expect["body"]["bytes_latin1"] if isinstance(expect["body"], dict) else expect["body"]
    absolute = re.match(rb"https?://([^/]*)", target)
    if absolute:  # RFC 9112 3.2.2: the target's authority is the host, for the app too
        target = target[absolute.end():] or b"/"
        headers = [(n, absolute.group(1) if n == b"HOST" else v) for n, v in headers]
    target = re.sub(rb"[\x80-\xff]", lambda m: b"%%%02X" % m.group()[0], target)
    path, _, query = target.partition(b"?")
    env = {
        "REQUEST_METHOD": method,
        "REQUEST_URI": target.decode("latin-1"),
        "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
        "QUERY_STRING": query.decode("latin-1"),
        "SERVER_PROTOCOL": "HTTP/" + version,
        "SCRIPT_NAME": "",
        "body": body,
    }
    framed = bool(body)
    for name, value in headers:
        lower = name.lower()
        if lower in (b"content-length", b"transfer-encoding"):
            framed = True
            continue
        if lower == b"expect" or b"_" in name:
            continue  # the front answers Expect; "_" names could pose as "-" ones
        if lower == b"content-type":
            env["CONTENT_TYPE"] = value.decode("latin-1")
            continue
        key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
        sep = "; " if lower == b"cookie" else ", "  # repeated fields are joined
        env[key] = env[key] + sep + value.decode("latin-1") if key in env else value.decode(
            "latin-1")
    if framed:
        env["CONTENT_LENGTH"] = str(len(body.encode("latin-1")))
    return env


def seen_environ(echoed: dict) -> dict[str, str]:
    keys = ("REQUEST_METHOD", "REQUEST_URI", "PATH_INFO", "QUERY_STRING", "SERVER_PROTOCOL",
            "SCRIPT_NAME", "body")
    # HTTP_X_REQUEST_ID is the front's own addition when the request has none.
    return {k: v for k, v in echoed.items()
            if k in keys or k.startswith(("HTTP_", "CONTENT_")) and k != "HTTP_X_REQUEST_ID"}


def with_host(raw: bytes) -> bytes:
    """`raw` with a Host line after every HTTP/1.1 request line."""
    return re.sub(rb"(?:^|(?<=\n))([A-Za-z-]+ [^ \r\n]+ HTTP/1\.1\r\n)",
                  lambda m: m.group(1) + HOST_LINE, raw)


# -- the three ways to send a vector ----------------------------------------------------------

def whole(raw: bytes, name: str):
    return [raw], None


def bytewise(raw: bytes, name: str):
    # Back-to-back one-byte writes would reach the front's read in batches: a short pause
    # between them lets it see them one by one.  Long vectors get the pause in their first
    # 512 bytes and their last 64 only (where the states change), to keep the run short.
    pause = [0.0002 if i < 512 or i >= len(raw) - 64 else 0.0 for i in range(len(raw))]
    return [raw[i:i + 1] for i in range(len(raw))], pause


def random_split(raw: bytes, name: str):
    rng = random.Random(zlib.crc32(name.encode()))  # a fixed seed per vector
    cuts = sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, rng.randint(1, 6))))
    pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    return pieces, [0.0] + [0.002] * (len(pieces) - 1)


MODES = {"whole": whole, "bytewise": bytewise, "split": random_split}


def replay(server, raw: bytes, name: str, mode: str):
    """Send `raw` one way; return (responses, how many times the app was called)."""
    before = call_count(server)
    pieces, pause = MODES[mode](raw, name)
    responses = parse_responses(exchange(server.port, pieces, pause))
    return responses, call_count(server) - before


def check_valid(server, raw: bytes, name: str, mode: str, expect, extra_host: bool = False):
    expected = expect if isinstance(expect, list) else [expect]
    responses, calls = replay(server, raw, name, mode)
    assert [r[0] for r in responses] == [200] * len(expected), responses
    assert calls == len(expected)
    for (_, _, body), want in zip(responses, expected, strict=True):
        assert seen_environ(json.loads(body)) == expected_environ(want, extra_host)


def check_no_host(server, raw: bytes, name: str, mode: str, expect):
    """As it is: the requests before the first HTTP/1.1 one without Host are answered, that
    one gets 400 (or, when it arrives while an answer is on its way, just the close)."""
    expected = expect if isinstance(expect, list) else [expect]
    answered = next(i for i, e in enumerate(expected)
                    if e["version"] == [1, 1] and all(n != "HOST" for n, _ in e["headers"]))
    responses, calls = replay(server, raw, name, mode)
    statuses = [r[0] for r in responses]
    assert statuses[:answered] == [200] * answered and statuses[answered:] in ([], [400])
    assert calls == answered


def check_refused(server, raw: bytes, name: str, mode: str, status: int | None):
    responses, calls = replay(server, raw, name, mode)
    assert calls == 0, f"a refused request reached the app: {responses}"
    if status is None:
        assert responses == [], "an incomplete request got an answer"
    else:
        assert [r[0] for r in responses] == [status]


REPLAYED = sorted(name for name, entry in CASES.items()
                  if name not in LEFT_OUT
                  and (not entry.get("cfg") or name in CFG_WITHIN_OUR_DEFAULTS))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", REPLAYED)
def test_vector(echo_server, name, mode):
    entry = CASES[name]
    raw = entry["raw"]
    if name in NO_HOST:
        check_no_host(echo_server, raw, name, mode, entry["expect"])
        raw = with_host(raw)
    if name in DIFFERENT:
        status, _ = DIFFERENT[name]
        if status == 200:  # answered by the front itself
            responses, calls = replay(echo_server, raw, name, mode)
            assert [r[0] for r in responses] == [200] and calls == 0
        else:
            check_refused(echo_server, raw, name, mode, status)
    elif name in WITHIN_OUR_LIMITS:
        responses, calls = replay(echo_server, raw, name, mode)
        assert [r[0] for r in responses] == [200] and calls == 1
        # The longest line of the head (the one over the peer's limit) arrived whole.
        longest = max(raw.partition(b"\r\n\r\n")[0].split(b"\r\n"), key=len)
        value = longest.split(b" ")[1] if b":" not in longest else longest.partition(b":")[2]
        value = value.strip().decode("latin-1")
        assert any(value in str(seen) for seen in json.loads(responses[0][2]).values())
    elif entry["kind"] == "valid":
        check_valid(echo_server, raw, name, mode, entry["expect"], name in NO_HOST)
    else:
        # "NoMoreData" and the like: the input stops mid-request, so the front only closes.
        incomplete = entry["expect_error"] in ("NoMoreData", "ChunkMissingTerminator")
        responses, calls = replay(echo_server, raw, name, mode)
        assert calls == 0, f"a refused request reached the app: {responses}"
        if incomplete:
            assert responses == []
        else:
            assert len(responses) == 1 and 400 <= responses[0][0] < 500, responses


def test_every_vector_is_replayed_or_left_out_with_a_reason():
    if not CASES:
        pytest.skip(f"no corpus at {VECTORS}")
    assert len(CASES) == 137
    assert set(LEFT_OUT) <= set(CASES) and NO_HOST | set(DIFFERENT) <= set(CASES)
    # Left out are exactly the vectors whose cfg asks for an option corral does not have.
    needs_cfg = {n for n, e in CASES.items() if e.get("cfg")} - CFG_WITHIN_OUR_DEFAULTS
    assert set(LEFT_OUT) == needs_cfg
    # NO_HOST is exactly the valid vectors with an HTTP/1.1 request lacking Host.
    lacking = set()
    for name, entry in CASES.items():
        if entry["kind"] != "valid" or name in LEFT_OUT:
            continue
        expected = entry["expect"] if isinstance(entry["expect"], list) else [entry["expect"]]
        if any(e["version"] == [1, 1] and all(n != "HOST" for n, _ in e["headers"])
               for e in expected):
            lacking.add(name)
    assert lacking == NO_HOST
    assert all(CASES[n]["kind"] == "invalid" for n in WITHIN_OUR_LIMITS)


# -- the smuggling cases of ../shared/cases.md, replayed the same three ways --------------------

CASE_INPUTS = {
    # K02: Transfer-Encoding with a negative Content-Length: 400 at once, never a hang.
    "K02": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
           b"Content-Length: -2054\r\nConnection: close\r\n\r\n0\r\n\r\n",
    # K03: two different Content-Lengths, one list of them, and identical repeats (which a
    # server may collapse; corral refuses them too).
    "K03 two fields": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 5\r\n"
                      b"\r\nabcde",
    "K03 a list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 5\r\n\r\nabcde",
    "K03 repeated": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n"
                    b"\r\nabcde",
    # K04: a request hidden behind a bare LF, and NUL or a lone CR inside a value.
    "K04 bare LF": b"GET / HTTP/1.1\r\nHost: a\r\nX-U:\n\nGET /admin HTTP/1.1\nHost: a\r\n\r\n",
    "K04 NUL": b"GET / HTTP/1.1\r\nHost: a\r\nX-U: a\x00b\r\n\r\n",
    "K04 lone CR": b"GET / HTTP/1.1\r\nHost: a\r\nX-U: a\rb\r\n\r\n",
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASE_INPUTS)
def test_smuggling_case_is_refused(echo_server, case, mode):  # K02, K03, K04
    started = time.monotonic()
    check_refused(echo_server, CASE_INPUTS[case], case, mode, 400)
    assert time.monotonic() - started < 5  # answered, not left to a timeout
