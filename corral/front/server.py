"""The front as a whole: listening sockets, the router (static mapping or
app, longest prefix first), dispatch into the pool, the access log and the
graceful stop.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import socket
import ssl
import stat
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from corral.config import AppConfig, Bind
from corral.front import static
from corral.front.errors import HTTPError
from corral.front.fcgi_listener import FastCGIListenerConnection
from corral.front.http import CONNECTION_CLOSE, CONNECTION_KEEP_ALIVE, HttpConnection, Request
from corral.front.static import StaticMapping
from corral.front.upstream import BEHIND_BODY, FRAME_PARAM

log = logging.getLogger("corral.error")

_ESCAPE = {i: f"\\x{i:02x}" for i in range(32)} | {0x22: '\\"', 0x5C: "\\\\", 0x7F: "\\x7f"}


def _field(value: bytes | None) -> str:
    """An access-log field: '-' when missing, quotes and controls escaped."""
    if not value:
        return "-"
    return value.decode("latin-1").translate(_ESCAPE)


_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=-]{1,200}")


class AccessLog:
    """One line per response, written straight to a file: Apache combined
    format, or a JSON object per line with the timings and the worker."""

    def __init__(self, target: str, root: Path, form: str = "combined") -> None:
        """`target`: a file (relative to the app folder `root`, its folder
        made if missing), "-" for standard error, or "" for none.  OSError
        if the file cannot be opened."""
        self.out = None
        if target == "-":
            self.out = sys.stderr
        elif target:
            path = root / target
            path.parent.mkdir(parents=True, exist_ok=True)
            self.out = open(path, "a", encoding="utf-8", buffering=1)
        self._second = 0
        self._stamp = ""
        if form == "json":
            self.write = self.write_json

    def write_json(self, conn: HttpConnection, request: Request) -> None:
        if self.out is None:
            return
        done = time.monotonic()
        method = getattr(request, "method", b"-")
        headers = {name.lower(): value for name, value in request.headers}
        routed = request.routed or done
        record = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "remote_addr": str(conn.peer[0]) or None,
            "request_id": request.request_id or None,
            "method": method.decode("latin-1"),
            "target": request.target.decode("latin-1"),
            "protocol": f"HTTP/{getattr(request, 'version', '1.1')}",
            "status": request.status or None,
            "bytes": request.sent,
            "referer": _text(headers.get(b"referer")),
            "user_agent": _text(headers.get(b"user-agent")),
            "worker_pid": request.worker_pid,
            # Waiting for a worker, then the worker's time up to the last byte
            # handed to the client's connection; total from the request's end.
            "queue_ms": round(((request.attached or done) - routed) * 1000, 3),
            "app_ms": round((done - request.attached) * 1000, 3) if request.attached else None,
            "total_ms": round((done - routed) * 1000, 3),
        }
        self.out.write(json.dumps(record, separators=(",", ":")) + "\n")

    def write(self, conn: HttpConnection, request: Request) -> None:
        if self.out is None:
            return
        now = time.time()
        if int(now) != self._second:
            self._second = int(now)
            self._stamp = time.strftime("%d/%b/%Y:%H:%M:%S %z", time.localtime(now))
        method = getattr(request, "method", None)
        line = (f"{request.method.decode('latin-1')} {_field(request.target)} "
                f"HTTP/{request.version}") if method and method != b"-" else "-"
        referer = agent = None
        for name, value in request.headers:
            lower = name.lower()
            if lower == b"referer":
                referer = value
            elif lower == b"user-agent":
                agent = value
        self.out.write(
            f'{conn.peer[0] or "-"} - - [{self._stamp}] "{line.translate(_ESCAPE)}" '
            f'{request.status or "-"} {request.sent or "-"} "{_field(referer)}" '
            f'"{_field(agent)}"\n')


_ALLOW_ALL = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


def set_socket_access(path: str, mode: str, group: str | None) -> None:
    """Give a unix socket of ours the mode (and group) [server] asks for: a
    web server in front, running as another user, must be able to connect."""
    if group:
        import grp
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise OSError(errno.EINVAL, f"[server] socket_group: no group {group!r}",
                          path) from None
        os.chown(path, -1, gid)
    os.chmod(path, int(mode, 8))


def remove_stale_socket(path: str) -> None:
    """Remove a unix socket left by a run that ended without cleaning up;
    one that something still listens on is in use (OSError)."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return  # not a socket: let bind() say what is wrong
    except FileNotFoundError:
        return
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)
            return
        except OSError:
            return
    raise OSError(errno.EADDRINUSE, "another server listens on this socket", path)


def forwarded_client(value: bytes, trusted) -> bytes:
    """The client's address from an X-Forwarded-For chain: the last address
    that is not one of our trusted proxies (the ones before it could have
    been written by the client itself)."""
    for hop in reversed([h.strip() for h in value.split(b",")]):
        if hop and hop.decode("latin-1") not in trusted:
            return hop
    return b""


_CGI_NAMES: dict[bytes, bytes] = {}  # field name as sent -> its CGI name


def _cgi_name(name: bytes) -> bytes:
    key = _CGI_NAMES.get(name)
    if key is None:
        key = b"HTTP_" + name.upper().replace(b"-", b"_")
        if len(_CGI_NAMES) < 1024:  # the usual few hundred spellings; not every odd one
            _CGI_NAMES[name] = key
    return key


BACKLOG = 1024
# accept() errors that mean "out of descriptors or memory for now": wait and
# try again, leaving the clients in the kernel's backlog meanwhile.
_EXHAUSTED = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
EXHAUSTED_PAUSE = 0.1  # seconds between tries when accept() is out of resources


class Acceptor:
    """Accepts connections on one listening socket for the front.

    Ours rather than the event loop's own server, for one reason: when the
    process runs out of file descriptors, libuv accepts and drops the waiting
    clients without a word.  Here accepting pauses instead, the clients wait
    in the backlog, and the error log says so once per shortage.
    """

    def __init__(self, sock: socket.socket, factory, tls, handshake_timeout: float) -> None:
        self.sock = sock
        self.factory = factory
        self.tls = tls
        # A TLS handshake is part of the request head: the same time limit.
        self.handshake_timeout = handshake_timeout if tls else None
        self.loop = asyncio.get_running_loop()
        self.short_since = 0.0  # when accept() last ran short, 0 when it does not
        self.refused = 0
        self.closed = False
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self.accept)

    @property
    def sockets(self) -> list[socket.socket]:
        return [self.sock]

    def accept(self) -> None:
        for _ in range(64):  # a burst at a time, then other work gets a turn
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self.run_short(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that client is gone already; the next one may not be
                raise
            if self.short_since:
                log.warning("accepting again after %.1f s without file descriptors",
                            time.monotonic() - self.short_since)
                self.short_since = 0.0
            conn.setblocking(False)
            if conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.loop.create_task(self.connect(conn))

    async def connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(
                self.factory, conn, ssl=self.tls, ssl_handshake_timeout=self.handshake_timeout)
        except (OSError, ssl.SSLError) as exc:
            log.debug("connection dropped before it started: %s", exc)
            conn.close()

    def run_short(self, exc: OSError) -> None:
        if not self.short_since:
            self.short_since = time.monotonic()
            log.error("cannot accept a connection: %s; pausing accepts, clients wait in the "
                      "backlog (raise the open-file limit, or lower the load)", exc.strerror)
        self.loop.remove_reader(self.sock.fileno())
        self.loop.call_later(EXHAUSTED_PAUSE, self.resume)

    def resume(self) -> None:
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self.accept)
            self.accept()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


class Front:
    """Accepts clients and answers them from static files or the app's pool."""

    def __init__(self, config: AppConfig, pool) -> None:
        self.config = config
        self.pool = pool
        self.limits = config.server
        self.mount = config.mount.encode()
        forbidden = (config.config_file,) if config.config_file else ()
        self.static = [StaticMapping(prefix, folder, forbidden)
                       for prefix, folder in config.static]
        self.access = AccessLog(config.server["access_log"], config.root,
                                config.server.get("access_log_format", "combined"))
        self.id_prefix = os.urandom(4).hex().encode()  # request ids: unique across restarts
        self.id_count = 0
        self.connections: set[HttpConnection] = set()
        self.servers: list[Acceptor] = []
        self.stopping = False
        self.requests_seen = 0
        self.addresses: list[str] = []
        self.unix_paths: list[str] = []  # sockets we bound, removed when we stop

    async def start(self, bind: Bind) -> None:
        """Listen on `bind`, for HTTP clients or for a web server's FastCGI."""
        if bind.path:
            remove_stale_socket(bind.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(bind.path)
                set_socket_access(bind.path, self.limits["socket_mode"],
                                  self.limits["socket_group"])
            except OSError:
                sock.close()
                raise
            self.unix_paths.append(bind.path)
        else:
            family = socket.AF_INET6 if ":" in bind.host else socket.AF_INET
            try:
                sock = socket.create_server((bind.host, bind.port), family=family,
                                            reuse_port=False)
            except socket.gaierror as exc:
                raise OSError(exc.errno, f"{bind.host}: {exc.strerror}") from None
        tls = self.limits.get("tls") if bind.protocol == "http" else None
        self.listen(sock, bind.protocol, tls)

    async def start_socket(self, sock: socket.socket, protocol: str = "http") -> None:
        """Serve on `sock`, which listens already (a socket systemd passed),
        for HTTP clients or, with protocol "fastcgi", a web server.  A unix
        socket's file is left in place on stop: whoever made it owns it."""
        tls = self.limits.get("tls") if protocol == "http" else None
        self.listen(sock, protocol, tls)

    def listen(self, sock: socket.socket, protocol: str, tls) -> None:
        """Accept on the bound socket `sock`; note its address for the log."""
        sock.listen(BACKLOG)
        if protocol == "fastcgi":
            factory = lambda: FastCGIListenerConnection(self)  # noqa: E731
        else:
            factory = lambda: HttpConnection(self)  # noqa: E731
        self.servers.append(Acceptor(sock, factory, tls, self.limits["header_timeout"]))
        scheme = "fastcgi+" if protocol == "fastcgi" else ""
        name = sock.getsockname()
        if isinstance(name, tuple):
            host = f"[{name[0]}]" if ":" in name[0] else name[0]
            web = "https://" if tls else "http://"
            self.addresses.append(f"{scheme or web}{'tcp:' if scheme else ''}"
                                  f"{host}:{name[1]}")
        else:
            self.addresses.append(f"{scheme}unix:{name}")

    def request_id(self, request: Request) -> str:
        """The client's (or its proxy's) X-Request-ID when it is a sane token,
        else one of ours, which the app then sees as HTTP_X_REQUEST_ID."""
        given = False
        for name, value in request.headers:
            if len(name) == 12 and name.lower() == b"x-request-id":
                if _REQUEST_ID.fullmatch(value):
                    return value.decode("latin-1")
                given = True
        self.id_count += 1
        new = b"%s-%x" % (self.id_prefix, self.id_count)
        if given:  # not a sane token: replaced by ours
            request.headers = [(n, v) for n, v in request.headers
                               if n.lower() != b"x-request-id"]
        request.headers.append((b"X-Request-ID", new))
        return new.decode("latin-1")

    # -- routing -------------------------------------------------------------

    def route(self, conn: HttpConnection, request: Request) -> None:
        path = request.path
        for mapping in self.static:
            if mapping.matches(path):
                found = mapping.resolve(path)
                if found is None:
                    conn.respond_error(HTTPError("no such file", 404))
                elif request.method not in (b"GET", b"HEAD"):
                    conn.respond_error(HTTPError("static files are read-only", 405,
                                                 [(b"Allow", b"GET, HEAD")]))
                else:
                    asyncio.get_running_loop().create_task(
                        static.serve(conn, request, found, mapping.folder))
                return
        mount = self.mount
        if mount and not (path == mount or path.startswith(mount + b"/")):
            conn.respond_error(HTTPError("not under any app or static mapping", 404))
            return
        if path == b"*":
            conn.respond(200, b"OK", [(b"Allow", _ALLOW_ALL)], b"")
            return
        self.dispatch(conn, request)

    def params(self, conn: HttpConnection, request: Request) -> list[tuple[bytes, bytes]]:
        """The CGI/FastCGI params for `request` (RFC 3875 4.1)."""
        cgi = conn.cgi
        if cgi is None:
            cgi = conn.cgi = self.connection_params(conn)
        local_port, remote_addr, remote_port, https, proxied = cgi
        host = request.host
        if host.rfind(b":") > host.rfind(b"]"):  # a port, not part of an IPv6 literal
            server_name, _, server_port = host.rpartition(b":")
        else:
            server_name, server_port = host, local_port
        if not conn.keep_alive:
            connection = CONNECTION_CLOSE
        elif request.version == "1.0":
            connection = CONNECTION_KEEP_ALIVE
        else:
            connection = b""
        params = [
            # First, so that a link to a worker that is not corral's can drop it.
            (FRAME_PARAM, connection),
            (b"GATEWAY_INTERFACE", b"CGI/1.1"),
            (b"SERVER_SOFTWARE", b"corral"),
            (b"REQUEST_METHOD", request.method),
            (b"REQUEST_URI", request.target),
            (b"QUERY_STRING", request.query),
            # SCRIPT_NAME, PATH_INFO and, for a document root, SCRIPT_FILENAME:
            # the engine's business, so the pool says.
            *self.pool.script_params(request.path),
            (b"SERVER_PROTOCOL", b"HTTP/" + request.version.encode()),
            (b"SERVER_NAME", server_name or b"localhost"),
            (b"SERVER_PORT", server_port or local_port),
            (b"REMOTE_ADDR", remote_addr),
            (b"REMOTE_PORT", remote_port),
        ]
        if request.body_size or request.content_length is not None or request.chunked:
            params.append((b"CONTENT_LENGTH", b"%d" % request.body_size))
        seen: dict[bytes, int] = {}
        for name, value in request.headers:
            lower = name.lower()
            if lower == b"content-type":
                params.append((b"CONTENT_TYPE", value))
                continue
            if lower in (b"content-length", b"transfer-encoding", b"expect") or b"_" in name:
                # The body is de-chunked and counted; and a name with "_" would
                # collide with a "-" name in the environ, so it is not passed.
                continue
            if lower in (b"x-forwarded-for", b"x-forwarded-proto"):
                if not proxied:
                    continue  # anyone can write these: believed from our proxies only
                if lower == b"x-forwarded-proto":
                    https = value.strip().lower() == b"https"
                else:
                    client = forwarded_client(value, self.limits["trusted_proxies"])
                    if client:
                        params = [(k, client if k == b"REMOTE_ADDR" else v)
                                  for k, v in params]
            key = _cgi_name(name)
            if key in seen:  # repeated fields are joined (RFC 9110 5.3)
                index = seen[key]
                sep = b"; " if lower == b"cookie" else b", "
                params[index] = (key, params[index][1] + sep + value)
            else:
                seen[key] = len(params)
                params.append((key, value))
        if https:
            params += [(b"HTTPS", b"on"), (b"REQUEST_SCHEME", b"https")]
        return params

    def connection_params(self, conn: HttpConnection) -> tuple:
        """The part of the params that is the same for every request of a
        connection: the local port (for a Host without one), the client's
        address and port, TLS, and whether the client is a trusted proxy."""
        local = conn.transport.get_extra_info("sockname")
        local_port = str(local[1]).encode() if isinstance(local, tuple) else b"80"
        https = conn.transport.get_extra_info("ssl_object") is not None
        proxied = str(conn.peer[0]) in (self.limits.get("trusted_proxies") or ())
        return (local_port, str(conn.peer[0]).encode(), str(conn.peer[1]).encode(),
                https, proxied)

    def dispatch(self, conn: HttpConnection, request: Request) -> None:
        body = request.body if request.body is not None else b""
        self.to_pool(conn, self.params(conn, request), body)

    def to_pool(self, handler, params, body) -> None:
        """Send one request to a free worker, or queue it for the next.

        `handler` is the client side (an HTTP connection, or a web server's
        FastCGI connection): it is given the link with attach(), then the
        response through the upstream_* calls, or the 503 that ends a wait
        through respond_error().
        """
        link = self.pool.acquire_nowait()
        # A small body may go behind a busy worker's request (see Link).
        behind_ok = isinstance(body, (bytes, bytearray)) and len(body) <= BEHIND_BODY
        if link is None and behind_ok:
            link = self.pool.acquire_behind()
        if link is not None:
            handler.attach(link)
            link.start(params, body, handler)
            return

        def granted(link, error) -> None:
            if error is not None:
                if not handler.lost:
                    log.warning("503 for %s: %s", handler.describe(), error.reason)
                    handler.respond_error(error)
                return
            if handler.lost:
                self.pool.release(link)
                return
            handler.attach(link)
            link.start(params, body, handler)

        self.pool.wait_for_link(granted, behind_ok)

    def log_access(self, conn: HttpConnection, request: Request) -> None:
        self.access.write(conn, request)
        self.pool.metrics.request(request.status, request.routed, request.attached)
        # 501 and 505 are the client's doing, 503 is logged where it is decided.
        if request.status >= 500 and request.status not in (501, 503, 505):
            log.error("%s for %s %s (worker pid %s): %s", request.status,
                      request.method.decode("latin-1"), request.target.decode("latin-1"),
                      request.worker_pid or "-", request.error or "the app answered so")

    # -- stopping ------------------------------------------------------------

    def close_listeners(self) -> None:
        for server in self.servers:
            server.close()

    async def drain(self, timeout: float) -> bool:
        """Stop taking requests and wait for the ones in flight; True if all finished."""
        self.stopping = True
        self.close_listeners()
        deadline = time.monotonic() + timeout
        while True:
            for conn in list(self.connections):
                if conn.current is None and not conn.pipeline:
                    conn.transport.close()  # idle keep-alive: nothing to lose
            if not self.connections:
                return True
            if time.monotonic() >= deadline:
                log.warning("%d connections still busy after the %.0f s graceful timeout",
                            len(self.connections), timeout)
                for conn in list(self.connections):
                    conn.transport.abort()
                return False
            await asyncio.sleep(0.05)
