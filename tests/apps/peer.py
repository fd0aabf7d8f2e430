"""A WSGI app for tests against FastCGI peers we did not write: it answers with
the request as it arrived, the body as its length and SHA-256."""

import hashlib
import json


def application(environ, start_response):
    body = environ["wsgi.input"].read()
    seen = {key: environ.get(key) for key in (
        "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE",
        "CONTENT_LENGTH", "HTTP_COOKIE", "wsgi.url_scheme")}
    seen["body_length"] = len(body)
    seen["body_sha256"] = hashlib.sha256(body).hexdigest()
    out = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(out)))])
    return [out]
