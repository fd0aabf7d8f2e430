"""One running server: the front and the app's pool composed, started in the
right order and stopped gracefully on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

from corral.config import AppConfig
from corral.front.server import Front
from corral.pool import Pool

log = logging.getLogger("corral.error")

EXIT_CONFIG = 2  # the config (or the app it names) cannot be served


class Server:
    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.stop_requested: asyncio.Event | None = None

    def handle_signal(self, signum: int) -> None:
        if not self.stop_requested.is_set():
            log.info("%s received: stopping gracefully (in-flight requests finish)",
                     signal.Signals(signum).name)
            self.stop_requested.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stop_requested = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.handle_signal, signum)
        # SIGHUP's default would kill us mid-request; restarts are to come.
        loop.add_signal_handler(signal.SIGHUP, log.warning,
                                "SIGHUP received: ignored (this version does not restart "
                                "on SIGHUP; stop and start corral instead)")
        run_dir = Path(tempfile.mkdtemp(prefix="corral-"))
        pool = Pool(self.config, run_dir)
        try:
            front = Front(self.config, pool)
        except OSError as exc:
            shutil.rmtree(run_dir, ignore_errors=True)
            log.error("%s: [server] access_log: cannot open %s (%s). Fix: give a file in a "
                      "folder corral may write to, \"-\" for standard error, or \"\" for none",
                      self.config.source, exc.filename, exc.strerror)
            return EXIT_CONFIG
        try:
            for bind in self.config.server["bind"]:
                try:
                    await front.start(bind)
                except OSError as exc:
                    log.error("cannot listen on %s: %s. Fix: choose another address with "
                              "--bind or [server] bind", bind, exc.strerror)
                    front.close_listeners()
                    return EXIT_CONFIG
            log.info("listening on %s", ", ".join(front.addresses))
            return await self._serve(pool, front)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
            for path in front.unix_paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    async def _serve(self, pool: Pool, front: Front) -> int:
        loop = asyncio.get_running_loop()
        starting = loop.create_task(pool.start())
        stop = loop.create_task(self.stop_requested.wait())
        await asyncio.wait({starting, stop, pool.fatal}, return_when=asyncio.FIRST_COMPLETED)
        if pool.fatal.done():
            pass  # reported below
        elif starting.done() and pool.state == "ready":
            log.info("ready: serving %s at %s", self.config.root, ", ".join(front.addresses))
        elif starting.done():
            log.error("ready, but %s answers 503: %s", self.config.name, pool.failure)
        await asyncio.wait({stop, pool.fatal}, return_when=asyncio.FIRST_COMPLETED)
        status = 0
        if pool.fatal.done():
            log.error("%s", pool.fatal.result())
            status = EXIT_CONFIG
            starting.cancel()  # a deploy step still running is stopped
        front.close_listeners()
        await front.drain(self.config.server["graceful_timeout"])
        starting.cancel()
        stop.cancel()
        await pool.stop()
        log.info("stopped")
        return status
