"""A WSGI app served by flup's FastCGI server, not corral's worker: a FastCGI
implementation nobody here wrote, run by corral as a `fastcgi` engine.  flup
finds its listening socket on file descriptor 0, as the FastCGI spec says."""

import json
import os

from flup.server.fcgi import WSGIServer


def application(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length)
    out = json.dumps({"pid": os.getpid(), "method": environ["REQUEST_METHOD"],
                      "path": environ.get("PATH_INFO", ""),
                      "query": environ.get("QUERY_STRING", ""),
                      "body": body.decode("latin-1")}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")])
    return [out]


if __name__ == "__main__":
    # One thread, no multiplexing: corral keeps one connection per process.
    WSGIServer(application, multithreaded=False, multiplexed=False).run()
