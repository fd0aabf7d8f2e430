"""A WSGI app for abort tests (case K17): a response that trickles out a chunk
at a time, and leaves in a file how far it got when it was closed."""

import os
import time
from urllib.parse import parse_qs


class Drip:
    """`count` chunks, `delay` seconds apart; close() writes how many went."""

    def __init__(self, count: int, delay: float, mark: str) -> None:
        self.count, self.delay, self.mark = count, delay, mark
        self.made = 0

    def __iter__(self):
        for i in range(self.count):
            if i:
                time.sleep(self.delay)
            self.made += 1
            yield b"chunk %d\n" % i

    def close(self) -> None:
        with open(self.mark, "w", encoding="ascii") as f:
            f.write(f"closed after {self.made} chunks\n")


def drip_write(count: int, delay: float, mark: str, start_response):
    """The same through the legacy write() callable: the abort reaches the
    app as an exception from write(), so the app's `finally` leaves the mark."""
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    made = 0
    try:
        for i in range(count):
            if i:
                time.sleep(delay)
            made += 1
            write(b"chunk %d\n" % i)
    finally:
        with open(mark, "w", encoding="ascii") as f:
            f.write(f"write stopped after {made} chunks\n")
    return []


def application(environ, start_response):
    query = {k: v[0] for k, v in parse_qs(environ["QUERY_STRING"]).items()}
    count = int(query.get("count", 100))
    delay = float(query.get("delay", 0.1))
    if environ["PATH_INFO"] == "/drip":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Drip(count, delay, query["mark"])
    if environ["PATH_INFO"] == "/drip-write":
        return drip_write(count, delay, query["mark"], start_response)
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
