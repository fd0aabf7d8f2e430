"""A WSGI app for tests: each path shows one behaviour the server must get right."""

import hashlib
import json
import os
import sys
import time


def echo(environ, start_response):
    """The request as the app sees it, as JSON (the 'echo app' of the cases)."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length)
    seen = {k: v for k, v in environ.items()
            if k.startswith(("HTTP_", "CONTENT_")) or k in (
                "REQUEST_METHOD", "PATH_INFO", "SCRIPT_NAME", "QUERY_STRING",
                "SERVER_PROTOCOL", "REQUEST_URI", "SERVER_NAME", "SERVER_PORT",
                "REMOTE_ADDR", "wsgi.url_scheme")}
    seen["body"] = body.decode("latin-1")
    seen["pid"] = os.getpid()
    seen["multiprocess"] = environ["wsgi.multiprocess"]
    seen["input_terminated"] = environ.get("wsgi.input_terminated")
    out = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(out)))])
    return [out]


def split_header(environ, start_response):  # K05
    variant = environ.get("QUERY_STRING")
    headers = [("Content-Type", "text/plain")]
    status = "200 OK"
    if variant == "name":
        headers.append(("X-T\r\nInjected", "hi"))
    elif variant == "status":
        status = "200 OK\r\nInjected: 1"
    elif variant == "nul":
        headers.append(("X-T", "a\x00b"))
    else:
        headers.append(("X-T", "hi\r\nContent-Length: 0\r\n\r\n"))
    start_response(status, headers)
    return [b"body"]


def cookies(environ, start_response):  # K06
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Set-Cookie", "a=1; Path=/"),
                              ("Set-Cookie", "b=2; Path=/")])
    return [b"two cookies"]


def location(environ, start_response):  # K08
    where = "/foob\u00e0r" if environ.get("QUERY_STRING") != "euro" else "/\u20ac"
    start_response("302 Found", [("Location", where)])
    return []


def exc_info(environ, start_response):  # K14
    start_response("200 OK", [("Content-Type", "text/plain")])
    if environ.get("QUERY_STRING") == "late":
        yield b"first chunk"
    try:
        raise ValueError("boom")
    except ValueError:
        start_response("500 Internal Server Error", [("Content-Type", "text/plain")],
                       sys.exc_info())
    yield b"oops"


def twice(environ, start_response):  # K14: a second call without exc_info
    start_response("200 OK", [("Content-Type", "text/plain")])
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"never"]


def write_callable(environ, start_response):  # K15
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"hello ")
    return [b"world"]


def head(environ, start_response):  # K13
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "12")])
    return [b"hello world\n"]


def no_content(environ, start_response):
    start_response("204 No Content", [("Content-Length", "5")])
    return [b"oops!"]


def slow(environ, start_response):
    seconds = float(environ.get("QUERY_STRING") or 3)
    time.sleep(seconds)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"slept %g\n" % seconds]


def stream(environ, start_response):
    """Chunks without a Content-Length: chunked to HTTP/1.1 clients."""
    count = int(environ.get("QUERY_STRING") or 3)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return (b"chunk %d\n" % i for i in range(count))


def big(environ, start_response):
    size = int(environ.get("QUERY_STRING") or 10_000_000)
    block = bytes(range(256)) * 256
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(size))])

    def body():
        left = size
        while left > 0:
            piece = block[:min(left, len(block))]
            left -= len(piece)
            yield piece
    return body()


def crash(environ, start_response):
    raise RuntimeError("the app failed on purpose")


def exit_worker(environ, start_response):
    os._exit(3)


class Closing:
    """An iterable whose close() leaves a mark in the log."""

    def __init__(self):
        self.items = [b"closing body"]

    def __iter__(self):
        return iter(self.items)

    def close(self):
        sys.stderr.write("CLOSE CALLED\n")
        sys.stderr.flush()


def closing(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return Closing()


def pid(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]


ROUTES = {
    "/echo": echo, "/split-header": split_header, "/cookies": cookies,
    "/location": location, "/exc-info": exc_info, "/twice": twice,
    "/write": write_callable, "/head": head, "/no-content": no_content,
    "/slow": slow, "/stream": stream, "/big": big, "/crash": crash,
    "/exit": exit_worker, "/closing": closing, "/pid": pid,
}


def exc_info_after_empty(environ, start_response):  # K14: an empty chunk sends no head
    start_response("200 OK", [("Content-Type", "text/plain")])
    yield b""
    try:
        raise ValueError("boom")
    except ValueError:
        start_response("500 Internal Server Error", [("Content-Type", "text/plain")],
                       sys.exc_info())
    yield b"oops"


def digest(environ, start_response):
    """Length and SHA-256 of the body, read to its end in 8 KiB pieces."""
    stream = environ["wsgi.input"]
    sha = hashlib.sha256()
    size = 0
    while True:
        piece = stream.read(8192)
        if not piece:
            break
        sha.update(piece)
        size += len(piece)
    out = b"%d %s" % (size, sha.hexdigest().encode())
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [out]


def slow_logged(environ, start_response):
    """/slow that first says so in the log, so a test can act while it runs."""
    sys.stderr.write("SLOW STARTED\n")
    sys.stderr.flush()
    return slow(environ, start_response)


class FailingClosing(Closing):
    """A Closing whose iteration fails, at once or after one chunk."""

    def __init__(self, late):
        super().__init__()
        self.late = late

    def __iter__(self):
        if self.late:
            yield b"first chunk"
        raise RuntimeError("the body failed on purpose")


def closing_fails(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return FailingClosing(environ.get("QUERY_STRING") == "late")


def length(environ, start_response):
    """A body that does not match its own Content-Length: longer or shorter."""
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "10")])
    if environ.get("QUERY_STRING") == "over":
        return [b"0123456789", b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nsmuggle"]
    return [b"01234"]


ROUTES.update({
    "/length": length,
    "/exc-info-after-empty": exc_info_after_empty, "/digest": digest,
    "/slow-logged": slow_logged, "/closing-fails": closing_fails,
})


def log_call(environ):
    calls = os.environ.get("CASES_CALL_LOG")
    if calls:  # lets a test prove that a refused request never reached the app
        with open(calls, "a", encoding="utf-8") as f:
            f.write(environ.get("REQUEST_URI", environ["PATH_INFO"]) + "\n")


def echo_all(environ, start_response):
    """Every path echoes: for replayed and fuzzed requests, whose targets are arbitrary.
    The method comes back in a header, so a client can tell a HEAD answer has no body."""
    log_call(environ)

    def start(status, headers, exc_info=None):
        headers = [*headers, ("X-Request-Method", environ["REQUEST_METHOD"])]
        return start_response(status, headers, exc_info)
    return echo(environ, start)


def application(environ, start_response):
    path = environ["PATH_INFO"]
    log_call(environ)
    handler = ROUTES.get(path)
    if handler is None:
        if path.startswith("/echo"):
            return echo(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no such case\n"]
    return handler(environ, start_response)
