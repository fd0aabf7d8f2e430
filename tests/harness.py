"""Test helpers: a real `corral serve` subprocess, a raw HTTP client on real
sockets, and a raw FastCGI client built on corral's own codec.

Servers bind port 0 and the tests wait for the log line that says they are
ready; nothing here sleeps to wait for a server.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

from corral import fastcgi

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "django-site"
APPS = Path(__file__).resolve().parent / "apps"


class ServerProcess:
    """`corral serve` on an app folder, its error log collected line by line."""

    def __init__(self, app_dir: Path | str, *args: str, env: dict | None = None,
                 bind: str = "127.0.0.1:0") -> None:
        self.app_dir = Path(app_dir)
        command = [sys.executable, "-m", "corral", "serve", str(app_dir), *args]
        if bind:
            command += ["--bind", bind]
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["PYTHONPATH"] = str(ROOT)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        self.proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, env=full_env, text=True,
                                     errors="replace")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = ""
        self.port = 0

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 60.0, count: int = 1) -> str:
        """The `count`-th log line (seen or to come) matching `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [line for line in self.lines if regex.search(line)]
                if len(found) >= count:
                    return found[count - 1]
                if self._ended:
                    raise RuntimeError(f"server exited ({self.proc.wait()}) before "
                                       f"{pattern!r}; log:\n{self.log}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no log line matching {pattern!r}; log so far:\n{self.log}")
                self._changed.wait(remaining)

    def wait_ready(self, timeout: float = 120.0) -> ServerProcess:
        line = self.wait_for(r"listening on ", timeout)
        self.url = re.search(r"(http://[^\s,]+)", line).group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        self.wait_for(r"INFO ready: |ERROR ready, but ", timeout)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        self.proc.stderr.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        # Workers that outlive the supervisor keep the log pipe open; closing
        # it under the reader thread would block, so leave it to the reader.
        self._reader.join(5)
        if not self._reader.is_alive():
            self.proc.stderr.close()

    def worker_pids(self) -> list[int]:
        return children_of(self.proc.pid)


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children_of(pid: int) -> list[int]:
    """Live, non-zombie child processes of `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return sorted(found)


def copy_app(source: Path, target: Path) -> Path:
    """A copy of an app folder without generated files, for one test."""
    generated = shutil.ignore_patterns("__pycache__", "db.sqlite3", "*.log")

    def ignore(folder: str, names: list[str]) -> set[str]:
        # The app's run folder (tmp/) is not part of it either: what serving
        # it left there, or the live sockets of a `./dev serve` running now,
        # which copytree could not copy.
        skipped = generated(folder, names)
        if Path(folder) == Path(source):
            skipped |= {"tmp"} & set(names)
        return skipped

    shutil.copytree(source, target, ignore=ignore)
    static = target / "static"
    if static.exists():
        for item in static.iterdir():
            if item.name != ".gitignore":
                shutil.rmtree(item) if item.is_dir() else item.unlink()
    return target


# -- raw HTTP ---------------------------------------------------------------

def connect(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    return sock


_leftovers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def read_response(sock: socket.socket, head_only: bool = False) -> tuple[int, dict, bytes, bytes]:
    """One response from `sock`: (status, headers lower-cased, body, raw head).

    The body is read by Content-Length or chunked framing, or to the close.
    Repeated header names keep every value in a list under headers[name+'*'].
    Bytes past the response stay with the socket for the next call
    (pipelined responses).
    """
    buf = _leftovers.pop(sock, b"")

    def more() -> bytes:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed mid-response after {buf[:200]!r}")
        return data

    while b"\r\n\r\n" not in buf:
        buf += more()
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers: dict = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        key = name.decode().lower()
        headers.setdefault(key + "*", []).append(value.strip().decode("latin-1"))
        headers[key] = value.strip().decode("latin-1")
    if head_only or status in (204, 304) or 100 <= status < 200:
        _leftovers[sock] = rest
        return status, headers, b"", head
    if "content-length" in headers:
        length = int(headers["content-length"])
        while len(rest) < length:
            rest += more()
        _leftovers[sock] = rest[length:]
        return status, headers, rest[:length], head
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            while b"\r\n" not in rest:
                rest += more()
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            while len(rest) < size + 2:
                rest += more()
            body += rest[:size]
            rest = rest[size + 2:]
            if size == 0:
                _leftovers[sock] = rest
                return status, headers, body, head
    while True:
        data = sock.recv(65536)
        if not data:
            return status, headers, rest, head
        rest += data


def request(port: int, raw: bytes, timeout: float = 10.0) -> tuple[int, dict, bytes, bytes]:
    """Send raw bytes on a new connection and read one response."""
    with connect(port, timeout=timeout) as sock:
        sock.sendall(raw)
        return read_response(sock)


def read_to_close(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (or resets) the connection."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def is_closed(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True if the peer closes `sock` (EOF or reset) within `timeout`."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# -- raw FastCGI ------------------------------------------------------------

class FastCGIClient:
    """A web-server-side FastCGI connection over a real socket."""

    def __init__(self, address) -> None:
        family = socket.AF_UNIX if isinstance(address, (str, Path)) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(15)
        self.sock.connect(str(address) if family == socket.AF_UNIX else address)
        self.codec = fastcgi.ServerConnection()
        self.held: list = []  # events read past the end of the response asked for

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def events(self) -> list:
        """Events from one or more reads, at least one event."""
        if self.held:
            events, self.held = self.held, []
            return events
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("worker closed the connection")
            events = self.codec.receive_data(data)
            if events:
                return events

    def request(self, params: dict[str, str], body: bytes = b"", keep_conn: bool = True,
                request_id: int = 1) -> tuple[bytes, bytes, fastcgi.EndRequest]:
        """One whole request; returns (stdout, stderr, end)."""
        pairs = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in params.items()]
        data = fastcgi.ServerConnection.begin_request(request_id, pairs, keep_conn)
        if body:
            data += fastcgi.ServerConnection.stdin(request_id, body)
        data += fastcgi.ServerConnection.stdin(request_id, b"")
        self.send(data)
        return self.read_response(request_id)

    def read_response(self, request_id: int = 1):
        """(stdout, stderr, end) of request `request_id`; another request's
        records read meanwhile are kept for the next call."""
        stdout, stderr = bytearray(), bytearray()
        others = []
        while True:
            events = self.events()
            for index, event in enumerate(events):
                if getattr(event, "request_id", request_id) != request_id:
                    others.append(event)
                elif isinstance(event, fastcgi.Stdout):
                    stdout += event.data
                elif isinstance(event, fastcgi.Stderr):
                    stderr += event.data
                elif isinstance(event, fastcgi.EndRequest):
                    self.held = others + events[index + 1:] + self.held
                    return bytes(stdout), bytes(stderr), event


def cgi_params(method: str = "GET", uri: str = "/", body: bytes = b"", **extra: str) -> dict:
    path, _, query = uri.partition("?")
    params = {
        "REQUEST_METHOD": method, "REQUEST_URI": uri, "QUERY_STRING": query,
        "SCRIPT_NAME": "", "PATH_INFO": path, "SERVER_NAME": "localhost",
        "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1",
        "GATEWAY_INTERFACE": "CGI/1.1",
    }
    if body:
        params["CONTENT_LENGTH"] = str(len(body))
    params.update(extra)
    return params


class WorkerProcess:
    """`python -m corral.worker` listening on a unix socket in a temp folder."""

    def __init__(self, app: str, socket_dir: Path, *args: str, env: dict | None = None) -> None:
        self.path = socket_dir / "worker.sock"
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(APPS)])
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral.worker", app, "--bind", f"unix:{self.path}", *args],
            stderr=subprocess.PIPE, env=full_env, text=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if "listening on" in line:
                self._ready.set()
        self._ready.set()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float = 30.0) -> WorkerProcess:
        """The worker logs that it listens only once the app has loaded."""
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            raise RuntimeError(f"worker not ready; log:\n{self.log}")
        return self

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
        return self.log


def require_tool(name: str) -> str:
    """The path of the program `name`, which a test needs.  Missing, the test
    skips, naming it; under CI (env var CI set) it fails instead, because CI
    installs its tools and a skip there would hide a lost install step."""
    import pytest  # here, not at the top: the rest of this module needs no pytest

    path = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if path is None:
        message = f"{name} is not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{message}, and CI is set")
        pytest.skip(message)
    return path
