"""How many idle keep-alive connections the front holds, at what memory, and
what they cost the requests that are active meanwhile; nginx beside it.

    .venv/bin/python benchmarks/idle_connections.py [--counts 1000,5000,10000]

Each idle connection sends one request, reads the answer and then stays open
without a word, as a browser's spare connections do.  For each count the
script prints the server's resident memory (all its processes, workers
excluded for corral since the front is what holds connections) and the p50
and p99 latency of 500 requests made on another connection alongside.  First,
with wrk installed, the requests per second of a 10 KB static file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELLO = b"hello, world\n" * 787  # about 10 KB, the static file both servers send


def free_port() -> int:
    # A benchmark, not a test: a port that is free now is good enough.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
        except (OSError, AttributeError):
            pass
    return total


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on port {port}")


class Corral:
    name = "corral"

    def __init__(self, folder: Path) -> None:
        app = folder / "corral-app"
        (app / "public").mkdir(parents=True)
        (app / "public" / "hello.txt").write_bytes(HELLO)
        (app / "hello.py").write_text(
            "def application(environ, start_response):\n"
            "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
            "    return [b'hello']\n")
        self.port = free_port()
        (app / "corral.toml").write_text(
            '[app]\nwsgi = "hello:application"\nprocesses = 1\n[env]\nPYTHONPATH = "."\n'
            '[static]\n"/static/" = "public"\n'
            f'[server]\nbind = "127.0.0.1:{self.port}"\naccess_log = ""\n'
            "keepalive_timeout = 600\n")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "corral", "serve", str(app)],
                                     env=env, stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def pids(self) -> list[int]:
        return [self.proc.pid]  # the front; the worker holds no client connection

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


class Nginx:
    name = "nginx"

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        root = folder / "nginx"
        (root / "static").mkdir(parents=True)
        (root / "static" / "hello.txt").write_bytes(HELLO)
        self.port = free_port()
        user = "user root;" if os.geteuid() == 0 else ""
        (root / "nginx.conf").write_text(f"""
daemon off; {user} worker_processes 1; worker_rlimit_nofile 30000;
pid {root}/nginx.pid; error_log {root}/error.log;
events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_timeout 600s; keepalive_requests 100000;
  client_body_temp_path {root}/body; proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fastcgi; uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;
  server {{ listen 127.0.0.1:{self.port} backlog=4096; root {root};
    location /static/ {{ }} }} }}
""")
        self.proc = subprocess.Popen([binary, "-c", str(root / "nginx.conf"), "-p", str(root)],
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port, self.proc)

    def pids(self) -> list[int]:
        return [self.proc.pid, *children(self.proc.pid)]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


REQUEST = b"GET /static/hello.txt HTTP/1.1\r\nHost: bench\r\n\r\n"


async def read_one(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length:\s*(\d+)", head).group(1))
    await reader.readexactly(length)


async def open_idle(port: int, count: int, held: list) -> None:
    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(REQUEST)
        await read_one(reader)
        held.append(writer)
    pending = count - len(held)
    for start in range(0, pending, 500):  # in waves, so the accept queue keeps up
        await asyncio.gather(*(one() for _ in range(min(500, pending - start))))


async def active_latency(port: int, requests: int = 500) -> tuple[float, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        writer.write(REQUEST)
        await read_one(reader)
        times.append((time.perf_counter() - started) * 1000)
    writer.close()
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


def static_rps(port: int, seconds: int = 5) -> float | None:
    """Requests per second for the 10 KB static file under wrk (32 connections)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    out = subprocess.run([wrk, "-t2", "-c32", f"-d{seconds}s",
                          f"http://127.0.0.1:{port}/static/hello.txt"],
                         capture_output=True, text=True, check=True).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


async def measure(server, counts: list[int]) -> list[tuple]:
    rows = []
    held: list = []
    for count in [0, *counts]:
        await open_idle(server.port, count, held)
        await asyncio.sleep(1)  # let the server settle before reading its memory
        p50, p99 = await active_latency(server.port)
        rows.append((server.name, count, rss_kib(server.pids()) / 1024, p50, p99))
        print(f"  {server.name}: {count:>6} idle connections: "
              f"{rows[-1][2]:7.1f} MiB, active p50 {p50:.2f} ms, p99 {p99:.2f} ms",
              file=sys.stderr, flush=True)
    for writer in held:
        writer.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1000,5000,10000",
                        help="idle connection counts (default 1000,5000,10000)")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < max(counts) + 100:
        sys.exit(f"the open-file limit ({hard}) is below {max(counts)} connections")
    rows, statics = [], []
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        for kind in (Corral, Nginx):
            if kind is Nginx and not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
                print("nginx is not installed: left out", file=sys.stderr)
                continue
            server = kind(Path(tmp))
            try:
                statics.append((server.name, static_rps(server.port)))
                rows += asyncio.run(measure(server, counts))
            finally:
                server.stop()
    print("\n| server | idle connections | memory (MiB) | active p50 (ms) | active p99 (ms) |")
    print("|---|---:|---:|---:|---:|")
    for name, count, mib, p50, p99 in rows:
        print(f"| {name} | {count} | {mib:.1f} | {p50:.2f} | {p99:.2f} |")
    print("\n| server | 10 KB static file, requests/s (wrk, 32 connections, 5 s) |")
    print("|---|---:|")
    for name, rps in statics:
        print(f"| {name} | {'wrk not installed' if rps is None else f'{rps:.0f}'} |")


if __name__ == "__main__":
    main()
