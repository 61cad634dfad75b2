"""OpenTelemetry over OTLP: one trace from the caller's span through the
server (RPC, run and attempt spans) to the worker's handler spans, the
heartbeat of every process, the Prometheus metrics over OTLP, and nothing at
all when OTLP is off. A real OTLP/gRPC receiver (opentelemetry-proto's
collector services) runs in the test on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from jobtrace import tracing
from jobtrace.client.api import Client
from jobtrace.client.sync import SyncClient

from .conftest import Harness, wait_for
from .workers import terminate


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent: str
    attributes: dict[str, Any]
    resource: dict[str, Any]


@dataclass
class Collector:
    """What an OTLP/gRPC receiver got: spans, and heartbeats and other
    metric points by name, each with its resource's attributes."""

    spans: list[Span] = field(default_factory=list)
    metrics: list[tuple[str, dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    port: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def heartbeats(self, service_name: str) -> list[dict[str, Any]]:
        return [
            attrs
            for name, attrs, resource in self.metrics
            if name == "service.heartbeat" and resource.get("service.name") == service_name
        ]

    def in_trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id == trace_id]


def _attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind) if kind else None
    return out


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, into: Collector) -> None:
        self.into = into

    async def Export(self, request: Any, context: Any) -> Any:
        for rs in request.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.into.spans.append(
                        Span(
                            s.name,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            _attrs(s.attributes),
                            resource,
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, into: Collector) -> None:
        self.into = into

    async def Export(self, request: Any, context: Any) -> Any:
        for rm in request.resource_metrics:
            resource = _attrs(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    for point in getattr(m, kind).data_points:
                        self.into.metrics.append((m.name, _attrs(point.attributes), resource))
        return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    got = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(got), server)  # type: ignore[no-untyped-call]
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
        _Metrics(got), server
    )
    got.port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield got
    finally:
        await server.stop(0)


@pytest.fixture(autouse=True)
def _no_otel_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """OTLP is configured here only by what each test says; batches go out fast."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    yield


async def worker_process(target: str, worker_id: str, env: dict[str, str]) -> Any:
    """`jobtrace worker --demo` in a process of its own, with `env` added."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jobtrace",
        "worker",
        "--demo",
        "--target",
        target,
        "--worker-id",
        worker_id,
        "--log-level",
        "WARNING",
        env={**clean, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


def caller_tracer(endpoint: str | None) -> tuple[Any, TracerProvider]:
    """The instrumented caller: this test process's own provider (not the
    global one), exporting to `endpoint` when given (from its own thread:
    the collector answers on this test's event loop)."""
    provider = TracerProvider(resource=Resource.create({"service.name": "caller"}))
    if endpoint is not None:
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider.get_tracer("test"), provider


STEPS = [
    {"name": "first", "job": {"service": "demo", "payload": {"seconds": 0}}},
    {
        # Fails every attempt: two attempts, the second after a short backoff.
        "name": "flaky",
        "job": {
            "service": "demo",
            "payload": {"fail": "boom"},
            "max_attempts": 2,
            "backoff": {"initial_interval": "0.05s"},
        },
        "depends_on": ["first"],
    },
]


async def test_one_trace_from_the_caller_to_the_worker_and_heartbeats(
    db_url: str, collector: Collector
) -> None:
    tracer, provider = caller_tracer(collector.endpoint)
    async with Harness(
        db_url, otlp_endpoint=collector.endpoint, otlp_heartbeat_seconds=0.5
    ) as harness:
        assert harness.server is not None and harness.server.telemetry is not None
        worker = await worker_process(
            harness.target,
            "otel-worker",
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
                "OTEL_METRIC_EXPORT_INTERVAL": "500",
                "OTEL_BSP_SCHEDULE_DELAY": "100",
            },
        )
        try:
            async with Client(harness.target) as jt:
                with tracer.start_as_current_span("caller") as caller:
                    workflow = await jt.submit_workflow("traced", STEPS)
                trace_id = f"{caller.get_span_context().trace_id:032x}"
                caller_span = f"{caller.get_span_context().span_id:016x}"

                async def ended() -> bool:
                    return (await jt.get_workflow(workflow.id)).state == 4  # FAILED

                await wait_for(ended, timeout=30)
                steps = {s.name: s.job_id for s in (await jt.get_workflow(workflow.id)).steps}
                events = (await jt.list_trace_events(workflow.id)).events

            # Trace events keep the caller's traceparent (the console links by it).
            assert events
            assert {tracing.parse(e.traceparent).trace_id for e in events} == {trace_id}  # type: ignore[union-attr]

            first, flaky = steps["first"], steps["flaky"]
            run = tracing.span_id

            def spans() -> list[Span]:
                return collector.in_trace(trace_id)

            def complete() -> bool:
                names = [s.name for s in spans()]
                return (
                    names.count("handle demo") == 3
                    and names.count("attempt demo") == 3
                    and "workflow" in names
                    and any(n.endswith("SubmitWorkflow") for n in names)
                )

            await wait_for(complete, timeout=20)
            by_id = {s.span_id: s for s in spans()}
            submit = next(s for s in spans() if s.name.endswith("SubmitWorkflow"))
            assert submit.parent == caller_span
            assert submit.resource["service.name"] == "jobtrace"
            wf = by_id[run("run", workflow.id)]
            assert wf.name == "workflow" and wf.parent == caller_span
            assert wf.attributes["jobtrace.state"] == "FAILED"
            assert by_id[run("run", first)].parent == wf.span_id
            assert by_id[run("run", flaky)].parent == wf.span_id
            # One attempt of the first step, two of the retried one.
            attempts = {
                (s.attributes["jobtrace.job.id"], s.attributes["jobtrace.attempt"]): s
                for s in spans()
                if s.name == "attempt demo"
            }
            assert sorted(attempts) == sorted([(first, 1), (flaky, 1), (flaky, 2)])
            for (job_id, number), attempt in attempts.items():
                assert attempt.span_id == run("attempt", job_id, number)
                assert attempt.parent == run("run", job_id)
                assert attempt.attributes["jobtrace.worker.id"] == "otel-worker"
                assert attempt.attributes["jobtrace.service"] == "demo"
            assert attempts[(first, 1)].attributes["jobtrace.state"] == "COMPLETED"
            assert attempts[(flaky, 2)].attributes["jobtrace.state"] == "FAILED"
            # Each handler span, from the worker process, under its attempt.
            handlers = [s for s in spans() if s.name == "handle demo"]
            assert sorted(h.parent for h in handlers) == sorted(
                a.span_id for a in attempts.values()
            )
            for h in handlers:
                assert h.resource["service.name"] == "jobtrace-worker"
            # Three processes: the caller's, the server's and the worker's.
            instances = {s.resource.get("service.instance.id") for s in (submit, wf, *handlers)}
            assert len(instances) == 2  # server and worker (the caller sets none)
            assert by_id[caller_span].resource["service.name"] == "caller"

            # The heartbeat, from both, at the shortened interval.
            await wait_for(
                lambda: (
                    len(collector.heartbeats("jobtrace")) >= 2
                    and len(collector.heartbeats("jobtrace-worker")) >= 2
                ),
                timeout=20,
            )
            server_beat = collector.heartbeats("jobtrace")[0]
            worker_beat = collector.heartbeats("jobtrace-worker")[0]
            assert server_beat["service.instance.id"] != worker_beat["service.instance.id"]
            assert server_beat["service.version"] and worker_beat["service.version"]
            # The Prometheus metrics, under their names, from the server.
            await wait_for(
                lambda: any(
                    name == "grpc_server_handled_total"
                    and attrs.get("grpc_method") == "SubmitWorkflow"
                    for name, attrs, _ in collector.metrics
                ),
                timeout=20,
            )
            names = {name for name, _, _ in collector.metrics}
            assert {"grpc_server_handling_seconds", "jobtrace_connected_workers"} <= names
        finally:
            await terminate(worker)
    await asyncio.to_thread(provider.shutdown)


async def test_nothing_is_exported_when_otlp_is_off(sqlite_url: str, collector: Collector) -> None:
    tracer, provider = caller_tracer(None)  # the caller traces, but exports elsewhere (nowhere)
    async with Harness(sqlite_url) as harness:
        assert harness.server is not None and harness.server.telemetry is None
        worker = await worker_process(harness.target, "quiet-worker", {})
        try:
            async with Client(harness.target) as jt:
                with tracer.start_as_current_span("caller"):
                    job = await jt.submit_job("demo", {"seconds": 0})

                async def done() -> bool:
                    return (await jt.get_job(job.id)).state == 3  # COMPLETED

                await wait_for(done, timeout=20)
        finally:
            await terminate(worker)
    # Positive control: the same collector, a server with OTLP on; its data
    # arrives, and nothing from the processes above ever did.
    async with Harness(
        sqlite_url, otlp_endpoint=collector.endpoint, otlp_heartbeat_seconds=0.2
    ) as control:
        assert control.server is not None and control.server.telemetry is not None
        instance = control.server.telemetry.resource.attributes["service.instance.id"]
        await wait_for(lambda: collector.heartbeats("jobtrace"), timeout=20)
    assert {s.resource.get("service.instance.id") for s in collector.spans} <= {instance}
    assert {resource.get("service.instance.id") for _, _, resource in collector.metrics} == {
        instance
    }
    await asyncio.to_thread(provider.shutdown)


async def test_the_clients_send_the_current_span_as_traceparent(sqlite_harness: Harness) -> None:
    """Without OTLP anywhere: the async and the sync client send the caller's
    current span (OpenTelemetry API) as the traceparent a run keeps; an
    explicit traceparent wins."""
    tracer, provider = caller_tracer(None)
    explicit = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    async with Client(sqlite_harness.target) as jt:
        with tracer.start_as_current_span("caller") as span:
            job = await jt.submit_job("svc", {})
            named = await jt.submit_job("svc", {}, traceparent=explicit)
        untraced = await jt.submit_job("svc", {})
    context = span.get_span_context()
    assert job.traceparent == (
        f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    )
    assert named.traceparent == explicit
    assert untraced.traceparent == ""

    def sync_submit() -> str:
        with SyncClient(sqlite_harness.target) as sync, tracer.start_as_current_span("sync") as s:
            submitted = sync.submit_job("svc", {})
            sc = s.get_span_context()
            assert submitted.traceparent.startswith(f"00-{sc.trace_id:032x}-{sc.span_id:016x}-")
            return submitted.id

    assert await asyncio.to_thread(sync_submit)
    await asyncio.to_thread(provider.shutdown)
