"""Hostile and broken input: random messages to every RPC and random worker-stream
sequences against a real server process, on SQLite and on PostgreSQL, with NUL
characters and NaN/Infinity among the values. It never answers INTERNAL or
UNKNOWN, never dies, and a rejected call changes nothing stored."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import sqlite3
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobtrace.pb import (
    attestation_service_pb2,
    job_service_pb2,
    trace_service_pb2,
    worker_service_pb2,
)
from jobtrace.pb import common_pb2 as c

from .conftest import (
    PG_ADMIN_URL,
    Harness,
    Stubs,
    _pg_admin,
    execute_sql,
    expect_error,
    pg_problem,
    require_pg,
)
from .procs import serve_blocking
from .workers import RawWorker

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
SERVICES = [
    m.DESCRIPTOR.services_by_name[name]
    for m, name in (
        (job_service_pb2, "JobService"),
        (trace_service_pb2, "TraceService"),
        (attestation_service_pb2, "AttestationService"),
    )
]
UNARY = [
    (f"/{s.full_name}/{m.name}", m)
    for s in SERVICES
    for m in s.methods
    if not m.server_streaming and not m.client_streaming
]
SERVER_STREAMS = [
    (f"/{s.full_name}/{m.name}", m) for s in SERVICES for m in s.methods if m.server_streaming
]
TABLES = {
    "jobs": "count(*), coalesce(max(updated_us), 0)",
    "workflows": "count(*), coalesce(max(updated_us), 0)",
    "submissions": "count(*)",
    "trace_events": "count(*)",
    "annotations": "count(*)",
    "attestations": "count(*)",
}


class Server:
    """A real `jobtrace serve` process on SQLite or on a fresh PostgreSQL database."""

    def __init__(self, tmp: Path, db_url: str) -> None:
        self.db_url = db_url
        self.sqlite_path = tmp / "hostile.db" if db_url.startswith("sqlite") else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pg: Any = None
        self.proc, self.port = serve_blocking(
            "--db",
            db_url,
            "--signing-key-file",
            str(tmp / "signing.key"),
            "--lease-seconds",
            "2",
            "--heartbeat-seconds",
            "0.5",
        )
        # Keep reading the log, so a chatty server never blocks on a full pipe;
        # its tail explains a failure.
        self.log: collections.deque[str] = collections.deque(maxlen=50)
        threading.Thread(target=self._read_log, daemon=True).start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        if self.sqlite_path is None:
            import asyncpg

            self._loop = asyncio.new_event_loop()
            dsn = db_url.replace("postgresql+asyncpg://", "postgresql://")
            self._pg = self._loop.run_until_complete(asyncpg.connect(dsn))

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def errors(self) -> str:
        return "".join(line for line in self.log if '"ERROR"' in line or "Traceback" in line)

    def fingerprint(self) -> dict[str, tuple[Any, ...]]:
        if self._pg is not None:
            assert self._loop is not None
            return {
                t: tuple(
                    self._loop.run_until_complete(self._pg.fetchrow(f"SELECT {cols} FROM {t}"))
                )
                for t, cols in TABLES.items()
            }
        with sqlite3.connect(f"file:{self.sqlite_path}?mode=ro", uri=True) as db:
            return {
                t: db.execute(f"SELECT {cols} FROM {t}").fetchone() for t, cols in TABLES.items()
            }

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.channel.close()
        if self._pg is not None and self._loop is not None:
            self._loop.run_until_complete(self._pg.close())
            self._loop.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One server per backend for the whole module (hypothesis calls it per example)."""
    tmp = tmp_path_factory.mktemp("hostile")
    if request.param == "sqlite":
        with _server(tmp, f"sqlite+aiosqlite:///{tmp / 'hostile.db'}") as s:
            yield s
        return
    problem = asyncio.run(pg_problem())
    if problem:
        if require_pg():
            pytest.fail(f"JOBTRACE_REQUIRE_PG=1 but {problem}")
        pytest.skip(problem)
    name = f"jt_hostile_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f"CREATE DATABASE {name}"))
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    try:
        with _server(tmp, f"{base}/{name}") as s:
            yield s
    finally:
        asyncio.run(_pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@contextlib.contextmanager
def _server(tmp: Path, db_url: str) -> Iterator[Server]:
    s = Server(tmp, db_url)
    try:
        yield s
    finally:
        s.close()
    assert s.proc.returncode == 0, "the server survived and stopped cleanly"


# Text as callers send it, with NUL characters (PostgreSQL cannot store them)
# drawn often enough to reach every field.
def hostile_text(max_size: int) -> st.SearchStrategy[str]:
    return st.text(max_size=max_size) | st.sampled_from(["\x00", "a\x00b", "\x00" * 3])


# Free-form JSON, including what JSON cannot carry: NaN and +-Infinity.
json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True, allow_infinity=True) | hostile_text(20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text(8), inner, max_size=3),
    max_leaves=8,
)
INTERESTING_STRINGS = st.sampled_from(
    [
        "",
        "job_",
        "wf_",
        "job_01m844ca4ptp8ws0mmfm3qzz6p",
        "x" * 300,
        "a.b",
        "decision.confidence",
        "\x00",
        "💥",
        "../../etc/passwd",
        "' OR 1=1 --",
        "%_",
        "default",
    ]
)


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return hostile_text(40) | INTERESTING_STRINGS
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=40)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(
            allow_nan=True, allow_infinity=True, width=32 if t == FieldDescriptor.TYPE_FLOAT else 64
        )
    if t == FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 12)
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_UINT32):
        return st.integers(0, 2**32 - 1)
    return st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, 1, -1, 1000, 1001, 2**31 - 1])


def draw_message(data: st.DataObject, cls: type[Message], depth: int = 0) -> Message:
    msg = cls()
    name = cls.DESCRIPTOR.full_name
    if name == "google.protobuf.Struct":
        msg.update(data.draw(st.dictionaries(hostile_text(8), json_values, max_size=4)))
        return msg
    if name == "google.protobuf.Value":
        holder = struct_pb2.Struct()
        holder.update({"v": data.draw(json_values)})  # keeps NaN, which ParseDict refuses
        msg.CopyFrom(holder.fields["v"])
        return msg
    for field in cls.DESCRIPTOR.fields:
        if not data.draw(st.booleans()):
            continue
        if field.message_type is not None:
            if depth > 3:
                continue
            sub = GetMessageClass(field.message_type)
            if field.message_type.GetOptions().map_entry:
                key_field, value_field = field.message_type.fields
                for _ in range(data.draw(st.integers(0, 2))):
                    key = data.draw(scalar(key_field))
                    if value_field.message_type is not None:
                        value = draw_message(
                            data, GetMessageClass(value_field.message_type), depth + 1
                        )
                        getattr(msg, field.name)[key].CopyFrom(value)
                    else:
                        getattr(msg, field.name)[key] = data.draw(scalar(value_field))
            elif field.is_repeated:
                for _ in range(data.draw(st.integers(0, 2))):
                    getattr(msg, field.name).add().CopyFrom(draw_message(data, sub, depth + 1))
            else:
                getattr(msg, field.name).CopyFrom(draw_message(data, sub, depth + 1))
        elif field.is_repeated:
            getattr(msg, field.name).extend(data.draw(st.lists(scalar(field), max_size=3)))
        else:
            try:
                setattr(msg, field.name, data.draw(scalar(field)))
            except ValueError:  # e.g. a value out of range for the field's type
                pass
    return msg


def call_raw(server: Server, path: str, payload: bytes, streaming: bool) -> grpc.StatusCode:
    if streaming:
        stream = server.channel.unary_stream(path)
        try:
            for _ in stream(payload, timeout=2):
                pass
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK
    unary = server.channel.unary_unary(path)
    try:
        unary(payload, timeout=10)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)


@FUZZ
@given(data=st.data())
def test_random_requests_to_every_rpc(server: Server, data: st.DataObject) -> None:
    path, method = data.draw(st.sampled_from(UNARY + SERVER_STREAMS))
    request = draw_message(data, GetMessageClass(method.input_type))
    before = server.fingerprint()
    code = call_raw(server, path, request.SerializeToString(), method.server_streaming)
    assert code not in FORBIDDEN, (path, request, server.errors())
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED):
        assert server.fingerprint() == before, f"{path} was refused ({code}) but changed state"
    assert server.alive()


@FUZZ
@given(data=st.data())
def test_malformed_bytes_to_every_rpc(server: Server, data: st.DataObject) -> None:
    path, method = data.draw(st.sampled_from(UNARY + SERVER_STREAMS))
    payload = data.draw(st.binary(min_size=1, max_size=64))
    before = server.fingerprint()
    code = call_raw(server, path, payload, method.server_streaming)
    assert code not in FORBIDDEN, (path, payload, server.errors())
    if code not in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED):
        assert server.fingerprint() == before
    assert server.alive()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_worker_stream_sequences(server: Server, data: st.DataObject) -> None:
    """Random message sequences on the bidi stream: every refusal is a StreamError
    (or a clean end), never INTERNAL, and the server stays up."""
    kinds = ["hello", "heartbeat", "progress", "trace", "annotate", "complete", "fail"]
    messages = []
    for i in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(kinds))
        field = worker_service_pb2.ConnectRequest.DESCRIPTOR.fields_by_name[kind]
        body = draw_message(data, GetMessageClass(field.message_type))
        if kind == "hello" and data.draw(st.booleans()):
            body = worker_service_pb2.WorkerHello(worker_id=f"fuzz-{i}", services=["fuzz"])
        request = worker_service_pb2.ConnectRequest(message_id=i + 1)
        getattr(request, kind).CopyFrom(body)
        messages.append(request.SerializeToString())
    if data.draw(st.booleans()):
        messages.insert(data.draw(st.integers(0, len(messages))), b"\xff\xff\xff")
    connect = server.channel.stream_stream("/jobtrace.v1.WorkerService/Connect")
    responses = connect(iter(messages), timeout=5)
    try:
        for response in responses:
            parsed = worker_service_pb2.ConnectResponse.FromString(response)
            if parsed.WhichOneof("kind") == "error":
                assert parsed.error.code not in (13, 2), parsed  # INTERNAL, UNKNOWN
                assert parsed.error.message
    except grpc.RpcError as err:
        assert err.code() not in FORBIDDEN, err
    assert server.alive()


# --- targeted hostile values, through the async API on both backends -----------------


def _struct(**values: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def _value(x: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    if isinstance(x, float):
        v.number_value = x
    elif isinstance(x, str):
        v.string_value = x
    else:
        json_format.ParseDict(x, v)
    return v


async def _stored(db_url: str) -> list[Any]:
    return [
        (await execute_sql(db_url, f"SELECT {cols} FROM {table}"))[0]
        for table, cols in TABLES.items()
    ]


def _hostile_calls(api: Stubs, run_id: str) -> list[tuple[str, Any, str]]:
    """(what, call, the field path the refusal must name)."""
    t = trace_service_pb2
    j = job_service_pb2
    a = attestation_service_pb2
    nul = "bad\x00value"
    return [
        (
            "NUL in a trace message",
            api.trace.AppendTraceEvents(
                t.AppendTraceEventsRequest(
                    run_id=run_id, events=[c.TraceEvent(event_key="k", message=nul)]
                )
            ),
            "events[0].message",
        ),
        (
            "NUL in an event key",
            api.trace.AppendTraceEvents(
                t.AppendTraceEventsRequest(run_id=run_id, events=[c.TraceEvent(event_key=nul)])
            ),
            "events[0].event_key",
        ),
        (
            "NUL in the run id",
            api.trace.ListTraceEvents(t.ListTraceEventsRequest(run_id=run_id + "\x00")),
            "run_id",
        ),
        (
            "NaN in event data",
            api.trace.AppendTraceEvents(
                t.AppendTraceEventsRequest(
                    run_id=run_id,
                    events=[c.TraceEvent(event_key="k", data=_struct(x=float("nan")))],
                )
            ),
            "events[0].data['x']",
        ),
        (
            "Infinity deep in event data",
            api.trace.AppendTraceEvents(
                t.AppendTraceEventsRequest(
                    run_id=run_id,
                    events=[
                        c.TraceEvent(event_key="k", data=_struct(x={"y": [1.0, float("-inf")]}))
                    ],
                )
            ),
            "events[0].data['x']['y'][1]",
        ),
        (
            "NUL in a Struct key",
            api.trace.AppendTraceEvents(
                t.AppendTraceEventsRequest(
                    run_id=run_id,
                    events=[c.TraceEvent(event_key="k", output_summary=_struct(**{nul: 1}))],
                )
            ),
            "events[0].output_summary['bad\\x00value']",
        ),
        (
            "NUL in a workflow name",
            api.jobs.SubmitWorkflow(
                j.SubmitWorkflowRequest(
                    request_id="wf",
                    name=nul,
                    steps=[c.WorkflowStepSpec(name="a", job=c.JobSpec(service="svc"))],
                )
            ),
            "name",
        ),
        (
            "NUL in the ListJobs service filter",
            api.jobs.ListJobs(j.ListJobsRequest(service=nul)),
            "service",
        ),
        (
            "NaN in a job payload",
            api.jobs.SubmitJob(
                j.SubmitJobRequest(
                    request_id="p", job=c.JobSpec(service="svc", payload=_struct(n=float("nan")))
                )
            ),
            "job.payload['n']",
        ),
        (
            "NUL in a label key",
            api.jobs.SubmitJob(
                j.SubmitJobRequest(
                    request_id="l", job=c.JobSpec(service="svc", labels={"a\x00": "v"})
                )
            ),
            "job.labels['a\\x00']",
        ),
        (
            "NaN in a backoff multiplier",
            api.jobs.SubmitJob(
                j.SubmitJobRequest(
                    request_id="b",
                    job=c.JobSpec(service="svc", backoff=c.BackoffPolicy(multiplier=float("nan"))),
                )
            ),
            "job.backoff.multiplier",
        ),
        (
            "Infinity in an annotation value",
            api.attest.AttachAnnotations(
                a.AttachAnnotationsRequest(
                    run_id=run_id,
                    actor=c.Actor(kind=c.ACTOR_KIND_USER, id="u"),
                    attributes={"decision.score": _value(float("inf"))},
                )
            ),
            "attributes['decision.score']",
        ),
        (
            "a Timestamp out of its range",
            api.jobs.SubmitJob(
                j.SubmitJobRequest(
                    request_id="ts",
                    job=c.JobSpec(service="svc"),
                    request_context=c.RequestContext(
                        metadata=c.RequestMetadata(timestamp=timestamp_pb2.Timestamp(nanos=-1))
                    ),
                )
            ),
            "request_context.metadata.timestamp",
        ),
        (
            "NUL in a streamed run id",
            _drain(api.trace.StreamTraceEvents(t.StreamTraceEventsRequest(run_id=nul))),
            "run_id",
        ),
    ]


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


async def test_nul_and_non_finite_values_are_invalid_argument_and_change_nothing(
    harness: Harness,
) -> None:
    api = harness.stubs()
    run_id = (
        await api.jobs.SubmitJob(
            job_service_pb2.SubmitJobRequest(request_id="run", job=c.JobSpec(service="svc"))
        )
    ).job.id
    before = await _stored(harness.db_url)
    for what, call, field in _hostile_calls(api, run_id):
        err, _, violations = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert field in [f for f, _ in violations], (what, violations)
        assert "sqlalchemy" not in (err.details() or "").lower(), what
    assert await _stored(harness.db_url) == before


async def test_nul_and_nan_on_the_worker_stream_are_refused_with_the_field(
    harness: Harness,
) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    job = (
        await api.jobs.SubmitJob(
            job_service_pb2.SubmitJobRequest(request_id="run", job=c.JobSpec(service="svc"))
        )
    ).job
    await raw.expect("assignment")
    w = worker_service_pb2
    await raw.send(
        trace=w.TraceReport(job_id=job.id, attempt=1, events=[c.TraceEvent(message="a\x00b")])
    )
    error = await raw.expect("error")
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "events[0].message" in error.message and error.job_id == job.id
    await raw.send(
        complete=w.CompleteReport(job_id=job.id, attempt=1, result=_struct(x=float("nan")))
    )
    error = await raw.expect("error")
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "complete.result['x']" in error.message and not error.fatal
    # The stream and the lease survive the refusals: a clean result completes the job.
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1, result=_struct(x=1.5)))
    await raw.expect("ack")
    done = await api.jobs.GetJob(job_service_pb2.GetJobRequest(job_id=job.id))
    assert done.job.state == c.RUN_STATE_COMPLETED
    await raw.close()
    # The handshake too: a hello claiming a lease under a NUL-bearing id.
    bad = RawWorker(api)
    await bad.send(
        hello=w.WorkerHello(
            worker_id="w\x00", services=["svc"], running=[w.JobAttempt(job_id=job.id, attempt=1)]
        )
    )
    error = await bad.expect("error")
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and error.fatal
    assert "hello.worker_id" in error.message
    await bad.close()


async def test_two_submitted_annotations_claiming_one_idempotency_key_are_invalid(
    api: Stubs,
) -> None:
    def note(value: str) -> c.AnnotationInput:
        return c.AnnotationInput(
            actor=c.Actor(kind=c.ACTOR_KIND_SERVICE, id="svc"),
            attributes={"trigger.source": _value(value)},
            idempotency_key="same",
        )

    _, _, violations = await expect_error(
        api.jobs.SubmitJob(
            job_service_pb2.SubmitJobRequest(
                request_id="dup",
                job=c.JobSpec(service="svc"),
                annotations=[note("a"), note("b")],
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "annotations[1].idempotency_key" in [f for f, _ in violations]
    _, _, violations = await expect_error(
        api.jobs.SubmitWorkflow(
            job_service_pb2.SubmitWorkflowRequest(
                request_id="dup-wf",
                name="w",
                steps=[c.WorkflowStepSpec(name="a", job=c.JobSpec(service="svc"))],
                annotations=[note("a"), note("b")],
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "annotations[1].idempotency_key" in [f for f, _ in violations]
    listed = await api.jobs.ListJobs(job_service_pb2.ListJobsRequest())
    assert list(listed.jobs) == []


async def test_annotation_keys_must_be_dotted_lowercase_names(api: Stubs) -> None:
    job = (
        await api.jobs.SubmitJob(
            job_service_pb2.SubmitJobRequest(request_id="k", job=c.JobSpec(service="svc"))
        )
    ).job
    for key in ("note", "Decision.outcome", "decision.", ".x", "a..b"):
        _, _, violations = await expect_error(
            api.attest.AttachAnnotations(
                attestation_service_pb2.AttachAnnotationsRequest(
                    run_id=job.id,
                    actor=c.Actor(kind=c.ACTOR_KIND_USER, id="u"),
                    attributes={key: _value("x")},
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert f"attributes[{key!r}]" in [f for f, _ in violations], key
    stored = await api.attest.AttachAnnotations(
        attestation_service_pb2.AttachAnnotationsRequest(
            run_id=job.id,
            actor=c.Actor(kind=c.ACTOR_KIND_USER, id="u"),
            attributes={"review.note_2": _value("x")},
        )
    )
    assert [x.key for x in stored.annotations] == ["review.note_2"]


def test_fuzzing_ran_against_a_live_server(server: Server) -> None:
    assert server.alive() and server.port
    assert server.fingerprint()["jobs"] is not None
