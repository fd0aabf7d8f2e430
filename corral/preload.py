"""The supervisor's side of [app] spawn_mode = "preload": the preloader of one
generation (`python -m corral.worker --preload`, see worker.Preloader), and
the workers it forks, seen as processes the pool waits for and signals just
like the ones it starts itself.

Why the preloader reports exits instead of the supervisor reaping them: a
process's exit status goes to its parent, and the parent of a forked worker
is the preloader.  Making the supervisor a child subreaper (prctl
PR_SET_CHILD_SUBREAPER) with a double fork would hand the workers to us, but
also every orphan below us (a deploy step's daemon, php-cgi's children,
subprocesses of a killed worker), which would then be ours to reap without
stealing the statuses asyncio waits for.  So the preloader, which reaps its
workers anyway, passes each status on over its control socket, and gives us
a pidfd of each worker as it forks it (before it could reap it, so the pidfd
names that very process).  With the pidfd we signal a worker with no risk of
pid reuse and, should the preloader die, still see the worker exit, though
then without its status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time

log = logging.getLogger("corral.error")

# The exit "status" of a forked worker that outlived its preloader: nobody
# could reap it for us.  Not a value a real status can take.
PRELOADER_GONE = 1 << 16
STOP_GRACE = 5.0  # seconds a preloader with no workers left gets to exit


class ForkedProcess:
    """A worker forked by the preloader, with the part of
    asyncio.subprocess.Process the pool uses: pid, returncode, wait(),
    send_signal()."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.returncode: int | None = None
        self._exited = asyncio.get_running_loop().create_future()

    async def wait(self) -> int:
        # Shielded: a cancelled waiter must not cancel the exit for the others.
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None and self.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, sig)

    def exited(self, status: int) -> None:
        if self.returncode is not None:
            return
        self.returncode = status
        if self.pidfd >= 0:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1
        self._exited.set_result(status)


class ExitedProcess(ForkedProcess):
    """A worker that could not be forked: it "exited" with the preloader's
    status (EXIT_APP_LOAD_ERROR when the app cannot be imported), so the
    pool's reaping reports it and backs off as for a worker that died."""

    def __init__(self, pid: int, status: int) -> None:
        super().__init__(pid, -1)
        self.exited(status)


class Preloader:
    """One preloader process: started on creation, forks on request."""

    def __init__(self, name: str, argv: list[str], cwd, env: dict[str, str],
                 boot_timeout: float, preexec=None) -> None:
        self.name = name
        self.pid = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.sock: socket.socket | None = None
        self.children: dict[int, ForkedProcess] = {}
        self.forks: list[asyncio.Future] = []  # fork requests awaiting "forked"
        self.closed = False  # no more forks: stopping, or gone
        self.stopping = False
        self.status: int | None = None  # its exit status once gone
        self.ready = asyncio.get_running_loop().create_future()
        self.started = asyncio.get_running_loop().create_task(
            self._start(argv, cwd, env, boot_timeout, preexec))

    async def _start(self, argv, cwd, env, boot_timeout: float, preexec) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        began = time.monotonic()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, str(theirs.fileno()), stdin=asyncio.subprocess.DEVNULL,
                stdout=sys.stderr.fileno(), cwd=cwd, env=env, start_new_session=True,
                pass_fds=(theirs.fileno(),), preexec_fn=preexec)
        except OSError as exc:
            ours.close()
            log.error("cannot start the preloader of %s: %s", self.name, exc)
            self._gone(PRELOADER_GONE)
            return
        finally:
            theirs.close()
        self.pid = self.proc.pid
        self.sock = ours
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        loop.add_reader(ours, self._readable)
        watch = loop.create_task(self._watch())
        done, _ = await asyncio.wait({self.ready, watch}, timeout=boot_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if not done:
            log.error("preloader pid %s of %s did not import the app in %.0f s: killing it",
                      self.pid, self.name, boot_timeout)
            self.proc.kill()
            await asyncio.wait({watch})
        elif self.ready.result():
            log.info("preloader pid %s of %s imported the app in %.2f s", self.pid,
                     self.name, time.monotonic() - began)

    async def _watch(self) -> None:
        status = await self.proc.wait()
        if not self.stopping and not (self.ready.done() and self.ready.result()):
            log.error("preloader pid %s of %s exited (%s) before it had imported the app",
                      self.pid, self.name, _describe(status))
        elif not self.stopping:
            log.error("preloader pid %s of %s exited unexpectedly (%s); its workers "
                      "finish their requests and exit, and their replacements are "
                      "forked from a new preloader", self.pid, self.name,
                      _describe(status))
        else:
            log.info("preloader pid %s of %s stopped (%s)", self.pid, self.name,
                     _describe(status))
        self._gone(status)

    def _readable(self) -> None:
        while self.sock is not None:
            try:
                message, fds, _, _ = socket.recv_fds(self.sock, 64, 1)
            except BlockingIOError:
                return
            except OSError:
                message, fds = b"", []
            if not message:
                self._gone(None)
                return
            kind, _, rest = message.partition(b" ")
            if kind == b"ready":
                if not self.ready.done():
                    self.ready.set_result(True)
            elif kind == b"forked" and fds and self.forks:
                process = ForkedProcess(int(rest), fds.pop())
                self.children[process.pid] = process
                future = self.forks.pop(0)
                if future.done():  # its spawn was cancelled: the pool is stopping
                    process.send_signal(signal.SIGKILL)
                else:
                    future.set_result(process)
            elif kind == b"exit":
                pid, status = (int(part) for part in rest.split())
                process = self.children.pop(pid, None)
                if process is not None:
                    process.exited(status)
            for fd in fds:
                os.close(fd)

    def _gone(self, status: int | None) -> None:
        """The preloader has exited, or closed its side: settle what waits."""
        self.closed = True
        if status is not None:
            self.status = status
            if self.sock is not None:
                self._readable()  # what it sent before it exited, up to the end
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock)
            self.sock.close()
            self.sock = None
        if not self.ready.done():
            self.ready.set_result(False)
        for future in self.forks:
            if not future.done():
                future.set_result(None)
        self.forks.clear()
        # Its workers were sent SIGTERM by the kernel as it died (PDEATHSIG);
        # their pidfds become readable once they have exited.
        loop = asyncio.get_running_loop()
        for process in self.children.values():
            if process.pidfd >= 0:
                loop.add_reader(process.pidfd, process.exited, PRELOADER_GONE)
        self.children.clear()

    async def fork(self, listener: socket.socket) -> ForkedProcess:
        """A worker forked on `listener`, or an ExitedProcess saying why not."""
        await asyncio.shield(self.started)
        if self.ready.done() and self.ready.result() and not self.closed:
            future = asyncio.get_running_loop().create_future()
            try:
                socket.send_fds(self.sock, [b"fork"], [listener.fileno()])
            except OSError:
                future.set_result(None)
            else:
                self.forks.append(future)
            process = await future
            if process is not None:
                return process
        if self.proc is not None and self.status is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.proc.wait()), STOP_GRACE)
        status = self.status if self.status is not None else PRELOADER_GONE
        return ExitedProcess(self.pid, status)

    def close(self) -> None:
        """Fork no more; the preloader exits once its workers have."""
        self.closed = True
        self.stopping = True
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """close(), then wait for the exit; SIGKILL after `grace` seconds."""
        self.close()
        if not self.started.done():
            self.started.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.started
        if self.proc is None or self.proc.returncode is not None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self.proc.wait()), grace)
        except TimeoutError:
            log.warning("preloader pid %s of %s did not stop in %.0f s: SIGKILL",
                        self.pid, self.name, grace)
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


def _describe(status: int) -> str:
    from corral.pool import describe_exit  # pool imports us
    return describe_exit(status)
