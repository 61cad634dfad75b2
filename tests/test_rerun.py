"""Reruns with lineage (RerunWorkflow, RerunJob): through the real server on
both backends, with a raw worker whose assignments prove which steps ran."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from jobtrace.client import Client, SyncClient
from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as tr
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, expect_error
from .procs import jobtrace
from .workers import RawWorker


def struct(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


def step(name: str, *depends_on: str) -> c.WorkflowStepSpec:
    return c.WorkflowStepSpec(
        name=name,
        job=c.JobSpec(service="svc", max_attempts=1, payload=struct({"step": name})),
        depends_on=list(depends_on),
    )


async def run(raw: RawWorker, seen: list[w.Assignment], outcome: dict[str, Any]) -> None:
    """Take the next assignment and complete it with outcome[step] (a result
    dict), or fail it for good when that is an Exception; annotate first."""
    got = await raw.expect("assignment")
    seen.append(got)
    job = got.job
    name = job.step_name or "job"
    await raw.send(
        annotate=w.AnnotationReport(
            job_id=job.id,
            attempt=got.attempt,
            attributes={"decision.outcome": struct_pb2.Value(string_value=f"ran {name}")},
        )
    )
    await raw.expect("ack")
    value = outcome[name]
    if isinstance(value, Exception):
        await raw.send(
            fail=w.FailReport(
                job_id=job.id, attempt=got.attempt, error=c.ErrorDetail(message=str(value))
            )
        )
    else:
        await raw.send(
            complete=w.CompleteReport(job_id=job.id, attempt=got.attempt, result=struct(value))
        )
    await raw.expect("ack")


def upstream(got: w.Assignment) -> dict[str, Any]:
    return json_format.MessageToDict(got.upstream)


async def ended(api: Stubs, workflow_id: str) -> c.Workflow:
    return (
        await api.jobs.AwaitWorkflow(
            j.AwaitWorkflowRequest(workflow_id=workflow_id, timeout={"seconds": 10})
        )
    ).workflow


async def rerun(api: Stubs, workflow_id: str, rid: str, **fields: Any) -> j.RerunWorkflowResponse:
    return await api.jobs.RerunWorkflow(
        j.RerunWorkflowRequest(workflow_id=workflow_id, request_id=rid, **fields)
    )


async def annotations(api: Stubs, run_id: str) -> list[c.Annotation]:
    page = await api.attest.ListAnnotations(a.ListAnnotationsRequest(run_id=run_id))
    return list(page.annotations)


async def ids(api: Stubs, **filters: str) -> set[str]:
    page = await api.jobs.ListWorkflows(j.ListWorkflowsRequest(**filters))
    return {x.id for x in page.workflows}


async def parent_named(api: Stubs, key: str, parent_id: str, parent_key: str) -> None:
    """The attestation `key` names its parent run and the digest of that
    run's last attestation (`parent_key`), and verifies."""
    got = (await api.attest.GetAttestation(a.GetAttestationRequest(key=key))).attestation
    parent = (await api.attest.GetAttestation(a.GetAttestationRequest(key=parent_key))).attestation
    data = json_format.MessageToDict(got.data)
    assert data["parent"] == {"run_id": parent_id, "attestation_digest": parent.digest}
    verdict = await api.attest.VerifyAttestation(a.VerifyAttestationRequest(key=key))
    assert verdict.valid, verdict.reason


async def test_rerun_from_a_failed_step_reuses_upstream_and_keeps_lineage(
    harness: Harness,
) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    seen: list[w.Assignment] = []
    steps = [step("a"), step("b", "a"), step("c", "b"), step("d", "b", "c")]
    first = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="wf", name="four", steps=steps, labels={"team": "x"}, priority=5
            )
        )
    ).workflow
    outcome: dict[str, Any] = {"a": {"a": 1}, "b": {"value": 42}, "c": RuntimeError("c broke")}
    for _ in "abc":
        await run(raw, seen, outcome)
    first = await ended(api, first.id)
    assert first.state == c.RUN_STATE_FAILED
    old = {s.name: s for s in first.steps}

    # A run that has not ended may not be rerun; nor from a step it does not have.
    running = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(request_id="other", name="one", steps=[step("x")])
        )
    ).workflow
    one = await raw.expect("assignment")  # x is RUNNING on the worker
    _, info, _ = await expect_error(
        rerun(api, running.id, "r-running"), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert "RUNNING" in info.metadata["state"] and info.reason == "WORKFLOW_STATE"
    _, _, violations = await expect_error(
        rerun(api, first.id, "r-bad", from_steps=["c", "nope", "zz"]),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v[0] for v in violations] == ["from_steps[1]", "from_steps[2]"]
    assert "'nope'" in violations[0][1] and "'zz'" in violations[1][1]
    _, _, violations = await expect_error(
        rerun(api, first.id, "r-bad", from_steps=["c"], failed_only=True),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v[0] for v in violations] == ["failed_only"]
    await raw.send(complete=w.CompleteReport(job_id=one.job.id, attempt=1))
    await raw.expect("ack")

    # Rerun from c: a and b are carried over, c and d run again.
    answer = await rerun(api, first.id, "r1", from_steps=["c"], reason="fixed c")
    second = answer.workflow
    assert not answer.deduplicated
    assert (second.parent_run_id, second.root_run_id) == (first.id, first.id)
    assert second.rerun_reason == "fixed c"
    assert (second.name, second.priority, dict(second.labels)) == ("four", 5, {"team": "x"})
    new = {s.name: s for s in second.steps}
    for name in "ab":
        assert new[name].state == c.RUN_STATE_COMPLETED
        assert new[name].reused_from == old[name].job_id
    for name in "cd":
        assert new[name].reused_from == "" and new[name].job_id != old[name].job_id
    assert new["c"].state == c.RUN_STATE_QUEUED and new["d"].state == c.RUN_STATE_PENDING
    outcome.update(c={"c": 3}, d={"d": 4})
    await run(raw, seen, outcome)
    await run(raw, seen, outcome)
    # The worker got c and d of the new run, and never a or b again.
    assert [(x.job.workflow_id, x.job.step_name) for x in seen] == [
        (first.id, "a"),
        (first.id, "b"),
        (first.id, "c"),
        (second.id, "c"),
        (second.id, "d"),
    ]
    assert all(x.attempt == 1 for x in seen), "the new run's jobs start fresh attempts"
    # c got b's carried-over result as input, d got b's and c's.
    assert upstream(seen[3]) == {"b": {"value": 42}}
    assert upstream(seen[4]) == {"b": {"value": 42}, "c": {"c": 3}}
    second = await ended(api, second.id)
    assert second.state == c.RUN_STATE_COMPLETED
    assert json_format.MessageToDict(second.outputs) == {"d": {"d": 4}}
    # A carried-over step's job is COMPLETED, without running, named by reused_from.
    carried = (await api.jobs.GetJob(j.GetJobRequest(job_id=new["b"].job_id))).job
    assert carried.state == c.RUN_STATE_COMPLETED and carried.attempt == 0
    assert carried.reused_from == old["b"].job_id and carried.workflow_id == second.id
    assert carried.request_id == "r1"
    # The new run's trace starts with what it reruns and why.
    events = await api.trace.ListTraceEvents(
        tr.ListTraceEventsRequest(run_id=second.id, view=tr.TRACE_EVENT_VIEW_FULL)
    )
    assert events.events[0].message == f"rerun of {first.id}: fixed c"
    assert json_format.MessageToDict(events.events[0].data) == {
        "parent_run_id": first.id,
        "carried_over": ["a", "b"],
        "runs_again": ["c", "d"],
    }

    # Same request_id, same request: the same run. Different request: conflict.
    again = await rerun(api, first.id, "r1", from_steps=["c"], reason="fixed c")
    assert again.deduplicated and again.workflow.id == second.id
    _, info, _ = await expect_error(
        rerun(api, first.id, "r1", from_steps=["d"], reason="fixed c"),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert info.reason == "IDEMPOTENCY_CONFLICT"
    # failed_only on a run whose every step completed: nothing to rerun.
    _, info, _ = await expect_error(
        rerun(api, second.id, "r-none", failed_only=True), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert info.reason == "NOTHING_TO_RERUN"

    # A rerun of the rerun: its root is still the first run; the carried steps
    # point at the jobs that ran them, whichever generation.
    third = (await rerun(api, second.id, "r2", from_steps=["d"], reason="again")).workflow
    assert (third.parent_run_id, third.root_run_id) == (second.id, first.id)
    thirds = {s.name: s for s in third.steps}
    assert [thirds[n].reused_from for n in "abc"] == [
        old["a"].job_id,
        old["b"].job_id,
        new["c"].job_id,
    ]
    outcome.update(d={"d": 5})
    await run(raw, seen, outcome)
    assert (seen[-1].job.workflow_id, seen[-1].job.step_name) == (third.id, "d")
    assert upstream(seen[-1]) == {"b": {"value": 42}, "c": {"c": 3}}
    third = await ended(api, third.id)
    assert third.state == c.RUN_STATE_COMPLETED

    # Lineage is walkable: the whole chain by root, one level by parent.
    assert await ids(api, root_run_id=first.id) == {second.id, third.id}
    assert await ids(api, parent_run_id=first.id) == {second.id}
    assert await ids(api, parent_run_id=second.id) == {third.id}
    assert await ids(api, root_run_id=first.id, parent_run_id=second.id) == {third.id}
    assert await ids(api, root_run_id=third.id) == set()

    # The trigger annotations, written with the run.
    trig = {x.key: x for x in await annotations(api, second.id) if x.key.startswith("trigger.")}
    assert {k: json_format.MessageToDict(v.value) for k, v in trig.items()} == {
        "trigger.source": "rerun",
        "trigger.reason": "fixed c",
        "trigger.parent_run_id": first.id,
        "trigger.actor.id": "anonymous",
    }
    assert {x.recorded_by for x in trig.values()} == {"anonymous"}
    # Each generation's annotations are its own: c's of the first run under
    # the first run and its job, c's of the rerun under the rerun and its job.
    ran = {
        (x.run_id, x.job_id, x.attempt, json_format.MessageToDict(x.value))
        for run_id in (first.id, second.id)
        for x in await annotations(api, run_id)
        if x.key == "decision.outcome"
    }
    assert (first.id, old["c"].job_id, 1, "ran c") in ran
    assert (second.id, new["c"].job_id, 1, "ran c") in ran
    assert not any(r[0] == second.id and r[3] in ("ran a", "ran b") for r in ran)

    # The reruns' attestations name their parent's last one, and verify.
    await parent_named(
        api, f"workflow-completion:{second.id}", first.id, f"workflow-failure:{first.id}"
    )
    await parent_named(
        api, f"workflow-completion:{third.id}", second.id, f"workflow-completion:{second.id}"
    )
    got = (
        await api.attest.GetAttestation(
            a.GetAttestationRequest(key=f"workflow-completion:{second.id}")
        )
    ).attestation
    data = json_format.MessageToDict(got.data)
    assert data["steps"]["b"]["reused_from"] == old["b"].job_id
    assert "reused_from" not in data["steps"]["c"]
    await raw.close()


async def test_rerun_job_runs_a_failed_job_again_with_lineage(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    seen: list[w.Assignment] = []
    spec = c.JobSpec(service="svc", max_attempts=1, payload=struct({"n": 1}))
    first = (await api.jobs.SubmitJob(j.SubmitJobRequest(request_id="j1", job=spec))).job
    await run(raw, seen, {"job": RuntimeError("broke")})
    first = (await api.jobs.AwaitJob(j.AwaitJobRequest(job_id=first.id))).job
    assert first.state == c.RUN_STATE_FAILED

    answer = await api.jobs.RerunJob(
        j.RerunJobRequest(job_id=first.id, request_id="rj1", reason="retry by hand")
    )
    second = answer.job
    assert not answer.deduplicated and second.id != first.id
    assert (second.parent_run_id, second.root_run_id) == (first.id, first.id)
    assert json_format.MessageToDict(second.spec.payload) == {"n": 1}
    await run(raw, seen, {"job": {"ok": True}})
    assert seen[-1].job.id == second.id and seen[-1].attempt == 1
    events = await api.trace.ListTraceEvents(tr.ListTraceEventsRequest(run_id=second.id))
    assert events.events[0].message == f"rerun of {first.id}: retry by hand"
    second = (await api.jobs.AwaitJob(j.AwaitJobRequest(job_id=second.id))).job
    assert second.state == c.RUN_STATE_COMPLETED
    again = await api.jobs.RerunJob(
        j.RerunJobRequest(job_id=first.id, request_id="rj1", reason="retry by hand")
    )
    assert again.deduplicated and again.job.id == second.id
    await expect_error(
        api.jobs.RerunJob(j.RerunJobRequest(job_id=first.id, request_id="rj1")),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    trig = {x.key for x in await annotations(api, second.id)}
    assert {"trigger.source", "trigger.reason", "trigger.parent_run_id"} <= trig
    # The new job's attestation names the failed job's last one.
    await parent_named(
        api, f"worker-completion:{second.id}", first.id, f"worker-failure:{first.id}:1"
    )
    # A chain of job reruns by root and parent.
    third = (await api.jobs.RerunJob(j.RerunJobRequest(job_id=second.id, request_id="rj2"))).job
    assert (third.parent_run_id, third.root_run_id) == (second.id, first.id)
    page = await api.jobs.ListJobs(j.ListJobsRequest(root_run_id=first.id))
    assert {x.id for x in page.jobs} == {second.id, third.id}
    page = await api.jobs.ListJobs(j.ListJobsRequest(parent_run_id=second.id))
    assert [x.id for x in page.jobs] == [third.id]
    await raw.close()


async def test_rerun_refusals(harness: Harness) -> None:
    api = harness.stubs()
    queued = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="q", job=c.JobSpec(service="nobody"))
        )
    ).job
    err, info, _ = await expect_error(
        api.jobs.RerunJob(j.RerunJobRequest(job_id=queued.id, request_id="r")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert info.reason == "JOB_STATE" and info.metadata["state"] == "QUEUED"
    assert "QUEUED" in err.details()
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="wf",
                name="n",
                steps=[c.WorkflowStepSpec(name="s", job=c.JobSpec(service="nobody"))],
            )
        )
    ).workflow
    _, _, violations = await expect_error(
        api.jobs.RerunJob(j.RerunJobRequest(job_id=wf.steps[0].job_id, request_id="r")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v[0] for v in violations] == ["job_id"]
    _, info, _ = await expect_error(
        api.jobs.RerunWorkflow(j.RerunWorkflowRequest(workflow_id=wf.id, request_id="r")),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert info.metadata["state"] == "QUEUED"
    await expect_error(
        api.jobs.RerunWorkflow(j.RerunWorkflowRequest(workflow_id="wf_missing", request_id="r")),
        grpc.StatusCode.NOT_FOUND,
    )
    _, _, violations = await expect_error(
        api.jobs.RerunWorkflow(j.RerunWorkflowRequest(workflow_id=wf.id)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v[0] for v in violations] == ["request_id"]
    # Nothing was stored by the refusals.
    page = await api.jobs.ListWorkflows(j.ListWorkflowsRequest())
    assert [x.id for x in page.workflows] == [wf.id]


async def test_a_fan_out_step_is_carried_over_or_rerun_whole(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    seen: list[w.Assignment] = []
    fan = c.WorkflowStepSpec(
        name="f",
        job=c.JobSpec(service="svc", max_attempts=1),
        depends_on=["l"],
        for_each=c.ForEach(step="l", path="items"),
    )
    first = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="wf", name="fan", steps=[step("l"), fan, step("z", "f")]
            )
        )
    ).workflow
    outcome: dict[str, Any] = {
        "l": {"items": [1, 2]},
        "f[0]": {"n": 1},
        "f[1]": {"n": 2},
        "z": RuntimeError("z broke"),
    }
    for _ in range(4):
        await run(raw, seen, outcome)
    first = await ended(api, first.id)
    assert first.state == c.RUN_STATE_FAILED
    old = {s.name: s for s in first.steps}

    # failed_only: l and f (with its result; not its children) are carried over.
    second = (await rerun(api, first.id, "r1", failed_only=True)).workflow
    assert [s.name for s in second.steps] == ["l", "f", "z"]
    assert [s.reused_from for s in second.steps] == [old["l"].job_id, old["f"].job_id, ""]
    outcome["z"] = {"z": 1}
    await run(raw, seen, outcome)
    assert (seen[-1].job.workflow_id, seen[-1].job.step_name) == (second.id, "z")
    assert upstream(seen[-1]) == {"f": [{"n": 1}, {"n": 2}]}
    assert (await ended(api, second.id)).state == c.RUN_STATE_COMPLETED

    # From f: l is carried over and f fans out at once over l's reused result.
    third = (await rerun(api, second.id, "r2", from_steps=["f"])).workflow
    assert {s.name: s.state for s in third.steps}["f"] == c.RUN_STATE_RUNNING
    outcome.update({"f[0]": {"n": 10}, "f[1]": {"n": 20}, "z": {"z": 2}})
    for _ in range(3):
        await run(raw, seen, outcome)
    assert [(x.job.workflow_id, x.job.step_name) for x in seen[-3:]] == [
        (third.id, "f[0]"),
        (third.id, "f[1]"),
        (third.id, "z"),
    ]
    assert json_format.MessageToDict(seen[-3].job.spec.payload) == {"item": 1}
    assert upstream(seen[-1]) == {"f": [{"n": 10}, {"n": 20}]}
    third = await ended(api, third.id)
    assert third.state == c.RUN_STATE_COMPLETED
    assert json_format.MessageToDict(third.outputs) == {"z": {"z": 2}}
    await raw.close()


async def test_clients_and_cli_rerun_and_list_lineage(sqlite_harness: Harness) -> None:
    api = sqlite_harness.stubs()
    t = sqlite_harness.target
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(request_id="wf", name="two", steps=[step("a"), step("b", "a")])
        )
    ).workflow
    await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=wf.id))
    async with Client(t) as jt:
        # From b, but a never completed (the run was cancelled): both run again.
        again = await jt.rerun_workflow(wf.id, from_steps=["b"], reason="retry")
        assert again.parent_run_id == wf.id and again.rerun_reason == "retry"
        assert [s.reused_from for s in again.steps] == ["", ""]
        same = await jt.rerun_workflow(wf.id, request_id="fixed")
        assert same.id == (await jt.rerun_workflow(wf.id, request_id="fixed")).id
        page = await jt.list_workflows(root_run_id=wf.id, include_total=True)
        assert page.total_size == 2

    def use() -> tuple[int | None, int]:
        with SyncClient(t) as jt:
            job = jt.submit_job("nobody")
            jt.cancel_job(job.id)
            rerun = jt.rerun_job(job.id, reason="by hand")
            assert rerun.parent_run_id == job.id
            listed = jt.list_jobs(parent_run_id=job.id, include_total=True)
            flows = jt.list_workflows(parent_run_id=wf.id)
            return listed.total_size, len(flows.items)

    assert await asyncio.to_thread(use) == (1, 2)
    code, out, err = await jobtrace("rerun", wf.id, "--reason", "cli", "--json", target=t)
    assert code == 0, err
    made = json.loads(out)
    assert made["parent_run_id"] == wf.id and made["rerun_reason"] == "cli"
    code, out, _ = await jobtrace("workflows", "--root", wf.id, "--json", target=t)
    assert code == 0 and len(json.loads(out)["workflows"]) == 3
    code, out, _ = await jobtrace("workflows", "--parent", made["id"], "--total", target=t)
    assert code == 0 and "0 shown of 0 matching" in out
    code, out, err = await jobtrace("rerun", wf.id, "--from", "a", "b", "--reason", "x", target=t)
    assert code == 0, err
    assert f"(rerun of {wf.id})" in out and "runs again: a, b" in out
    code, _, err = await jobtrace("rerun", wf.id, "--from", "nope", target=t)
    assert code != 0 and "nope" in err and "Traceback" not in err
    code, _, err = await jobtrace("rerun", wf.steps[0].job_id, target=t)
    assert code != 0 and "rerun the workflow" in err and "Traceback" not in err
