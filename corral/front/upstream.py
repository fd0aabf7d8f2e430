"""The front's side of FastCGI: one kept connection (a link) to one worker.

A link carries one request at a time, and to corral's own workers one more,
sent behind it (see Link.start).  It encodes the requests with the codec,
turns the worker's STDOUT back into a status, checked headers and body (or,
from corral's own workers, into a checked HTTP head that is relayed as it
is), and hands them to the request's handler.  A worker that breaks the
protocol or sends an unsafe head costs that request a 502, never the front.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import socket
import time

from corral import fastcgi
from corral.fastcgi import (
    QUEUE_VALUE,
    EndRequest,
    ProtocolStatus,
    ServerConnection,
    Stderr,
    Stdout,
    ValuesResult,
)
from corral.front.errors import GatewayError

log = logging.getLogger("corral.error")

MAX_HEAD = 64 * 1024  # largest CGI response head accepted from a worker
BEHIND_BODY = 64 * 1024  # larger bodies wait for a free worker instead
BODY_PIECE = 1 << 16  # request bodies from a spool file go out in pieces this big
REQUEST_ID = 1  # the first request's id; those sent behind it take the next ones
# How many requests may wait behind a worker's current one.  Two, so that a
# worker with short requests still finds one waiting when the front, busy
# with other connections, is slow to send the next.  The ids go round
# 1, 2, 3: an id is free again only once its request's end is read.
BEHIND_DEPTH = 2
_IDS = BEHIND_DEPTH + 1
CLAIM_PARAM = b"CORRAL_CLAIM"  # marks a request sent behind another (see corral.worker)
# Asks one of corral's own workers for an HTTP/1.1 head that the front can
# relay as it is (see corral.worker); always the first param when present.
FRAME_PARAM = b"CORRAL_FRAME"

# One response header line: a token, a colon, and a value without control
# bytes (a tab is allowed), the whitespace around the value not part of it.
_HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*"
                          rb"([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*\r?")


# A worker's HTTP/1.1 head (FRAME_PARAM): status line, the Content-Length
# first, then header lines as parse_cgi_head would accept them, checked in
# one pass since the front sends it on unchanged.
_FRAMED_HEAD = re.compile(rb"HTTP/1\.1 ([1-9][0-9][0-9]) [^\x00-\x08\x0a-\x1f\x7f]*\r\n"
                          rb"Content-Length: ([0-9]{1,18})\r\n"
                          rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+: [^\x00-\x08\x0a-\x1f\x7f]*\r\n)*"
                          rb"\r\n")


def check_framed_head(data: bytes, stop: int) -> tuple[int, bytes, int]:
    """Status code, the head itself and the Content-Length of an HTTP head
    that ends at `stop` in `data` (a worker's, asked for by FRAME_PARAM), or
    GatewayError: it goes to the client as it is, so it is checked whole."""
    checked = _FRAMED_HEAD.fullmatch(data, 0, stop)
    if checked is None:
        raise GatewayError(f"worker sent an invalid HTTP response head {data[:80]!r}")
    return int(checked[1]), data[:stop], int(checked[2])


def parse_cgi_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """Status code, reason and headers of a CGI response head (RFC 3875 6.2).

    The front re-serializes this head, so it checks again what the worker
    should have checked: a control byte anywhere is refused (GatewayError).
    Only the first Status line is the status: corral's worker writes it
    first, and a later one is a header the app itself set, sent on as such.
    """
    status, reason = 200, b"OK"
    headers = []
    has_status = False
    location = False
    match = _HEADER_LINE.fullmatch
    for line in head.split(b"\n"):
        if not line or line == b"\r":
            continue
        checked = match(line)
        if checked is None:
            raise GatewayError(f"worker sent an invalid response header line {line[:80]!r}")
        name, value = checked.groups()
        if len(name) not in (6, 8, 14):  # none of the names looked at below
            headers.append((name, value))
            continue
        lower = name.lower()
        if lower == b"status" and not has_status:
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


class Behind:
    """A request sent to a busy worker, to run after the one it serves."""

    __slots__ = ("handler", "rid", "offset", "params", "body", "sent_at", "taken")

    def __init__(self, handler, rid: int, offset: int, params, body: bytes) -> None:
        self.handler = handler
        # Its byte in the worker's claim file is at `offset`.  The worker
        # holds the byte of a request it began from behind until a request
        # comes with the id of the one before it, which we send only after
        # we have read that one's end: so a request the worker has begun can
        # never be taken back while it is still behind for us.  Each id has
        # two bytes, used in turn: the worker may still hold the last one
        # for the request that had this id before, but never the other.
        self.rid = rid
        self.offset = offset
        self.params, self.body = params, body  # kept, to send it elsewhere instead
        self.sent_at = time.monotonic()
        self.taken = False  # taken back for another worker: this one will skip it


class Link(asyncio.Protocol):
    """A kept FastCGI connection to one worker, free or serving one request
    (and, to one of corral's own workers, maybe BEHIND_DEPTH more behind it).

    Why send ahead: a worker that finishes a request would otherwise wait,
    idle, until the front has read the end and sent the next; under load
    that gap is a large share of each request.  A request sent behind is
    read by the worker the moment it is free.  It may be taken back while it
    has not started (a byte lock in the worker's claim file decides, so it
    never runs twice) and sent to a worker that became free first, so a
    slow request never holds up the one behind it.
    """

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
        self.rid = REQUEST_ID  # the current request's id
        self.behind: list[Behind] = []  # in the order the worker will begin them
        self._turn = [0] * (_IDS + 1)  # by id: which of its two claim bytes comes next
        self.taken_offset = 0  # the claim byte of the current request, if taken back
        self.claim_fd: int | None = None  # the worker's claim file: it takes requests behind
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
        transport.write(ServerConnection.get_values([b"FCGI_MPXS_CONNS", QUEUE_VALUE]))

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self._probe is not None:
            self._probe.close()
            self._probe = None
        if self.claim_fd is not None:
            os.close(self.claim_fd)
            self.claim_fd = None
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("worker closed the connection"))
            # Marked as seen: nobody may be waiting any more (the pool is
            # stopping), and the reaper reports the worker's exit anyway.
            self.ready.exception()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        behind, self.behind = self.behind, []
        self.on_lost(self)
        # Not begun (it would be the current request by now): the worker
        # cannot have acted on it, so it goes elsewhere, whatever its method.
        resend(behind)

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
        self._handle(events)

    def _handle(self, events: list) -> None:
        handler = self.handler
        if handler is not None and events:
            self.answered = True
        body = []
        started = False  # the head became complete in this batch
        framed = False  # and it is an HTTP head of the worker's (FRAME_PARAM)
        for index, event in enumerate(events):
            kind = type(event)
            if kind is Stdout:
                if not event.data or event.request_id != self.rid:
                    continue
                if self.head_done:
                    body.append(event.data)
                    continue
                # Usually the whole head comes in the first record: it is
                # looked at where it lies, and only a split one is gathered.
                if self.head:
                    self.head += event.data
                    data = bytes(self.head)
                else:
                    data = event.data
                end = data.find(b"\r\n\r\n")
                cut = 4
                if end < 0:
                    end, cut = data.find(b"\n\n"), 2
                if end < 0:
                    if len(data) > MAX_HEAD:
                        self.fail(GatewayError("worker sent a response head over 64 KiB"))
                        return
                    if not self.head:
                        self.head += data
                    continue
                # An HTTP head is one we asked for (FRAME_PARAM), relayed as it is.
                framed = self.claim_fd is not None and data.startswith(b"HTTP/1.1 ")
                try:
                    if framed:
                        status = check_framed_head(data, end + cut)
                    else:
                        status = parse_cgi_head(data[:end])
                except GatewayError as exc:
                    self.fail(exc)
                    return
                rest = data[end + cut:]
                self.head.clear()
                self.head_done, started = True, True
                if rest:
                    body.append(rest)
            elif kind is EndRequest:
                if event.request_id != self.rid:
                    continue  # not ours (an answer to a request we never sent)
                self.handler = None
                if handler is None:
                    continue
                if type(handler) is _Taken:
                    self._unlock(self.taken_offset)  # the worker skipped it: the lock may go
                    self.head.clear()
                    self.head_done = False
                    self._next(events[index + 1:])
                    return
                if type(handler) is _Discard:
                    log.info("worker pid %s ended an abandoned request; free again",
                             self.worker.pid)
                if (event.protocol_status == ProtocolStatus.OVERLOADED and not self.head_done
                        and not body):
                    # A worker that is stopping refuses what it will not run:
                    # never begun, so it goes to another worker, any method.
                    log.info("worker pid %s is stopping and did not run a request: sending "
                             "it to another worker", self.worker.pid)
                    self._refused(handler)
                    return
                if not self.head_done:
                    handler.upstream_failed(GatewayError(
                        f"worker pid {self.worker.pid} ended the request without a response"))
                elif started and framed:
                    handler.upstream_framed(*status, b"".join(body))
                elif started:
                    handler.upstream_whole(*status, b"".join(body))
                else:
                    for piece in body:
                        handler.upstream_body(piece)
                    handler.upstream_end()
                self.head.clear()
                self.head_done = False
                self._next(events[index + 1:])
                return
            elif kind is Stderr:
                text = event.data.decode("utf-8", "replace").rstrip()
                if text:
                    log.warning("worker pid %s stderr: %s", self.worker.pid, text)
            elif kind is ValuesResult and not self.ready.done():
                self._open_claim(event.values.get(QUEUE_VALUE))
                self.ready.set_result(event.values)
        if handler is None:
            return
        if started:
            if framed:
                handler.upstream_framed_head(*status)
            else:
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
        """Send one request; `body` is bytes or a file positioned at its start.
        On a busy link (see can_take_behind) it goes behind the current one."""
        if self.handler is not None:
            self._send_behind(params, body, handler)
            return
        self.handler = handler
        self.answered = False
        self.sent_at = time.monotonic()
        self.worker.request_started(self)  # arms [app] request_timeout
        rid = self.rid
        if self.claim_fd is None and params and params[0][0] is FRAME_PARAM:
            params = params[1:]  # not one of corral's workers: a CGI head it is
        head = ServerConnection.begin_request(rid, params)
        if isinstance(body, (bytes, bytearray)):
            if body:
                head += ServerConnection.stdin(rid, body)
            self.transport.write(head + ServerConnection.stdin(rid, b""))
        else:
            self.transport.write(head)
            asyncio.get_running_loop().create_task(self._send_file(body, rid))

    async def _send_file(self, body, rid: int) -> None:
        while not self.closed:
            piece = body.read(BODY_PIECE)
            if not piece:
                self.transport.write(ServerConnection.stdin(rid, b""))
                return
            self.transport.write(ServerConnection.stdin(rid, piece))
            if self._drained is not None:
                await self._drained

    def can_take_behind(self, now: float, limit: float) -> bool:
        """Whether a request may be sent behind the current one: the worker
        takes them, fewer than BEHIND_DEPTH are behind yet, and the current
        one has not run `limit` seconds already ([app] behind_limit: past
        it, it looks slow, and the next one is better off waiting for any
        worker)."""
        return (self.claim_fd is not None and len(self.behind) < BEHIND_DEPTH
                and not self.closed and self.handler is not None
                and type(self.handler) is not _Discard and type(self.handler) is not TimedOut
                and now - self.sent_at < limit)

    def _send_behind(self, params, body: bytes, handler) -> None:
        last = self.behind[-1].rid if self.behind else self.rid
        rid = last % _IDS + 1  # the next id round: free, since fewer are in flight
        turn = self._turn[rid]
        self._turn[rid] = 1 - turn
        offset = rid + _IDS * turn
        self.behind.append(Behind(handler, rid, offset, params, body))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("a request goes behind worker pid %s's current request", self.worker.pid)
        out = ServerConnection.begin_request(rid, [(CLAIM_PARAM, b"@%d" % offset), *params])
        if body:
            out += ServerConnection.stdin(rid, body)
        self.transport.write(out + ServerConnection.stdin(rid, b""))

    def waiting_since(self) -> float | None:
        """When the oldest request behind the current one that may still be
        taken back was sent, or None."""
        for behind in self.behind:
            if not behind.taken and type(behind.handler) is not _Discard:
                return behind.sent_at
        return None

    def take_back(self) -> Behind | None:
        """The first request behind the current one that the worker has not
        begun: it is then ours to send elsewhere, and the worker will skip it."""
        if self.claim_fd is None:
            return None
        for behind in self.behind:
            if behind.taken or type(behind.handler) is _Discard:  # the worker skips it
                continue
            try:
                fcntl.lockf(self.claim_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, behind.offset)
            except OSError:
                continue  # the worker holds it: it runs now (the next may not have begun)
            behind.taken = True
            return behind
        return None

    def _unlock(self, offset: int) -> None:
        if self.claim_fd is not None:
            try:
                fcntl.lockf(self.claim_fd, fcntl.LOCK_UN, 1, offset)
            except OSError:
                pass

    def _next(self, later: list) -> None:
        """The current request has ended: the one behind it, if any, is now
        current (the worker has begun it, or will skip it if taken back);
        `later` are the events read after the end, which are the new one's."""
        behind = self.behind.pop(0) if self.behind else None
        if behind is not None:
            self.rid = behind.rid
            self.taken_offset = behind.offset
            self.handler = _Taken() if behind.taken else behind.handler
            self.answered = False
            self.sent_at = time.monotonic()
        # The ended one's timer off, its count, recycling; then the pool
        # gives the link more work (behind the new current) or idles it.
        self.worker.request_done(self)
        if behind is not None and not behind.taken:
            self.worker.request_started(self)  # the new current's timer
        if later and not self.closed:
            self._handle(later)

    def _refused(self, handler) -> None:
        """The worker refused the current request (it is stopping): the
        request goes elsewhere, and so do those behind it; the
        link is done, since the worker is going away."""
        behind, self.behind = self.behind, []
        self.head.clear()
        self.head_done = False
        handler.upstream_resend()
        resend(behind)
        self.transport.close()

    def _open_claim(self, path: bytes | None) -> None:
        if not path or not path.startswith(b"/proc/"):
            return
        try:
            self.claim_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            log.info("worker pid %s: its claim file cannot be opened (%s); no requests "
                     "are sent behind others to it", self.worker.pid, exc.strerror)

    def abort(self, handler=None) -> None:
        """The client went away: ask the worker to stop; the link stays busy
        until END_REQUEST, so a request never lands on a worker still at work.
        `handler`: the request that is given up (default: the current one)."""
        for behind in self.behind:
            if handler is None or behind.handler is not handler:
                continue
            if not behind.taken and not self.closed:
                log.info("client gone: dropping the request behind worker pid %s's "
                         "current one", self.worker.pid)
                behind.handler = _Discard()
                self.transport.write(ServerConnection.abort_request(behind.rid))
            return
        if handler is not None and handler is not self.handler:
            return  # already over, or taken back and sent elsewhere
        if self.handler is not None and not self.closed:
            log.info("client gone: asking worker pid %s to stop its request", self.worker.pid)
            self.handler = _Discard()
            self.transport.write(ServerConnection.abort_request(self.rid))
            # A slow client may have paused our reading; nobody reads the
            # rest now, and a paused link would not even see its worker die.
            self.resume()

    def fail(self, error: GatewayError) -> None:
        """This connection cannot go on: fail its request and close it."""
        handler, self.handler = self.handler, None
        log.error("worker pid %s: %s", self.worker.pid, error.reason)
        if handler is not None:
            handler.upstream_failed(error)
        behind, self.behind = self.behind, []
        resend(behind)  # never begun: safe to send elsewhere
        if self.transport is not None:
            self.transport.close()

    def pause(self) -> None:
        if not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self.closed:
            self.transport.resume_reading()


def resend(behind: list[Behind]) -> None:
    """Send elsewhere the requests that were behind a link that is ending:
    none was begun, or it would be the link's current request by now."""
    for request in behind:
        if not request.taken:
            request.handler.upstream_resend()


class _Discard:
    """Stands in for a request whose client has gone: output is dropped."""

    def upstream_head(self, *args) -> None: pass
    def upstream_whole(self, *args) -> None: pass
    def upstream_framed_head(self, *args) -> None: pass
    def upstream_framed(self, *args) -> None: pass
    def upstream_body(self, data) -> None: pass
    def upstream_end(self) -> None: pass
    def upstream_failed(self, error) -> None: pass
    def upstream_retry(self, error) -> None: pass
    def upstream_resend(self) -> None: pass


class TimedOut(_Discard):
    """Stands in for a request that ran over [app] request_timeout and was
    answered 504: output is dropped, but its end still makes the request
    behind it current, so that one is never taken for not begun."""


class _Taken(_Discard):
    """Stands in for a request taken back for another worker: this worker
    only ends it, unrun."""
