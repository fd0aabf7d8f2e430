"""The front's HTTP/1.1 connection: parsing with httptools (llhttp), limits,
timeouts, keep-alive and pipelining, and the response written back.

One `HttpConnection` per client socket.  Requests are parsed completely (the
body de-chunked and buffered, spooled to disk past a threshold) before
anything is routed, so workers only ever see whole requests and a slow client
holds no worker.  Responses go out in request order.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections import deque
from urllib.parse import unquote_to_bytes

import httptools

from corral.front.errors import (
    BadRequest,
    BodyTooLarge,
    GatewayError,
    HeadTooLarge,
    HTTPError,
    NotImplementedCoding,
    Unavailable,
    URITooLong,
)
from corral.httpdate import http_date

log = logging.getLogger("corral.error")

SPOOL_THRESHOLD = 1 << 20  # bodies above this are spooled to a temporary file
MAX_FIELDS = 200  # header fields per request
WRITE_HIGH_WATER = 1 << 20  # response bytes buffered per client before backpressure
MAX_PIPELINED = 16  # parsed requests waiting behind the one being answered
# After the last response of a connection, what the client still sends is
# read and dropped for this long (and up to this much) before the close:
# closing a socket with unread input makes the kernel send a reset, which
# can destroy the response before the client has read it.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20

_NO_BODY_STATUS = frozenset((204, 304))
# The Connection lines of a response; write_head adds them, and a worker
# that writes the head itself is asked for one (see Front.params).
CONNECTION_CLOSE = b"Connection: close\r\n"
CONNECTION_KEEP_ALIVE = b"Connection: keep-alive\r\n"
# Methods that may be sent to a second worker when the first died before
# answering anything (RFC 9110 9.2.2: repeating them changes nothing).
RETRYABLE = frozenset((b"GET", b"HEAD", b"OPTIONS"))
_HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"transfer-encoding",
                         b"te", b"trailer", b"upgrade", b"proxy-connection"))
# Fields that frame, route or qualify a request must come before the body
# (RFC 9110 6.5.1): one in a chunked body's trailer section is a smuggling
# attempt, since the front has already acted on the header section.
_FORBIDDEN_TRAILERS = frozenset((
    b"content-length", b"transfer-encoding", b"trailer", b"host", b"connection",
    b"keep-alive", b"te", b"upgrade", b"expect"))


def escape_non_ascii(line: bytes) -> bytes:
    """`line` with its raw non-ASCII bytes percent-encoded.

    RFC 9112 allows only ASCII in a request-target and llhttp refuses the
    rest, but clients do send raw UTF-8 paths; escaping them gives the app the
    same PATH_INFO as the escaped form would.  Only request lines are passed
    here: header values are left alone (obs-text is legal there).
    """
    if line.isascii():
        return line
    return b"".join(b"%%%02X" % b if b >= 0x80 else bytes((b,)) for b in line)


class Request:
    """One parsed request, as the router and the handlers see it."""

    __slots__ = ("method", "target", "version", "headers", "body", "body_size",
                 "keep_alive", "host", "path", "query", "chunked",
                 "expect_continue", "content_length", "head_size", "status",
                 "sent", "worker_pid", "error", "retried", "in_trailers",
                 "request_id", "routed", "attached")

    def __init__(self) -> None:
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = None  # bytearray, or a spooled temporary file
        self.body_size = 0
        self.chunked = False
        self.expect_continue = False
        self.content_length: int | None = None
        self.head_size = 0
        self.host = b""
        self.status = 0
        self.sent = 0
        self.worker_pid = None
        self.error = ""  # why the front answered with an error, for the log
        self.retried = False
        self.in_trailers = False  # past the head: on_header now sees trailer fields
        self.request_id = ""
        self.routed = 0.0  # monotonic: when it was whole and handed on
        self.attached = 0.0  # monotonic: when a worker took it (0: none did)

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class HttpConnection(asyncio.Protocol):
    """A client connection to the front."""

    # Thousands of these live at once (idle keep-alive clients): no __dict__.
    __slots__ = ("server", "limits", "transport", "parser", "request", "current", "pipeline",
                 "peer", "closing", "lost", "eof", "linger_left", "line_open",
                 "continue_due", "link", "keep_alive", "chunked_response", "body_expected",
                 "remaining", "deadline", "timer", "timer_kind", "_drained", "loop",
                 "cgi", "last_read")

    def __init__(self, server) -> None:
        self.server = server  # corral.front.server.Front: limits, router, logs
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.request: Request | None = None  # the one being parsed
        self.current: Request | None = None  # the one being answered
        self.pipeline: deque[Request] = deque()
        self.peer = ("", 0)
        self.closing = False
        self.lost = False
        self.eof = False  # the client half-closed: answer what it sent, then close
        self.linger_left = 0  # bytes still dropped before closing, once lingering
        self.line_open = False  # the last read ended inside a request line
        self.continue_due: Request | None = None  # asked for 100 Continue, not yet sent
        self.link = None  # the worker link serving `current`, if any
        self.keep_alive = True
        self.chunked_response = False
        self.body_expected = True
        self.remaining: int | None = None  # body bytes the response head still owes
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_kind = ""
        self._drained: asyncio.Future | None = None
        self.loop = None  # the running loop, looked up once
        self.cgi = None  # what the params of every request on it share (Front.params)
        # A request that closes the connection (Connection: close, or HTTP/1.0
        # without keep-alive) has been read: nothing after it is served.
        self.last_read = False

    # -- asyncio callbacks ---------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = peer[:2]
        self.server.connections.add(self)
        self.arm("header", self.limits["header_timeout"])

    def connection_lost(self, exc) -> None:
        self.lost = True
        self.server.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.link is not None:
            self.link.abort(self)
            self.link = None
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        for request in (self.request, self.current, *self.pipeline):
            if request is not None and request.body is not None and not isinstance(
                    request.body, bytearray):
                request.body.close()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            if self.timer_kind == "linger":
                self.linger_left -= len(data)
                if self.linger_left < 0:
                    self.transport.close()
            return
        if self.last_read:
            return  # RFC 9112 9.6: requests after the one that closes are not processed
        if self.timer_kind == "idle":
            self.arm("header", self.limits["header_timeout"])
        if self.request is None or self.line_open:
            data = self.escape_request_line(data)
        try:
            self.parser.feed_data(data)
        except HTTPError as exc:
            self.reject(exc)
        except httptools.HttpParserUpgrade:
            # An Upgrade we do not offer: the request itself is served, then
            # the connection closes (its remaining bytes are not HTTP/1.1).
            self.keep_alive = False
        except httptools.HttpParserError as exc:
            if self.last_read:
                # llhttp refuses bytes after a request that closes, in the same
                # read: they are dropped, and the requests before them served.
                return
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, HTTPError):  # raised by one of our callbacks
                self.reject(cause)
            else:
                self.reject(BadRequest(f"malformed request: {exc or type(exc).__name__}"))
        if self.continue_due is not None:
            self.send_continue()

    def send_continue(self) -> None:
        """The one 100 Continue a request asked for (K11): only while its body
        is still to come (not when it came with the head), and only when no
        response is on its way, since a 100 written now would land inside
        it (a pipelining client sends its body anyway)."""
        request, self.continue_due = self.continue_due, None
        if (request is self.request and not self.closing
                and self.current is None and not self.pipeline):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def escape_request_line(self, data: bytes) -> bytes:
        """`data` with the non-ASCII bytes of its request line escaped.

        Called when `data` starts at a message boundary or inside a request
        line that an earlier read began, so a line sent a byte at a time is
        escaped as a whole one is.  A request pipelined behind another in
        the same read is not looked at: a raw non-ASCII byte there gets 400.
        """
        start = 0
        if not self.line_open:
            while start < len(data) and data[start] in b"\r\n":
                start += 1  # empty lines before a request line are ignored (RFC 9112 2.2)
            if start == len(data):
                return data
        end = data.find(b"\n", start)
        self.line_open = end < 0
        if end < 0:
            end = len(data)
        line = data[start:end]
        if line.isascii():
            return data
        return data[:start] + escape_non_ascii(line) + data[end:]

    def eof_received(self) -> bool:
        """The client will send no more (a half-close, as `nc -N` or a
        shutdown(SHUT_WR) does), but it still reads: the requests it
        completed are answered, the last one with Connection: close, then
        the connection ends.  A request cut short gets no answer."""
        self.eof = True
        if self.current is None or self.timer_kind == "linger":
            return False  # nothing owed: let the transport close
        if not self.pipeline:
            self.keep_alive = False
        return True  # keep our sending side open for the responses owed

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()
        if self.link is not None:
            self.link.pause()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None
        if self.link is not None:
            self.link.resume()

    async def drain(self) -> None:
        if self._drained is not None:
            await self._drained

    # -- timeouts ------------------------------------------------------------

    def arm(self, kind: str, seconds: float) -> None:
        """Set the one deadline this connection has.  Moving it later costs
        nothing (the timer re-checks when it fires); only a deadline earlier
        than the pending timer's needs a new timer."""
        self.timer_kind = kind
        loop = self.loop
        self.deadline = loop.time() + seconds
        if self.timer is not None and self.timer.when() > self.deadline:
            self.timer.cancel()
            self.timer = None
        if self.timer is None:
            self.timer = loop.call_at(self.deadline, self._on_timer)

    def disarm(self) -> None:
        self.timer_kind = ""

    def _on_timer(self) -> None:
        self.timer = None
        if self.lost or not self.timer_kind:
            return
        loop = self.loop
        if loop.time() < self.deadline:
            self.timer = loop.call_at(self.deadline, self._on_timer)
            return
        if self.timer_kind in ("idle", "linger"):
            self.transport.close()
        elif self.timer_kind == "body":
            self.reject(BadRequest("request body timeout", 408))
        else:
            self.reject(BadRequest("request head timeout", 408))

    # -- httptools callbacks -------------------------------------------------

    def on_message_begin(self) -> None:
        self.request = Request()
        self.server.requests_seen += 1

    def on_url(self, url: bytes) -> None:
        request = self.request
        request.target += url
        if len(request.target) > self.limits["max_url"]:
            raise URITooLong("request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.request
        # llhttp drops the whitespace before a value, not the one after it
        # (RFC 9112 5: both are OWS, not part of the value).
        value = value.rstrip(b" \t")
        request.head_size += len(name) + len(value) + 4
        if request.head_size > self.limits["max_header"]:
            raise HeadTooLarge("request header fields too large")
        if request.in_trailers:
            # WSGI has no trailers, and merging them into the header section
            # would let them pass for fields the front checked: they are
            # dropped, and the ones that may not be trailers refused.
            if name.lower() in _FORBIDDEN_TRAILERS:
                raise BadRequest(f"{name.decode('latin-1')} in the trailer section")
            return
        if len(request.headers) >= MAX_FIELDS:
            raise HeadTooLarge("too many header fields")
        request.headers.append((name, value))

    def on_headers_complete(self) -> None:
        request = self.request
        parser = self.parser
        request.method = parser.get_method()
        request.version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive()
        request.in_trailers = True
        if request.version not in ("1.1", "1.0"):
            # llhttp takes any digit.digit and a bare "GET /" (HTTP/0.9).
            if request.version == "0.9":
                raise BadRequest("HTTP/0.9 requests are not served")
            raise BadRequest(f"HTTP/{request.version} is not supported", 505)
        self.check_head(request)
        self.arm("body", self.limits["body_timeout"])
        if (request.expect_continue and request.version == "1.1"
                and (request.chunked or request.content_length)):
            self.continue_due = request  # sent once this read is parsed, if still due

    def on_body(self, data: bytes) -> None:
        request = self.request
        request.body_size += len(data)
        if request.body_size > self.limits["max_body"]:
            raise BodyTooLarge(f"request body over {self.limits['max_body']} bytes")
        self.arm("body", self.limits["body_timeout"])
        body = request.body
        if body is None:
            request.body = body = bytearray()
        if isinstance(body, bytearray) and len(body) + len(data) > SPOOL_THRESHOLD:
            spool = tempfile.TemporaryFile()
            spool.write(body)
            request.body = body = spool
        if isinstance(body, bytearray):
            body += data
        else:
            body.write(data)

    def on_message_complete(self) -> None:
        request, self.request = self.request, None
        if not request.keep_alive:
            self.last_read = True
        if request.body is not None and not isinstance(request.body, bytearray):
            request.body.seek(0)
        if self.current is None:
            self.begin(request)
        else:
            self.pipeline.append(request)
            if len(self.pipeline) >= MAX_PIPELINED:
                self.transport.pause_reading()

    # -- request checks (RFC 9110, 9112) -------------------------------------

    def check_head(self, request: Request) -> None:
        """Refuse what llhttp lets through but a strict server must not."""
        hosts = types = 0
        te = None
        for name, value in request.headers:
            lower = name.lower()
            if lower == b"host":
                hosts += 1
                request.host = value
            elif lower == b"content-type":
                # A singleton field (RFC 9110 8.3): with two, which one the
                # app reads would depend on the worker's environ building.
                types += 1
            elif lower == b"content-length":
                if not value.isdigit():
                    raise BadRequest("Content-Length is not a number")
                request.content_length = int(value)
            elif lower == b"transfer-encoding":
                te = value if te is None else te + b"," + value
            elif lower == b"expect":
                if value.lower() != b"100-continue":
                    raise BadRequest("unsupported Expect", 417)
                request.expect_continue = True
            if b"\x00" in value or b"\r" in value or b"\n" in value:
                raise BadRequest(f"control character in {name.decode('latin-1')}")
        if hosts > 1:
            raise BadRequest("more than one Host header")
        if types > 1:
            raise BadRequest("more than one Content-Type header")
        if hosts == 0 and request.version == "1.1":
            raise BadRequest("HTTP/1.1 request without Host")
        if te is not None:
            codings = [c.strip().lower() for c in te.split(b",")]
            if request.content_length is not None:
                raise BadRequest("both Content-Length and Transfer-Encoding")
            if request.version != "1.1":
                raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
            if codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
                raise BadRequest("Transfer-Encoding does not end in chunked")
            if codings != [b"chunked"]:
                raise NotImplementedCoding(
                    f"unsupported transfer coding in {te.decode('latin-1')!r}")
            request.chunked = True
        if request.content_length is not None and request.content_length > self.limits["max_body"]:
            raise BodyTooLarge(f"request body over {self.limits['max_body']} bytes")
        target = request.target
        method = request.method
        if target == b"*":
            if method != b"OPTIONS":
                raise BadRequest("asterisk-form is only for OPTIONS")
            request.path, request.query = b"*", b""
            return
        if method == b"CONNECT":
            raise BadRequest("CONNECT is not supported", 405)
        if b"#" in target:
            raise BadRequest("a fragment (#) in the request target")  # RFC 9112 3.2
        if not target.startswith(b"/"):
            scheme, sep, rest = target.partition(b"://")
            if not sep or scheme.lower() not in (b"http", b"https") or not rest:
                raise BadRequest("request target is not a path")
            authority, slash, rest = rest.partition(b"/")
            if not authority or b"@" in authority:
                raise BadRequest("absolute-form target without a plain host")
            # RFC 9112 3.2.2: the target's host wins over the Host field, for
            # the app too (it reads HTTP_HOST).
            request.host = authority
            request.headers = [(n, authority if n.lower() == b"host" else v)
                               for n, v in request.headers]
            target = request.target = b"/" + rest
        path, _, request.query = target.partition(b"?")
        request.path = unquote_to_bytes(path) if b"%" in path else path
        if b"\x00" in request.path:
            raise BadRequest("NUL in the request path")

    # -- answering -----------------------------------------------------------

    def begin(self, request: Request) -> None:
        """Start answering `request` (it is complete)."""
        self.current = request
        self.disarm()
        self.keep_alive = (request.keep_alive and not self.closing and not self.server.stopping
                           and not (self.eof and not self.pipeline))
        request.routed = time.monotonic()
        request.request_id = self.server.request_id(request)
        self.server.route(self, request)

    def finish(self) -> None:
        """The current response is complete: log it, then the next one."""
        request, self.current = self.current, None
        self.link = None
        if self.remaining and not self.lost:
            # Shorter than announced: only a close tells the client so.
            log.warning("%s %s: the response body ended %d bytes short of its "
                        "Content-Length; closing the connection",
                        request.method.decode("latin-1"), request.target.decode("latin-1"),
                        self.remaining)
            self.keep_alive = False
        self.remaining = None
        self.server.log_access(self, request)
        if request.body is not None and not isinstance(request.body, bytearray):
            request.body.close()
        if self.lost:
            return
        if not self.keep_alive or self.server.stopping:
            self.end_connection()
            return
        if self.pipeline:
            if len(self.pipeline) == MAX_PIPELINED:
                self.transport.resume_reading()
            self.begin(self.pipeline.popleft())
        elif self.request is not None:
            self.arm("header", self.limits["header_timeout"])
        else:
            self.arm("idle", self.limits["keepalive_timeout"])

    def end_connection(self) -> None:
        """Close after the last response, without a reset: send our FIN after
        it, then drop what the client still sends (the rest of a refused
        body, requests pipelined after a close) until it closes too, or for
        LINGER_SECONDS at most."""
        transport = self.transport
        if self.eof or not transport.can_write_eof():
            transport.close()
            return
        self.closing = True
        self.linger_left = LINGER_BYTES
        transport.write_eof()
        transport.resume_reading()
        self.arm("linger", LINGER_SECONDS)

    def write_head(self, request: Request, status: int, reason: bytes,
                   headers, length: int | None, body: bytes = b"") -> None:
        """Serialize the status line and headers; choose the body framing.

        `length` is the body length when known; otherwise the app's own
        Content-Length is used, or chunked for HTTP/1.1, or close-delimited.
        A whole `body` given here leaves in the same write as the head.
        """
        request.status = status
        if self.server.stopping:
            self.keep_alive = False  # a stopping server says so on every response
        no_body = request.method == b"HEAD" or status in _NO_BODY_STATUS or status < 200
        self.body_expected = not no_body
        out = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        has_length = False
        declared = None
        for name, value in headers:
            lower = name.lower()
            if lower in _HOP_BY_HOP:
                if lower == b"connection" and b"close" in value.lower():
                    self.keep_alive = False
                continue
            if lower == b"content-length":
                if status in _NO_BODY_STATUS:
                    continue
                has_length = True
                declared = int(value)  # digits only: checked where the head came from
            elif lower == b"date" or lower == b"server":
                continue
            out += (name, b": ", value, b"\r\n")
        out += (b"Date: ", http_date(), b"\r\nServer: corral\r\n")
        self.chunked_response = False
        if not has_length and status not in _NO_BODY_STATUS and status >= 200:
            if length is not None:
                out.append(b"Content-Length: %d\r\n" % length)
            elif request.version == "1.1":
                if not no_body:
                    out.append(b"Transfer-Encoding: chunked\r\n")
                    self.chunked_response = True
            else:
                self.keep_alive = False  # the end of the body is the close
        if not self.keep_alive:
            out.append(CONNECTION_CLOSE)
        elif request.version == "1.0":
            out.append(CONNECTION_KEEP_ALIVE)
        out.append(b"\r\n")
        # The body must be exactly what the head announced: more would be
        # read by the client as the start of the next response.
        self.remaining = declared if declared is not None and not no_body else None
        if body and not no_body:
            body = self.clip(body)
            out.append(body)
            request.sent += len(body)
        self.transport.write(b"".join(out))

    def clip(self, data: bytes) -> bytes:
        """`data` cut to what is left of the announced Content-Length."""
        remaining = self.remaining
        if remaining is None:
            return data
        if len(data) > remaining:
            if self.keep_alive or remaining:
                log.warning("%s: the response body is longer than its Content-Length; "
                            "the excess is dropped and the connection closed", self.describe())
            self.keep_alive = False
            data = data[:remaining]
        self.remaining = remaining - len(data)
        return data

    def write_body(self, data: bytes) -> None:
        if not self.body_expected or not data or self.lost:
            return
        data = self.clip(data)
        if not data:
            return
        self.current.sent += len(data)
        if self.chunked_response:
            self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.transport.write(data)

    def end_body(self) -> None:
        if self.chunked_response and not self.lost:
            self.transport.write(b"0\r\n\r\n")
        self.finish()

    def respond(self, status: int, reason: bytes, headers, body: bytes) -> None:
        """A whole response at once (static files, error pages, small app replies)."""
        if self.lost:
            self.finish()
            return
        self.write_head(self.current, status, reason, headers, len(body), body)
        self.finish()

    def respond_error(self, error: HTTPError) -> None:
        self.current.error = error.reason
        page = getattr(error, "page", None)
        text = page if page is not None else f"{error.status} {error.phrase}: {error.reason}\n"
        if error.status >= 500 and not isinstance(error, Unavailable):
            text = f"{error.status} {error.phrase}\n"  # details only in the log
        body = text.encode()
        ctype = b"text/html; charset=utf-8" if page else b"text/plain; charset=utf-8"
        if error.status in (400, 408, 413, 414, 431, 501):
            self.keep_alive = False
        self.respond(error.status, error.phrase.encode(),
                     [(b"Content-Type", ctype), *error.headers], body)

    def reject(self, error: HTTPError) -> None:
        """A request the front refuses while reading it: answer and close.

        Requests already parsed before it are answered first only when no
        response is in progress; otherwise the connection just ends after the
        current response, since the stream can no longer be trusted.
        """
        if self.closing or self.lost:
            return
        self.closing = True
        self.transport.pause_reading()
        log.warning("refused request from %s: %s %s", self.peer[0], error.status, error.reason)
        request = self.request or Request()
        self.request = None
        if not hasattr(request, "method"):
            request.method = b"-"
            request.version = "1.1"
        request.keep_alive = False
        if self.current is not None:
            # A response is on its way; the refusal follows it, then close.
            self.pipeline.clear()
            self.keep_alive = False
            return
        self.current = request
        self.keep_alive = False
        self.respond_error(error)

    # -- the upstream handler interface (see corral.front.upstream.Link) ------

    def attach(self, link) -> None:
        self.link = link
        self.current.worker_pid = link.worker.pid
        self.current.attached = time.monotonic()

    def describe(self) -> str:
        request = self.current
        return f"{request.method.decode('latin-1')} {request.target.decode('latin-1')}"

    def upstream_head(self, status, reason, headers) -> None:
        if not self.lost:
            self.write_head(self.current, status, reason, headers, None)

    def upstream_whole(self, status, reason, headers, body) -> None:
        if self.lost:
            return
        self.respond(status, reason, headers, body)

    def upstream_framed_head(self, status: int, head: bytes, length: int) -> None:
        if not self.lost:
            self.write_framed(status, head, length)

    def upstream_framed(self, status: int, head: bytes, length: int, body: bytes) -> None:
        if self.lost:
            return
        self.write_framed(status, head, length, body)
        self.finish()

    def write_framed(self, status: int, head: bytes, length: int, body: bytes = b"") -> None:
        """Send a head the worker wrote in HTTP form (see FRAME_PARAM in
        corral.worker): checked by the link, framed by Content-Length, with
        the Connection line asked for in Front.params, unless the connection
        has since been set to close."""
        request = self.current
        request.status = status
        if self.server.stopping:
            self.keep_alive = False
        if not self.keep_alive and not head.endswith(CONNECTION_CLOSE + b"\r\n"):
            if head.endswith(CONNECTION_KEEP_ALIVE + b"\r\n"):
                head = head[:-len(CONNECTION_KEEP_ALIVE) - 2]
            else:
                head = head[:-2]
            head += CONNECTION_CLOSE + b"\r\n"
        self.body_expected = True
        self.chunked_response = False
        self.remaining = length
        if body:
            body = self.clip(body)
            request.sent += len(body)
            self.transport.write(head + body)
        else:
            self.transport.write(head)

    def upstream_body(self, data: bytes) -> None:
        self.write_body(data)

    def upstream_end(self) -> None:
        self.end_body()

    def upstream_retry(self, error: GatewayError) -> None:
        """The worker died before answering a byte (killed while idle, say):
        an idempotent request goes once more to another worker; any other
        gets the error, since the dead worker may have acted on it."""
        request = self.current
        if self.lost or request is None:
            return
        if request.method not in RETRYABLE or request.retried:
            self.upstream_failed(error)
            return
        request.retried = True
        self.link = None
        log.warning("%s; sending %s %s to another worker", error.reason,
                    request.method.decode("latin-1"), request.target.decode("latin-1"))
        if request.body is not None and not isinstance(request.body, bytearray):
            request.body.seek(0)
        self.server.dispatch(self, request)

    def upstream_resend(self) -> None:
        """The request was sent behind another on a worker that went away
        before beginning it: it goes to another worker, whatever its method."""
        request = self.current
        if self.lost or request is None:
            return
        self.link = None
        self.server.dispatch(self, request)

    def upstream_failed(self, error: GatewayError) -> None:
        if self.lost or self.current is None:
            return
        if self.current.status:
            # The head is out: a truncated body must not look complete.
            self.keep_alive = False
            self.link = None
            self.server.log_access(self, self.current)
            self.current = None
            self.transport.abort()
            return
        self.respond_error(error)
