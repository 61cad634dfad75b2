"""Authentication, roles, tenancy, TLS, exposure and limits, against a real server."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import yaml
from google.protobuf import duration_pb2, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobtrace.auth import hash_token
from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import schedule_service_pb2 as s
from jobtrace.pb import schedule_service_pb2 as sc
from jobtrace.pb import schedule_service_pb2_grpc as s_grpc
from jobtrace.pb import schedule_service_pb2_grpc as sc_grpc
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, stubs_for, wait_for
from .procs import jobtrace
from .workers import RawWorker

SECRET = "test-secret-of-at-least-32-bytes-long!!"
ISSUER = "https://issuer.test"
ROLES = ("reader", "submitter", "worker", "admin")


def token(role: str, tenant: str) -> str:
    return f"tok-{role}-{tenant}"


def bearer(tok: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {tok}"),)


def write_tokens(path: Path) -> None:
    entries = [
        {
            "sha256": hash_token(token(role, tenant)),
            "subject": f"{role}-{tenant}",
            "tenant": tenant,
            "roles": [role],
        }
        for role in ROLES
        for tenant in ("acme", "umbrella")
    ]
    entries.append(
        {
            "sha256": hash_token("tok-resize-only"),
            "subject": "resizer",
            "tenant": "acme",
            "roles": ["worker"],
            "services": ["resize"],
        }
    )
    path.write_text(yaml.safe_dump({"tokens": entries}))


@pytest.fixture
async def secured(db_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    tokens = tmp_path / "tokens.yaml"
    write_tokens(tokens)
    h = Harness(db_url, tokens_file=str(tokens), jwt_secret=SECRET, jwt_issuer=ISSUER)
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


def make_jwt(**overrides: Any) -> str:
    claims = {
        "sub": "jwt-user",
        "tenant": "acme",
        "roles": ["submitter"],
        "iss": ISSUER,
        "aud": "jobtrace",
        "exp": int(time.time()) + 300,
    }
    claims.update(overrides)
    key = claims.pop("_key", SECRET)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm="HS256")


async def refusal_of_tokens_file(db_url: str, tmp_path: Path, text: str) -> str:
    """Why a server with a tokens file holding `text` refuses to start."""
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(text)
    with pytest.raises(OSError, match="cannot load tokens") as caught:
        await Harness(db_url, tokens_file=str(tokens)).start()
    return str(caught.value)


async def code_of(call: Any) -> str:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code().name
    return "OK"


async def test_bad_tokens_are_unauthenticated_and_missing_role_is_denied(secured: Harness) -> None:
    api = secured.stubs()
    get = lambda md: api.jobs.ListJobs(j.ListJobsRequest(), metadata=md)  # noqa: E731
    assert await code_of(get(None)) == "UNAUTHENTICATED"
    assert await code_of(get((("authorization", "Basic xyz"),))) == "UNAUTHENTICATED"
    assert await code_of(get(bearer("no-such-token"))) == "UNAUTHENTICATED"
    assert await code_of(get(bearer(make_jwt()))) == "OK"
    assert await code_of(get(bearer(make_jwt(exp=int(time.time()) - 10)))) == "UNAUTHENTICATED"
    assert await code_of(get(bearer(make_jwt(_key="another-secret-of-32-bytes-or-more!!")))) == (
        "UNAUTHENTICATED"
    )
    assert await code_of(get(bearer(make_jwt(aud="someone-else")))) == "UNAUTHENTICATED"
    assert await code_of(get(bearer(make_jwt(iss="https://evil.test")))) == "UNAUTHENTICATED"
    assert await code_of(get(bearer(make_jwt(exp=None)))) == "UNAUTHENTICATED"
    assert await code_of(get(bearer(make_jwt(tenant=None)))) == "UNAUTHENTICATED"
    reader_jwt = make_jwt(roles=["reader"])
    submit = api.jobs.SubmitJob(
        j.SubmitJobRequest(request_id="r", job=c.JobSpec(service="s")), metadata=bearer(reader_jwt)
    )
    assert await code_of(submit) == "PERMISSION_DENIED"
    # Health and reflection stay open for probes.
    health = health_pb2_grpc.HealthStub(api.channel)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == (
        health_pb2.HealthCheckResponse.SERVING
    )


async def test_rs256_tokens(db_url: str, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "jwt.pub").write_bytes(public_pem)
    h = Harness(
        db_url,
        jwt_algorithm="RS256",
        jwt_public_key_file=str(tmp_path / "jwt.pub"),
        jwt_issuer=ISSUER,
    )
    await h.start()
    try:
        api = h.stubs()
        claims = {
            "sub": "s",
            "tenant": "acme",
            "roles": "reader",
            "iss": ISSUER,
            "aud": "jobtrace",
            "exp": int(time.time()) + 60,
        }
        good = jwt.encode(claims, private, algorithm="RS256")
        assert await code_of(api.jobs.ListJobs(j.ListJobsRequest(), metadata=bearer(good))) == "OK"
        forged = jwt.encode(claims, SECRET, algorithm="HS256")  # algorithm confusion
        assert await code_of(api.jobs.ListJobs(j.ListJobsRequest(), metadata=bearer(forged))) == (
            "UNAUTHENTICATED"
        )
    finally:
        await h.stop()


# --- the authorization matrix ---------------------------------------------------------

OK, PD, NF, UA = "OK", "PERMISSION_DENIED", "NOT_FOUND", "UNAUTHENTICATED"
DE = "DEADLINE_EXCEEDED"

# rpc -> expected status per caller: (reader, submitter, worker, admin) of the resource's
# own tenant, then the same four roles from another tenant. Lists of another tenant
# answer OK with nothing in them (checked separately).
MATRIX: dict[str, tuple[str, ...]] = {
    "SubmitJob": (PD, OK, PD, OK, PD, OK, PD, OK),
    "SubmitWorkflow": (PD, OK, PD, OK, PD, OK, PD, OK),
    # SubmitJob's and SubmitWorkflow's role, in the caller's own tenant.
    "SubmitJobs": (PD, OK, PD, OK, PD, OK, PD, OK),
    "SubmitWorkflows": (PD, OK, PD, OK, PD, OK, PD, OK),
    "GetJob": (OK, OK, PD, OK, NF, NF, PD, OK),
    "GetWorkflow": (OK, OK, PD, OK, NF, NF, PD, OK),
    "ListJobs": (OK, OK, PD, OK, OK, OK, PD, OK),
    "ListWorkflows": (OK, OK, PD, OK, OK, OK, PD, OK),
    "CancelJob": (PD, OK, PD, OK, PD, NF, PD, OK),
    "CancelWorkflow": (PD, OK, PD, OK, PD, NF, PD, OK),
    # Who may cancel may terminate.
    "TerminateJob": (PD, OK, PD, OK, PD, NF, PD, OK),
    "TerminateWorkflow": (PD, OK, PD, OK, PD, NF, PD, OK),
    # CancelJob's role, over the caller's own tenant (an admin's: every tenant).
    "CancelRuns": (PD, OK, PD, OK, PD, OK, PD, OK),
    # RerunJob's role, over the caller's own tenant (an admin's: every tenant).
    "RerunRuns": (PD, OK, PD, OK, PD, OK, PD, OK),
    "WatchJob": (OK, OK, PD, OK, NF, NF, PD, OK),
    "WatchWorkflow": (OK, OK, PD, OK, NF, NF, PD, OK),
    # The job has ended (answered at once); the workflow runs (the wait ends).
    "AwaitJob": (OK, OK, PD, OK, NF, NF, PD, OK),
    "AwaitWorkflow": (DE, DE, PD, DE, NF, NF, PD, DE),
    # A summary of the caller's own tenant (another tenant's: nothing in it).
    "SummarizeFailures": (OK, OK, PD, OK, OK, OK, PD, OK),
    # A feed of the caller's own tenant (an admin's: every tenant).
    "WatchRuns": (OK, OK, PD, OK, OK, OK, PD, OK),
    # A new run of an ended one, in the run's tenant (an admin's: any).
    "RerunWorkflow": (PD, OK, PD, OK, PD, NF, PD, OK),
    "RerunJob": (PD, OK, PD, OK, PD, NF, PD, OK),
    # As CancelWorkflow (a fresh workflow each; resume: one paused by an admin).
    "PauseWorkflow": (PD, OK, PD, OK, PD, NF, PD, OK),
    "ResumeWorkflow": (PD, OK, PD, OK, PD, NF, PD, OK),
    # Admins only; an admin of another tenant may name the tenant (resume
    # names acme; a pause, its own tenant's queue).
    "PauseQueue": (PD, PD, PD, OK, PD, PD, PD, OK),
    "ResumeQueue": (PD, PD, PD, OK, PD, PD, PD, OK),
    "ListQueues": (OK, OK, PD, OK, OK, OK, PD, OK),
    # Rate limits belong to the caller's tenant: admins write them (another
    # tenant's admin creates its own, and finds no "rl" to change); readers
    # read them.
    "CreateRateLimit": (PD, PD, PD, OK, PD, PD, PD, OK),
    "GetRateLimit": (OK, OK, PD, OK, NF, NF, PD, NF),
    "ListRateLimits": (OK, OK, PD, OK, OK, OK, PD, OK),
    "UpdateRateLimit": (PD, PD, PD, OK, PD, PD, PD, NF),
    "DeleteRateLimit": (PD, PD, PD, OK, PD, PD, PD, NF),
    "Connect": (PD, PD, OK, OK, PD, PD, OK, OK),
    # The job has ended: its own worker (m) is told so; anyone else, nothing.
    "GetStepResult": (PD, PD, "FAILED_PRECONDITION", PD, PD, PD, NF, PD),
    # The fleet: readers see the workers that may serve their tenant.
    "ListWorkers": (OK, OK, PD, OK, OK, OK, PD, OK),
    "WatchWorkers": (OK, OK, PD, OK, OK, OK, PD, OK),
    "AppendTraceEvents": (PD, OK, PD, OK, PD, NF, PD, OK),
    "ListTraceEvents": (OK, OK, PD, OK, NF, NF, PD, OK),
    "StreamTraceEvents": (OK, OK, PD, OK, NF, NF, PD, OK),
    "GetRunStatus": (OK, OK, PD, OK, NF, NF, PD, OK),
    "GetRunSummary": (OK, OK, PD, OK, NF, NF, PD, OK),
    # Of one run: another tenant's run is not found (across runs, nothing of it).
    "SearchTraceEvents": (OK, OK, PD, OK, NF, NF, PD, OK),
    "GetAttestation": (OK, OK, PD, OK, NF, NF, PD, OK),
    "ListAttestations": (OK, OK, PD, OK, OK, OK, PD, OK),
    "VerifyAttestation": (OK, OK, PD, OK, NF, NF, PD, OK),
    "GetSigningKeys": (OK, OK, PD, OK, OK, OK, PD, OK),
    "AttachAnnotations": (PD, OK, PD, OK, PD, NF, PD, OK),
    "ListAnnotations": (OK, OK, PD, OK, NF, NF, PD, OK),
    # Reviewers only (an admin is one): a fresh gate open to any reviewer.
    "ApproveStep": (PD, PD, PD, OK, PD, PD, PD, OK),
    "ListPendingApprovals": (PD, PD, PD, OK, PD, PD, PD, OK),
    # Schedules live in one tenant (their ids are per tenant): another
    # tenant's caller, an admin too, does not find them.
    "CreateSchedule": (PD, OK, PD, OK, PD, OK, PD, OK),
    "GetSchedule": (OK, OK, PD, OK, NF, NF, PD, NF),
    "ListSchedules": (OK, OK, PD, OK, OK, OK, PD, OK),
    "UpdateSchedule": (PD, OK, PD, OK, PD, NF, PD, NF),
    "DeleteSchedule": (PD, OK, PD, OK, PD, NF, PD, NF),
    "PauseSchedule": (PD, OK, PD, OK, PD, NF, PD, NF),
    "ResumeSchedule": (PD, OK, PD, OK, PD, NF, PD, NF),
    "TriggerSchedule": (PD, OK, PD, OK, PD, NF, PD, NF),
}


def schedule_of(sid: str) -> s.Schedule:
    return s.Schedule(id=sid, cron="0 3 * * *", job=j.SubmitJobRequest(job=c.JobSpec(service="zz")))


async def _fixture_data(h: Harness) -> dict[str, str]:
    """A finished job with an attestation, and a workflow, in tenant acme."""
    api = h.stubs()
    md = bearer(token("submitter", "acme"))
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="m1", job=c.JobSpec(service="svc")), metadata=md
        )
    ).job
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="m2",
                name="w",
                steps=[c.WorkflowStepSpec(name="a", job=c.JobSpec(service="x"))],
            ),
            metadata=md,
        )
    ).workflow
    worker = api.workers.Connect(metadata=bearer(token("worker", "acme")))
    await worker.write(w.ConnectRequest(hello=w.WorkerHello(worker_id="m", services=["svc"])))
    assert (await worker.read()).WhichOneof("kind") == "welcome"
    assignment = (await worker.read()).assignment
    assert assignment.job.id == job.id
    await worker.write(w.ConnectRequest(complete=w.CompleteReport(job_id=job.id, attempt=1)))
    assert (await worker.read()).WhichOneof("kind") == "ack"
    worker.cancel()
    await s_grpc.ScheduleServiceStub(api.channel).CreateSchedule(
        s.CreateScheduleRequest(schedule=schedule_of("s1")), metadata=md
    )
    await sc_grpc.ScheduleServiceStub(api.channel).CreateRateLimit(
        sc.CreateRateLimitRequest(
            rate_limit=sc.RateLimit(key="rl", count=5, period=duration_pb2.Duration(seconds=1))
        ),
        metadata=bearer(token("admin", "acme")),
    )
    return {"job": job.id, "wf": wf.id, "key": f"worker-completion:{job.id}"}


def _calls(api: Stubs, ids: dict[str, str], n: int) -> dict[str, Callable[[Any], Any]]:
    async def stream_first(call: Any) -> None:
        async for _ in call:
            break

    async def feed_first(md: Any) -> None:
        call = api.jobs.WatchRuns(j.WatchRunsRequest(include_active=True), metadata=md)
        try:
            async for message in call:
                if message.WhichOneof("kind") == "snapshot_end":
                    break
        finally:
            call.cancel()

    async def connect(md: Any) -> None:
        call = api.workers.Connect(metadata=md)
        await call.write(w.ConnectRequest(hello=w.WorkerHello(worker_id=f"x{n}", services=["z"])))
        message = await call.read()
        call.cancel()
        if message is grpc.aio.EOF:
            await call  # raises the status
        assert message.WhichOneof("kind") == "welcome"

    async def fresh_job_cancel(md: Any) -> None:
        admin = bearer(token("admin", "acme"))
        job = (
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id=f"c{n}", job=c.JobSpec(service="zz")), metadata=admin
            )
        ).job
        await api.jobs.CancelJob(j.CancelJobRequest(job_id=job.id), metadata=md)

    async def fresh_wf_cancel(md: Any) -> None:
        admin = bearer(token("admin", "acme"))
        wf = (
            await api.jobs.SubmitWorkflow(
                j.SubmitWorkflowRequest(
                    request_id=f"cw{n}",
                    name="w",
                    steps=[c.WorkflowStepSpec(name="a", job=c.JobSpec(service="zz"))],
                ),
                metadata=admin,
            )
        ).workflow
        await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=wf.id), metadata=md)

    async def fresh_job_terminate(md: Any) -> None:
        admin = bearer(token("admin", "acme"))
        job = (
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id=f"t{n}", job=c.JobSpec(service="zz")), metadata=admin
            )
        ).job
        await api.jobs.TerminateJob(j.TerminateJobRequest(job_id=job.id), metadata=md)

    schedules = s_grpc.ScheduleServiceStub(api.channel)

    async def fresh_schedule_delete(md: Any) -> None:
        admin = bearer(token("admin", "acme"))
        await schedules.CreateSchedule(
            s.CreateScheduleRequest(schedule=schedule_of(f"d{n}")), metadata=admin
        )
        await schedules.DeleteSchedule(s.DeleteScheduleRequest(schedule_id=f"d{n}"), metadata=md)

    async def fresh_wf_terminate(md: Any) -> None:
        admin = bearer(token("admin", "acme"))
        wf = (
            await api.jobs.SubmitWorkflow(
                j.SubmitWorkflowRequest(
                    request_id=f"tw{n}",
                    name="w",
                    steps=[c.WorkflowStepSpec(name="a", job=c.JobSpec(service="zz"))],
                ),
                metadata=admin,
            )
        ).workflow
        await api.jobs.TerminateWorkflow(j.TerminateWorkflowRequest(workflow_id=wf.id), metadata=md)

    async def ended_wf_rerun(md: Any) -> None:
        admin = bearer(token("admin", "acme"))
        wf = (
            await api.jobs.SubmitWorkflow(
                j.SubmitWorkflowRequest(
                    request_id=f"rw{n}",
                    name="w",
                    steps=[c.WorkflowStepSpec(name="a", job=c.JobSpec(service="zz"))],
                ),
                metadata=admin,
            )
        ).workflow
        await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=wf.id), metadata=admin)
        await api.jobs.RerunWorkflow(
            j.RerunWorkflowRequest(workflow_id=wf.id, request_id=f"rr{n}"), metadata=md
        )

    async def fresh_gate_approve(md: Any) -> None:
        admin = bearer(token("admin", "acme"))
        wf = (
            await api.jobs.SubmitWorkflow(
                j.SubmitWorkflowRequest(
                    request_id=f"ag{n}",
                    name="w",
                    steps=[
                        c.WorkflowStepSpec(
                            name="gate", approval=c.ApprovalGate(approvers=["role:reviewer"])
                        )
                    ],
                ),
                metadata=admin,
            )
        ).workflow
        await api.jobs.ApproveStep(
            j.ApproveStepRequest(
                workflow_id=wf.id, step="gate", disposition=c.APPROVAL_DISPOSITION_APPROVED
            ),
            metadata=md,
        )

    async def fresh_wf(md: Any, *, paused: bool) -> None:
        admin = bearer(token("admin", "acme"))
        wf = (
            await api.jobs.SubmitWorkflow(
                j.SubmitWorkflowRequest(
                    request_id=f"pw{n}",
                    name="w",
                    steps=[c.WorkflowStepSpec(name="a", job=c.JobSpec(service="zz"))],
                ),
                metadata=admin,
            )
        ).workflow
        if paused:
            await api.jobs.PauseWorkflow(j.PauseWorkflowRequest(workflow_id=wf.id), metadata=admin)
            await api.jobs.ResumeWorkflow(j.ResumeWorkflowRequest(workflow_id=wf.id), metadata=md)
        else:
            await api.jobs.PauseWorkflow(j.PauseWorkflowRequest(workflow_id=wf.id), metadata=md)

    async def paused_queue_resume(md: Any) -> None:
        admin = bearer(token("admin", "acme"))
        await api.jobs.PauseQueue(j.PauseQueueRequest(service=f"q{n}"), metadata=admin)
        await api.jobs.ResumeQueue(
            j.ResumeQueueRequest(service=f"q{n}", tenant="acme"), metadata=md
        )

    attrs = {"decision.outcome": struct_pb2.Value(string_value="ok")}
    limits = sc_grpc.ScheduleServiceStub(api.channel)

    def limit(key: str) -> sc.RateLimit:
        return sc.RateLimit(key=key, count=5, period=duration_pb2.Duration(seconds=1))

    async def fresh_limit_delete(md: Any) -> None:
        admin = bearer(token("admin", "acme"))
        await limits.CreateRateLimit(
            sc.CreateRateLimitRequest(rate_limit=limit(f"d{n}")), metadata=admin
        )
        await limits.DeleteRateLimit(sc.DeleteRateLimitRequest(key=f"d{n}"), metadata=md)

    return {
        "CreateRateLimit": lambda md: limits.CreateRateLimit(
            sc.CreateRateLimitRequest(rate_limit=limit(f"c{n}")), metadata=md
        ),
        "GetRateLimit": lambda md: limits.GetRateLimit(
            sc.GetRateLimitRequest(key="rl"), metadata=md
        ),
        "ListRateLimits": lambda md: limits.ListRateLimits(sc.ListRateLimitsRequest(), metadata=md),
        "UpdateRateLimit": lambda md: limits.UpdateRateLimit(
            sc.UpdateRateLimitRequest(rate_limit=limit("rl")), metadata=md
        ),
        "DeleteRateLimit": fresh_limit_delete,
        "PauseWorkflow": lambda md: fresh_wf(md, paused=False),
        "ResumeWorkflow": lambda md: fresh_wf(md, paused=True),
        "PauseQueue": lambda md: api.jobs.PauseQueue(
            j.PauseQueueRequest(service=f"q{n}", reason="r"), metadata=md
        ),
        "ResumeQueue": paused_queue_resume,
        "ListQueues": lambda md: api.jobs.ListQueues(j.ListQueuesRequest(), metadata=md),
        "RerunWorkflow": ended_wf_rerun,
        "RerunJob": lambda md: api.jobs.RerunJob(
            j.RerunJobRequest(job_id=ids["job"], request_id=f"rj{n}"), metadata=md
        ),
        "SubmitJob": lambda md: api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id=f"s{n}", job=c.JobSpec(service="zz")), metadata=md
        ),
        "SubmitWorkflow": lambda md: api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id=f"sw{n}",
                name="w",
                steps=[c.WorkflowStepSpec(name="a", job=c.JobSpec(service="zz"))],
            ),
            metadata=md,
        ),
        "SubmitJobs": lambda md: api.jobs.SubmitJobs(
            j.SubmitJobsRequest(
                items=[
                    j.SubmitJobRequest(request_id=f"sj{n}-{i}", job=c.JobSpec(service="zz"))
                    for i in range(2)
                ]
            ),
            metadata=md,
        ),
        "SubmitWorkflows": lambda md: api.jobs.SubmitWorkflows(
            j.SubmitWorkflowsRequest(
                items=[
                    j.SubmitWorkflowRequest(
                        request_id=f"sws{n}",
                        name="w",
                        steps=[c.WorkflowStepSpec(name="a", job=c.JobSpec(service="zz"))],
                    )
                ]
            ),
            metadata=md,
        ),
        "GetJob": lambda md: api.jobs.GetJob(j.GetJobRequest(job_id=ids["job"]), metadata=md),
        "GetWorkflow": lambda md: api.jobs.GetWorkflow(
            j.GetWorkflowRequest(workflow_id=ids["wf"]), metadata=md
        ),
        "ListJobs": lambda md: api.jobs.ListJobs(j.ListJobsRequest(), metadata=md),
        "ListWorkflows": lambda md: api.jobs.ListWorkflows(j.ListWorkflowsRequest(), metadata=md),
        "CancelJob": fresh_job_cancel,
        "CancelWorkflow": fresh_wf_cancel,
        "TerminateJob": fresh_job_terminate,
        "TerminateWorkflow": fresh_wf_terminate,
        "CancelRuns": lambda md: api.jobs.CancelRuns(
            j.CancelRunsRequest(filter=j.BulkRunFilter(service=f"zz-bulk{n}")), metadata=md
        ),
        "RerunRuns": lambda md: api.jobs.RerunRuns(
            j.RerunRunsRequest(filter=j.BulkRunFilter(service=f"zz-rerun{n}")), metadata=md
        ),
        "WatchRuns": feed_first,
        "WatchJob": lambda md: stream_first(
            api.jobs.WatchJob(j.WatchJobRequest(job_id=ids["job"]), metadata=md)
        ),
        "WatchWorkflow": lambda md: stream_first(
            api.jobs.WatchWorkflow(j.WatchWorkflowRequest(workflow_id=ids["wf"]), metadata=md)
        ),
        "AwaitJob": lambda md: api.jobs.AwaitJob(j.AwaitJobRequest(job_id=ids["job"]), metadata=md),
        "AwaitWorkflow": lambda md: api.jobs.AwaitWorkflow(
            j.AwaitWorkflowRequest(workflow_id=ids["wf"], timeout={"nanos": 50_000_000}),
            metadata=md,
        ),
        "SummarizeFailures": lambda md: api.jobs.SummarizeFailures(
            j.SummarizeFailuresRequest(since={"seconds": 1}), metadata=md
        ),
        "Connect": connect,
        "GetStepResult": lambda md: api.workers.GetStepResult(
            w.GetStepResultRequest(job_id=ids["job"], attempt=1, worker_id="m", step_name="a"),
            metadata=md,
        ),
        "ListWorkers": lambda md: api.workers.ListWorkers(w.ListWorkersRequest(), metadata=md),
        "WatchWorkers": lambda md: stream_first(
            api.workers.WatchWorkers(w.WatchWorkersRequest(), metadata=md)
        ),
        "AppendTraceEvents": lambda md: api.trace.AppendTraceEvents(
            # The workflow: still running (the job has ended, and takes no events).
            t.AppendTraceEventsRequest(run_id=ids["wf"], events=[c.TraceEvent(event_key=f"e{n}")]),
            metadata=md,
        ),
        "ListTraceEvents": lambda md: api.trace.ListTraceEvents(
            t.ListTraceEventsRequest(run_id=ids["job"]), metadata=md
        ),
        "StreamTraceEvents": lambda md: stream_first(
            api.trace.StreamTraceEvents(t.StreamTraceEventsRequest(run_id=ids["job"]), metadata=md)
        ),
        "GetRunStatus": lambda md: api.trace.GetRunStatus(
            t.GetRunStatusRequest(run_id=ids["job"]), metadata=md
        ),
        "GetRunSummary": lambda md: api.trace.GetRunSummary(
            t.GetRunSummaryRequest(run_id=ids["job"]), metadata=md
        ),
        "SearchTraceEvents": lambda md: api.trace.SearchTraceEvents(
            t.SearchTraceEventsRequest(query="started", run_id=ids["job"]), metadata=md
        ),
        "GetAttestation": lambda md: api.attest.GetAttestation(
            a.GetAttestationRequest(key=ids["key"]), metadata=md
        ),
        "ListAttestations": lambda md: api.attest.ListAttestations(
            a.ListAttestationsRequest(), metadata=md
        ),
        "VerifyAttestation": lambda md: api.attest.VerifyAttestation(
            a.VerifyAttestationRequest(key=ids["key"]), metadata=md
        ),
        "GetSigningKeys": lambda md: api.attest.GetSigningKeys(
            a.GetSigningKeysRequest(), metadata=md
        ),
        "AttachAnnotations": lambda md: api.attest.AttachAnnotations(
            a.AttachAnnotationsRequest(
                run_id=ids["job"], actor=c.Actor(kind=c.ACTOR_KIND_USER, id="u"), attributes=attrs
            ),
            metadata=md,
        ),
        "ListAnnotations": lambda md: api.attest.ListAnnotations(
            a.ListAnnotationsRequest(run_id=ids["job"]), metadata=md
        ),
        "ApproveStep": fresh_gate_approve,
        "ListPendingApprovals": lambda md: api.jobs.ListPendingApprovals(
            j.ListPendingApprovalsRequest(), metadata=md
        ),
        "CreateSchedule": lambda md: schedules.CreateSchedule(
            s.CreateScheduleRequest(schedule=schedule_of(f"c{n}")), metadata=md
        ),
        "GetSchedule": lambda md: schedules.GetSchedule(
            s.GetScheduleRequest(schedule_id="s1"), metadata=md
        ),
        "ListSchedules": lambda md: schedules.ListSchedules(s.ListSchedulesRequest(), metadata=md),
        "UpdateSchedule": lambda md: schedules.UpdateSchedule(
            s.UpdateScheduleRequest(schedule=schedule_of("s1")), metadata=md
        ),
        "DeleteSchedule": fresh_schedule_delete,
        "PauseSchedule": lambda md: schedules.PauseSchedule(
            s.PauseScheduleRequest(schedule_id="s1"), metadata=md
        ),
        "ResumeSchedule": lambda md: schedules.ResumeSchedule(
            s.ResumeScheduleRequest(schedule_id="s1"), metadata=md
        ),
        "TriggerSchedule": lambda md: schedules.TriggerSchedule(
            s.TriggerScheduleRequest(schedule_id="s1"), metadata=md
        ),
    }


async def test_authorization_matrix(secured: Harness) -> None:
    ids = await _fixture_data(secured)
    api = secured.stubs()
    all_rpcs = {
        m.name
        for module in (j, w, t, a, s)
        for svc in module.DESCRIPTOR.services_by_name.values()
        for m in svc.methods
    }
    assert set(MATRIX) == all_rpcs, "every RPC is in the table"
    callers = [(role, "acme") for role in ROLES] + [(role, "umbrella") for role in ROLES]
    mismatches = []
    n = 0
    for rpc, expected in MATRIX.items():
        calls = _calls(api, ids, n)
        for (role, tenant), want in zip(callers, expected, strict=True):
            n += 1
            calls = _calls(api, ids, n)
            got = await code_of(calls[rpc](bearer(token(role, tenant))))
            if got != want:
                mismatches.append((rpc, role, tenant, want, got))
        got = await code_of(_calls(api, ids, n + 1000)[rpc](None))
        if got != UA:
            mismatches.append((rpc, "none", "-", UA, got))
    assert not mismatches, "\n".join(map(str, mismatches))


async def test_lists_never_cross_tenants(secured: Harness) -> None:
    await _fixture_data(secured)
    api = secured.stubs()
    other = bearer(token("admin", "umbrella"))
    umbrella_reader = bearer(token("reader", "umbrella"))
    assert (await api.jobs.ListJobs(j.ListJobsRequest(), metadata=umbrella_reader)).jobs == []
    assert (
        await api.jobs.ListWorkflows(j.ListWorkflowsRequest(), metadata=umbrella_reader)
    ).workflows == []
    assert (
        await api.attest.ListAttestations(a.ListAttestationsRequest(), metadata=umbrella_reader)
    ).attestations == []
    assert len((await api.jobs.ListJobs(j.ListJobsRequest(), metadata=other)).jobs) == 2
    schedules = s_grpc.ScheduleServiceStub(api.channel)
    for caller in (umbrella_reader, other):
        listed = await schedules.ListSchedules(s.ListSchedulesRequest(), metadata=caller)
        assert list(listed.schedules) == []


async def test_run_summaries_by_workflow_name_stay_in_the_callers_tenant(
    secured: Harness,
) -> None:
    ids = await _fixture_data(secured)
    api = secured.stubs()

    async def newest(role: str, tenant: str) -> str:
        response = await api.trace.GetRunSummary(
            t.GetRunSummaryRequest(workflow_name="w"), metadata=bearer(token(role, tenant))
        )
        return str(response.summary.run_id)

    assert await newest("reader", "acme") == ids["wf"]
    for role in ("reader", "admin"):  # an admin of another tenant names its own runs
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await newest(role, "umbrella")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    theirs = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="u-w",
                name="w",
                steps=[c.WorkflowStepSpec(name="a", job=c.JobSpec(service="x"))],
            ),
            metadata=bearer(token("submitter", "umbrella")),
        )
    ).workflow
    assert await newest("reader", "umbrella") == theirs.id
    assert await newest("reader", "acme") == ids["wf"], "acme's newest is still its own"


async def test_worker_tokens_are_limited_to_their_services_and_tenants(secured: Harness) -> None:
    api = secured.stubs()
    call = api.workers.Connect(metadata=bearer("tok-resize-only"))
    await call.write(w.ConnectRequest(hello=w.WorkerHello(worker_id="r", services=["encode"])))
    error = (await call.read()).error
    assert error.fatal and error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "may not serve 'encode'" in error.message
    call.cancel()
    # A worker of acme never receives umbrella's jobs.
    await api.jobs.SubmitJob(
        j.SubmitJobRequest(request_id="u", job=c.JobSpec(service="resize")),
        metadata=bearer(token("submitter", "umbrella")),
    )
    acme_job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="a", job=c.JobSpec(service="resize")),
            metadata=bearer(token("submitter", "acme")),
        )
    ).job
    worker = api.workers.Connect(metadata=bearer("tok-resize-only"))
    await worker.write(
        w.ConnectRequest(hello=w.WorkerHello(worker_id="r", services=["resize"], max_concurrency=5))
    )
    assert (await worker.read()).WhichOneof("kind") == "welcome"
    first = await asyncio.wait_for(worker.read(), 5)
    assert first.assignment.job.id == acme_job.id
    assert first.assignment.job.worker_id == "resizer/r", "worker ids are scoped to the caller"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(worker.read(), 0.5)
    worker.cancel()


@pytest.fixture
async def pools(db_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    """Worker credentials whose names collide: subject `pool` in two tenants, and
    subjects `team` and `team/x` in one."""
    entries = [
        ("pool-acme", "pool", "acme", "worker"),
        ("pool-globex", "pool", "globex", "worker"),
        ("team", "team", "acme", "worker"),
        ("team-x", "team/x", "acme", "worker"),
        ("billing-acme", "billing", "acme", "submitter"),
    ]
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {
                "tokens": [
                    {"sha256": hash_token(tok), "subject": sub, "tenant": ten, "roles": [role]}
                    for tok, sub, ten, role in entries
                ]
            }
        )
    )
    async with Harness(db_url, tokens_file=str(tokens)) as h:
        yield h


@pytest.mark.parametrize(
    ("owner_token", "owner_id", "other_token", "other_id"),
    [
        ("pool-acme", "p1", "pool-globex", "p1"),  # the same subject in another tenant
        ("team", "x/w1", "team-x", "w1"),  # subject + "/" + id spelled the same
    ],
    ids=["tenant", "subject"],
)
async def test_a_worker_cannot_take_over_or_watch_another_callers_session(
    pools: Harness, owner_token: str, owner_id: str, other_token: str, other_id: str
) -> None:
    api = pools.stubs()
    acme = bearer("billing-acme")
    owner = RawWorker(api, bearer(owner_token))
    await owner.hello(owner_id, ["svc"])
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="j4", job=c.JobSpec(service="svc")), metadata=acme
        )
    ).job
    assert (await owner.expect("assignment")).job.id == job.id
    # Another caller says hello with the same worker id, claiming the job.
    other = RawWorker(api, bearer(other_token))
    welcome = await other.hello(
        other_id,
        ["svc"],
        running=[
            w.JobAttempt(job_id=job.id, attempt=1),
            w.JobAttempt(job_id="job_doesnotexist", attempt=1),
        ],
    )
    assert not welcome.resumed, "nothing of the owner's is resumed"
    revoked = [(r.job_id, r.attempt) for r in welcome.revoked]
    assert revoked == [(job.id, 1), ("job_doesnotexist", 1)], "answered as for an unknown job"
    # The owner's session was not replaced: it still holds the lease.
    mid = await owner.send(progress=w.ProgressReport(job_id=job.id, attempt=1, percent=10))
    assert (await owner.expect("ack")).message_id == mid
    held = (await api.jobs.GetJob(j.GetJobRequest(job_id=job.id), metadata=acme)).job
    assert held.state == c.RUN_STATE_RUNNING and held.attempt == 1
    assert held.progress.percent == 10
    # The owner's cancel notice, reason included, reaches the owner alone.
    await api.jobs.CancelJob(
        j.CancelJobRequest(job_id=job.id, reason="acme's private reason"), metadata=acme
    )
    cancel = await owner.expect("cancel")
    assert (cancel.job_id, cancel.attempt) == (job.id, 1)
    # A notice to the other session would have been queued before the owner's:
    # the other stream's next message is the answer to its heartbeat.
    mid = await other.send(
        heartbeat=w.WorkerHeartbeat(running=[w.JobAttempt(job_id=job.id, attempt=1)])
    )
    reply = await other.recv()
    assert reply.WhichOneof("kind") == "heartbeat_ack", reply
    assert reply.heartbeat_ack.message_id == mid and not reply.heartbeat_ack.cancels
    await owner.close()
    await other.close()


async def test_tokens_file_names_given_as_a_string_are_one_name(
    sqlite_url: str, tmp_path: Path
) -> None:
    """`services: resize` is the service "resize", not the letters r, e, s, i, z."""
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        "tokens:\n"
        f"  - sha256: {hash_token('tok-one')}\n"
        "    subject: resizer\n"
        "    tenant: acme\n"
        "    roles: worker\n"
        "    services: resize\n"
        "    tenants: acme\n"
        f"  - sha256: {hash_token('tok-submit')}\n"
        "    subject: api\n"
        "    tenant: acme\n"
        "    roles: submitter\n"
    )
    h = Harness(sqlite_url, tokens_file=str(tokens))
    await h.start()
    try:
        api = h.stubs()
        job = (
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="r", job=c.JobSpec(service="resize")),
                metadata=bearer("tok-submit"),
            )
        ).job
        for services, welcomed in ((["r"], False), (["resize"], True)):
            call = api.workers.Connect(metadata=bearer("tok-one"))
            await call.write(
                w.ConnectRequest(hello=w.WorkerHello(worker_id="r", services=services))
            )
            reply = await call.read()
            assert (reply.WhichOneof("kind") == "welcome") is welcomed, (services, reply)
            if welcomed:  # `tenants: acme` is the tenant acme: its job is served
                assignment = (await asyncio.wait_for(call.read(), 5)).assignment
                assert assignment.job.id == job.id
            call.cancel()
    finally:
        await h.stop()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("5", "tokens[0].services: must be a name or a list of names, got 5"),
        ("'resize encode'", "tokens[0].services: 'resize encode' is not one name"),
        ("[resize, 7]", "tokens[0].services: must be a name or a list of names"),
    ],
)
async def test_tokens_file_with_a_malformed_service_list_refuses_to_load(
    sqlite_url: str, tmp_path: Path, value: str, problem: str
) -> None:
    text = (
        "tokens:\n"
        f"  - sha256: {hash_token('tok-one')}\n"
        "    subject: resizer\n"
        "    tenant: acme\n"
        "    roles: [worker]\n"
        f"    services: {value}\n"
    )
    assert problem in await refusal_of_tokens_file(sqlite_url, tmp_path, text)


async def test_no_auth_refuses_non_loopback_listen(sqlite_url: str) -> None:
    db_url = sqlite_url
    h = Harness(db_url)
    with pytest.raises(OSError, match=r"refusing to listen on 0\.0\.0\.0:0 without authentication"):
        await h.start(listen="0.0.0.0:0")
    code, _, err = await jobtrace(
        "serve", "--listen", "0.0.0.0:0", "--db", db_url.split("///", 1)[1], timeout=30
    )
    assert code == 1 and "refusing to listen" in err and "Traceback" not in err


def _make_ca_and_cert(tmp: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test-ca"))
        .issuer_name(name("test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": tmp / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, san in (("server", "localhost"), ("client", "worker-1")):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(san))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(2 if who == "server" else 3)
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        out[f"{who}_cert"] = tmp / f"{who}.pem"
        out[f"{who}_key"] = tmp / f"{who}.key"
        out[f"{who}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{who}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return out


async def test_tls_with_client_certificates(db_url: str, tmp_path: Path) -> None:
    files = _make_ca_and_cert(tmp_path)
    h = Harness(
        db_url,
        tls_cert=str(files["server_cert"]),
        tls_key=str(files["server_key"]),
        tls_client_ca=str(files["ca"]),
    )
    await h.start()
    try:
        target = f"localhost:{h.server.port}"  # type: ignore[union-attr]
        ca = files["ca"].read_bytes()
        good = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=files["client_key"].read_bytes(),
            certificate_chain=files["client_cert"].read_bytes(),
        )
        async with grpc.aio.secure_channel(target, good) as channel:
            jobs = stubs_for(channel).jobs
            assert (await jobs.ListJobs(j.ListJobsRequest())).jobs == []
        no_cert = grpc.ssl_channel_credentials(root_certificates=ca)
        async with grpc.aio.secure_channel(target, no_cert) as channel:
            assert (
                await code_of(stubs_for(channel).jobs.ListJobs(j.ListJobsRequest(), timeout=5))
                == "UNAVAILABLE"
            )
        async with grpc.aio.insecure_channel(target) as channel:
            assert (
                await code_of(stubs_for(channel).jobs.ListJobs(j.ListJobsRequest(), timeout=5))
                == "UNAVAILABLE"
            )
    finally:
        await h.stop()


async def test_stream_limit_per_caller(db_url: str) -> None:
    h = Harness(db_url, max_streams_per_caller=2)
    await h.start()
    try:
        api = h.stubs()
        job = (
            await api.jobs.SubmitJob(j.SubmitJobRequest(request_id="r", job=c.JobSpec(service="s")))
        ).job
        watches = [api.jobs.WatchJob(j.WatchJobRequest(job_id=job.id)) for _ in range(2)]
        for watch in watches:
            await watch.read()
        third = api.jobs.WatchJob(j.WatchJobRequest(job_id=job.id))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await third.read()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        watches[0].cancel()
        assert h.server is not None
        await wait_for(lambda: h.server.streams.open_streams() == 1)  # type: ignore[union-attr]
        again = api.jobs.WatchJob(j.WatchJobRequest(job_id=job.id))
        assert (await again.read()).job.id == job.id
    finally:
        await h.stop()


async def test_queued_job_quota_per_tenant(db_url: str) -> None:
    h = Harness(db_url, max_queued_per_tenant=5)
    await h.start()
    try:
        api = h.stubs()
        for i in range(5):
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id=f"q{i}", job=c.JobSpec(service="s"))
            )
        code = await code_of(
            api.jobs.SubmitJob(j.SubmitJobRequest(request_id="q5", job=c.JobSpec(service="s")))
        )
        assert code == "RESOURCE_EXHAUSTED"
        assert len((await api.jobs.ListJobs(j.ListJobsRequest())).jobs) == 5
        first = (await api.jobs.ListJobs(j.ListJobsRequest(page_size=1))).jobs[0]
        await api.jobs.CancelJob(j.CancelJobRequest(job_id=first.id))
        # Idempotent retries of accepted submissions are never refused.
        again = await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="q1", job=c.JobSpec(service="s"))
        )
        assert again.deduplicated
        ok = await code_of(
            api.jobs.SubmitJob(j.SubmitJobRequest(request_id="q6", job=c.JobSpec(service="s")))
        )
        assert ok == "OK"
    finally:
        await h.stop()
