"""The built-in `python` engine: one FastCGI application-side loop hosting one
WSGI callable, a request at a time (PEP 3333, FastCGI responder role); and,
with `--preload`, the preloader that imports the app once and forks workers.

The pool starts it with its listening socket on file descriptor 0, as the
FastCGI specification describes; `--bind` makes it listen by itself, for use
straight behind nginx or Apache.  It knows nothing of sites, other apps or the
front: it turns FastCGI params into an environ and a WSGI response into STDOUT.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import gc
import importlib
import os
import selectors
import signal
import socket
import sys
import tempfile
import time
import traceback
from typing import NoReturn
from urllib.parse import unquote_to_bytes

from corral import fastcgi
from corral.fastcgi import AbortRequest, BeginRequest, Params, Stdin
from corral.httpdate import http_date

# Exit statuses the supervisor understands (anything else is a crash).
EXIT_OK = 0
EXIT_APP_LOAD_ERROR = 4
EXIT_REQUEST_TIMEOUT = 5  # stopped by the supervisor for [app] request_timeout

SPOOL_THRESHOLD = 1 << 20  # request bodies above this go to a temporary file
RECV_SIZE = 1 << 16
PR_SET_PDEATHSIG = 1

# RFC 9110 5.1 token characters, for header names and the status reason check.
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                   b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# Bytes never allowed in a header value or status line: CTLs but HTAB, and DEL.
_FORBIDDEN = bytes(i for i in range(32) if i != 9) + b"\x7f"
# Response headers that keep a response in the CGI form (see FRAME_PARAM):
# the front decides them (framing, connection, Date, Server) or drops them.
_NOT_FRAMED = frozenset(("connection", "keep-alive", "transfer-encoding", "te", "trailer",
                         "upgrade", "proxy-connection", "date", "server"))


class AppLoadError(Exception):
    """The WSGI callable named in the config cannot be imported."""


class HeadError(ValueError):
    """The app gave a status or header that cannot be sent safely."""


class RequestAborted(Exception):
    """The web server gave up on the request in flight: it sent ABORT_REQUEST,
    or closed the connection (`closed`), which spec 5.4 counts as an abort
    too.  Not the app's fault, so never logged as an app error."""

    def __init__(self, reason: str, closed: bool,
                 error: fastcgi.ProtocolError | None = None) -> None:
        super().__init__(reason)
        self.closed = closed
        self.error = error  # bad bytes found while looking: the connection's end


def load_app(spec: str):
    """Import `module:callable` (callable may be dotted); raise AppLoadError."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise AppLoadError(f"{spec!r} is not of the form 'module:callable'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:
        raise AppLoadError(
            f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppLoadError(
                f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise AppLoadError(f"{spec!r} is not callable")
    check_django_urls()
    return obj


def check_django_urls() -> None:
    """For a Django app: import its URLconf now.  Django does that only on
    the first request, so a broken import in urls.py or a view module would
    otherwise pass for a ready worker and answer every request with 500."""
    if "django.urls" not in sys.modules and "django.core.handlers.wsgi" not in sys.modules:
        return
    try:
        from django.urls import get_resolver
        get_resolver().url_patterns  # noqa: B018 (the import is the point)
    except Exception as exc:
        raise AppLoadError(f"Django cannot load its URLconf: {type(exc).__name__}: "
                           f"{exc}") from exc


def encode_head(status: str, headers) -> bytes:
    """The CGI response head for FCGI_STDOUT, or HeadError if it is unsafe.

    Strings are encoded as latin-1 (PEP 3333); anything that would let the app
    split the response (CR, LF, NUL, other controls) is refused, not escaped.
    """
    if type(status) is not str:
        raise HeadError(f"status must be a str, not {type(status).__name__}")
    try:
        raw_status = status.encode("latin-1")
    except UnicodeEncodeError:
        raise HeadError(f"status {status!r} is not latin-1") from None
    if (len(raw_status) < 4 or not raw_status[:3].isdigit()
            or raw_status[3:4] != b" " or raw_status.translate(None, _FORBIDDEN) != raw_status):
        raise HeadError(f"status {status!r} is not 'NNN reason'")
    lines = [b"Status: ", raw_status, b"\r\n"]
    for item in headers:
        try:
            name, value = item
        except (TypeError, ValueError):
            raise HeadError(f"header {item!r} is not a (name, value) pair") from None
        if type(name) is not str or type(value) is not str:
            raise HeadError(f"header {name!r}: name and value must be str")
        try:
            raw_name = name.encode("latin-1")
            raw_value = value.encode("latin-1")
        except UnicodeEncodeError:
            raise HeadError(f"header {name!r}: {value!r} is not latin-1") from None
        if not raw_name or not _TOKEN.issuperset(raw_name):
            raise HeadError(f"header name {name!r} is not a token")
        if raw_value.translate(None, _FORBIDDEN) != raw_value:
            raise HeadError(f"header {name!r}: value {value!r} has a control character")
        lines += (raw_name, b": ", raw_value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def split_mount(path: str, mount: str) -> tuple[str, str] | None:
    """SCRIPT_NAME and PATH_INFO for `path` under `mount`, or None outside it.

    The split happens only on a segment boundary: "/foobar" is not under
    "/foo".  A root app ("" mount) gets SCRIPT_NAME "" (never "/").
    """
    if not mount:
        return "", path
    if path == mount or path.startswith(mount + "/"):
        return mount, path[len(mount):]
    return None


class Response:
    """The response side of one request: start_response, write, and STDOUT.

    Output is held one chunk behind so that the last chunk, the stream's end
    and END_REQUEST leave in a single send.  Before each chunk but the first
    (which is only held), and before the end, the socket is looked at without
    blocking (check_abort), so a request the web server gave up on stops at
    the app's next chunk or write() call; a one-chunk response costs two
    system calls.  That is the only place it can stop: an app that sleeps or
    waits inside one call (a slow query, time.sleep) cannot be interrupted
    from here, and is told of the abort only when it next yields.

    For corral's front (FRAME_PARAM), a one-chunk response leaves with an
    HTTP/1.1 head instead of the CGI one, so that the front only relays it.
    """

    __slots__ = ("sock", "connection", "rid", "head", "status_set", "head_sent",
                 "pending", "send_body", "aborted", "frame", "status", "headers", "first")

    def __init__(self, sock: socket.socket, connection: fastcgi.AppConnection,
                 send_body: bool, frame: bytes | None = None) -> None:
        self.sock = sock
        self.connection = connection
        self.rid = connection.request_id
        self.head = b""
        self.status_set = False
        self.head_sent = False
        self.pending = b""
        self.send_body = send_body
        self.aborted: RequestAborted | None = None
        # Given by corral's front (FRAME_PARAM): the connection header line it
        # wants, asking for an HTTP head instead of a CGI one when it can.
        self.frame = frame if send_body else None
        self.status = ""
        self.headers = ()
        self.first: bytes | None = None  # the first chunk, while it may be the only one

    def start_response(self, status, headers, exc_info=None):
        if exc_info:
            try:
                if self.head_sent:
                    # PEP 3333: too late to change the response; re-raise.
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status_set:
            raise AssertionError("start_response called a second time without exc_info")
        if type(headers) is not list:
            headers = list(headers)  # read twice: here, and by http_head
        self.head = encode_head(status, headers)
        self.status, self.headers = status, headers
        self.status_set = True
        return self.write

    def write(self, data: bytes) -> None:
        if not self.status_set:
            raise AssertionError("write() before start_response()")
        if type(data) is not bytes:
            data = bytes(data)  # bytearray or memoryview; raises for str
        if not self.head_sent and data:
            # The first chunk is held back (see _send), so nothing goes out
            # now: the look at the socket waits for the next chunk or finish().
            self._send(data)
            return
        # Even an empty chunk looks: some apps yield b"" while they work so
        # that the server can stop them.
        self.check_abort()
        if not data and not self.head_sent:
            # PEP 3333: the head waits for the first non-empty chunk, so an
            # app may still replace it with start_response(..., exc_info).
            return
        self._send(data)

    def _send(self, data: bytes) -> None:
        if not self.head_sent:
            self.head_sent = True
            if self.frame is not None:
                self.first = data  # its head is chosen in finish(), or by a second chunk
                return
            data = self.head + data if self.send_body else self.head
        elif not data or not self.send_body:
            return
        elif self.first is not None:
            self._unframe()
        if self.pending:
            self._sendall(self.pending)
        self.pending = fastcgi.encode_stream(fastcgi.RecordType.STDOUT, self.rid, data)

    def _unframe(self) -> None:
        """More than one chunk: the held first one goes with the CGI head."""
        first, self.first = self.first, None
        self.pending = fastcgi.encode_stream(fastcgi.RecordType.STDOUT, self.rid,
                                             self.head + first)

    def finish(self) -> None:
        self.check_abort()  # a result that came after an abort is dropped, not sent
        if not self.head_sent:
            self._send(b"")  # a response with an empty body still has a head
        if self.first is not None:
            first, self.first = self.first, None
            head = self.http_head(len(first)) or self.head
            self.pending = fastcgi.encode_stream(fastcgi.RecordType.STDOUT, self.rid,
                                                 head + first)
        self._sendall(self.pending + self.connection.finish())

    def http_head(self, length: int) -> bytes | None:
        """The HTTP/1.1 head of a whole response of `length` bytes, as the
        front would have written it from the CGI head; None when the front
        must decide more than the connection header (see _NOT_FRAMED), or
        when the app's own Content-Length is not the body's length.

        Content-Length comes first, where the front reads it back."""
        code = self.status[:3]
        if code < "200" or code == "204" or code == "304":
            return None
        lines = [b"HTTP/1.1 ", self.status.encode("latin-1"),
                 b"\r\nContent-Length: %d\r\n" % length]
        for name, value in self.headers:  # checked by encode_head already
            lower = name.lower()
            if lower in _NOT_FRAMED:
                return None
            if lower == "content-length":
                if value.strip() != str(length):
                    return None
                continue
            lines += (name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n")
        lines += (b"Date: ", http_date(), b"\r\nServer: corral\r\n", self.frame, b"\r\n")
        return b"".join(lines)

    def flush(self) -> None:
        """Send what is held back, without ending the request (before an abort)."""
        if self.first is not None:
            self._unframe()
        if self.pending:
            pending, self.pending = self.pending, b""
            self._sendall(pending)

    def check_abort(self) -> None:
        """Raise RequestAborted if the web server has given up on this request.

        Never blocks.  Bytes waiting on the socket go through the codec, so
        no later read misses them, and what the protocol answers by itself
        (GET_VALUES, a second BEGIN_REQUEST) is answered now, mid-response.
        """
        if self.aborted is not None:
            raise self.aborted  # the app caught it and went on: tell it again
        try:
            data = self.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return  # the common case: nothing waiting, one system call
        except ConnectionError as exc:
            self._abort(f"connection lost: {exc.strerror}", closed=True)
        if not data:
            self._abort("the web server closed the connection", closed=True)
        try:
            events = self.connection.receive_data(data)
        except fastcgi.ProtocolError as exc:
            self._abort(str(exc), closed=True, error=exc)
        answer = self.connection.data_to_send()
        if answer:
            self._sendall(answer)
        # The codec passes on only records of the request in flight; but for
        # an abort they are STDIN records past the body's end, ignored anyway.
        if any(type(event) is AbortRequest for event in events):
            self._abort("ABORT_REQUEST from the web server", closed=False)

    def _sendall(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except ConnectionError as exc:  # EPIPE, ECONNRESET: the web server left
            self._abort(f"connection lost: {exc.strerror}", closed=True)

    def _abort(self, reason: str, closed: bool,
               error: fastcgi.ProtocolError | None = None) -> NoReturn:
        self.aborted = RequestAborted(reason, closed, error)
        self.pending = b""  # nobody wants the rest of an aborted response
        raise self.aborted


def build_environ(params: list[tuple[bytes, bytes]], body, body_size: int,
                  mount: str) -> dict | None:
    """A PEP 3333 environ from FastCGI params, or None if outside the mount."""
    environ = {name.decode("latin-1"): value.decode("latin-1")
               for name, value in params}
    # nginx passes every request header on as HTTP_*, these two included;
    # CGI (and so PEP 3333) has them only as CONTENT_TYPE and CONTENT_LENGTH.
    environ.pop("HTTP_CONTENT_TYPE", None)
    environ.pop("HTTP_CONTENT_LENGTH", None)
    uri = environ.get("REQUEST_URI")
    if uri is not None:
        # Derive the split ourselves instead of trusting SCRIPT_NAME: web
        # servers disagree on it (nginx's stock params send the whole path).
        path = uri.partition("?")[0]
        if "%" in path:
            # Back to the bytes the server sent first: given a str,
            # unquote_to_bytes would encode raw non-ASCII bytes as UTF-8.
            path = unquote_to_bytes(path.encode("latin-1")).decode("latin-1")
        split = split_mount(path, mount)
        if split is None:
            return None
        environ["SCRIPT_NAME"], environ["PATH_INFO"] = split
    else:
        environ.setdefault("SCRIPT_NAME", "")
        environ.setdefault("PATH_INFO", "")
    if not environ.get("CONTENT_LENGTH"):
        environ.pop("CONTENT_LENGTH", None)
        if body_size:
            # A body streamed without a length (nginx, chunked, request
            # buffering off) is whole by now; frameworks such as Django read
            # exactly CONTENT_LENGTH bytes and would see nothing (case K01).
            environ["CONTENT_LENGTH"] = str(body_size)
    environ.setdefault("QUERY_STRING", "")
    https = environ.get("HTTPS", "").lower() in ("on", "1")
    environ["wsgi.version"] = (1, 0)
    environ["wsgi.url_scheme"] = "https" if https else "http"
    environ["wsgi.input"] = body
    environ["wsgi.input_terminated"] = True
    environ["wsgi.errors"] = sys.stderr
    environ["wsgi.multithread"] = False
    environ["wsgi.multiprocess"] = True
    environ["wsgi.run_once"] = False
    return environ


VALUES = {
    b"FCGI_MAX_CONNS": b"1",
    b"FCGI_MAX_REQS": b"1",
    b"FCGI_MPXS_CONNS": b"0",
}
# The param by which corral's front marks a request it sent ahead to a busy
# worker, to be run after the one in flight.  Each such request has a byte
# lock, at its request id's offset in the worker's claim file (a deleted
# temporary file, which the front opens through /proc; its path is the
# worker's answer to QUEUE_VALUE).  The worker takes the lock before it runs
# the request; the front takes it to send the request to another worker
# instead.  Whoever takes it first has it, so no request runs twice.
CLAIM_PARAM = b"CORRAL_CLAIM"
# The param by which corral's front asks for a response head in HTTP/1.1
# form rather than CGI's, so that it only relays the bytes: its value is the
# Connection line the front wants in it (empty, or a whole header line).  A
# worker writes that form only for a whole, one-chunk response that needs
# nothing else of the front (see Response.http_head); any other keeps the
# CGI head.  Web servers never send it, and the app never sees it.
FRAME_PARAM = b"CORRAL_FRAME"


def claim_offset(value: bytes, rid: int) -> int:
    """The claim byte of a request from CLAIM_PARAM's value: "@N" is byte N
    (each id has two, used in turn, so that the one the worker may still
    hold for the last request with that id is never in the way); anything
    else, from a front of an earlier version, is the id's own byte."""
    if value.startswith(b"@") and value[1:].isdigit():
        return int(value[1:])
    return rid


def make_claim_file() -> tuple[int, bytes] | None:
    """The claim file's descriptor and the path the front opens it by."""
    try:
        fd, path = tempfile.mkstemp(prefix="corral-claim-")
    except OSError as exc:
        log(f"no claim file ({exc.strerror}): requests are not queued behind others")
        return None
    os.unlink(path)
    return fd, f"/proc/{os.getpid()}/fd/{fd}".encode()


class Peer:
    """One connection from the web server, and the request arriving on it."""

    __slots__ = ("sock", "codec", "body", "body_size", "params", "rid", "previous_rid")

    def __init__(self, sock: socket.socket, claim_path: bytes | None) -> None:
        self.sock = sock
        # A request that comes while another runs is held and served after
        # it, for a web server that asks for that (corral's front does).
        if claim_path is None:
            self.codec = fastcgi.AppConnection(VALUES)
        else:
            self.codec = fastcgi.AppConnection({**VALUES, fastcgi.QUEUE_VALUE: claim_path},
                                               queue_requests=True)
        self.body = None  # the request body being received, spooled past a size
        self.body_size = 0
        self.params: list[tuple[bytes, bytes]] | None = None
        # The ids of the request that began last and of the one before it.
        self.rid: int | None = None
        self.previous_rid: int | None = None

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
        self.sock.close()


class Worker:
    """Serves FastCGI connections one after another with one WSGI app."""

    def __init__(self, app, mount: str = "") -> None:
        self.app = app
        self.mount = mount.rstrip("/")
        self.busy = False
        self.stopping = False
        self.claim_file: tuple | None = None  # (fd, path), made with the first connection
        # The claim bytes we hold (see claim), by the request id whose next
        # arrival lets each go.
        self.held_claims: dict[int, int] = {}

    # Signals: SIGTERM asks for a graceful exit.  Between requests we leave at
    # once; during one (from its BEGIN_REQUEST on), after its response is sent.
    def handle_sigterm(self, signum, frame) -> None:
        # No exit from here: serve_forever wakes (the wakeup socket) and
        # leaves at a point where no request it has read can be dropped.
        self.stopping = True

    # SIGUSR1: the supervisor found the request in flight over [app]
    # request_timeout and has answered the client 504 already.  Say where the
    # app is stuck (the operator's only clue), then leave; SIGKILL follows if
    # raising here does not end us (an app that swallows SystemExit).
    def handle_timeout(self, signum, frame) -> None:
        environ = None
        here = frame
        while here is not None:  # the request is a local of call_app, up the stack
            if here.f_code is Worker.call_app.__code__:
                environ = here.f_locals.get("environ")
                break
            here = here.f_back
        stack = traceback.extract_stack(frame)
        if here is not None:  # from the app's first frame: ours above it say nothing
            depth = len(traceback.extract_stack(here))
            stack = stack[depth:] or stack
        stack = "".join(traceback.format_list(stack)).rstrip()
        log(f"request timeout: stopping {request_line(environ)}; the app was here "
            f"(most recent call last):\n{stack}")
        raise SystemExit(EXIT_REQUEST_TIMEOUT)

    def serve_forever(self, listener: socket.socket) -> None:
        """Serve every connection the web server opens, one request at a time.

        A web server may keep several connections to one worker (nginx with
        keepalive does), so the worker waits on all of them at once and
        serves whichever has data; waiting on one would starve the others.
        """
        listener.setblocking(False)
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        # A signal writes a byte here, so select() returns and the loop
        # looks at `stopping` (a handler that raised could cut a request
        # read but not yet begun).
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        selector.register(wake_r, selectors.EVENT_READ)
        peers: list[Peer] = []
        try:
            # A SIGTERM that lands in select() may end the wait with nothing
            # ready; only a stop with no request begun ends the loop.
            while not (self.stopping and not self.busy):
                for key, _ in selector.select():
                    if key.fileobj is wake_r:
                        with contextlib.suppress(BlockingIOError):
                            wake_r.recv(512)
                        continue
                    if key.fileobj is listener:
                        try:
                            sock, _ = listener.accept()
                        except (BlockingIOError, InterruptedError):
                            continue
                        sock.setblocking(True)
                        if self.claim_file is None:
                            self.claim_file = make_claim_file() or (None, None)
                        peer = Peer(sock, self.claim_file[1])
                        peers.append(peer)
                        selector.register(sock, selectors.EVENT_READ, peer)
                        continue
                    peer = key.data
                    try:
                        keep = self.serve_ready(peer)
                    except (ConnectionError, fastcgi.ProtocolError) as exc:
                        log(f"connection ended: {type(exc).__name__}: {exc}")
                        keep = False
                    if not keep:
                        selector.unregister(peer.sock)
                        peers.remove(peer)
                        if self.stopping:
                            refuse_unread([peer])
                        peer.close()
                    # Busy while any request has begun and not ended, even
                    # with its params or body still on the way: SIGTERM must
                    # not drop it half-read.
                    self.busy = any(p.codec.request_id is not None for p in peers)
                    if self.stopping and not self.busy:
                        return
        finally:
            self.busy = False
            if self.stopping:
                refuse_unread(peers)
            for peer in peers:
                peer.close()
            selector.close()
            signal.set_wakeup_fd(-1)
            wake_r.close()
            wake_w.close()

    def serve_ready(self, peer: Peer) -> bool:
        """Read what `peer` sent and act on it; False when the connection ends."""
        conn, connection = peer.sock, peer.codec
        data = conn.recv(RECV_SIZE)
        if not data:
            if connection.request_id is not None:
                log(f"connection ended: closed by the web server inside request "
                    f"{connection.request_id}")
            elif connection.pending:
                log(f"connection ended: closed by the web server inside a record "
                    f"({connection.pending} bytes of it read)")
            return False
        self.busy = True
        events = connection.receive_data(data)
        answer = connection.data_to_send()
        if answer:
            conn.sendall(answer)
        for index, event in enumerate(events):  # grows by the requests held behind
            kind = type(event)
            if kind is Stdin:
                if peer.body is None:
                    continue  # a stray record after the body's end
                if event.data:
                    peer.body.write(event.data)
                    peer.body_size += len(event.data)
                    continue
                if peer.params is None:
                    # The codec passes STDIN on as it comes; without the
                    # params there is no request to run.
                    raise fastcgi.ProtocolError("STDIN ended before the PARAMS stream")
                body, peer.body = peer.body, None
                body.seek(0)
                params = peer.params
                claim = frame = None
                if params and params[0][0] == CLAIM_PARAM:
                    claim, params = params[0][1], params[1:]
                if params and params[0][0] == FRAME_PARAM:
                    frame, params = params[0][1], params[1:]
                rid = connection.request_id
                try:
                    if any(type(later) is AbortRequest and later.request_id == rid
                           for later in events[index + 1:]):
                        # Given up on while it waited behind another: never run.
                        conn.sendall(connection.finish())
                    elif claim is not None and not self.claim(claim_offset(claim, rid),
                                                              peer.previous_rid):
                        # Sent ahead to us, then taken back for another worker.
                        conn.sendall(connection.finish())
                    elif not self.run_request(conn, connection, params, body,
                                              peer.body_size, frame):
                        return False  # the response was cut short: drop the connection
                finally:
                    body.close()  # a spooled body's temporary file goes now
                if not connection.keep_conn or self.stopping:
                    return False
                events.extend(connection.resume())  # a request held behind this one
            elif kind is Params:
                peer.params = event.params
            elif kind is BeginRequest:
                peer.body = tempfile.SpooledTemporaryFile(SPOOL_THRESHOLD)
                peer.body_size = 0
                peer.params = None  # never the previous request's, on a kept connection
                peer.previous_rid, peer.rid = peer.rid, event.request_id
                if self.held_claims:
                    self.let_go(event.request_id)
            elif kind is AbortRequest:
                if event.request_id != connection.request_id:
                    # For a request that has ended already: read in the same
                    # batch as its body's end (it ran), or held behind
                    # another and skipped when its turn came.
                    continue
                # Aborted before the app ran: nothing to stop, just end it.
                conn.sendall(connection.finish())
                if peer.body is not None:
                    peer.body.close()
                    peer.body = None
                if not connection.keep_conn or self.stopping:
                    return False
                events.extend(connection.resume())  # a request held behind this one
        return True

    def claim(self, offset: int, after: int | None) -> bool:
        """Take the byte lock of a request sent behind another (at `offset`,
        see claim_offset); False if the front has it.  `after`: the id of the request
        that began before it here.  The front may try to take this one back
        until it has read the end of that one, and it uses an id again only
        once it has read the end of the request that had it: so we keep the
        lock until a request with id `after` comes (let_go)."""
        fd = self.claim_file[0] if self.claim_file else None
        if fd is None:
            return True  # we offered no queueing: the mark means nothing here
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
        except OSError:
            return False
        self.held_claims[after] = offset
        return True

    def let_go(self, rid: int) -> None:
        """A request with id `rid` is here: the front has read the end of the
        last one with that id, so the lock of the request that came after
        that one may go, whether or not we run this one."""
        held = self.held_claims.pop(rid, None)
        if held is not None:
            with contextlib.suppress(OSError):
                fcntl.lockf(self.claim_file[0], fcntl.LOCK_UN, 1, held)

    def run_request(self, conn, connection, params, body, body_size: int,
                    frame: bytes | None = None) -> bool:
        """Call the app for one request; False if the connection must go (the
        response was cut short, or the web server closed it).  `frame`: see
        FRAME_PARAM."""
        environ = build_environ(params, body, body_size, self.mount)
        try:
            return self.call_app(conn, connection, environ, frame)
        except RequestAborted as abort:
            if abort.error is not None:
                # Bad bytes read while looking: the connection ends, and
                # serve_forever logs that once.
                raise abort.error from None
            # One line, no traceback: clients leave mid-response all the time.
            log(f"request aborted ({abort}): {request_line(environ)}")
            if abort.closed:
                return False
            # Spec 5.4: the application answers an abort with END_REQUEST.
            try:
                conn.sendall(connection.finish())
            except ConnectionError:
                return False
            return True

    def call_app(self, conn, connection, environ: dict | None,
                 frame: bytes | None = None) -> bool:
        if environ is None:
            send_plain(conn, connection, "404 Not Found",
                       b"Not Found: outside this app's mount prefix\n")
            return True
        if not environ.get("REQUEST_METHOD"):
            # CGI requires it and every app reads it; the web server is
            # misconfigured (fastcgi_params not included?).
            log(f"request {environ.get('REQUEST_URI', '-')} without REQUEST_METHOD: 400")
            send_plain(conn, connection, "400 Bad Request",
                       b"Bad Request: no REQUEST_METHOD from the web server\n")
            return True
        response = Response(conn, connection, environ["REQUEST_METHOD"] != "HEAD", frame)
        result = None
        try:
            result = self.app(environ, response.start_response)
            for chunk in result:
                response.write(chunk)
            if not response.status_set:
                raise AssertionError("the app returned without calling start_response()")
        except Exception:
            if response.aborted is not None:
                # Ours, from write() or between chunks, even if the app
                # caught it and raised something else instead.
                raise response.aborted from None
            log_request_error(environ)
            if response.head_sent:
                # Too late for a 500: send what the app gave (so the one
                # head goes out), then abort; the front closes the client.
                response.flush()
                return False
            response.start_response(
                "500 Internal Server Error",
                [("Content-Type", "text/plain; charset=utf-8")], sys.exc_info())
            response.write(b"Internal Server Error\n")
        finally:
            # PEP 3333: close() is called however the response ended,
            # aborted ones included (case K17).
            close = getattr(result, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log_request_error(environ)
        response.finish()
        return True


REFUSE_LINGER = 0.2  # seconds a stopping worker goes on refusing requests


def refuse_unread(peers: list[Peer]) -> None:
    """Stopping: answer every request the web server sent that we will not
    run with END_REQUEST OVERLOADED, so that it can send it elsewhere
    (corral's front does, whatever the method), rather than see it cut.
    For REFUSE_LINGER seconds, since a web server that has just read the
    end of our last response may be writing the next request already."""
    deadline = time.monotonic() + REFUSE_LINGER
    selector = selectors.DefaultSelector()
    for peer in peers:
        with contextlib.suppress(OSError, ValueError):
            peer.sock.setblocking(False)
            selector.register(peer.sock, selectors.EVENT_READ, peer)
        # Requests already read and held behind the last one: refused first.
        try:
            _refuse(peer, peer.codec.resume())
        except fastcgi.ProtocolError:
            pass
    try:
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for key, _ in selector.select(left):
                peer = key.data
                try:
                    data = peer.sock.recv(RECV_SIZE)
                    if data:
                        _refuse(peer, peer.codec.receive_data(data) + peer.codec.resume())
                except BlockingIOError:
                    continue
                except (ConnectionError, fastcgi.ProtocolError):
                    data = b""
                if not data:
                    selector.unregister(peer.sock)
    finally:
        selector.close()


def _refuse(peer: Peer, events: list) -> None:
    """END_REQUEST OVERLOADED for each request begun among `events`, and for
    each the codec still holds behind them."""
    refused = []
    while True:
        refused += [e.request_id for e in events if type(e) is BeginRequest]
        peer.codec.request_id = None  # refused, so over: its id may come again
        events = peer.codec.resume()
        if not events:
            break
    refusals = b"".join(peer.codec.end_request(rid, 0, fastcgi.ProtocolStatus.OVERLOADED)
                        for rid in refused)
    if refusals:
        with contextlib.suppress(OSError):
            peer.sock.setblocking(True)
            peer.sock.sendall(refusals)
            peer.sock.setblocking(False)


def send_plain(conn, connection: fastcgi.AppConnection, status: str, text: bytes) -> None:
    """A short text/plain answer of the worker's own, not the app's."""
    response = Response(conn, connection, True)
    response.start_response(status, [("Content-Type", "text/plain")])
    response.write(text)
    response.finish()


def log(message: str) -> None:
    sys.stderr.write(f"[worker {os.getpid()}] {message}\n")
    sys.stderr.flush()


def request_line(environ: dict | None) -> str:
    if environ is None:
        return "- -"
    return f"{environ.get('REQUEST_METHOD', '-')} {environ.get('REQUEST_URI', '-')}"


def log_request_error(environ) -> None:
    log(f"error in app for {request_line(environ)}:\n{traceback.format_exc().rstrip()}")


def die_with_parent(parent: int) -> None:
    """Ask the kernel to end us if the supervisor (pid `parent`) dies, even
    by SIGKILL.  The pid comes from the supervisor: read here, it could
    already be init's if the supervisor died while we were starting."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        raise SystemExit(EXIT_OK)


def make_listener(bind: str | None) -> socket.socket:
    if bind is None:
        return socket.socket(fileno=0)  # FastCGI: the listening socket is fd 0
    if bind.startswith("unix:"):
        path = bind[5:]
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
    else:
        host, _, port = bind.rpartition(":")
        sock = socket.create_server((host.strip("[]") or "127.0.0.1", int(port)),
                                    family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.listen(socket.SOMAXCONN)  # a web server may open many connections at once
    return sock


def bound_address(listener: socket.socket, bind: str) -> str:
    """Where we listen, as --bind spells it, with the real port for port 0."""
    if listener.family == socket.AF_UNIX:
        return bind
    host, port = listener.getsockname()[:2]
    return f"[{host}]:{port}" if listener.family == socket.AF_INET6 else f"{host}:{port}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m corral.worker",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("app", help="the WSGI callable, as module:callable")
    parser.add_argument("--mount", default="", help="URL prefix the app is mounted at")
    parser.add_argument("--bind", help="listen here (unix:PATH or HOST:PORT) "
                        "instead of on file descriptor 0")
    parser.add_argument("--parent", type=int, metavar="PID",
                        help="exit when this process (the one that started us) dies")
    parser.add_argument("--preload", type=int, metavar="FD",
                        help="be a preloader: import the app once, then fork a worker "
                        "for each listening socket the supervisor sends on the "
                        "SOCK_SEQPACKET socket FD (see corral/preload.py)")
    args = parser.parse_args(argv)
    if args.parent:
        die_with_parent(args.parent)
    # Ctrl-C in a terminal reaches the whole process group; the supervisor
    # decides how workers stop, so a worker ignores SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        app = load_app(args.app)
    except AppLoadError as exc:
        log(f"cannot load the app {args.app!r}: {exc}")
        return EXIT_APP_LOAD_ERROR
    if args.preload is not None:
        return Preloader(app, args.mount, socket.socket(fileno=args.preload)).run()
    return serve(app, args.mount, make_listener(args.bind), args.bind)


def serve(app, mount: str, listener: socket.socket, bind: str | None = None) -> int:
    """Be a worker on `listener` until asked to stop; the exit status."""
    worker = Worker(app, mount)
    signal.signal(signal.SIGTERM, worker.handle_sigterm)
    signal.signal(signal.SIGUSR1, worker.handle_timeout)
    if bind:
        # Last, as the readiness line: a SIGTERM sent as soon as it is seen
        # must find our handler, not the default action.
        log(f"listening on {bound_address(listener, bind)}")
    try:
        worker.serve_forever(listener)
    except SystemExit as exc:
        return exc.code or EXIT_OK
    return EXIT_OK


def close_connections() -> None:
    """Close the database connections the app opened (Django's, if loaded).

    The preloader calls it before it forks and each forked worker after:
    a connection left open would be one socket shared by several processes,
    whose queries and answers interleave on the wire."""
    db = sys.modules.get("django.db")
    if db is not None:
        db.connections.close_all()


class Preloader:
    """The app imported once; a worker forked from it per request of the
    supervisor, which holds the other end of `control` (SOCK_SEQPACKET, one
    message a datagram):

        supervisor -> preloader  b"fork" with the listening socket (SCM_RIGHTS)
        preloader -> supervisor  b"ready" once, after the import
                                 b"forked PID" with a pidfd of the worker
                                 b"exit PID STATUS" when a worker has exited
                                 (STATUS as asyncio gives it: -N for signal N)

    The preloader is the workers' parent, so it alone can reap them and know
    their exit statuses; it passes each one on at once.  The pidfd lets the
    supervisor signal a worker without any risk of pid reuse and see it exit
    if the preloader dies.  A worker dies with the preloader (PDEATHSIG: it
    finishes its request, then leaves), which dies with the supervisor.
    When the supervisor shuts its side for writing, the preloader forks no
    more, reports the exits of the workers it has left, and exits."""

    def __init__(self, app, mount: str, control: socket.socket) -> None:
        self.app = app
        self.mount = mount
        self.control = control
        self.children: set[int] = set()

    def run(self) -> int:
        close_connections()
        # Whatever the import made lives in memory the workers share with
        # us page by page; keep the collector from touching (and so copying)
        # those pages in every worker.
        gc.freeze()
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # only to wake us
        selector = selectors.DefaultSelector()
        selector.register(self.control, selectors.EVENT_READ)
        selector.register(wake_r, selectors.EVENT_READ)
        closing = False
        try:
            self.control.send(b"ready")
            while not closing or self.children:
                for key, _ in selector.select():
                    if key.fileobj is wake_r:
                        with contextlib.suppress(BlockingIOError):
                            while wake_r.recv(512):
                                pass
                        self.reap()
                        continue
                    message, fds, _, _ = socket.recv_fds(self.control, 64, 1)
                    if not message:  # the supervisor is done with us
                        closing = True
                        selector.unregister(self.control)
                        continue
                    if message == b"fork" and fds:
                        self.fork(fds[0], (self.control, wake_r, wake_w, selector))
                    for fd in fds:
                        os.close(fd)
                self.reap()  # a SIGCHLD may have come before the wakeup fd was read
        except OSError as exc:  # the supervisor is gone: our workers follow us
            log(f"preloader: the supervisor is gone ({exc}): exiting")
            return EXIT_OK
        return EXIT_OK

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.control.send(f"exit {pid} {os.waitstatus_to_exitcode(status)}".encode())

    def fork(self, listen_fd: int, ours: tuple) -> None:
        preloader = os.getpid()
        pid = os.fork()
        if pid == 0:
            self.become_worker(preloader, listen_fd, ours)  # never returns
        self.children.add(pid)
        # Open before we could reap it, so the pidfd is this process's.
        pidfd = os.pidfd_open(pid)
        try:
            socket.send_fds(self.control, [f"forked {pid}".encode()], [pidfd])
        finally:
            os.close(pidfd)

    def become_worker(self, preloader: int, listen_fd: int, ours: tuple) -> NoReturn:
        code = 1
        try:
            os.setsid()  # a process group of its own, as a direct worker has
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for thing in ours:
                thing.close()
            die_with_parent(preloader)
            # Post-fork step: nothing the app opened before the fork may be
            # shared with the preloader or a sibling.
            close_connections()
            os.dup2(listen_fd, 0)  # where a FastCGI worker finds its socket
            os.close(listen_fd)
            code = serve(self.app, self.mount, socket.socket(fileno=0))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log(f"worker failed:\n{traceback.format_exc().rstrip()}")
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
