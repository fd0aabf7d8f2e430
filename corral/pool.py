"""The pool and its supervisor: an app's worker processes, their sockets and
links, the deploy step, respawning, and the queue requests wait in.

Each worker gets its own listening unix socket, passed as file descriptor 0,
and the front keeps one FastCGI connection (a link) to it, so the pool always
knows which worker is free and which pid served a request.  A worker that
dies is reaped and replaced; the request it was serving gets a 502 naming
its pid and the cause; every other request is unaffected.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path

from corral.config import AppConfig
from corral.deploy import DeployResult, run_deploy
from corral.front.errors import GatewayError, Unavailable
from corral.front.upstream import Link
from corral.worker import EXIT_APP_LOAD_ERROR

log = logging.getLogger("corral.error")

DEPLOYING_PAGE = ("<!doctype html><title>Deployment in progress</title>"
                  "<h1>Deployment in progress</h1>"
                  "<p>This site is being updated. Please try again in a moment.</p>\n")
FAILED_PAGE = ("<!doctype html><title>Service unavailable</title>"
               "<h1>Service unavailable</h1>"
               "<p>This site cannot serve requests right now.</p>\n")
QUICK_EXIT = 2.0  # a worker that dies sooner than this after spawning is failing to boot
MAX_BACKOFF = 10.0
KILL_GRACE = 5.0  # after SIGTERM at stop, seconds before SIGKILL


def describe_exit(status: int | None) -> str:
    if status is None:
        return "still running"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


class Waiter:
    """A request waiting for a free worker: `callback(link, error)` is called
    exactly once, with a link or with the Unavailable error that ends the wait."""

    __slots__ = ("callback", "timer", "done")

    def __init__(self, callback) -> None:
        self.callback = callback
        self.timer: asyncio.TimerHandle | None = None
        self.done = False

    def settle(self, link: Link | None, error: Unavailable | None = None) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        self.callback(link, error)


class WorkerProcess:
    """The supervisor's record of one worker."""

    def __init__(self, pool: Pool, slot: int, generation: int) -> None:
        self.pool = pool
        self.slot = slot
        self.generation = generation
        self.pid = 0
        self.proc: asyncio.subprocess.Process | None = None
        name = f"{pool.config.name}-{generation}-{slot}-{id(self):x}.sock"
        self.socket_path = pool.run_dir / name
        self.link: Link | None = None
        self.state = "booting"  # booting, idle, busy, stopping, dead
        self.spawned = time.monotonic()
        self.requests = 0

    def request_done(self, link: Link) -> None:
        self.requests += 1
        self.pool.release(link)


class Pool:
    """The workers of one app, all of one generation."""

    def __init__(self, config: AppConfig, run_dir: Path) -> None:
        self.config = config
        self.run_dir = run_dir
        self.generation = 1
        self.state = "starting"  # starting, deploying, ready, failed, stopping
        self.failure = ""
        self.workers: dict[int, WorkerProcess] = {}  # by slot
        self.idle: list[Link] = []
        self.waiters: deque[Waiter] = deque()
        self.deployed: asyncio.Future | None = None
        self.fatal: asyncio.Future | None = None  # set when the app cannot load at all
        self.last_deploy: DeployResult | None = None
        self.quick_exits = 0
        self.ever_ready = False
        self.tasks: set[asyncio.Task] = set()
        self.env = self._worker_env()

    def _worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.config.env)
        inherited = os.environ.get("PYTHONPATH")
        if inherited:
            env["PYTHONPATH"] = self.config.env["PYTHONPATH"] + os.pathsep + inherited
        return env

    def _task(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Spawn the workers, run the deploy step meanwhile, and open for
        requests once it has succeeded.  Returns when the pool is ready or
        has failed (see .state and .failure)."""
        loop = asyncio.get_running_loop()
        self.deployed = loop.create_future()
        self.fatal = loop.create_future()
        self.state = "deploying"
        spawns = [self._task(self.spawn(slot)) for slot in range(self.config.processes)]
        if self.config.deploy.argv:
            self.last_deploy = await run_deploy(
                self.config.deploy, self.config.root, self.env, self.generation,
                self.config.name)
            if not self.last_deploy.ok:
                self.fail(f"deploy step failed ({self.last_deploy.describe()}), "
                          f"see {self.last_deploy.log}")
                return
        # Ready means answering: wait for the first workers to import the
        # app (each spawn ends at readiness, exit or its boot timeout).
        await asyncio.wait(spawns)
        if self.state == "deploying":
            self.state = "ready"
            self.deployed.set_result(True)
            self._serve_waiters()

    def fail(self, reason: str) -> None:
        self.state = "failed"
        self.failure = reason
        if not self.deployed.done():
            self.deployed.set_result(False)
        self._refuse_waiters(Unavailable(reason, retry_after=30, page=FAILED_PAGE))

    def _refuse_waiters(self, error: Unavailable) -> None:
        while self.waiters:
            self.waiters.popleft().settle(None, error)

    async def stop(self) -> None:
        """Stop every worker: SIGTERM (they finish their request), then SIGKILL."""
        self.state = "stopping"
        self._refuse_waiters(Unavailable("server is stopping"))
        for task in list(self.tasks):
            task.cancel()
        procs = [w.proc for w in self.workers.values() if w.proc is not None]
        for worker in self.workers.values():
            worker.state = "stopping"
            if worker.proc is not None and worker.proc.returncode is None:
                worker.proc.send_signal(signal.SIGTERM)
        if procs:
            done, pending = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in procs], timeout=KILL_GRACE)
            for worker in self.workers.values():
                if worker.proc is not None and worker.proc.returncode is None:
                    log.warning("worker pid %s did not stop in %.0f s: SIGKILL",
                                worker.pid, KILL_GRACE)
                    worker.proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=KILL_GRACE)
        for worker in self.workers.values():
            if worker.link is not None and worker.link.transport is not None:
                worker.link.transport.close()
            try:
                worker.socket_path.unlink()
            except FileNotFoundError:
                pass

    # -- workers -------------------------------------------------------------

    async def spawn(self, slot: int, delay: float = 0.0) -> None:
        """Start the worker of `slot` and wait until it is ready."""
        if delay:
            await asyncio.sleep(delay)
        if self.state == "stopping":
            return
        config = self.config
        worker = WorkerProcess(self, slot, self.generation)
        self.workers[slot] = worker
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(worker.socket_path))
            os.chmod(worker.socket_path, 0o600)
            listener.listen(64)
            worker.proc = await asyncio.create_subprocess_exec(
                config.python, "-m", "corral.worker", config.wsgi,
                "--mount", config.mount, "--parent", str(os.getpid()),
                stdin=listener.fileno(), stdout=sys.stderr.fileno(),
                cwd=config.root, env=self.env, start_new_session=True)
        except OSError as exc:
            log.error("cannot spawn a worker for %s: %s", config.name, exc)
            self._task(self.spawn(slot, self._backoff()))
            return
        finally:
            listener.close()
        worker.pid = worker.proc.pid
        worker.spawned = time.monotonic()
        log.info("spawned worker pid %s for %s (slot %s)", worker.pid, config.name, slot)
        exited = self._task(self.reap(worker))
        await self.connect(worker, exited)

    async def connect(self, worker: WorkerProcess, exited: asyncio.Task | None = None) -> None:
        """Open the link to `worker` and wait for its readiness answer."""
        loop = asyncio.get_running_loop()
        try:
            _, link = await loop.create_unix_connection(
                lambda: Link(worker, self.link_lost), str(worker.socket_path))
        except OSError as exc:
            log.error("cannot connect to worker pid %s: %s", worker.pid, exc)
            return  # reap() handles the process
        worker.link = link
        wait = {link.ready} | ({exited} if exited else set())
        done, _ = await asyncio.wait(wait, timeout=self.config.boot_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if link.ready.done() and not link.ready.exception():
            if worker.state == "booting":
                log.info("worker pid %s ready in %.2f s", worker.pid,
                         time.monotonic() - worker.spawned)
            self.quick_exits = 0
            self.ever_ready = True
            self.release(link)
        elif not done:
            log.error("worker pid %s did not become ready in %.0f s: killing it",
                      worker.pid, self.config.boot_timeout)
            worker.proc.kill()
        elif link.ready.done():
            link.ready.exception()  # consumed; reap() reports the exit

    async def reap(self, worker: WorkerProcess) -> None:
        """Wait for the worker to exit, report why, and replace it."""
        status = await worker.proc.wait()
        previous = worker.state
        worker.state = "dead"
        if self.state == "stopping" or previous == "stopping":
            log.info("worker pid %s stopped (%s)", worker.pid, describe_exit(status))
            return
        lived = time.monotonic() - worker.spawned
        if status == EXIT_APP_LOAD_ERROR and previous == "booting":
            message = (f"{self.config.source}: [app] wsgi = {self.config.wsgi!r}: "
                       "the worker cannot import it (its error is above). Fix: correct "
                       "the module path, or PYTHONPATH in [env]")
            log.error("worker pid %s could not load the app", worker.pid)
            if not self.ever_ready and not self.fatal.done():
                self.fatal.set_result(message)
                return
        else:
            log.error("worker pid %s of %s exited unexpectedly (%s) after %.1f s",
                      worker.pid, self.config.name, describe_exit(status), lived)
        if lived < QUICK_EXIT or previous == "booting":
            self.quick_exits += 1
        if self.workers.get(worker.slot) is worker:
            self._task(self.spawn(worker.slot, self._backoff()))

    def _backoff(self) -> float:
        if self.quick_exits == 0:
            return 0.0
        return min(0.1 * 2 ** (self.quick_exits - 1), MAX_BACKOFF)

    def link_lost(self, link: Link) -> None:
        worker = link.worker
        if link in self.idle:
            self.idle.remove(link)
        if worker.link is link:
            worker.link = None
        if link.handler is not None:
            self._task(self._report_lost_request(link))
        elif (worker.state == "busy" and self.state != "stopping"
              and worker.proc is not None and worker.proc.returncode is None):
            # The worker dropped the connection after cutting a response
            # short; it is alive and accepting again, so reconnect.
            worker.state = "booting"
            self._task(self.connect(worker))

    async def _report_lost_request(self, link: Link) -> None:
        worker = link.worker
        handler, link.handler = link.handler, None
        try:
            await asyncio.wait_for(asyncio.shield(worker.proc.wait()), 0.25)
        except TimeoutError:
            pass
        cause = describe_exit(worker.proc.returncode)
        error = GatewayError(
            f"worker pid {worker.pid} closed the connection while serving the request ({cause})")
        if link.answered:
            handler.upstream_failed(error)
        else:
            handler.upstream_retry(error)
        if worker.proc.returncode is None and self.state != "stopping":
            worker.state = "booting"
            await self.connect(worker)

    # -- dispatch ------------------------------------------------------------

    def release(self, link: Link) -> None:
        """`link` is free: give it to the first waiting request, or keep it."""
        worker = link.worker
        if link.closed or worker.state in ("stopping", "dead"):
            return
        if self.state == "ready" and self.waiters and link.alive():
            worker.state = "busy"
            self.waiters.popleft().settle(link)
            return
        worker.state = "idle"
        self.idle.append(link)

    def _serve_waiters(self) -> None:
        while self.idle and self.waiters:
            self.release(self.idle.pop())

    def acquire_nowait(self) -> Link | None:
        """A free link at once, or None (then use wait_for_link)."""
        if self.state != "ready" or self.waiters:
            return None
        idle = self.idle
        while idle:
            link = idle.pop()
            if link.alive():
                link.worker.state = "busy"
                return link
            # Dead while idle: connection_lost() will follow and reconnect or
            # respawn; this request goes to another worker or waits.
        return None

    def wait_for_link(self, callback) -> None:
        """Queue a request: `callback(link, error)` runs once, with a free link
        or with the 503 that ends the wait (queue full, wait too long, deploy
        step still running or failed, server stopping)."""
        waiter = Waiter(callback)
        state = self.state
        if state == "failed":
            waiter.settle(None, Unavailable(self.failure, retry_after=30, page=FAILED_PAGE))
            return
        if state == "stopping":
            waiter.settle(None, Unavailable("server is stopping"))
            return
        if state == "ready":
            link = self.acquire_nowait()
            if link is not None:
                waiter.settle(link)
                return
        if len(self.waiters) >= self.config.queue:
            waiter.settle(None, Unavailable("request queue is full", retry_after=1))
            return
        wait = self.config.queue_timeout if state == "ready" else self.config.deploy.hold
        waiter.timer = asyncio.get_running_loop().call_later(wait, self._expire, waiter)
        self.waiters.append(waiter)

    def _expire(self, waiter: Waiter) -> None:
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass
        if self.state in ("starting", "deploying"):
            error = Unavailable("deploy step in progress", retry_after=10, page=DEPLOYING_PAGE)
        else:
            error = Unavailable(
                f"no worker became free within {self.config.queue_timeout:g} s", retry_after=5)
        waiter.timer = None
        waiter.settle(None, error)
