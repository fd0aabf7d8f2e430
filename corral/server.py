"""One running server: the front and the app's pool composed, started in the
right order, restarted by generations (SIGHUP, tmp/restart.txt, a changed
config file, `corral restart`) and stopped gracefully on SIGTERM or SIGINT.
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

from corral import systemd
from corral.config import AppConfig, load, resolve_user
from corral.control import ControlServer, watch_globs, watch_restart_file
from corral.front.server import Front
from corral.metrics import MetricsListener, registry_for
from corral.pool import Supervisor
from corral.venv import use_app_python

log = logging.getLogger("corral.error")

EXIT_CONFIG = 2  # the config (or the app it names) cannot be served


class Server:
    def __init__(self, config: AppConfig, allow_root: bool = False,
                 overrides: dict | None = None) -> None:
        self.config = config
        self.allow_root = allow_root  # for [app] user at each reload
        self.overrides = overrides or {}  # from the command line (--bind): at each reload too
        self.metrics: MetricsListener | None = None
        self.stop_requested: asyncio.Event | None = None
        self.notify = systemd.Notifier.from_environ()
        self.supervisor: Supervisor | None = None
        self.run_dir: Path | None = None

    def handle_signal(self, signum: int) -> None:
        if not self.stop_requested.is_set():
            log.info("%s received: stopping gracefully (in-flight requests finish)",
                     signal.Signals(signum).name)
            self.stop_requested.set()

    def handle_hup(self) -> None:
        if self.supervisor is None or self.stop_requested.is_set():
            log.warning("SIGHUP received while %s: ignored",
                        "stopping" if self.stop_requested.is_set() else "starting")
            return
        log.info("SIGHUP received: restarting %s with a new generation", self.config.name)
        self.supervisor.restart("SIGHUP")

    def reload(self) -> AppConfig:
        """The config of the next generation: the app's config file read
        again.  The front keeps the [server] and [static] it started with."""
        config = load(self.config.root, self.overrides)
        config.run_as = resolve_user(config, self.allow_root)
        if config.run_as is not None:
            os.chmod(self.run_dir, 0o711)  # [app] user set since the start: see run()
        use_app_python(config.env, config.python, self.run_dir)
        if (config.static != self.config.static or config.mount != self.config.mount
                or {k: v for k, v in config.server.items() if k != "tls"}
                != {k: v for k, v in self.config.server.items() if k != "tls"}):
            log.warning("%s: changes to [server], [static] and [app] mount take effect "
                        "at the next start, not at a restart", config.source)
        config.server, config.static, config.mount = (
            self.config.server, self.config.static, self.config.mount)
        return config

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stop_requested = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.handle_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self.handle_hup)
        try:
            listeners = systemd.listen_sockets()  # before the pool: children must not see them
        except ValueError as exc:
            log.error("sockets passed by systemd: %s", exc)
            return EXIT_CONFIG
        run_dir = Path(tempfile.mkdtemp(prefix="corral-"))
        self.run_dir = run_dir
        if self.config.run_as is not None:
            # Workers of [app] user reach corral's package link in it (see
            # use_app_python), but may not list it; their sockets come as fd 0.
            os.chmod(run_dir, 0o711)
        use_app_python(self.config.env, self.config.python, run_dir)
        pool = Supervisor(self.config, run_dir, reload=self.reload)
        try:
            front = Front(self.config, pool)
        except OSError as exc:
            shutil.rmtree(run_dir, ignore_errors=True)
            log.error("%s: [server] access_log: cannot open %s (%s). Fix: give a file in a "
                      "folder corral may write to, \"-\" for standard error, or \"\" for none",
                      self.config.source, exc.filename, exc.strerror)
            return EXIT_CONFIG
        try:
            for sock, protocol in listeners:  # socket activation: instead of binding
                await front.start_socket(sock, protocol)
            if listeners:
                log.info("serving on the %d socket(s) systemd passed; [server] bind is not "
                         "used", len(listeners))
            for bind in [] if listeners else self.config.server["bind"]:
                try:
                    await front.start(bind)
                except OSError as exc:
                    log.error("cannot listen on %s: %s. Fix: choose another address with "
                              "--bind or [server] bind", bind, exc.strerror)
                    front.close_listeners()
                    return EXIT_CONFIG
            if not await self._start_metrics(pool):
                front.close_listeners()
                return EXIT_CONFIG
            log.info("listening on %s", ", ".join(front.addresses))
            return await self._serve(pool, front)
        finally:
            if self.metrics is not None:
                self.metrics.close()
            shutil.rmtree(run_dir, ignore_errors=True)
            for path in front.unix_paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    async def _start_metrics(self, pool: Supervisor) -> bool:
        """The /metrics listener of [server] metrics, if set; False if it cannot listen."""
        bind = self.config.server["metrics"]
        if bind is None:
            return True
        self.metrics = MetricsListener(registry_for(pool.metrics))
        try:
            await self.metrics.start(bind, self.config.server["socket_mode"],
                                     self.config.server["socket_group"])
        except OSError as exc:
            log.error("%s: [server] metrics: cannot listen on %s: %s. Fix: choose another "
                      "address, or remove metrics", self.config.source, bind,
                      exc.strerror or exc)
            self.metrics = None
            return False
        log.info("metrics at %s", self.metrics.address)
        return True

    async def _serve(self, pool: Supervisor, front: Front) -> int:
        loop = asyncio.get_running_loop()
        self.supervisor = pool
        control = ControlServer(pool, self.config.root, self.run_dir)
        await control.start()
        watching = loop.create_task(watch_restart_file(self.config.root, pool,
                                                       self.config.config_file))
        globbing = (loop.create_task(watch_globs(self.config, pool))
                    if self.config.app["watch"] else None)
        starting = loop.create_task(pool.start())
        stop = loop.create_task(self.stop_requested.wait())
        await asyncio.wait({starting, stop, pool.fatal}, return_when=asyncio.FIRST_COMPLETED)
        if pool.fatal.done():
            pass  # reported below
        elif starting.done() and pool.state == "ready":
            log.info("ready: serving %s at %s", self.config.root, ", ".join(front.addresses))
            self.notify.send("READY=1", f"STATUS=serving at {', '.join(front.addresses)}")
        elif starting.done():
            log.error("ready, but %s answers 503: %s", self.config.name, pool.failure)
            self.notify.send("READY=1", f"STATUS=answering 503: {pool.failure}")
        await asyncio.wait({stop, pool.fatal}, return_when=asyncio.FIRST_COMPLETED)
        self.notify.send("STOPPING=1", "STATUS=stopping: in-flight requests finish")
        status = 0
        if pool.fatal.done():
            log.error("%s", pool.fatal.result())
            status = EXIT_CONFIG
            starting.cancel()  # a deploy step still running is stopped
        front.close_listeners()
        control.close()
        watching.cancel()
        if globbing is not None:
            globbing.cancel()
        await front.drain(self.config.server["graceful_timeout"])
        starting.cancel()
        stop.cancel()
        await pool.stop()
        log.info("stopped")
        return status
