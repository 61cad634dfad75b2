"""Terminate (a run ends TERMINATED now, its worker told, its late reports
refused), workflow deadlines (TIMED_OUT), a step's timeout failing its
workflow, and the walk of every (state, action) pair of cancel and terminate
through the real server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from jobtrace.domain import states
from jobtrace.domain.states import Action, RunKind
from jobtrace.model import RunState
from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, error_details, expect_error, wait_for
from .workers import RawWorker

S = RunState
FP = grpc.StatusCode.FAILED_PRECONDITION


# --- helpers ----------------------------------------------------------------------


async def submit_job(api: Stubs, rid: str, service: str = "svc", **spec: Any) -> c.Job:
    request = j.SubmitJobRequest(request_id=rid, job=c.JobSpec(service=service, **spec))
    return (await api.jobs.SubmitJob(request)).job


async def submit_workflow(
    api: Stubs, rid: str, *steps: c.WorkflowStepSpec, **fields: Any
) -> c.Workflow:
    request = j.SubmitWorkflowRequest(request_id=rid, name="wf", steps=steps, **fields)
    return (await api.jobs.SubmitWorkflow(request)).workflow


def step(name: str, service: str = "svc", **fields: Any) -> c.WorkflowStepSpec:
    spec = fields.pop("spec", {})
    return c.WorkflowStepSpec(name=name, job=c.JobSpec(service=service, **spec), **fields)


async def get_job(api: Stubs, job_id: str) -> c.Job:
    return (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id))).job


async def get_workflow(api: Stubs, workflow_id: str) -> c.Workflow:
    return (await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=workflow_id))).workflow


async def job_in(api: Stubs, job_id: str, state: int, timeout: float = 10) -> c.Job:
    async def check() -> c.Job | None:
        job = await get_job(api, job_id)
        return job if job.state == state else None

    found: c.Job = await wait_for(check, timeout=timeout)
    return found


async def workflow_in(api: Stubs, workflow_id: str, state: int, timeout: float = 10) -> c.Workflow:
    async def check() -> c.Workflow | None:
        wf = await get_workflow(api, workflow_id)
        return wf if wf.state == state else None

    found: c.Workflow = await wait_for(check, timeout=timeout)
    return found


async def assigned(raw: RawWorker, job_id: str) -> w.Assignment:
    """The assignment of this job (others read meanwhile are kept for later)."""
    got: list[w.Assignment] = []
    try:
        while True:
            assignment = await raw.expect("assignment", timeout=10)
            if assignment.job.id == job_id:
                return assignment
            got.append(assignment)
    finally:
        for other in got:
            raw._stash.append(w.ConnectResponse(assignment=other))


async def cancel_notice(raw: RawWorker, job_id: str) -> w.CancelNotice:
    kept: list[w.CancelNotice] = []
    try:
        while True:
            notice = await raw.expect("cancel", timeout=10)
            if notice.job_id == job_id:
                return notice
            kept.append(notice)
    finally:
        for other in kept:
            raw._stash.append(w.ConnectResponse(cancel=other))


async def report(raw: RawWorker, **kind: Any) -> w.StreamError | None:
    """Send a report; None when acknowledged, the StreamError when refused."""
    mid = await raw.send(**kind)
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        for i, message in enumerate(raw._stash):
            which = message.WhichOneof("kind")
            if which in ("ack", "error") and getattr(message, which).message_id == mid:
                del raw._stash[i]
                return message.error if which == "error" else None
        left = deadline - asyncio.get_running_loop().time()
        assert left > 0, f"no answer to message {mid}"
        raw._stash.append(await raw.recv(left))


async def attestations(api: Stubs, **filters: Any) -> list[a.Attestation]:
    request = a.ListAttestationsRequest(page_size=1000, view=a.ATTESTATION_VIEW_FULL, **filters)
    return list((await api.attest.ListAttestations(request)).attestations)


async def verified(api: Stubs, key: str) -> a.Attestation:
    verdict = await api.attest.VerifyAttestation(a.VerifyAttestationRequest(key=key))
    assert verdict.valid and verdict.signature_valid, verdict
    return (await api.attest.GetAttestation(a.GetAttestationRequest(key=key))).attestation


async def events(api: Stubs, run_id: str) -> list[c.TraceEvent]:
    request = t.ListTraceEventsRequest(run_id=run_id, page_size=1000)
    return list((await api.trace.ListTraceEvents(request)).events)


# --- terminate ----------------------------------------------------------------------


async def test_terminate_a_running_step_tells_its_worker_and_refuses_its_late_report(
    harness: Harness,
) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=4)
    wf = await submit_workflow(api, "wf", step("render"), step("publish", depends_on=["render"]))
    render = wf.steps[0].job_id
    assignment = await assigned(raw, render)
    await job_in(api, render, c.RUN_STATE_RUNNING)

    ended = (
        await api.jobs.TerminateWorkflow(
            j.TerminateWorkflowRequest(workflow_id=wf.id, reason="stuck renderer")
        )
    ).workflow
    assert ended.state == c.RUN_STATE_TERMINATED
    assert [s.state for s in ended.steps] == [c.RUN_STATE_TERMINATED] * 2
    assert ended.failure.code == "TERMINATED" and ended.failure.reason == "stuck renderer"
    # The worker is told on its stream, without being waited for.
    notice = await cancel_notice(raw, render)
    assert notice.attempt == assignment.attempt
    # Its completion afterwards is refused and changes nothing.
    refused = await report(
        raw, complete=w.CompleteReport(job_id=render, attempt=assignment.attempt)
    )
    assert refused is not None and refused.code == FP.value[0], refused
    assert refused.reason == "JOB_TERMINAL"
    assert (await get_job(api, render)).state == c.RUN_STATE_TERMINATED
    assert (await get_workflow(api, wf.id)).state == c.RUN_STATE_TERMINATED
    # Evidence: the operator's event and a verified termination attestation.
    run_events = await events(api, wf.id)
    (event,) = [
        e for e in run_events if e.node_id == "workflow" and e.type == c.TRACE_EVENT_TYPE_LOG
    ]
    assert event.message == "Run terminated by operator" and event.level == c.LEVEL_WARN
    (attested,) = [
        x for x in await attestations(api, workflow_id=wf.id) if x.entity_type == "workflow"
    ]
    assert attested.type == a.ATTESTATION_TYPE_WORKFLOW_TERMINATION
    assert attested.key == f"workflow-termination:{wf.id}"
    assert attested.state == c.RUN_STATE_TERMINATED
    await verified(api, attested.key)
    await raw.close()


async def test_terminate_a_running_job_ends_it_now_and_attests_it(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    job = await submit_job(api, "one")
    assignment = await assigned(raw, job.id)
    ended = (
        await api.jobs.TerminateJob(j.TerminateJobRequest(job_id=job.id, reason="runaway"))
    ).job
    assert ended.state == c.RUN_STATE_TERMINATED
    assert (ended.failure.code, ended.failure.reason) == ("TERMINATED", "runaway")
    await cancel_notice(raw, job.id)
    refused = await report(
        raw,
        fail=w.FailReport(
            job_id=job.id, attempt=assignment.attempt, error=c.ErrorDetail(message="late")
        ),
    )
    assert refused is not None and refused.reason == "JOB_TERMINAL"
    assert (await get_job(api, job.id)).state == c.RUN_STATE_TERMINATED
    (attested,) = await attestations(api, job_id=job.id)
    assert attested.type == a.ATTESTATION_TYPE_WORKER_TERMINATION
    assert attested.key == f"worker-termination:{job.id}"
    await verified(api, attested.key)
    # The type filters as any other.
    listed = await attestations(api, type=a.ATTESTATION_TYPE_WORKER_TERMINATION)
    assert [x.key for x in listed] == [attested.key]
    await raw.close()


async def test_terminate_one_step_terminates_its_workflow(harness: Harness) -> None:
    api = harness.stubs()
    wf = await submit_workflow(
        api, "one-step", step("a", "nobody"), step("b", "nobody", independent=True)
    )
    a_step, b_step = (s.job_id for s in wf.steps)
    ended = (await api.jobs.TerminateJob(j.TerminateJobRequest(job_id=a_step, reason="bad"))).job
    assert ended.state == c.RUN_STATE_TERMINATED
    after = await get_workflow(api, wf.id)
    assert after.state == c.RUN_STATE_TERMINATED
    assert after.failure.code == "TERMINATED" and "step 'a' terminated" in after.failure.reason
    assert (await get_job(api, b_step)).state == c.RUN_STATE_TERMINATED
    kinds = [(x.entity_type, x.type) for x in await attestations(api, workflow_id=wf.id)]
    assert kinds == [("workflow", a.ATTESTATION_TYPE_WORKFLOW_TERMINATION)]


async def test_terminate_refuses_bad_input_and_ended_runs_changing_nothing(
    harness: Harness,
) -> None:
    api = harness.stubs()
    for call in (
        api.jobs.TerminateJob(j.TerminateJobRequest(job_id="job_nope")),
        api.jobs.TerminateWorkflow(j.TerminateWorkflowRequest(workflow_id="wf_nope")),
    ):
        await expect_error(call, grpc.StatusCode.NOT_FOUND)
    job = await submit_job(api, "q", service="nobody")
    _, _, violations = await expect_error(
        api.jobs.TerminateJob(j.TerminateJobRequest(job_id=job.id, reason="x" * 1001)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [f for f, _ in violations] == ["reason"]
    await expect_error(
        api.jobs.TerminateJob(j.TerminateJobRequest(job_id="")), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (await get_job(api, job.id)).state == c.RUN_STATE_QUEUED
    await api.jobs.TerminateJob(j.TerminateJobRequest(job_id=job.id))
    err, info, _ = await expect_error(
        api.jobs.TerminateJob(j.TerminateJobRequest(job_id=job.id)), FP
    )
    assert info is not None and info.metadata["state"] == "TERMINATED"
    assert "TERMINATED" in (err.details() or "")
    assert len(await attestations(api, job_id=job.id)) == 1


# --- workflow deadlines -------------------------------------------------------------


async def test_workflow_past_its_deadline_times_out_its_steps_cancelled(
    harness: Harness,
) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    wf = await submit_workflow(
        api,
        "late",
        step("block"),
        step("after", depends_on=["block"]),
        timeout=duration_pb2.Duration(seconds=1),
    )
    assert wf.timeout.seconds == 1 and wf.timeout.nanos == 0
    assert wf.deadline.ToMicroseconds() == wf.created_at.ToMicroseconds() + 1_000_000
    block = wf.steps[0].job_id
    await assigned(raw, block)  # and never reports: the run blocks
    ended = await workflow_in(api, wf.id, c.RUN_STATE_TIMED_OUT)
    assert ended.failure.code == "TIMED_OUT"
    assert ended.completed_at.ToMicroseconds() >= ended.deadline.ToMicroseconds()
    assert [s.state for s in ended.steps] == [c.RUN_STATE_CANCELLED] * 2
    await cancel_notice(raw, block)  # the running step's worker is told
    failed = [e for e in await events(api, wf.id) if e.type == c.TRACE_EVENT_TYPE_FAILED]
    (event,) = [e for e in failed if e.node_id == "workflow"]
    assert "deadline" in event.message and event.error.code == "TIMED_OUT"
    assert ended.deadline.ToJsonString()[:19] in event.message
    (attested,) = [
        x for x in await attestations(api, workflow_id=wf.id) if x.entity_type == "workflow"
    ]
    assert attested.type == a.ATTESTATION_TYPE_WORKFLOW_FAILURE
    assert attested.state == c.RUN_STATE_TIMED_OUT
    await verified(api, attested.key)
    # Its worker's late completion is refused.
    refused = await report(raw, complete=w.CompleteReport(job_id=block, attempt=1))
    assert refused is not None and refused.reason == "JOB_TERMINAL"
    await raw.close()


async def test_workflow_deadline_bounds_are_checked_and_nothing_is_stored(
    harness: Harness,
) -> None:
    api = harness.stubs()
    week_ms = 7 * 24 * 3600 * 1000
    for bad in (
        duration_pb2.Duration(seconds=-1),
        duration_pb2.Duration(),  # set, but not positive
        duration_pb2.Duration(seconds=week_ms // 1000 + 1),
    ):
        _, _, violations = await expect_error(
            api.jobs.SubmitWorkflow(
                j.SubmitWorkflowRequest(request_id="b", name="wf", steps=[step("a")], timeout=bad)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert violations == [("timeout", "must be positive and at most 7 days")]
    listed = await api.jobs.ListWorkflows(j.ListWorkflowsRequest())
    assert list(listed.workflows) == []
    # The longest allowed, and none at all.
    longest = await submit_workflow(
        api, "week", step("a", "nobody"), timeout=duration_pb2.Duration(seconds=week_ms // 1000)
    )
    assert longest.timeout.seconds == week_ms // 1000
    plain = await submit_workflow(api, "plain", step("a", "nobody"))
    assert not plain.HasField("timeout") and not plain.HasField("deadline")


async def test_a_step_that_times_out_fails_its_workflow_naming_it(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    wf = await submit_workflow(
        api,
        "slow",
        step("render", spec={"timeout": duration_pb2.Duration(nanos=1_000_000)}),
        step("publish", depends_on=["render"]),
    )
    render = wf.steps[0].job_id
    await assigned(raw, render)
    ended = await workflow_in(api, wf.id, c.RUN_STATE_FAILED)
    assert ended.failure.code == "TIMED_OUT"
    assert ended.failure.reason.startswith("step 'render' timed out"), ended.failure.reason
    assert [s.state for s in ended.steps] == [c.RUN_STATE_TIMED_OUT, c.RUN_STATE_CANCELLED]
    (attested,) = [
        x for x in await attestations(api, workflow_id=wf.id) if x.entity_type == "workflow"
    ]
    assert attested.type == a.ATTESTATION_TYPE_WORKFLOW_FAILURE
    await verified(api, attested.key)
    await raw.close()


# --- every (state, action) pair -----------------------------------------------------

_RPC = {
    (RunKind.JOB, Action.CANCEL): lambda api, i: api.jobs.CancelJob(j.CancelJobRequest(job_id=i)),
    (RunKind.JOB, Action.TERMINATE): lambda api, i: api.jobs.TerminateJob(
        j.TerminateJobRequest(job_id=i)
    ),
    (RunKind.WORKFLOW, Action.CANCEL): lambda api, i: api.jobs.CancelWorkflow(
        j.CancelWorkflowRequest(workflow_id=i)
    ),
    (RunKind.WORKFLOW, Action.TERMINATE): lambda api, i: api.jobs.TerminateWorkflow(
        j.TerminateWorkflowRequest(workflow_id=i)
    ),
}


class Runs:
    """Puts fresh runs in a given state through the API and a raw worker."""

    def __init__(self, api: Stubs, raw: RawWorker) -> None:
        self.api = api
        self.raw = raw
        self.n = 0

    def rid(self) -> str:
        self.n += 1
        return f"r{self.n}"

    async def job(self, state: RunState) -> str:
        api = self.api
        if state == S.PENDING:
            wf = await submit_workflow(
                api, self.rid(), step("a", "nobody"), step("b", "nobody", depends_on=["a"])
            )
            return wf.steps[1].job_id
        if state in (S.QUEUED, S.CANCELLED, S.TERMINATED):
            job = await submit_job(api, self.rid(), service="nobody")
            if state == S.CANCELLED:
                await api.jobs.CancelJob(j.CancelJobRequest(job_id=job.id))
            elif state == S.TERMINATED:
                await api.jobs.TerminateJob(j.TerminateJobRequest(job_id=job.id))
            return job.id
        spec: dict[str, Any] = {}
        if state == S.TIMED_OUT:
            spec["timeout"] = duration_pb2.Duration(nanos=1_000_000)
        job = await submit_job(api, self.rid(), **spec)
        await self._drive(job.id, state)
        return job.id

    async def _drive(self, job_id: str, state: RunState) -> None:
        attempt = (await assigned(self.raw, job_id)).attempt
        if state == S.COMPLETED:
            assert (
                await report(self.raw, complete=w.CompleteReport(job_id=job_id, attempt=attempt))
                is None
            )
        elif state == S.FAILED:
            failure = w.FailReport(
                job_id=job_id, attempt=attempt, error=c.ErrorDetail(message="no"), retryable=False
            )
            assert await report(self.raw, fail=failure) is None
        await job_in(self.api, job_id, int(state))

    async def workflow(self, state: RunState) -> str:
        api = self.api
        if state in (S.QUEUED, S.CANCELLED, S.TERMINATED, S.TIMED_OUT):
            extra: dict[str, Any] = {}
            if state == S.TIMED_OUT:
                extra["timeout"] = duration_pb2.Duration(nanos=1_000_000)
            wf = await submit_workflow(api, self.rid(), step("a", "nobody"), **extra)
            if state == S.CANCELLED:
                await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=wf.id))
            elif state == S.TERMINATED:
                await api.jobs.TerminateWorkflow(j.TerminateWorkflowRequest(workflow_id=wf.id))
            await workflow_in(api, wf.id, int(state))
            return wf.id
        wf = await submit_workflow(api, self.rid(), step("a"))
        await self._drive(wf.steps[0].job_id, S.RUNNING if state == S.RUNNING else state)
        await workflow_in(api, wf.id, int(state))
        return wf.id


# The states the real server can put each kind of run in today (PAUSED and
# WAITING_FOR_HUMAN come with their own actions).
REACHABLE = {
    RunKind.JOB: [S.PENDING, S.QUEUED, S.RUNNING, *sorted(s for s in S if s.terminal)],
    RunKind.WORKFLOW: [S.QUEUED, S.RUNNING, *sorted(s for s in S if s.terminal)],
}


async def test_every_state_and_action_pair_is_allowed_or_refused_as_the_table_says(
    harness: Harness,
) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=100)
    runs = Runs(api, raw)
    actions = [Action.CANCEL, Action.TERMINATE]
    assert all(action in states.ACTION_TARGETS for action in actions)
    checked = 0
    for kind, reachable in REACHABLE.items():
        for state in reachable:
            for action in actions:
                assert (kind, action) in states.ACTIONS
                run_id = await (runs.job(state) if kind is RunKind.JOB else runs.workflow(state))
                call = _RPC[(kind, action)](api, run_id)
                what = f"{kind.value} {state.name} {action.value}"
                if states.can(kind, state, action):
                    response = await call
                    run = response.job if kind is RunKind.JOB else response.workflow
                    assert run.state == states.ACTION_TARGETS[action], what
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await call
                    err = caught.value
                    assert err.code() == FP, (what, err.code(), err.details())
                    info, _ = error_details(err)
                    assert info is not None and info.metadata["state"] == state.name, what
                    assert state.name in (err.details() or ""), what
                    now = await (
                        get_job(api, run_id) if kind is RunKind.JOB else get_workflow(api, run_id)
                    )
                    assert now.state == state, f"{what}: a refusal changed nothing"
                checked += 1
    assert checked == 2 * (len(REACHABLE[RunKind.JOB]) + len(REACHABLE[RunKind.WORKFLOW]))
    await raw.close()


# --- the race -------------------------------------------------------------------------

ROUNDS = 20
# The refusals a loser of the race may get.
REFUSED = {"JOB_TERMINAL", "STALE_ATTEMPT", "DUPLICATE_REPORT"}


async def _operator(call: Any, state: RunState) -> RunState | None:
    """An operator's cancel or terminate: the state it left, None if refused."""
    try:
        await call
    except grpc.aio.AioRpcError as err:
        assert err.code() == FP, err
        info, _ = error_details(err)
        assert info is not None and info.reason in REFUSED, info
        return None
    return state


async def _worker_completes(raw: RawWorker, job_id: str, attempt: int) -> RunState | None:
    error = await report(raw, complete=w.CompleteReport(job_id=job_id, attempt=attempt))
    if error is None:
        return S.COMPLETED
    assert error.code == FP.value[0] and error.reason in REFUSED, error
    return None


async def test_cancel_terminate_and_completion_race_one_wins(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=4)
    winners: dict[str, int] = {}
    for n in range(ROUNDS):
        job = await submit_job(api, f"race{n}")
        attempt = (await assigned(raw, job.id)).attempt
        results = await asyncio.gather(
            _operator(api.jobs.CancelJob(j.CancelJobRequest(job_id=job.id)), S.CANCELLED),
            _operator(api.jobs.TerminateJob(j.TerminateJobRequest(job_id=job.id)), S.TERMINATED),
            _worker_completes(raw, job.id, attempt),
        )
        won = [r for r in results if r is not None]
        assert len(won) == 1, (n, results)
        final = await get_job(api, job.id)
        assert final.state == won[0], (n, won, final.state)
        terminal = await attestations(api, job_id=job.id)
        assert len(terminal) == 1, [x.key for x in terminal]
        expected_type = {
            S.COMPLETED: a.ATTESTATION_TYPE_WORKER_COMPLETION,
            S.CANCELLED: a.ATTESTATION_TYPE_WORKER_CANCELLATION,
            S.TERMINATED: a.ATTESTATION_TYPE_WORKER_TERMINATION,
        }[won[0]]
        assert terminal[0].type == expected_type and terminal[0].state == won[0]
        winners[won[0].name] = winners.get(won[0].name, 0) + 1
    assert sum(winners.values()) == ROUNDS
    await raw.close()


# --- across replicas ------------------------------------------------------------------


async def test_terminate_reaches_a_worker_on_another_replica_and_a_deadline_fires_once(
    pg_url: str, tmp_path: Path
) -> None:
    from .test_replicas import client, replicas

    async with (
        replicas(pg_url, tmp_path, 2) as (a_replica, b_replica),
        client(a_replica.target) as on_a,
        client(b_replica.target) as on_b,
    ):
        raw = RawWorker(on_a)
        await raw.hello("w", ["svc"])
        job = await submit_job(on_b, "x")
        await assigned(raw, job.id)
        await on_b.jobs.TerminateJob(j.TerminateJobRequest(job_id=job.id))
        notice = await cancel_notice(raw, job.id)
        assert notice.reason == "terminated"  # told as a termination, not a lost lease
        # Both replicas' supervisors see the deadline pass: one ends the run.
        wf = await submit_workflow(
            on_a, "late", step("a", "nobody"), timeout=duration_pb2.Duration(nanos=1_000_000)
        )
        await workflow_in(on_b, wf.id, c.RUN_STATE_TIMED_OUT)
        kinds = [(x.entity_type, x.type) for x in await attestations(on_b, workflow_id=wf.id)]
        assert kinds == [("workflow", a.ATTESTATION_TYPE_WORKFLOW_FAILURE)]
        ends = [e for e in await events(on_a, wf.id) if e.node_id == "workflow"]
        assert [e.type for e in ends] == [c.TRACE_EVENT_TYPE_FAILED]
        await raw.close()


# --- the supervisor's scan and the migration -------------------------------------------


async def test_the_deadline_scan_uses_its_partial_index(harness: Harness) -> None:
    from jobtrace.clock import now_us
    from jobtrace.store import jobs as store

    from .test_run_queries import plan_of

    api = harness.stubs()
    for i in range(20):  # some rows, with and without deadlines
        extra = {"timeout": duration_pb2.Duration(seconds=3600)} if i % 2 else {}
        await submit_workflow(api, f"p{i}", step("a", "nobody"), **extra)
    plan = await plan_of(harness.db_url, store.overdue_workflows_query(now_us(), 100))
    assert "ix_workflows_deadline" in plan, plan


async def test_migration_0020_downgrades_and_upgrades(db_url: str) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect
    from sqlalchemy.ext.asyncio import create_async_engine

    from jobtrace.store.db import MIGRATIONS

    async with Harness(db_url):  # migrated to head
        pass
    engine = create_async_engine(db_url)

    def migrate(connection: Any, target: str, down: bool) -> list[str]:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, target)
        return [col["name"] for col in inspect(connection).get_columns("workflows")]

    try:
        async with engine.begin() as conn:
            assert "deadline_us" not in await conn.run_sync(migrate, "0019", True)
        async with engine.begin() as conn:
            assert "deadline_us" in await conn.run_sync(migrate, "0020", False)
            indexes = await conn.run_sync(
                lambda sync: [i["name"] for i in inspect(sync).get_indexes("workflows")]
            )
            assert "ix_workflows_deadline" in indexes
    finally:
        await engine.dispose()


# --- the command line and the clients ------------------------------------------------


async def test_cli_terminates_and_a_workflow_file_takes_a_timeout(
    sqlite_harness: Harness, tmp_path: Path
) -> None:
    import json

    from jobtrace.client import Client

    from .procs import jobtrace

    target = sqlite_harness.target
    workflow_file = tmp_path / "wf.yaml"
    workflow_file.write_text(
        "name: report\ntimeout: 3600\nsteps:\n  - {name: a, service: nobody}\n"
    )
    code, out, err = await jobtrace("submit", "--workflow", str(workflow_file), target=target)
    assert code == 0, err
    wf_id = out.splitlines()[0].strip()
    _, out, _ = await jobtrace("get", wf_id, "--json", target=target)
    assert json.loads(out)["timeout"] == "3600s"
    code, out, err = await jobtrace(
        "terminate", wf_id, "--reason", "wrong input", "--json", target=target
    )
    assert code == 0, err
    ended = json.loads(out)
    assert ended["state"] == "RUN_STATE_TERMINATED"
    assert ended["failure"]["reason"] == "wrong input"
    code, _, err = await jobtrace("terminate", wf_id, target=target)
    assert code == 2 and "TERMINATED" in err, err
    async with Client(target) as client:
        job = await client.submit_job("nobody")
        workflow = await client.submit_workflow(
            "w", [{"name": "a", "job": {"service": "x"}}], timeout=60
        )
        assert workflow.timeout.seconds == 60
        assert (await client.terminate_workflow(workflow.id)).state == c.RUN_STATE_TERMINATED
    code, out, err = await jobtrace("terminate", job.id, target=target)
    assert code == 0 and out.strip() == f"{job.id}: TERMINATED", (out, err)
