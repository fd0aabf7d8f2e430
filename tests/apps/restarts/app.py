"""The app of tests/test_restarts.py: its pid, a stuck request, memory that
grows, and an import that takes APP_IMPORT_DELAY seconds (a slow Django)."""

import os
import sys
import time

time.sleep(float(os.environ.get("APP_IMPORT_DELAY", "0")))
if os.path.exists(os.environ.get("APP_BREAK_FILE", "/nonexistent")):
    raise RuntimeError("the app is broken (APP_BREAK_FILE exists)")

HELD = []  # memory /grow keeps, so the worker's RSS stays up


def application(environ, start_response):
    path = environ["PATH_INFO"]
    query = environ.get("QUERY_STRING", "")
    if path == "/stuck":
        sys.stderr.write(f"STUCK STARTED in {os.getpid()}\n")
        sys.stderr.flush()
        time.sleep(float(query or 60))
        body = b"woke up\n"
    elif path == "/sleep":
        time.sleep(float(query or 1))
        body = b"slept\n"
    elif path == "/grow":
        HELD.append(bytearray(int(query or 1) << 20))
        body = b"grown\n"
    else:
        body = f"{os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
