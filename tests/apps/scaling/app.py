"""The app of tests/test_scaling.py: its pid and parent, a slow and a stuck
request, and the code version read from VERSION when it is imported (so a
restart shows whether new code was imported)."""

import os
import sys
import time

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "VERSION")) as f:
    VERSION = f.read().strip()
IMPORTED_BY = os.getpid()


def application(environ, start_response):
    path = environ["PATH_INFO"]
    query = environ.get("QUERY_STRING", "")
    if path == "/sleep":
        time.sleep(float(query or 1))
        body = f"{os.getpid()}\n"
    elif path == "/stuck":
        sys.stderr.write(f"STUCK STARTED in {os.getpid()}\n")
        sys.stderr.flush()
        time.sleep(60)
        body = "woke up\n"
    elif path == "/who":
        body = f"{os.getpid()} {os.getppid()} {IMPORTED_BY} {VERSION}\n"
    else:
        body = f"{os.getpid()}\n"
    data = body.encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(data)))])
    return [data]
