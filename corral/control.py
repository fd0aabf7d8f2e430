"""Asking a running server for a restart or its status: the control socket
(`corral restart`, `corral status`), the restart file tmp/restart.txt and
the config file, watched for changes.

The socket is PATH/tmp/corral.sock in the app folder, owner-only (0600).
Where that path is too long for a unix socket, the socket lives in the
server's run folder and PATH/tmp/corral.sock is a small file naming it.
One JSON line goes each way: {"command": "restart"} or {"command": "status"}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from pathlib import Path

log = logging.getLogger("corral.error")

SOCKET_NAME = "tmp/corral.sock"
RESTART_FILE = "tmp/restart.txt"
POLL_EVERY = 1.0  # seconds between looks at the restart file's mtime
MAX_UNIX_PATH = 107  # sun_path holds 108 bytes with its NUL
RESTART_WAIT = 900.0  # a client waits this long for a restart (deploy step included)


class ControlError(Exception):
    """No server to ask, or it did not answer."""


class ControlServer:
    """The server side of the control socket of one app."""

    def __init__(self, supervisor, root: Path, run_dir: Path) -> None:
        self.supervisor = supervisor
        self.name_file = root / SOCKET_NAME
        self.path: Path | None = None
        self.server: asyncio.AbstractServer | None = None
        self.run_dir = run_dir

    async def start(self) -> None:
        """Listen; on any trouble, log it and serve without a control socket."""
        try:
            self.name_file.parent.mkdir(exist_ok=True)
        except OSError as exc:
            log.warning("no control socket (corral restart/status): cannot create %s: %s",
                        self.name_file.parent, exc.strerror)
            return
        if _live(self.name_file):
            log.warning("another corral serves %s (its control socket %s answers): this "
                        "one has none", self.name_file.parent.parent, self.name_file)
            return
        with contextlib.suppress(FileNotFoundError):
            self.name_file.unlink()  # left by a server that was killed
        path = self.name_file
        if len(os.fsencode(path)) > MAX_UNIX_PATH:
            path = self.run_dir / "control.sock"
        old_mask = os.umask(0o177)  # owner-only from the start, not after a chmod
        try:
            self.server = await asyncio.start_unix_server(self._serve, path)
            os.chmod(path, 0o600)
            if path != self.name_file:
                fd = os.open(self.name_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(f"{path}\n")
        except OSError as exc:
            log.warning("no control socket (corral restart/status): %s: %s", path,
                        exc.strerror or exc)
            return
        finally:
            os.umask(old_mask)
        self.path = path
        log.info("control socket at %s", path)

    def close(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for path in {self.path, self.name_file}:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            try:
                command = json.loads(line).get("command")
            except (ValueError, AttributeError):
                command = None
            if command == "status":
                answer = {"ok": True, **self.supervisor.status()}
            elif command == "restart":
                log.info("restart asked for through the control socket")
                answer = await asyncio.shield(self.supervisor.restart("corral restart"))
            else:
                answer = {"ok": False, "message": f"unknown command {command!r}; "
                          "use restart or status"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


def _live(name_file: Path) -> bool:
    """A server answers at the socket `name_file` names."""
    try:
        path = socket_path(name_file)
    except ControlError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def socket_path(name_file: Path) -> Path:
    """The control socket PATH/tmp/corral.sock stands for."""
    try:
        mode = name_file.stat().st_mode
    except OSError:
        raise ControlError(f"no control socket at {name_file}: is corral serving "
                           "this app?") from None
    if stat.S_ISSOCK(mode):
        return name_file
    try:
        return Path(name_file.read_text().strip())
    except OSError as exc:
        raise ControlError(f"cannot read {name_file}: {exc.strerror}") from None


def ask(root: Path | str, command: str, timeout: float = 30.0) -> dict:
    """Send `command` to the server of the app in `root`; its answer."""
    path = socket_path(Path(root).resolve() / SOCKET_NAME)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps({"command": command}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                piece = sock.recv(65536)
                if not piece:
                    break
                data += piece
        except TimeoutError:
            raise ControlError(f"the server did not answer within {timeout:.0f} s") from None
        except OSError as exc:
            raise ControlError(f"cannot reach the server at {path}: "
                               f"{exc.strerror or exc}") from None
    try:
        return json.loads(data)
    except ValueError:
        raise ControlError(f"the server at {path} closed without an answer") from None


async def watch_restart_file(root: Path, supervisor, config_file: Path | None = None) -> None:
    """Restart when tmp/restart.txt is touched (created, or its mtime
    changed), or when the config file changes.  Polled: one stat a second
    per file costs nothing, needs no library, and works on every file
    system, network ones included, where inotify misses other machines'
    writes."""
    watched = {root / RESTART_FILE: f"{RESTART_FILE} touched"}
    if config_file is not None:
        watched[config_file] = f"{config_file.name} changed"

    def mtime(path: Path) -> int | None:
        try:
            return path.stat().st_mtime_ns
        except OSError:
            return None

    seen = {path: mtime(path) for path in watched}  # present at start: no trigger
    while True:
        await asyncio.sleep(POLL_EVERY)
        causes = []
        for path, cause in watched.items():
            now = mtime(path)
            if now is not None and now != seen[path]:
                causes.append(cause)
            seen[path] = now
        if causes:
            # Both in one second (an edited config, then a touch): one restart.
            log.info("%s: restarting", " and ".join(causes))
            supervisor.restart(" and ".join(causes))
