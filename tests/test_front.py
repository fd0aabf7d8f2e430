"""The HTTP/1.1 front with the cases app behind it: framing, keep-alive,
refusals that never reach the app, response rules and static files.
Every test talks to a real `corral serve` over a real socket."""

from __future__ import annotations

import json
import os
import threading

import pytest

from tests.harness import connect, is_closed, read_response, read_to_close, request


def calls(server) -> list[str]:
    try:
        return server.calls.read_text().splitlines()
    except FileNotFoundError:
        return []


def echo(server, raw: bytes) -> dict:
    status, _, body, _ = request(server.port, raw)
    assert status == 200, body
    return json.loads(body)


# -- request bodies ------------------------------------------------------------

def test_chunked_body_reaches_the_app_with_a_length(cases_server):  # K01
    seen = echo(cases_server, b"POST /echo HTTP/1.1\r\nHost: a\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n5\r\na=1&b\r\n2\r\n=2\r\n0\r\n\r\n")
    assert seen["body"] == "a=1&b=2"
    assert seen["CONTENT_LENGTH"] == "7"
    assert "HTTP_TRANSFER_ENCODING" not in seen
    assert seen["CONTENT_TYPE"] == "application/x-www-form-urlencoded"


def test_large_body_is_spooled_and_arrives_whole(cases_server):
    body = os.urandom(3 * 1024 * 1024).hex().encode()[: 3 * 1024 * 1024]
    seen = echo(cases_server, b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body))
    assert seen["body"].encode() == body


def test_expect_100_continue_once_and_only_to_http11(cases_server):  # K11
    with connect(cases_server.port) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        interim = sock.recv(100)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        status, _, body, head = read_response(sock)
        assert status == 200 and json.loads(body)["body"] == "hello"
        assert b"100 Continue" not in head
    with connect(cases_server.port) as sock:
        sock.sendall(b"POST /echo HTTP/1.0\r\nHost: a\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\nhello")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 ")
        assert b"100 Continue" not in data


# -- paths -----------------------------------------------------------------------

@pytest.mark.parametrize("target", [b"/echo/%D1%82%D0%B5%D1%81%D1%82/",
                                    "/echo/тест/".encode()])
def test_non_ascii_path_is_latin1_bytes(cases_server, target):  # K07
    seen = echo(cases_server, b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert seen["PATH_INFO"].encode("latin-1").decode("utf-8") == "/echo/тест/"
    assert seen["SCRIPT_NAME"] == ""


def test_query_string_and_absolute_form(cases_server):
    seen = echo(cases_server, b"GET http://example.org/echo?x=1&y=%20 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert seen["PATH_INFO"] == "/echo"
    assert seen["QUERY_STRING"] == "x=1&y=%20"
    assert seen["HTTP_HOST"] == "example.org"  # RFC 9112 3.2.2: the target wins


def test_header_with_underscore_is_not_passed(cases_server):
    seen = echo(cases_server, b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Real-IP: 1\r\n"
                b"X_Real_IP: 2\r\n\r\n")
    assert seen["HTTP_X_REAL_IP"] == "1"


# -- keep-alive, pipelining, HEAD --------------------------------------------------

def test_keep_alive_and_pipelining_in_order(cases_server):
    with connect(cases_server.port) as sock:
        sock.sendall(b"GET /echo?1 HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"GET /files/hello.txt HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"GET /echo?3 HTTP/1.1\r\nHost: a\r\n\r\n")
        first = read_response(sock)
        second = read_response(sock)
        third = read_response(sock)
        assert json.loads(first[2])["QUERY_STRING"] == "1"
        assert second[2] == b"hello static\n"
        assert json.loads(third[2])["QUERY_STRING"] == "3"
        sock.sendall(b"GET /echo?4 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert json.loads(read_response(sock)[2])["QUERY_STRING"] == "4"


def test_http10_closes_unless_asked(cases_server):
    with connect(cases_server.port) as sock:
        sock.sendall(b"GET /pid HTTP/1.0\r\n\r\n")
        status, headers, _, _ = read_response(sock)
        assert status == 200 and headers.get("connection") == "close"
        assert is_closed(sock)
    with connect(cases_server.port) as sock:
        sock.sendall(b"GET /pid HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _, _ = read_response(sock)
        assert headers.get("connection") == "keep-alive"
        sock.sendall(b"GET /pid HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert read_response(sock)[0] == 200


def test_head_keeps_length_sends_no_body_and_keeps_the_connection(cases_server):  # K13
    with connect(cases_server.port) as sock:
        sock.sendall(b"HEAD /head HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, _, _ = read_response(sock, head_only=True)
        assert status == 200 and headers["content-length"] == "12"
        sock.sendall(b"GET /head HTTP/1.1\r\nHost: a\r\n\r\n")
        # Had the HEAD carried body bytes, they would precede this response.
        status, headers, body, _ = read_response(sock)
        assert status == 200 and body == b"hello world\n"


def test_204_has_no_body(cases_server):
    with connect(cases_server.port) as sock:
        sock.sendall(b"GET /no-content HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"GET /head HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, _, _ = read_response(sock)
        assert status == 204 and "content-length" not in headers
        status, _, body, _ = read_response(sock)
        assert status == 200 and body == b"hello world\n"


def test_streamed_response_is_chunked_for_http11_and_closed_for_http10(cases_server):
    status, headers, body, _ = request(cases_server.port,
                                       b"GET /stream?3 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert headers.get("transfer-encoding") == "chunked" or headers.get("content-length")
    assert body == b"chunk 0\nchunk 1\nchunk 2\n"
    status, headers, body, _ = request(cases_server.port, b"GET /stream?3 HTTP/1.0\r\n\r\n")
    assert "transfer-encoding" not in headers
    assert body == b"chunk 0\nchunk 1\nchunk 2\n"


def test_large_response_arrives_whole(cases_server):
    status, headers, body, _ = request(cases_server.port,
                                       b"GET /big?10000000 HTTP/1.1\r\nHost: a\r\n\r\n",
                                       timeout=60)
    assert status == 200 and len(body) == 10_000_000
    assert body[:256] == bytes(range(256))


# -- response head rules -------------------------------------------------------------

def test_two_set_cookie_lines_survive(cases_server):  # K06
    _, headers, _, head = request(cases_server.port, b"GET /cookies HTTP/1.1\r\nHost: a\r\n\r\n")
    assert headers["set-cookie*"] == ["a=1; Path=/", "b=2; Path=/"]


@pytest.mark.parametrize("variant", [b"", b"name", b"status", b"nul"])
def test_header_injection_is_a_500(cases_server, variant):  # K05
    status, headers, body, head = request(
        cases_server.port, b"GET /split-header?%s HTTP/1.1\r\nHost: a\r\n\r\n" % variant)
    assert status == 500
    assert b"Injected" not in head and "x-t" not in headers
    assert b"body" not in body


def test_latin1_location_is_sent_and_euro_is_a_500(cases_server):  # K08
    status, _, _, head = request(cases_server.port, b"GET /location HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 302
    assert b"Location: /foob\xe0r\r\n" in head
    status, _, _, head = request(cases_server.port,
                                 b"GET /location?euro HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 500 and b"Location" not in head


def test_exc_info_before_body_gives_the_apps_500(cases_server):  # K14
    status, _, body, _ = request(cases_server.port, b"GET /exc-info HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 500 and body == b"oops"


def test_exc_info_after_body_aborts_the_connection(cases_server):  # K14 variant
    with connect(cases_server.port) as sock:
        sock.sendall(b"GET /exc-info?late HTTP/1.1\r\nHost: a\r\n\r\n")
        data = read_to_close(sock)
    assert data.count(b"HTTP/1.1 ") == 1
    assert data.startswith(b"HTTP/1.1 200 ")
    assert not data.endswith(b"0\r\n\r\n")  # never made to look complete
    # The worker lives on and the next request is served.
    assert request(cases_server.port, b"GET /pid HTTP/1.1\r\nHost: a\r\n\r\n")[0] == 200


def test_write_callable(cases_server):  # K15
    status, _, body, head = request(cases_server.port, b"GET /write HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 200 and body == b"hello world"
    assert head.count(b"HTTP/1.1") == 1


def test_app_exception_is_a_500_and_the_worker_lives(cases_server):
    before = set(cases_server.worker_pids())
    status, _, body, _ = request(cases_server.port, b"GET /crash HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 500 and b"failed on purpose" not in body
    cases_server.wait_for(r"RuntimeError: the app failed on purpose")
    assert set(cases_server.worker_pids()) == before


def test_worker_death_mid_request_is_a_502_naming_the_pid(cases_server):
    # A POST: the worker may have acted on it, so it is never sent to a second one.
    status, _, _, _ = request(cases_server.port,
                              b"POST /exit HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert status == 502
    cases_server.wait_for(r"worker pid \d+ closed the connection while serving the request "
                          r"\(exit status 3\)")
    for _ in range(10):
        assert request(cases_server.port, b"GET /pid HTTP/1.1\r\nHost: a\r\n\r\n")[0] == 200


def test_requests_queue_when_every_worker_is_busy(cases_server):
    results = []

    def slow():
        results.append(request(cases_server.port, b"GET /slow?1 HTTP/1.1\r\nHost: a\r\n\r\n")[0])

    threads = [threading.Thread(target=slow) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 5


def test_pipelined_expect_gets_no_100_inside_another_response(cases_server):  # K11
    with connect(cases_server.port) as sock:
        sock.sendall(b"GET /big?3000000 HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"POST /digest HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\nhello")
        status, _, body, _ = read_response(sock)
        assert status == 200 and b"100 Continue" not in body and len(body) == 3_000_000
        status, _, body, _ = read_response(sock)
        assert status == 200 and body.startswith(b"5 ")


@pytest.mark.parametrize("path", [b"/length?over", b"/length?under"])
def test_app_body_never_passes_its_content_length(cases_server, path):
    """More than announced would be read as the next response (a desync);
    less is a truncation the client must see as one: both end the connection."""
    with connect(cases_server.port) as sock:
        sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"GET /pid HTTP/1.1\r\nHost: a\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Length: 10\r\n" in head
    assert body == (b"0123456789" if path.endswith(b"over") else b"01234")
    assert data.count(b"HTTP/1.1") == 1  # no second response: the connection ended
    cases_server.wait_for(r"longer than its Content-Length|ended 5 bytes short")


# -- refusals: 4xx, closed, the app never called -------------------------------------

REFUSED = {
    "bare LF and a smuggled request (K04)":
        (b"GET /echo HTTP/1.1\r\nHost: a\r\nX-U:\n\nGET /admin HTTP/1.1\nHost: a\r\n\r\n", 400),
    "NUL in a value (K04)": (b"GET /echo HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
    "lone CR in a value (K04)": (b"GET /echo HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
    "CL and TE with a negative CL (K02)":
        (b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
         b"Content-Length: -2054\r\nConnection: close\r\n\r\n0\r\n\r\n", 400),
    "two different Content-Lengths (K03)":
        (b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 5\r\n\r\nabcde",
         400),
    "a list Content-Length (K03)":
        (b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 5\r\n\r\nabcde", 400),
    "no Host in HTTP/1.1": (b"GET /echo HTTP/1.1\r\n\r\n", 400),
    "two Hosts": (b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "space before the colon": (b"GET /echo HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    "obs-fold": (b"GET /echo HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
    "unknown transfer coding": (b"POST /echo HTTP/1.1\r\nHost: a\r\n"
                                b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    "chunked not last": (b"POST /echo HTTP/1.1\r\nHost: a\r\n"
                         b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400),
    "chunk size not hex": (b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                           b"\r\n0x1\r\na\r\n0\r\n\r\n", 400),
    "asterisk with GET": (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "relative target": (b"GET echo HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "body over the limit": (b"POST /echo HTTP/1.1\r\nHost: a\r\n"
                            b"Content-Length: 999999999999\r\n\r\n", 413),
    "target too long": (b"GET /echo?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    "HTTP/2.0 in the request line": (b"GET /echo HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    "HTTP/0.9 (no version)": (b"GET /echo\r\n\r\n", 400),
    "a fragment in the target": (b"GET /echo?q=1#frag HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "absolute form with no host": (b"GET http:///echo HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "absolute form with userinfo": (b"GET http://u@h/echo HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "head too large": (b"GET /echo HTTP/1.1\r\nHost: a\r\n"
                       + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(70))
                       + b"\r\n", 431),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refused_requests_never_reach_the_app(cases_server, name):
    raw, expected = REFUSED[name]
    before = calls(cases_server)
    with connect(cases_server.port) as sock:
        sock.sendall(raw)
        status, _, body, _ = read_response(sock)
        assert status == expected, body
        assert is_closed(sock)
    assert calls(cases_server) == before


def test_options_asterisk(cases_server):
    status, headers, _, _ = request(cases_server.port, b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 200 and "allow" in headers


# -- static files ---------------------------------------------------------------------

def test_static_file_validators(cases_server):
    status, headers, body, _ = request(cases_server.port,
                                       b"GET /files/hello.txt HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 200 and body == b"hello static\n"
    assert headers["content-type"] == "text/plain; charset=utf-8"
    etag, modified = headers["etag"], headers["last-modified"]
    status, _, body, _ = request(cases_server.port, b"GET /files/hello.txt HTTP/1.1\r\n"
                                 b"Host: a\r\nIf-None-Match: %s\r\n\r\n" % etag.encode())
    assert status == 304 and body == b""
    status, _, _, _ = request(cases_server.port, b"GET /files/hello.txt HTTP/1.1\r\n"
                              b"Host: a\r\nIf-Modified-Since: %s\r\n\r\n" % modified.encode())
    assert status == 304
    with connect(cases_server.port) as sock:
        sock.sendall(b"HEAD /files/hello.txt HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"GET /files/hello.txt HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, _, _ = read_response(sock, head_only=True)
        assert status == 200 and headers["content-length"] == "13"
        assert read_response(sock)[2] == b"hello static\n"


@pytest.mark.parametrize("target", [
    b"/files/.secret", b"/files/../corral.toml", b"/files/%2e%2e/corral.toml",
    b"/files/..%2fcorral.toml", b"/files/escape/corral.toml", b"/files/", b"/files/nope",
    b"/files/config.toml", b"/files/hello.txt/"])
def test_static_refuses_what_it_must_not_serve(cases_server, target):
    public = cases_server.app_dir / "public"
    if not (public / "escape").exists():
        (public / "escape").symlink_to(cases_server.app_dir)  # leaves the mapped folder
        (public / "config.toml").symlink_to(cases_server.app_dir / "corral.toml")
    status, _, body, _ = request(cases_server.port,
                                 b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 404
    assert b"wsgi" not in body and b"dotfile" not in body


def test_large_static_file_is_sent_whole_and_the_connection_serves_on(cases_server):
    data = os.urandom(3 * 1024 * 1024 + 17)  # past the read-at-once size: sendfile
    (cases_server.app_dir / "public" / "big.bin").write_bytes(data)
    with connect(cases_server.port) as sock:
        sock.sendall(b"GET /files/big.bin HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"GET /files/hello.txt HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, body, _ = read_response(sock)
        assert status == 200 and headers["content-length"] == str(len(data))
        assert body == data
        assert read_response(sock)[2] == b"hello static\n"


def test_static_is_read_only(cases_server):
    status, headers, _, _ = request(cases_server.port, b"POST /files/hello.txt HTTP/1.1\r\n"
                                    b"Host: a\r\nContent-Length: 0\r\n\r\n")
    assert status == 405 and headers["allow"] == "GET, HEAD"


def test_access_log_is_apache_combined(cases_server):
    request(cases_server.port, b'GET /pid?log HTTP/1.1\r\nHost: a\r\nUser-Agent: t"est\r\n'
            b"Referer: http://r/\r\n\r\n")
    line = cases_server.wait_for(r'"GET /pid\?log HTTP/1.1"')
    assert line.startswith("127.0.0.1 - - [")
    assert '" 200 ' in line and '"http://r/" "t\\"est"' in line


def test_header_timeout_closes_a_slow_head(tmp_path):
    from tests.conftest import cases_config
    from tests.harness import APPS, ServerProcess, copy_app
    app = copy_app(APPS / "cases", tmp_path / "cases")
    (app / "public").mkdir()
    (app / "corral.toml").write_text(cases_config(app, 1, "header_timeout = 0.5"))
    server = ServerProcess(app).wait_ready()
    try:
        with connect(server.port) as sock:
            sock.sendall(b"GET /echo HTTP/1.1\r\nHost: a\r\n")
            status, _, _, _ = read_response(sock)
            assert status == 408
            assert is_closed(sock)
        assert request(server.port, b"GET /pid HTTP/1.1\r\nHost: a\r\n\r\n")[0] == 200
    finally:
        server.stop()


# -- the worker's CGI response head, as the front reads it back -----------------

@pytest.mark.parametrize("head, expected", [
    (b"Status: 404 Nope\r\nX-A:  b  \r\nContent-Type:text/html",
     (404, b"Nope", [(b"X-A", b"b"), (b"Content-Type", b"text/html")])),
    (b"Location: /x", (302, b"Found", [(b"Location", b"/x")])),
    (b"X: a\tb\nY:", (200, b"OK", [(b"X", b"a\tb"), (b"Y", b"")])),
    (b"Content-Length: 5\r\nContent-Length: 5", (200, b"OK", [(b"Content-Length", b"5")])),
    # A Status header the app set itself comes after the worker's own.
    (b"Status: 200 OK\r\nStatus: 404 Nope", (200, b"OK", [(b"Status", b"404 Nope")])),
])
def test_a_worker_response_head_is_parsed(head, expected):
    from corral.front.upstream import parse_cgi_head
    assert parse_cgi_head(head) == expected


@pytest.mark.parametrize("head", [
    b"X a", b": v", b"X: a\rb", b"X\x00: v", b"X: \x7f", b"X y: z", b"Status: 99",
    b"Status: 2000 Big", b"Content-Length: 5\r\nContent-Length: 6", b"Content-Length: x",
])
def test_an_unsafe_worker_response_head_is_refused(head):
    from corral.front.errors import GatewayError
    from corral.front.upstream import parse_cgi_head
    with pytest.raises(GatewayError):
        parse_cgi_head(head)


# -- the HTTP head one of corral's workers writes when the front asks ----------

def test_a_worker_http_head_is_read_for_its_status_and_length():
    from corral.front.upstream import check_framed_head
    data = b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nX-A: a\tb\r\nY: \r\n\r\nabc"
    assert check_framed_head(data, len(data) - 3) == (404, data[:-3], 3)


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 3\r\n\r\n",  # length not first
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX: a\rb\r\n\r\n",  # a bare CR
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX: a\nY: b\r\n\r\n",  # a bare LF
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX y: b\r\n\r\n",  # not a token
    b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n",
    b"HTTP/1.1 099 Low\r\nContent-Length: 3\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 3\n\n",
])
def test_an_unsafe_worker_http_head_is_refused(head):
    from corral.front.errors import GatewayError
    from corral.front.upstream import check_framed_head
    with pytest.raises(GatewayError):
        check_framed_head(head, len(head))


def test_an_http_10_keep_alive_client_is_told_so_by_a_worker_written_head(cases_server):
    with connect(cases_server.port) as sock:
        for _ in range(2):
            sock.sendall(b"GET /pid HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, body, raw = read_response(sock)
            assert status == 200 and body.isdigit()
            head = raw + b"\r\n"
            assert head.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: ")  # the worker's
            assert head.count(b"\r\nConnection: keep-alive\r\n") == 1
            assert head.count(b"\r\nDate: ") == 1 and head.count(b"\r\nServer: corral") == 1
        sock.sendall(b"GET /pid HTTP/1.0\r\n\r\n")
        status, headers, body, raw = read_response(sock)
        assert raw.endswith(b"\r\nConnection: close") and raw.count(b"Connection") == 1
        assert is_closed(sock)


def test_requests_pipelined_after_one_that_closes_are_dropped_and_the_rest_served(cases_server):
    with connect(cases_server.port) as sock:
        sock.sendall(b"GET /echo?d1 HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"GET /echo?b1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                     b"GET /echo?never HTTP/1.1\r\nHost: a\r\n\r\n")
        first = read_response(sock)
        second = read_response(sock)
        assert (first[0], json.loads(first[2])["QUERY_STRING"]) == (200, "d1")
        assert (second[0], json.loads(second[2])["QUERY_STRING"]) == (200, "b1")
        assert second[1]["connection"] == "close"
        assert is_closed(sock)
    assert "/echo?never" not in cases_server.calls.read_text().splitlines()
