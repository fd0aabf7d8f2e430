"""Scaling and spawn modes: a pool between [app] processes MIN and MAX grows
while requests queue and shrinks after [app] idle_timeout, down to no process
at all; preload pools fork their workers from a preloader and keep every
supervision guarantee of direct ones, Django's database connections included."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from corral.config import ConfigError, load
from tests.harness import (APPS, ROOT, SAMPLE, ServerProcess, alive, children_of, connect,
                           copy_app, read_response, request)


def scaling_app(tmp_path, app: str, deploy: str = "", version: str = "v1"):
    folder = copy_app(APPS / "scaling", tmp_path / "app")
    (folder / "VERSION").write_text(version + "\n")
    (folder / "corral.toml").write_text(
        f'[app]\nwsgi = "app:application"\n{app}\n[env]\nPYTHONPATH = "."\n'
        + (f"[deploy]\n{deploy}\n" if deploy else ""))
    return folder


def get(port: int, path: str, timeout: float = 30) -> tuple[int, bytes]:
    status, _, body, _ = request(port, f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode(),
                                 timeout=timeout)
    return status, body


def concurrently(port: int, path: str, clients: int) -> list[tuple[int, bytes]]:
    results: list = [None] * clients

    def one(i: int) -> None:
        try:
            results[i] = get(port, path)
        except Exception as exc:  # a cut connection is a failure to report
            results[i] = (0, repr(exc).encode())
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def descendants(pid: int) -> list[int]:
    """Live processes below `pid`: direct workers, or a preloader and its workers."""
    found, todo = [], [pid]
    while todo:
        for child in children_of(todo.pop()):
            found.append(child)
            todo.append(child)
    return sorted(found)


def pid_of(line: str) -> int:
    return int(re.search(r"pid (\d+)", line).group(1))


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


def status_of(app) -> dict:
    done = subprocess.run([sys.executable, "-m", "corral", "status", str(app), "--json"],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# -- the setting -------------------------------------------------------------

@pytest.mark.parametrize("value, problem, fix", [
    ('"4-2"', "the minimum 4 is above the maximum 2", 'put the smaller number first: "2-4"'),
    ('"0-0"', "allows no worker at all", 'to scale to zero, use a range such as "0-4"'),
    ('"two"', 'expected an integer or a range "MIN-MAX", got \'two\'', 'e.g. "0-4", "2-8"'),
    ("0", "allows no worker at all", "allow at least 1 worker"),
])
def test_bad_processes_range_names_file_key_and_fix(tmp_path, value, problem, fix):
    (tmp_path / "corral.toml").write_text(f'[app]\nwsgi = "a:b"\nprocesses = {value}\n')
    with pytest.raises(ConfigError) as caught:
        load(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'corral.toml'}: [app] processes: ")
    assert problem in message and fix in message


def test_processes_takes_a_number_or_a_range(tmp_path):
    config = tmp_path / "corral.toml"
    for value, expected in [("4", (4, 4)), ('"0-4"', (0, 4)), ('"2-8"', (2, 8)),
                            ('"3"', (3, 3))]:
        config.write_text(f'[app]\nwsgi = "a:b"\nprocesses = {value}\n')
        loaded = load(tmp_path)
        assert (loaded.min_processes, loaded.processes) == expected
    config.write_text('[app]\nwsgi = "a:b"\n')
    assert (load(tmp_path).min_processes, load(tmp_path).processes) == (2, 2)
    config.write_text('[app]\nwsgi = "a:b"\nspawn_mode = "fork"\n')
    with pytest.raises(ConfigError, match=r"\[app\] spawn_mode: expected one of "
                                          r'"direct", "preload"'):
        load(tmp_path)


# -- scaling -----------------------------------------------------------------

@pytest.mark.parametrize("mode", ["direct", "preload"])
def test_pool_grows_while_requests_queue_and_shrinks_when_idle(tmp_path, mode):
    app = scaling_app(tmp_path, f'processes = "1-3"\nidle_timeout = 2\nspawn_mode = "{mode}"')
    server = ServerProcess(app).wait_ready()
    try:
        workers = lambda: descendants(server.proc.pid)  # noqa: E731
        base = len(workers())  # one worker, and the preloader in preload mode
        # One request at a time never waits, so nothing is added.
        for _ in range(5):
            assert get(server.port, "/")[0] == 200
        assert "adding a worker" not in server.log
        # Five slow requests at once: they queue, and the pool grows to its
        # maximum of 3 workers, never past it.
        results: list = []
        clients = threading.Thread(
            target=lambda: results.extend(concurrently(server.port, "/sleep?2", 5)))
        clients.start()
        wait_until(lambda: len(workers()) == base + 2, 20, "two workers added")
        status = status_of(app)["processes"]
        assert (status["min"], status["max"], status["now"]) == (1, 3, 3)
        assert status["spawn_mode"] == mode
        clients.join(60)
        assert [status for status, _ in results] == [200] * 5, results
        assert len({body for _, body in results}) == 3
        assert server.log.count("adding a worker") == 2
        assert len(workers()) == base + 2
        # Idle for idle_timeout: back to the minimum, and it still serves.
        server.wait_for(r"stopping worker pid \d+ of app: it was idle for", count=2)
        wait_until(lambda: len(workers()) == base, 10, "back to 1 worker")
        assert "0 workers left" not in server.log
        assert status_of(app)["processes"]["now"] == 1
        assert get(server.port, "/")[0] == 200
    finally:
        assert server.stop() == 0


def test_scale_up_starts_no_more_workers_than_requests_wait(tmp_path):
    app = scaling_app(tmp_path, 'processes = "1-8"\nidle_timeout = 30')
    server = ServerProcess(app).wait_ready()
    try:
        # Three requests sent at once (connections opened first), so the
        # third cannot find a worker added for the second already free.
        socks = [connect(server.port, timeout=30) for _ in range(3)]
        for sock in socks:
            sock.sendall(b"GET /sleep?1.5 HTTP/1.1\r\nHost: a\r\n\r\n")
        results = [read_response(sock) for sock in socks]
        for sock in socks:
            sock.close()
        assert [status for status, *_ in results] == [200] * 3, results
        # One request went to the free worker; two waited, so two were added,
        # though six more were allowed.
        assert server.log.count("adding a worker") == 2
        assert len(children_of(server.proc.pid)) == 3
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("mode", ["direct", "preload"])
def test_scale_to_zero_runs_the_deploy_step_and_wakes_on_a_request(tmp_path, mode):
    deploy = 'command = ["python", "-c", "print(\'deploy ran\')"]'
    app = scaling_app(tmp_path, f'processes = "0-2"\nidle_timeout = 1\nspawn_mode = "{mode}"',
                      deploy)
    server = ServerProcess(app).wait_ready()
    try:
        # Ready once the deploy step has succeeded, with no process at all.
        assert (app / "log" / "deploy.log").read_text().count("deploy ran\n") == 1
        assert descendants(server.proc.pid) == []
        assert status_of(app)["processes"]["now"] == 0
        status, body = get(server.port, "/who")
        assert status == 200
        pid = int(body.split()[0])
        assert pid in descendants(server.proc.pid)
        # Idle: every process of the app goes, the preloader too.
        server.wait_for(r"0 workers left")
        wait_until(lambda: descendants(server.proc.pid) == [], 10, "no process left")
        status, body = get(server.port, "/who")
        assert status == 200 and int(body.split()[0]) != pid
        assert (app / "log" / "deploy.log").read_text().count("deploy ran\n") == 1
    finally:
        assert server.stop() == 0


def test_restart_of_a_scale_to_zero_pool_loses_nothing(tmp_path):
    deploy = 'command = ["python", "-c", "print(\'deploy ran\')"]'
    app = scaling_app(tmp_path, 'processes = "0-2"\nidle_timeout = 1\nspawn_mode = "preload"',
                      deploy)
    server = ServerProcess(app).wait_ready()
    failures: list = []
    ok = [0]
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            try:
                status, body = get(server.port, "/sleep?0.2")
            except Exception as exc:
                failures.append(repr(exc))
                continue
            if status == 200:
                ok[0] += 1
            else:
                failures.append((status, body))
    try:
        clients = [threading.Thread(target=loop) for _ in range(3)]
        for client in clients:
            client.start()
        wait_until(lambda: ok[0] >= 5, 30, "requests served before the restart")
        (app / "VERSION").write_text("v2\n")
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"generation 2 of app serves")
        server.wait_for(r"generation 1 of app stopped")
        before = ok[0]
        wait_until(lambda: ok[0] >= before + 5, 30, "requests served after the restart")
        done.set()
        for client in clients:
            client.join(60)
        assert failures == []
        assert get(server.port, "/who")[1].split()[3] == b"v2"
        assert (app / "log" / "deploy.log").read_text().count("deploy ran\n") == 2
    finally:
        done.set()
        assert server.stop() == 0


# -- preload -----------------------------------------------------------------

PROBE = '''"""The sample site, plus /probe: proves which process imported the app and
that the database connection the import opened is not the worker's."""
import json
import os
import re

from django.db import connection

from mysite.wsgi import application as site

connection.ensure_connection()  # as an app that queries at import time does
INHERITED = connection.connection  # the sqlite3 connection made by the import
IMPORTED_BY = os.getpid()


def application(environ, start_response):
    if environ["PATH_INFO"] != "/probe":
        return site(environ, start_response)
    with connection.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM blog_post")
        posts = cursor.fetchone()[0]
    try:
        INHERITED.execute("SELECT 1")
        inherited_closed = False
    except Exception:  # sqlite3.ProgrammingError: Cannot operate on a closed database
        inherited_closed = True
    body = json.dumps({"pid": os.getpid(), "imported_by": IMPORTED_BY, "posts": posts,
                       "same_connection": connection.connection is INHERITED,
                       "inherited_closed": inherited_closed}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''


def probe_site(tmp_path, mode: str):
    site = copy_app(SAMPLE, tmp_path / "site")
    (site / "probe.py").write_text(PROBE)
    config = site / "corral.toml"
    text = config.read_text().replace('wsgi = "mysite.wsgi:application"\nprocesses = 2',
                                      f'wsgi = "probe:application"\nprocesses = 2\n'
                                      f'spawn_mode = "{mode}"')
    assert "probe:application" in text
    config.write_text(text)
    return site


def probes(server: ServerProcess) -> list[dict]:
    """/probe answered by both workers: two at once, each slower than the other's."""
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + 30
    while len(seen) < 2 and time.monotonic() < deadline:
        for status, body in concurrently(server.port, "/probe", 4):
            assert status == 200, body
            answer = json.loads(body)
            seen[answer["pid"]] = answer
    assert len(seen) == 2, seen
    return list(seen.values())


def test_preload_serves_django_and_workers_reopen_the_database_connection(tmp_path):
    site = probe_site(tmp_path, "preload")
    server = ServerProcess(site).wait_ready()
    try:
        preloader = pid_of(server.wait_for(r"preloader pid \d+ of site imported"))
        assert children_of(server.proc.pid) == [preloader]
        workers = children_of(preloader)
        assert len(workers) == 2
        assert status_of(site)["processes"]["preloader"] == preloader
        for answer in probes(server):
            assert answer["pid"] in workers
            # Imported once, by the preloader, never by the supervisor.
            assert answer["imported_by"] == preloader != server.proc.pid
            # The connection the import opened was closed before the fork,
            # and the worker's queries run on one of its own.
            assert answer["inherited_closed"] is True
            assert answer["same_connection"] is False
            assert answer["posts"] == 3
        status, _, body, _ = request(server.port,
                                     b"GET /blog/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert status == 200 and "Hello from corral".encode() in body
    finally:
        assert server.stop() == 0


def test_direct_workers_keep_the_connection_their_import_opened(tmp_path):
    # The contrast that makes the preload test mean something: without a
    # fork, the probe sees the very connection its import made, still open.
    site = probe_site(tmp_path, "direct")
    server = ServerProcess(site).wait_ready()
    try:
        for answer in probes(server):
            assert answer["imported_by"] == answer["pid"]
            assert answer["same_connection"] is True
            assert answer["inherited_closed"] is False
    finally:
        assert server.stop() == 0


def test_preload_workers_are_killed_timed_out_recycled_and_replaced(tmp_path):
    app = scaling_app(tmp_path, 'processes = 2\nspawn_mode = "preload"\nmax_requests = 4\n'
                                'request_timeout = 1\ntimeout_grace = 2')
    server = ServerProcess(app).wait_ready()
    try:
        preloader = pid_of(server.wait_for(r"preloader pid \d+ of app imported"))
        victim = children_of(preloader)[0]
        # Killed: the supervisor sees the pid and the cause, and forks another.
        os.kill(victim, signal.SIGKILL)
        server.wait_for(rf"worker pid {victim} of app exited unexpectedly \(killed by SIGKILL\)")
        wait_until(lambda: len(children_of(preloader)) == 2 and victim not in
                   children_of(preloader), 10, "the killed worker replaced")
        # Recycled after max_requests, without a failed request.
        for _ in range(12):
            assert get(server.port, "/")[0] == 200
        server.wait_for(r"recycling worker pid \d+ of app: it served 4 requests")
        server.wait_for(r"worker pid \d+ of app exited \(exit status 0\) after \d+ requests; "
                        r"it was leaving because it served 4 requests")
        # Timed out: 504, its stack logged on SIGUSR1, then replaced.
        status, body = get(server.port, "/stuck")
        assert status == 504
        stuck = int(server.wait_for(r"STUCK STARTED in \d+").split()[-1])
        server.wait_for(rf"\[worker {stuck}\] request timeout: stopping GET /stuck")
        server.wait_for(rf"worker pid {stuck} of app exited \(exit status 5\)")
        wait_until(lambda: len(children_of(preloader)) == 2 and stuck not in
                   children_of(preloader), 10, "the stuck worker replaced")
        # Every worker came from this one preloader.
        for _ in range(3):
            _, body = get(server.port, "/who")
            pid, parent, imported_by, _ = body.split()
            assert int(parent) == int(imported_by) == preloader
    finally:
        assert server.stop() == 0


def test_preloader_that_dies_is_respawned(tmp_path):
    app = scaling_app(tmp_path, 'processes = 2\nspawn_mode = "preload"')
    server = ServerProcess(app).wait_ready()
    try:
        first = pid_of(server.wait_for(r"preloader pid \d+ of app imported"))
        old_workers = children_of(first)
        os.kill(first, signal.SIGKILL)
        server.wait_for(rf"preloader pid {first} of app exited unexpectedly \(killed by SIGKILL\)")
        second = pid_of(server.wait_for(r"preloader pid \d+ of app imported", count=2))
        assert second != first
        for pid in old_workers:
            server.wait_for(rf"worker pid {pid} of app exited unexpectedly \(exit status "
                            r"unknown: its preloader had died\)")
        wait_until(lambda: len(children_of(second)) == 2, 20, "two workers of the new preloader")
        for _ in range(4):
            status, body = get(server.port, "/who")
            assert status == 200 and int(body.split()[1]) == second
    finally:
        assert server.stop() == 0


def test_restart_of_a_preload_pool_imports_the_new_code(tmp_path):
    app = scaling_app(tmp_path, 'processes = 2\nspawn_mode = "preload"')
    server = ServerProcess(app).wait_ready()
    try:
        first = pid_of(server.wait_for(r"preloader pid \d+ of app imported"))
        _, body = get(server.port, "/who")
        assert body.split()[2:] == [str(first).encode(), b"v1"]
        (app / "VERSION").write_text("v2\n")
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"generation 2 of app serves")
        second = pid_of(server.wait_for(r"preloader pid \d+ of app imported", count=2))
        assert second != first
        _, body = get(server.port, "/who")
        assert body.split()[2:] == [str(second).encode(), b"v2"]
        server.wait_for(rf"preloader pid {first} of app stopped")
        assert children_of(server.proc.pid) == [second]
    finally:
        assert server.stop() == 0


def test_preload_app_that_cannot_be_imported_stops_the_server_with_the_fix(tmp_path):
    app = scaling_app(tmp_path, 'processes = 2\nspawn_mode = "preload"')
    (app / "VERSION").unlink()  # the import reads it
    server = ServerProcess(app)
    assert server.proc.wait(60) != 0
    server.stop()
    assert "FileNotFoundError" in server.log
    assert re.search(r"preloader pid \d+ of app exited \(exit status 4\) before it had "
                     r"imported the app", server.log)
    assert ("[app] wsgi = 'app:application': the worker cannot import it (its error is "
            "above)") in server.log
    # One preloader tried, not one per worker slot.
    assert server.log.count("before it had imported the app") == 1


def test_preload_generation_that_cannot_import_leaves_the_old_one_serving(tmp_path):
    app = scaling_app(tmp_path, 'processes = 2\nspawn_mode = "preload"')
    server = ServerProcess(app).wait_ready()
    try:
        first = pid_of(server.wait_for(r"preloader pid \d+ of app imported"))
        (app / "VERSION").unlink()
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"FAILED: generation 2 cannot serve: .*generation 1 keeps serving")
        status, body = get(server.port, "/who")
        assert status == 200 and body.split()[2:] == [str(first).encode(), b"v1"]
        assert children_of(server.proc.pid) == [first]
    finally:
        assert server.stop() == 0


def test_preloader_and_its_workers_die_with_a_killed_supervisor(tmp_path):
    app = scaling_app(tmp_path, 'processes = 2\nspawn_mode = "preload"')
    server = ServerProcess(app).wait_ready()
    preloader = pid_of(server.wait_for(r"preloader pid \d+ of app imported"))
    left = [preloader, *children_of(preloader)]
    assert len(left) == 3
    server.kill()  # SIGKILL: no chance to stop anything itself
    wait_until(lambda: not any(alive(pid) for pid in left), 20,
               f"processes {left} gone after the supervisor")
