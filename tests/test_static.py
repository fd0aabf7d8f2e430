"""Static files as complete as a web server's: byte ranges and If-Range,
precompressed siblings chosen by Accept-Encoding, cache lifetimes, and large
files sent whole to fast and slow readers alike."""

from __future__ import annotations

import gzip
import os

import pytest

from tests.conftest import cases_config
from tests.harness import APPS, ServerProcess, connect, copy_app, read_response, request

DATA = bytes(range(256)) * 4096  # 1 MiB: past the read-at-once size


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    app = copy_app(APPS / "cases", tmp_path_factory.mktemp("static") / "cases")
    public = app / "public"
    public.mkdir()
    (public / "data.bin").write_bytes(DATA)
    (public / "small.txt").write_text("0123456789")
    (public / "app.css").write_text("body { color: red }\n" * 50)
    (public / "app.css.gz").write_bytes(gzip.compress((public / "app.css").read_bytes()))
    (public / "app.css.br").write_bytes(b"pretend brotli")
    (public / "site.3f2a9c1b7e4d.css").write_text("hashed\n")
    (app / "corral.toml").write_text(cases_config(app))
    server = ServerProcess(app).wait_ready()
    server.public = public
    yield server
    server.stop()


def get(server, path: bytes, *headers: bytes):
    extra = b"".join(h + b"\r\n" for h in headers)
    return request(server.port, b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n" + extra + b"\r\n")


@pytest.mark.parametrize("path", [b"/files/small.txt", b"/files/data.bin"])
@pytest.mark.parametrize("spec, first, last", [
    (b"bytes=0-3", 0, 3), (b"bytes=2-", 2, None), (b"bytes=-4", -4, None),
    (b"bytes=5-99999999", 5, None)])
def test_single_byte_range(files, path, spec, first, last):
    whole = (files.public / path.decode().rsplit("/", 1)[1]).read_bytes()
    status, headers, body, _ = get(files, path, b"Range: " + spec)
    expected = whole[first:] if last is None else whole[first:last + 1]
    start = first % len(whole)
    assert status == 206 and body == expected
    assert headers["content-range"] == f"bytes {start}-{start + len(expected) - 1}/{len(whole)}"
    assert headers["content-length"] == str(len(expected))


def test_unsatisfiable_range_is_416(files):
    status, headers, body, _ = get(files, b"/files/small.txt", b"Range: bytes=10-20")
    assert status == 416 and headers["content-range"] == "bytes */10" and body == b""


@pytest.mark.parametrize("spec", [b"bytes=0-1,4-5", b"items=0-1", b"bytes=5-2", b"bytes=x-"])
def test_ranges_we_do_not_serve_get_the_whole_file(files, spec):
    status, _, body, _ = get(files, b"/files/small.txt", b"Range: " + spec)
    assert status == 200 and body == b"0123456789"


def test_if_range(files):
    etag = get(files, b"/files/small.txt")[1]["etag"]
    assert get(files, b"/files/small.txt", b"Range: bytes=0-1",
               b"If-Range: " + etag.encode())[0] == 206
    status, _, body, _ = get(files, b"/files/small.txt", b"Range: bytes=0-1",
                             b'If-Range: "stale"')
    assert status == 200 and body == b"0123456789"


def test_precompressed_sibling_by_accept_encoding(files):
    plain = (files.public / "app.css").read_bytes()
    status, headers, body, _ = get(files, b"/files/app.css", b"Accept-Encoding: gzip")
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert gzip.decompress(body) == plain and headers["vary"] == "Accept-Encoding"
    assert headers["content-type"].startswith("text/css")
    _, headers, body, _ = get(files, b"/files/app.css", b"Accept-Encoding: gzip, br")
    assert headers["content-encoding"] == "br" and body == b"pretend brotli"
    _, headers, body, _ = get(files, b"/files/app.css", b"Accept-Encoding: br;q=0, gzip")
    assert headers["content-encoding"] == "gzip"
    status, headers, body, _ = get(files, b"/files/app.css")
    assert "content-encoding" not in headers and body == plain
    assert headers["vary"] == "Accept-Encoding"
    # Each representation has its own validator.
    assert get(files, b"/files/app.css", b"Accept-Encoding: gzip")[1]["etag"] != headers["etag"]


def test_hashed_names_are_cached_for_a_year(files):
    assert "immutable" in get(files, b"/files/site.3f2a9c1b7e4d.css")[1]["cache-control"]
    assert get(files, b"/files/small.txt")[1]["cache-control"] == "public, max-age=3600"


def test_large_file_to_a_slow_reader_arrives_whole_and_others_are_served(files):
    big = os.urandom(32 * 1024 * 1024)  # more than the kernel's socket buffers hold
    (files.public / "big.bin").write_bytes(big)
    with connect(files.port, timeout=30) as slow:
        slow.sendall(b"GET /files/big.bin HTTP/1.1\r\nHost: a\r\n\r\n")
        received = slow.recv(1000)  # the head and a little; then it stops reading
        assert received.startswith(b"HTTP/1.1 200")
        # Meanwhile other clients are answered at once.
        for _ in range(3):
            assert get(files, b"/files/small.txt")[2] == b"0123456789"
        while True:
            head, _, body = received.partition(b"\r\n\r\n")
            if len(body) >= len(big):
                break
            piece = slow.recv(1 << 20)
            assert piece, "closed mid-file"
            received += piece
    assert body == big


def test_head_of_a_large_file_has_its_length_and_no_body(files):
    with connect(files.port) as sock:
        sock.sendall(b"HEAD /files/data.bin HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"GET /files/small.txt HTTP/1.1\r\nHost: a\r\n\r\n")
        status, headers, body, _ = read_response(sock, head_only=True)
        assert status == 200 and headers["content-length"] == str(len(DATA))
        assert read_response(sock)[2] == b"0123456789"
