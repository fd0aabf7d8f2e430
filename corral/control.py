"""Asking a running server for a restart or its status: the control socket
(`corral restart`, `corral status`), the restart file tmp/restart.txt and
the config file, watched for changes, and the app's files matching
[app] watch, watched through inotify (the watchfiles library).

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
import re
import socket
import stat
from pathlib import Path

log = logging.getLogger("corral.error")

SOCKET_NAME = "tmp/corral.sock"
RESTART_FILE = "tmp/restart.txt"
POLL_EVERY = 1.0  # seconds between looks at the restart file's mtime
MAX_UNIX_PATH = 107  # sun_path holds 108 bytes with its NUL
RESTART_WAIT = 900.0  # a client waits this long for a restart (deploy step included)
# [app] watch: a burst of changes (a `git pull`, an editor saving several
# files) is gathered until this much quiet, or this long at most, then makes
# one restart; one asked for while a restart runs is queued once (Supervisor).
WATCH_QUIET_MS = 300
WATCH_GATHER_MS = 2000
# Never watched, at any depth: tools' and Python's own folders.
NEVER_WATCHED = frozenset({".git", ".hg", ".venv", "venv", "__pycache__", "node_modules"})


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
            folder = self.name_file.parent
            if not folder.exists():
                folder.mkdir()
                run_as = getattr(self.supervisor.config, "run_as", None)
                if run_as is not None:
                    # The app's user (its deploys) must be able to touch
                    # tmp/restart.txt in the folder that root made.
                    os.chown(folder, run_as.uid, run_as.gid)
        except FileExistsError:
            pass
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


def glob_regex(pattern: str) -> re.Pattern:
    """A glob relative to the app folder as a regular expression for the
    whole relative path: `*` and `?` stay within one folder name, `**/`
    spans any number of folders (none included), `[abc]` is a class."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


class GlobFilter:
    """Which changed paths (absolute) count for [app] watch; the globs and
    the logs are read from the supervisor's config, which a restart renews."""

    def __init__(self, supervisor) -> None:
        self.supervisor = supervisor
        self._compiled: tuple[tuple[str, ...], list[re.Pattern]] = ((), [])

    def relative(self, path: str) -> str | None:
        """`path` relative to the app folder, if it is one that counts."""
        config = self.supervisor.config
        root = str(config.root)
        if not path.startswith(root + os.sep):
            return None
        rel = path[len(root) + 1:]
        parts = rel.split(os.sep)
        if NEVER_WATCHED.intersection(parts[:-1]) or parts[-1] in NEVER_WATCHED:
            return None
        ignored = {str(config.deploy.log), str(root / Path(SOCKET_NAME))}
        access = config.server.get("access_log")
        if access and access != "-":
            ignored.add(str(config.root / access))
        if path in ignored:
            return None
        globs = tuple(config.app.get("watch") or ())
        if globs != self._compiled[0]:
            self._compiled = (globs, [glob_regex(g) for g in globs])
        rel = rel.replace(os.sep, "/")
        return rel if any(r.match(rel) for r in self._compiled[1]) else None

    def __call__(self, change, path: str) -> bool:
        return self.relative(path) is not None


async def watch_globs(config, supervisor) -> None:
    """Restart when files of the app matching [app] watch change, one
    restart per burst of changes, its cause naming a file."""
    try:
        import watchfiles
    except ImportError:  # a dependency: only a broken install lacks it
        log.error("[app] watch: the watchfiles library is missing; files are not watched")
        return
    keep = GlobFilter(supervisor)
    log.info("watching %s for changes to %s", config.root, ", ".join(config.app["watch"]))
    try:
        async for changes in watchfiles.awatch(
                config.root, watch_filter=keep, debounce=WATCH_GATHER_MS,
                step=WATCH_QUIET_MS, rust_timeout=1000, ignore_permission_denied=True):
            paths = sorted({keep.relative(path) for _, path in changes} - {None})
            if not paths:
                continue
            more = f" and {len(paths) - 1} more files" if len(paths) > 1 else ""
            cause = f"watch: {paths[0]}{more} changed"
            log.info("%s: restarting", cause)
            supervisor.restart(cause)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # inotify limits, a folder that vanished
        log.error("[app] watch: watching %s stopped: %s (restart corral to watch again; "
                  "if inotify ran out of watches, raise fs.inotify.max_user_watches)",
                  config.root, exc)
