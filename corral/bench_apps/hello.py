"""The plain WSGI app of `corral bench`: a fixed answer with no framework
under it, so what it measures is each server's own cost per request."""

BODY = b"Hello, world!\n"
HEADERS = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(BODY)))]


def application(environ, start_response):
    start_response("200 OK", list(HEADERS))  # a copy: a server may add to the list it is given
    return [BODY]
