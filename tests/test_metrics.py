"""Prometheus metrics and `corral status` of a real server: /metrics scraped
with a real HTTP client and parsed with prometheus_client's own parser, and
the numbers checked to move with real requests, recycling, a crash, a
restart and a queue of waiting requests."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import ROOT, ServerProcess, connect, read_response, read_to_close
from tests.test_restarts import get, restarts_app


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample at `url`: (name, sorted labels without app) -> value."""
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "app"))
            samples[(sample.name, labels)] = sample.value
    return samples


def value(url: str, name: str, **labels: str) -> float | None:
    return scrape(url).get((name, tuple(sorted(labels.items()))))


def wait_value(url: str, name: str, want, timeout: float = 20.0, **labels: str) -> float:
    """Poll until the sample satisfies `want` (a value or a predicate)."""
    test = want if callable(want) else (lambda v: v == want)
    deadline = time.monotonic() + timeout
    while True:
        found = value(url, name, **labels)
        if found is not None and test(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} is {found}, not {want}")
        time.sleep(0.05)


def metrics_url(server: ServerProcess) -> str:
    return re.search(r"metrics at (\S+)", server.wait_for(r"metrics at ")).group(1)


def corral(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "corral", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture
def server(tmp_path):
    # behind_limit = 0: a request never goes behind the busy worker's one,
    # so the ones that find it busy are all in the queue these tests read.
    app = restarts_app(tmp_path, app="max_requests = 3\nbehind_limit = 0", processes=1,
                       deploy='command = ["python", "-c", "print(42)"]')
    with open(app / "corral.toml", "a") as f:
        f.write('[server]\nmetrics = "127.0.0.1:0"\n')
    server = ServerProcess(app).wait_ready()
    server.metrics = metrics_url(server)
    server.app = app
    yield server
    server.stop()


def test_requests_counted_by_status_with_their_times(server):
    url = server.metrics
    assert value(url, "corral_requests_total", code="200") is None  # none yet
    for _ in range(2):
        assert get(server.port, "/")[0] == 200
    # A request the front refuses (a header line without a colon) never
    # reaches a worker, and is counted all the same.
    with connect(server.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nno colon here\r\n\r\n")
        assert read_response(sock)[0] == 400
    assert wait_value(url, "corral_requests_total", 2, code="200") == 2
    assert wait_value(url, "corral_requests_total", 1, code="400") == 1
    samples = scrape(url)
    assert samples[("corral_request_duration_seconds_count", ())] == 3
    assert samples[("corral_request_duration_seconds_bucket", (("le", "+Inf"),))] == 3
    assert 0 < samples[("corral_request_duration_seconds_sum", ())] < 5
    # Only the two that reached a worker waited for one.
    assert samples[("corral_queue_wait_seconds_count", ())] == 2
    assert samples[("corral_generation", ())] == 1
    assert samples[("corral_up", ())] == 1
    assert samples[("corral_workers_idle", ())] == 1
    assert samples[("corral_workers_busy", ())] == 0
    assert samples[("corral_deploy_last_exit_status", ())] == 0
    assert samples[("corral_deploy_last_success", ())] == 1
    assert abs(samples[("corral_deploy_last_timestamp_seconds", ())] - time.time()) < 120
    # The main process's own numbers come along.
    assert samples[("process_resident_memory_bytes", ())] > 0


def test_spawns_and_exits_by_cause(server):
    url = server.metrics
    assert value(url, "corral_worker_spawns_total") == 1
    for _ in range(3):  # max_requests = 3: the worker is recycled
        assert get(server.port, "/")[0] == 200
    wait_value(url, "corral_worker_exits_total", 1, cause="requests")
    assert value(url, "corral_worker_spawns_total") == 2
    # A worker killed from outside is a crash, and is replaced.
    pid = int(get(server.port, "/")[1])
    os.kill(pid, signal.SIGKILL)
    wait_value(url, "corral_worker_exits_total", 1, cause="crash")
    wait_value(url, "corral_worker_spawns_total", 3)
    # A restart retires the generation: its worker's exit is a "restart".
    assert corral("restart", str(server.app)).returncode == 0
    wait_value(url, "corral_worker_exits_total", 1, cause="restart")
    samples = scrape(url)
    assert samples[("corral_generation", ())] == 2
    assert samples[("corral_deploy_last_generation", ())] == 2
    assert samples[("corral_worker_exits_total", (("cause", "stop"),))] == 0
    assert samples[("corral_worker_exits_total", (("cause", "timeout"),))] == 0


def test_exits_for_memory_and_for_a_timeout(tmp_path):
    app = restarts_app(tmp_path, app="request_timeout = 1\ntimeout_grace = 1\nmax_rss = 60",
                       processes=1)
    with open(app / "corral.toml", "a") as f:
        f.write('[server]\nmetrics = "127.0.0.1:0"\n')
    server = ServerProcess(app).wait_ready()
    try:
        url = metrics_url(server)
        assert get(server.port, "/grow?80")[0] == 200  # above max_rss: recycled
        wait_value(url, "corral_worker_exits_total", 1, cause="memory")
        assert get(server.port, "/stuck?30")[0] == 504
        wait_value(url, "corral_worker_exits_total", 1, cause="timeout")
        assert wait_value(url, "corral_requests_total", 1, code="504") == 1
        assert value(url, "corral_worker_exits_total", cause="crash") == 0
        assert value(url, "corral_worker_spawns_total") == 3
    finally:
        assert server.stop() == 0


def test_queue_depth_and_status_while_requests_wait(server):
    url = server.metrics
    answers = []

    def call(path: str) -> None:
        answers.append(get(server.port, path)[0])

    slow = threading.Thread(target=call, args=("/sleep?3",))
    slow.start()
    wait_value(url, "corral_workers_busy", 1)
    waiting = [threading.Thread(target=call, args=("/",)) for _ in range(2)]
    for thread in waiting:
        thread.start()
    wait_value(url, "corral_queue_depth", 2)
    assert wait_value(url, "corral_queue_oldest_wait_seconds", lambda v: v > 0.1) < 3
    status = json.loads(corral("status", str(server.app), "--json").stdout)
    assert status["queue"] == 2 and status["queue_oldest_wait"] > 0
    [worker] = status["workers"]
    assert worker["state"] == "busy" and worker["pid"] > 0 and worker["age"] >= 0
    text = corral("status", str(server.app)).stdout
    assert re.search(r"queue: 2 waiting, the oldest for \d+\.\d s", text)
    for thread in [slow, *waiting]:
        thread.join(30)
    assert answers == [200, 200, 200]
    samples = scrape(url)
    assert samples[("corral_queue_depth", ())] == 0
    # The two queued requests waited for the slow one, about 3 s less a bit.
    assert samples[("corral_queue_wait_seconds_sum", ())] > 3
    assert samples[("corral_queue_wait_seconds_bucket", (("le", "1.0"),))] == 1
    assert samples[("corral_request_duration_seconds_bucket", (("le", "1.0"),))] == 0


def test_status_shows_workers_deploy_step_and_restarts(server):
    for _ in range(2):
        assert get(server.port, "/")[0] == 200
    for _ in range(2):
        assert corral("restart", str(server.app)).returncode == 0
    status = json.loads(corral("status", str(server.app), "--json").stdout)
    assert status["generation"] == 3
    [worker] = status["workers"]
    assert {"pid", "state", "requests", "rss_mib", "age"} <= set(worker)
    assert worker["rss_mib"] > 0 and worker["generation"] == 3
    deploy = status["last_deploy"]
    assert deploy["generation"] == 3 and deploy["ok"] and deploy["status"] == 0
    assert deploy["log"] == str(server.app / "log" / "deploy.log")
    assert abs(deploy["at"] - time.time()) < 120 and deploy["seconds"] >= 0
    restarts = status["restarts"]
    assert [r["generation"] for r in restarts] == [2, 3]
    assert all(r["ok"] and r["cause"] == "corral restart" and r["seconds"] > 0
               and abs(r["at"] - time.time()) < 120 for r in restarts)
    text = corral("status", str(server.app)).stdout
    assert "last deploy step: generation 3, ok (exit status 0 after" in text
    assert f"log {server.app / 'log' / 'deploy.log'}" in text
    assert "recent restarts: 2" in text
    assert len(re.findall(r"\(corral restart\): ok in \d+\.\d s: generation \d serves",
                          text)) == 2


def test_metrics_listener_answers_only_get_metrics(server):
    base = server.metrics.removesuffix("/metrics")
    assert requests.get(base + "/", timeout=10).status_code == 404
    response = requests.post(server.metrics, timeout=10)
    assert response.status_code == 405 and response.headers["Allow"] == "GET, HEAD"
    head = requests.head(server.metrics, timeout=10)
    assert head.status_code == 200 and int(head.headers["Content-Length"]) > 0
    # The app's own port has no /metrics of ours: the app answers it.
    assert get(server.port, "/metrics")[1].strip().isdigit()


def test_metrics_on_a_unix_socket(tmp_path):
    app = restarts_app(tmp_path, processes=1)
    path = tmp_path / "metrics.sock"
    with open(app / "corral.toml", "a") as f:
        f.write(f'[server]\nmetrics = "unix:{path}"\n')
    server = ServerProcess(app).wait_ready()
    try:
        assert metrics_url(server) == f"unix:{path}"
        assert get(server.port, "/")[0] == 200
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n")
            raw = read_to_close(sock)
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        [sample] = [s for s in families["corral_requests"].samples
                    if s.name == "corral_requests_total"]
        assert sample.labels == {"app": "app", "code": "200"} and sample.value == 1
        assert oct(path.stat().st_mode & 0o777) == "0o660"  # [server] socket_mode
    finally:
        assert server.stop() == 0
    assert not path.exists()


def test_a_metrics_address_in_use_stops_the_start(tmp_path):
    app = restarts_app(tmp_path, processes=1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with open(app / "corral.toml", "a") as f:
            f.write(f'[server]\nmetrics = "127.0.0.1:{port}"\n')
        server = ServerProcess(app)
        assert server.proc.wait(60) == 2
        server.stop()
    assert "[server] metrics: cannot listen on 127.0.0.1:" in server.log


def test_a_bad_metrics_address_is_a_config_error(tmp_path):
    app = restarts_app(tmp_path, processes=1)
    with open(app / "corral.toml", "a") as f:
        f.write('[server]\nmetrics = "fastcgi+unix:/tmp/x.sock"\n')
    done = corral("serve", str(app))
    assert done.returncode == 2
    assert f"{app / 'corral.toml'}: [server] metrics: " in done.stderr
    assert 'Fix: write it as "127.0.0.1:9108"' in done.stderr
