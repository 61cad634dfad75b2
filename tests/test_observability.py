"""Observability: Prometheus metrics scraped over HTTP, JSON logs with request
context, and W3C traceparent from a submit to the worker and the trace."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from prometheus_client.parser import text_string_to_metric_families

from jobtrace import logs
from jobtrace.client.worker import JobContext
from jobtrace.config import Settings
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, wait_for
from .workers import RawWorker, runtime_worker

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
JOBS = "jobtrace.v1.JobService"
WORKERS = "jobtrace.v1.WorkerService"
TRACE = "jobtrace.v1.TraceService"
UNKNOWN_JOB = "job_01hzzzzzzzzzzzzzzzzzzzzzzz"


# --- helpers -----------------------------------------------------------------------


class Scrape:
    """One scrape of /metrics, parsed by the Prometheus text parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[Any] = [
            s for family in text_string_to_metric_families(text) for s in family.samples
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """The sample with exactly these labels (None if absent)."""
        for s in self.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
        return None

    def matching(self, name: str, **labels: str) -> list[Any]:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]


async def scrape(server_or_port: Any) -> Scrape:
    port = server_or_port if isinstance(server_or_port, int) else server_or_port.metrics_port
    assert port, "metrics are not served"

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            body: bytes = response.read()
            return body.decode()

    # Off the event loop: the collector asks this loop for the server's state.
    return Scrape(await asyncio.to_thread(get))


async def until_metric(
    harness: Harness, name: str, expected: float, timeout: float = 10.0, **labels: str
) -> Scrape:
    """Scrape until the sample has the expected value (counters land after commit)."""
    last: list[Any] = [None]

    async def check() -> Scrape | None:
        s = await scrape(harness.server)
        last[0] = s.value(name, **labels)
        return s if last[0] == expected else None

    try:
        result: Scrape = await wait_for(check, timeout=timeout, interval=0.05)
    except AssertionError as exc:
        raise AssertionError(f"{name}{labels} is {last[0]}, expected {expected}") from exc
    return result


def handled(s: Scrape, service: str, method: str, kind: str, code: str) -> float | None:
    return s.value(
        "grpc_server_handled_total",
        grpc_service=service,
        grpc_method=method,
        grpc_type=kind,
        grpc_code=code,
    )


async def until_handled(
    harness: Harness, service: str, method: str, kind: str, code: str
) -> Scrape:
    """Scrape until one call of this method has been counted as ending with this code."""
    return await until_metric(
        harness,
        "grpc_server_handled_total",
        1,
        grpc_service=service,
        grpc_method=method,
        grpc_type=kind,
        grpc_code=code,
    )


async def submit(api: Stubs, rid: str, service: str = "svc", **fields: Any) -> c.Job:
    request = j.SubmitJobRequest(request_id=rid, job=c.JobSpec(service=service, **fields))
    return (await api.jobs.SubmitJob(request)).job


async def events_of(api: Stubs, run_id: str) -> list[c.TraceEvent]:
    response = await api.trace.ListTraceEvents(
        t.ListTraceEventsRequest(run_id=run_id, page_size=1000)
    )
    return list(response.events)


@pytest.fixture
async def observed(db_url: str) -> AsyncIterator[Harness]:
    """A server with metrics on an ephemeral port (a lost worker stream's leases
    are given back at once: no reconnect grace)."""
    h = Harness(db_url, metrics_port=0, reconnect_grace_seconds=0.0)
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


class Lines(logging.Handler):
    """Captures formatted log lines, as a log shipper would read them."""

    def __init__(self, formatter: logging.Formatter) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(formatter)
        self.addFilter(logs.ContextFilter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def json(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]

    def find(self, message: str, **fields: Any) -> dict[str, Any] | None:
        for doc in self.json():
            if doc["message"] == message and all(doc.get(k) == v for k, v in fields.items()):
                return doc
        return None


@pytest.fixture
def json_lines() -> Iterator[Lines]:
    """JSON lines of every jobtrace logger at INFO and above."""
    handler = Lines(logs.JsonFormatter())
    logger = logging.getLogger("jobtrace")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# --- metrics: RPCs -------------------------------------------------------------------


async def test_unary_rpcs_are_counted_by_method_and_code(observed: Harness) -> None:
    api = observed.stubs()
    await submit(api, "r1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.jobs.GetJob(j.GetJobRequest(job_id=UNKNOWN_JOB))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.jobs.GetJob(j.GetJobRequest(job_id=""))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="r1", job=c.JobSpec(service="other"))
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS

    s = await scrape(observed.server)
    assert handled(s, JOBS, "SubmitJob", "unary", "OK") == 1
    assert handled(s, JOBS, "SubmitJob", "unary", "ALREADY_EXISTS") == 1
    assert handled(s, JOBS, "GetJob", "unary", "NOT_FOUND") == 1
    assert handled(s, JOBS, "GetJob", "unary", "INVALID_ARGUMENT") == 1
    assert handled(s, JOBS, "GetJob", "unary", "OK") is None
    started = s.value(
        "grpc_server_started_total", grpc_service=JOBS, grpc_method="GetJob", grpc_type="unary"
    )
    assert started == 2
    labels = {"grpc_service": JOBS, "grpc_method": "SubmitJob", "grpc_type": "unary"}
    assert s.value("grpc_server_handling_seconds_count", **labels, grpc_code="OK") == 1
    seconds = s.value("grpc_server_handling_seconds_sum", **labels, grpc_code="OK")
    assert seconds is not None and 0 < seconds < 10
    buckets = s.matching("grpc_server_handling_seconds_bucket", **labels, grpc_code="OK")
    assert [b.value for b in buckets if b.labels["le"] == "+Inf"] == [1]


async def test_an_unexpected_exception_is_answered_and_counted_internal(
    observed: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert observed.server is not None

    async def broken(*_args: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(observed.server.jobs, "get_job", broken)
    api = observed.stubs()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.jobs.GetJob(j.GetJobRequest(job_id=UNKNOWN_JOB))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "a bug" not in (caught.value.details() or ""), "the text stays in the log"
    # The interceptor counts the call after its answer has left, so wait for it.
    s = await until_handled(observed, JOBS, "GetJob", "unary", "INTERNAL")
    assert handled(s, JOBS, "GetJob", "unary", "INTERNAL") == 1


async def test_streams_are_counted_with_how_they_ended(observed: Harness) -> None:
    api = observed.stubs()
    job = await submit(api, "watched", service="nobody")

    # A watch the client cancels.
    watch = api.jobs.WatchJob(j.WatchJobRequest(job_id=job.id))
    assert (await watch.read()).job.id == job.id
    watch.cancel()
    # A watch whose deadline passes.
    late = api.jobs.WatchJob(j.WatchJobRequest(job_id=job.id), timeout=1.0)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        while await late.read() is not grpc.aio.EOF:
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # A watch refused by the domain (aborted with NOT_FOUND).
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in api.jobs.WatchJob(j.WatchJobRequest(job_id=UNKNOWN_JOB)):
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # A watch that ends with the job.
    ending = api.jobs.WatchJob(j.WatchJobRequest(job_id=job.id))
    assert (await ending.read()).job.id == job.id
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=job.id))
    while await ending.read() is not grpc.aio.EOF:
        pass
    assert await ending.code() == grpc.StatusCode.OK

    # Worker sessions: one half-closes its stream (OK), one is cancelled.
    polite = RawWorker(api)
    await polite.hello("polite", ["svc"])
    await polite._out.put(None)
    assert await polite.call.read() is grpc.aio.EOF
    rude = RawWorker(api)
    await rude.hello("rude", ["svc"])
    await rude.close()

    s = await until_handled(observed, WORKERS, "Connect", "bidi_stream", "CANCELLED")
    assert handled(s, WORKERS, "Connect", "bidi_stream", "OK") == 1
    s = await until_handled(observed, JOBS, "WatchJob", "server_stream", "CANCELLED")
    assert handled(s, JOBS, "WatchJob", "server_stream", "DEADLINE_EXCEEDED") == 1
    assert handled(s, JOBS, "WatchJob", "server_stream", "NOT_FOUND") == 1
    assert handled(s, JOBS, "WatchJob", "server_stream", "OK") == 1


async def test_health_checks_are_counted(observed: Harness) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(observed.stubs().channel)
    await health.Check(health_pb2.HealthCheckRequest(service=JOBS))
    watch = health.Watch(health_pb2.HealthCheckRequest(service=JOBS))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    s = await until_handled(
        observed, "grpc.health.v1.Health", "Watch", "server_stream", "CANCELLED"
    )
    assert handled(s, "grpc.health.v1.Health", "Check", "unary", "OK") == 1


# --- metrics: the server's state ------------------------------------------------------


async def test_queue_depth_is_reported_per_service_and_state(observed: Harness) -> None:
    api = observed.stubs()
    for i in range(3):
        await submit(api, f"q{i}", service="resize")
    await submit(api, "other", service="thumbnail")
    s = await scrape(observed.server)
    assert s.value("jobtrace_queue_depth", service="resize", state="QUEUED") == 3
    assert s.value("jobtrace_queue_depth", service="thumbnail", state="QUEUED") == 1
    assert s.value("jobtrace_queue_depth", service="resize", state="RUNNING") is None

    # A queue that empties reads 0 rather than vanishing; terminal states are not reported.
    listed = await api.jobs.ListJobs(j.ListJobsRequest(service="thumbnail"))
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=listed.jobs[0].id))
    s = await scrape(observed.server)
    assert s.value("jobtrace_queue_depth", service="thumbnail", state="QUEUED") == 0
    assert not s.matching("jobtrace_queue_depth", state="CANCELLED")


async def test_workers_leases_retries_and_lease_expiries(observed: Harness) -> None:
    api = observed.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["flaky"])
    backoff = c.BackoffPolicy(initial_interval=duration_pb2.Duration(nanos=10_000_000))
    job = await submit(api, "flaky-1", service="flaky", max_attempts=3, backoff=backoff)
    first = await raw.expect("assignment")
    assert first.job.id == job.id and first.attempt == 1

    s = await scrape(observed.server)
    assert s.value("jobtrace_connected_workers") == 1
    assert s.value("jobtrace_active_leases") == 1
    assert s.value("jobtrace_queue_depth", service="flaky", state="RUNNING") == 1
    assert s.value("jobtrace_stream_subscribers", kind="worker_session") == 1

    # A retryable failure: one retry, and the job comes back as attempt 2.
    await raw.send(
        fail=w.FailReport(
            job_id=job.id, attempt=1, error=c.ErrorDetail(message="flaky"), retryable=True
        )
    )
    await raw.expect("ack")
    second = await raw.expect("assignment")
    assert second.attempt == 2
    s = await until_metric(observed, "jobtrace_job_retries_total", 1, service="flaky")
    assert s.value("jobtrace_lease_expiries_total", service="flaky") is None

    # The worker's stream is lost while it holds the lease: the lease expires
    # and the job is retried once more.
    await raw.close()
    s = await until_metric(observed, "jobtrace_lease_expiries_total", 1, service="flaky")
    assert s.value("jobtrace_job_retries_total", service="flaky") == 2
    s = await until_metric(observed, "jobtrace_connected_workers", 0)
    assert s.value("jobtrace_active_leases") == 0
    assert s.value("jobtrace_queue_depth", service="flaky", state="QUEUED") == 1


async def test_stream_subscribers_are_counted_and_released(observed: Harness) -> None:
    api = observed.stubs()
    job = await submit(api, "sub", service="nobody")
    workflow = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="wf",
                name="wf",
                steps=[c.WorkflowStepSpec(name="a", job=c.JobSpec(service="nobody"))],
            )
        )
    ).workflow
    watch = api.jobs.WatchJob(j.WatchJobRequest(job_id=job.id))
    await watch.read()
    watch_wf = api.jobs.WatchWorkflow(j.WatchWorkflowRequest(workflow_id=workflow.id))
    await watch_wf.read()
    trace = api.trace.StreamTraceEvents(t.StreamTraceEventsRequest(run_id=job.id, follow=True))
    await until_metric(observed, "jobtrace_stream_subscribers", 1, kind="trace_stream")
    s = await scrape(observed.server)
    assert s.value("jobtrace_stream_subscribers", kind="job_watch") == 1
    assert s.value("jobtrace_stream_subscribers", kind="workflow_watch") == 1
    assert s.value("jobtrace_stream_subscribers", kind="worker_session") == 0

    for call in (watch, watch_wf, trace):
        call.cancel()
    await until_metric(observed, "jobtrace_stream_subscribers", 0, kind="trace_stream")
    await until_metric(observed, "jobtrace_stream_subscribers", 0, kind="job_watch")
    await until_metric(observed, "jobtrace_stream_subscribers", 0, kind="workflow_watch")


async def test_trace_events_appended_and_delivered_are_counted(observed: Harness) -> None:
    api = observed.stubs()
    job = await submit(api, "traced", service="nobody")
    before = await scrape(observed.server)
    appended_before = before.value("jobtrace_trace_events_appended_total") or 0
    assert before.value("jobtrace_trace_events_delivered_total") == 0

    stream = api.trace.StreamTraceEvents(t.StreamTraceEventsRequest(run_id=job.id, follow=True))
    await until_metric(observed, "jobtrace_stream_subscribers", 1, kind="trace_stream")
    response = await api.trace.AppendTraceEvents(
        t.AppendTraceEventsRequest(
            run_id=job.id,
            events=[c.TraceEvent(event_key=f"k{i}", message=f"m{i}") for i in range(3)],
        )
    )
    assert len(response.events) == 3
    received = 0
    while received < 3:
        message = await stream.read()
        if message.WhichOneof("kind") == "event":
            received += 1
    stream.cancel()
    s = await until_metric(observed, "jobtrace_trace_events_delivered_total", 3)
    assert s.value("jobtrace_trace_events_appended_total") == appended_before + 3


async def test_group_commit_batches_are_observed(observed: Harness) -> None:
    api = observed.stubs()
    before = await scrape(observed.server)
    ops_before = before.value("jobtrace_db_group_commit_ops_sum") or 0
    batches_before = before.value("jobtrace_db_group_commit_ops_count") or 0
    await asyncio.gather(*(submit(api, f"g{i}") for i in range(20)))
    s = await scrape(observed.server)
    ops = (s.value("jobtrace_db_group_commit_ops_sum") or 0) - ops_before
    batches = (s.value("jobtrace_db_group_commit_ops_count") or 0) - batches_before
    assert ops >= 20 and 1 <= batches <= ops
    assert s.value("jobtrace_db_group_commit_ops_bucket", le="+Inf") == s.value(
        "jobtrace_db_group_commit_ops_count"
    )


async def test_each_server_has_its_own_registry(observed: Harness, tmp_path: Any) -> None:
    other = Harness(f"sqlite+aiosqlite:///{tmp_path / 'other.db'}", metrics_port=0)
    await other.start()
    try:
        assert other.server is not None and observed.server is not None
        assert other.server.metrics_port != observed.server.metrics_port
        await submit(observed.stubs(), "here")
        mine, theirs = await scrape(observed.server), await scrape(other.server)
        assert handled(mine, JOBS, "SubmitJob", "unary", "OK") == 1
        assert handled(theirs, JOBS, "SubmitJob", "unary", "OK") is None
    finally:
        await other.stop()


async def test_metrics_are_off_unless_a_port_is_set(harness: Harness) -> None:
    assert harness.server is not None
    assert harness.server.metrics_port is None and harness.server.metrics is None


async def test_metrics_endpoint_closes_with_the_server(db_url: str) -> None:
    h = Harness(db_url, metrics_port=0)
    server = await h.start()
    port = server.metrics_port
    assert port
    await scrape(port)
    await h.stop()
    with pytest.raises(OSError):
        await scrape(port)


async def test_metrics_bind_127_0_0_1_whatever_the_listen_host(sqlite_url: str) -> None:
    """--metrics-host defaults to 127.0.0.1, not the --listen host (here ::1);
    an empty one still means the --listen host."""
    h = Harness(sqlite_url, metrics_port=0)
    server = await h.start(listen="[::1]:0")
    try:
        await scrape(server)  # scrape() asks 127.0.0.1
    finally:
        await h.stop()
    server = await h.start(listen="[::1]:0", metrics_host="")
    try:
        with pytest.raises(OSError):
            await scrape(server)
    finally:
        await h.stop()


async def test_series_per_service_are_bounded_with_an_other_bucket(db_url: str) -> None:
    """Service names are the callers' choice: past the limit, services share
    the "(other)" label value, so a scrape's series stay bounded and no job
    goes uncounted."""
    async with Harness(db_url, metrics_port=0, metrics_max_services=3) as h:
        api = h.stubs()
        # The busiest services get the names; 12 distinct services in all.
        for n, service in [(4, "big"), (3, "mid"), (2, "small")]:
            for i in range(n):
                await submit(api, f"{service}-{i}", service=service)
        for i in range(9):
            await submit(api, f"rare-{i}", service=f"tenant-chosen-{i}")
        s = await scrape(h.server)
        queued = s.matching("jobtrace_queue_depth", state="QUEUED")
        by_service = {sample.labels["service"]: sample.value for sample in queued}
        assert by_service == {"big": 4, "mid": 3, "small": 2, "(other)": 9}, by_service
        # Services that come later share the bucket too; the named ones keep their series.
        for i in range(9, 20):
            await submit(api, f"rare-{i}", service=f"tenant-chosen-{i}")
        s = await scrape(h.server)
        services = {sample.labels["service"] for sample in s.matching("jobtrace_queue_depth")}
        assert services == {"big", "mid", "small", "(other)"}, services
        assert s.value("jobtrace_queue_depth", service="(other)", state="QUEUED") == 20


async def test_an_idle_metrics_connection_is_closed(sqlite_url: str) -> None:
    """A connection that sends nothing is closed after the idle timeout, and
    the endpoint keeps serving scrapes."""
    async with Harness(sqlite_url, metrics_port=0, metrics_idle_timeout_seconds=0.2) as h:
        assert h.server is not None and h.server.metrics_port

        def idle_connection(port: int) -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                # A generous bound against a hang: the server closes it long before.
                return sock.recv(1)

        idle = [asyncio.to_thread(idle_connection, h.server.metrics_port) for _ in range(3)]
        assert await asyncio.gather(*idle) == [b""] * 3  # EOF: the server hung up
        s = await scrape(h.server)
        assert s.value("jobtrace_connected_workers") == 0


def test_metrics_settings_come_from_the_environment() -> None:
    assert Settings.load(env={}).metrics_port is None
    assert Settings.load(env={}).metrics_host == "127.0.0.1"
    assert Settings.load(env={"JOBTRACE_METRICS_PORT": "9464"}).metrics_port == 9464
    assert Settings.load(env={"JOBTRACE_METRICS_PORT": "0"}).metrics_port == 0
    assert Settings.load(env={"JOBTRACE_METRICS_PORT": ""}).metrics_port is None
    assert Settings.load(env={"JOBTRACE_METRICS_PORT": "off"}).metrics_port is None
    loaded = Settings.load(env={"JOBTRACE_METRICS_HOST": "0.0.0.0", "JOBTRACE_LOG_FORMAT": "text"})
    assert loaded.metrics_host == "0.0.0.0" and loaded.log_format == "text"
    assert Settings.load(env={}).log_format == "json"
    limits = Settings.load(
        env={
            "JOBTRACE_METRICS_MAX_SERVICES": "50",
            "JOBTRACE_METRICS_IDLE_TIMEOUT_SECONDS": "2.5",
        }
    )
    assert (limits.metrics_max_services, limits.metrics_idle_timeout_seconds) == (50, 2.5)


# --- logs ------------------------------------------------------------------------------


async def test_log_lines_carry_request_id_tenant_and_job_id(
    harness: Harness, json_lines: Lines
) -> None:
    api = harness.stubs()
    request = j.SubmitJobRequest(request_id="logged", job=c.JobSpec(service="svc"))
    job = (await api.jobs.SubmitJob(request, metadata=(("x-request-id", "req-42"),))).job
    line = json_lines.find("job submitted", job_id=job.id)
    assert line is not None, json_lines.lines
    assert line["request_id"] == "req-42"
    assert line["tenant"] == "default"
    assert line["method"] == f"/{JOBS}/SubmitJob"
    assert line["level"] == "INFO" and line["logger"] == "jobtrace.domain.jobs"
    assert line["time"].endswith("Z")

    # Without x-request-id each call gets its own generated id.
    a = await submit(api, "gen-a")
    b = await submit(api, "gen-b")
    line_a = json_lines.find("job submitted", job_id=a.id)
    line_b = json_lines.find("job submitted", job_id=b.id)
    assert line_a is not None and line_b is not None
    assert len(line_a["request_id"]) == 16 and line_a["request_id"] != line_b["request_id"]

    # A malformed x-request-id is replaced, not logged.
    await api.jobs.SubmitJob(
        j.SubmitJobRequest(request_id="bad-rid", job=c.JobSpec(service="svc")),
        metadata=(("x-request-id", "has spaces " + "x" * 200),),
    )
    ids = [doc.get("request_id", "") for doc in json_lines.json()]
    assert ids and all(" " not in rid and len(rid) <= 128 for rid in ids)


async def test_lifecycle_log_lines_name_the_job_and_worker(
    harness: Harness, json_lines: Lines
) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("logger-w", ["svc"])
    connected = json_lines.find("worker connected", worker_id="logger-w")
    assert connected is not None
    assert connected["method"] == f"/{WORKERS}/Connect" and connected["request_id"]
    job = await submit(api, "lc", max_attempts=2)
    assignment = await raw.expect("assignment")
    await raw.send(
        fail=w.FailReport(
            job_id=job.id, attempt=1, error=c.ErrorDetail(message="nope"), retryable=True
        )
    )
    await raw.expect("ack")
    await wait_for(lambda: json_lines.find("job attempt failed; retrying", job_id=job.id))
    assigned = json_lines.find("job assigned", job_id=job.id, attempt=assignment.attempt)
    assert assigned is not None
    assert assigned["tenant"] == "default" and assigned["worker_id"] == "logger-w"
    retry = json_lines.find("job attempt failed; retrying", job_id=job.id)
    assert retry is not None
    assert retry["level"] == "WARNING" and retry["reason"] == "nope"
    assert retry["request_id"] == connected["request_id"], "logged within the worker's stream"

    second = await raw.expect("assignment", timeout=10)
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=second.attempt))
    await raw.expect("ack")
    await wait_for(lambda: json_lines.find("job completed", job_id=job.id))
    done = json_lines.find("job completed", job_id=job.id)
    assert done is not None and done["tenant"] == "default" and done["attempt"] == 2

    cancelled = await submit(api, "lc-cancel", service="nobody")
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=cancelled.id, reason="changed my mind"))
    line = await wait_for(lambda: json_lines.find("job cancelled", job_id=cancelled.id))
    assert line["reason"] == "changed my mind"
    assert line["method"] == f"/{JOBS}/CancelJob"

    await raw.close()
    gone = await wait_for(lambda: json_lines.find("worker disconnected", worker_id="logger-w"))
    assert gone["level"] == "INFO"


async def test_lease_expiry_is_logged_with_the_job(no_grace: Harness, json_lines: Lines) -> None:
    api = no_grace.stubs()
    raw = RawWorker(api)
    await raw.hello("lost-w", ["svc"])
    job = await submit(api, "lost", max_attempts=1)
    await raw.expect("assignment")
    await raw.close()
    line = await wait_for(lambda: json_lines.find("lease expired", job_id=job.id))
    assert line["level"] == "WARNING" and line["worker_id"] == "lost-w"
    assert line["tenant"] == "default"
    failed = await wait_for(lambda: json_lines.find("job failed", job_id=job.id))
    assert failed["code"] == "LEASE_EXPIRED"


def test_json_formatter_writes_one_object_per_line_with_exceptions() -> None:
    formatter = logs.JsonFormatter()
    logger = logging.getLogger("jobtrace.test")
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logger.makeRecord(
            "jobtrace.test",
            logging.ERROR,
            __file__,
            1,
            "failed %s",
            ("x",),
            __import__("sys").exc_info(),
            extra={"job_id": "job_1", "payload": {"n": 1}, "when": object()},
        )
    line = formatter.format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["message"] == "failed x" and doc["level"] == "ERROR"
    assert doc["job_id"] == "job_1" and doc["payload"] == {"n": 1}
    assert "ValueError: bad" in doc["exception"]
    assert isinstance(doc["when"], str)


def test_configure_sets_format_and_level_on_the_root_logger() -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    try:
        logs.configure("debug", "text", stream=out)
        logs.bind_request("rid-1", "/x.Y/Z")
        logging.getLogger("jobtrace.test").debug("hello %d", 1, extra={"job_id": "job_9"})
        logs.configure("WARNING", "json", stream=out)
        logging.getLogger("jobtrace.test").info("hidden")
        logging.getLogger("jobtrace.test").warning("shown")
        with pytest.raises(ValueError):
            logs.configure("INFO", "xml")
        with pytest.raises(ValueError):
            logs.configure("LOUD", "json")
    finally:
        logs.bind_request("", "")
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
    text, shown = out.getvalue().splitlines()
    assert " DEBUG jobtrace.test: hello 1 " in text
    assert "request_id=rid-1" in text and "job_id=job_9" in text
    doc = json.loads(shown)
    assert doc["message"] == "shown" and doc["request_id"] == "rid-1"


# --- traceparent ----------------------------------------------------------------------


async def test_traceparent_reaches_the_worker_and_every_trace_event(harness: Harness) -> None:
    api = harness.stubs()
    seen: list[str] = []

    async def handle(ctx: JobContext) -> dict[str, Any]:
        seen.append(ctx.traceparent)
        await ctx.progress(50, "half way")
        return {"ok": True}

    request = j.SubmitJobRequest(request_id="tp", job=c.JobSpec(service="traced"))
    job = (await api.jobs.SubmitJob(request, metadata=(("traceparent", TRACEPARENT),))).job
    assert job.traceparent == TRACEPARENT
    # An event appended through the API belongs to the run as well (appended
    # while the run is open: an ended run takes no more events).
    await api.trace.AppendTraceEvents(
        t.AppendTraceEventsRequest(
            run_id=job.id, events=[c.TraceEvent(event_key="note", message="note")]
        )
    )
    async with runtime_worker(harness.target, {"traced": handle}):

        async def completed() -> bool:
            got = await api.jobs.GetJob(j.GetJobRequest(job_id=job.id))
            return got.job.state == c.RUN_STATE_COMPLETED

        await wait_for(completed, timeout=10)
    assert seen == [TRACEPARENT]

    events = await events_of(api, job.id)
    kinds = {e.type for e in events}
    assert {c.TRACE_EVENT_TYPE_STARTED, c.TRACE_EVENT_TYPE_PROGRESS} <= kinds
    assert c.TRACE_EVENT_TYPE_COMPLETED in kinds
    assert [e.traceparent for e in events] == [TRACEPARENT] * len(events)


async def test_traceparent_is_on_events_the_worker_sends(api: Stubs) -> None:
    raw = RawWorker(api)
    await raw.hello("tp-w", ["svc"])
    request = j.SubmitJobRequest(request_id="tp-raw", job=c.JobSpec(service="svc"))
    job = (await api.jobs.SubmitJob(request, metadata=(("traceparent", TRACEPARENT),))).job
    assignment = await raw.expect("assignment")
    assert assignment.traceparent == TRACEPARENT
    await raw.send(
        trace=w.TraceReport(
            job_id=job.id,
            attempt=1,
            events=[c.TraceEvent(message="stdout line", node_id="resize")],
        )
    )
    await raw.expect("ack")
    events = await events_of(api, job.id)
    sent = [e for e in events if e.message == "stdout line"]
    assert len(sent) == 1 and sent[0].worker_id == "tp-w"
    assert all(e.traceparent == TRACEPARENT for e in events)
    await raw.close()


async def test_traceparent_is_on_every_event_of_a_workflow(harness: Harness) -> None:
    api = harness.stubs()

    async def handle(ctx: JobContext) -> dict[str, Any]:
        assert ctx.traceparent == TRACEPARENT
        return {}

    async with runtime_worker(harness.target, {"step": handle}):
        request = j.SubmitWorkflowRequest(
            request_id="tp-wf",
            name="traced",
            steps=[
                c.WorkflowStepSpec(name="a", job=c.JobSpec(service="step")),
                c.WorkflowStepSpec(name="b", job=c.JobSpec(service="step")),
            ],
        )
        workflow = (
            await api.jobs.SubmitWorkflow(request, metadata=(("traceparent", TRACEPARENT),))
        ).workflow

        async def completed() -> bool:
            got = await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=workflow.id))
            return got.workflow.state == c.RUN_STATE_COMPLETED

        await wait_for(completed, timeout=10)
    events = await events_of(api, workflow.id)
    assert any(e.node_id == "workflow" for e in events), "the workflow's own events count too"
    assert [e.traceparent for e in events] == [TRACEPARENT] * len(events)
