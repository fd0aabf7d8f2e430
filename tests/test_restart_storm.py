"""Restarts that lose nothing, on the bundled Django site: kept-alive clients
load every kind of page (the one that writes to the database and the store's
POST included) while the app is restarted five times in a row by each
trigger (a new trigger is one more entry in TRIGGERS), and while a slow
deploy step runs in both deploy modes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import ROOT, SAMPLE, ServerProcess, connect, copy_app, read_response

CLIENTS = 3  # threads, each with one kept-alive connection
RESTARTS = 5  # in a row, per trigger
SLOW_RESTARTS = 5  # per deploy mode with the slow deploy step, as for the triggers: 4-5 s each
SLOW_DEPLOY = 3  # seconds the slow deploy step sleeps before it migrates
HOLD = 1.5  # [deploy] hold in the exclusive case: below SLOW_DEPLOY, so some wait runs out

# path -> bytes every good answer holds
PAGES = {
    "/": b"<h1>Welcome</h1>",
    "/blog/": b"Hello from corral",
    "/store/": b"Fence post",
    "/bench/time": b"The time is",
    "/bench/db": b"The time is",  # stores a row first
    "/%D1%82%D0%B5%D1%81%D1%82/": b"cyrillic",
    "/media/site.css": b"--green: #2e7d50",  # from the front itself, not from a worker
}


def corral(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "corral", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def is_deploying_503(status: int, headers: dict, body: bytes) -> bool:
    """The answer docs/restarts.md promises while an exclusive deploy runs."""
    return (status == 503 and headers.get("retry-after") == "10"
            and b"Deployment in progress" in body)


class Client(threading.Thread):
    """One kept-alive connection doing the site's requests in turn until
    stopped: each page, and an order POSTed with its CSRF token then its
    thanks page.  Every answer is read to its end and checked.  Counts the
    good answers; anything else (an error, a reset, a close without
    `Connection: close`, a timeout, a wrong status or body) is a failure,
    except the documented exclusive-deploy 503 when `deploying_503_ok`."""

    def __init__(self, port: int, number: int, deploying_503_ok: bool = False) -> None:
        super().__init__(daemon=True)
        self.port, self.number, self.deploying_503_ok = port, number, deploying_503_ok
        self.answers = 0  # every whole answer, good or not
        self.ok = 0
        self.deploying_503 = 0
        self.orders = 0
        self.slowest = 0.0  # seconds, of a good answer: held requests show here
        self.failures: list[str] = []
        self.kinds: Counter = Counter()
        self.done = threading.Event()
        self.sock = None
        self.form: tuple[str, str, str] | None = None  # action, token, cookie

    # -- one exchange ---------------------------------------------------------

    def exchange(self, method: str, path: str, body: bytes = b"",
                 headers: str = "") -> tuple[int, dict, bytes] | None:
        """One request on the kept connection; None if it failed (counted)."""
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}"
        if body:
            head += ("Content-Type: application/x-www-form-urlencoded\r\n"
                     f"Content-Length: {len(body)}\r\n")
        started = time.monotonic()
        try:
            self.sock = self.sock or connect(self.port, timeout=30)
            self.sock.sendall(head.encode() + b"\r\n" + body)
            status, answer_headers, answer, _ = read_response(self.sock)
        except Exception as exc:  # every way a request can be lost
            kind = ("reset" if isinstance(exc, ConnectionResetError) else
                    "timeout" if isinstance(exc, TimeoutError) else
                    "closed" if isinstance(exc, ConnectionError) else type(exc).__name__)
            self.fail(kind, f"{method} {path}: {type(exc).__name__}: {exc}")
            return None
        self.answers += 1
        if answer_headers.get("connection", "").lower() == "close":
            self.close()  # said so: the next request opens a new one
        if self.deploying_503_ok and is_deploying_503(status, answer_headers, answer):
            self.deploying_503 += 1
            return None
        elapsed = time.monotonic() - started
        if status in (200, 302):
            self.slowest = max(self.slowest, elapsed)
        return status, answer_headers, answer

    def fail(self, kind: str, detail: str) -> None:
        self.kinds[kind] += 1
        self.failures.append(detail)
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def expect(self, method: str, path: str, status: int, marker: bytes, **kw) -> dict | None:
        answer = self.exchange(method, path, **kw)
        if answer is None:
            return None
        got, headers, body = answer
        if got != status or marker not in body:
            self.fail(f"status {got}" if got != status else "body",
                      f"{method} {path}: {got} {body[:120]!r}")
            return None
        self.ok += 1
        return headers | {"body": body}

    # -- the loop ---------------------------------------------------------------

    def order(self) -> None:
        if self.form is None:
            page = self.expect("GET", "/store/", 200, PAGES["/store/"])
            if page is None:
                return
            text = page["body"].decode()
            action = re.search(r'action="(/store/order/\d+/)"', text).group(1)
            token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', text).group(1)
            cookies = " ".join(page.get("set-cookie*", []))
            cookie = re.search(r"csrftoken=([^;]+)", cookies).group(1)
            self.form = (action, token, cookie)
        action, token, cookie = self.form
        email = f"storm{self.number}-{self.orders}@example.com"
        body = urllib.parse.urlencode({"quantity": 1, "email": email,
                                       "csrfmiddlewaretoken": token}).encode()
        placed = self.expect("POST", action, 302, b"", body=body,
                             headers=f"Cookie: csrftoken={cookie}\r\n")
        if placed is None:
            return
        self.orders += 1
        thanks = urllib.parse.urlsplit(placed["location"]).path
        self.expect("GET", thanks, 200, email.encode())

    def run(self) -> None:
        steps = [*PAGES, "order"]
        turn = self.number  # the clients start at different steps
        while not self.done.is_set():
            step = steps[turn % len(steps)]
            turn += 1
            if step == "order":
                self.order()
            else:
                self.expect("GET", step, 200, PAGES[step])
        self.close()


class Storm:
    """The clients together, and a restart counted while they run."""

    def __init__(self, server: ServerProcess, deploying_503_ok: bool = False) -> None:
        self.server = server
        self.clients = [Client(server.port, n, deploying_503_ok) for n in range(CLIENTS)]
        self.generation = 1
        self.during: list[int] = []  # answers within each restart

    def __enter__(self) -> Storm:
        for client in self.clients:
            client.start()
        self.wait_answers(10 * CLIENTS)  # all of them going before the first restart
        return self

    def __exit__(self, *exc) -> None:
        for client in self.clients:
            client.done.set()
        for client in self.clients:
            client.join(60)

    def answers(self) -> int:
        return sum(c.answers for c in self.clients)

    def wait_answers(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        target = self.answers() + count
        while self.answers() < target:
            assert time.monotonic() < deadline, f"the clients are stuck: {self.report()}"
            time.sleep(0.02)

    def restart(self, trigger) -> None:
        """One restart by `trigger`, waited for to its end: the new generation
        serves and the old one has stopped."""
        self.generation += 1
        number = self.generation
        before = self.answers()
        trigger(self.server, number)
        self.server.wait_for(rf"generation {number} of \S+ serves")
        self.during.append(self.answers() - before)
        self.server.wait_for(rf"generation {number - 1} of \S+ stopped")
        self.wait_answers(CLIENTS)  # the new generation has answered too

    def report(self) -> str:
        kinds = sum((c.kinds for c in self.clients), Counter())
        failures = [f for c in self.clients for f in c.failures][:5]
        return (f"ok {sum(c.ok for c in self.clients)}, answers {self.answers()}, "
                f"failures by kind {dict(kinds)}, first failures {failures}, "
                f"answers during each restart {self.during}")

    def failures(self) -> list[str]:
        return [f for c in self.clients for f in c.failures]


# -- the triggers: each asks for restart number `generation` -------------------

def by_sighup(server: ServerProcess, generation: int) -> None:
    server.proc.send_signal(signal.SIGHUP)


def by_corral_restart(server: ServerProcess, generation: int) -> None:
    # The command itself waits until the new generation serves.
    done = corral("restart", str(server.app_dir))
    assert done.returncode == 0, done.stderr
    assert f"generation {generation} serves" in done.stdout


def _newer_mtime(path: Path, generation: int) -> None:
    # The files are polled once a second by modification time: give each
    # change its own second, whatever the file system's clock granularity.
    stamp = (int(time.time()) + generation) * 10**9
    os.utime(path, ns=(stamp, stamp))


def by_restart_file(server: ServerProcess, generation: int) -> None:
    path = server.app_dir / "tmp" / "restart.txt"
    path.touch()
    _newer_mtime(path, generation)


def by_config_change(server: ServerProcess, generation: int) -> None:
    # An edit that keeps the file valid: the comment, and processes written
    # another way, so the new generation reads a file that really changed.
    path = server.app_dir / "corral.toml"
    text = re.sub(r"(?m)^# storm edit \d+\n", "", path.read_text())
    path.write_text(f"# storm edit {generation}\n{text}")
    _newer_mtime(path, generation)


def by_watched_file(server: ServerProcess, generation: int) -> None:
    # A code change that keeps the module valid, in a file [app] watch covers.
    path = server.app_dir / "blog" / "views.py"
    text = re.sub(r"(?m)^# storm edit \d+\n", "", path.read_text())
    path.write_text(f"{text}# storm edit {generation}\n")


@dataclass
class Trigger:
    ask: Callable[[ServerProcess, int], None]
    logged: str  # the log line of each restart it asks for
    app: str = ""  # [app] keys it needs
    armed: str = ""  # the log line after which it works


TRIGGERS = {
    "SIGHUP": Trigger(by_sighup, r"SIGHUP received: restarting"),
    "corral restart": Trigger(by_corral_restart, r"\(corral restart\): starting generation"),
    "restart file": Trigger(by_restart_file, r"tmp/restart.txt touched: restarting"),
    "config change": Trigger(by_config_change, r"corral.toml changed: restarting"),
    "watched file": Trigger(by_watched_file, r"watch: blog/views.py changed: restarting",
                            app='watch = ["**/*.py"]\n', armed=r"watching .* for changes to"),
}


def sample_site(tmp_path: Path, deploy: str = "", app_keys: str = "") -> Path:
    app = copy_app(SAMPLE, tmp_path / "site")
    config = app / "corral.toml"
    text = config.read_text().replace("processes = 2\n", "processes = 2\n" + app_keys)
    config.write_text(text.replace('file = "deploy.py"\n', deploy or 'file = "deploy.py"\n'))
    return app


def check_status(app: Path, generation: int) -> None:
    status = json.loads(corral("status", str(app), "--json").stdout)
    assert status["state"] == "ready" and status["generation"] == generation
    assert {w["generation"] for w in status["workers"]} == {generation}
    assert len(status["workers"]) == 2 and status["retiring"] == []
    assert status["last_deploy"]["ok"] and status["last_deploy"]["generation"] == generation


@pytest.mark.parametrize("trigger", list(TRIGGERS))
def test_five_restarts_in_a_row_lose_no_request(tmp_path, trigger):
    trigger = TRIGGERS[trigger]
    app = sample_site(tmp_path, app_keys=trigger.app)
    (app / "tmp").mkdir()
    (app / "tmp" / "restart.txt").write_text("")  # present at start: no restart for it
    server = ServerProcess(app).wait_ready()
    try:
        if trigger.armed:
            server.wait_for(trigger.armed)
        with Storm(server) as storm:
            for _ in range(RESTARTS):
                storm.restart(trigger.ask)
        assert storm.failures() == [], storm.report()
        assert all(n > 0 for n in storm.during), storm.report()  # served during each
        assert len(re.findall(trigger.logged, server.log)) == RESTARTS
        assert f"generation {RESTARTS + 2}" not in server.log  # one restart per ask
        assert "FAILED" not in server.log
        assert sum(c.orders for c in storm.clients) > 0
        check_status(app, RESTARTS + 1)
        deploy_log = (app / "log" / "deploy.log").read_text()
        assert deploy_log.count("deploy step finished: exit status 0") == RESTARTS + 1
    finally:
        assert server.stop() == 0


SLOW_DEPLOY_FILE = f"""\
# A deploy step that takes a while, as a long migration would, then the site's own.
import runpy
import time

time.sleep({SLOW_DEPLOY})
runpy.run_path("deploy.py", run_name="__main__")
"""


def test_slow_deploy_step_old_generation_serves_meanwhile(tmp_path):
    app = sample_site(tmp_path, 'file = "slow_deploy.py"\n')
    (app / "slow_deploy.py").write_text(SLOW_DEPLOY_FILE)
    server = ServerProcess(app).wait_ready()
    try:
        with Storm(server) as storm:
            for _ in range(SLOW_RESTARTS):
                started = time.monotonic()
                storm.restart(by_sighup)
                assert time.monotonic() - started >= SLOW_DEPLOY
        assert storm.failures() == [], storm.report()
        # Generation 1 served through every slow deploy step: many answers each.
        assert all(n >= 20 for n in storm.during), storm.report()
        check_status(app, SLOW_RESTARTS + 1)
    finally:
        assert server.stop() == 0


def test_slow_exclusive_deploy_holds_requests_or_answers_the_documented_503(tmp_path):
    app = sample_site(tmp_path, f'file = "slow_deploy.py"\nexclusive = true\nhold = {HOLD}\n')
    (app / "slow_deploy.py").write_text(SLOW_DEPLOY_FILE)
    server = ServerProcess(app).wait_ready()
    try:
        with Storm(server, deploying_503_ok=True) as storm:
            for _ in range(SLOW_RESTARTS):
                storm.restart(by_sighup)
        # Nothing reset, cut or wrong: every answer that is not good is the
        # 503 with Retry-After and the "Deployment in progress" page.
        assert storm.failures() == [], storm.report()
        assert all(n > 0 for n in storm.during), storm.report()
        # The deploy step outlasts [deploy] hold: some waits ran out (503) ...
        assert sum(c.deploying_503 for c in storm.clients) >= SLOW_RESTARTS, storm.report()
        # ... and a request that came late enough was held, then served.
        assert max(c.slowest for c in storm.clients) > 0.5, storm.report()
        assert server.log.count("stops first; requests wait") == SLOW_RESTARTS
        check_status(app, SLOW_RESTARTS + 1)
    finally:
        assert server.stop() == 0
