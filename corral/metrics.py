"""An app's numbers for Prometheus: plain counters bumped where things happen
(one cheap call per request, a few per worker), read only when /metrics is
scraped, by a prometheus_client Collector, and served on a listener of their own.

Nothing here runs prometheus_client code per request: the front's path stays
a dict increment and two bisects into lists of bucket counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from bisect import bisect_left

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger("corral.error")

# Seconds; wide at the top, since request_timeout defaults to 60.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Why a worker left: recycled (memory, requests, lifetime), stopped for its
# request's timeout, stopped as idle above [app] processes MIN, ended by a
# restart or by the server's stop, or it crashed (any exit nobody asked for).
EXIT_CAUSES = ("crash", "memory", "requests", "lifetime", "timeout", "idle", "restart",
               "stop", "other")
# The start of WorkerProcess.leaving, as the pool words it, to the cause.
_LEAVING = (("it served", "requests"), ("its memory", "memory"),
            ("it lived", "lifetime"), ("its request timed out", "timeout"),
            ("it was idle", "idle"))
HEAD_TIMEOUT = 10.0  # seconds a scraper has to send its request head
_monotonic = time.monotonic


class Histogram:
    """Counts per bucket (the last one is +Inf) and the sum, not cumulative."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to it ("le").
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        out, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return out


class AppMetrics:
    """The counters of one app, across its generations."""

    def __init__(self, app: str) -> None:
        self.app = app
        self.statuses: dict[int, int] = {}
        self.latency = Histogram()
        self.queue_wait = Histogram()
        self.spawns = 0
        self.exits = dict.fromkeys(EXIT_CAUSES, 0)
        self.supervisor = None  # set by the Supervisor: gauges are read from it

    def request(self, status: int, routed: float, attached: float) -> None:
        """One response done (the front's access-log point): its status, and
        its monotonic times of being whole (routed) and given to a worker
        (attached, 0 when no worker took it: static files, 4xx, 503)."""
        # Histogram.observe written out: this runs for every response.
        done = _monotonic()
        statuses = self.statuses
        statuses[status] = statuses.get(status, 0) + 1
        start = routed or done
        took = done - start
        latency = self.latency
        latency.counts[bisect_left(latency.bounds, took)] += 1
        latency.sum += took
        if attached:
            waited = attached - start
            queue = self.queue_wait
            queue.counts[bisect_left(queue.bounds, waited)] += 1
            queue.sum += waited

    def worker_spawned(self) -> None:
        self.spawns += 1

    def worker_exited(self, pool, worker, previous: str, status: int | None) -> None:
        """Count the exit of `worker` (its state before was `previous`)."""
        self.exits[exit_cause(pool, worker, previous, status, self.supervisor)] += 1


def exit_cause(pool, worker, previous: str, status: int | None, supervisor=None) -> str:
    """One of EXIT_CAUSES for a worker that has exited."""
    for start, cause in _LEAVING:
        if worker.leaving.startswith(start):
            return cause
    if worker.leaving:
        return "other"  # a reason the pool has learnt since; named in its log
    if pool.closing or previous in ("stopping", "retiring"):
        return "stop" if supervisor is None or supervisor.stopping else "restart"
    # php-cgi leaves by itself after PHP_FCGI_MAX_REQUESTS: a clean exit
    # after serving is its own recycling (the pool says so too).
    if not pool.engine.builtin and status == 0 and previous != "booting" and worker.requests:
        return "requests"
    return "crash"


_APPS: dict[str, AppMetrics] = {}


def for_app(app: str) -> AppMetrics:
    """The counters of the app named `app`, made on first use."""
    found = _APPS.get(app)
    if found is None:
        found = _APPS[app] = AppMetrics(app)
    return found


class AppCollector:
    """Turns an AppMetrics (and its supervisor's state) into metric families
    at scrape time."""

    def __init__(self, metrics: AppMetrics) -> None:
        self.metrics = metrics

    def collect(self):
        m, app = self.metrics, [self.metrics.app]
        requests = CounterMetricFamily("corral_requests", "Responses sent, by HTTP status.",
                                       labels=["app", "code"])
        for status, count in sorted(m.statuses.items()):
            requests.add_metric([m.app, str(status) if status else "none"], count)
        yield requests
        for name, text, hist in (
                ("corral_request_duration_seconds", "Time from a request's end to its "
                 "response's last byte (queue wait and app time included).", m.latency),
                ("corral_queue_wait_seconds", "Time requests that reached a worker waited "
                 "for one.", m.queue_wait)):
            family = HistogramMetricFamily(name, text, labels=["app"])
            family.add_metric(app, hist.cumulative(), sum_value=hist.sum)
            yield family
        family = CounterMetricFamily("corral_worker_spawns", "Worker processes started.",
                                     labels=["app"])
        family.add_metric(app, m.spawns)
        yield family
        family = CounterMetricFamily("corral_worker_exits", "Worker processes that exited, "
                                     "by cause.", labels=["app", "cause"])
        for cause, count in m.exits.items():
            family.add_metric([m.app, cause], count)
        yield family
        supervisor = m.supervisor
        if supervisor is None:
            return
        yield from self._gauges(supervisor, app)

    def _gauges(self, supervisor, app: list[str]):
        current = supervisor.current
        pools = [current, *supervisor.old]
        busy = idle = 0
        for pool in pools:
            for worker in pool.all_workers():
                if worker.state == "busy" or (worker.state == "retiring" and getattr(
                        worker.link, "handler", None) is not None):
                    busy += 1
                elif worker.state == "idle":
                    idle += 1
        now = time.monotonic()
        oldest = max((now - w.queued for w in current.waiters if not w.done), default=0.0)
        for name, text, value in (
                ("corral_queue_depth", "Requests waiting for a free worker.",
                 len(current.waiters)),
                ("corral_queue_oldest_wait_seconds", "How long the oldest waiting request "
                 "has waited.", oldest),
                ("corral_workers_busy", "Workers serving a request.", busy),
                ("corral_workers_idle", "Workers waiting for a request.", idle),
                ("corral_generation", "The generation serving requests.", current.generation),
                ("corral_up", "1 while the app serves, 0 while it answers 503 (deploying "
                 "or failed).", int(current.state == "ready"))):
            family = GaugeMetricFamily(name, text, labels=["app"])
            family.add_metric(app, value)
            yield family
        deploy = supervisor.last_deploy
        if deploy is None:
            return
        status = deploy.get("status")
        for name, text, value in (
                ("corral_deploy_last_exit_status", "Exit status of the last deploy step "
                 "(-1: stopped at its timeout).", -1 if status is None else status),
                ("corral_deploy_last_success", "1 if the last deploy step succeeded.",
                 int(deploy["ok"])),
                ("corral_deploy_last_timestamp_seconds", "When the last deploy step ended "
                 "(Unix time).", deploy["at"]),
                ("corral_deploy_last_duration_seconds", "How long the last deploy step ran.",
                 deploy.get("seconds", 0.0)),
                ("corral_deploy_last_generation", "The generation the last deploy step ran "
                 "for.", deploy["generation"])):
            family = GaugeMetricFamily(name, text, labels=["app"])
            family.add_metric(app, value)
            yield family


def registry_for(metrics: AppMetrics) -> CollectorRegistry:
    """A registry with the app's metrics and the main process's own (CPU,
    memory, open files)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AppCollector(metrics))
    ProcessCollector(registry=registry)
    return registry


class MetricsListener:
    """GET /metrics over HTTP/1.1 on an address of its own, on the event
    loop: a scrape is one short connection, answered and closed."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.server: asyncio.AbstractServer | None = None
        self.address = ""
        self.path: str | None = None

    async def start(self, bind, socket_mode: str = "0660", socket_group: str | None = None
                    ) -> None:
        """Listen on `bind` (a config Bind); OSError if it cannot."""
        if bind.path:
            from corral.front.server import remove_stale_socket, set_socket_access
            remove_stale_socket(bind.path)
            self.server = await asyncio.start_unix_server(self._serve, bind.path)
            set_socket_access(bind.path, socket_mode, socket_group)
            self.path = bind.path
            self.address = f"unix:{bind.path}"
            return
        self.server = await asyncio.start_server(self._serve, bind.host, bind.port)
        host, port = self.server.sockets[0].getsockname()[:2]
        self.address = f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        if self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                status, body, extra = "400 Bad Request", b"bad request\n", ""
            elif parts[1].split(b"?", 1)[0] != b"/metrics":
                status, body, extra = "404 Not Found", b"metrics are at /metrics\n", ""
            elif parts[0] not in (b"GET", b"HEAD"):
                status, body, extra = ("405 Method Not Allowed", b"use GET\n",
                                       "Allow: GET, HEAD\r\n")
            else:
                status, extra = "200 OK", ""
                body = generate_latest(self.registry)
            kind = CONTENT_TYPE_LATEST if status == "200 OK" else "text/plain"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                         f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
                         .encode() + (b"" if parts[:1] == [b"HEAD"] else body))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            pass
        except Exception:  # a collector bug must not end the listener
            log.exception("metrics: the scrape failed")
        finally:
            writer.close()
