"""Every (state, operator action) pair through the real server, read from the
one state machine (domain/states.py): each action the table allows from a
state succeeds and leaves the run where the table says; every other pair is
FAILED_PRECONDITION naming the state the run is in, and changes nothing.

Covers every state a job and a workflow can be put in (approval gates and
pauses included) and every action of the table: cancel, terminate, pause,
resume, approve and rerun (timeouts are the server's own, tested with
deadlines). tests/test_terminate.py, tests/test_approvals.py and
tests/test_pause.py race the actions against each other and completion."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from jobtrace.domain import states
from jobtrace.domain.states import Action, RunKind
from jobtrace.model import RunState
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j

from .conftest import Harness, Stubs, error_details
from .test_terminate import Runs, get_job, get_workflow, job_in, step, submit_workflow, workflow_in
from .workers import RawWorker

S = RunState
FP = grpc.StatusCode.FAILED_PRECONDITION
ENDED = sorted(s for s in S if s.terminal)


def gate(**fields: Any) -> c.WorkflowStepSpec:
    return c.WorkflowStepSpec(
        name="gate", approval=c.ApprovalGate(approvers=["role:reviewer"], **fields)
    )


class Walk(Runs):
    """Runs in every state, approval gates and pauses included."""

    async def job(self, state: RunState) -> str:
        if state == S.WAITING_FOR_HUMAN:
            return (await self.gate(state))[1]
        return await super().job(state)

    async def gate(self, state: RunState) -> tuple[str, str]:
        """A workflow and its approval gate step, the gate in `state`."""
        api = self.api
        if state == S.PENDING:  # waits for a step no worker runs
            wf = await submit_workflow(api, self.rid(), step("a", "nobody"), gate())
            wf = await get_workflow(api, wf.id)
            gate_id = next(s.job_id for s in wf.steps if s.name == "gate")
            await job_in(api, gate_id, int(state))
            return wf.id, gate_id
        extra: dict[str, Any] = {}
        if state == S.TIMED_OUT:
            extra["timeout"] = duration_pb2.Duration(seconds=1)
        wf = await submit_workflow(api, self.rid(), gate(**extra))
        gate_id = wf.steps[0].job_id
        await job_in(api, gate_id, int(S.WAITING_FOR_HUMAN))
        if state in (S.COMPLETED, S.FAILED):
            disposition = (
                c.APPROVAL_DISPOSITION_APPROVED
                if state == S.COMPLETED
                else c.APPROVAL_DISPOSITION_REJECTED
            )
            await api.jobs.ApproveStep(
                j.ApproveStepRequest(workflow_id=wf.id, step="gate", disposition=disposition)
            )
        elif state == S.CANCELLED:
            await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=wf.id))
        elif state == S.TERMINATED:
            await api.jobs.TerminateJob(j.TerminateJobRequest(job_id=gate_id))
        await job_in(api, gate_id, int(state), timeout=20)
        return wf.id, gate_id

    async def workflow(self, state: RunState) -> str:
        api = self.api
        if state == S.WAITING_FOR_HUMAN:
            return (await self.gate(state))[0]
        if state == S.PAUSED:
            wf = await submit_workflow(api, self.rid(), step("a", "nobody"))
            await api.jobs.PauseWorkflow(j.PauseWorkflowRequest(workflow_id=wf.id))
            await workflow_in(api, wf.id, int(state))
            return wf.id
        return await super().workflow(state)


JOB_STATES = [S.PENDING, S.QUEUED, S.RUNNING, S.WAITING_FOR_HUMAN, *ENDED]
WORKFLOW_STATES = [S.QUEUED, S.RUNNING, S.WAITING_FOR_HUMAN, S.PAUSED, *ENDED]

Call = Callable[[Stubs, str, int], Awaitable[Any]]

_CALLS: dict[tuple[RunKind, Action], Call] = {
    (RunKind.JOB, Action.CANCEL): lambda api, i, n: api.jobs.CancelJob(
        j.CancelJobRequest(job_id=i)
    ),
    (RunKind.JOB, Action.TERMINATE): lambda api, i, n: api.jobs.TerminateJob(
        j.TerminateJobRequest(job_id=i)
    ),
    (RunKind.JOB, Action.RERUN): lambda api, i, n: api.jobs.RerunJob(
        j.RerunJobRequest(job_id=i, request_id=f"walk-rerun-{n}")
    ),
    (RunKind.WORKFLOW, Action.CANCEL): lambda api, i, n: api.jobs.CancelWorkflow(
        j.CancelWorkflowRequest(workflow_id=i)
    ),
    (RunKind.WORKFLOW, Action.TERMINATE): lambda api, i, n: api.jobs.TerminateWorkflow(
        j.TerminateWorkflowRequest(workflow_id=i)
    ),
    (RunKind.WORKFLOW, Action.PAUSE): lambda api, i, n: api.jobs.PauseWorkflow(
        j.PauseWorkflowRequest(workflow_id=i)
    ),
    (RunKind.WORKFLOW, Action.RESUME): lambda api, i, n: api.jobs.ResumeWorkflow(
        j.ResumeWorkflowRequest(workflow_id=i)
    ),
    (RunKind.WORKFLOW, Action.RERUN): lambda api, i, n: api.jobs.RerunWorkflow(
        j.RerunWorkflowRequest(workflow_id=i, request_id=f"walk-rerun-{n}")
    ),
}


def _run_of(kind: RunKind, response: Any) -> Any:
    return response.job if kind is RunKind.JOB else response.workflow


async def _refused(call: Awaitable[Any], state: RunState, what: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    err = caught.value
    assert err.code() == FP, (what, err.code(), err.details())
    info, _ = error_details(err)
    assert info is not None and info.metadata["state"] == state.name, (what, info)
    assert state.name in (err.details() or ""), what


async def test_every_state_and_action_pair_goes_as_the_state_machine_says(
    harness: Harness,
) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=100)
    walk = Walk(api, raw)
    checked: set[tuple[RunKind, RunState, Action]] = set()
    n = 0
    for kind, reachable in ((RunKind.JOB, JOB_STATES), (RunKind.WORKFLOW, WORKFLOW_STATES)):
        for state in reachable:
            for action in Action:
                if (kind, action) not in _CALLS:
                    continue
                if (
                    kind is RunKind.JOB
                    and action is Action.RERUN
                    and state
                    in (
                        S.PENDING,
                        S.WAITING_FOR_HUMAN,
                    )
                ):
                    continue  # only steps are in these states: rerun with their workflow
                n += 1
                run_id = await (walk.job(state) if kind is RunKind.JOB else walk.workflow(state))
                call = _CALLS[(kind, action)](api, run_id, n)
                what = f"{kind.value} {state.name} {action.value}"
                if states.can(kind, state, action):
                    run = _run_of(kind, await call)
                    if action is Action.RERUN:
                        assert run.id != run_id and run.parent_run_id == run_id, what
                        before = await (
                            get_job(api, run_id)
                            if kind is RunKind.JOB
                            else get_workflow(api, run_id)
                        )
                        assert before.state == state, f"{what}: a rerun leaves the old run be"
                    elif action is Action.RESUME:
                        assert run.state in (S.QUEUED, S.RUNNING, S.WAITING_FOR_HUMAN), what
                    else:
                        assert run.state == states.ACTION_TARGETS[action], what
                else:
                    await _refused(call, state, what)
                    now = await (
                        get_job(api, run_id) if kind is RunKind.JOB else get_workflow(api, run_id)
                    )
                    assert now.state == state, f"{what}: a refusal changed nothing"
                checked.add((kind, state, action))
    # Every action of the table was tried from every state of its kind.
    for (kind, action), _allowed in states.ACTIONS.items():
        if action in (Action.TIME_OUT, Action.APPROVE):
            continue  # the server's own deadline; approvals below
        reachable = JOB_STATES if kind is RunKind.JOB else WORKFLOW_STATES
        for state in reachable:
            if (
                kind is RunKind.JOB
                and action is Action.RERUN
                and state
                in (
                    S.PENDING,
                    S.WAITING_FOR_HUMAN,
                )
            ):
                continue
            assert (kind, state, action) in checked, (kind, state, action)
    await raw.close()


async def test_approve_is_allowed_only_from_waiting_for_human(harness: Harness) -> None:
    """ApproveStep on a gate in every state a gate can be in."""
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=10)
    walk = Walk(api, raw)
    gate_states = [S.PENDING, S.WAITING_FOR_HUMAN, *ENDED]
    for state in gate_states:
        wf_id, gate_id = await walk.gate(state)
        call = api.jobs.ApproveStep(
            j.ApproveStepRequest(
                workflow_id=wf_id, step="gate", disposition=c.APPROVAL_DISPOSITION_APPROVED
            )
        )
        what = f"gate {state.name} approve"
        if states.can(RunKind.JOB, state, Action.APPROVE):
            await call
            await job_in(api, gate_id, int(S.COMPLETED))
        else:
            await _refused(call, state, what)
            assert (await get_job(api, gate_id)).state == state, what
    assert states.allowed_from(RunKind.JOB, Action.APPROVE) <= set(gate_states)
    await raw.close()
