"""Restarts under load: corral, gunicorn and uWSGI serve the sample site
(SQLite, 2 workers each) to steady clients while each is restarted five times
by its graceful reload; every request not answered 200 is counted, by kind.

    .venv/bin/python benchmarks/restarts.py [--servers corral,gunicorn,uwsgi]

Method.  The servers start as `corral bench` starts them (its arrangements
`corral`, `gunicorn` and `uwsgi`, imported from corral/bench.py), on one copy
of the site, migrated once by its deploy step.  Client threads, each with one
kept-alive HTTP/1.1 connection (a new one when the server says
`Connection: close`, as gunicorn's sync workers do after every answer), GET
/bench/time, /bench/db (a row written per request) and /blog/ in turn, read
each answer to its end and check its status and body.  After a warm-up, each
server gets SIGHUP (corral's restart, gunicorn's and uWSGI's graceful reload)
five times: a restart counts as done when none of the processes the server had
before it is left, as many new ones run, and a GET answers 200; then the load
goes on for the same interval before the next one, and after the last.
Python clients rather than wrk: each lost request is seen and named (refused,
reset, closed before an answer, timed out, non-200, wrong body).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout: corral.bench from this tree

from corral import bench  # noqa: E402  (needs the path above)

PATHS = [("/bench/time", b"The time is"), ("/bench/db", b"The time is"),
         ("/blog/", b"Hello from corral")]
TIMEOUT = 10.0  # seconds a client waits for an answer before it counts a timeout
# After a failure a client waits this long before its next request: a server
# that refuses connections would otherwise be asked thousands of times a
# second, counting one outage as thousands of requests and taking the CPU it
# needs to come back.
FAILURE_PAUSE = 0.1
SERVERS = {"corral": "corral (SIGHUP)", "gunicorn": "gunicorn, sync workers (SIGHUP)",
           "uwsgi": "uWSGI, --http router (SIGHUP)"}


class Tally:
    """Answers and failures of all the clients, under one lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ok = 0
        self.failed: Counter = Counter()
        self.examples: dict[str, str] = {}

    def good(self) -> None:
        with self.lock:
            self.ok += 1

    def bad(self, kind: str, detail: str) -> None:
        with self.lock:
            self.failed[kind] += 1
            self.examples.setdefault(kind, detail)
        time.sleep(FAILURE_PAUSE)


def failure_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    # RemoteDisconnected is a ConnectionResetError too: looked at first.
    if isinstance(exc, (http.client.RemoteDisconnected, http.client.IncompleteRead,
                        ConnectionAbortedError)):
        return "closed"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    return type(exc).__name__


def client(port: int, offset: int, stop: threading.Event, tally: Tally) -> None:
    """One kept-alive connection doing PATHS in turn until `stop`."""
    conn: http.client.HTTPConnection | None = None
    turn = offset
    while not stop.is_set():
        path, marker = PATHS[turn % len(PATHS)]
        turn += 1
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
            try:
                conn.connect()
            except OSError as exc:
                tally.bad("connect", f"{type(exc).__name__}: {exc}")
                conn = None
                continue
            reused = False
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            # A kept connection closed before any answer is what a client
            # that retries idempotent requests would absorb: said apart.
            kind = failure_kind(exc) + (" (kept connection)" if reused else "")
            tally.bad(kind, f"GET {path}: {type(exc).__name__}: {exc}")
            conn.close()
            conn = None
            continue
        reused = True
        if response.status != 200:
            tally.bad(f"status {response.status}", f"GET {path}: {body[:200]!r}")
        elif marker not in body:
            tally.bad("wrong body", f"GET {path}: {body[:200]!r}")
        else:
            tally.good()
        if response.will_close:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


def server_processes(main: int) -> set[int]:
    return set(bench.descendants([main])) - {main}


def restart(launch: bench.Launch, main: int, port: int) -> float:
    """SIGHUP to the server, then wait until it serves again from all new
    processes; the seconds that took."""
    before = server_processes(main)
    started = time.monotonic()
    os.kill(main, signal.SIGHUP)
    while True:
        launch.check()
        now = server_processes(main)
        if not now & before and len(now) >= len(before):
            with contextlib.suppress(OSError, http.client.HTTPException):
                if bench.http_get(port, PATHS[0][0])[0] == 200:
                    return time.monotonic() - started
        if time.monotonic() - started > bench.READY_TIMEOUT:
            raise bench.BenchError(f"not serving again {bench.READY_TIMEOUT:g} s after "
                                   f"SIGHUP; processes before {sorted(before)}, now "
                                   f"{sorted(now)}")
        time.sleep(0.02)


def measure(key: str, target: bench.Target, folder: Path, args) -> dict:
    arrangement = bench.BY_KEY[key]
    launch = bench.Launch(folder)
    row = {"server": SERVERS[key], "restarts": 0, "hurt": 0, "seconds": [], "ok": 0,
           "failed": Counter()}
    try:
        port = bench.free_port()
        arrangement.start(launch, target, port, args.processes)
        bench.wait_ready(launch, port, *PATHS[0])
        main = launch.procs[0][1].pid
        tally, stop = Tally(), threading.Event()
        clients = [threading.Thread(target=client, args=(port, n, stop, tally), daemon=True)
                   for n in range(args.clients)]
        started = time.monotonic()
        for thread in clients:
            thread.start()
        try:
            time.sleep(args.interval)  # warm-up: every worker has served
            for _ in range(args.restarts):
                failed_before = sum(tally.failed.values())
                row["seconds"].append(restart(launch, main, port))
                row["restarts"] += 1
                time.sleep(args.interval)  # the same pace for every server
                row["hurt"] += sum(tally.failed.values()) > failed_before
        finally:
            stop.set()
            for thread in clients:
                thread.join(TIMEOUT + 5)
        row.update(ok=tally.ok, failed=tally.failed, examples=tally.examples,
                   duration=time.monotonic() - started)
    except bench.BenchError as exc:
        row["error"] = str(exc)
    finally:
        launch.stop()
    return row


def render(rows: list[dict]) -> str:
    lines = ["| server | requests | failed | failed by kind | restarts done | "
             "restarts that failed requests | back to serving, mean / max | req/s |",
             "|---|---:|---:|---|---:|---:|---|---:|"]
    for row in rows:
        failed = sum(row["failed"].values())
        kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(row["failed"].items())) or "-"
        seconds = row["seconds"]
        back = (f"{sum(seconds) / len(seconds):.2f} s / {max(seconds):.2f} s"
                if seconds else "-")
        rate = (row["ok"] + failed) / row["duration"] if row.get("duration") else 0
        lines.append(f"| {row['server']} | {row['ok'] + failed:,} | {failed:,} | {kinds} | "
                     f"{row['restarts']} | {row['hurt']} | {back} | {rate:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help="comma-separated, from: " + ", ".join(SERVERS))
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--interval", type=float, default=3.0,
                        help="seconds of load before the first restart, between two "
                             "and after the last")
    parser.add_argument("--clients", type=int, default=4, help="client threads")
    parser.add_argument("--processes", type=int, default=2, help="workers per server")
    args = parser.parse_args()
    keys = [k.strip() for k in args.servers.split(",") if k.strip()]
    unknown = [k for k in keys if k not in SERVERS]
    if unknown:
        parser.error(f"--servers: unknown {', '.join(unknown)}; choose from "
                     f"{', '.join(SERVERS)}")
    rows, notes = [], []
    # The SQLite file on tmpfs, as `corral bench` has it: the disk's flushes
    # would be what /bench/db measures, the same for every server.
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="corral-restarts-", dir=shm) as tmp, \
            contextlib.ExitStack() as stack:
        site = bench.prepare_site(bench.SAMPLE, Path(tmp) / "site", args.processes)
        env, version = bench.open_database("sqlite", site, stack, durable=False)
        target = bench.Target(site.spec, site.folder, {**site.env, **env})
        bench.run_deploy(target, Path(tmp) / "deploy.log")
        for key in keys:
            why = bench.BY_KEY[key].missing()
            if why:
                notes.append(f"{key} left out: {why}")
                continue
            bench.say(f"{key}: {args.restarts} restarts under load, "
                      f"{args.clients} clients")
            folder = Path(tmp) / key
            folder.mkdir()
            row = measure(key, target, folder, args)
            if "error" in row:
                notes.append(f"{key}: {row['error']}")
            for kind, example in row.get("examples", {}).items():
                notes.append(f"{key}, first {kind}: {example}")
            rows.append(row)
    print(f"{version}, {args.processes} workers per server, {args.clients} clients, "
          f"{args.restarts} restarts {args.interval:g} s apart\n")
    print(render(rows))
    for note in notes:
        print(f"- {note}")
    return 0 if all("error" not in row for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
