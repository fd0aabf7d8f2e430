"""Request timeouts, recycling and restarts with generations: the client
always gets an answer (504 for a stuck request), recycled and restarted
workers never cost a request, and a new generation that cannot serve leaves
the old one serving."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

from tests.harness import APPS, ServerProcess, connect, copy_app, read_response, request


def restarts_app(tmp_path, app: str = "", deploy: str = "", processes: int = 2):
    folder = copy_app(APPS / "restarts", tmp_path / "app")
    (folder / "corral.toml").write_text(
        f'[app]\nwsgi = "app:application"\nprocesses = {processes}\n{app}\n'
        f'[env]\nPYTHONPATH = "."\n' + (f"[deploy]\n{deploy}\n" if deploy else ""))
    return folder


def get(port: int, path: str, timeout: float = 30) -> tuple[int, bytes]:
    status, _, body, _ = request(port, f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode(),
                                 timeout=timeout)
    return status, body


def serving_pids(server: ServerProcess) -> set[int]:
    return set(server.worker_pids())


class ClientLoop(threading.Thread):
    """GETs one after another until stopped, on fresh connections or on one
    kept-alive connection; counts every answer that is not 200, and every
    error, as a failure."""

    def __init__(self, port: int, path: str = "/pid", keep_alive: bool = False) -> None:
        super().__init__(daemon=True)
        self.port, self.path, self.keep_alive = port, path, keep_alive
        self.ok = 0
        self.failures: list[str] = []
        self.pids: set[int] = set()
        self.done = threading.Event()

    def run(self) -> None:
        sock = None
        while not self.done.is_set():
            try:
                if self.keep_alive:
                    sock = sock or connect(self.port, timeout=30)
                    sock.sendall(f"GET {self.path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
                    status, _, body, _ = read_response(sock)
                else:
                    status, body = get(self.port, self.path)
            except Exception as exc:  # a reset or a cut connection is a failure
                self.failures.append(f"{type(exc).__name__}: {exc}")
                sock = None
                continue
            if status != 200:
                self.failures.append(f"{status} {body!r}")
            else:
                self.ok += 1
                self.pids.add(int(body))
        if sock is not None:
            sock.close()

    def stop(self) -> None:
        self.done.set()
        self.join(60)


# -- request timeout (K25) ---------------------------------------------------

def test_stuck_request_gets_504_and_its_worker_is_replaced(tmp_path):  # K25
    app = restarts_app(tmp_path, "request_timeout = 2\ntimeout_grace = 3")
    server = ServerProcess(app).wait_ready()
    try:
        stuck = connect(server.port, timeout=30)
        stuck.sendall(b"GET /stuck?60 HTTP/1.1\r\nHost: a\r\n\r\n")
        line = server.wait_for(r"STUCK STARTED in \d+")
        pid = int(line.rsplit(" ", 1)[1])
        # Other requests are unaffected while one worker is stuck.
        assert get(server.port, "/pid")[0] == 200
        started = time.monotonic()
        status, headers, body, _ = read_response(stuck)
        assert status == 504 and b"504 Gateway Timeout" in body
        assert time.monotonic() - started < 10
        # The log names the worker pid, the request line and the cause ...
        server.wait_for(rf"CRITICAL worker pid {pid} timed out: GET /stuck\?60 ran over "
                        r"\[app\] request_timeout = 2 s")
        server.wait_for(rf"504 for GET /stuck\?60 .*worker pid {pid}")
        # ... and the worker's own lines give the app's stack, in app.py.
        server.wait_for(rf"\[worker {pid}\] request timeout: stopping GET /stuck\?60")
        assert re.search(r'File ".*app\.py", line \d+, in application\n\s+time\.sleep',
                         server.log)
        server.wait_for(rf"worker pid {pid} .*exited \(exit status 5\)")
        # The worker is replaced; never retried elsewhere.
        assert "to another worker" not in server.log
        deadline = time.monotonic() + 20
        while pid in server.worker_pids() or len(server.worker_pids()) != 2:
            assert time.monotonic() < deadline, server.worker_pids()
            time.sleep(0.05)
        assert {get(server.port, "/pid")[0] for _ in range(4)} == {200}
        stuck.close()
    finally:
        assert server.stop() == 0


def test_worker_that_ignores_the_stop_signal_is_killed_after_the_grace(tmp_path):
    app = restarts_app(tmp_path, "request_timeout = 1\ntimeout_grace = 1", processes=1)
    # An app that swallows the stop (SystemExit) and sleeps on.
    (app / "app.py").write_text((app / "app.py").read_text().replace(
        "        time.sleep(float(query or 60))\n",
        "        try:\n            time.sleep(float(query or 60))\n"
        "        except BaseException:\n            time.sleep(60)\n"))
    server = ServerProcess(app).wait_ready()
    try:
        status, _ = get(server.port, "/stuck?60")
        assert status == 504
        pid = int(server.wait_for(r"STUCK STARTED in \d+").rsplit(" ", 1)[1])
        server.wait_for(rf"worker pid {pid} .*exited \(killed by SIGKILL\)")
        server.wait_for(r"worker pid \d+ ready", count=2)
        assert get(server.port, "/pid")[0] == 200
    finally:
        assert server.stop() == 0


def test_stuck_request_from_a_web_server_over_fastcgi_gets_504_too(tmp_path):
    from tests.harness import FastCGIClient, cgi_params
    app = restarts_app(tmp_path, "request_timeout = 1\ntimeout_grace = 2", processes=1)
    listener = tmp_path / "fcgi.sock"
    server = ServerProcess(app, "--bind", f"fastcgi+unix:{listener}").wait_ready()
    try:
        client = FastCGIClient(listener)
        stdout, _, _ = client.request(cgi_params(uri="/stuck?30"))
        assert stdout.startswith(b"Status: 504")
        server.wait_for(r"CRITICAL worker pid \d+ timed out: GET /stuck\?30 \(FastCGI "
                        r"listener\) ran over")
        stdout, _, _ = client.request(cgi_params(uri="/pid"))  # same connection, new worker
        assert stdout.startswith(b"Status: 200")
        client.close()
    finally:
        assert server.stop() == 0


def test_request_within_its_timeout_is_untouched(tmp_path):
    app = restarts_app(tmp_path, "request_timeout = 5")
    server = ServerProcess(app).wait_ready()
    try:
        assert get(server.port, "/sleep?1") == (200, b"slept\n")
        assert "timed out" not in server.log
    finally:
        assert server.stop() == 0


# -- recycling -----------------------------------------------------------------

def test_max_requests_recycles_without_failing_a_request(tmp_path):
    app = restarts_app(tmp_path, "max_requests = 5")
    server = ServerProcess(app).wait_ready()
    try:
        first = serving_pids(server)
        loop = ClientLoop(server.port)
        loop.start()
        server.wait_for(r"recycling worker pid \d+ .*: it served 5 requests", count=4)
        server.wait_for(r"worker pid \d+ replaces worker pid \d+", count=4)
        loop.stop()
        assert loop.failures == []
        assert loop.ok >= 20
        assert loop.pids - first  # new workers served
        # The replacement was ready before the old worker left.
        for match in re.finditer(r"worker pid (\d+) replaces worker pid (\d+)", server.log):
            new, old = match.groups()
            assert server.log.index(f"worker pid {new} ready") < match.start()
    finally:
        assert server.stop() == 0


def test_max_requests_jitter_spreads_the_limits(tmp_path):
    app = restarts_app(tmp_path, "max_requests = 2\nmax_requests_jitter = 3", processes=1)
    server = ServerProcess(app).wait_ready()
    try:
        for _ in range(12):
            assert get(server.port, "/pid")[0] == 200
        server.wait_for(r"recycling worker pid")
        limits = [int(n) for n in re.findall(r"(\d+) with jitter", server.log)]
        assert limits and all(2 <= n <= 5 for n in limits)
    finally:
        assert server.stop() == 0


def test_max_rss_recycles_a_worker_that_grew(tmp_path):
    app = restarts_app(tmp_path, "max_rss = 80", processes=1)
    server = ServerProcess(app).wait_ready()
    try:
        pid = int(get(server.port, "/pid")[1])
        assert get(server.port, "/grow?100")[0] == 200
        server.wait_for(rf"recycling worker pid {pid} .*its memory is \d+ MiB "
                        r"\(\[app\] max_rss = 80\)")
        server.wait_for(rf"worker pid {pid} .*exited \(exit status 0\)")
        assert int(get(server.port, "/pid")[1]) != pid
    finally:
        assert server.stop() == 0


def test_max_lifetime_recycles_idle_workers(tmp_path):
    app = restarts_app(tmp_path, "max_lifetime = 1.5", processes=1)
    server = ServerProcess(app).wait_ready()
    try:
        pid = int(get(server.port, "/pid")[1])
        loop = ClientLoop(server.port)
        loop.start()
        server.wait_for(rf"recycling worker pid {pid} .*it lived \d+ s")
        server.wait_for(rf"replaces worker pid {pid}")
        server.wait_for(rf"worker pid {pid} .*exited")
        deadline = time.monotonic() + 10
        while len(loop.pids) < 2:  # the new worker has served too
            assert time.monotonic() < deadline
            time.sleep(0.05)
        loop.stop()
        assert loop.failures == []
        assert pid in loop.pids and len(loop.pids) >= 2
    finally:
        assert server.stop() == 0


# -- restarts with generations (K22) ------------------------------------------

DEPLOY = 'command = ["python", "-c", "print(\'deploy ran\')"]'


def slow_app(tmp_path, deploy: str = DEPLOY, processes: int = 2):
    """The K22 app: its import takes 1 s, and fails while the file "broken"
    exists; a deploy step that says it ran."""
    app = restarts_app(tmp_path, deploy=deploy, processes=processes)
    config = app / "corral.toml"
    config.write_text(config.read_text().replace(
        '[env]\nPYTHONPATH = "."\n',
        f'[env]\nPYTHONPATH = "."\nAPP_IMPORT_DELAY = "1"\nAPP_BREAK_FILE = "{app / "broken"}"\n'))
    return app


def test_sighup_restart_loses_no_request(tmp_path):  # K22
    app = slow_app(tmp_path)
    server = ServerProcess(app).wait_ready()
    try:
        first = serving_pids(server)
        loop = ClientLoop(server.port)
        kept = ClientLoop(server.port, keep_alive=True)  # one connection throughout
        loop.start()
        kept.start()
        in_flight = connect(server.port, timeout=30)
        in_flight.sendall(b"GET /stuck?2 HTTP/1.1\r\nHost: a\r\n\r\n")
        server.wait_for(r"STUCK STARTED")  # in a worker of generation 1
        while loop.ok < 20:
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"SIGHUP received: restarting")
        server.wait_for(r"generation 2 of app serves")
        # The request in flight in generation 1 finishes there.
        assert read_response(in_flight)[2] == b"woke up\n"
        server.wait_for(r"generation 1 of app stopped")
        served = loop.ok
        while loop.ok < served + 20:
            time.sleep(0.05)
        loop.stop()
        kept.stop()
        assert loop.failures == [] and kept.failures == []
        assert kept.ok > 20 and len(kept.pids) >= 2  # both generations, one connection
        second = serving_pids(server)
        assert first and second and not first & second  # the pids changed
        assert first & loop.pids and second & loop.pids  # both generations served
        deploy_log = (app / "log" / "deploy.log").read_text()
        assert "deploy step of app generation 2 started" in deploy_log
        assert deploy_log.count(" deploy ran\n") == 2  # once per generation
        assert server.log.count("deploy step of app succeeded") == 2
        in_flight.close()
    finally:
        assert server.stop() == 0


def test_touched_restart_file_restarts(tmp_path):
    app = slow_app(tmp_path, processes=1)
    (app / "tmp").mkdir()
    (app / "tmp" / "restart.txt").write_text("")  # present at start: no restart for it
    server = ServerProcess(app).wait_ready()
    try:
        first = serving_pids(server)
        loop = ClientLoop(server.port)
        loop.start()
        os.utime(app / "tmp" / "restart.txt", ns=(time.time_ns(), time.time_ns() + 10**9))
        server.wait_for(r"tmp/restart.txt touched: restarting")
        server.wait_for(r"generation 2 of app serves")
        server.wait_for(r"generation 1 of app stopped")
        loop.stop()
        assert loop.failures == []
        assert not first & serving_pids(server)
        assert "generation 3" not in server.log
    finally:
        assert server.stop() == 0


def corral(*args: str, timeout: float = 120):
    import subprocess
    import sys

    from tests.harness import ROOT
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "corral", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_corral_restart_and_status_through_the_control_socket(tmp_path):
    import json
    import stat
    app = slow_app(tmp_path)
    server = ServerProcess(app).wait_ready()
    try:
        sock = app / "tmp" / "corral.sock"
        mode = os.stat(sock).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        status = json.loads(corral("status", str(app), "--json").stdout)
        assert status["state"] == "ready" and status["generation"] == 1
        assert {w["pid"] for w in status["workers"]} == serving_pids(server)
        assert status["last_deploy"]["ok"] and status["last_deploy"]["generation"] == 1
        done = corral("restart", str(app))
        assert done.returncode == 0, done.stderr
        assert "generation 2 serves" in done.stdout
        server.wait_for(r"generation 1 of app stopped")
        status = json.loads(corral("status", str(app), "--json").stdout)
        assert status["generation"] == 2
        assert {w["generation"] for w in status["workers"]} == {2}
        assert all(w["rss_mib"] > 0 and w["state"] == "idle" for w in status["workers"])
        assert status["restarts"][-1]["cause"] == "corral restart"
        text = corral("status", str(app)).stdout
        assert "generation 2" in text and "last deploy step: generation 2, ok" in text
    finally:
        assert server.stop() == 0
    assert not sock.exists()
    missing = corral("status", str(app))
    assert missing.returncode == 1 and "is corral serving this app?" in missing.stderr


def test_new_generation_that_cannot_import_leaves_the_old_one_serving(tmp_path):
    app = slow_app(tmp_path)
    server = ServerProcess(app).wait_ready()
    try:
        first = serving_pids(server)
        loop = ClientLoop(server.port)
        loop.start()
        (app / "broken").write_text("")
        done = corral("restart", str(app))
        assert done.returncode == 1
        assert "generation 2 cannot serve: " in done.stderr
        server.wait_for(r"ERROR restart of app \(corral restart\) FAILED: generation 2 "
                        r"cannot serve: .*generation 1 keeps serving")
        loop.stop()
        assert loop.failures == [] and loop.pids <= first
        assert serving_pids(server) == first
        # Fixed, the next restart succeeds.
        (app / "broken").unlink()
        assert corral("restart", str(app)).returncode == 0
        server.wait_for(r"generation 3 of app serves")
    finally:
        assert server.stop() == 0


def test_failed_deploy_step_of_a_new_generation_leaves_the_old_one_serving(tmp_path):
    app = slow_app(tmp_path, deploy='command = ["python", "-c", "import os, sys; '
                   'sys.exit(3 if os.path.exists(\'broken\') else 0)"]')
    server = ServerProcess(app).wait_ready()
    try:
        first = serving_pids(server)
        (app / "broken").write_text("")  # the app imports, but the deploy step fails
        (app / "app.py").write_text((app / "app.py").read_text().replace(
            "raise RuntimeError", "print"))
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"FAILED: generation 2 cannot serve: deploy step failed "
                        r"\(exit status 3")
        assert get(server.port, "/pid")[0] == 200
        assert serving_pids(server) == first
        assert "deploy step finished: exit status 3" in (app / "log" / "deploy.log").read_text()
    finally:
        assert server.stop() == 0


def test_a_restart_keeps_the_command_line_bind_and_warns_only_of_real_changes(tmp_path):
    app = restarts_app(tmp_path)
    server = ServerProcess(app).wait_ready()  # with --bind 127.0.0.1:0
    try:
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"generation 2 of \S+ serves")
        assert "take effect at the next start" not in server.log
        with open(app / "corral.toml", "a") as f:
            f.write('[server]\nkeepalive_timeout = 7\n')
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"generation 3 of \S+ serves")
        assert "take effect at the next start" in server.log
        assert get(server.port, "/pid")[0] == 200
    finally:
        assert server.stop() == 0


# -- exclusive deploy and crash loops -----------------------------------------

def test_exclusive_deploy_stops_the_old_generation_first(tmp_path):
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    app = slow_app(tmp_path, deploy='file = "deploy.py"\nexclusive = true\nhold = 0.5')
    # Blocks on the gate only from the second generation on (marked by "hold").
    (app / "deploy.py").write_text(
        "import os\nprint('deploy ran')\n"
        f"if os.path.exists('hold'):\n    open({str(gate)!r}).read()\n")
    server = ServerProcess(app).wait_ready()
    try:
        first = serving_pids(server)
        in_flight = connect(server.port, timeout=30)
        in_flight.sendall(b"GET /stuck?1 HTTP/1.1\r\nHost: a\r\n\r\n")
        server.wait_for(r"STUCK STARTED")  # in a worker of generation 1
        (app / "hold").write_text("")
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"\[deploy\] exclusive\): generation 1 stops first")
        assert read_response(in_flight)[2] == b"woke up\n"  # finished, not cut
        server.wait_for(r"generation 1 of app stopped")
        server.wait_for(r"deploy step of app started", count=2)
        assert not first & serving_pids(server)  # the deploy step runs alone
        status, headers, body, _ = request(
            server.port, b"GET /pid HTTP/1.1\r\nHost: a\r\n\r\n", timeout=30)
        assert status == 503 and headers["retry-after"] == "10"
        assert b"Deployment in progress" in body
        with open(gate, "w") as f:
            f.write("go")
        server.wait_for(r"generation 2 of app serves")
        assert get(server.port, "/pid")[0] == 200
        log = server.log
        assert log.index("generation 1 of app stopped") < log.rindex("deploy step of app started")
        in_flight.close()
    finally:
        assert server.stop() == 0


def test_workers_that_keep_dying_mark_the_app_failed_without_a_fork_loop(tmp_path):
    app = restarts_app(tmp_path, processes=1)
    config = app / "corral.toml"
    config.write_text(config.read_text().replace(
        '[env]\n', f'[env]\nAPP_BREAK_FILE = "{app / "broken"}"\n'))
    server = ServerProcess(app).wait_ready()
    try:
        (pid,) = serving_pids(server)
        (app / "broken").write_text("")  # every new worker fails at import now
        os.kill(pid, signal.SIGKILL)
        server.wait_for(r"ERROR app marked failed: its workers keep dying \(5 quick exits")
        status, headers, body, _ = request(
            server.port, b"GET /pid HTTP/1.1\r\nHost: a\r\n\r\n", timeout=30)
        assert status == 503 and headers["retry-after"]
        spawned = server.log.count("spawned worker")
        assert spawned <= 7  # backed off: no fork loop
        (app / "broken").unlink()
        server.wait_for(r"app serves again: worker pid \d+ started", timeout=30)
        assert get(server.port, "/pid")[0] == 200
    finally:
        assert server.stop() == 0


def test_changed_config_file_restarts_with_the_new_config(tmp_path):
    app = slow_app(tmp_path, processes=2)
    config = app / "corral.toml"
    server = ServerProcess(app).wait_ready()
    try:
        loop = ClientLoop(server.port)
        loop.start()
        text = config.read_text()
        config.write_text(text.replace("processes = 2", "processes = 1"))
        server.wait_for(r"corral.toml changed: restarting")
        server.wait_for(r"generation 2 of app serves \(worker pids \d+\)")
        server.wait_for(r"generation 1 of app stopped")
        # An error in the file: reported, and generation 2 serves on.
        config.write_text(text.replace("processes = 2", 'processes = "two"'))
        server.wait_for(r"FAILED: generation 3 cannot serve: the config cannot be read: "
                        r".*\[app\] processes")
        loop.stop()
        assert loop.failures == []
        assert len(serving_pids(server)) == 1
    finally:
        assert server.stop() == 0


def test_control_socket_left_by_a_killed_server_is_replaced(tmp_path):
    app = restarts_app(tmp_path, processes=1)
    first = ServerProcess(app).wait_ready()
    first.kill()  # SIGKILL: its socket file stays behind
    assert (app / "tmp" / "corral.sock").exists()
    server = ServerProcess(app).wait_ready()
    try:
        status = corral("status", str(app))
        assert status.returncode == 0 and "generation 1" in status.stdout
    finally:
        assert server.stop() == 0


def test_control_socket_of_an_app_with_a_long_path_lives_in_the_run_folder(tmp_path):
    import stat
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    app = restarts_app(deep, processes=1)
    server = ServerProcess(app).wait_ready()
    try:
        pointer = app / "tmp" / "corral.sock"
        mode = os.stat(pointer).st_mode
        assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o600
        real = pointer.read_text().strip()
        assert stat.S_IMODE(os.stat(real).st_mode) == 0o600
        assert corral("restart", str(app)).returncode == 0
        server.wait_for(r"generation 2 of app serves")
    finally:
        assert server.stop() == 0
    assert not (app / "tmp" / "corral.sock").exists()


def test_restart_asked_for_during_a_restart_runs_once_after_it(tmp_path):
    app = slow_app(tmp_path, processes=1)
    server = ServerProcess(app).wait_ready()
    try:
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"starting generation 2")
        for _ in range(3):  # all while generation 2 imports: they make one restart
            server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"restart of app \(SIGHUP\) queued")
        server.wait_for(r"generation 3 of app serves")
        assert get(server.port, "/pid")[0] == 200
        assert "generation 4" not in server.log
    finally:
        assert server.stop() == 0
