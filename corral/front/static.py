"""Static files answered by the front itself: safe path mapping, Content-Type,
ETag and Last-Modified validators with 304, and the body from disk (sendfile
for large files).

A path is served only if it resolves, symlinks followed, to a regular file
inside the mapped folder, with no segment starting with a dot, and is not the
app's config file.  Anything else is a 404 that says nothing about why.
"""

from __future__ import annotations

import asyncio
import mimetypes
import os
import stat
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path

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


async def serve(connection, request, found: tuple[Path, os.stat_result]) -> None:
    """Answer `request` on `connection` with the file in `found`."""
    path, st = found
    etag = etag_for(st)
    headers = [(b"ETag", etag),
               (b"Last-Modified", formatdate(st.st_mtime, usegmt=True).encode()),
               (b"Cache-Control", b"public, max-age=3600")]
    if not_modified(request.headers, etag, st.st_mtime):
        connection.respond(304, b"Not Modified", headers, b"")
        return
    ctype, encoding = mimetypes.guess_type(path.name)
    ctype = ctype or "application/octet-stream"
    if ctype.startswith("text/") or ctype in ("application/javascript", "text/javascript",
                                              "application/json", "image/svg+xml"):
        ctype += "; charset=utf-8"
    headers.append((b"Content-Type", ctype.encode()))
    if request.method == b"HEAD" or st.st_size <= SMALL_FILE:
        body = b""
        if request.method != b"HEAD":
            with open(path, "rb") as f:
                body = f.read()
        headers.append((b"Content-Length", b"%d" % (len(body) if body else st.st_size)))
        connection.respond(200, b"OK", headers, body)
        return
    connection.write_head(request, 200, b"OK", headers, st.st_size)
    with open(path, "rb") as f:
        try:
            sent = await send_file(connection, f, st.st_size)
        except (ConnectionError, RuntimeError):
            sent = 0  # the client went away (RuntimeError: transport closing)
    connection.current.sent += sent
    connection.remaining = None  # accounted for here, not by the connection
    if sent < st.st_size:
        connection.keep_alive = False  # it shrank under us, or the client left
    connection.finish()


async def send_file(connection, f, size: int) -> int:
    """Send `size` bytes of `f`; the number sent.

    Zero-copy sendfile where the event loop offers it (asyncio's own); uvloop
    has none yet, so there the file goes out in pieces, each written once the
    client has taken the previous ones (backpressure, bounded memory).
    """
    try:
        return await asyncio.get_running_loop().sendfile(connection.transport, f, 0, size)
    except NotImplementedError:
        pass
    f.seek(0)
    remaining = size
    while remaining > 0 and not connection.lost:
        piece = f.read(min(PIECE, remaining))
        if not piece:
            break
        remaining -= len(piece)
        connection.transport.write(piece)
        await connection.drain()
    return size - remaining
