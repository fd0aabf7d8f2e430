"""The `python` engine (corral.worker) as a real process, spoken to in real
FastCGI over its unix socket: the environ it builds, the heads it writes, its
protocol answers, and how it starts and stops.

Each test starts its own worker and waits for its "listening on" line, so a
crash in one test cannot leak into the next.  Log assertions come after
stop(), which joins the log reader: the whole log is in by then.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

import pytest

from corral import fastcgi
from corral import worker as engine
from corral.fastcgi import ProtocolStatus, RecordType, ServerConnection
from tests.harness import FastCGIClient, WorkerProcess, cgi_params, is_closed

# tests/apps is on the worker's PYTHONPATH; the cases folder is a namespace package.
CASES = "cases.cases:application"
ECHO = "cases.cases:echo"  # the echo app on every path, for mount tests
VALIDATED = "validated:application"


# -- helpers ----------------------------------------------------------------

class Reply(NamedTuple):
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    stdout: bytes
    end: fastcgi.EndRequest | None


def parse(stdout: bytes, end: fastcgi.EndRequest | None = None) -> Reply:
    """A CGI response as the worker writes it into FCGI_STDOUT."""
    head, sep, body = stdout.partition(b"\r\n\r\n")
    assert sep, f"no complete head in STDOUT: {stdout[:300]!r}"
    headers = []
    for line in head.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        assert colon, f"head line without a colon: {line!r}"
        headers.append((name, value.strip()))
    status = [value for name, value in headers if name.lower() == b"status"]
    assert len(status) == 1, f"expected one Status line in {head!r}"
    return Reply(int(status[0][:3]), headers, body, stdout, end)


def header(reply: Reply, name: bytes) -> list[bytes]:
    return [value for key, value in reply.headers if key.lower() == name.lower()]


def request_bytes(uri: str = "/", method: str | None = "GET", body: bytes = b"",
                  request_id: int = 1, end_body: bool = True, keep_conn: bool = True,
                  **extra: str | None) -> bytes:
    """A whole request as a web server writes it; a None param is left out."""
    params = {k: v for k, v in cgi_params(method, uri, body, **extra).items() if v is not None}
    data = ServerConnection.begin_request(
        request_id, [(k.encode("latin-1"), v.encode("latin-1")) for k, v in params.items()],
        keep_conn)
    if body:
        data += ServerConnection.stdin(request_id, body)
    return data + (ServerConnection.stdin(request_id, b"") if end_body else b"")


def ask(target: WorkerProcess | FastCGIClient, uri: str = "/", method: str | None = "GET",
        body: bytes = b"", **extra: str | None) -> Reply:
    """One request on a new connection (or on `target` if it is a client)."""
    client = target if isinstance(target, FastCGIClient) else FastCGIClient(target.path)
    try:
        client.send(request_bytes(uri, method, body, **extra))
        stdout, _, end = client.read_response()
    finally:
        if client is not target:
            client.close()
    assert end.protocol_status == ProtocolStatus.REQUEST_COMPLETE
    return parse(stdout, end)


def echo(target, uri: str = "/", **kwargs) -> dict:
    reply = ask(target, uri, **kwargs)
    assert reply.status == 200, reply.stdout
    return json.loads(reply.body)


def raw_path(text: str) -> str:
    """`text` as UTF-8 bytes carried unescaped (each byte one latin-1 char)."""
    return text.encode("utf-8").decode("latin-1")


def read_to_close(client: FastCGIClient) -> tuple[bytes, list]:
    """Everything the worker sends until it closes: (STDOUT bytes, events)."""
    stdout, events = bytearray(), []
    while True:
        try:
            batch = client.events()
        except ConnectionError:
            return bytes(stdout), events
        events += batch
        stdout += b"".join(e.data for e in batch if isinstance(e, fastcgi.Stdout))


def wait_for_line(proc: WorkerProcess, text: str, timeout: float = 10.0) -> None:
    """Until the app has logged `text` (a condition, not a readiness guess)."""
    deadline = time.monotonic() + timeout
    while text not in proc.log:
        assert proc.proc.poll() is None, f"worker exited; log:\n{proc.log}"
        assert time.monotonic() < deadline, f"no {text!r} in log:\n{proc.log}"
        time.sleep(0.01)


def begin(request_id: int = 1, role: int = fastcgi.Role.RESPONDER, keep: bool = True) -> bytes:
    return fastcgi.encode_record(RecordType.BEGIN_REQUEST, request_id,
                                 fastcgi.BEGIN_BODY.pack(role, fastcgi.FCGI_KEEP_CONN * keep))



@pytest.fixture
def spawn():
    """Start workers (unix socket paths must stay under 108 bytes, so no tmp_path)."""
    folder = Path(tempfile.mkdtemp(prefix="cw"))
    started: list[WorkerProcess] = []

    def start(app: str = CASES, *args: str, ready: bool = True) -> WorkerProcess:
        place = folder / str(len(started))
        place.mkdir()
        proc = WorkerProcess(app, place, *args)
        started.append(proc)
        return proc.wait_ready() if ready else proc

    yield start
    for proc in started:
        proc.stop()
        proc.proc.stderr.close()  # stop() leaves the pipe open; filterwarnings = error
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def worker(spawn) -> WorkerProcess:
    return spawn()


@pytest.fixture
def echo_worker(spawn) -> WorkerProcess:
    return spawn(ECHO)


# -- PEP 3333 environ -------------------------------------------------------

def test_root_app_gets_empty_script_name_even_if_the_server_sends_slash(echo_worker):
    seen = echo(echo_worker, "/a/b", SCRIPT_NAME="/")
    assert (seen["SCRIPT_NAME"], seen["PATH_INFO"]) == ("", "/a/b")


def test_percent_encoded_utf8_path_is_latin1_decoded_bytes(echo_worker):  # K07
    seen = echo(echo_worker, "/%D1%82%D0%B5%D1%81%D1%82/")
    assert seen["PATH_INFO"].encode("latin-1").decode("utf-8") == "/тест/"


def test_raw_utf8_path_gives_the_same_path_info(echo_worker):  # K07
    seen = echo(echo_worker, raw_path("/тест/"))
    assert seen["PATH_INFO"].encode("latin-1").decode("utf-8") == "/тест/"


def test_raw_and_escaped_bytes_mixed_in_one_path_decode_alike(echo_worker):  # K07
    seen = echo(echo_worker, raw_path("/т") + "%D0%B5" + raw_path("ст/"))
    assert seen["PATH_INFO"].encode("latin-1").decode("utf-8") == "/тест/"


def test_query_string_reaches_the_app_undecoded(echo_worker):
    seen = echo(echo_worker, "/q?a=1&b=%20x")
    assert (seen["PATH_INFO"], seen["QUERY_STRING"]) == ("/q", "a=1&b=%20x")


def test_body_and_content_headers_reach_the_app(echo_worker):
    seen = echo(echo_worker, "/post", method="POST", body=b"a=1&b=2",
                CONTENT_TYPE="application/x-www-form-urlencoded")
    assert seen["CONTENT_LENGTH"] == "7"
    assert seen["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    assert seen["body"] == "a=1&b=2"
    assert seen["input_terminated"] is True


def test_missing_content_length_is_filled_from_the_received_body(echo_worker):  # K01
    # No CONTENT_LENGTH, as nginx sends for a chunked body it streams.
    seen = echo(echo_worker, "/post", method="POST", body=b"a=1&b=2", CONTENT_LENGTH=None)
    assert (seen["CONTENT_LENGTH"], seen["body"]) == ("7", "a=1&b=2")


def test_get_without_body_has_no_content_length(echo_worker):
    seen = echo(echo_worker, "/", CONTENT_LENGTH="")
    assert "CONTENT_LENGTH" not in seen


def test_nginx_style_http_content_headers_are_not_passed_on(echo_worker):
    # nginx forwards every request header as HTTP_*; PEP 3333 (via CGI) has
    # only CONTENT_TYPE and CONTENT_LENGTH for these two.
    seen = echo(echo_worker, "/p", method="POST", body=b"x", CONTENT_TYPE="text/plain",
                HTTP_CONTENT_TYPE="text/plain", HTTP_CONTENT_LENGTH="1")
    assert "HTTP_CONTENT_TYPE" not in seen and "HTTP_CONTENT_LENGTH" not in seen
    assert (seen["CONTENT_TYPE"], seen["CONTENT_LENGTH"]) == ("text/plain", "1")


def test_wsgi_multiprocess_is_true(echo_worker):
    assert echo(echo_worker)["multiprocess"] is True


def test_url_scheme_follows_the_https_param(echo_worker):
    assert echo(echo_worker, HTTPS="on")["wsgi.url_scheme"] == "https"
    assert echo(echo_worker)["wsgi.url_scheme"] == "http"


def test_request_without_request_method_gets_400_and_the_worker_serves_on(worker):
    client = FastCGIClient(worker.path)
    assert ask(client, "/pid", method=None).status == 400
    assert ask(client, "/pid").status == 200
    client.close()


# -- K09/K10: mount prefix --------------------------------------------------

@pytest.fixture
def mounted(spawn) -> WorkerProcess:
    return spawn(ECHO, "--mount", "/foo")


def test_mount_splits_script_name_and_path_info(mounted):
    seen = echo(mounted, "/foo/x?y=1")
    assert (seen["SCRIPT_NAME"], seen["PATH_INFO"], seen["QUERY_STRING"]) == ("/foo", "/x", "y=1")


def test_mount_point_itself_has_empty_path_info(mounted):
    seen = echo(mounted, "/foo")
    assert (seen["SCRIPT_NAME"], seen["PATH_INFO"]) == ("/foo", "")


@pytest.mark.parametrize("uri", ["/foobar", "/", "/fo"])
def test_path_outside_the_mount_is_404_and_the_worker_serves_on(mounted, uri):
    client = FastCGIClient(mounted.path)
    assert ask(client, uri).status == 404
    assert echo(client, "/foo/x")["PATH_INFO"] == "/x"
    client.close()


def test_mount_split_comes_from_request_uri_not_the_servers_script_name(mounted):  # K10
    seen = echo(mounted, "/foo/user/profile?x=1", SCRIPT_NAME="/foo/user/profile",
                PATH_INFO=None)
    assert (seen["SCRIPT_NAME"], seen["PATH_INFO"]) == ("/foo", "/user/profile")


def test_root_app_ignores_nginx_whole_path_script_name(echo_worker):  # K10
    seen = echo(echo_worker, "/user/profile?x=1", SCRIPT_NAME="/user/profile", PATH_INFO=None)
    assert (seen["SCRIPT_NAME"], seen["PATH_INFO"], seen["QUERY_STRING"]) == (
        "", "/user/profile", "x=1")


# -- wsgiref.validate -------------------------------------------------------

def test_validator_finds_nothing_wrong_with_the_worker(spawn):
    proc = spawn(VALIDATED)
    client = FastCGIClient(proc.path)
    assert ask(client, "/echo", "POST", b"a=1", CONTENT_TYPE="text/plain",
               HTTP_CONTENT_TYPE="text/plain", HTTP_CONTENT_LENGTH="3").status == 200
    assert ask(client, "/write").body == b"hello world"
    assert ask(client, "/stream").body == b"chunk 0\nchunk 1\nchunk 2\n"
    assert ask(client, "/head", "HEAD").status == 200
    assert ask(client, "/digest", "POST", b"x" * 100_000).status == 200
    client.close()
    log = proc.stop()
    for sign in ("AssertionError", "Warning", "without being closed", "error in app"):
        assert sign not in log


# -- K05/K06/K08: heads the app gives ---------------------------------------

@pytest.mark.parametrize("variant", ["value", "name", "status", "nul"])
def test_header_injection_is_refused_with_a_clean_500(worker, variant):  # K05
    client = FastCGIClient(worker.path)
    reply = ask(client, f"/split-header?{variant}")
    assert reply.status == 500
    for part in (b"X-T", b"Injected", b"Content-Length: 0", b"\x00", b"body"):
        assert part not in reply.stdout
    assert ask(client, "/pid").status == 200
    client.close()
    assert "HeadError" in worker.stop()


def test_two_set_cookie_lines_survive_separately_in_order(worker):  # K06
    reply = ask(worker, "/cookies")
    assert header(reply, b"Set-Cookie") == [b"a=1; Path=/", b"b=2; Path=/"]


def test_latin1_location_is_sent_as_latin1_bytes(worker):  # K08
    reply = ask(worker, "/location")
    assert (reply.status, header(reply, b"Location")) == (302, [b"/foob\xe0r"])


def test_non_latin1_location_is_a_clean_500_and_logged(worker):  # K08
    reply = ask(worker, "/location?euro")
    assert reply.status == 500 and b"Location" not in reply.stdout
    assert "not latin-1" in worker.stop()


# -- K14/K15: start_response and write --------------------------------------

def test_exc_info_before_any_body_lets_the_app_send_its_own_500(worker):  # K14
    reply = ask(worker, "/exc-info")
    assert (reply.status, reply.body) == (500, b"oops")


def test_an_empty_chunk_does_not_send_the_head_early(worker):  # K14, PEP 3333
    reply = ask(worker, "/exc-info-after-empty")
    assert (reply.status, reply.body) == (500, b"oops")


def test_exc_info_after_a_body_chunk_aborts_with_one_status(worker):  # K14
    client = FastCGIClient(worker.path)
    client.send(request_bytes("/exc-info?late"))
    stdout, events = read_to_close(client)
    client.close()
    assert not any(isinstance(e, fastcgi.EndRequest) for e in events)
    assert stdout.count(b"Status:") == 1
    reply = parse(stdout)
    assert (reply.status, reply.body) == (200, b"first chunk")
    assert "ValueError: boom" in worker.stop()


def test_second_start_response_without_exc_info_is_a_logged_500(worker):  # K14
    assert ask(worker, "/twice").status == 500
    assert "second time" in worker.stop()


def test_write_callable_gives_one_head_and_the_body_in_order(worker):  # K15
    reply = ask(worker, "/write")
    assert reply.stdout.count(b"Status:") == 1 and reply.stdout.startswith(b"Status: 200")
    assert reply.body == b"hello world"


def test_head_keeps_content_length_but_sends_no_body(worker):
    reply = ask(worker, "/head", "HEAD")
    assert (reply.status, header(reply, b"Content-Length"), reply.body) == (200, [b"12"], b"")


# -- app failures -----------------------------------------------------------

def test_app_exception_is_a_500_with_a_logged_traceback_and_same_worker_serves_on(worker):
    before = ask(worker, "/pid").body
    assert ask(worker, "/crash").status == 500
    assert ask(worker, "/pid").body == before == str(worker.proc.pid).encode()
    log = worker.stop()
    assert "Traceback" in log and "RuntimeError: the app failed on purpose" in log


def test_close_is_called_on_the_iterable(worker):
    assert ask(worker, "/closing").body == b"closing body"
    assert "CLOSE CALLED" in worker.stop()


def test_close_is_called_when_iteration_fails_before_the_body(worker):
    assert ask(worker, "/closing-fails").status == 500
    log = worker.stop()
    assert "CLOSE CALLED" in log and "the body failed on purpose" in log


def test_close_is_called_when_iteration_fails_mid_body(worker):
    client = FastCGIClient(worker.path)
    client.send(request_bytes("/closing-fails?late"))
    stdout, events = read_to_close(client)
    client.close()
    assert parse(stdout).body == b"first chunk"
    assert not any(isinstance(e, fastcgi.EndRequest) for e in events)
    assert "CLOSE CALLED" in worker.stop()


# -- K16: connections -------------------------------------------------------

def test_keep_conn_serves_two_requests_with_the_same_id(worker):
    client = FastCGIClient(worker.path)
    assert ask(client, "/pid").status == 200
    assert ask(client, "/cookies").status == 200
    client.close()


def test_without_keep_conn_the_worker_closes_after_end_request(worker):
    client = FastCGIClient(worker.path)
    stdout, _, end = client.request(cgi_params(uri="/pid"), keep_conn=False)
    assert parse(stdout, end).status == 200
    assert is_closed(client.sock)
    client.close()


def values(client: FastCGIClient) -> dict:
    client.send(ServerConnection.get_values([b"FCGI_MPXS_CONNS", b"FCGI_MAX_REQS"]))
    [result] = client.events()
    assert isinstance(result, fastcgi.ValuesResult)
    return result.values


def test_get_values_is_answered_on_a_kept_connection_between_requests(worker):
    client = FastCGIClient(worker.path)
    assert values(client)[b"FCGI_MPXS_CONNS"] == b"0"
    assert ask(client, "/pid").status == 200
    assert values(client)[b"FCGI_MPXS_CONNS"] == b"0"
    assert ask(client, "/pid").status == 200
    client.close()


def test_abort_while_the_body_arrives_ends_the_request_and_the_connection_serves_on(worker):
    client = FastCGIClient(worker.path)
    client.send(request_bytes("/digest", "POST", b"a", end_body=False, CONTENT_LENGTH="2")
                + ServerConnection.abort_request(1))
    stdout, _, end = client.read_response()
    assert (end.request_id, stdout) == (1, b"")
    assert end.protocol_status == ProtocolStatus.REQUEST_COMPLETE
    assert ask(client, "/pid").status == 200
    client.close()


def test_abort_read_together_with_the_body_end_does_not_kill_the_worker(worker):  # K17
    client = FastCGIClient(worker.path)
    client.send(request_bytes("/pid") + ServerConnection.abort_request(1))
    client.read_response()  # served, or ended by the abort: either is a clean end
    assert ask(client, "/pid").body == str(worker.proc.pid).encode()
    client.close()


def test_several_kept_connections_are_served_side_by_side(worker):
    """nginx with keepalive holds several connections to one worker: each is
    served when it has a request, none waits for another to close."""
    first, second = FastCGIClient(worker.path), FastCGIClient(worker.path)
    assert ask(first, "/pid").status == 200  # `first` stays open, idle
    assert ask(second, "/pid").status == 200
    assert ask(first, "/pid").status == 200
    half = request_bytes("/pid")
    first.send(half[:10])  # a request begun on one connection...
    assert ask(second, "/pid").status == 200  # ...does not hold up another
    first.send(half[10:])
    assert first.read_response()[2].protocol_status == ProtocolStatus.REQUEST_COMPLETE
    first.close()
    second.close()


def test_request_fed_one_byte_at_a_time_is_served(echo_worker):
    client = FastCGIClient(echo_worker.path)
    data = request_bytes("/b", "POST", b"xyz")
    for i in range(len(data)):
        client.send(data[i:i + 1])
    stdout, _, _ = client.read_response()
    client.close()
    assert json.loads(parse(stdout).body)["body"] == "xyz"


@pytest.mark.parametrize("seed", range(5))
def test_request_cut_at_random_points_is_served(echo_worker, seed):
    # Params over one record (a pair straddles the boundary) and a body over
    # one record, sent in pieces cut anywhere, headers and lengths included
    # (the socket may join some pieces again; test_fastcgi cuts exactly).
    rng = random.Random(seed)
    cookie = "k=" + "c" * 70_000
    body = rng.randbytes(70_000)
    data = request_bytes("/b?q=1", "POST", body, HTTP_COOKIE=cookie)
    cuts = sorted(rng.sample(range(1, len(data)), 40))
    client = FastCGIClient(echo_worker.path)
    for start, stop in zip([0, *cuts], [*cuts, len(data)], strict=True):
        client.send(data[start:stop])
    stdout, _, _ = client.read_response()
    client.close()
    seen = json.loads(parse(stdout).body)
    assert (seen["HTTP_COOKIE"], seen["QUERY_STRING"]) == (cookie, "q=1")
    assert seen["body"].encode("latin-1") == body


# -- K17: aborts while the app runs -----------------------------------------

DRIP = "drip:application"  # one chunk per 0.1 s, 100 of them; close() leaves a mark


def read_until(client: FastCGIClient, done) -> list:
    """Events until one for which done(event) is true, that one included."""
    events = []
    while not any(done(e) for e in events):
        events += client.events()
    return events


def first_chunk(client: FastCGIClient, path: str, mark: Path, keep: bool = True) -> None:
    """Start a dripping response and read until its first chunk is in."""
    client.send(request_bytes(f"{path}?mark={quote(str(mark))}", keep_conn=keep))
    events = read_until(client, lambda e: isinstance(e, fastcgi.Stdout) and e.data)
    assert not any(isinstance(e, fastcgi.EndRequest) for e in events)


def chunks_made(mark: Path) -> int:
    """How many chunks the app had made when it was closed (or stopped)."""
    return int(mark.read_text().split(" after ")[1].split()[0])


@pytest.mark.parametrize("path", ["/drip", "/drip-write"])
@pytest.mark.parametrize("keep", [True, False], ids=["keep-conn", "no-keep-conn"])
def test_abort_mid_response_stops_the_app_and_ends_the_request(spawn, tmp_path, path, keep):
    proc = spawn(DRIP)
    client = FastCGIClient(proc.path)
    mark = tmp_path / "closed"
    first_chunk(client, path, mark, keep)
    asked = time.monotonic()
    client.send(ServerConnection.abort_request(1))
    _, _, end = client.read_response()
    took = time.monotonic() - asked
    # The whole response would take 10 s; the worker looks between chunks.
    assert took < 2, f"END_REQUEST came {took:.1f} s after the abort"
    assert (end.request_id, end.protocol_status) == (1, ProtocolStatus.REQUEST_COMPLETE)
    assert chunks_made(mark) < 20  # close() (or the app's finally) ran, early
    if keep:
        assert ask(client, "/pid").body == str(proc.proc.pid).encode()
    else:
        assert is_closed(client.sock)
        assert ask(proc, "/pid").body == str(proc.proc.pid).encode()
    client.close()
    log = proc.stop()
    assert log.count("aborted (ABORT_REQUEST") == 1
    assert "Traceback" not in log and "connection ended" not in log


@pytest.mark.parametrize("path", ["/drip", "/drip-write"])
def test_web_server_closing_mid_response_stops_the_app(spawn, tmp_path, path):
    proc = spawn(DRIP)
    client = FastCGIClient(proc.path)
    mark = tmp_path / "closed"
    first_chunk(client, path, mark)
    client.close()  # spec 5.4: closing the connection aborts its request too
    asked = time.monotonic()
    # A worker serves one connection at a time: this answer comes only
    # after the aborted request is over, close() called.
    assert ask(proc, "/pid").body == str(proc.proc.pid).encode()
    assert time.monotonic() - asked < 2
    assert chunks_made(mark) < 20
    log = proc.stop()
    assert log.count("aborted (") == 1, log
    assert "Traceback" not in log and "connection ended" not in log


def test_abort_during_a_long_call_is_answered_when_it_returns_and_drops_the_result(worker):
    # The worker cannot interrupt an app inside one call (here time.sleep);
    # it sees the abort at the result, sends none of it, and ends the request.
    client = FastCGIClient(worker.path)
    client.send(request_bytes("/slow-logged?0.5"))
    wait_for_line(worker, "SLOW STARTED")
    client.send(ServerConnection.abort_request(1))
    stdout, _, end = client.read_response()
    assert (stdout, end.request_id) == (b"", 1)
    assert ask(client, "/pid").status == 200
    client.close()


def test_management_records_mid_response_are_answered_while_the_app_runs(spawn, tmp_path):
    proc = spawn(DRIP)
    client = FastCGIClient(proc.path)
    first_chunk(client, "/drip", tmp_path / "closed")
    client.send(ServerConnection.get_values([b"FCGI_MPXS_CONNS"]) + begin(2))
    events = read_until(client, lambda e: isinstance(e, fastcgi.EndRequest))
    # Both answered while request 1 still streams: its END_REQUEST is to come.
    [values] = [e for e in events if isinstance(e, fastcgi.ValuesResult)]
    [end] = [e for e in events if isinstance(e, fastcgi.EndRequest)]
    assert values.values == {b"FCGI_MPXS_CONNS": b"0"}
    assert (end.request_id, end.protocol_status) == (2, ProtocolStatus.CANT_MPX_CONN)
    client.send(ServerConnection.abort_request(1))
    _, _, end = client.read_response(1)
    assert end.request_id == 1
    assert ask(client, "/pid").status == 200
    client.close()


# -- protocol answers -------------------------------------------------------

def test_unknown_role_is_refused_and_the_connection_serves_on(worker):
    client = FastCGIClient(worker.path)
    client.send(begin(1, role=fastcgi.Role.AUTHORIZER))
    [end] = client.events()
    assert (end.request_id, end.protocol_status) == (1, ProtocolStatus.UNKNOWN_ROLE)
    assert ask(client, "/pid").status == 200
    client.close()


def test_second_request_on_a_busy_connection_gets_cant_mpx_conn(worker):
    client = FastCGIClient(worker.path)
    client.send(request_bytes("/pid", end_body=False) + begin(2))
    [end] = client.events()
    assert (end.request_id, end.protocol_status) == (2, ProtocolStatus.CANT_MPX_CONN)
    client.send(ServerConnection.stdin(1, b""))
    stdout, _, end = client.read_response(1)
    assert (end.request_id, parse(stdout).status) == (1, 200)
    client.close()


def test_unknown_record_type_gets_unknown_type(worker):
    client = FastCGIClient(worker.path)
    client.send(fastcgi.encode_record(99, 0, b"?"))
    [answer] = client.events()
    assert isinstance(answer, fastcgi.UnknownType) and answer.type == 99
    assert ask(client, "/pid").status == 200
    client.close()


MALFORMED = {
    "bad version": b"\x02" + fastcgi.encode_record(RecordType.GET_VALUES, 0)[1:],
    "http on the fastcgi socket": b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    "short begin body": fastcgi.encode_record(RecordType.BEGIN_REQUEST, 1, b"\x00\x01"),
    "pair longer than its stream": begin(1) + fastcgi.encode_record(
        RecordType.PARAMS, 1, b"\x05\x05ab") + fastcgi.encode_record(RecordType.PARAMS, 1),
    "truncated record then close": request_bytes(end_body=False)[:30],
    # Between requests, where no request id tells the log what was cut short.
    "truncated header then close": begin(1)[:5],
    "content length past the end then close": fastcgi.HEADER.pack(
        1, RecordType.GET_VALUES, 0, 1000, 0) + b"\x01\x00A" * 3,
    "garbage past the version byte": b"\x01" + random.Random(0).randbytes(300),
    "body end before params end": begin(1) + ServerConnection.stdin(1, b""),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_ends_that_connection_with_a_log_line(worker, data):
    client = FastCGIClient(worker.path)
    client.send(data)
    client.sock.shutdown(socket.SHUT_WR)
    _, events = read_to_close(client)
    client.close()
    assert not any(isinstance(e, fastcgi.EndRequest) for e in events)
    assert ask(worker, "/pid").status == 200
    assert worker.stop().count("connection ended") == 1
    assert worker.proc.returncode == engine.EXIT_OK


# -- sizes (K18/K19) --------------------------------------------------------

def body_digest(data: bytes) -> bytes:
    return b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode())


def test_body_over_64k_in_several_stdin_records_arrives_intact(worker):
    body = bytes(range(256)) * 800  # 200 KiB: four STDIN records
    assert len(body) > fastcgi.MAX_CONTENT
    assert ask(worker, "/digest", "POST", body).body == body_digest(body)


def test_body_over_the_spool_threshold_arrives_intact(worker):
    body = hashlib.sha256(b"seed").digest() * (3_000_000 // 32)
    assert len(body) > engine.SPOOL_THRESHOLD
    assert ask(worker, "/digest", "POST", body).body == body_digest(body)


def test_response_over_64k_arrives_intact_over_several_stdout_records(worker):
    client = FastCGIClient(worker.path)
    client.send(request_bytes("/big?200000"))
    records = []
    while not any(isinstance(e, fastcgi.EndRequest) for e in records):
        records += client.events()
    client.close()
    chunks = [e.data for e in records if isinstance(e, fastcgi.Stdout) and e.data]
    assert len(chunks) > 1
    assert parse(b"".join(chunks)).body == (bytes(range(256)) * 1000)[:200000]


def test_params_over_64k_and_both_length_forms_reach_the_app(echo_worker):  # K18/K19
    cookie = "k=" + "c" * 100_000
    extra = {"HTTP_COOKIE": cookie, "HTTP_X_A": "a" * 127, "HTTP_X_B": "b" * 128,
             "HTTP_" + "N" * 195: "long name"}
    seen = echo(echo_worker, "/big-head", **extra)
    for name, value in extra.items():
        assert seen[name] == value


# -- life cycle -------------------------------------------------------------

def test_sigterm_while_idle_exits_0_promptly(worker):
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(5) == engine.EXIT_OK


def test_sigterm_during_a_request_lets_it_finish_then_exits_0(worker):
    client = FastCGIClient(worker.path)
    client.send(request_bytes("/slow-logged?2"))
    wait_for_line(worker, "SLOW STARTED")
    worker.proc.send_signal(signal.SIGTERM)
    stdout, _, _ = client.read_response()
    client.close()
    assert parse(stdout).body == b"slept 2\n"
    assert worker.proc.wait(10) == engine.EXIT_OK


def test_sigterm_after_a_malformed_connection_still_exits_promptly(worker):
    client = FastCGIClient(worker.path)
    client.send(MALFORMED["pair longer than its stream"])
    read_to_close(client)
    client.close()
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(5) == engine.EXIT_OK


def test_sigterm_while_a_request_body_is_arriving_waits_for_the_request(worker):
    client = FastCGIClient(worker.path)
    client.send(request_bytes("/digest", "POST", b"a", end_body=False, CONTENT_LENGTH="2"))
    assert values(client)  # the worker has read the request's start
    worker.proc.send_signal(signal.SIGTERM)
    client.send(ServerConnection.stdin(1, b"b") + ServerConnection.stdin(1, b""))
    stdout, _, _ = client.read_response()
    client.close()
    assert parse(stdout).body == body_digest(b"ab")
    assert worker.proc.wait(5) == engine.EXIT_OK


def test_unimportable_app_exits_with_app_load_error_naming_the_module(spawn):
    proc = spawn("no_such_module_here:application", ready=False)
    assert proc.proc.wait(30) == engine.EXIT_APP_LOAD_ERROR
    assert "no_such_module_here" in proc.stop()


# -- requests held behind the one in flight (corral's front asks for this) ------

def behind_bytes(uri: str, request_id: int) -> bytes:
    """A request marked as sent behind another, as corral's front sends it."""
    params = [(b"CORRAL_CLAIM", b"1")] + [
        (k.encode(), v.encode()) for k, v in cgi_params("GET", uri).items()]
    return (ServerConnection.begin_request(request_id, params)
            + ServerConnection.stdin(request_id, b""))


def claim_path(client: FastCGIClient) -> bytes:
    client.send(ServerConnection.get_values([fastcgi.QUEUE_VALUE]))
    [result] = client.events()
    path = result.values[fastcgi.QUEUE_VALUE]
    assert path.startswith(b"/proc/")
    return path


def test_a_request_behind_the_one_in_flight_is_served_after_it(worker, tmp_path):
    client = FastCGIClient(worker.path)
    claim_path(client)
    client.send(request_bytes("/slow?0.3") + behind_bytes("/echo/second", 2))
    first, _, end1 = client.read_response(1)
    second, _, end2 = client.read_response(2)
    assert parse(first).body == b"slept 0.3\n"
    seen = json.loads(parse(second).body)
    assert seen["PATH_INFO"] == "/echo/second"
    assert "HTTP_CORRAL_CLAIM" not in seen and "CORRAL_CLAIM" not in seen
    client.close()


def test_a_request_taken_back_by_the_front_is_ended_without_running(worker):
    client = FastCGIClient(worker.path)
    claim = os.open(claim_path(client), os.O_RDWR)
    try:
        fcntl.lockf(claim, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 2)  # as the front takes it back
        client.send(request_bytes("/slow?0.2") + behind_bytes("/pid", 2))
        client.read_response(1)
        stdout, _, end = client.read_response(2)
        assert (stdout, end.protocol_status) == (b"", ProtocolStatus.REQUEST_COMPLETE)
        # Once the worker has begun a request from behind, the front cannot
        # take it: its byte stays locked until one with the other id begins.
        client.send(request_bytes("/slow?0.2", request_id=2) + behind_bytes("/pid", 1))
        client.read_response(2)
        stdout, _, _ = client.read_response(1)
        assert parse(stdout).status == 200
        with pytest.raises(OSError):
            fcntl.lockf(claim, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1)
    finally:
        os.close(claim)
    client.close()


def test_two_requests_behind_the_one_in_flight_run_in_order_and_hold_their_claims(worker):
    def free(byte: int) -> bool:
        """Whether the front could take the lock at `byte` now (and it lets go again)."""
        try:
            fcntl.lockf(claim, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, byte)
        except OSError:
            return False
        fcntl.lockf(claim, fcntl.LOCK_UN, 1, byte)
        return True

    client = FastCGIClient(worker.path)
    claim = os.open(claim_path(client), os.O_RDWR)
    try:
        client.send(request_bytes("/slow?0.2") + behind_bytes("/echo/two", 2)
                    + behind_bytes("/echo/three", 3))
        assert parse(client.read_response(1)[0]).body == b"slept 0.2\n"
        assert json.loads(parse(client.read_response(2)[0]).body)["PATH_INFO"] == "/echo/two"
        assert json.loads(parse(client.read_response(3)[0]).body)["PATH_INFO"] == "/echo/three"
        # Each lock is kept until the id of the request before it comes again:
        # only then has the front read that one's end.
        assert not free(2) and not free(3)
        client.send(request_bytes("/pid", request_id=1))
        client.read_response(1)
        assert free(2) and not free(3)
        client.send(request_bytes("/pid", request_id=2))
        client.read_response(2)
        assert free(3)
    finally:
        os.close(claim)
    client.close()


def test_an_abort_for_a_held_request_ends_that_one_and_the_next_still_runs(worker):
    client = FastCGIClient(worker.path)
    claim_path(client)
    client.send(request_bytes("/slow?0.2") + behind_bytes("/echo/gone", 2)
                + behind_bytes("/echo/three", 3) + ServerConnection.abort_request(2))
    assert parse(client.read_response(1)[0]).body == b"slept 0.2\n"
    stdout, _, end = client.read_response(2)
    assert (stdout, end.protocol_status) == (b"", ProtocolStatus.REQUEST_COMPLETE)
    assert json.loads(parse(client.read_response(3)[0]).body)["PATH_INFO"] == "/echo/three"
    assert ask(client, "/pid").status == 200  # and the worker serves on
    client.close()
    assert "Traceback" not in worker.stop()


def test_a_worker_not_asked_to_hold_requests_refuses_a_second_one(worker):
    client = FastCGIClient(worker.path)
    client.send(request_bytes("/slow?0.2") + behind_bytes("/pid", 2))
    [end] = [e for e in client.events() if isinstance(e, fastcgi.EndRequest)]
    assert (end.request_id, end.protocol_status) == (2, ProtocolStatus.CANT_MPX_CONN)
    client.read_response(1)
    client.close()


# -- the HTTP head a worker writes for corral's front (FRAME_PARAM) ------------

def framed_request(uri: str, connection: bytes = b"", method: str = "GET") -> bytes:
    """A request as corral's front sends it, asking for an HTTP head."""
    params = [(engine.FRAME_PARAM, connection)] + [
        (k.encode(), v.encode()) for k, v in cgi_params(method, uri).items()]
    return (ServerConnection.begin_request(1, params) + ServerConnection.stdin(1, b""))


def framed(worker, uri: str, connection: bytes = b"", method: str = "GET") -> bytes:
    client = FastCGIClient(worker.path)
    try:
        client.send(framed_request(uri, connection, method))
        stdout, _, end = client.read_response()
    finally:
        client.close()
    assert end.protocol_status == ProtocolStatus.REQUEST_COMPLETE
    return stdout


@pytest.mark.parametrize("connection", [b"", b"Connection: close\r\n"])
def test_a_whole_response_gets_an_http_head_the_front_accepts(worker, connection):
    from corral.front.upstream import check_framed_head
    stdout = framed(worker, "/head", connection)  # the app sets Content-Length 12 itself
    stop = stdout.index(b"\r\n\r\n") + 4
    status, head, length = check_framed_head(stdout, stop)
    assert (status, length, stdout[stop:]) == (200, 12, b"hello world\n")
    lines = head.split(b"\r\n")
    assert lines[:3] == [b"HTTP/1.1 200 OK", b"Content-Length: 12", b"Content-Type: text/plain"]
    assert lines[3].startswith(b"Date: ") and lines[4] == b"Server: corral"
    assert head.endswith(b"Server: corral\r\n" + connection + b"\r\n")
    assert head.lower().count(b"content-length") == 1


def test_the_app_never_sees_the_frame_param(worker):
    stdout = framed(worker, "/echo")
    seen = json.loads(stdout.partition(b"\r\n\r\n")[2])
    assert "CORRAL_FRAME" not in seen and "HTTP_CORRAL_FRAME" not in seen
    assert seen["PATH_INFO"] == "/echo"


@pytest.mark.parametrize("uri, method", [
    ("/write", "GET"),  # two chunks: the length is not known when the first goes
    ("/no-content", "GET"),  # 204: the front drops its body and Content-Length
    ("/length?short", "GET"),  # the app's Content-Length is not the body's length
    ("/head", "HEAD"),  # the front keeps the app's Content-Length and sends no body
])
def test_a_response_the_front_must_frame_keeps_the_cgi_head(worker, uri, method):
    stdout = framed(worker, uri, method=method)
    assert stdout.startswith(b"Status: "), stdout[:80]
    assert parse(stdout).status in (200, 204)
