"""__project__: a bare WSGI app (PEP 3333), no framework; corral's workers
load `app:application` (see corral.toml)."""
import html
import platform
import sys

PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>__project__</title></head>
<body>
  <h1>__project__ works</h1>
  <p>This WSGI app is served by corral, on Python {version} from {prefix}.</p>
  <p>You asked for <code>{path}</code>. Edit <code>app.py</code>, then restart
    <code>corral serve</code>.</p>
</body>
</html>
"""


def application(environ, start_response):
    body = PAGE.format(version=platform.python_version(), prefix=html.escape(sys.prefix),
                       path=html.escape(environ.get("PATH_INFO") or "/")).encode()
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                              ("Content-Length", str(len(body)))])
    return [body]
