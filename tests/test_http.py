"""The HTTP listener (--http-listen): every Connect RPC from a plain HTTP
client (JSON and binary), errors with the gRPC details, server streams over
HTTP/1.1, CORS, limits, auth, and the EventSource endpoint of a run's trace."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from google.protobuf import any_pb2, json_format, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from jobtrace.auth import hash_token
from jobtrace.config import Settings
from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import schedule_service_pb2 as sc
from jobtrace.pb import schedule_service_pb2 as sch
from jobtrace.pb import schedule_service_pb2_grpc as sch_grpc
from jobtrace.pb import service_descriptor
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w
from jobtrace.server import Authenticator, check_exposure
from jobtrace.web.listener import HTTP_METHODS, HTTP_SERVICES, served_methods

from .conftest import Harness, Stubs, wait_for
from .test_security import MATRIX, ROLES, token, write_tokens
from .workers import RawWorker

HTTP = "127.0.0.1:0"
JSON = "json"
PROTO = "proto"

# -- a plain Connect client (the protocol as a browser speaks it) --------------


def encode(message: Message, codec: str) -> bytes:
    if codec == JSON:
        return json_format.MessageToJson(message).encode()
    return message.SerializeToString()


def decode(data: bytes, cls: type[Message], codec: str) -> Message:
    message = cls()
    if codec == JSON:
        json_format.Parse(data, message)
    else:
        message.ParseFromString(data)
    return message


def envelope(data: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(data)) + data


def envelopes(body: bytes) -> list[tuple[int, bytes]]:
    out = []
    while body:
        flags, size = struct.unpack(">BI", body[:5])
        out.append((flags, body[5 : 5 + size]))
        body = body[5 + size :]
    return out


class Answer:
    """A Connect call's outcome: its messages and its error (None: OK)."""

    def __init__(self, messages: list[Message], error: dict[str, Any] | None, status: int) -> None:
        self.messages = messages
        self.error = error
        self.status = status

    @property
    def code(self) -> str:
        return "ok" if self.error is None else str(self.error["code"])

    def details(self) -> list[any_pb2.Any]:
        out = []
        for d in (self.error or {}).get("details", []):
            raw = base64.b64decode(d["value"] + "=" * (-len(d["value"]) % 4))
            out.append(any_pb2.Any(type_url=f"type.googleapis.com/{d['type']}", value=raw))
        return out

    def violations(self) -> list[str]:
        fields = []
        for detail in self.details():
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                fields += [v.field for v in bad.field_violations]
        return fields

    def reason(self) -> str:
        for detail in self.details():
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return info.reason
        return ""


async def call(
    client: httpx.AsyncClient,
    method: MethodDescriptor,
    request: Message,
    codec: str = JSON,
    headers: dict[str, str] | None = None,
    timeout_ms: int | None = None,
) -> Answer:
    path = f"/{method.containing_service.full_name}/{method.name}"
    output = GetMessageClass(method.output_type)
    extra = dict(headers or {})
    if timeout_ms is not None:
        extra["connect-timeout-ms"] = str(timeout_ms)
    if not method.server_streaming:
        response = await client.post(
            path,
            content=encode(request, codec),
            headers={"content-type": f"application/{codec}", **extra},
        )
        if response.status_code == 200:
            assert response.headers["content-type"] == f"application/{codec}"
            return Answer([decode(response.content, output, codec)], None, 200)
        assert response.headers["content-type"] == "application/json", response.text
        return Answer([], response.json(), response.status_code)
    response = await client.post(
        path,
        content=envelope(encode(request, codec)),
        headers={"content-type": f"application/connect+{codec}", **extra},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == f"application/connect+{codec}"
    frames = envelopes(response.content)
    assert frames and frames[-1][0] == 2, "a stream ends with an end-of-stream envelope"
    assert all(flags == 0 for flags, _ in frames[:-1])
    end = json.loads(frames[-1][1])
    return Answer([decode(f, output, codec) for _, f in frames[:-1]], end.get("error"), 200)


def method_of(service: str, name: str) -> MethodDescriptor:
    found: MethodDescriptor = service_descriptor(service).methods_by_name[name]
    return found


async def grpc_code(stubs: Stubs, method: MethodDescriptor, request: Message) -> str:
    """The status code of the same call over gRPC, in Connect's spelling."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    output = GetMessageClass(method.output_type)
    try:
        if method.server_streaming:
            stream = stubs.channel.unary_stream(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=output.FromString,
            )(request, timeout=1.0)
            async for _ in stream:
                pass
        else:
            await stubs.channel.unary_unary(
                path,
                request_serializer=type(request).SerializeToString,
                response_deserializer=output.FromString,
            )(request)
    except grpc.aio.AioRpcError as err:
        name = err.code().name.lower()
        return "canceled" if name == "cancelled" else name
    return "ok"


@pytest.fixture
async def web(sqlite_url: str) -> AsyncIterator[Harness]:
    async with Harness(sqlite_url, http_listen=HTTP) as h:
        yield h


@pytest.fixture
async def client(web: Harness) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=web.http_url, timeout=10) as http:
        yield http


# -- conformance: every RPC, JSON and binary ------------------------------------


async def _fixtures(api: Stubs) -> dict[str, str]:
    """Runs and records the table of requests refers to."""
    ids: dict[str, str] = {}
    for name in ("run", "cancel-json", "cancel-proto", "attested", "term-json", "term-proto"):
        job = await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id=f"conf-{name}", job=c.JobSpec(service="svc"))
        )
        ids[name] = job.job.id
    for codec in (JSON, PROTO):
        wf = await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id=f"conf-wf-{codec}",
                name="conformance",
                steps=[c.WorkflowStepSpec(name="a", job=c.JobSpec(service="svc"))],
            )
        )
        ids[f"wf-{codec}"] = wf.workflow.id
        for kind in ("term", "ended", "pause"):
            other = await api.jobs.SubmitWorkflow(
                j.SubmitWorkflowRequest(
                    request_id=f"conf-{kind}-wf-{codec}",
                    name="conformance",
                    steps=[c.WorkflowStepSpec(name="a", job=c.JobSpec(service="svc"))],
                )
            )
            ids[f"{kind}-wf-{codec}"] = other.workflow.id
        await api.jobs.CancelWorkflow(
            j.CancelWorkflowRequest(workflow_id=ids[f"ended-wf-{codec}"], reason="ended")
        )
        gated = await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id=f"conf-gated-{codec}",
                name="gated",
                steps=[
                    c.WorkflowStepSpec(
                        name="gate", approval=c.ApprovalGate(approvers=["role:reviewer"])
                    )
                ],
            )
        )
        ids[f"gated-{codec}"] = gated.workflow.id
    await api.trace.AppendTraceEvents(
        t.AppendTraceEventsRequest(
            run_id=ids["run"], events=[c.TraceEvent(event_key="k0", message="hello conformance")]
        )
    )
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=ids["attested"], reason="attest"))
    listed = await api.attest.ListAttestations(a.ListAttestationsRequest(job_id=ids["attested"]))
    ids["key"] = listed.attestations[0].key
    await sch_grpc.ScheduleServiceStub(api.channel).CreateSchedule(
        sch.CreateScheduleRequest(schedule=_schedule("conformance"))
    )
    return ids


def _schedule(sid: str) -> sch.Schedule:
    return sch.Schedule(
        id=sid, cron="0 3 * * *", job=j.SubmitJobRequest(job=c.JobSpec(service="svc"))
    )


def _table(ids: dict[str, str], codec: str) -> dict[str, Callable[[], Message]]:
    """A valid request for each method that needs more than the empty message."""
    run = ids["run"]
    wf = ids[f"wf-{codec}"]
    value = struct_pb2.Value(string_value="yes")
    return {
        "SubmitJob": lambda: j.SubmitJobRequest(
            request_id=f"http-{codec}", job=c.JobSpec(service="svc")
        ),
        "SubmitWorkflow": lambda: j.SubmitWorkflowRequest(
            request_id=f"http-wf-{codec}",
            name="w",
            steps=[c.WorkflowStepSpec(name="a", job=c.JobSpec(service="svc"))],
        ),
        "GetJob": lambda: j.GetJobRequest(job_id=run),
        "GetWorkflow": lambda: j.GetWorkflowRequest(workflow_id=wf),
        "CancelJob": lambda: j.CancelJobRequest(job_id=ids[f"cancel-{codec}"], reason="test"),
        "CancelWorkflow": lambda: j.CancelWorkflowRequest(workflow_id=wf, reason="test"),
        "WatchJob": lambda: j.WatchJobRequest(job_id=ids[f"cancel-{codec}"]),
        "WatchWorkflow": lambda: j.WatchWorkflowRequest(workflow_id=wf),
        "AwaitJob": lambda: j.AwaitJobRequest(job_id=ids[f"cancel-{codec}"]),
        "AwaitWorkflow": lambda: j.AwaitWorkflowRequest(workflow_id=wf),
        "TerminateJob": lambda: j.TerminateJobRequest(job_id=ids[f"term-{codec}"], reason="t"),
        "TerminateWorkflow": lambda: j.TerminateWorkflowRequest(
            workflow_id=ids[f"term-wf-{codec}"], reason="t"
        ),
        "RerunJob": lambda: j.RerunJobRequest(job_id=ids["attested"], request_id=f"rr-{codec}"),
        "RerunWorkflow": lambda: j.RerunWorkflowRequest(
            workflow_id=ids[f"ended-wf-{codec}"], request_id=f"rw-{codec}"
        ),
        "CancelRuns": lambda: j.CancelRunsRequest(
            filter=j.BulkRunFilter(service="svc"), dry_run=True
        ),
        "RerunRuns": lambda: j.RerunRunsRequest(
            filter=j.BulkRunFilter(service="svc"), dry_run=True
        ),
        "PauseWorkflow": lambda: j.PauseWorkflowRequest(
            workflow_id=ids[f"pause-wf-{codec}"], reason="p"
        ),
        "ResumeWorkflow": lambda: j.ResumeWorkflowRequest(workflow_id=ids[f"pause-wf-{codec}"]),
        "PauseQueue": lambda: j.PauseQueueRequest(service=f"q-{codec}", reason="p"),
        "ResumeQueue": lambda: j.ResumeQueueRequest(service=f"q-{codec}"),
        "SubmitJobs": lambda: j.SubmitJobsRequest(
            items=[j.SubmitJobRequest(request_id=f"bulk-{codec}", job=c.JobSpec(service="svc"))]
        ),
        "SubmitWorkflows": lambda: j.SubmitWorkflowsRequest(
            items=[
                j.SubmitWorkflowRequest(
                    request_id=f"bulk-wf-{codec}",
                    name="w",
                    steps=[c.WorkflowStepSpec(name="a", job=c.JobSpec(service="svc"))],
                )
            ]
        ),
        "ApproveStep": lambda: j.ApproveStepRequest(
            workflow_id=ids[f"gated-{codec}"],
            step="gate",
            disposition=c.APPROVAL_DISPOSITION_APPROVED,
        ),
        "SummarizeFailures": lambda: j.SummarizeFailuresRequest(
            since=timestamp_pb2.Timestamp(seconds=int(time.time()) - 3600)
        ),
        "AppendTraceEvents": lambda: t.AppendTraceEventsRequest(
            run_id=run, events=[c.TraceEvent(event_key=f"k-{codec}", message="over http")]
        ),
        "ListTraceEvents": lambda: t.ListTraceEventsRequest(run_id=run),
        "StreamTraceEvents": lambda: t.StreamTraceEventsRequest(run_id=run),
        "GetRunStatus": lambda: t.GetRunStatusRequest(run_id=run),
        "GetRunSummary": lambda: t.GetRunSummaryRequest(run_id=run),
        "SearchTraceEvents": lambda: t.SearchTraceEventsRequest(query="conformance"),
        "GetAttestation": lambda: a.GetAttestationRequest(key=ids["key"]),
        "ListAttestations": lambda: a.ListAttestationsRequest(job_id=run),
        "VerifyAttestation": lambda: a.VerifyAttestationRequest(key=ids["key"]),
        "AttachAnnotations": lambda: a.AttachAnnotationsRequest(
            run_id=run,
            actor=c.Actor(kind=c.ACTOR_KIND_SERVICE, id="triage"),
            attributes={f"review.checked_{codec}": value},
        ),
        "ListAnnotations": lambda: a.ListAnnotationsRequest(run_id=run),
        "CreateSchedule": lambda: sch.CreateScheduleRequest(schedule=_schedule(f"s-{codec}")),
        "GetSchedule": lambda: sch.GetScheduleRequest(schedule_id="conformance"),
        "UpdateSchedule": lambda: sch.UpdateScheduleRequest(schedule=_schedule("conformance")),
        "DeleteSchedule": lambda: sch.DeleteScheduleRequest(schedule_id=f"s-{codec}"),
        "PauseSchedule": lambda: sch.PauseScheduleRequest(schedule_id="conformance"),
        "ResumeSchedule": lambda: sch.ResumeScheduleRequest(schedule_id="conformance"),
        "TriggerSchedule": lambda: sch.TriggerScheduleRequest(schedule_id="conformance"),
        "CreateRateLimit": lambda: sc.CreateRateLimitRequest(
            rate_limit=sc.RateLimit(key=f"http-{codec}", count=5, period={"seconds": 1})
        ),
        "GetRateLimit": lambda: sc.GetRateLimitRequest(key=f"http-{codec}"),
        "UpdateRateLimit": lambda: sc.UpdateRateLimitRequest(
            rate_limit=sc.RateLimit(key=f"http-{codec}", count=6, period={"seconds": 1})
        ),
        "DeleteRateLimit": lambda: sc.DeleteRateLimitRequest(key=f"http-{codec}"),
    }


async def test_every_connect_rpc_answers_json_and_binary_as_grpc_does(
    web: Harness, client: httpx.AsyncClient
) -> None:
    api = web.stubs()
    ids = await _fixtures(api)
    covered = 0
    for service in HTTP_SERVICES:
        for name in served_methods(service):
            method = method_of(service, name)
            empty = GetMessageClass(method.input_type)()
            expected = await grpc_code(api, method, empty)
            for codec in (JSON, PROTO):
                # The empty request: the same answer as over gRPC, never unimplemented.
                answer = await call(client, method, empty, codec, timeout_ms=1000)
                assert answer.code != "unimplemented", (method.full_name, codec, answer.error)
                if answer.code != "ok":
                    assert answer.reason(), f"{method.full_name}: every error has an ErrorInfo"
                if not method.server_streaming:
                    assert answer.code == expected, (method.full_name, codec, answer.error)
                # A valid request (from the table when the empty one is not): success.
                build = _table(ids, codec).get(method.name)
                if build is None:
                    assert answer.code in ("ok", "deadline_exceeded"), (
                        method.full_name,
                        answer.error,
                    )
                    continue
                answer = await call(client, method, build(), codec, timeout_ms=1000)
                assert answer.code in ("ok", "deadline_exceeded"), (
                    method.full_name,
                    codec,
                    answer.error,
                )
                if not method.server_streaming:
                    assert answer.status == 200 and len(answer.messages) == 1
            covered += 1
    # Every RPC of the services served whole, and exactly the fleet reads of
    # WorkerService.
    whole = [s for s, methods in HTTP_METHODS.items() if methods is None]
    assert HTTP_METHODS["WorkerService"] == {"ListWorkers", "WatchWorkers"}
    assert covered == sum(len(service_descriptor(s).methods) for s in whole) + 2


async def test_errors_carry_the_grpc_codes_and_details(
    web: Harness, client: httpx.AsyncClient
) -> None:
    api = web.stubs()
    get_job = method_of("JobService", "GetJob")
    for request, code, http in [
        (j.GetJobRequest(), "invalid_argument", 400),
        (j.GetJobRequest(job_id="job_nope"), "not_found", 404),
    ]:
        try:
            await api.jobs.GetJob(request)
            raise AssertionError("gRPC accepted it")
        except grpc.aio.AioRpcError as err:
            status = rpc_status.from_call(err)
            assert status is not None
            grpc_details = [(d.type_url, d.value) for d in status.details]
            grpc_message = err.details()
        for codec in (JSON, PROTO):
            answer = await call(client, get_job, request, codec)
            assert (answer.code, answer.status) == (code, http)
            assert answer.error is not None and answer.error["message"] == grpc_message
            assert [(d.type_url, d.value) for d in answer.details()] == grpc_details
    answer = await call(client, get_job, j.GetJobRequest(), JSON)
    assert answer.violations() == ["job_id"]
    # A body that does not parse: INVALID_ARGUMENT with a violation, as over gRPC.
    for body, kind in [(b"{not json", JSON), (b"\xff\xff\xff", PROTO)]:
        response = await client.post(
            "/jobtrace.v1.JobService/GetJob",
            content=body,
            headers={"content-type": f"application/{kind}"},
        )
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "invalid_argument"


async def test_curl_get_job_with_json(web: Harness, client: httpx.AsyncClient) -> None:
    """The README's curl line, as written."""
    api = web.stubs()
    job = await api.jobs.SubmitJob(
        j.SubmitJobRequest(request_id="curl", job=c.JobSpec(service="svc"))
    )
    response = await client.post(
        "/jobtrace.v1.JobService/GetJob",
        content=json.dumps({"job_id": job.job.id}),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 200
    assert response.json()["job"]["id"] == job.job.id


async def test_server_stream_over_http1_with_json_envelopes(
    web: Harness, client: httpx.AsyncClient
) -> None:
    api = web.stubs()
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="watch", job=c.JobSpec(service="svc"))
        )
    ).job
    body = envelope(json.dumps({"jobId": job.id}).encode())
    states = []
    async with client.stream(
        "POST",
        "/jobtrace.v1.JobService/WatchJob",
        content=body,
        headers={"content-type": "application/connect+json"},
    ) as response:
        assert response.http_version == "HTTP/1.1"
        assert response.headers["content-type"] == "application/connect+json"
        buffer = b""
        end = None
        async for chunk in response.aiter_raw():
            buffer += chunk
            while len(buffer) >= 5:
                flags, size = struct.unpack(">BI", buffer[:5])
                if len(buffer) < 5 + size:
                    break
                frame, buffer = buffer[5 : 5 + size], buffer[5 + size :]
                if flags == 2:
                    end = json.loads(frame)
                    continue
                watched = json_format.Parse(frame, j.WatchJobResponse())
                states.append(watched.job.state)
                if len(states) == 1:
                    # Live: the cancel made after the first message arrives next.
                    await api.jobs.CancelJob(j.CancelJobRequest(job_id=job.id, reason="done"))
        assert end is not None and "error" not in end, end
    assert states[0] == c.RUN_STATE_QUEUED
    assert states[-1] == c.RUN_STATE_CANCELLED


async def test_worker_protocol_is_not_served_over_http_its_fleet_reads_are(
    web: Harness, client: httpx.AsyncClient
) -> None:
    api = web.stubs()
    # The listener's own fallback serves the console's page, whose features
    # list only the RPCs served: of WorkerService, the fleet reads.
    assert (await client.get("/")).headers["content-type"].startswith("text/html")
    features = (await client.get("/console/features.json")).json()["services"]
    assert features["jobtrace.v1.WorkerService"] == ["ListWorkers", "WatchWorkers"]
    assert features["jobtrace.v1.JobService"] == [
        m.name for m in service_descriptor("JobService").methods
    ]
    # A worker, connected over gRPC (the only way a worker connects).
    worker = RawWorker(api)
    try:
        await worker.hello("w-http", ["svc.fleet"], max_concurrency=2, labels={"zone": "a"})

        async def listed_over_grpc() -> w.ListWorkersResponse | None:
            found = await api.workers.ListWorkers(w.ListWorkersRequest())
            return found if found.workers else None

        # ListWorkers: JSON and binary, the same answer as over gRPC.
        expected = await wait_for(listed_over_grpc)
        assert [x.worker_id for x in expected.workers] == ["w-http"]
        list_workers = method_of("WorkerService", "ListWorkers")
        for codec in (JSON, PROTO):
            answer = await call(client, list_workers, w.ListWorkersRequest(), codec)
            assert answer.code == "ok", answer.error
            assert answer.messages == [expected]
        # proto JSON names, as the console reads them.
        response = await client.post(
            "/jobtrace.v1.WorkerService/ListWorkers",
            content=b"{}",
            headers={"content-type": "application/json"},
        )
        listed = response.json()["workers"][0]
        assert listed["workerId"] == "w-http" and listed["services"] == ["svc.fleet"]
        assert listed["maxConcurrency"] == 2 and listed["labels"] == {"zone": "a"}
        assert "connectedAt" in listed and "sessionId" in listed
        # A filter that matches nothing: nothing, as over gRPC.
        none = await call(
            client,
            list_workers,
            w.ListWorkersRequest(filter=w.WorkerFilter(service="nope")),
            JSON,
        )
        assert none.code == "ok" and list(none.messages[0].workers) == []  # type: ignore[attr-defined]
    finally:
        await worker.close()

    # Connect and GetStepResult are not routed at all (404, not unimplemented),
    # not even through a fallback (where the console's assets are served).
    async def console(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"console"})

    assert web.server is not None and web.server.http is not None
    web.server.http.app.fallback = console
    assert (await client.get("/")).text == "console"
    for name in ("Connect", "GetStepResult"):
        for kind in ("application/json", "application/proto", "application/connect+json"):
            response = await client.post(
                f"/jobtrace.v1.WorkerService/{name}",
                content=b"{}",
                headers={"content-type": kind},
            )
            assert response.status_code == 404, (name, kind, response.text)
            assert response.text == "not found\n"
    served = {m.name for m in service_descriptor("WorkerService").methods} - {
        "Connect",
        "GetStepResult",
    }
    assert served == {"ListWorkers", "WatchWorkers"}
    response = await client.get("/grpc.health.v1.Health/Check")
    assert response.status_code == 404


async def read_frames(response: httpx.Response) -> AsyncIterator[tuple[int, bytes]]:
    """The envelopes of a streamed Connect response, as they arrive."""
    buffer = b""
    async for chunk in response.aiter_raw():
        buffer += chunk
        while len(buffer) >= 5:
            flags, size = struct.unpack(">BI", buffer[:5])
            if len(buffer) < 5 + size:
                break
            frame, buffer = buffer[5 : 5 + size], buffer[5 + size :]
            yield flags, frame


async def test_watch_workers_streams_over_http1(web: Harness, client: httpx.AsyncClient) -> None:
    api = web.stubs()
    changes: list[tuple[str, str]] = []
    worker: RawWorker | None = None
    try:
        async with client.stream(
            "POST",
            "/jobtrace.v1.WorkerService/WatchWorkers",
            content=envelope(b"{}"),
            headers={"content-type": "application/connect+json", "connect-timeout-ms": "15000"},
        ) as response:
            assert response.status_code == 200
            assert response.http_version == "HTTP/1.1"
            assert response.headers["content-type"] == "application/connect+json"
            async for flags, frame in read_frames(response):
                assert flags == 0, frame
                message = json.loads(frame)
                if "snapshotDone" in message:
                    # Live: a worker connecting now shows up on this stream.
                    assert changes == []
                    worker = RawWorker(api)
                    await worker.hello("w-watch", ["svc.watch"])
                elif "change" in message:
                    change = message["change"]
                    changes.append((change["type"], change["worker"]["workerId"]))
                    assert change["worker"]["services"] == ["svc.watch"]
                    break
    finally:
        if worker is not None:
            await worker.close()
    assert changes == [("WORKER_CHANGE_TYPE_CONNECTED", "w-watch")]


async def test_without_http_listen_there_is_no_http(sqlite_url: str) -> None:
    async with Harness(sqlite_url) as h:
        assert h.server is not None and h.server.http_port is None and h.server.http is None
    async with Harness(sqlite_url, http_listen="") as h:
        assert h.server is not None and h.server.http_port is None


def test_http_listener_beyond_loopback_needs_credentials() -> None:
    no_auth = Authenticator()
    with pytest.raises(OSError, match=r"HTTP.*without authentication"):
        check_exposure(Settings(http_listen="0.0.0.0:8080"), no_auth)
    check_exposure(Settings(http_listen="127.0.0.1:8080"), no_auth)
    tokens = Authenticator({"x": None}, tokens_file=True)  # type: ignore[dict-item]
    with pytest.raises(OSError, match="plaintext HTTP"):
        check_exposure(Settings(http_listen="0.0.0.0:8080", tls_cert="c", tls_key="k"), tokens)
    check_exposure(Settings(http_listen="0.0.0.0:8080", allow_insecure_auth=True), tokens)


# -- CORS and limits --------------------------------------------------------------


async def test_cors_preflights_answer_allowed_origins_only(sqlite_url: str) -> None:
    allowed = "http://console.test:3000"
    async with Harness(sqlite_url, http_listen=HTTP, cors_origins=(allowed,)) as h:
        async with httpx.AsyncClient(base_url=h.http_url, timeout=10) as http:
            path = "/jobtrace.v1.JobService/GetJob"
            preflight = {
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type, authorization",
            }
            ok = await http.options(path, headers={"origin": allowed, **preflight})
            assert ok.status_code == 204
            assert ok.headers["access-control-allow-origin"] == allowed
            assert "authorization" in ok.headers["access-control-allow-headers"]
            refused = await http.options(path, headers={"origin": "http://evil.test", **preflight})
            assert refused.status_code == 403
            assert "access-control-allow-origin" not in refused.headers
            for origin, shared in [(allowed, True), ("http://evil.test", False)]:
                answer = await http.post(
                    path,
                    content=b'{"job_id":"job_x"}',
                    headers={"content-type": "application/json", "origin": origin},
                )
                assert answer.status_code == 404
                assert ("access-control-allow-origin" in answer.headers) is shared
    async with Harness(sqlite_url, http_listen=HTTP) as h:
        async with httpx.AsyncClient(base_url=h.http_url, timeout=10) as http:
            off = await http.options(path, headers={"origin": allowed, **preflight})
            assert off.status_code == 403


async def test_message_size_and_stream_limits_are_the_servers(sqlite_url: str) -> None:
    limit = 64 * 1024
    async with Harness(
        sqlite_url, http_listen=HTTP, max_message_bytes=limit, max_streams_per_caller=1
    ) as h:
        api = h.stubs()
        async with httpx.AsyncClient(base_url=h.http_url, timeout=10) as http:
            big = json.dumps({"job_id": "x" * (limit + 10)}).encode()
            for codec, body in [
                (JSON, big),
                (PROTO, j.GetJobRequest(job_id="x" * (limit + 10)).SerializeToString()),
            ]:
                response = await http.post(
                    "/jobtrace.v1.JobService/GetJob",
                    content=body,
                    headers={"content-type": f"application/{codec}"},
                )
                assert response.status_code == 429
                assert response.json()["code"] == "resource_exhausted"
            job = (
                await api.jobs.SubmitJob(
                    j.SubmitJobRequest(request_id="lim", job=c.JobSpec(service="svc"))
                )
            ).job
            # One stream per caller: an EventSource stream holds the slot, a
            # Connect stream and a gRPC stream are refused the same way.
            async with http.stream("GET", f"/v1/runs/{job.id}/events?follow=true") as sse:
                assert sse.status_code == 200
                await wait_for(
                    lambda: h.server is not None and h.server.streams.open_streams() == 1
                )
                answer = await call(
                    http, method_of("JobService", "WatchJob"), j.WatchJobRequest(job_id=job.id)
                )
                assert answer.code == "resource_exhausted" and answer.reason() == "TOO_MANY_STREAMS"
                denied = await http.get(f"/v1/runs/{job.id}/events")
                assert denied.status_code == 200  # opened, then ended with an error event
                events = [e async for e in sse_events(denied)]
                assert [e["event"] for e in events] == ["error"]
                assert json.loads(events[0]["data"])["code"] == "resource_exhausted"
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    async for _ in api.jobs.WatchJob(j.WatchJobRequest(job_id=job.id)):
                        pass
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

            # The slot is free again once the EventSource client leaves.
            async def freed() -> bool:
                answer = await call(
                    http,
                    method_of("TraceService", "StreamTraceEvents"),
                    t.StreamTraceEventsRequest(run_id=job.id),
                )
                return answer.code == "ok"

            await wait_for(freed)


# -- authentication ---------------------------------------------------------------


def _tokens(path: Path) -> None:
    entries = [
        {
            "sha256": hash_token(f"tok-{role}-{tenant}"),
            "subject": f"{role}-{tenant}",
            "tenant": tenant,
            "roles": [role],
        }
        for role in ("reader", "submitter")
        for tenant in ("acme", "umbrella")
    ]
    path.write_text(yaml.safe_dump({"tokens": entries}))


@pytest.fixture
async def secured(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    tokens = tmp_path / "tokens.yaml"
    _tokens(tokens)
    async with Harness(sqlite_url, http_listen=HTTP, tokens_file=str(tokens)) as h:
        yield h


async def test_bearer_tokens_roles_and_tenancy_as_over_grpc(secured: Harness) -> None:
    submit = method_of("JobService", "SubmitJob")
    get = method_of("JobService", "GetJob")
    request = j.SubmitJobRequest(request_id="auth", job=c.JobSpec(service="svc"))
    async with httpx.AsyncClient(base_url=secured.http_url, timeout=10) as http:
        for codec in (JSON, PROTO):
            missing = await call(http, submit, request, codec)
            assert (missing.code, missing.status, missing.reason()) == (
                "unauthenticated",
                401,
                "TOKEN_MISSING",
            )
            bad = await call(http, submit, request, codec, {"authorization": "Bearer nope"})
            assert (bad.code, bad.reason()) == ("unauthenticated", "TOKEN_INVALID")
            reader = await call(
                http, submit, request, codec, {"authorization": "Bearer tok-reader-acme"}
            )
            assert (reader.code, reader.status, reader.reason()) == (
                "permission_denied",
                403,
                "ROLE_REQUIRED",
            )
        made = await call(
            http, submit, request, JSON, {"authorization": "Bearer tok-submitter-acme"}
        )
        assert made.code == "ok"
        job_id = made.messages[0].job.id  # type: ignore[attr-defined]
        mine = await call(
            http,
            get,
            j.GetJobRequest(job_id=job_id),
            JSON,
            {"authorization": "Bearer tok-reader-acme"},
        )
        assert mine.code == "ok"
        other = await call(
            http,
            get,
            j.GetJobRequest(job_id=job_id),
            JSON,
            {"authorization": "Bearer tok-reader-umbrella"},
        )
        assert other.code == "not_found"
        # EventSource: the token as a query parameter, never logged.
        assert (await http.get(f"/v1/runs/{job_id}/events")).status_code == 401
        assert (
            await http.get(f"/v1/runs/{job_id}/events?access_token=tok-reader-umbrella")
        ).status_code == 404


async def watch_workers_code(http: httpx.AsyncClient, tok: str) -> tuple[str, list[str]]:
    """WatchWorkers over HTTP with a token: its code in the test_security
    MATRIX's spelling ("OK" once the snapshot is done) and the snapshot's
    worker ids."""
    seen: list[str] = []
    async with http.stream(
        "POST",
        "/jobtrace.v1.WorkerService/WatchWorkers",
        content=envelope(b"{}"),
        headers={
            "content-type": "application/connect+json",
            "authorization": f"Bearer {tok}",
            "connect-timeout-ms": "15000",
        },
    ) as response:
        assert response.status_code == 200
        async for flags, frame in read_frames(response):
            message = json.loads(frame)
            if flags == 2:
                return message["error"]["code"].upper(), seen
            if "snapshotDone" in message:
                return "OK", seen
            if "change" in message:
                seen.append(message["change"]["worker"]["workerId"])
    raise AssertionError("the stream ended without an end-of-stream message")


async def test_fleet_reads_follow_the_grpc_roles_and_tenancy(
    sqlite_url: str, tmp_path: Path
) -> None:
    """ListWorkers and WatchWorkers over HTTP answer each role and tenant as
    test_security's MATRIX says gRPC does, with the same workers."""
    tokens = tmp_path / "tokens.yaml"
    write_tokens(tokens)
    async with Harness(sqlite_url, http_listen=HTTP, tokens_file=str(tokens)) as h:
        api = h.stubs()
        worker = RawWorker(api, metadata=(("authorization", f"Bearer {token('worker', 'acme')}"),))
        try:
            await worker.hello("w-acme", ["svc.auth"])
            admin = (("authorization", f"Bearer {token('admin', 'acme')}"),)

            async def registered() -> bool:
                found = await api.workers.ListWorkers(w.ListWorkersRequest(), metadata=admin)
                return bool(found.workers)

            await wait_for(registered)
            callers = [(role, tenant) for tenant in ("acme", "umbrella") for role in ROLES]
            list_workers = method_of("WorkerService", "ListWorkers")
            async with httpx.AsyncClient(base_url=h.http_url, timeout=20) as http:
                missing = await call(http, list_workers, w.ListWorkersRequest())
                assert (missing.code, missing.reason()) == ("unauthenticated", "TOKEN_MISSING")
                for (role, tenant), lists, watches in zip(
                    callers, MATRIX["ListWorkers"], MATRIX["WatchWorkers"], strict=True
                ):
                    tok = token(role, tenant)
                    md = (("authorization", f"Bearer {tok}"),)
                    try:
                        over_grpc = await api.workers.ListWorkers(
                            w.ListWorkersRequest(), metadata=md
                        )
                        grpc_ids = [x.worker_id for x in over_grpc.workers]
                    except grpc.aio.AioRpcError as err:
                        assert err.code().name == lists, (role, tenant)
                        grpc_ids = []
                    for codec in (JSON, PROTO):
                        answer = await call(
                            http,
                            list_workers,
                            w.ListWorkersRequest(),
                            codec,
                            {"authorization": f"Bearer {tok}"},
                        )
                        assert answer.code.upper() == lists, (role, tenant, codec, answer.error)
                        if lists == "OK":
                            ids = [x.worker_id for x in answer.messages[0].workers]  # type: ignore[attr-defined]
                            assert ids == grpc_ids, (role, tenant, codec)
                    code, ids = await watch_workers_code(http, tok)
                    assert code == watches, (role, tenant)
                    if watches == "OK":
                        assert ids == grpc_ids, (role, tenant)
        finally:
            await worker.close()


async def test_event_source_query_token_works_and_is_never_logged(
    secured: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "tok-reader-acme"
    api = secured.stubs()
    job = await api.jobs.SubmitJob(
        j.SubmitJobRequest(request_id="tok", job=c.JobSpec(service="svc")),
        metadata=(("authorization", "Bearer tok-submitter-acme"),),
    )
    await api.trace.AppendTraceEvents(
        t.AppendTraceEventsRequest(
            run_id=job.job.id, events=[c.TraceEvent(event_key="k", message="m-k")]
        ),
        metadata=(("authorization", "Bearer tok-submitter-acme"),),
    )
    async with httpx.AsyncClient(base_url=secured.http_url, timeout=10) as http:
        response = await http.get(f"/v1/runs/{job.job.id}/events?access_token={secret}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "event: " in response.text
        refused = await http.get(f"/v1/runs/{job.job.id}/events?access_token={secret}x")
        assert refused.status_code == 401
    server_side = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in server_side)
    assert secret not in logged
    for record in server_side:
        assert "access_token" not in f"{record.getMessage()} {record.__dict__}", record.name


# -- EventSource --------------------------------------------------------------------


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """The events of a text/event-stream, each as its fields ("comment" for a comment)."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if fields:
                yield fields
            fields = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
    if fields:
        yield fields


async def append(api: Stubs, run_id: str, *keys: str) -> None:
    await api.trace.AppendTraceEvents(
        t.AppendTraceEventsRequest(
            run_id=run_id, events=[c.TraceEvent(event_key=k, message=f"m-{k}") for k in keys]
        )
    )


def messages(events: list[dict[str, str]]) -> list[str]:
    """The messages of the events the test appended (m-...), in order."""
    found = [json.loads(e["data"]).get("message", "") for e in events if e.get("event") == "log"]
    return [m for m in found if m.startswith("m-")]


async def test_event_source_replays_follows_resumes_and_ends_with_status(db_url: str) -> None:
    async with Harness(db_url, http_listen=HTTP) as h:
        api = h.stubs()
        run = (
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="sse", job=c.JobSpec(service="svc"))
            )
        ).job.id
        await append(api, run, "a", "b")
        url = f"/v1/runs/{run}/events?follow=true"
        seen: list[dict[str, str]] = []
        async with httpx.AsyncClient(base_url=h.http_url, timeout=10) as http:
            # Replay, then follow; the client drops the connection after "c".
            async with http.stream("GET", url) as response:
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
                async with asyncio.timeout(10):
                    async for event in sse_events(response):
                        if "comment" in event:
                            continue
                        seen.append(event)
                        if messages(seen) == ["m-a", "m-b"]:
                            await append(api, run, "c")  # live, after the replay
                        if messages(seen)[-1:] == ["m-c"]:
                            break
            assert messages(seen) == ["m-a", "m-b", "m-c"]
            first = json.loads(seen[0]["data"])
            assert seen[0]["event"] == "started" or "runId" in first
            assert all(e["id"] for e in seen)
            last_id = seen[-1]["id"]
            # Missed while disconnected, then resumed exactly after "c".
            await append(api, run, "d", "e")
            resumed: list[dict[str, str]] = []
            cancelled = False
            async with http.stream("GET", url, headers={"Last-Event-ID": last_id}) as response:
                async with asyncio.timeout(10):
                    async for event in sse_events(response):
                        if "comment" in event:
                            continue
                        resumed.append(event)
                        if messages(resumed) == ["m-d", "m-e"] and not cancelled:
                            cancelled = True
                            await api.jobs.CancelJob(j.CancelJobRequest(job_id=run, reason="end"))
                # The run ended: a final status event, and the server closed the stream.
            assert messages(resumed) == ["m-d", "m-e"]
            assert resumed[-1]["event"] == "status"
            assert json.loads(resumed[-1]["data"])["state"] == "RUN_STATE_CANCELLED"
            # An EventSource reconnecting after the end is told to stop (204).
            assert resumed[-1]["id"].endswith(".end")
            again = await http.get(url, headers={"Last-Event-ID": resumed[-1]["id"]})
            assert again.status_code == 204
            # The same resume point as a query parameter, without follow: the rest and the end.
            query = await http.get(f"/v1/runs/{run}/events?last_event_id={last_id}")
            tail = [e async for e in sse_events(query) if "comment" not in e]
            assert messages(tail) == ["m-d", "m-e"]
            # Filters: only errors and above (none of these are).
            quiet = await http.get(f"/v1/runs/{run}/events?min_level=error&category=business")
            assert quiet.status_code == 200 and messages([e async for e in sse_events(quiet)]) == []
            bad = await http.get(f"/v1/runs/{run}/events?min_level=loud")
            assert bad.status_code == 400 and bad.json()["code"] == "invalid_argument"


async def test_event_source_keepalive_and_resume_after_the_server_drops(sqlite_url: str) -> None:
    async with Harness(
        sqlite_url, http_listen=HTTP, keepalive_seconds=0.1, http_max_stream_seconds=0.5
    ) as h:
        api = h.stubs()
        run = (
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="drop", job=c.JobSpec(service="svc"))
            )
        ).job.id
        await append(api, run, "a")
        url = f"/v1/runs/{run}/events?follow=true"
        async with httpx.AsyncClient(base_url=h.http_url, timeout=10) as http:
            got: list[dict[str, str]] = []
            keepalives = 0
            # The server ends the stream (its longest duration); the client
            # saw the keepalive comments of an idle run, then the end.
            async with http.stream("GET", url) as response:
                async with asyncio.timeout(10):
                    async for event in sse_events(response):
                        if event.get("comment") == "keepalive":
                            keepalives += 1
                        elif "comment" not in event:
                            got.append(event)
            assert keepalives >= 1
            assert messages(got) == ["m-a"]
            await append(api, run, "b")
            resumed: list[dict[str, str]] = []
            async with http.stream(
                "GET", url, headers={"Last-Event-ID": got[-1]["id"]}
            ) as response:
                async with asyncio.timeout(10):
                    async for event in sse_events(response):
                        if "comment" not in event:
                            resumed.append(event)
                            if messages(resumed) == ["m-b"]:
                                break
            assert messages(resumed) == ["m-b"]


async def test_compressed_requests_are_bounded_by_the_message_limit(sqlite_url: str) -> None:
    import gzip

    limit = 64 * 1024
    async with Harness(sqlite_url, http_listen=HTTP, max_message_bytes=limit) as h:
        async with httpx.AsyncClient(base_url=h.http_url, timeout=10) as http:
            path = "/jobtrace.v1.JobService/GetJob"
            small = gzip.compress(b'{"job_id":"job_x"}')
            headers = {"content-type": "application/json", "content-encoding": "gzip"}
            answer = await http.post(path, content=small, headers=headers)
            assert (answer.status_code, answer.json()["code"]) == (404, "not_found")
            # 1 MiB that compresses to about 1 KiB: refused (inflating stops at the limit).
            bomb = gzip.compress(b'{"job_id":"' + b"x" * (1024 * 1024) + b'"}')
            assert len(bomb) < limit
            answer = await http.post(path, content=bomb, headers=headers)
            assert (answer.status_code, answer.json()["code"]) == (429, "resource_exhausted")


async def test_stopping_the_server_ends_http_streams(sqlite_url: str) -> None:
    h = Harness(sqlite_url, http_listen=HTTP)
    await h.start()
    try:
        api = h.stubs()
        run = (
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="stop", job=c.JobSpec(service="svc"))
            )
        ).job.id
        async with httpx.AsyncClient(base_url=h.http_url, timeout=30) as http:

            async def sse() -> int:
                async with http.stream("GET", f"/v1/runs/{run}/events?follow=true") as response:
                    return len([e async for e in sse_events(response)])

            async def watch() -> Answer:
                return await call(
                    http, method_of("JobService", "WatchJob"), j.WatchJobRequest(job_id=run)
                )

            streams = [asyncio.create_task(sse()), asyncio.create_task(watch())]
            assert h.server is not None
            server = h.server
            await wait_for(lambda: server.streams.open_streams() == 2)
            await h.stop(grace=1.0)
            async with asyncio.timeout(10):
                await asyncio.gather(*streams, return_exceptions=True)
    finally:
        await h.stop()
