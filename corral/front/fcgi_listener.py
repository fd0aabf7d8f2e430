"""The front's FastCGI listener: a web server in front (nginx, Apache) sends
its requests here over FastCGI, and they go into the same pool, queue and
deploy-step hold as the front's own HTTP requests.

The web server has parsed HTTP already and sends CGI params; they are passed
on to the worker as they came, except CONTENT_LENGTH, which is set to the body
that really arrived (the body is buffered whole first, as for HTTP clients).
Static files are the web server's job here; access logging too.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile

from corral import fastcgi
from corral.fastcgi import AbortRequest, BeginRequest, Params, Stdin
from corral.front.errors import GatewayError, HTTPError
from corral.front.http import RETRYABLE, SPOOL_THRESHOLD, WRITE_HIGH_WATER

log = logging.getLogger("corral.error")

# What GET_VALUES learns of us: many connections, one request on each at a
# time (requests queue in the pool, not on the web server's connection).
LISTENER_VALUES = {b"FCGI_MAX_CONNS": b"4096", b"FCGI_MAX_REQS": b"4096",
                   b"FCGI_MPXS_CONNS": b"0"}


def cgi_head(status: int, reason: bytes, headers) -> bytes:
    """A CGI response head (RFC 3875 6.2) for the web server to turn into HTTP."""
    out = [b"Status: %d %s\r\n" % (status, reason)]
    for name, value in headers:
        out += (name, b": ", value, b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


class FastCGIListenerConnection(asyncio.Protocol):
    """One connection from the web server; it carries one request at a time
    (we announce FCGI_MPXS_CONNS 0), possibly many in a row (FCGI_KEEP_CONN)."""

    def __init__(self, front) -> None:
        self.front = front  # corral.front.server.Front
        self.codec = fastcgi.AppConnection(values=LISTENER_VALUES)
        self.transport: asyncio.Transport | None = None
        self.current: Exchange | None = None
        self.pipeline = ()  # nothing queues behind the current request (drain() asks)
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.front.connections.add(self)
        log.debug("FastCGI listener: a web server connected (%d connections)",
                  len(self.front.connections))

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.front.connections.discard(self)
        if self.current is not None:
            self.current.abandon()

    def pause_writing(self) -> None:
        if self.current is not None and self.current.link is not None:
            self.current.link.pause()

    def resume_writing(self) -> None:
        if self.current is not None and self.current.link is not None:
            self.current.link.resume()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.codec.receive_data(data)
        except fastcgi.ProtocolError as exc:
            log.warning("FastCGI listener: the web server broke the protocol (%s); "
                        "closing its connection", exc)
            self.transport.close()
            return
        answers = self.codec.data_to_send()  # GET_VALUES_RESULT, CANT_MPX_CONN, ...
        if answers:
            self.transport.write(answers)
        for event in events:
            kind = type(event)
            if kind is BeginRequest:
                self.current = Exchange(self, event.request_id)
                continue
            exchange = self.current
            if exchange is None:
                continue  # the codec only passes on events of the active request
            if kind is Stdin:
                exchange.body_data(event.data)
            elif kind is Params:
                exchange.params = event.params
            elif kind is AbortRequest:
                exchange.aborted()

    def finish(self, exchange: Exchange) -> None:
        """`exchange` has been answered in full: END_REQUEST, then keep the
        connection for the next request or close it, as the web server asked."""
        if self.current is not exchange:
            return
        self.current = None
        if self.lost:
            return
        self.transport.write(self.codec.finish())
        if not self.codec.keep_conn or self.front.stopping:
            self.transport.close()


class Exchange:
    """One request from the web server, as the pool's handler sees it."""

    def __init__(self, conn: FastCGIListenerConnection, request_id: int) -> None:
        self.conn = conn
        self.request_id = request_id
        self.params: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.body_size = 0
        self.link = None
        self.worker_pid = None
        self.head_sent = False
        self.done = False  # answered, aborted or abandoned: ignore what comes
        self.retried = False
        self.refused = False  # answered while its body was still arriving

    # -- the request -----------------------------------------------------------

    def param(self, name: bytes) -> bytes:
        for key, value in self.params:
            if key == name:
                return value
        return b""

    def body_data(self, data: bytes) -> None:
        if self.refused:
            return
        if not data:
            self.dispatch()
            return
        self.body_size += len(data)
        limit = self.conn.front.limits["max_body"]
        if self.body_size > limit:
            self.refused = True
            self.respond_error(HTTPError(f"request body over {limit} bytes", 413))
            return
        body = self.body
        if isinstance(body, bytearray):
            if len(body) + len(data) <= SPOOL_THRESHOLD:
                body += data
                return
            spool = tempfile.TemporaryFile()
            spool.write(body)
            self.body = body = spool
        body.write(data)

    def dispatch(self) -> None:
        params = [(name, value) for name, value in self.params if name != b"CONTENT_LENGTH"]
        if self.body_size or self.param(b"CONTENT_LENGTH"):
            # The length that arrived, whatever the web server announced: a
            # chunked upload comes with none, and frameworks read exactly
            # CONTENT_LENGTH bytes.
            params.append((b"CONTENT_LENGTH", b"%d" % self.body_size))
        self.params = params
        body = self.body
        if not isinstance(body, bytearray):
            body.seek(0)
        self.conn.front.to_pool(self, params, body)

    def close_body(self) -> None:
        if not isinstance(self.body, bytearray):
            self.body.close()
        self.body = bytearray()

    # -- what the pool and the link call (see Front.to_pool and upstream.Link) --

    @property
    def lost(self) -> bool:
        return self.done or self.conn.lost

    def attach(self, link) -> None:
        self.link = link
        self.worker_pid = link.worker.pid

    def describe(self) -> str:
        method = self.param(b"REQUEST_METHOD").decode("latin-1") or "-"
        uri = self.param(b"REQUEST_URI") or self.param(b"SCRIPT_NAME") + self.param(b"PATH_INFO")
        return f"{method} {uri.decode('latin-1')} (FastCGI listener)"

    def write(self, data: bytes) -> None:
        if not self.lost and data:
            self.conn.transport.write(fastcgi.AppConnection.stdout(self.request_id, data))

    def upstream_head(self, status, reason, headers) -> None:
        self.head_sent = True
        self.write(cgi_head(status, reason, headers))

    def upstream_body(self, data: bytes) -> None:
        self.write(data)

    def upstream_end(self) -> None:
        self.end()

    def upstream_whole(self, status, reason, headers, body) -> None:
        self.head_sent = True
        self.write(cgi_head(status, reason, headers) + body)
        self.end()

    def respond_error(self, error: HTTPError) -> None:
        page = getattr(error, "page", None)
        text = page if page is not None else f"{error.status} {error.phrase}: {error.reason}\n"
        ctype = b"text/html; charset=utf-8" if page else b"text/plain; charset=utf-8"
        self.upstream_whole(error.status, error.phrase.encode(),
                            [(b"Content-Type", ctype), *error.headers], text.encode())

    def upstream_failed(self, error: GatewayError) -> None:
        if self.lost:
            return
        log.error("%s for %s (worker pid %s): %s", error.status, self.describe(),
                  self.worker_pid or "-", error.reason)
        if self.head_sent:
            # Part of the response is out: ending the request normally would
            # pass a truncated body off as whole, so the connection goes.
            self.done = True
            self.close_body()
            self.conn.transport.abort()
            return
        self.upstream_whole(error.status, error.phrase.encode(),
                            [(b"Content-Type", b"text/plain; charset=utf-8")],
                            f"{error.status} {error.phrase}\n".encode())

    def upstream_retry(self, error: GatewayError) -> None:
        if self.lost:
            return
        if self.param(b"REQUEST_METHOD") not in RETRYABLE or self.retried:
            self.upstream_failed(error)
            return
        self.retried = True
        self.link = None
        log.warning("%s; sending %s to another worker", error.reason, self.describe())
        if not isinstance(self.body, bytearray):
            self.body.seek(0)
        self.conn.front.to_pool(self, self.params, self.body)

    def upstream_resend(self) -> None:
        """Sent behind another request on a worker that went away before
        beginning it: to another worker, whatever the method."""
        if self.lost:
            return
        self.link = None
        self.conn.front.to_pool(self, self.params, self.body)

    # -- endings ---------------------------------------------------------------

    def end(self) -> None:
        if self.done:
            return
        self.done = True
        self.link = None
        self.close_body()
        self.conn.finish(self)

    def aborted(self) -> None:
        """The web server gave up on the request (its client went away)."""
        if self.done:
            return
        if self.link is not None:
            self.link.abort(self)  # the worker stops; its link stays busy until END_REQUEST
        self.end()

    def abandon(self) -> None:
        """The web server's connection is gone."""
        if self.link is not None:
            self.link.abort(self)
        self.done = True
        self.link = None
        self.close_body()
