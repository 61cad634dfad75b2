"""Prometheus metrics of one server instance: its own registry and HTTP endpoint.

RPC counters and histograms are updated as calls end; the group-commit histogram
as batches commit. Everything else (queue depth, workers, leases, subscribers
and the domain's own counters) is sampled at scrape time: the collector runs on
the HTTP thread and asks the server's event loop for one `StateSample`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections import Counter as Tally
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

RPC_SECONDS_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    60.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# The first scrape of a slow database must not hang Prometheus' own timeout (10 s).
SAMPLE_TIMEOUT_S = 5.0
# The label value that stands for every service past the limit of named ones.
# Service names cannot contain parentheses, so no real service reads as it.
OTHER_SERVICES = "(other)"
# The kind label of failures no failure rule matched.
UNCLASSIFIED = "unclassified"


@dataclass(frozen=True, slots=True)
class StateSample:
    """What the server reports at scrape time, read on its event loop."""

    # (service, state name, jobs) for non-terminal states; None if the database
    # did not answer in time.
    queue_depth: list[tuple[str, str, int]] | None
    connected_workers: int
    active_leases: int
    # Open live streams by kind: trace_stream, job_watch, workflow_watch,
    # worker_session, worker_watch.
    subscribers: Mapping[str, int]
    retries: Mapping[str, int] = field(default_factory=dict)  # by service
    lease_expiries: Mapping[str, int] = field(default_factory=dict)  # by service
    # Failed attempts by (service, failure kind; "" unclassified).
    failures: Mapping[tuple[str, str], int] = field(default_factory=dict)
    events_appended: int = 0
    events_delivered: int = 0
    stream_catchups: int = 0
    # By service: this replica's workers that run it, their free slots, and
    # the jobs of the service they hold.
    workers: Mapping[str, int] = field(default_factory=dict)
    free_slots: Mapping[str, int] = field(default_factory=dict)
    held_jobs: Mapping[str, int] = field(default_factory=dict)


Sampler = Callable[[], Coroutine[Any, Any, StateSample]]


class RpcCounters:
    """The children of one method's series, cached so that a finished call costs
    a dict lookup, a counter increment and a histogram observation."""

    __slots__ = ("_handled", "_labels", "_seconds", "_states", "started")

    def __init__(self, metrics: Metrics, service: str, method: str, kind: str) -> None:
        self._labels = (service, method, kind)
        self._handled = metrics.rpc_handled
        self._seconds = metrics.rpc_seconds
        self.started = metrics.rpc_started.labels(*self._labels)
        self._states: dict[str, tuple[Any, Any]] = {}

    def handled(self, code: str, seconds: float) -> None:
        children = self._states.get(code)
        if children is None:
            labels = (*self._labels, code)
            children = (self._handled.labels(*labels), self._seconds.labels(*labels))
            self._states[code] = children
        children[0].inc()
        children[1].observe(seconds)


class ServiceLabels:
    """Service names are chosen by callers: each would be a series of its own, so
    at most `limit` of them get their own label value (the first seen, largest
    first within one scrape) and every other service counts under
    OTHER_SERVICES. Series, and the memory behind them, stay bounded."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def fold(self, counts: Iterable[tuple[str, int]]) -> Tally[str]:
        """Counts per service, summed per label value; services are named in
        order of their counts (largest first) while there is room."""
        per_service: Tally[str] = Tally()
        for service, n in counts:
            per_service[service] += n
        folded: Tally[str] = Tally()
        with self._lock:
            for service, n in sorted(per_service.items(), key=lambda item: (-item[1], item[0])):
                if service not in self._named and len(self._named) < self.limit:
                    self._named.add(service)
                folded[service if service in self._named else OTHER_SERVICES] += n
        return folded

    def label(self, service: str) -> str:
        """The label value of one service already folded (or OTHER_SERVICES)."""
        with self._lock:
            return service if service in self._named else OTHER_SERVICES


class Metrics:
    """The registry of one JobtraceServer and, once served, its HTTP endpoint."""

    def __init__(self, max_services: int = 200) -> None:
        self.services = ServiceLabels(max_services)
        self.registry = CollectorRegistry(auto_describe=True)
        rpc = ["grpc_service", "grpc_method", "grpc_type"]
        self.rpc_started = Counter(
            "grpc_server_started_total",
            "RPCs started on the server.",
            rpc,
            registry=self.registry,
        )
        self.rpc_handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            [*rpc, "grpc_code"],
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status (streams: the whole stream), seconds.",
            [*rpc, "grpc_code"],
            buckets=RPC_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "jobtrace_db_group_commit_ops",
            "Write operations per committed group-commit transaction.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self._rpcs: dict[str, RpcCounters] = {}
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def rpc(self, full_method: str, kind: str) -> RpcCounters:
        """The series of one method ("/pkg.Service/Method")."""
        counters = self._rpcs.get(full_method)
        if counters is None:
            service, _, method = full_method.lstrip("/").rpartition("/")
            counters = RpcCounters(self, service, method, kind)
            self._rpcs[full_method] = counters
        return counters

    def batch_committed(self, ops: int) -> None:
        self.batch_size.observe(ops)

    def sample_state(self, sampler: Sampler, loop: asyncio.AbstractEventLoop) -> None:
        """Report the server's state at each scrape, read by `sampler` on `loop`."""
        self.registry.register(StateCollector(sampler, loop, self.services))

    def serve(self, host: str, port: int, idle_timeout_s: float = 10.0) -> int:
        """Serve /metrics on host:port (0: any free port); return the bound port.
        A connection that sends nothing for `idle_timeout_s` is closed, so idle
        connections cannot pile up (each holds a thread)."""
        bind = host.strip("[]") or "0.0.0.0"
        try:
            self._http = _metrics_http_server(bind, port, self.registry, idle_timeout_s)
        except OSError as exc:
            raise OSError(f"could not serve metrics on {host}:{port}: {exc}") from exc
        self._thread = threading.Thread(
            target=self._http.serve_forever, name="jobtrace-metrics", daemon=True
        )
        self._thread.start()
        return int(self._http.server_port)

    async def close(self) -> None:
        """Stop the HTTP endpoint (off the event loop: a scrape in progress may be
        waiting for it)."""
        http, thread = self._http, self._thread
        self._http = self._thread = None
        if http is None:
            return
        await asyncio.to_thread(http.shutdown)
        http.server_close()
        if thread is not None:
            await asyncio.to_thread(thread.join, 5.0)


class StateCollector(Collector):
    """Runs on the HTTP thread: one sample per scrape, taken on the event loop."""

    def __init__(
        self, sampler: Sampler, loop: asyncio.AbstractEventLoop, services: ServiceLabels
    ) -> None:
        self._sampler = sampler
        self._loop = loop
        self._services = services
        self._lock = threading.Lock()
        # Queues seen once are reported as 0 when empty, rather than vanishing.
        self._queues: set[tuple[str, str]] = set()

    def describe(self) -> list[Metric]:
        # Registering must not sample (that would block the loop on itself).
        return []

    def collect(self) -> Iterator[Metric]:
        sample = self._take()
        if sample is None:
            return
        yield from self._families(sample)

    def _take(self) -> StateSample | None:
        try:
            future = asyncio.run_coroutine_threadsafe(self._sampler(), self._loop)
        except RuntimeError:  # the loop is closed: the server is stopping
            return None
        try:
            return future.result(SAMPLE_TIMEOUT_S)
        except TimeoutError:
            future.cancel()
            log.warning("metrics: the server did not answer within %.0fs", SAMPLE_TIMEOUT_S)
        except Exception:
            log.exception("metrics: sampling the server state failed")
        return None

    def _families(self, s: StateSample) -> Iterator[Metric]:
        if s.queue_depth is not None:
            depth = GaugeMetricFamily(
                "jobtrace_queue_depth",
                "Jobs in a non-terminal state (PENDING, QUEUED, RUNNING) by service, "
                "read from the database (the same on every replica).",
                labels=["service", "state"],
            )
            # Name services by their jobs in all states, then count per state.
            self._services.fold((service, n) for service, _, n in s.queue_depth)
            counts: Tally[tuple[str, str]] = Tally()
            for service, state, n in s.queue_depth:
                counts[self._services.label(service), state] += n
            with self._lock:
                self._queues.update(counts)
                seen = sorted(self._queues)
            for key in seen:
                depth.add_metric(list(key), counts.get(key, 0))
            yield depth
        yield GaugeMetricFamily(
            "jobtrace_connected_workers",
            "Worker sessions connected to this replica.",
            value=s.connected_workers,
        )
        yield GaugeMetricFamily(
            "jobtrace_active_leases",
            "Job leases held by workers connected to this replica.",
            value=s.active_leases,
        )
        yield _by_label(
            GaugeMetricFamily(
                "jobtrace_stream_subscribers",
                "Open live streams on this replica, by kind.",
                labels=["kind"],
            ),
            s.subscribers,
        )
        yield _by_label(
            CounterMetricFamily(
                "jobtrace_job_retries",
                "Failed attempts requeued for another attempt, by service.",
                labels=["service"],
            ),
            self._folded(s.retries),
        )
        yield _by_label(
            CounterMetricFamily(
                "jobtrace_lease_expiries",
                "Leases lost (no heartbeat before the deadline, or the worker's stream "
                "ended), by service.",
                labels=["service"],
            ),
            self._folded(s.lease_expiries),
        )
        # Services named by their workers, then their slots and held jobs.
        self._services.fold(s.workers.items())
        for name, text, values in (
            (
                "jobtrace_workers",
                "Worker sessions connected to this replica that run the service.",
                s.workers,
            ),
            (
                "jobtrace_worker_free_slots",
                "Free slots of this replica's workers that run the service (a slot "
                "counts for every service its worker runs; none while draining).",
                s.free_slots,
            ),
            (
                "jobtrace_worker_held_jobs",
                "Jobs of the service held by workers connected to this replica.",
                s.held_jobs,
            ),
        ):
            yield _by_label(
                GaugeMetricFamily(name, text, labels=["service"]), self._labelled(values)
            )
        failures = CounterMetricFamily(
            "jobtrace_job_failures",
            "Failed attempts (a worker's failure, a lost lease, a timeout) by service and "
            "by the kind the failure rules gave them (unclassified when none matched).",
            labels=["service", "kind"],
        )
        self._services.fold((service, n) for (service, _), n in s.failures.items())
        by_kind: Tally[tuple[str, str]] = Tally()
        for (service, kind), n in s.failures.items():
            by_kind[self._services.label(service), kind or UNCLASSIFIED] += n
        for key, n in sorted(by_kind.items()):
            failures.add_metric(list(key), n)
        yield failures
        yield CounterMetricFamily(
            "jobtrace_trace_events_appended",
            "Trace events stored by this replica (lifecycle, worker and API appends).",
            value=s.events_appended,
        )
        yield CounterMetricFamily(
            "jobtrace_trace_events_delivered",
            "Trace events sent to StreamTraceEvents subscribers on this replica.",
            value=s.events_delivered,
        )
        yield CounterMetricFamily(
            "jobtrace_trace_stream_catchups",
            "Times a live StreamTraceEvents stream on this replica read from the "
            "database to recover (a gap, an overflowed buffer, a lost notice).",
            value=s.stream_catchups,
        )

    def _labelled(self, by_service: Mapping[str, int]) -> Mapping[str, int]:
        """Summed per label value, services past the limit as OTHER_SERVICES
        (without naming new ones: the workers' services were named first)."""
        out: Tally[str] = Tally()
        for service, n in by_service.items():
            out[self._services.label(service)] += n
        return out

    def _folded(self, by_service: Mapping[str, int]) -> Mapping[str, int]:
        return self._services.fold(by_service.items())


class _IdleClosingHandler(WSGIRequestHandler):
    """Serves one scrape per connection, logs nothing, and gives up on a
    connection that sends nothing for `timeout` seconds (set per server)."""

    def handle(self) -> None:
        try:
            super().handle()
        except TimeoutError:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing (every scrape would be a line)."""


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def _metrics_http_server(
    host: str, port: int, registry: CollectorRegistry, idle_timeout_s: float
) -> WSGIServer:
    """prometheus_client's start_http_server, with an idle timeout on connections."""
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(_ThreadingWSGIServer):
        address_family = family

    class Handler(_IdleClosingHandler):
        timeout = idle_timeout_s

    return make_server(
        str(sockaddr[0]), port, make_wsgi_app(registry), Server, handler_class=Handler
    )


def _by_label(family: Any, values: Mapping[str, int]) -> Any:
    """A one-label family with a sample per value, in label order."""
    for label, n in sorted(values.items()):
        family.add_metric([label], n)
    return family
