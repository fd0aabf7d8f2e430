"""Starting and stopping: the deploy step (success, failure, requests held
while it runs), graceful stop on SIGTERM and SIGINT, and no process left
behind whatever happens to the supervisor or a worker."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.conftest import cases_config
from tests.harness import (
    APPS,
    ServerProcess,
    alive,
    children_of,
    connect,
    copy_app,
    read_response,
    request,
)


def cases_app(tmp_path, processes=2, server="", extra=""):
    app = copy_app(APPS / "cases", tmp_path / "cases")
    (app / "public").mkdir()
    (app / "corral.toml").write_text(cases_config(app, processes, server) + extra)
    return app


def get(port: int, path: bytes) -> tuple[int, dict, bytes, bytes]:
    return request(port, b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n", timeout=30)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_lets_in_flight_requests_finish(tmp_path, sig):  # K23
    server = ServerProcess(cases_app(tmp_path)).wait_ready()
    workers = server.worker_pids()
    results = []
    idle = connect(server.port)
    idle.sendall(b"GET /pid HTTP/1.1\r\nHost: a\r\n\r\n")
    assert read_response(idle)[0] == 200  # now an idle keep-alive connection
    socks = [connect(server.port, timeout=30) for _ in range(2)]
    for sock in socks:
        sock.sendall(b"GET /slow-logged?2 HTTP/1.1\r\nHost: a\r\n\r\n")
    readers = [threading.Thread(target=lambda s=s: results.append(read_response(s)))
               for s in socks]
    for t in readers:
        t.start()
    server.wait_for(r"SLOW STARTED", count=2)  # both requests are in the workers
    server.proc.send_signal(sig)
    server.wait_for(r"stopping gracefully")
    for t in readers:
        t.join(30)
    assert [r[0] for r in results] == [200, 200]
    assert all(r[1].get("connection") == "close" for r in results)
    assert all(r[2] == b"slept 2\n" for r in results)
    assert idle.recv(1) == b""  # idle connections are closed, not kept
    assert server.stop() == 0
    assert not any(alive(pid) for pid in workers)
    for sock in socks + [idle]:
        sock.close()


def test_killed_supervisor_takes_its_workers_along(tmp_path):  # K24
    server = ServerProcess(cases_app(tmp_path)).wait_ready()
    workers = server.worker_pids()
    assert len(workers) == 2
    server.kill()  # SIGKILL: no chance to clean up
    # The workers are not our children: watch /proc for their end.
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers):
        assert time.monotonic() < deadline, "workers outlived a SIGKILLed supervisor"
        time.sleep(0.05)


def test_killed_workers_are_reaped_and_replaced(tmp_path):  # K24
    server = ServerProcess(cases_app(tmp_path)).wait_ready()
    try:
        first = server.worker_pids()
        for pid in first:
            os.kill(pid, signal.SIGKILL)
        for pid in first:
            server.wait_for(rf"worker pid {pid} .*killed by SIGKILL")
        assert get(server.port, b"/pid")[0] == 200
        deadline = time.monotonic() + 20
        while True:
            now = children_of(server.proc.pid)
            if len(now) == 2 and not set(now) & set(first):
                break
            assert time.monotonic() < deadline, now
            time.sleep(0.05)
        # No zombies: every child of the supervisor is a live worker.
        with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as f:
            listed = [int(p) for p in f.read().split()]
        assert all(alive(p) for p in listed)
    finally:
        assert server.stop() == 0


def test_failed_deploy_step_answers_503_and_says_so(tmp_path):
    app = cases_app(tmp_path, extra='[deploy]\nfile = "deploy.py"\n')
    (app / "deploy.py").write_text("import sys\nprint('migrating...')\nsys.exit(3)\n")
    server = ServerProcess(app).wait_ready()
    try:
        assert "FAILED (exit status 3" in server.log
        status, headers, body, _ = get(server.port, b"/pid")
        assert status == 503 and headers["retry-after"]
        assert b"unavailable" in body.lower() and b"exit status" not in body
        log = (app / "log" / "deploy.log").read_text()
        assert "migrating..." in log
        assert "deploy step finished: exit status 3" in log
    finally:
        assert server.stop() == 0


def test_requests_wait_for_the_deploy_step_then_get_503(tmp_path):
    app = cases_app(tmp_path, extra='[deploy]\nfile = "deploy.py"\nhold = 0.5\n')
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    (app / "deploy.py").write_text(f"print('waiting'); open({str(gate)!r}).read(); print('done')\n")
    server = ServerProcess(app)
    try:
        server.port = int(server.wait_for(r"listening on ").rsplit(":", 1)[1])
        status, headers, body, _ = get(server.port, b"/pid")
        assert status == 503
        assert headers["retry-after"] == "10"
        assert b"Deployment in progress" in body
        with open(gate, "w") as f:
            f.write("go")
        server.wait_for(r"INFO ready: ")
        assert get(server.port, b"/pid")[0] == 200
    finally:
        server.stop()


def test_deploy_step_runs_in_the_apps_folder_and_environment(tmp_path):
    app = cases_app(tmp_path, extra='[deploy]\ncommand = ["python", "-c", '
                    '"import os; print(os.getcwd(), os.environ[\'CASES_CALL_LOG\'])"]\n')
    server = ServerProcess(app).wait_ready()
    try:
        log = (app / "log" / "deploy.log").read_text()
        assert f"{app} {app / 'calls.log'}" in log
        assert "exit status 0" in log
    finally:
        server.stop()


def test_access_log_path_is_relative_to_the_app_folder(tmp_path):
    app = cases_app(tmp_path, server='access_log = "logs/access.log"')
    server = ServerProcess(app).wait_ready()
    try:
        assert get(server.port, b"/pid")[0] == 200
    finally:
        assert server.stop() == 0
    assert '"GET /pid HTTP/1.1" 200' in (app / "logs" / "access.log").read_text()


def test_access_log_that_cannot_be_opened_is_a_config_error(tmp_path):
    app = cases_app(tmp_path, server='access_log = "/proc/no/such/access.log"')
    server = ServerProcess(app)
    assert server.proc.wait(60) == 2
    server.stop()
    assert "[server] access_log: cannot open" in server.log and "Fix:" in server.log


def test_sighup_restarts_instead_of_stopping(tmp_path):
    server = ServerProcess(cases_app(tmp_path)).wait_ready()
    try:
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"SIGHUP received: restarting")
        server.wait_for(r"generation 2 of cases serves")
        assert get(server.port, b"/pid")[0] == 200
    finally:
        assert server.stop() == 0


def test_unix_socket_of_the_front_is_removed_on_stop_and_never_stolen(tmp_path):
    app = cases_app(tmp_path)
    path = tmp_path / "front.sock"
    server = ServerProcess(app, bind=f"unix:{path}")
    server.wait_for(r"INFO ready: ")
    assert path.exists()
    assert path.stat().st_mode & 0o777 == 0o660  # [server] socket_mode: the group may connect
    # A second server on the same, live socket is refused, not let steal it.
    second = ServerProcess(app, bind=f"unix:{path}")
    assert second.proc.wait(60) == 2
    second.stop()
    assert "another server listens on this socket" in second.log
    assert server.stop() == 0
    assert not path.exists()


def test_unimportable_app_stops_serve_with_the_key_and_no_respawn_loop(tmp_path):
    app = cases_app(tmp_path)
    config = app / "corral.toml"
    config.write_text(config.read_text().replace("cases:application", "nosuch:application"))
    server = ServerProcess(app)
    assert server.proc.wait(60) == 2
    server.stop()
    assert f"{config}: [app] wsgi = 'nosuch:application'" in server.log
    assert "Fix:" in server.lines[-2]  # the reason, then "stopped"
    assert server.log.count("spawned worker") == 2  # the first two, never a respawn


def test_json_access_log_has_timings_worker_and_request_id(tmp_path):
    import json
    app = cases_app(tmp_path, server='access_log = "access.jsonl"\naccess_log_format = "json"')
    server = ServerProcess(app).wait_ready()
    try:
        status, _, body, _ = get(server.port, b"/echo?x=1")
        assert status == 200
        echoed = json.loads(body)
        request(server.port, b"GET /files/nope HTTP/1.1\r\nHost: a\r\n"
                b"X-Request-ID: from-the-proxy-1\r\n\r\n")
        request(server.port, b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")  # refused
    finally:
        assert server.stop() == 0
    lines = [json.loads(line) for line in (app / "access.jsonl").read_text().splitlines()]
    app_line, static_line, refused = lines
    assert app_line["target"] == "/echo?x=1" and app_line["status"] == 200
    assert app_line["worker_pid"] == echoed["pid"]
    assert app_line["request_id"] == echoed["HTTP_X_REQUEST_ID"]
    assert app_line["app_ms"] > 0 and app_line["queue_ms"] >= 0
    assert app_line["total_ms"] >= app_line["app_ms"]
    assert static_line["status"] == 404 and static_line["request_id"] == "from-the-proxy-1"
    assert static_line["worker_pid"] is None and static_line["app_ms"] is None
    assert refused["status"] == 400  # refused requests are logged too


def test_workers_stopped_by_sigterm_under_post_load_lose_no_request(tmp_path):
    """A worker told to stop finishes its request and refuses (OVERLOADED)
    any it has not begun; the front sends those elsewhere, POSTs included."""
    server = ServerProcess(cases_app(tmp_path)).wait_ready()
    stop = threading.Event()
    answers: list = []

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            body = f"c{n}-{i}".encode()
            try:
                answers.append(request(server.port, b"POST /echo HTTP/1.1\r\nHost: t\r\n"
                                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))[0])
            except OSError as exc:
                answers.append(repr(exc))

    clients = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    try:
        for thread in clients:
            thread.start()
        for _ in range(6):
            before = len(answers)
            while len(answers) < before + 50:  # load between two stops
                time.sleep(0.01)
            pids = children_of(server.proc.pid)
            os.kill(pids[0], signal.SIGTERM)
            server.wait_for(f"worker pid {pids[0]} .*exited")
    finally:
        stop.set()
        for thread in clients:
            thread.join(30)
        server.stop()
    assert len(answers) > 300
    assert set(answers) == {200}, "\n".join(
        line for line in server.lines if "POST /echo" not in line)
