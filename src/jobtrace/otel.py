"""OpenTelemetry over OTLP/gRPC: traces, the liveness heartbeat and the metrics.

Off unless an endpoint is configured (jobtrace.tracing.enabled: --otlp-endpoint,
or the standard OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT /
OTEL_EXPORTER_OTLP_METRICS_ENDPOINT); then, and only then, is this module
imported and the SDK set up: a process without OTLP loads none of it.

- Traces: a batch span processor exporting to the endpoint. The server adds
  the OpenTelemetry gRPC instrumentation (one span per RPC) and `RunSpans`
  (one span per run and per job attempt, made when they end, with their
  stored timestamps and ids derived from the run's id: jobtrace.tracing).
- Metrics: every export interval (15 s by default) the asynchronous gauge
  `service.heartbeat` (value 1, with service.name, service.instance.id and
  service.version) and, on a server, its Prometheus registry's families
  under their Prometheus names (`PrometheusBridge`).
- Resource: service.name (the process's default, or OTEL_SERVICE_NAME),
  service.version, service.instance.id (a uuid per process),
  deployment.environment (OTEL_RESOURCE_ATTRIBUTES or the flag).

Only OTLP over gRPC is exported (OTEL_EXPORTER_OTLP_PROTOCOL grpc, the
default); any other protocol is a startup error.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator

from jobtrace import __version__, tracing
from jobtrace.tracing import enabled as enabled

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from jobtrace.model import Job, RunState
    from jobtrace.store.db import Tx

log = logging.getLogger(__name__)

SERVER_SERVICE_NAME = "jobtrace"
WORKER_SERVICE_NAME = "jobtrace-worker"
# The ADR's heartbeat interval.
DEFAULT_INTERVAL_S = 15.0
HEARTBEAT = "service.heartbeat"
_ENDPOINT_VARIABLES = tracing.ENDPOINT_VARIABLES
_PROTOCOL_VARIABLES = (
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
)


def interval_seconds(flag: float | None, env: Mapping[str, str] | None = None) -> float:
    """The export interval: the flag, else OTEL_METRIC_EXPORT_INTERVAL
    (milliseconds), else 15 s."""
    env = os.environ if env is None else env
    if flag is not None:
        seconds = flag
    elif env.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip():
        try:
            seconds = float(env["OTEL_METRIC_EXPORT_INTERVAL"]) / 1000
        except ValueError:
            raise OSError("OTEL_METRIC_EXPORT_INTERVAL must be milliseconds") from None
    else:
        seconds = DEFAULT_INTERVAL_S
    if not seconds > 0:
        raise OSError("the OTLP export interval must be positive")
    return seconds


@dataclass(frozen=True, slots=True)
class Options:
    # The collector's OTLP/gRPC endpoint (http://host:4317 is plaintext);
    # empty: the OTEL_EXPORTER_OTLP_* variables.
    endpoint: str = ""
    # service.name unless OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES) says otherwise.
    service_name: str = SERVER_SERVICE_NAME
    # Heartbeat and metrics export interval, seconds; None: OTEL_METRIC_EXPORT_INTERVAL or 15.
    interval_s: float | None = None
    # deployment.environment; empty: as OTEL_RESOURCE_ATTRIBUTES says, if it does.
    environment: str = ""


class Telemetry:
    """One process's (or one in-process server's) providers. Built by
    `start`; `shutdown` flushes what is batched and stops the exports."""

    def __init__(
        self, tracer_provider: TracerProvider, meter_provider: MeterProvider, resource: Any
    ) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        self.resource = resource

    def server_interceptor(self) -> Any:
        """The OpenTelemetry gRPC instrumentation's aio server interceptor,
        reporting to this provider (one span per RPC, continuing the caller's
        traceparent metadata)."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return aio_server_interceptor(tracer_provider=self.tracer_provider)

    def run_spans(self) -> RunSpans:
        return RunSpans(self.tracer_provider)

    def shutdown(self) -> None:
        """Blocking (flushes to the collector): call it off the event loop."""
        try:
            self.tracer_provider.shutdown()
        finally:
            self.meter_provider.shutdown()


def start(options: Options, registry: CollectorRegistry | None = None) -> Telemetry:
    """The SDK set up for this process: a tracer provider with a batch span
    processor and a meter provider with the heartbeat (and `registry`'s
    metrics), both exporting over OTLP/gRPC. OSError for a configuration
    that cannot be used."""
    for name in _PROTOCOL_VARIABLES:
        protocol = os.environ.get(name, "").strip()
        if protocol and protocol != "grpc":
            raise OSError(f"{name}={protocol!r}: jobtrace exports OTLP over gRPC only (grpc)")
    interval = interval_seconds(options.interval_s)
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = _resource(options)
    endpoint = options.endpoint or None
    tracer_provider = TracerProvider(resource=resource, id_generator=_DerivedIds())
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    exporter: MetricExporter = OTLPMetricExporter(endpoint=endpoint)
    if registry is not None:
        exporter = PrometheusBridge(exporter, registry)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=interval * 1000)
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    attributes = {
        key: resource.attributes[key]
        for key in ("service.name", "service.instance.id", "service.version")
        if key in resource.attributes
    }

    def beat(_: CallbackOptions) -> Iterable[Observation]:
        yield Observation(1, attributes)

    meter_provider.get_meter("jobtrace", __version__).create_observable_gauge(
        HEARTBEAT,
        callbacks=[beat],
        unit="1",
        description="1 while the process runs: liveness and service discovery",
    )
    log.info(
        "OTLP export to %s every %.3gs as %s (instance %s)",
        options.endpoint or _env_endpoint(),
        interval,
        attributes.get("service.name"),
        attributes.get("service.instance.id"),
    )
    return Telemetry(tracer_provider, meter_provider, resource)


def _env_endpoint() -> str:
    for name in _ENDPOINT_VARIABLES:
        if os.environ.get(name, "").strip():
            return os.environ[name].strip()
    return ""


def _resource(options: Options) -> Any:
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource

    defaults = {
        "service.name": options.service_name,
        "service.version": __version__,
        "service.instance.id": str(uuid.uuid4()),
    }
    # telemetry.sdk.* and our defaults, then what the environment says wins
    # (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES), then the flag.
    resource = Resource.create(defaults).merge(OTELResourceDetector().detect())
    if options.environment:
        resource = resource.merge(Resource({"deployment.environment": options.environment}))
    return resource


# --- deterministic ids ----------------------------------------------------------

# (span id, trace id) the next span must have; set around RunSpans' start_span.
_FORCED: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "jobtrace_otel_forced_ids", default=None
)


class _DerivedIds(IdGenerator):
    """Random ids, except for the spans RunSpans makes: theirs are derived
    from the run (see jobtrace.tracing), so that a worker can name an
    attempt's span before it exists."""

    def generate_span_id(self) -> int:
        forced = _FORCED.get()
        if forced is not None:
            return forced[0]
        return random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        forced = _FORCED.get()
        if forced is not None and forced[1]:
            return forced[1]
        return random.getrandbits(128) or 1


# --- runs and attempts ----------------------------------------------------------


class RunSpans:
    """A span per run and per job attempt, made when it ends (from the stored
    timestamps), on the replica that ends it: nothing is held while a run
    goes on, and any replica may end any run. Recorded once the transaction
    commits (a rolled-back batch is rerun)."""

    def __init__(self, provider: TracerProvider) -> None:
        self._tracer = provider.get_tracer("jobtrace.runs", __version__)

    def job_changed(self, tx: Tx | None, old: Job, new: Job, now_us: int) -> None:
        """A job's state changed from `old` to `new`: its running attempt
        ended (leaving RUNNING), or the job did (a terminal state)."""
        ended_attempt = old.state.name == "RUNNING" and new.state != old.state
        ended_run = new.state.terminal and not old.state.terminal
        if not (ended_attempt or ended_run):
            return
        end_us = new.completed_us or new.updated_us or now_us

        def record() -> None:
            try:
                if ended_attempt:
                    self._attempt(old, new, end_us)
                if ended_run:
                    self._job_run(new, end_us)
            except Exception:
                log.warning("OTLP: recording the span of job %s failed", new.id, exc_info=True)

        if tx is None:
            record()
        else:
            tx.on_commit(record)

    def workflow_ended(
        self,
        tx: Tx,
        workflow_id: str,
        fields: tuple[str, int, int, str] | None,
        state: RunState,
        end_us: int,
    ) -> None:
        if fields is None:
            return
        tenant, created_us, started_us, traceparent = fields
        caller = tracing.run_trace(traceparent, workflow_id, True)
        assert caller is not None

        def record() -> None:
            events = [("started", started_us)] if started_us else []
            self._emit(
                "workflow",
                caller,
                tracing.span_id("run", workflow_id),
                created_us,
                end_us,
                {
                    "jobtrace.run.id": workflow_id,
                    "jobtrace.run.kind": "workflow",
                    "jobtrace.tenant": tenant,
                    "jobtrace.state": state.name,
                },
                events,
                failed=state.name != "COMPLETED",
            )

        tx.on_commit(record)

    def _parent(self, job: Job) -> tracing.TraceContext:
        caller = tracing.run_trace(job.traceparent, job.workflow_id or job.id, True)
        assert caller is not None
        return caller

    def _attempt(self, old: Job, new: Job, end_us: int) -> None:
        caller = self._parent(old)
        parent = caller._replace(span_id=tracing.span_id("run", old.id))
        attributes: dict[str, Any] = {
            "jobtrace.job.id": old.id,
            "jobtrace.attempt": old.attempt,
            "jobtrace.state": new.state.name,
            "jobtrace.worker.id": old.worker_id,
            "jobtrace.service": old.spec.service,
            "jobtrace.tenant": old.tenant,
        }
        if old.workflow_id:
            attributes["jobtrace.workflow.id"] = old.workflow_id
            attributes["jobtrace.step.name"] = old.step_name
        if new.failure is not None:
            attributes["jobtrace.failure.code"] = new.failure.code
        started = old.started_us or end_us
        self._emit(
            f"attempt {old.spec.service}",
            parent,
            tracing.span_id("attempt", old.id, old.attempt),
            started,
            end_us,
            attributes,
            [("started", started), ("ended", end_us)],
            failed=new.state.name != "COMPLETED",
            message=new.failure.reason if new.failure is not None else "",
        )

    def _job_run(self, job: Job, end_us: int) -> None:
        caller = self._parent(job)
        if job.workflow_id:  # a step: under its workflow's span
            caller = caller._replace(span_id=tracing.span_id("run", job.workflow_id))
        attributes: dict[str, Any] = {
            "jobtrace.run.id": job.id,
            "jobtrace.run.kind": "step" if job.workflow_id else "job",
            "jobtrace.state": job.state.name,
            "jobtrace.attempt": job.attempt,
            "jobtrace.service": job.spec.service,
            "jobtrace.tenant": job.tenant,
        }
        if job.workflow_id:
            attributes["jobtrace.workflow.id"] = job.workflow_id
            attributes["jobtrace.step.name"] = job.step_name
        events = [("queued", job.created_us)]
        if job.first_started_us:
            events.append(("started", job.first_started_us))
        events.append(("ended", end_us))
        self._emit(
            f"{'step' if job.workflow_id else 'job'} {job.step_name or job.spec.service}",
            caller,
            tracing.span_id("run", job.id),
            job.created_us or end_us,
            end_us,
            attributes,
            events,
            failed=job.state.name != "COMPLETED",
            message=job.failure.reason if job.failure is not None else "",
        )

    def _emit(
        self,
        name: str,
        parent: tracing.TraceContext,
        own_span_id: str,
        start_us: int,
        end_us: int,
        attributes: dict[str, Any],
        events: list[tuple[str, int]],
        *,
        failed: bool,
        message: str = "",
    ) -> None:
        from opentelemetry import context as otel_context
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, Status, StatusCode

        trace_id = int(parent.trace_id, 16)
        if int(parent.span_id, 16):
            parent_context = trace.set_span_in_context(
                NonRecordingSpan(
                    SpanContext(
                        trace_id,
                        int(parent.span_id, 16),
                        is_remote=True,
                        trace_flags=trace.TraceFlags(parent.flags),
                    )
                )
            )
        else:  # the run is the root of a trace of its own
            parent_context = otel_context.Context()
        token = _FORCED.set((int(own_span_id, 16), trace_id))
        try:
            span = self._tracer.start_span(
                name,
                context=parent_context,
                kind=trace.SpanKind.INTERNAL,
                attributes=attributes,
                start_time=start_us * 1000,
            )
        finally:
            _FORCED.reset(token)
        for event, ts_us in events:
            span.add_event(event, timestamp=ts_us * 1000)
        if failed:
            span.set_status(Status(StatusCode.ERROR, message or attributes["jobtrace.state"]))
        span.end(end_time=max(end_us, start_us) * 1000)


# --- Prometheus metrics over OTLP ---------------------------------------------


class PrometheusBridge(MetricExporter):
    """Wraps the OTLP metric exporter: each export also carries the server's
    Prometheus registry, collected then, converted family by family under the
    names Prometheus shows (counters as monotonic cumulative sums named with
    their _total, gauges as gauges, histograms as explicit-bucket histograms).
    The registry stays the one source of the numbers; the collection runs on
    the exporter's thread, as a scrape runs on the HTTP thread."""

    def __init__(self, inner: Any, registry: CollectorRegistry) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self._inner = inner
        self._registry = registry
        self._start_ns = time.time_ns()

    def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> Any:
        try:
            metrics_data = self._with_registry(metrics_data)
        except Exception:
            log.warning("OTLP: collecting the Prometheus metrics failed", exc_info=True)
        return self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return bool(self._inner.force_flush(timeout_millis=timeout_millis))

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)

    def _with_registry(self, data: Any) -> Any:
        from opentelemetry.sdk.metrics.export import MetricsData, ResourceMetrics, ScopeMetrics
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        if not data.resource_metrics:
            return data
        metrics = list(prometheus_metrics(self._registry.collect(), self._start_ns))
        if not metrics:
            return data
        first = data.resource_metrics[0]
        scope = ScopeMetrics(
            scope=InstrumentationScope("jobtrace.prometheus", __version__),
            metrics=metrics,
            schema_url="",
        )
        merged = ResourceMetrics(
            resource=first.resource,
            scope_metrics=[*first.scope_metrics, scope],
            schema_url=first.schema_url,
        )
        return MetricsData(resource_metrics=[merged, *data.resource_metrics[1:]])


def prometheus_metrics(families: Iterable[Any], start_ns: int) -> Iterable[Any]:
    """OpenTelemetry metric points of Prometheus metric families."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Gauge,
        Histogram,
        Metric,
        NumberDataPoint,
        Sum,
    )

    now = time.time_ns()
    for family in families:
        if family.type == "counter":
            points = [
                NumberDataPoint(dict(s.labels), start_ns, now, s.value)
                for s in family.samples
                if s.name.endswith("_total")
            ]
            if points:
                yield Metric(
                    f"{family.name}_total",
                    family.documentation,
                    "",
                    Sum(points, AggregationTemporality.CUMULATIVE, is_monotonic=True),
                )
        elif family.type == "gauge":
            points = [
                NumberDataPoint(dict(s.labels), start_ns, now, s.value) for s in family.samples
            ]
            if points:
                yield Metric(family.name, family.documentation, "", Gauge(points))
        elif family.type == "histogram":
            buckets = list(_histogram_points(family, start_ns, now))
            if buckets:
                yield Metric(
                    family.name,
                    family.documentation,
                    "",
                    Histogram(buckets, AggregationTemporality.CUMULATIVE),
                )


def _histogram_points(family: Any, start_ns: int, now: int) -> Iterable[Any]:
    """Prometheus' cumulative buckets (le) per label set, as OpenTelemetry's
    per-bucket counts with explicit bounds."""
    from opentelemetry.sdk.metrics.export import HistogramDataPoint

    series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for s in family.samples:
        labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        one = series.setdefault(labels, {"buckets": [], "sum": 0.0, "count": 0})
        if s.name.endswith("_bucket"):
            one["buckets"].append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_sum"):
            one["sum"] = s.value
        elif s.name.endswith("_count"):
            one["count"] = int(s.value)
    for labels, one in series.items():
        buckets = sorted(one["buckets"])
        bounds = [le for le, _ in buckets if le != float("inf")]
        counts: list[int] = []
        previous = 0.0
        for _, cumulative in buckets:
            counts.append(int(cumulative - previous))
            previous = cumulative
        if len(counts) != len(bounds) + 1:  # no +Inf bucket: the rest is above the last bound
            counts.append(max(0, one["count"] - int(previous)))
        yield HistogramDataPoint(
            attributes=dict(labels),
            start_time_unix_nano=start_ns,
            time_unix_nano=now,
            count=one["count"],
            sum=one["sum"],
            bucket_counts=counts,
            explicit_bounds=bounds,
            min=None,  # type: ignore[arg-type]  # unknown: left out of the OTLP point
            max=None,  # type: ignore[arg-type]
        )
