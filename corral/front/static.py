"""Static files answered by the front itself: safe path mapping, Content-Type,
ETag and Last-Modified validators with 304, single byte ranges (206, 416,
If-Range), precompressed .br and .gz siblings, year-long caching of
content-hashed names, and the body from disk with sendfile.

A path is served only if it resolves, symlinks followed, to a regular file
inside the mapped folder, with no segment starting with a dot, and is not the
app's config file.  Anything else is a 404 that says nothing about why.
"""

from __future__ import annotations

import mimetypes
import os
import re
import stat
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path

from corral.front.http import WRITE_HIGH_WATER

SMALL_FILE = 256 * 1024  # read at once; larger files go out with send_file()
PIECE = 256 * 1024

mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("image/svg+xml", ".svg")
mimetypes.add_type("font/woff2", ".woff2")


class StaticMapping:
    """One URL prefix served from one folder."""

    def __init__(self, prefix: str, folder: Path, forbidden: tuple[Path, ...] = ()) -> None:
        self.prefix = prefix.encode()  # ends with "/"
        self.folder = folder.resolve()
        self.forbidden = frozenset(p.resolve() for p in forbidden)

    def matches(self, path: bytes) -> bool:
        return path.startswith(self.prefix) or path + b"/" == self.prefix

    def resolve(self, path: bytes) -> tuple[Path, os.stat_result] | None:
        """The file for a decoded request path under this prefix, or None."""
        rest = path[len(self.prefix):]
        try:
            text = rest.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if text.endswith("/"):
            return None  # a folder (no listings), or a file named as if it were one
        parts = [p for p in text.split("/") if p]
        if not parts or any(p.startswith(".") or "\\" in p for p in parts):
            return None
        candidate = self.folder.joinpath(*parts)
        try:
            real = candidate.resolve(strict=True)
            st = real.stat()
        except (OSError, RuntimeError):
            return None
        if not real.is_relative_to(self.folder) or not stat.S_ISREG(st.st_mode):
            return None
        if real in self.forbidden or real.name == "corral.toml":
            return None
        return real, st


def etag_for(st: os.stat_result) -> bytes:
    return b'"%x-%x"' % (st.st_mtime_ns, st.st_size)


def not_modified(headers, etag: bytes, mtime: float) -> bool:
    """RFC 9110 13.1: If-None-Match wins over If-Modified-Since."""
    inm = ims = None
    for name, value in headers:
        lower = name.lower()
        if lower == b"if-none-match":
            inm = value
        elif lower == b"if-modified-since":
            ims = value
    if inm is not None:
        tags = [t.strip().removeprefix(b"W/") for t in inm.split(b",")]
        return b"*" in tags or etag in tags
    if ims is not None:
        try:
            since = parsedate_to_datetime(ims.decode("latin-1")).timestamp()
        except (TypeError, ValueError, IndexError):
            return False
        return int(mtime) <= since
    return False


# Names that carry a content hash, as Django's ManifestStaticFilesStorage and
# most bundlers write them (site.3f2a9c1b7e4d.css): safe to cache for a year.
_HASHED = re.compile(r"\.[0-9a-f]{8,32}\.[A-Za-z0-9]+$")
_ENCODINGS = ((b"br", ".br"), (b"gzip", ".gz"))  # our order of preference


def accepted_codings(headers) -> set[bytes]:
    """Content codings the client takes (RFC 9110 12.5.3), q=0 excluded."""
    found = set()
    for name, value in headers:
        if name.lower() != b"accept-encoding":
            continue
        for item in value.split(b","):
            coding, _, params = item.strip().partition(b";")
            q = params.strip()
            if q.startswith(b"q="):
                try:
                    if float(q[2:]) == 0:
                        continue
                except ValueError:
                    continue
            found.add(coding.strip().lower())
    return found


def precompressed(path: Path, folder: Path, headers) -> tuple[Path, os.stat_result, bytes] | None:
    """A .br or .gz sibling of `path` the client accepts, if one is on disk."""
    accepted = accepted_codings(headers)
    for coding, suffix in _ENCODINGS:
        if coding not in accepted and b"*" not in accepted:
            continue
        sibling = path.with_name(path.name + suffix)
        try:
            real = sibling.resolve(strict=True)
            st = real.stat()
        except (OSError, RuntimeError):
            continue
        if stat.S_ISREG(st.st_mode) and real.is_relative_to(folder):
            return real, st, coding
    return None


def has_variants(path: Path) -> bool:
    return any(path.with_name(path.name + suffix).exists() for _, suffix in _ENCODINGS)


def byte_range(headers, size: int, etag: bytes, mtime: float) -> tuple[int, int] | None | bool:
    """The one range asked for, as (first, last); None for the whole file;
    False when it cannot be satisfied (416).  Several ranges, or a Range that
    If-Range says is stale, get the whole file (RFC 9110 14.2 allows it)."""
    value = if_range = None
    for name, v in headers:
        lower = name.lower()
        if lower == b"range":
            value = v
        elif lower == b"if-range":
            if_range = v
    if value is None or not value.startswith(b"bytes="):
        return None
    if if_range is not None:
        if if_range.startswith(b'"'):
            if if_range != etag:  # If-Range compares strong validators only
                return None
        else:
            try:
                if parsedate_to_datetime(if_range.decode("latin-1")).timestamp() < int(mtime):
                    return None
            except (TypeError, ValueError, IndexError):
                return None
    spec = value[6:].strip()
    if b"," in spec:
        return None
    first, dash, last = spec.partition(b"-")
    first, last = first.strip(), last.strip()
    if not dash or not (first.isdigit() or first == b"") or not (last.isdigit() or last == b""):
        return None  # not a valid range: ignored, as if absent
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0:
            return False
        return max(0, size - suffix), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if (last and int(last) < start):
        return None
    if start >= size:
        return False
    return start, end


async def serve(connection, request, found: tuple[Path, os.stat_result],
                folder: Path | None = None) -> None:
    """Answer `request` on `connection` with the file in `found` (or a
    precompressed sibling of it) from the mapped `folder`."""
    path, st = found
    ctype, _ = mimetypes.guess_type(path.name)
    ctype = ctype or "application/octet-stream"
    if ctype.startswith("text/") or ctype in ("application/javascript", "text/javascript",
                                              "application/json", "image/svg+xml"):
        ctype += "; charset=utf-8"
    headers = []
    if folder is not None and has_variants(path):
        headers.append((b"Vary", b"Accept-Encoding"))
        variant = precompressed(path, folder, request.headers)
        if variant is not None:
            path, st, coding = variant
            headers.append((b"Content-Encoding", coding))
    etag = etag_for(st)
    lifetime = b"public, max-age=31536000, immutable" if _HASHED.search(found[0].name) \
        else b"public, max-age=3600"
    headers += [(b"ETag", etag),
                (b"Last-Modified", formatdate(st.st_mtime, usegmt=True).encode()),
                (b"Cache-Control", lifetime), (b"Accept-Ranges", b"bytes")]
    if not_modified(request.headers, etag, st.st_mtime):
        connection.respond(304, b"Not Modified", headers, b"")
        return
    headers.append((b"Content-Type", ctype.encode()))
    size = st.st_size
    wanted = byte_range(request.headers, size, etag, st.st_mtime)
    if wanted is False:
        connection.respond(416, b"Range Not Satisfiable",
                           [*headers[:-1], (b"Content-Range", b"bytes */%d" % size)], b"")
        return
    status, reason, offset, count = 200, b"OK", 0, size
    if wanted is not None:
        first, last = wanted
        status, reason, offset, count = 206, b"Partial Content", first, last - first + 1
        headers.append((b"Content-Range", b"bytes %d-%d/%d" % (first, last, size)))
    if request.method == b"HEAD" or count <= SMALL_FILE:
        body = b""
        if request.method != b"HEAD":
            with open(path, "rb") as f:
                body = os.pread(f.fileno(), count, offset)
        headers.append((b"Content-Length", b"%d" % (len(body) if body else count)))
        connection.respond(status, reason, headers, body)
        return
    connection.write_head(request, status, reason, headers, count)
    with open(path, "rb") as f:
        try:
            sent = await send_file(connection, f, offset, count)
        except (ConnectionError, RuntimeError):
            sent = 0  # the client went away (RuntimeError: transport closing)
    connection.current.sent += sent
    connection.remaining = None  # accounted for here, not by the connection
    if sent < count:
        connection.keep_alive = False  # it shrank under us, or the client left
    connection.finish()


async def send_file(connection, f, offset: int, count: int) -> int:
    """Send `count` bytes of `f` from `offset`; the number sent.

    Zero-copy with os.sendfile straight to the socket whenever the
    connection's own write buffer is empty (so bytes stay in order).  When
    the socket is full, one piece goes through the transport instead, which
    writes it as the client reads; the next sendfile waits until it has.
    TLS connections cannot use sendfile and always take that path.
    """
    transport = connection.transport
    sock = transport.get_extra_info("socket")
    zero_copy = sock is not None and transport.get_extra_info("ssl_object") is None
    fd = f.fileno()
    done = 0
    if not zero_copy:
        while done < count and not connection.lost:
            piece = os.pread(fd, min(PIECE, count - done), offset + done)
            if not piece:
                break
            transport.write(piece)
            done += len(piece)
            await connection.drain()  # backpressure: bounded memory per client
        return done
    # A limit of 0 makes drain() wait until the transport's buffer is empty.
    transport.set_write_buffer_limits(high=0)
    try:
        while done < count and not connection.lost:
            await connection.drain()
            if connection.lost:
                break
            try:
                sent = os.sendfile(sock.fileno(), fd, offset + done, count - done)
            except BlockingIOError:
                sent = 0
            if sent == 0 and os.fstat(fd).st_size <= offset + done:
                break  # the file shrank under us
            if sent == 0:
                piece = os.pread(fd, min(PIECE, count - done), offset + done)
                if not piece:
                    break
                transport.write(piece)
                sent = len(piece)
            done += sent
    finally:
        if not connection.lost:
            transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
    return done
