"""Slow and hostile clients against the live front (K21), bodies the app leaves unread (K12),
uploads that never end (K20) and the 100 Continue rule (K11), from ../shared/cases.md.

The clients here pace themselves with short sleeps (they play slow clients); the server's
readiness is always awaited through its log, never slept for.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import select
import socket
import threading
import time

import pytest

from tests.conftest import cases_config
from tests.harness import APPS, ServerProcess, connect, copy_app, is_closed, read_response, request

HEADER_TIMEOUT = 1.0
MAX_BODY = 16 * 1024 * 1024
GET = b"GET /pid HTTP/1.1\r\nHost: a\r\n\r\n"


def cases_server_with(root, processes: int, server: str = "") -> ServerProcess:
    app = copy_app(APPS / "cases", root / "cases")
    (app / "public").mkdir()
    (app / "corral.toml").write_text(cases_config(app, processes, server))
    started = ServerProcess(app).wait_ready()
    started.calls = app / "calls.log"
    return started


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """Two workers, a 1 s header timeout and a 16 MiB body limit."""
    server = cases_server_with(tmp_path_factory.mktemp("slow"), 2,
                               f"header_timeout = {HEADER_TIMEOUT}\nmax_body = {MAX_BODY}")
    yield server
    server.stop()


def calls(server) -> list[str]:
    try:
        return server.calls.read_text().splitlines()
    except FileNotFoundError:
        return []


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def timed_get(port: int) -> float:
    """Seconds a normal client waits for GET /pid (which must succeed)."""
    started = time.monotonic()
    assert request(port, GET)[0] == 200
    return time.monotonic() - started


def get_while(port: int, busy) -> list[float]:
    """Normal requests, one every 50 ms, for as long as `busy()` says; their latencies."""
    latencies = []
    while busy():
        latencies.append(timed_get(port))
        time.sleep(0.05)
    return latencies


# -- slow clients (K21) --------------------------------------------------------------------

def test_slow_head_gets_408_at_the_header_timeout(slow_server):  # K21
    stop = threading.Event()
    with connect(slow_server.port) as sock:
        started = time.monotonic()

        def trickle():  # one byte every 0.2 s: the head would take 6 s
            for byte in GET:
                if stop.wait(0.2):
                    return
                try:
                    sock.send(bytes((byte,)))
                except OSError:
                    return

        sender = threading.Thread(target=trickle)
        sender.start()
        try:
            latencies = get_while(slow_server.port,
                                  lambda: time.monotonic() - started < HEADER_TIMEOUT * 0.8)
            status, _, _, _ = read_response(sock)
            elapsed = time.monotonic() - started
            assert status == 408
            assert is_closed(sock)
        finally:
            stop.set()
            sender.join()
    # The timeout counts from the first byte, however steadily the bytes come.
    assert HEADER_TIMEOUT * 0.9 <= elapsed < HEADER_TIMEOUT + 1.0
    assert latencies and max(latencies) < 0.5


def test_slow_uploads_hold_no_worker(slow_server):  # K21
    """Three uploads trickle in over 1.4 s each, more than the two workers: none of them is
    handed to a worker before its last byte, and normal clients are answered meanwhile."""
    body = os.urandom(20_000)
    pieces = [body[i:i + 2000] for i in range(0, len(body), 2000)]
    results: dict = {}

    def upload(n: int) -> None:
        with connect(slow_server.port, timeout=15) as sock:
            sock.sendall(b"POST /digest?%d HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n"
                         % (n, len(body)))
            for piece in pieces[:-1]:
                time.sleep(0.15)  # longer in all than the header timeout: the body has its own
                sock.sendall(piece)
            results[n, "called early"] = f"/digest?{n}" in calls(slow_server)
            sock.sendall(pieces[-1])
            results[n] = read_response(sock)

    threads = [threading.Thread(target=upload, args=(n,)) for n in (1, 2, 3)]
    for thread in threads:
        thread.start()
    latencies = get_while(slow_server.port, lambda: any(t.is_alive() for t in threads))
    for thread in threads:
        thread.join()
    digest = b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode())
    for n in (1, 2, 3):
        assert results[n, "called early"] is False
        assert results[n][0] == 200 and results[n][2] == digest
    assert len(latencies) >= 10 and max(latencies) < 0.5


def test_slow_reader_of_a_large_response(slow_server):  # K21
    """A client that asks for 50 MB and reads none of it for a while: others are answered,
    and the front buffers a bounded amount, the rest waits in the worker (backpressure)."""
    pid = slow_server.proc.pid
    timed_get(slow_server.port)
    base = rss_kib(pid)
    size = 50_000_000
    with connect(slow_server.port, timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET /big?%d HTTP/1.1\r\nHost: a\r\n\r\n" % size)
        samples, latencies = [], []
        stalled = time.monotonic()
        while time.monotonic() - stalled < 1.5:
            latencies.append(timed_get(slow_server.port))
            samples.append(rss_kib(pid))
            time.sleep(0.1)
        # Now read it all, slowly at first: backpressure lets go again.
        received = bytearray(sock.recv(4096))
        time.sleep(0.2)
        while b"\r\n\r\n" not in received:
            received += sock.recv(4096)
        head, _, rest = bytes(received).partition(b"\r\n\r\n")
        length = len(rest)
        while length < size:
            chunk = sock.recv(1 << 20)
            assert chunk, f"closed after {length} bytes of the body"
            length += len(chunk)
        assert head.startswith(b"HTTP/1.1 200 ") and length == size
        assert rest[:256] == bytes(range(256))
    assert max(latencies) < 0.5
    assert max(samples) - base < 10 * 1024, (base, samples)  # KiB; the response is 48 MiB


def test_fifty_incomplete_heads_delay_no_one(slow_server):  # K21
    socks = [connect(slow_server.port) for _ in range(50)]
    try:
        started = time.monotonic()
        for sock in socks:
            sock.sendall(b"GET /pid HTTP/1.1\r\nHost: a\r\n")  # never the final CRLF
        assert timed_get(slow_server.port) < 0.5
        for sock in socks:
            assert read_response(sock)[0] == 408
            assert is_closed(sock)
        assert time.monotonic() - started < HEADER_TIMEOUT + 2.0
    finally:
        for sock in socks:
            sock.close()
    assert timed_get(slow_server.port) < 0.5


# -- running out of file descriptors (K21) --------------------------------------------------

def fd_limited_server(root, headroom: int) -> ServerProcess:
    """A server whose open-file limit, lowered once it runs, leaves `headroom` descriptors."""
    server = cases_server_with(root, 1)
    assert request(server.port, GET)[0] == 200  # the worker connection is open and counted
    pid = server.proc.pid
    in_use = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + headroom, in_use + headroom))
    return server


def keep_alive_client(port: int) -> socket.socket:
    sock = connect(port, timeout=5)
    try:
        sock.sendall(GET)
        assert read_response(sock)[0] == 200
    except BaseException:
        sock.close()
        raise
    return sock


def test_running_out_of_file_descriptors_is_survived(tmp_path):  # K21
    server = fd_limited_server(tmp_path, 10)
    held, extra = [], []
    try:
        for _ in range(10):  # every descriptor the front has left
            held.append(keep_alive_client(server.port))
        for _ in range(5):  # accept() fails for these (EMFILE)
            sock = connect(server.port, timeout=5)
            try:
                sock.sendall(GET)
            except OSError:
                pass
            extra.append(sock)
        # The front keeps serving the connections it has ...
        for sock in held:
            sock.sendall(GET)
            assert read_response(sock)[0] == 200
        # ... and accepts again once some close (as soon as it has seen them close; the
        # clients that gave up meanwhile are closed too, so they take no descriptor).
        for sock in extra:
            sock.close()
        for _ in range(5):
            held.pop().close()
        deadline = time.monotonic() + 5
        while len(held) < 10:
            try:
                held.append(keep_alive_client(server.port))
            except (ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "no connection accepted after some closed"
        assert server.proc.poll() is None
        assert "Traceback" not in server.log
    finally:
        for sock in held + extra:
            sock.close()
        server.stop()


def test_running_out_of_file_descriptors_is_logged_once_and_clients_wait(tmp_path):  # K21
    """Out of descriptors, the front pauses accepting and says so once (not once per try),
    and the clients that arrived meanwhile wait in the backlog rather than being dropped."""
    server = fd_limited_server(tmp_path, 4)
    held, waiting = [], []
    shortage = r"ERROR .*(EMFILE|[Tt]oo many open files|file descriptors)"
    try:
        for _ in range(4):
            held.append(keep_alive_client(server.port))
        for _ in range(20):  # a burst of clients with no descriptor left for them
            sock = connect(server.port, timeout=10)
            sock.sendall(GET)
            waiting.append(sock)
        server.wait_for(shortage, timeout=5)
        # Half a second of shortage (several tries to accept): still the one line.
        with pytest.raises(TimeoutError):
            server.wait_for(shortage, timeout=0.5, count=2)
        for sock in held:
            sock.close()
        # Each waiting client is answered as descriptors free up (a few at a time).
        for sock in waiting:
            assert read_response(sock)[0] == 200
            sock.close()
        assert server.proc.poll() is None
    finally:
        for sock in held + waiting:
            sock.close()
        server.stop()


# -- bodies: unread (K12), endless (K20), 100 Continue (K11) ---------------------------------

def test_unread_body_then_the_next_request_on_the_same_connection(slow_server):  # K12
    with connect(slow_server.port) as first:
        # Past 8 KiB of head and body, then past the spool threshold; /pid reads none of it.
        for size in (9000, 3 * 1024 * 1024):
            first.sendall(b"POST /pid HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s"
                          b"GET /echo?after-%d HTTP/1.1\r\nHost: a\r\n\r\n"
                          % (size, os.urandom(size), size))
            status, _, _, _ = read_response(first)
            assert status == 200
            status, _, body, _ = read_response(first)
            assert status == 200 and json.loads(body)["QUERY_STRING"] == f"after-{size}"
        # Client 1 keeps its connection open; client 2 is answered at once.
        assert timed_get(slow_server.port) < 0.5
        first.sendall(GET)
        assert read_response(first)[0] == 200


def test_endless_chunked_upload_gets_413_and_memory_stays_flat(slow_server):  # K20
    pid = slow_server.proc.pid
    before = calls(slow_server)
    base = peak = rss_kib(pid)
    chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
    sent = 0
    with connect(slow_server.port, timeout=10) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while not select.select([sock], [], [], 0)[0]:  # until the front answers
                sock.sendall(chunk)
                sent += len(chunk)
                if sent % (1 << 20) < len(chunk):
                    peak = max(peak, rss_kib(pid))
                assert sent < 8 * MAX_BODY, "the body limit never applied"
        except OSError:
            pass  # the front closed after its answer: it is still to be read
        status, _, body, _ = read_response(sock)
        assert status == 413, body
        assert is_closed(sock)
    assert sent >= MAX_BODY  # counted as it came, chunked framing and all
    assert peak - base < 4 * 1024, (base, peak)  # KiB: the body went to a spool file
    assert calls(slow_server) == before


def test_huge_content_length_gets_413_at_once(slow_server):  # K20
    before = calls(slow_server)
    with connect(slow_server.port) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2147483648\r\n\r\n"
                     + b"x" * 1000)
        status, _, _, _ = read_response(sock)
        assert status == 413 and time.monotonic() - started < 0.5
        assert is_closed(sock)
    assert calls(slow_server) == before


def test_no_100_continue_for_a_body_sent_with_its_head(slow_server):  # K11
    with connect(slow_server.port) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\nhello")
        status, _, body, head = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body)["body"] == "hello"


def test_idle_keep_alive_connections_are_closed_after_keepalive_timeout(tmp_path):
    app = copy_app(APPS / "cases", tmp_path / "cases")
    (app / "public").mkdir()
    (app / "corral.toml").write_text(cases_config(app, server="keepalive_timeout = 0.5"))
    server = ServerProcess(app).wait_ready()
    try:
        with connect(server.port) as sock:
            sock.sendall(GET)
            assert read_response(sock)[0] == 200
            started = time.monotonic()
            assert is_closed(sock, timeout=10)
            assert time.monotonic() - started >= 0.4  # not before its time
    finally:
        server.stop()
