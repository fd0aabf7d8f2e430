"""What a worker costs to start, by [app] spawn_mode, for the sample Django
site on SQLite: spawn to ready, and the first request of a pool at zero.

    .venv/bin/python benchmarks/spawn.py [--runs 5]

1. Spawn to ready: a pool of one worker; the worker is killed, and the time
   from the supervisor's line that it exited to the line that its
   replacement is ready is read from the server's log (both stamped to the
   millisecond).  Direct mode starts an interpreter and imports Django;
   preload mode forks from the preloader, which has imported it already.
2. First request from zero: processes = "0-1"; once the pool has stopped
   its idle worker (and, in preload mode, its preloader), one GET / is timed
   from connect to the last byte.  Both modes start from nothing here.
Each figure is the median of --runs runs.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "examples" / "django-site"
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


class Server:
    """`corral serve` on a folder, its log kept line by line."""

    def __init__(self, folder: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), CORRAL_ALLOW_ROOT="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "corral", "serve", str(folder), "--bind", "127.0.0.1:0"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        line = self.wait_for(r"listening on http://")
        self.port = int(re.search(r"http://[\d.]+:(\d+)", line).group(1))
        self.wait_for(r"INFO ready: ")

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 120) -> str:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                found = [line for line in self.lines if regex.search(line)]
                if len(found) >= count:
                    return found[count - 1]
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"no {pattern!r} in the log:\n" + "\n".join(self.lines))
                self.changed.wait(0.5)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def stamp(line: str) -> float:
    return datetime.strptime(STAMP.match(line).group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def site_copy(parent: Path, name: str, app: str) -> Path:
    folder = parent / name
    shutil.copytree(SITE, folder, ignore=shutil.ignore_patterns(
        "__pycache__", "db.sqlite3", "*.log"))
    config = folder / "corral.toml"
    config.write_text(config.read_text().replace("processes = 2\n", app + "\n"))
    return folder


def get(port: int) -> float:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/")
    response = conn.getresponse()
    response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"GET / answered {response.status}")
    return time.perf_counter() - started


def spawn_to_ready(parent: Path, mode: str, runs: int) -> list[float]:
    server = Server(site_copy(parent, f"spawn-{mode}", f'processes = 1\nspawn_mode = "{mode}"'))
    times = []
    try:
        get(server.port)
        pid = int(re.search(r"worker pid (\d+) ready", server.wait_for(r"worker pid \d+ ready"))
                  .group(1))
        for run in range(1, runs + 1):
            # Past QUICK_EXIT, so the replacement is not held back as a crash.
            time.sleep(2.2)
            os.kill(pid, signal.SIGKILL)
            gone = server.wait_for(rf"worker pid {pid} of \S+ exited unexpectedly")
            ready = server.wait_for(r"worker pid \d+ ready", count=run + 1)
            pid = int(re.search(r"worker pid (\d+) ready", ready).group(1))
            times.append(stamp(ready) - stamp(gone))
    finally:
        server.stop()
    return times


def first_request_from_zero(parent: Path, mode: str, runs: int) -> list[float]:
    server = Server(site_copy(parent, f"zero-{mode}",
                              f'processes = "0-1"\nidle_timeout = 0.5\nspawn_mode = "{mode}"'))
    times = []
    try:
        for run in range(1, runs + 1):
            times.append(get(server.port))
            server.wait_for(r"0 workers left", count=run)
            if mode == "preload":
                server.wait_for(r"preloader pid \d+ of \S+ stopped", count=run)
            time.sleep(0.2)  # the worker's exit reaped, its socket gone
    finally:
        server.stop()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print(f"sample Django site on SQLite, median of {args.runs} runs; "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="corral-spawn-") as tmp:
        parent = Path(tmp)
        for mode in ("direct", "preload"):
            spawn = spawn_to_ready(parent, mode, args.runs)
            zero = first_request_from_zero(parent, mode, args.runs)
            print(f"{mode:>8}: spawn to ready {statistics.median(spawn) * 1000:7.1f} ms "
                  f"(min {min(spawn) * 1000:.1f}, max {max(spawn) * 1000:.1f}); "
                  f"first request from zero {statistics.median(zero) * 1000:7.1f} ms "
                  f"(min {min(zero) * 1000:.1f}, max {max(zero) * 1000:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
