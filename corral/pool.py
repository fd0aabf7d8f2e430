"""The pool and its supervisor: an app's worker processes, their sockets and
links, the deploy step, respawning, and the queue requests wait in.

Each worker gets its own listening socket, passed as file descriptor 0 (a
unix socket, or a TCP port on 127.0.0.1 with the tcp transport), and the
front keeps one FastCGI connection (a link) to it, so the pool always knows
which worker is free and which pid served a request.  A worker that dies is
reaped and replaced; the request it was serving gets a 502 naming its pid
and the cause; every other request is unaffected.

A request that runs over [app] request_timeout gets 504; its worker is
asked to stop, killed after a grace period and replaced.  Workers are
recycled (max_requests, max_rss, max_lifetime) by starting the replacement
first.  A Supervisor holds an app's generations: a restart starts a new
Pool beside the current one and switches to it once it is ready (see
docs/restarts.md).

The engine decides what a worker runs: corral's own `python -m corral.worker`,
or any FastCGI program (php-cgi, ...) under the same supervision.  An engine
with an `address` is a server someone else runs: the pool only keeps
`processes` links to it and reconnects them, and spawns nothing.

With a range ([app] processes = "MIN-MAX") the pool starts MIN workers, adds
one while requests wait and none is free (never more than are waiting, with
the crash back-off), and stops workers idle for [app] idle_timeout, down to
MIN; at MIN 0 a generation is ready once its deploy step has succeeded, and
its first request waits in the queue while a worker starts.  With [app]
spawn_mode = "preload" workers are forked by the generation's preloader
(corral/preload.py) instead of started fresh, under the same supervision.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from corral import metrics
from corral.config import AppConfig
from corral.deploy import DeployResult, run_deploy
from corral.front.errors import GatewayError, GatewayTimeout, Unavailable
from corral.front.upstream import Link, TimedOut
from corral.preload import PRELOADER_GONE, Preloader
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
RETRY_WINDOW = 1.0  # seconds after dispatch in which a silent worker death is retried
KILL_GRACE = 5.0  # after SIGTERM at stop, seconds before SIGKILL
VALUES_GRACE = 2.0  # seconds a FastCGI program gets to answer GET_VALUES (see connect)
CONNECT_RETRY = 0.05  # seconds between tries to reach a program that binds its own port
PR_SET_PDEATHSIG = 1
STACK_SIGNAL = signal.SIGUSR1  # our worker logs the stuck request's stack, then exits
WATCH_EVERY = 1.0  # seconds between checks of idle workers' [app] max_lifetime
CRASH_LIMIT = 5  # quick deaths in a row after which a new generation counts as failed

LIMIT_KEYS = ("request_timeout", "timeout_grace", "max_requests", "max_requests_jitter",
              "max_rss", "max_lifetime")


@dataclass(frozen=True)
class Limits:
    """What bounds a worker: its request time and when it is recycled."""

    request_timeout: float = 0.0
    timeout_grace: float = 5.0
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_rss: int = 0  # MiB
    max_lifetime: float = 0.0


def read_limits(config: AppConfig) -> Limits:
    """The [app] limits of `config`."""
    return Limits(**{key: config.app[key] for key in LIMIT_KEYS})


def read_rss(pid: int) -> int | None:
    """Resident memory of `pid` in KiB (VmRSS), or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _die_with_us(parent: int):
    """A preexec_fn that makes the kernel send SIGTERM to an engine's program
    when the supervisor dies, even by SIGKILL: php-cgi, unlike our own
    worker (`--parent`), cannot ask for that itself."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork
    except (OSError, AttributeError):
        return None

    def in_child() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(0)
    return in_child


def describe_exit(status: int | None) -> str:
    if status is None:
        return "still running"
    if status == PRELOADER_GONE:
        return "exit status unknown: its preloader had died"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def find_script(docroot: bytes, index: bytes, rest: bytes) -> tuple[bytes, bytes]:
    """The script (as "/a/b.php") and PATH_INFO for the path `rest` below the
    document root, the way web servers serve PHP:

    1. The longest leading part of the path that is a file with the index's
       suffix (.php) is the script; what follows is PATH_INFO.  Other files
       are never handed to the engine to run: php-cgi would execute a .txt.
    2. A folder gets its index file, if it has one.
    3. Anything else goes to the index of the document root (a "front
       controller"), with the whole path as PATH_INFO.
    A "." or ".." segment never names a file here, so no path leaves the root.
    """
    fallback = (b"/" + index, rest)
    segments = rest.split(b"/")[1:] if rest.startswith(b"/") else [rest] if rest else []
    if b"." in segments or b".." in segments:
        return fallback
    suffix = os.path.splitext(index)[1]
    here = b""
    for i, segment in enumerate(segments):
        if not segment:
            break  # "//" or a trailing "/": folders only from here
        here += b"/" + segment
        full = docroot + here
        if os.path.isfile(full):
            if suffix and not segment.endswith(suffix):
                return fallback
            tail = segments[i + 1:]
            return here, b"/" + b"/".join(tail) if tail else b""
        if not os.path.isdir(full):
            return fallback
    if os.path.isfile(docroot + here + b"/" + index):
        return here + b"/" + index, b""
    return fallback


class Waiter:
    """A request waiting for a free worker: `callback(link, error)` is called
    exactly once, with a link or with the Unavailable error that ends the wait."""

    __slots__ = ("callback", "deadline", "done", "queued", "behind_ok")

    def __init__(self, callback) -> None:
        self.callback = callback
        self.deadline = 0.0  # loop time its wait ends (see Pool._expire_due)
        self.done = False
        self.behind_ok = False  # may go behind a busy worker's request (a small body)
        self.queued = time.monotonic()  # for status and metrics: the oldest wait

    def settle(self, link: Link | None, error: Unavailable | None = None) -> None:
        if self.done:
            return
        self.done = True
        self.callback(link, error)


class WorkerProcess:
    """The supervisor's record of one worker."""

    def __init__(self, pool: Pool, slot: int, generation: int) -> None:
        self.pool = pool
        self.slot = slot
        self.generation = generation
        self.pid = 0
        self.proc: asyncio.subprocess.Process | None = None
        pool.spawned += 1  # a new name each time: never a dead worker's socket
        name = f"{pool.config.name}-{generation}-{slot}-{pool.spawned}.sock"
        self.socket_path = pool.run_dir / name
        # Where its link connects: the socket path, or (host, port) for tcp.
        self.address: str | tuple[str, int] = str(self.socket_path)
        self.port = 0  # its TCP port, with the tcp transport
        self.link: Link | None = None
        # booting, idle, busy, retiring (leaves once its request is done),
        # stopping, dead
        self.state = "booting"
        self.spawned = time.monotonic()
        self.requests = 0
        limits = pool.limits
        self.max_requests = limits.max_requests + (
            random.randint(0, limits.max_requests_jitter) if limits.max_requests else 0)
        self.leaving = ""  # why it is being replaced ("" while it serves)
        self.refill = False  # its replacement starts when it has exited
        self.rss = 0  # KiB, as last read after a request
        self.idle_since = self.spawned  # when it last became free, for idle_timeout

    def request_started(self, link: Link) -> None:
        """A request began on `link` (at link.sent_at).  Nothing to arm: the
        pool looks at every busy link's age a few times a second (see
        Pool._watch_timeouts), which costs far less than a timer each."""

    def request_done(self, link: Link) -> None:
        self.requests += 1
        self.pool.request_done(self)
        self.pool.release(link, fresh=True)



class Pool:
    """The workers of one app, all of one generation."""

    def __init__(self, config: AppConfig, run_dir: Path, generation: int = 1) -> None:
        self.config = config
        self.run_dir = run_dir
        self.generation = generation
        self.limits = read_limits(config)
        # [deploy] exclusive: the deploy step runs alone, before any worker.
        self.exclusive = config.deploy.exclusive
        self.crash_looping = False  # marked failed because its workers keep dying
        # starting, deploying, ready, failed; then retiring (an old
        # generation finishing its requests) or stopping
        self.state = "starting"
        self.failure = ""
        self.workers: dict[int, WorkerProcess] = {}  # by slot
        # A recycled worker keeps serving until the replacement in its slot
        # is ready: slot -> the worker on its way out.
        self.outgoing: dict[int, WorkerProcess] = {}
        self.leaving: set[WorkerProcess] = set()  # out of rotation, not yet exited
        self.progress = asyncio.Event()  # set when a worker becomes ready or exits
        self.idle: list[Link] = []
        self.waiters: deque[Waiter] = deque()
        self._queue_timer: asyncio.TimerHandle | None = None  # see _expire_due
        self.spawned = 0  # workers spawned so far, for unique socket names
        # Kept: asyncio.get_running_loop() costs a getpid() system call, and
        # the queue asks for the loop's time on every wait.
        self.loop = loop = asyncio.get_running_loop()
        self.deployed: asyncio.Future = loop.create_future()
        self.fatal: asyncio.Future = loop.create_future()  # set when the app cannot load
        self.last_deploy: DeployResult | None = None
        self.quick_exits = 0
        self.ever_ready = False
        self.tasks: set[asyncio.Task] = set()
        self.engine = config.engine
        self.attach_failures: dict[int, int] = {}  # by slot, for an address engine
        self.env = self._worker_env()
        # [app] processes = "MIN-MAX" (MIN = MAX = config.processes if fixed).
        self.fewest = config.min_processes
        self.idle_timeout = config.app["idle_timeout"]
        # Only our own worker takes requests behind others (its links say so).
        self.behind_limit = config.app.get("behind_limit", 0.0)
        self.growing: set[int] = set()  # slots a scale-up is starting a worker in
        self.preload = config.engine.builtin and config.app["spawn_mode"] == "preload"
        self.preloader: Preloader | None = None  # started by the first fork
        self.metrics = metrics.for_app(config.name)
        self.run_as = config.run_as  # [app] user and group, when corral runs as root
        if self.run_as is not None:
            self.run_as.adjust_env(self.env, config.env)

    def _worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.config.engine.env)  # the engine's defaults; the app's [env] wins
        env.update(self.config.env)
        inherited = os.environ.get("PYTHONPATH")
        if inherited:
            env["PYTHONPATH"] = self.config.env["PYTHONPATH"] + os.pathsep + inherited
        return env

    @property
    def closing(self) -> bool:
        """Stopping, or an old generation finishing: nothing is respawned."""
        return self.state in ("stopping", "retiring")

    def all_workers(self) -> list[WorkerProcess]:
        """Every worker process of the pool: in a slot, outgoing or leaving."""
        found = {id(w): w for w in self.workers.values()}
        for worker in [*self.outgoing.values(), *self.leaving]:
            found.setdefault(id(worker), worker)
        return list(found.values())

    def ready_count(self) -> int:
        return sum(w.state in ("idle", "busy") for w in self.workers.values())

    def count(self) -> dict:
        """For status: the [app] processes range, how many workers run now,
        and how they are spawned."""
        return {"min": self.fewest, "max": self.config.processes,
                "now": sum(w.state != "dead" for w in self.workers.values()),
                "spawn_mode": "preload" if self.preload else "direct",
                "preloader": self.preloader.pid if self.preloader else None}

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
        self.state = "deploying"
        alone = self.exclusive and self.config.deploy.argv
        spawns = [] if alone else [self._task(self.spawn(slot))
                                   for slot in range(self.fewest)]
        if self.config.deploy.argv:
            self.last_deploy = await run_deploy(
                self.config.deploy, self.config.root, self.env, self.generation,
                self.config.name, self.run_as)
            if not self.last_deploy.ok:
                self.fail(f"deploy step failed ({self.last_deploy.describe()}), "
                          f"see {self.last_deploy.log}")
                return
        if alone:
            spawns = [self._task(self.spawn(slot)) for slot in range(self.fewest)]
        # Ready means answering: wait for the first workers to import the
        # app (each spawn ends at readiness, exit or its boot timeout).  With
        # MIN 0 there are none: the deploy step's success is readiness.
        if spawns:
            await asyncio.wait(spawns)
        if self.state == "deploying":
            self.state = "ready"
            self.deployed.set_result(True)
            self._serve_waiters()
            self._scale_up()
            if self.limits.max_lifetime:
                self._task(self._watch_lifetimes())
            if self.limits.request_timeout:
                self._task(self._watch_timeouts())
            if self.fewest < self.config.processes:
                self._task(self._watch_idle())

    async def wait_all_ready(self, timeout: float) -> str:
        """Wait until every slot has a ready worker; "" then, else why not
        (the pool failed, its workers keep dying, or `timeout` passed)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.state == "failed":
                return self.failure
            if self.quick_exits >= CRASH_LIMIT:
                return f"its workers keep dying ({self.quick_exits} quick exits in a row)"
            if self.ready_count() >= self.fewest:
                return ""
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return (f"{self.ready_count()} of {self.fewest} workers ready "
                        f"after {timeout:.0f} s")
            self.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.progress.wait(), remaining)

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
        workers = self.all_workers()
        procs = [w.proc for w in workers if w.proc is not None]
        for worker in workers:
            # Idle links go first: php-cgi waits for the next request on a kept
            # connection and heeds SIGTERM only once that connection ends.
            if worker.state == "idle" and worker.link is not None and not worker.link.closed:
                worker.link.transport.close()
            worker.state = "stopping"
            self._signal(worker, signal.SIGTERM)
        if procs:
            done, pending = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in procs], timeout=KILL_GRACE)
            for worker in workers:
                if worker.proc is not None and worker.proc.returncode is None:
                    log.warning("worker pid %s did not stop in %.0f s: SIGKILL",
                                worker.pid, KILL_GRACE)
                    self._signal(worker, signal.SIGKILL)
            if pending:
                await asyncio.wait(pending, timeout=KILL_GRACE)
        if self.preloader is not None:  # last: it reports its workers' exits
            preloader, self.preloader = self.preloader, None
            await preloader.stop()
        for worker in workers:
            if worker.link is not None and worker.link.transport is not None:
                worker.link.transport.close()
            try:
                worker.socket_path.unlink()
            except FileNotFoundError:
                pass

    # -- workers -------------------------------------------------------------

    def _signal(self, worker: WorkerProcess, sig: int) -> None:
        """Signal the worker's whole process group (it leads its own session),
        so that children a FastCGI program forks (PHP_FCGI_CHILDREN) go too."""
        if worker.proc is None or worker.proc.returncode is not None:
            return  # not started, or reaped: its pid may be someone else's now
        try:
            os.killpg(worker.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # the group leader is gone; its pid still ours
            worker.proc.send_signal(sig)

    def _listen(self, worker: WorkerProcess) -> socket.socket | None:
        """The listening socket the worker gets as fd 0, or None for a program
        that binds the port it is given ({port}); sets worker.address."""
        engine = self.engine
        if engine.transport == "unix":
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(str(worker.socket_path))
                os.chmod(worker.socket_path, 0o600)
                listener.listen(64)
            except OSError:
                listener.close()
                raise
            return listener
        taken = {w.port for w in self.workers.values() if w is not worker and w.state != "dead"}
        low, high = engine.ports or (0, 0)
        for port in range(low, high + 1):
            if port and port in taken:
                continue
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                # Accepted connections inherit it: the worker's small writes
                # (a head, then a body) must not wait for delayed ACKs.
                listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                listener.bind(("127.0.0.1", port))
            except OSError as exc:
                listener.close()
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
            worker.port = listener.getsockname()[1]
            worker.address = ("127.0.0.1", worker.port)
            if engine.listens_itself:
                # Only a probe: the program binds the port itself.  Someone
                # else may take it in between; the program then exits and its
                # respawn tries the next free port.
                listener.close()
                return None
            listener.listen(64)
            return listener
        raise OSError(errno.EADDRINUSE, f"no free port in {low}-{high} on 127.0.0.1")

    def _preexec(self):
        """What runs in a worker's child before exec: the switch to [app]
        user, and for other engines the parent-death signal (after the
        switch, which clears it)."""
        then = None if self.engine.builtin else _die_with_us(os.getpid())
        return self.run_as.preexec(then) if self.run_as is not None else then

    def _argv(self, worker: WorkerProcess) -> list[str]:
        config = self.config
        if self.engine.builtin:
            return [config.python, "-m", "corral.worker", config.wsgi,
                    "--mount", config.mount, "--parent", str(os.getpid())]
        return [arg.replace("{port}", str(worker.port)) for arg in self.engine.command]

    async def spawn(self, slot: int, delay: float = 0.0) -> None:
        """Start the worker of `slot` and wait until it is ready."""
        if delay:
            await asyncio.sleep(delay)
        if self.closing:
            return
        if self.engine.address is not None:
            await self.attach(slot)
            return
        config = self.config
        worker = WorkerProcess(self, slot, self.generation)
        self.workers[slot] = worker
        listener = None
        try:
            listener = self._listen(worker)
            if self.preload:
                worker.proc = await self._fork(listener)
            else:
                worker.proc = await asyncio.create_subprocess_exec(
                    *self._argv(worker),
                    stdin=listener.fileno() if listener else subprocess.DEVNULL,
                    stdout=sys.stderr.fileno(), cwd=config.root, env=self.env,
                    start_new_session=True, preexec_fn=self._preexec())
        except OSError as exc:
            worker.state = "dead"
            self.quick_exits += 1
            program = self._argv(worker)[0] if not self.preload else "the preloader"
            who = (f" as user {self.run_as.user} ([app] user)" if self.run_as is not None
                   else "")
            message = (f"{config.source}: cannot start {program}{who}: {exc.strerror}. Fix: "
                       "make the interpreter and the app folder readable and executable "
                       "by that user (a virtual environment outside /root, say), or "
                       "change [app] user" if who else
                       f"{config.source}: cannot start {program}: {exc.strerror}")
            log.error("cannot spawn a worker for %s: %s", config.name, message)
            if not self.ever_ready and not self.fatal.done():
                # Nothing has served and nothing will start: say so now
                # (the server stops at its first start) rather than loop.
                self.fatal.set_result(message)
                self.fail(f"its workers cannot be started ({exc.strerror})")
                return
            if self.quick_exits >= CRASH_LIMIT and self.state == "ready" \
                    and not self.ready_count():
                self.crash_looping = True
                self.fail(f"its workers cannot be started ({exc.strerror})")
            self._task(self.spawn(slot, self._backoff()))
            return
        finally:
            if listener is not None:
                listener.close()
        worker.pid = worker.proc.pid
        if worker.proc.returncode is not None:
            # The preloader could not fork it (it cannot import the app, or
            # died): reported and retried like a worker that died booting.
            await self.reap(worker)
            return
        worker.spawned = time.monotonic()
        self.metrics.worker_spawned()
        where = f" on 127.0.0.1:{worker.port}" if worker.port else ""
        log.info("spawned worker pid %s for %s (slot %s)%s", worker.pid, config.name,
                 slot, where)
        exited = self._task(self.reap(worker))
        await self.connect(worker, exited)

    async def _fork(self, listener: socket.socket):
        """A worker forked by this generation's preloader, which starts (and
        imports the app) at the first fork, and again after it died or was
        stopped at zero workers."""
        if self.preloader is None or self.preloader.closed:
            config = self.config
            argv = [config.python, "-m", "corral.worker", config.wsgi, "--mount",
                    config.mount, "--parent", str(os.getpid()), "--preload"]
            self.preloader = Preloader(config.name, argv, config.root, self.env,
                                       config.boot_timeout, self._preexec())
        return await self.preloader.fork(listener)

    async def _open(self, worker: WorkerProcess) -> Link:
        loop = asyncio.get_running_loop()
        factory = lambda: Link(worker, self.link_lost)  # noqa: E731
        if isinstance(worker.address, str):
            _, link = await loop.create_unix_connection(factory, worker.address)
        else:
            _, link = await loop.create_connection(factory, *worker.address)
        return link

    async def connect(self, worker: WorkerProcess, exited: asyncio.Task | None = None) -> None:
        """Open the link to `worker` and wait for its readiness answer."""
        deadline = time.monotonic() + self.config.boot_timeout
        while True:
            try:
                link = await self._open(worker)
                break
            except OSError as exc:
                # A program that binds its own port ({port}) has nothing
                # listening there until it has started: try again until it
                # listens, exits or runs out of boot time.
                if (not self.engine.listens_itself or (exited and exited.done())
                        or self.closing):
                    log.error("cannot connect to worker pid %s: %s", worker.pid, exc)
                    return  # reap() handles the process
                if time.monotonic() > deadline:
                    log.error("worker pid %s did not listen on 127.0.0.1:%s in %.0f s: "
                              "killing it", worker.pid, worker.port, self.config.boot_timeout)
                    self._signal(worker, signal.SIGKILL)
                    return
                if exited is None:
                    await asyncio.sleep(CONNECT_RETRY)
                else:  # and notice an exit at once
                    await asyncio.wait({exited}, timeout=CONNECT_RETRY)
        worker.link = link
        wait = {link.ready} | ({exited} if exited else set())
        timeout = max(deadline - time.monotonic(), 0.1)
        if not self.engine.builtin:
            timeout = min(timeout, VALUES_GRACE)
        done, _ = await asyncio.wait(wait, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if not done and not self.engine.builtin and not link.closed:
            # Readiness is the GET_VALUES answer, which php-cgi and the FastCGI
            # libraries we know send once they have accepted the connection.
            # A program that ignores it is taken as ready when its socket has
            # accepted our connection; requests sent before it calls accept()
            # wait in the socket's queue, so nothing is lost.
            log.info("worker pid %s did not answer GET_VALUES in %.0f s; counting "
                     "the accepted connection as ready", worker.pid, VALUES_GRACE)
            link.ready.set_result({})
        if link.ready.done() and not link.ready.exception():
            if worker.state == "booting":
                log.info("worker pid %s ready in %.2f s", worker.pid,
                         time.monotonic() - worker.spawned)
            self.quick_exits = 0
            self.ever_ready = True
            if self.crash_looping and self.state == "failed":
                self.crash_looping = False
                self.state, self.failure = "ready", ""
                log.info("%s serves again: worker pid %s started", self.config.name,
                         worker.pid)
            self.release(link)
            old = self.outgoing.pop(worker.slot, None)
            if old is not None and old is not worker:
                log.info("worker pid %s replaces worker pid %s, which leaves after its "
                         "request", worker.pid, old.pid)
                self.retire(old)
            self.progress.set()
        elif not done:
            log.error("worker pid %s did not become ready in %.0f s: killing it",
                      worker.pid, self.config.boot_timeout)
            self._signal(worker, signal.SIGKILL)
        elif link.ready.done():
            link.ready.exception()  # consumed; reap() reports the exit

    async def reap(self, worker: WorkerProcess) -> None:
        """Wait for the worker to exit, report why, and replace it."""
        status = await worker.proc.wait()
        previous = worker.state
        self.metrics.worker_exited(self, worker, previous, status)
        worker.state = "dead"
        self.leaving.discard(worker)
        if self.outgoing.get(worker.slot) is worker:
            del self.outgoing[worker.slot]
        self.progress.set()
        with contextlib.suppress(OSError):
            worker.socket_path.unlink()  # its replacement gets a socket of its own
        if self.closing or previous == "stopping":
            log.info("worker pid %s stopped (%s)", worker.pid, describe_exit(status))
            return
        if worker.leaving:
            # Its slot has a replacement already; asked to go or not, this
            # process is not respawned.
            expected = previous == "retiring"
            log.log(logging.INFO if expected else logging.ERROR,
                    "worker pid %s of %s %s (%s) after %s requests; it was leaving "
                    "because %s", worker.pid, self.config.name,
                    "exited" if expected else "exited unexpectedly", describe_exit(status),
                    worker.requests, worker.leaving)
            if worker.refill and self.workers.get(worker.slot) is worker:
                self._task(self.spawn(worker.slot))
            return
        lived = time.monotonic() - worker.spawned
        # php-cgi exits by itself after PHP_FCGI_MAX_REQUESTS (500 by default)
        # requests: a recycle, neither a crash nor a failure to boot.
        recycled = (not self.engine.builtin and status == 0 and previous != "booting"
                    and worker.requests > 0)
        if recycled:
            log.info("worker pid %s of %s exited (exit status 0) after %.1f s and "
                     "%s requests: replacing it", worker.pid, self.config.name, lived,
                     worker.requests)
        elif (self.engine.builtin and status == EXIT_APP_LOAD_ERROR
              and previous == "booting"):
            message = (f"{self.config.source}: [app] wsgi = {self.config.wsgi!r}: "
                       "the worker cannot import it (its error is above). Fix: correct "
                       "the module path, or PYTHONPATH in [env]")
            log.error("worker pid %s could not load the app", worker.pid)
            if not self.ever_ready:
                # Nothing will ever serve: say so now, to waiting requests
                # too, instead of respawning a worker that cannot start.
                if not self.fatal.done():
                    self.fatal.set_result(message)
                    self.fail("the app cannot be imported")
                return
        else:
            log.error("worker pid %s of %s exited unexpectedly (%s) after %.1f s",
                      worker.pid, self.config.name, describe_exit(status), lived)
        if (lived < QUICK_EXIT or previous == "booting") and not recycled:
            self.quick_exits += 1
            if (self.quick_exits >= CRASH_LIMIT and self.state == "ready"
                    and not self.ready_count()):
                # Nothing serves and nothing starts: say so to clients (503)
                # and in status, instead of queueing them for nothing.
                # Respawns go on with back-off, so a passing cause (a
                # database down at import) heals by itself.
                self.crash_looping = True
                log.error("%s marked failed: its workers keep dying (%s quick exits in "
                          "a row, the last %s); trying again every %.0f s at most",
                          self.config.name, self.quick_exits, describe_exit(status),
                          MAX_BACKOFF)
                self.fail(f"its workers keep dying ({describe_exit(status)})")
        if self.workers.get(worker.slot) is worker:
            self._task(self.spawn(worker.slot, self._backoff()))

    def _backoff(self, failures: int | None = None) -> float:
        failures = self.quick_exits if failures is None else failures
        if failures == 0:
            return 0.0
        return min(0.1 * 2 ** (failures - 1), MAX_BACKOFF)

    # -- an engine with an address: links to a server corral does not run ------

    async def attach(self, slot: int) -> None:
        """Open link `slot` to the engine's address and wait for its answer to
        GET_VALUES.  A refused or lost link is tried again, with back-off."""
        bind = self.engine.address
        worker = WorkerProcess(self, slot, self.generation)
        worker.address = bind.path or (bind.host, bind.port)
        self.workers[slot] = worker
        try:
            link = await self._open(worker)
        except OSError as exc:
            failures = self.attach_failures.get(slot, 0) + 1
            self.attach_failures[slot] = failures
            delay = self._backoff(failures)
            # Said once per outage, not at every try.
            level = logging.ERROR if failures == 1 else logging.DEBUG
            log.log(level, "cannot connect link %s to the FastCGI server at %s (engine "
                    "%s): %s; trying again, every %.1f s at most", slot, bind,
                    self.engine.name, exc.strerror or exc, MAX_BACKOFF)
            worker.state = "dead"
            self._task(self.spawn(slot, delay))
            return
        worker.link = link
        done, _ = await asyncio.wait({link.ready}, timeout=VALUES_GRACE)
        if not done:
            # Unlike a worker of ours, whose socket queues what is sent early,
            # an external server may serve fewer connections than we keep:
            # this one stays unused until the server answers on it, and the
            # pool does not wait for it to open.
            log.warning("the FastCGI server at %s accepted link %s but has not answered "
                        "GET_VALUES in %.0f s; it is used once it answers (does the "
                        "server take fewer than [app] processes = %s connections?)",
                        bind, slot, VALUES_GRACE, self.config.processes)
            link.ready.add_done_callback(lambda _: self._attached(link))
            return
        self._attached(link)

    def _attached(self, link: Link) -> None:
        if link.closed or link.ready.exception():
            return  # link_lost() reconnects
        worker = link.worker
        failures = self.attach_failures.pop(worker.slot, 0)
        log.info("link %s connected to the FastCGI server at %s%s", worker.slot,
                 self.engine.address, f" after {failures} failed tries" if failures else "")
        self.ever_ready = True
        self.release(link)

    def _external_lost(self, link: Link) -> None:
        worker = link.worker
        handler, link.handler = link.handler, None
        if handler is not None:
            error = GatewayError(f"the FastCGI server at {self.engine.address} closed "
                                 "the connection while serving the request")
            if link.answered:
                handler.upstream_failed(error)
            else:
                handler.upstream_retry(error)
        if self.closing or self.workers.get(worker.slot) is not worker:
            return
        if worker.state == "booting":
            # Closed before it answered: a server that accepts and hangs up
            # must not be reconnected to in a tight loop.
            failures = self.attach_failures.get(worker.slot, 0) + 1
            self.attach_failures[worker.slot] = failures
            if failures == 1:
                log.error("the FastCGI server at %s closed link %s before answering "
                          "GET_VALUES; trying again", self.engine.address, worker.slot)
        else:
            failures = 0
            log.warning("link %s to the FastCGI server at %s was closed: reconnecting",
                        worker.slot, self.engine.address)
        worker.state = "dead"
        self._task(self.spawn(worker.slot, self._backoff(failures)))

    # -- links -----------------------------------------------------------------

    def link_lost(self, link: Link) -> None:
        worker = link.worker
        if link in self.idle:
            self.idle.remove(link)
        if worker.link is link:
            worker.link = None
        if self.engine.address is not None:
            self._external_lost(link)
            return
        if link.handler is not None:
            self._task(self._report_lost_request(link))
        elif (worker.state == "busy" and not self.closing
              and worker.proc is not None and worker.proc.returncode is None):
            # The worker dropped the connection after cutting a response
            # short; it is alive and accepting again, so reconnect.
            worker.state = "booting"
            self._task(self.connect(worker))
        elif (worker.state == "idle" and not self.engine.builtin
              and not self.closing and worker.proc is not None):
            # Our own worker closes an idle link only when it dies; another
            # FastCGI program may close it and live on.
            self._task(self._relink(worker))

    async def _relink(self, worker: WorkerProcess) -> None:
        """Reconnect to a worker that closed its idle link, unless it is dying."""
        try:
            await asyncio.wait_for(asyncio.shield(worker.proc.wait()), 0.25)
            return  # it exited: reap() replaces it
        except TimeoutError:
            pass
        if not self.closing and worker.state == "idle" and worker.link is None:
            log.info("worker pid %s closed its idle connection: reconnecting", worker.pid)
            worker.state = "booting"
            await self.connect(worker)

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
        # Sent once more elsewhere only if the worker died before answering
        # a byte and soon after taking it (killed while idle, say); a request
        # that ran a while may have done its work.
        if link.answered or time.monotonic() - link.sent_at > RETRY_WINDOW:
            handler.upstream_failed(error)
        else:
            handler.upstream_retry(error)
        if (worker.proc.returncode is None and not self.closing
                and worker.state != "retiring"):
            worker.state = "booting"
            await self.connect(worker)

    # -- what the front tells the engine about the script ---------------------

    def script_params(self, path: bytes) -> list[tuple[bytes, bytes]]:
        """SCRIPT_NAME and PATH_INFO for a request path under the mount; with a
        document root ([app] root) also SCRIPT_FILENAME and DOCUMENT_ROOT, which
        php-cgi needs to find the script.  The front adds these to its params."""
        docroot = self.config.docroot
        if docroot is None:
            # corral's worker splits the path by the mount itself.
            return [(b"SCRIPT_NAME", b""), (b"PATH_INFO", path)]
        mount = self.config.mount.encode()
        script, info = find_script(os.fsencode(docroot), self.config.index.encode(),
                                   path[len(mount):])
        return [(b"SCRIPT_FILENAME", os.fsencode(docroot) + script),
                (b"DOCUMENT_ROOT", os.fsencode(docroot)),
                (b"SCRIPT_NAME", mount + script),
                (b"PATH_INFO", info)]

    # -- dispatch ------------------------------------------------------------

    def release(self, link: Link, fresh: bool = False) -> None:
        """`link` is free, or its worker has begun the request that was behind
        the one that ended: give it the first waiting request, or keep it.
        `fresh`: it has just ended a request."""
        worker = link.worker
        if link.handler is not None:
            # Busy with the request that was behind: more may go behind it.
            self._fill_behind(link)
            return
        if worker.state == "retiring":
            self._dismiss(worker)  # its request is done: now it may go
            return
        if link.closed or worker.state in ("stopping", "dead"):
            return
        # The peek at the socket (alive) finds a worker that died while idle,
        # or a program that exits right after a response (php-cgi after
        # PHP_FCGI_MAX_REQUESTS).  Ours never does that unless the pool asks,
        # so a link of ours that has just ended a request (`fresh`) is sound.
        if self.state == "ready" and self.waiters and (
                (fresh and self.engine.builtin) or link.alive()):
            worker.state = "busy"
            self.waiters.popleft().settle(link)
            self._fill_behind(link)
            return
        if self.state == "ready" and self._take_back_for(link):
            return
        worker.state = "idle"
        worker.idle_since = time.monotonic()
        self.idle.append(link)

    def _fill_behind(self, link: Link) -> None:
        """Busy `link` takes the first waiting requests behind its current
        one, as many as it may (see Link.can_take_behind)."""
        if self.state != "ready" or link.worker.state != "busy" or link.worker.leaving:
            return
        now = time.monotonic()
        while (self.waiters and self.waiters[0].behind_ok
               and link.can_take_behind(now, self.behind_limit)):
            self.waiters.popleft().settle(link)

    # -- timeouts and recycling ------------------------------------------------

    def request_timed_out(self, link: Link) -> None:
        """The request on `link` ran over [app] request_timeout: the client
        gets 504 now (never a retry: the app may have acted on it), and the
        worker is asked to stop, killed after [app] timeout_grace, and
        replaced at once, since it is stuck."""
        worker = link.worker
        handler = link.handler
        if handler is None or link.closed:
            return
        link.handler = TimedOut()  # what the worker sends now is dropped
        link.resume()  # paused for a slow client, it would not see the worker go
        # Those behind it go elsewhere, unless the worker holds a claim lock
        # that looks like theirs (see corral.worker's let_go): those stay,
        # and the timed-out request's end, or the link's loss, settles them.
        while (behind := link.take_back()) is not None:
            behind.handler.upstream_resend()
        timeout, grace = self.limits.request_timeout, self.limits.timeout_grace
        describe = getattr(handler, "describe", None)
        what = describe() if describe else "a request whose client has gone"
        error = GatewayTimeout(f"worker pid {worker.pid} ran over [app] request_timeout = "
                               f"{timeout:g} s and was stopped")
        if self.engine.address is not None:
            log.critical("%s ran over [app] request_timeout = %g s on link %s to the "
                         "FastCGI server at %s: answering 504 and closing the link",
                         what, timeout, worker.slot, self.engine.address)
            handler.upstream_failed(error)
            link.transport.close()  # link_lost() reconnects
            return
        sig = STACK_SIGNAL if self.engine.builtin else signal.SIGTERM
        # Once the head is out, a 504 cannot be sent: the client's connection
        # is cut instead, so the truncated body never looks whole.
        started = link.answered
        log.critical("worker pid %s timed out: %s ran over [app] request_timeout = %g s; "
                     "%s, sending %s%s, SIGKILL in %g s", worker.pid, what, timeout,
                     "its response had begun: cutting the client's connection" if started
                     else "answering 504", sig.name,
                     " (it logs the app's stack)" if self.engine.builtin else "", grace)
        handler.upstream_failed(error)
        worker.leaving = "its request timed out"
        worker.state = "retiring"
        self.leaving.add(worker)
        if self.outgoing.get(worker.slot) is worker:
            del self.outgoing[worker.slot]  # its replacement is on the way already
        elif self.workers.get(worker.slot) is worker and not self.closing:
            self._task(self.spawn(worker.slot))
        try:
            # The worker alone, not its group: the default action of the
            # stack signal would kill children the app started.
            os.kill(worker.pid, sig)
        except ProcessLookupError:
            pass
        asyncio.get_running_loop().call_later(grace, self._signal, worker, signal.SIGKILL)

    def request_done(self, worker: WorkerProcess) -> None:
        """After each request: is the worker due for recycling?"""
        if worker.leaving or self.closing or self.engine.address is not None:
            return
        limits = self.limits
        cause = ""
        if worker.max_requests and worker.requests >= worker.max_requests:
            jitter = (f", {worker.max_requests} with jitter" if limits.max_requests_jitter
                      else "")
            cause = (f"it served {worker.requests} requests ([app] max_requests = "
                     f"{limits.max_requests}{jitter})")
        elif limits.max_rss:
            rss = read_rss(worker.pid)
            if rss is not None:
                worker.rss = rss
                if rss > limits.max_rss * 1024:
                    cause = (f"its memory is {rss / 1024:.0f} MiB ([app] max_rss = "
                             f"{limits.max_rss})")
        age = time.monotonic() - worker.spawned
        if not cause and limits.max_lifetime and age > limits.max_lifetime:
            cause = f"it lived {age:.0f} s ([app] max_lifetime = {limits.max_lifetime:g})"
        if cause:
            self.recycle(worker, cause)

    def recycle(self, worker: WorkerProcess, cause: str) -> None:
        """Replace `worker` gracefully: it serves on until its replacement is
        ready (see connect), then leaves after the request it is serving."""
        worker.leaving = cause
        if not self._spare_port():
            # Every port of [engines.NAME] ports is taken: the replacement
            # can only have this worker's, so it starts once this one is gone.
            log.info("recycling worker pid %s of %s: %s; it leaves after its request and "
                     "its replacement starts then (no spare port in %s)", worker.pid,
                     self.config.name, cause, "-".join(map(str, self.engine.ports)))
            worker.refill = True
            self.retire(worker)
            return
        self.outgoing[worker.slot] = worker
        log.info("recycling worker pid %s of %s: %s; its replacement starts first",
                 worker.pid, self.config.name, cause)
        self._task(self.spawn(worker.slot))

    def _spare_port(self) -> bool:
        """Room for one more worker in the engine's port range, if it has one."""
        if self.engine.transport != "tcp" or not self.engine.ports:
            return True
        low, high = self.engine.ports
        live = sum(w.state != "dead" for w in self.all_workers())
        return high - low + 1 > live

    async def _watch_timeouts(self) -> None:
        """[app] request_timeout: a request whose link has been busy longer
        is timed out (request_timed_out).  Looked at ten times per timeout,
        at least every second, so the 504 comes at most a tenth late."""
        timeout = self.limits.request_timeout
        every = min(1.0, max(0.02, timeout / 10))
        while True:
            await asyncio.sleep(every)
            if self.state == "stopping":
                return
            late = time.monotonic() - timeout
            for worker in self.all_workers():
                link = worker.link
                if (link is not None and link.handler is not None and not link.closed
                        and type(link.handler) is not TimedOut
                        and link.sent_at <= late and worker.state != "dead"):
                    self.request_timed_out(link)

    async def _watch_lifetimes(self) -> None:
        # Busy workers are looked at after their request (request_done);
        # this catches the idle ones, which may idle for hours.
        while not self.closing:
            await asyncio.sleep(WATCH_EVERY)
            lifetime = self.limits.max_lifetime
            now = time.monotonic()
            for worker in list(self.workers.values()):
                age = now - worker.spawned
                if worker.state == "idle" and not worker.leaving and age > lifetime:
                    self.recycle(worker, f"it lived {age:.0f} s ([app] max_lifetime = "
                                 f"{lifetime:g})")

    def retire(self, worker: WorkerProcess) -> None:
        """Out of rotation: at once if idle, after its request if busy."""
        if worker.state == "busy":
            worker.state = "retiring"
            self.leaving.add(worker)
        elif worker.state in ("idle", "booting"):
            self._dismiss(worker)

    def _dismiss(self, worker: WorkerProcess) -> None:
        """Close the idle worker's link and ask it to exit (SIGTERM)."""
        worker.state = "retiring"
        self.leaving.add(worker)
        link = worker.link
        if link is not None:
            if link in self.idle:
                self.idle.remove(link)
            if not link.closed and link.transport is not None:
                link.transport.close()
        self._signal(worker, signal.SIGTERM)

    # -- scaling: [app] processes = "MIN-MAX" -----------------------------------

    def _scale_up(self) -> None:
        """Requests wait and no worker is free: start a worker for each
        waiting request that no starting worker will take, up to MAX.  A
        burst of requests therefore starts at most as many workers as are
        missing, and respawns after quick deaths keep their back-off."""
        if (self.state != "ready" or not self.waiters or self.idle
                or self.engine.address is not None):
            return
        starting = self.growing | {slot for slot, w in self.workers.items()
                                   if w.state == "booting"}
        wanted = len(self.waiters) - len(starting)
        free = [slot for slot in range(self.config.processes)
                if slot not in self.workers and slot not in self.growing]
        for slot in free[:max(wanted, 0)]:
            log.info("adding a worker to %s (slot %s): %d requests wait and no worker is "
                     "free; %d of at most %d running", self.config.name, slot,
                     len(self.waiters), len(self.workers), self.config.processes)
            self.growing.add(slot)
            self._task(self._grow(slot))

    async def _grow(self, slot: int) -> None:
        try:
            await self.spawn(slot, self._backoff())
        finally:
            self.growing.discard(slot)

    async def _watch_idle(self) -> None:
        """Stop workers idle for [app] idle_timeout, down to MIN.  With none
        left, a preload pool's preloader stops too: the app costs no process."""
        timeout = self.idle_timeout
        while not self.closing:
            await asyncio.sleep(min(WATCH_EVERY, timeout / 2))
            if self.state != "ready":
                continue
            now = time.monotonic()
            serving = [w for w in self.workers.values() if not w.leaving]
            excess = len(serving) - self.fewest
            for worker in sorted(serving, key=lambda w: w.idle_since):
                if excess <= 0:
                    break
                if worker.state == "idle" and now - worker.idle_since >= timeout:
                    self.shrink(worker, now - worker.idle_since)
                    excess -= 1
            if (self.preloader is not None and not self.growing and not self.waiters
                    and all(w.state == "dead" for w in self.all_workers())):
                log.info("%s has no workers left: stopping its preloader pid %s",
                         self.config.name, self.preloader.pid)
                preloader, self.preloader = self.preloader, None
                preloader.close()  # it exits by itself even if stop() is cancelled
                self._task(preloader.stop())

    def shrink(self, worker: WorkerProcess, idle: float) -> None:
        """Stop an idle worker above MIN; its slot is free for a later scale-up."""
        worker.leaving = (f"it was idle for {idle:.0f} s ([app] idle_timeout = "
                          f"{self.idle_timeout:g})")
        del self.workers[worker.slot]
        log.info("stopping worker pid %s of %s: %s; %d workers left", worker.pid,
                 self.config.name, worker.leaving, len(self.workers))
        self._dismiss(worker)

    # -- generations -----------------------------------------------------------

    def adopt_waiters(self, old: Pool) -> None:
        """Take over the requests queued in the generation `old`, keeping
        what is left of their wait."""
        while old.waiters:
            waiter = old.waiters.popleft()
            if not waiter.done:
                self.waiters.append(waiter)  # its deadline goes with it
        self._arm_queue_timer()
        self._serve_waiters()
        self._scale_up()

    async def retire_generation(self, grace: float) -> None:
        """An old generation's end: no new work; idle workers go at once,
        busy ones after their request, within `grace` seconds; then stop."""
        self.state = "retiring"
        workers = self.all_workers()
        for worker in workers:
            self.retire(worker)
        waits = [asyncio.ensure_future(w.proc.wait()) for w in workers
                 if w.proc is not None and w.proc.returncode is None]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=grace)
            if pending:
                log.warning("generation %s of %s: %d workers still busy after the %.0f s "
                            "graceful timeout; stopping them", self.generation,
                            self.config.name, len(pending), grace)
        await self.stop()

    def acquire_behind(self) -> Link | None:
        """No worker is free: a busy one of ours that takes a request behind
        the one it serves (see Link), or None (then wait_for_link).  None
        too while the pool may still grow: a new worker is better."""
        if (self.state != "ready" or self.waiters or not self.behind_limit
                or self.engine.address is not None):
            return None
        if len(self.workers) + len(self.growing) < self.config.processes:
            return None
        now = time.monotonic()
        limit = self.behind_limit
        best = None
        for worker in self.workers.values():
            link = worker.link
            # The fewest behind, then the one that began first: likely to end first.
            if (link is not None and worker.state == "busy" and not worker.leaving
                    and link.can_take_behind(now, limit)
                    and (best is None or (len(link.behind), link.sent_at)
                         < (len(best.behind), best.sent_at))):
                best = link
        return best

    def _take_back_for(self, link: Link) -> bool:
        """`link` is free and nothing waits: take back the oldest request
        sent behind a busy worker, if that worker has not begun it, and
        send it on `link` instead."""
        oldest, since = None, 0.0
        for worker in self.workers.values():
            other = worker.link
            if other is None or other is link:
                continue
            sent_at = other.waiting_since()
            if sent_at is not None and (oldest is None or sent_at < since):
                oldest, since = other, sent_at
        behind = oldest.take_back() if oldest is not None else None
        if behind is None:
            return False
        log.info("a request behind worker pid %s's current one is taken back for worker "
                 "pid %s, which is free", oldest.worker.pid, link.worker.pid)
        link.worker.state = "busy"
        handler = behind.handler
        handler.attach(link)
        link.start(behind.params, behind.body, handler)
        return True

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

    def wait_for_link(self, callback, behind_ok: bool = False) -> None:
        """Queue a request: `callback(link, error)` runs once, with a free link
        or with the 503 that ends the wait (queue full, wait too long, deploy
        step still running or failed, server stopping).  `behind_ok`: the
        request may also be given a busy link, to go behind its current one
        (a small body: see Link.start)."""
        waiter = Waiter(callback)
        waiter.behind_ok = behind_ok
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
        loop = self.loop
        waiter.deadline = loop.time() + wait
        self.waiters.append(waiter)
        if self._queue_timer is None:
            self._queue_timer = loop.call_at(waiter.deadline, self._expire_due)
        self._scale_up()

    # One timer for the whole queue, not one per request: it fires at the
    # earliest deadline and ends every wait that is due.

    def _arm_queue_timer(self) -> None:
        if self._queue_timer is not None:
            self._queue_timer.cancel()
            self._queue_timer = None
        deadlines = [w.deadline for w in self.waiters if not w.done]
        if deadlines:
            self._queue_timer = self.loop.call_at(min(deadlines), self._expire_due)

    def _expire_due(self) -> None:
        self._queue_timer = None
        now = self.loop.time()
        due = [w for w in self.waiters if w.done or w.deadline <= now]
        for waiter in due:
            if not waiter.done:
                self._expire(waiter)
            else:
                self.waiters.remove(waiter)
        self._arm_queue_timer()

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
        waiter.settle(None, error)


class Supervisor:
    """An app's generations.  The front dispatches through it to the current
    pool; a restart starts the next one (its own workers and deploy step),
    moves new requests to it once every worker is ready, and lets the
    previous one finish its in-flight requests.  A generation that cannot
    serve is stopped and the one before keeps serving."""

    def __init__(self, config: AppConfig, run_dir: Path, reload=None) -> None:
        self.config = config
        self.run_dir = run_dir
        # Returns the AppConfig for the next generation (the config file read
        # again), or raises ConfigError; None: the same config each time.
        self.reload = reload
        self.current = Pool(config, run_dir)
        self.starting: Pool | None = None  # the next generation, while it boots
        self.old: set[Pool] = set()  # generations finishing their requests
        self.generations = 1
        # Only the first generation can stop the server (an app that was
        # never importable); a later one that fails just is not switched to.
        self.fatal = self.current.fatal
        self.restarts: deque[dict] = deque(maxlen=10)  # the latest, for status
        self.last_deploy: dict | None = None
        self.stopping = False
        self._running: asyncio.Task | None = None
        self._queued: asyncio.Future | None = None
        self._queued_cause = ""
        self.tasks: set[asyncio.Task] = set()
        self.metrics = metrics.for_app(config.name)
        self.metrics.supervisor = self  # its gauges are read from here at scrape time

    def _task(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- what the front calls (the same as a Pool's) ---------------------------

    def acquire_nowait(self) -> Link | None:
        return self.current.acquire_nowait()

    def acquire_behind(self) -> Link | None:
        return self.current.acquire_behind()

    def wait_for_link(self, callback, behind_ok: bool = False) -> None:
        self.current.wait_for_link(callback, behind_ok)

    def release(self, link: Link) -> None:
        link.worker.pool.release(link)  # to the generation the link belongs to

    def script_params(self, path: bytes) -> list[tuple[bytes, bytes]]:
        return self.current.script_params(path)

    @property
    def state(self) -> str:
        return self.current.state

    @property
    def failure(self) -> str:
        return self.current.failure

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        await self.current.start()
        self._note_deploy(self.current)

    async def stop(self) -> None:
        self.stopping = True
        for task in list(self.tasks):
            task.cancel()
        if self._queued is not None and not self._queued.done():
            self._queued.set_result({"ok": False, "message": "the server is stopping"})
        pools = [self.current, *self.old] + ([self.starting] if self.starting else [])
        await asyncio.gather(*(pool.stop() for pool in pools))

    def restart(self, cause: str) -> asyncio.Future:
        """Start a new generation; the future's result is a dict saying how
        it went ("ok", "generation", "message").  A restart asked for while
        one runs is done once after it, since the code may have changed after
        the running one read it; further asks join that queued one."""
        if self.stopping:
            done = asyncio.get_running_loop().create_future()
            done.set_result({"ok": False, "message": "the server is stopping"})
            return done
        if self._running is None:
            self._running = self._task(self._restart(cause))
            return self._running
        if self._queued is None:
            log.info("restart of %s (%s) queued: a restart is in progress", self.config.name,
                     cause)
            self._queued = asyncio.get_running_loop().create_future()
            self._queued_cause = cause
        return self._queued

    async def _restart(self, cause: str) -> dict:
        started = time.monotonic()
        try:
            result = await self._new_generation(cause)
            result["seconds"] = round(time.monotonic() - started, 3)  # for status
            return result
        finally:
            self._running = None
            queued, self._queued = self._queued, None
            if queued is not None and not self.stopping:
                task = self.restart(self._queued_cause)
                task.add_done_callback(lambda t: queued.done() or queued.set_result(
                    t.result() if not t.cancelled() else {"ok": False,
                                                          "message": "cancelled"}))

    async def _new_generation(self, cause: str) -> dict:
        if not self.current.deployed.done():
            # Two deploy steps at once could run the same migration twice.
            log.info("restart of %s (%s) waits for generation %s to finish starting",
                     self.config.name, cause, self.current.generation)
            await asyncio.shield(self.current.deployed)
        self.generations += 1
        number = self.generations
        name = self.config.name
        started = time.monotonic()
        log.info("restart of %s (%s): starting generation %s; generation %s serves "
                 "meanwhile", name, cause, number, self.current.generation)
        try:
            config = self.reload() if self.reload is not None else self.config
        except Exception as exc:  # ConfigError, or a file that vanished
            return self._failed(number, cause, f"the config cannot be read: {exc}")
        pool = Pool(config, self.run_dir, number)
        if pool.exclusive and config.deploy.argv:
            return await self._exclusive(pool, cause, started)
        self.starting = pool
        try:
            await pool.start()
            self._note_deploy(pool)
            why = pool.failure if pool.state != "ready" else await pool.wait_all_ready(
                config.boot_timeout)
            if pool.fatal.done():
                why = pool.fatal.result()
        except BaseException:
            self.starting = None
            await pool.stop()
            raise
        self.starting = None
        if why:
            await pool.stop()
            return self._failed(number, cause, why)
        old, self.current, self.config = self.current, pool, config
        pool.adopt_waiters(old)
        pids = ", ".join(str(w.pid) for w in pool.workers.values()) or "none yet"
        log.info("generation %s of %s serves (worker pids %s), ready in %.1f s; generation "
                 "%s finishes its in-flight requests", number, name, pids,
                 time.monotonic() - started, old.generation)
        self.old.add(old)
        self._task(self._retire(old))
        result = {"ok": True, "generation": number, "cause": cause,
                  "message": f"generation {number} serves (worker pids {pids})",
                  "at": time.time()}
        self.restarts.append(result)
        return result

    async def _exclusive(self, pool: Pool, cause: str, started: float) -> dict:
        """[deploy] exclusive: the old generation stops first (its in-flight
        requests finish), the deploy step runs alone, then the workers start.
        Requests arriving meanwhile wait in the new generation's queue, up to
        [deploy] hold, then get 503 with Retry-After and the "deployment in
        progress" page.  With nothing to fall back on, a failure leaves the
        app answering 503 until a restart succeeds."""
        old, self.current, self.config = self.current, pool, pool.config
        number = pool.generation
        log.info("restart of %s ([deploy] exclusive): generation %s stops first; requests "
                 "wait up to %g s ([deploy] hold), then get 503", self.config.name,
                 old.generation, pool.config.deploy.hold)
        pool.adopt_waiters(old)
        self.old.add(old)
        await self._retire(old)
        await pool.start()
        self._note_deploy(pool)
        why = pool.failure if pool.state != "ready" else await pool.wait_all_ready(
            pool.config.boot_timeout)
        if why:
            log.error("restart of %s (%s) FAILED: generation %s cannot serve: %s; with "
                      "[deploy] exclusive there is no old generation to fall back on%s",
                      self.config.name, cause, number, why,
                      ": the app answers 503" if pool.state == "failed" else "")
            result = {"ok": False, "generation": number, "cause": cause,
                      "message": f"generation {number} cannot serve: {why}",
                      "at": time.time()}
        else:
            pids = ", ".join(str(w.pid) for w in pool.workers.values()) or "none yet"
            log.info("generation %s of %s serves (worker pids %s), %.1f s after the restart "
                     "began", number, self.config.name, pids, time.monotonic() - started)
            result = {"ok": True, "generation": number, "cause": cause,
                      "message": f"generation {number} serves (worker pids {pids})",
                      "at": time.time()}
        self.restarts.append(result)
        return result

    def _failed(self, number: int, cause: str, why: str) -> dict:
        log.error("restart of %s (%s) FAILED: generation %s cannot serve: %s; generation "
                  "%s keeps serving", self.config.name, cause, number, why,
                  self.current.generation)
        result = {"ok": False, "generation": number, "cause": cause,
                  "message": f"generation {number} cannot serve: {why}; generation "
                             f"{self.current.generation} keeps serving", "at": time.time()}
        self.restarts.append(result)
        return result

    async def _retire(self, old: Pool) -> None:
        await old.retire_generation(self.config.server["graceful_timeout"])
        self.old.discard(old)
        log.info("generation %s of %s stopped", old.generation, self.config.name)

    def _note_deploy(self, pool: Pool) -> None:
        result = pool.last_deploy
        if result is not None:
            self.last_deploy = {"generation": pool.generation, "ok": result.ok,
                                "result": result.describe(), "log": str(result.log),
                                "at": time.time(), "status": result.status,
                                "seconds": round(result.seconds, 3)}

    # -- status ------------------------------------------------------------------

    def status(self) -> dict:
        """What `corral status` shows: plain data, ready for JSON."""
        now = time.monotonic()
        pools = [self.current, *sorted(self.old, key=lambda p: p.generation)]
        if self.starting is not None:
            pools.append(self.starting)
        workers = []
        for pool in pools:
            for worker in sorted(pool.all_workers(), key=lambda w: (w.slot, w.spawned)):
                if worker.state == "dead":
                    continue
                rss = read_rss(worker.pid) if worker.pid else None
                workers.append({"pid": worker.pid, "generation": pool.generation,
                                "slot": worker.slot, "state": worker.state,
                                "requests": worker.requests,
                                "rss_mib": round(rss / 1024, 1) if rss else None,
                                "age": round(now - worker.spawned, 1),
                                "leaving": worker.leaving})
        return {"app": self.config.name, "root": str(self.config.root),
                "state": self.current.state, "failure": self.current.failure,
                "generation": self.current.generation,
                "starting": self.starting.generation if self.starting else None,
                "retiring": sorted(p.generation for p in self.old),
                "queue": len(self.current.waiters), "workers": workers,
                "queue_oldest_wait": round(max((now - w.queued for w in self.current.waiters
                                                if not w.done), default=0.0), 3),
                "user": (f"{self.config.run_as.user}:{self.config.run_as.group}"
                         if self.config.run_as else None),
                "processes": self.current.count(),
                "last_deploy": self.last_deploy, "restarts": list(self.restarts)}
