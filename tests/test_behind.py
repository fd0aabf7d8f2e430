"""Requests sent behind a busy worker's current one (corral.front.upstream.Link):
they run once, on whichever worker is free first, and are never lost.

Real `corral serve` with two workers of the cases app, whose call log shows
how many times a request reached the app.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import threading
import time

import pytest

from tests.harness import ServerProcess, connect, read_response
from tests.test_lifecycle import cases_app


BEHIND = r"goes behind worker pid \d+'s current request"  # the front's DEBUG line


def calls(app, target: str) -> int:
    try:
        lines = (app / "calls.log").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return lines.count(target)


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


class Client(threading.Thread):
    """One request on its own connection; its answer and when it came."""

    def __init__(self, port: int, raw: bytes) -> None:
        super().__init__(daemon=True)
        self.port, self.raw = port, raw
        self.sock = connect(port, timeout=60)
        self.status = 0
        self.body = b""
        self.done_at = 0.0

    def run(self) -> None:
        self.sock.sendall(self.raw)
        try:
            self.status, _, self.body, _ = read_response(self.sock)
        except OSError:
            self.status = -1
        self.done_at = time.monotonic()
        self.sock.close()


def get(port: int, target: str) -> Client:
    client = Client(port, f"GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    client.start()
    return client


def post(port: int, target: str, body: bytes = b"order") -> Client:
    client = Client(port, f"POST {target} HTTP/1.1\r\nHost: t\r\nContent-Length: "
                          f"{len(body)}\r\n\r\n".encode() + body)
    client.start()
    return client


@pytest.fixture
def two_busy(tmp_path):
    """A server whose two workers are both busy: one for 3 s, one for 0.6 s."""
    # A long behind_limit: the requests here go behind ones that run a while.
    app = cases_app(tmp_path, extra="")
    toml = (app / "corral.toml").read_text().replace("[app]\n", "[app]\nbehind_limit = 30\n", 1)
    (app / "corral.toml").write_text(toml)
    server = ServerProcess(app, "--log-level", "DEBUG").wait_ready()
    long = get(server.port, "/slow?3")
    wait_until(lambda: calls(app, "/slow?3") == 1)
    short = get(server.port, "/slow?0.6")
    wait_until(lambda: calls(app, "/slow?0.6") == 1)
    yield server, app, long, short
    server.stop()


def test_a_request_behind_a_slow_one_moves_to_the_worker_that_frees_up(two_busy):
    server, app, long, short = two_busy
    # No worker is free: the POST goes behind the one that began first (3 s).
    order = post(server.port, "/echo?order")
    line = server.wait_for(r"goes behind worker pid \d+'s current request", 10)
    behind = int(line.split("behind worker pid ")[1].split("'")[0])
    order.join(30)
    long.join(30)
    assert order.status == 200 and json.loads(order.body)["body"] == "order"
    # It ran on the worker of the 0.6 s request, not on the one it went behind.
    assert json.loads(order.body)["pid"] != behind
    # Taken back when the 0.6 s request ended, not left waiting for the 3 s one.
    assert order.done_at < long.done_at - 1.0
    assert calls(app, "/echo?order") == 1  # it ran exactly once
    assert "taken back" in server.log


def test_requests_behind_busy_workers_all_run_once(two_busy):
    server, app, long, short = two_busy
    posts = [post(server.port, f"/echo?n{i}") for i in range(12)]
    for client in posts:
        client.join(60)
    assert [c.status for c in posts] == [200] * 12
    assert [calls(app, f"/echo?n{i}") for i in range(12)] == [1] * 12


def test_a_request_behind_a_worker_that_dies_goes_to_another_and_runs_once(two_busy):
    server, app, long, short = two_busy
    short.join(30)  # one worker free again...
    again = get(server.port, "/slow?3")  # ...and busy for 3 s
    wait_until(lambda: calls(app, "/slow?3") == 2)
    order = post(server.port, "/echo?saved")  # its body: "order"
    server.wait_for(r"goes behind worker pid \d+'s current request", 10)
    # Kill the worker the POST waits behind (the first /slow?3's), before it
    # could begin the POST: the POST never ran, so it is sent on.
    line = server.wait_for(r"goes behind worker pid \d+'s current request")
    pid = int(line.split("behind worker pid ")[1].split("'")[0])
    os.kill(pid, signal.SIGKILL)
    order.join(60)
    long.join(30)
    again.join(30)
    assert order.status == 200 and json.loads(order.body)["body"] == "order"
    assert calls(app, "/echo?saved") == 1


def test_a_request_given_up_while_behind_another_never_runs(two_busy):
    server, app, long, short = two_busy
    gone = Client(server.port, b"POST /echo?gone HTTP/1.1\r\nHost: t\r\n"
                               b"Content-Length: 4\r\n\r\ngone")
    gone.sock.sendall(gone.raw)
    server.wait_for(r"goes behind worker pid \d+'s current request", 10)
    # The client leaves (a reset: a plain close would be a half-close, which
    # is still answered) before any worker began its request.
    gone.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    gone.sock.close()
    server.wait_for(r"client gone: dropping the request behind", 10)
    long.join(30)
    short.join(30)
    after = get(server.port, "/pid")  # both workers have moved past it
    after.join(30)
    assert after.status == 200
    assert calls(app, "/echo?gone") == 0


def one_worker(tmp_path, extra: str = ""):
    app = cases_app(tmp_path, processes=1)
    toml = (app / "corral.toml").read_text().replace(
        "[app]\n", f"[app]\nbehind_limit = 30\n{extra}", 1)
    (app / "corral.toml").write_text(toml)
    return app, ServerProcess(app, "--log-level", "DEBUG").wait_ready()


def test_two_requests_wait_behind_a_busy_worker_and_a_third_in_the_queue(tmp_path):
    app, server = one_worker(tmp_path)
    try:
        busy = get(server.port, "/slow?2")
        wait_until(lambda: calls(app, "/slow?2") == 1)
        first = post(server.port, "/echo?b1")
        server.wait_for(BEHIND, 10)
        second = post(server.port, "/echo?b2")
        server.wait_for(BEHIND, 10, count=2)
        assert busy.done_at == 0  # both went behind while the worker was busy
        third = post(server.port, "/echo?b3")  # two are behind already: it waits
        for client in (busy, first, second, third):
            client.join(30)
        assert [c.status for c in (busy, first, second, third)] == [200] * 4
        assert [calls(app, f"/echo?b{i}") for i in (1, 2, 3)] == [1, 1, 1]
        ran = [line for line in (app / "calls.log").read_text().splitlines()
               if line.startswith("/echo?b")]
        assert ran == ["/echo?b1", "/echo?b2", "/echo?b3"]  # in the order they came
    finally:
        server.stop()


def test_a_client_leaving_while_behind_another_does_not_cost_the_next_one(tmp_path):
    app, server = one_worker(tmp_path)
    try:
        busy = get(server.port, "/slow?1.5")
        wait_until(lambda: calls(app, "/slow?1.5") == 1)
        gone = Client(server.port, b"POST /echo?gone HTTP/1.1\r\nHost: t\r\n"
                                   b"Content-Length: 4\r\n\r\ngone")
        gone.sock.sendall(gone.raw)
        server.wait_for(BEHIND, 10)
        kept = post(server.port, "/echo?kept")
        server.wait_for(BEHIND, 10, count=2)
        gone.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        gone.sock.close()
        server.wait_for(r"client gone: dropping the request behind", 10)
        busy.join(30)
        kept.join(30)
        assert (busy.status, kept.status) == (200, 200)
        assert json.loads(kept.body)["body"] == "order"
        assert (calls(app, "/echo?gone"), calls(app, "/echo?kept")) == (0, 1)
        assert "Traceback" not in server.log
    finally:
        server.stop()


def test_requests_behind_one_stuck_on_a_slow_client_run_once_when_that_times_out(tmp_path):
    # The client of /big reads nothing, so the front stops reading the
    # worker's output (backpressure) and the worker blocks writing it until
    # request_timeout.  The second request behind it cannot be taken back
    # then: the worker still holds its claim byte for the request that last
    # had that id (it lets it go when the first one behind comes up).
    app, server = one_worker(tmp_path, "request_timeout = 1\ntimeout_grace = 1\n")
    try:
        slow = get(server.port, "/slow?0.5")
        wait_until(lambda: calls(app, "/slow?0.5") == 1)
        first = post(server.port, "/echo?p1")
        server.wait_for(BEHIND, 10)
        stuck = connect(server.port, timeout=60)
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        server.wait_for(BEHIND, 10, count=2)
        wait_until(lambda: calls(app, "/big") == 1)
        x1 = post(server.port, "/echo?x1")
        server.wait_for(BEHIND, 10, count=3)
        x2 = post(server.port, "/echo?x2")
        server.wait_for(BEHIND, 10, count=4)
        server.wait_for(r"timed out: GET /big", 30)
        for client in (slow, first, x1, x2):
            client.join(30)
        assert [c.status for c in (slow, first, x1, x2)] == [200] * 4
        assert [calls(app, f"/echo?{n}") for n in ("p1", "x1", "x2")] == [1, 1, 1]
        stuck.close()
    finally:
        server.stop()
