"""HTTPS from the front with the standard library's ssl module, and the
forwarded headers of a proxy in front, believed only from trusted addresses."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time

import pytest

from tests.conftest import cases_config
from tests.harness import APPS, ServerProcess, copy_app, read_response, request, require_tool


def cases_app(tmp_path, server: str):
    app = copy_app(APPS / "cases", tmp_path / "cases")
    (app / "public").mkdir()
    (app / "public" / "hello.txt").write_text("hello static\n")
    (app / "corral.toml").write_text(cases_config(app, server=server))
    return app


@pytest.fixture(scope="module")
def https_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    openssl = require_tool("openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-keyout", str(tmp / "key.pem"),
                    "-out", str(tmp / "cert.pem")], check=True, capture_output=True)
    app = cases_app(tmp, f'certificate = "{tmp / "cert.pem"}"\nkey = "{tmp / "key.pem"}"\n'
                    "header_timeout = 2")
    server = ServerProcess(app)
    line = server.wait_for(r"listening on https://")
    server.port = int(line.rsplit(":", 1)[1])
    server.wait_for(r"INFO ready: ")
    server.cert = tmp / "cert.pem"
    yield server
    server.stop()


def tls_request(server, raw: bytes):
    context = ssl.create_default_context(cafile=str(server.cert))
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as plain, \
            context.wrap_socket(plain, server_hostname="localhost") as sock:
        sock.sendall(raw)
        first = read_response(sock)
        sock.sendall(b"GET /files/hello.txt HTTP/1.1\r\nHost: a\r\n\r\n")
        return first, read_response(sock)


def test_https_serves_the_app_and_static_files(https_server):
    (status, _, body, _), static = tls_request(
        https_server, b"GET /echo?x=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    seen = json.loads(body)
    assert status == 200 and seen["wsgi.url_scheme"] == "https"
    assert seen["QUERY_STRING"] == "x=1"
    assert static[0] == 200 and static[2] == b"hello static\n"  # kept alive, over TLS


def test_https_large_static_file_is_not_sent_with_sendfile(https_server):
    data = bytes(range(256)) * 8192  # 2 MiB: past the read-at-once size
    (https_server.app_dir / "public" / "big.bin").write_bytes(data)
    (status, _, body, _), _ = tls_request(
        https_server, b"GET /files/big.bin HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status == 200 and body == data


def test_a_silent_tls_client_is_dropped_at_the_header_timeout(https_server):
    with socket.create_connection(("127.0.0.1", https_server.port), timeout=20) as sock:
        started = time.monotonic()
        assert sock.recv(100) == b""  # no handshake: closed, as a silent HTTP client is
        assert time.monotonic() - started < 10


def test_plain_http_to_the_https_port_is_refused(https_server):
    with socket.create_connection(("127.0.0.1", https_server.port), timeout=10) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
        assert b"200 OK" not in sock.recv(1000)


def test_bad_certificate_is_a_config_error(tmp_path):
    (tmp_path / "cert.pem").write_text("not a certificate")
    app = cases_app(tmp_path, f'certificate = "{tmp_path / "cert.pem"}"\n'
                    f'key = "{tmp_path / "cert.pem"}"')
    server = ServerProcess(app)
    assert server.proc.wait(60) == 2
    server.stop()
    assert "[server] certificate" in server.log and "Fix:" in server.log


FORWARDED = (b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 10.9.8.7, 1.2.3.4\r\n"
             b"X-Forwarded-Proto: https\r\n\r\n")


def test_forwarded_headers_from_a_trusted_proxy(tmp_path):
    server = ServerProcess(cases_app(tmp_path, 'trusted_proxies = ["127.0.0.1"]')).wait_ready()
    try:
        seen = json.loads(request(server.port, FORWARDED)[2])
        # The last hop that is not ours: the client as our proxy saw it.
        assert seen["REMOTE_ADDR"] == "1.2.3.4"
        assert seen["wsgi.url_scheme"] == "https"
    finally:
        server.stop()


def test_forwarded_headers_from_anyone_else_are_dropped(tmp_path):
    server = ServerProcess(cases_app(tmp_path, 'trusted_proxies = ["10.0.0.1"]')).wait_ready()
    try:
        seen = json.loads(request(server.port, FORWARDED)[2])
        assert seen["REMOTE_ADDR"] == "127.0.0.1" and seen["wsgi.url_scheme"] == "http"
        assert "HTTP_X_FORWARDED_FOR" not in seen and "HTTP_X_FORWARDED_PROTO" not in seen
    finally:
        server.stop()
