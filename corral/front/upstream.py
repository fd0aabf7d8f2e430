"""The front's side of FastCGI: one kept connection (a link) to one worker.

A link carries one request at a time.  It encodes the request with the codec,
turns the worker's STDOUT back into a status, checked headers and body, and
hands them to the request's handler.  A worker that breaks the protocol or
sends an unsafe head costs that request a 502, never the front.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from corral import fastcgi
from corral.fastcgi import EndRequest, ServerConnection, Stderr, Stdout, ValuesResult
from corral.front.errors import GatewayError

log = logging.getLogger("corral.error")

MAX_HEAD = 64 * 1024  # largest CGI response head accepted from a worker
BODY_PIECE = 1 << 16  # request bodies from a spool file go out in pieces this big
REQUEST_ID = 1  # one request per connection at a time: the id never varies

_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                   b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_CONTROLS = bytes(i for i in range(32) if i != 9) + b"\x7f"


def parse_cgi_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """Status code, reason and headers of a CGI response head (RFC 3875 6.2).

    The front re-serializes this head, so it checks again what the worker
    should have checked: a control byte anywhere is refused (GatewayError).
    """
    status, reason = 200, b"OK"
    headers = []
    has_status = False
    location = False
    for line in head.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            continue
        name, sep, value = line.partition(b":")
        value = value.strip(b" \t")
        if (not sep or not name or not _TOKEN.issuperset(name)
                or value.translate(None, _CONTROLS) != value):
            raise GatewayError(f"worker sent an invalid response header line {line[:80]!r}")
        lower = name.lower()
        if lower == b"status":
            code, _, reason = value.partition(b" ")
            if len(code) != 3 or not code.isdigit() or not 100 <= int(code) <= 999:
                raise GatewayError(f"worker sent an invalid Status {value[:80]!r}")
            status, has_status = int(code), True
            reason = reason or b"Unknown"
            continue
        if lower == b"location":
            location = True
        elif lower == b"content-length":
            if not value.isdigit() or any(n.lower() == b"content-length" and v != value
                                          for n, v in headers):
                raise GatewayError(f"worker sent an invalid Content-Length {value[:80]!r}")
            if any(n.lower() == b"content-length" for n, _ in headers):
                continue  # an identical repeat: one is enough
        headers.append((name, value))
    if location and not has_status:
        status, reason = 302, b"Found"
    return status, reason, headers


class Link(asyncio.Protocol):
    """A kept FastCGI connection to one worker, free or serving one request."""

    def __init__(self, worker, on_lost) -> None:
        self.worker = worker  # the pool's record of the process (pid, ...)
        self.on_lost = on_lost  # called once with this link when the connection ends
        self.transport: asyncio.Transport | None = None
        self.codec = ServerConnection()
        self.handler = None  # the request being served, or None when free
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.head = bytearray()
        self.head_done = False
        self.answered = False  # the worker sent anything for the current request
        self.sent_at = 0.0  # when the current request was sent (monotonic)
        self.closed = False
        self._drained: asyncio.Future | None = None
        self._probe: socket.socket | None = None

    # asyncio callbacks

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # A second handle on the same socket, only to peek at it (see alive()).
            self._probe = socket.socket(fileno=os.dup(sock.fileno()))
        # The worker answers GET_VALUES only once it has imported the app and
        # accepted us: that answer is its readiness signal.
        transport.write(ServerConnection.get_values([b"FCGI_MPXS_CONNS"]))

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("worker closed the connection"))
            # Marked as seen: nobody may be waiting any more (the pool is
            # stopping), and the reaper reports the worker's exit anyway.
            self.ready.exception()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self.on_lost(self)

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    def data_received(self, data: bytes) -> None:
        try:
            events = self.codec.receive_data(data)
        except fastcgi.ProtocolError as exc:
            self.fail(GatewayError(f"worker broke the FastCGI protocol: {exc}"))
            return
        handler = self.handler
        if handler is not None and events:
            self.answered = True
        body = []
        started = False  # the head became complete in this batch
        for event in events:
            kind = type(event)
            if kind is Stdout:
                if not event.data:
                    continue
                if self.head_done:
                    body.append(event.data)
                    continue
                self.head += event.data
                end = self.head.find(b"\r\n\r\n")
                cut = 4
                if end < 0:
                    end, cut = self.head.find(b"\n\n"), 2
                if end < 0:
                    if len(self.head) > MAX_HEAD:
                        self.fail(GatewayError("worker sent a response head over 64 KiB"))
                        return
                    continue
                try:
                    status = parse_cgi_head(bytes(self.head[:end]))
                except GatewayError as exc:
                    self.fail(exc)
                    return
                rest = bytes(self.head[end + cut:])
                self.head_done, started = True, True
                if rest:
                    body.append(rest)
            elif kind is EndRequest:
                self.handler = None
                if handler is None:
                    continue
                if type(handler) is _Discard:
                    log.info("worker pid %s ended an abandoned request; free again",
                             self.worker.pid)
                if not self.head_done:
                    handler.upstream_failed(GatewayError(
                        f"worker pid {self.worker.pid} ended the request without a response"))
                elif started:
                    handler.upstream_whole(*status, b"".join(body))
                else:
                    for piece in body:
                        handler.upstream_body(piece)
                    handler.upstream_end()
                self.head.clear()
                self.head_done = False
                self.worker.request_done(self)
                return
            elif kind is Stderr:
                text = event.data.decode("utf-8", "replace").rstrip()
                if text:
                    log.warning("worker pid %s stderr: %s", self.worker.pid, text)
            elif kind is ValuesResult and not self.ready.done():
                self.ready.set_result(event.values)
        if handler is None:
            return
        if started:
            handler.upstream_head(*status)
        for piece in body:
            handler.upstream_body(piece)

    # used by the pool and the front

    def alive(self) -> bool:
        """False if the worker has already closed its end.

        A worker that died while idle leaves an end-of-file waiting on the
        socket that the event loop may not have read yet; a request sent
        there would fail although no worker ever had it.  One non-blocking
        peek before each dispatch closes that window.
        """
        if self.closed or self._probe is None:
            return not self.closed
        try:
            return self._probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    def start(self, params, body, handler) -> None:
        """Send one request; `body` is bytes or a file positioned at its start."""
        self.handler = handler
        self.answered = False
        self.sent_at = time.monotonic()
        self.worker.request_started(self)  # arms [app] request_timeout
        head = ServerConnection.begin_request(REQUEST_ID, params)
        if isinstance(body, (bytes, bytearray)):
            if body:
                head += ServerConnection.stdin(REQUEST_ID, body)
            self.transport.write(head + ServerConnection.stdin(REQUEST_ID, b""))
        else:
            self.transport.write(head)
            asyncio.get_running_loop().create_task(self._send_file(body))

    async def _send_file(self, body) -> None:
        while not self.closed:
            piece = body.read(BODY_PIECE)
            if not piece:
                self.transport.write(ServerConnection.stdin(REQUEST_ID, b""))
                return
            self.transport.write(ServerConnection.stdin(REQUEST_ID, piece))
            if self._drained is not None:
                await self._drained

    def abort(self) -> None:
        """The client went away: ask the worker to stop; the link stays busy
        until END_REQUEST, so a request never lands on a worker still at work."""
        if self.handler is not None and not self.closed:
            log.info("client gone: asking worker pid %s to stop its request", self.worker.pid)
            self.handler = _Discard()
            self.transport.write(ServerConnection.abort_request(REQUEST_ID))

    def fail(self, error: GatewayError) -> None:
        """This connection cannot go on: fail its request and close it."""
        handler, self.handler = self.handler, None
        log.error("worker pid %s: %s", self.worker.pid, error.reason)
        if handler is not None:
            handler.upstream_failed(error)
        if self.transport is not None:
            self.transport.close()

    def pause(self) -> None:
        if not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self.closed:
            self.transport.resume_reading()


class _Discard:
    """Stands in for a request whose client has gone: output is dropped."""

    def upstream_head(self, *args) -> None: pass
    def upstream_whole(self, *args) -> None: pass
    def upstream_body(self, data) -> None: pass
    def upstream_end(self) -> None: pass
    def upstream_failed(self, error) -> None: pass
    def upstream_retry(self, error) -> None: pass
