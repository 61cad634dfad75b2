"""Approval gates: workflow steps that reviewers decide, against a real server
with tokens (both backends)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import json_format

from jobtrace.auth import hash_token
from jobtrace.client.worker import JobContext
from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j

from .conftest import Harness, Stubs, error_details, wait_for
from .procs import jobtrace
from .workers import runtime_worker

# subject -> roles (tenant acme; "mallory" is of tenant umbrella).
PEOPLE = {
    "alice": ["reviewer", "submitter"],
    "bob": ["reviewer", "reader"],
    "carol": ["reviewer", "reader"],
    "dave": ["submitter"],  # listed as an approver, but no reviewer role
    "eve": ["reviewer", "reader"],  # a reviewer no gate below lists by name
    "ops": ["submitter"],
    "robot": ["worker"],
    "mallory": ["reviewer", "reader"],
}


def md(subject: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer tok-{subject}"),)


@pytest.fixture
async def gated(db_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {
                "tokens": [
                    {
                        "sha256": hash_token(f"tok-{who}"),
                        "subject": who,
                        "tenant": "umbrella" if who == "mallory" else "acme",
                        "roles": roles,
                    }
                    for who, roles in PEOPLE.items()
                ]
            }
        )
    )
    # Short leases: the supervisor (which times gates out) runs every 0.25 s.
    async with Harness(
        db_url, tokens_file=str(tokens), lease_seconds=1.0, heartbeat_seconds=0.2
    ) as h:
        yield h


def gate(*approvers: str, **fields: Any) -> c.ApprovalGate:
    return c.ApprovalGate(approvers=list(approvers), **fields)


async def submit(api: Stubs, rid: str, steps: list[c.WorkflowStepSpec]) -> c.Workflow:
    request = j.SubmitWorkflowRequest(request_id=rid, name="release", steps=steps)
    return (await api.jobs.SubmitWorkflow(request, metadata=md("ops"))).workflow


async def workflow(api: Stubs, wf_id: str) -> c.Workflow:
    request = j.GetWorkflowRequest(workflow_id=wf_id)
    return (await api.jobs.GetWorkflow(request, metadata=md("bob"))).workflow


def step_of(wf: c.Workflow, name: str) -> c.WorkflowStep:
    return next(s for s in wf.steps if s.name == name)


async def until(api: Stubs, wf_id: str, state: int, timeout: float = 10.0) -> c.Workflow:
    async def reached() -> c.Workflow | None:
        wf = await workflow(api, wf_id)
        return wf if wf.state == state else None

    found: c.Workflow = await wait_for(reached, timeout=timeout)
    return found


async def decide(
    api: Stubs, who: str, wf_id: str, step: str, approve: bool = True, comment: str = ""
) -> j.ApproveStepResponse:
    request = j.ApproveStepRequest(
        workflow_id=wf_id,
        step=step,
        disposition=c.APPROVAL_DISPOSITION_APPROVED if approve else c.APPROVAL_DISPOSITION_REJECTED,
        comment=comment,
    )
    response: j.ApproveStepResponse = await api.jobs.ApproveStep(request, metadata=md(who))
    return response


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def echo(ctx: JobContext) -> dict[str, Any]:
    return {"ran": ctx.job.step_name}


def job(service: str) -> c.JobSpec:
    return c.JobSpec(service=service, max_attempts=1)


async def test_an_approved_gate_lets_the_workflow_go_on_with_attested_decisions(
    gated: Harness,
) -> None:
    api = gated.stubs()
    async with runtime_worker(gated.target, {"build": echo, "ship": echo}, token="tok-robot"):
        wf = await submit(
            api,
            "approved",
            [
                c.WorkflowStepSpec(name="build", job=job("build")),
                c.WorkflowStepSpec(
                    name="review", approval=gate("alice", "dave", policy_version="policy-7")
                ),
                c.WorkflowStepSpec(name="ship", job=job("ship")),
            ],
        )
        watch = api.jobs.WatchWorkflow(
            j.WatchWorkflowRequest(workflow_id=wf.id), metadata=md("bob")
        )
        waiting = await until(api, wf.id, c.RUN_STATE_WAITING_FOR_HUMAN)
        assert step_of(waiting, "build").state == c.RUN_STATE_COMPLETED
        review = step_of(waiting, "review")
        assert review.state == c.RUN_STATE_WAITING_FOR_HUMAN
        assert list(review.approval.gate.approvers) == ["alice", "dave"]
        assert review.approval.gate.min_approvals == 1
        assert step_of(waiting, "ship").state == c.RUN_STATE_PENDING
        # The gate is never dispatched: no worker ever holds it.
        gate_job = (
            await api.jobs.GetJob(j.GetJobRequest(job_id=review.job_id), metadata=md("bob"))
        ).job
        assert gate_job.attempt == 0 and gate_job.worker_id == ""
        assert gate_job.waiting_reason == c.WAITING_REASON_APPROVAL

        # Who may not decide: a reviewer not listed, a listed approver without the
        # reviewer role, a reviewer of another tenant.
        err = await refused(decide(api, "eve", wf.id, "review"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not an approver" in (err.details() or "")
        err = await refused(decide(api, "dave", wf.id, "review"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "reviewer" in (err.details() or "")
        err = await refused(decide(api, "mallory", wf.id, "review"))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        # ... and only alice sees it pending.
        pending = await api.jobs.ListPendingApprovals(
            j.ListPendingApprovalsRequest(), metadata=md("alice")
        )
        assert [(p.workflow_id, p.step) for p in pending.approvals] == [(wf.id, "review")]
        for other in ("eve", "mallory"):
            listed = await api.jobs.ListPendingApprovals(
                j.ListPendingApprovalsRequest(), metadata=md(other)
            )
            assert list(listed.approvals) == []

        decided = await decide(api, "alice", wf.id, "review", comment="looks good")
        assert decided.step.state == c.RUN_STATE_COMPLETED
        result = json_format.MessageToDict(decided.step.result)
        assert result["approved"] is True and result["decisions"][0]["approver"] == "alice"
        done = (
            await api.jobs.AwaitWorkflow(
                j.AwaitWorkflowRequest(workflow_id=wf.id, timeout={"seconds": 10}),
                metadata=md("bob"),
            )
        ).workflow
        assert done.state == c.RUN_STATE_COMPLETED
        assert step_of(done, "ship").state == c.RUN_STATE_COMPLETED
        states = []
        async for message in watch:
            states.append(message.workflow.state)
        assert c.RUN_STATE_WAITING_FOR_HUMAN in states
        assert states[-1] == c.RUN_STATE_COMPLETED

    # The decision as annotations, recorded by the authenticated subject.
    annotations = (
        await api.attest.ListAnnotations(
            a.ListAnnotationsRequest(run_id=wf.id, key_prefix="approval."), metadata=md("bob")
        )
    ).annotations
    by_key = {x.key: x for x in annotations}
    assert set(by_key) == {
        "approval.approvers",
        "approval.disposition",
        "approval.timestamp",
        "approval.policy.version",
    }
    assert all(x.recorded_by == "alice" and x.job_id == review.job_id for x in annotations)
    assert by_key["approval.disposition"].value.string_value == "approved"
    assert by_key["approval.policy.version"].value.string_value == "policy-7"

    # The decision's attestation verifies, and the workflow's lists it.
    key = f"approval:{wf.id}:review:1"
    attestation = (
        await api.attest.GetAttestation(a.GetAttestationRequest(key=key), metadata=md("bob"))
    ).attestation
    assert attestation.type == a.ATTESTATION_TYPE_APPROVAL
    assert attestation.recorded_by == "alice"
    data = json_format.MessageToDict(attestation.data)
    assert data["approval"]["approver"] == "alice"
    assert data["approval"]["disposition"] == "approved"
    assert data["approval"]["comment"] == "looks good"
    verdict = await api.attest.VerifyAttestation(
        a.VerifyAttestationRequest(key=key), metadata=md("bob")
    )
    assert verdict.valid and verdict.annotations_attested and verdict.annotations_valid
    completion = (
        await api.attest.GetAttestation(
            a.GetAttestationRequest(key=f"workflow-completion:{wf.id}"), metadata=md("bob")
        )
    ).attestation
    relied = json_format.MessageToDict(completion.data)["approvals"]
    assert [(x["key"], x["digest"]) for x in relied] == [(key, attestation.digest)]
    assert (
        await api.attest.VerifyAttestation(
            a.VerifyAttestationRequest(key=f"workflow-completion:{wf.id}"), metadata=md("bob")
        )
    ).valid

    # A decided gate takes no more decisions: FAILED_PRECONDITION naming its state.
    err = await refused(decide(api, "alice", wf.id, "review"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "COMPLETED" in (err.details() or "")
    err = await refused(decide(api, "alice", wf.id, "build"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not an approval gate" in (err.details() or "")


async def test_rejections_quorum_and_timeouts(gated: Harness) -> None:
    api = gated.stubs()
    ahead = c.WorkflowStepSpec(name="ship", job=job("ship"))
    rejected = await submit(
        api, "rejected", [c.WorkflowStepSpec(name="review", approval=gate("role:reviewer")), ahead]
    )
    skipped = await submit(
        api,
        "skipped",
        [
            c.WorkflowStepSpec(
                name="review", approval=gate("role:reviewer", on_reject=c.ON_REJECT_SKIP)
            ),
            ahead,
        ],
    )
    quorum = await submit(
        api,
        "quorum",
        [
            c.WorkflowStepSpec(
                name="review", approval=gate("alice", "bob", "carol", min_approvals=2)
            )
        ],
    )
    timing_out = await submit(
        api,
        "timing-out",
        [c.WorkflowStepSpec(name="review", approval=gate("bob", timeout={"seconds": 1})), ahead],
    )
    timeout_skips = await submit(
        api,
        "timeout-skips",
        [
            c.WorkflowStepSpec(
                name="review",
                approval=gate(
                    "bob",
                    timeout={"seconds": 1},
                    on_timeout=c.ON_TIMEOUT_REJECT,
                    on_reject=c.ON_REJECT_SKIP,
                ),
            )
        ],
    )
    # A gate that depends on nothing waits from the submission on.
    for wf in (rejected, skipped, quorum, timing_out, timeout_skips):
        assert wf.state == c.RUN_STATE_WAITING_FOR_HUMAN
        assert step_of(wf, "review").state == c.RUN_STATE_WAITING_FOR_HUMAN
    # The live feed of runs shows them waiting.
    feed = api.jobs.WatchRuns(
        j.WatchRunsRequest(include_active=True, kind=j.WatchRunsRequest.RUN_KIND_WORKFLOW),
        metadata=md("bob"),
    )
    shown = {}
    async for message in feed:
        if message.WhichOneof("kind") == "snapshot_end":
            break
        shown[message.workflow.id] = message.workflow.state
    feed.cancel()
    # (The two with a timeout may have timed out already: not checked here.)
    for w in (rejected, skipped, quorum):
        assert shown[w.id] == c.RUN_STATE_WAITING_FOR_HUMAN
    pending = await api.jobs.ListPendingApprovals(
        j.ListPendingApprovalsRequest(page_size=2), metadata=md("bob")
    )
    seen = [p.workflow_id for p in pending.approvals]
    assert len(seen) == 2 and pending.next_page_token
    while pending.next_page_token:
        pending = await api.jobs.ListPendingApprovals(
            j.ListPendingApprovalsRequest(page_size=2, page_token=pending.next_page_token),
            metadata=md("bob"),
        )
        seen += [p.workflow_id for p in pending.approvals]
    # Oldest first, over pages (the two with a timeout may have timed out).
    assert [i for i in seen if i in (rejected.id, skipped.id, quorum.id)] == [
        rejected.id,
        skipped.id,
        quorum.id,
    ]

    # Rejected: the gate fails, and the workflow, naming the gate.
    response = await decide(api, "bob", rejected.id, "review", approve=False, comment="not now")
    assert response.step.state == c.RUN_STATE_FAILED
    assert response.step.failure.code == "APPROVAL_REJECTED"
    assert response.workflow.state == c.RUN_STATE_FAILED
    assert "'review'" in response.workflow.failure.reason
    assert "rejected by bob" in response.workflow.failure.reason
    assert step_of(response.workflow, "ship").state == c.RUN_STATE_CANCELLED

    # on_reject: skip: the gate completes unapproved and the next step runs.
    async with runtime_worker(gated.target, {"ship": echo}, token="tok-robot"):
        response = await decide(api, "carol", skipped.id, "review", approve=False)
        assert response.step.state == c.RUN_STATE_COMPLETED
        result = json_format.MessageToDict(response.step.result)
        assert result["approved"] is False and result["skipped"] is True
        done = await until(api, skipped.id, c.RUN_STATE_COMPLETED)
        assert step_of(done, "ship").state == c.RUN_STATE_COMPLETED

    # Two distinct approvers needed: one decision each.
    first = await decide(api, "alice", quorum.id, "review")
    assert first.step.state == c.RUN_STATE_WAITING_FOR_HUMAN
    assert first.step.approval.approvals == 1
    assert first.workflow.state == c.RUN_STATE_WAITING_FOR_HUMAN
    err = await refused(decide(api, "alice", quorum.id, "review"))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    second = await decide(api, "bob", quorum.id, "review")
    assert second.step.state == c.RUN_STATE_COMPLETED
    assert second.workflow.state == c.RUN_STATE_COMPLETED
    assert [d.approver for d in second.step.approval.decisions] == ["alice", "bob"]
    listed = (
        await api.attest.ListAttestations(
            a.ListAttestationsRequest(workflow_id=quorum.id, type=a.ATTESTATION_TYPE_APPROVAL),
            metadata=md("bob"),
        )
    ).attestations
    assert [x.recorded_by for x in listed] == ["alice", "bob"]
    for x in listed:  # the first still verifies after the second was recorded
        verdict = await api.attest.VerifyAttestation(
            a.VerifyAttestationRequest(key=x.key), metadata=md("bob")
        )
        assert verdict.valid and verdict.annotations_valid, verdict.reason

    # Past its timeout: TIMED_OUT and the workflow fails; or, as a rejection
    # with on_reject: skip, completed unapproved.
    timed_out = await until(api, timing_out.id, c.RUN_STATE_FAILED)
    assert step_of(timed_out, "review").state == c.RUN_STATE_TIMED_OUT
    assert "'review'" in timed_out.failure.reason
    assert timed_out.failure.code == "APPROVAL_TIMED_OUT"
    lapsed = await until(api, timeout_skips.id, c.RUN_STATE_COMPLETED)
    gate_job = (
        await api.jobs.GetJob(
            j.GetJobRequest(job_id=step_of(lapsed, "review").job_id), metadata=md("bob")
        )
    ).job
    assert json_format.MessageToDict(gate_job.result)["timed_out"] is True
    err = await refused(decide(api, "bob", timing_out.id, "review"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "TIMED_OUT" in (err.details() or "")
    assert (
        await api.jobs.ListPendingApprovals(j.ListPendingApprovalsRequest(), metadata=md("bob"))
    ).approvals == []


async def test_a_gate_after_a_running_step_and_cancel(gated: Harness) -> None:
    """The workflow is WAITING_FOR_HUMAN only while no step is queued or
    running; cancelling it cancels the waiting gate."""
    api = gated.stubs()
    wf = await submit(
        api,
        "parallel",
        [
            c.WorkflowStepSpec(name="review", approval=gate("bob")),
            c.WorkflowStepSpec(name="work", job=job("work"), independent=True),
        ],
    )
    assert wf.state == c.RUN_STATE_QUEUED  # "work" is queued
    release = asyncio.Event()

    async def slow(ctx: JobContext) -> dict[str, Any]:
        await release.wait()
        return {}

    async with runtime_worker(gated.target, {"work": slow}, token="tok-robot"):
        running = await until(api, wf.id, c.RUN_STATE_RUNNING)
        assert step_of(running, "review").state == c.RUN_STATE_WAITING_FOR_HUMAN
        release.set()
        await until(api, wf.id, c.RUN_STATE_WAITING_FOR_HUMAN)
    # The CLI: the gates bob may decide, and a decision.
    code, out, err = await jobtrace(
        "pending-approvals", "--json", "--token", "tok-bob", target=gated.target
    )
    assert code == 0, err
    assert [(p["workflow_id"], p["step"]) for p in json.loads(out)["approvals"]] == [
        (wf.id, "review")
    ]
    code, out, err = await jobtrace("pending-approvals", "--token", "tok-bob", target=gated.target)
    assert code == 0 and wf.id in out and "0/1" in out, out
    cli_wf = await submit(api, "by-cli", [c.WorkflowStepSpec(name="review", approval=gate("bob"))])
    code, out, err = await jobtrace(
        "approve",
        cli_wf.id,
        "review",
        "--comment",
        "ok",
        "--json",
        "--token",
        "tok-bob",
        target=gated.target,
    )
    assert code == 0, err
    decided = json.loads(out)
    assert decided["step"]["state"] == "RUN_STATE_COMPLETED"
    assert decided["workflow"]["state"] == "RUN_STATE_COMPLETED"
    code, out, err = await jobtrace(
        "approve", cli_wf.id, "review", "--reject", "--token", "tok-bob", target=gated.target
    )
    assert code == 2 and "COMPLETED" in err, err

    cancelled = (
        await api.jobs.CancelWorkflow(
            j.CancelWorkflowRequest(workflow_id=wf.id), metadata=md("ops")
        )
    ).workflow
    assert cancelled.state == c.RUN_STATE_CANCELLED
    assert step_of(cancelled, "review").state == c.RUN_STATE_CANCELLED
    err = await refused(decide(api, "bob", wf.id, "review"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "CANCELLED" in (err.details() or "")

    # Two approvals and a cancel at once: the first to take the run's lock wins;
    # the others see the state it left (and record nothing).
    for round_ in range(3):
        raced = await submit(
            api, f"race{round_}", [c.WorkflowStepSpec(name="review", approval=gate("bob", "carol"))]
        )
        outcomes = await asyncio.gather(
            decide(api, "bob", raced.id, "review"),
            decide(api, "carol", raced.id, "review"),
            api.jobs.CancelWorkflow(
                j.CancelWorkflowRequest(workflow_id=raced.id), metadata=md("ops")
            ),
            return_exceptions=True,
        )
        won = [o for o in outcomes if not isinstance(o, BaseException)]
        lost = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert len(won) == 1 and len(lost) == 2, outcomes
        assert all(o.code() == grpc.StatusCode.FAILED_PRECONDITION for o in lost)
        final = await workflow(api, raced.id)
        decisions = step_of(final, "review").approval.decisions
        if isinstance(won[0], j.ApproveStepResponse):
            assert final.state == c.RUN_STATE_COMPLETED and len(decisions) == 1
        else:
            assert final.state == c.RUN_STATE_CANCELLED and len(decisions) == 0
        attested = await api.attest.ListAttestations(
            a.ListAttestationsRequest(workflow_id=raced.id, type=a.ATTESTATION_TYPE_APPROVAL),
            metadata=md("bob"),
        )
        assert len(attested.attestations) == len(decisions)


BAD_GATES = [
    (c.WorkflowStepSpec(name="g", job=job("x"), approval=gate("bob")), "steps[0]"),
    (c.WorkflowStepSpec(name="g"), "steps[0].job"),
    (c.WorkflowStepSpec(name="g", approval=gate()), "steps[0].approval.approvers"),
    (
        c.WorkflowStepSpec(name="g", approval=gate("bob", "carol", min_approvals=3)),
        "steps[0].approval.min_approvals",
    ),
    (c.WorkflowStepSpec(name="g", approval=gate("role:admin")), "steps[0].approval.approvers[0]"),
    (c.WorkflowStepSpec(name="g", approval=gate("bob", "bob")), "steps[0].approval.approvers[1]"),
    (
        c.WorkflowStepSpec(name="g", approval=gate("bob", timeout={"nanos": 500_000_000})),
        "steps[0].approval.timeout",
    ),
    (
        c.WorkflowStepSpec(name="g", approval=gate("bob", on_reject=9)),  # type: ignore[arg-type]
        "steps[0].approval.on_reject",
    ),
    (
        c.WorkflowStepSpec(
            name="g", approval=gate("bob"), depends_on=["a"], for_each=c.ForEach(step="a")
        ),
        "steps[0].for_each",
    ),
]


async def test_bad_gates_are_invalid_and_store_nothing(gated: Harness) -> None:
    api = gated.stubs()
    upstream = c.WorkflowStepSpec(name="a", job=job("x"))
    for i, (step, field) in enumerate(BAD_GATES):
        steps = [step, upstream] if step.depends_on else [step]
        err = await refused(submit(api, f"bad{i}", steps))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        _, violations = error_details(err)
        assert field in [f for f, _ in violations], (field, violations)
    listed = await api.jobs.ListWorkflows(j.ListWorkflowsRequest(), metadata=md("bob"))
    assert list(listed.workflows) == []


async def test_migration_0023_goes_down_and_up(gated: Harness) -> None:
    """Revision 0023's columns and index come and go on both backends."""
    from .test_worker_stream import migrate_down

    await gated.stop()
    await migrate_down(gated.db_url, "0019")
    await gated.start()  # migrates up again
    api = gated.stubs()
    wf = await submit(api, "after", [c.WorkflowStepSpec(name="review", approval=gate("bob"))])
    assert wf.state == c.RUN_STATE_WAITING_FOR_HUMAN
    decided = await decide(api, "bob", wf.id, "review")
    assert decided.workflow.state == c.RUN_STATE_COMPLETED


async def test_a_gate_decided_while_paused_leaves_the_resumed_workflow_running(
    gated: Harness,
) -> None:
    """What happened while a workflow was paused decides its state on resume:
    a gate approved meanwhile queued work, so the resumed run is not
    WAITING_FOR_HUMAN; it runs, records its start and completes."""
    api = gated.stubs()
    wf = await submit(
        api,
        "paused-gate",
        [
            c.WorkflowStepSpec(name="review", approval=gate("alice")),
            c.WorkflowStepSpec(name="ship", job=job("ship"), depends_on=["review"]),
        ],
    )
    assert wf.state == c.RUN_STATE_WAITING_FOR_HUMAN
    await api.jobs.PauseWorkflow(j.PauseWorkflowRequest(workflow_id=wf.id), metadata=md("ops"))
    await decide(api, "alice", wf.id, "review")
    paused = await workflow(api, wf.id)
    assert paused.state == c.RUN_STATE_PAUSED
    assert step_of(paused, "ship").state == c.RUN_STATE_QUEUED
    resumed = (
        await api.jobs.ResumeWorkflow(
            j.ResumeWorkflowRequest(workflow_id=wf.id), metadata=md("ops")
        )
    ).workflow
    assert resumed.state == c.RUN_STATE_QUEUED, c.RunState.Name(resumed.state)
    release = asyncio.Event()

    async def ship(ctx: JobContext) -> dict[str, Any]:
        await release.wait()
        return {}

    async with runtime_worker(gated.target, {"ship": ship}, token="tok-robot"):
        running = await until(api, wf.id, c.RUN_STATE_RUNNING)
        assert step_of(running, "ship").state == c.RUN_STATE_RUNNING
        assert running.HasField("started_at")
        release.set()
        done = await until(api, wf.id, c.RUN_STATE_COMPLETED)
    assert done.started_at.ToNanoseconds() > 0
