"""Fan-out inside a workflow (WorkflowStepSpec.for_each): one child job per
item of a list in an upstream result, their results as a list in item order
for the steps after it. Through the real server on both backends."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
from google.protobuf import struct_pb2

from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, expect_error
from .workers import RawWorker, runtime_worker

EXACT = (("jobtrace-json", "exact"),)


def struct(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


def fan_out_workflow(rid: str = "wf", path: str = "files") -> j.SubmitWorkflowRequest:
    return j.SubmitWorkflowRequest(
        request_id=rid,
        name="fan-out",
        steps=[
            c.WorkflowStepSpec(name="list", job=c.JobSpec(service="svc")),
            c.WorkflowStepSpec(
                name="each",
                job=c.JobSpec(service="svc", payload=struct({"mode": "fast"})),
                depends_on=["list"],
                for_each=c.ForEach(step="list", path=path),
            ),
            c.WorkflowStepSpec(name="sum", job=c.JobSpec(service="svc"), depends_on=["each"]),
        ],
    )


async def wait_workflow(api: Stubs, workflow_id: str) -> c.Workflow:
    answer = await api.jobs.AwaitWorkflow(
        j.AwaitWorkflowRequest(workflow_id=workflow_id, timeout={"seconds": 30}), metadata=EXACT
    )
    return answer.workflow


async def test_a_step_fans_out_per_item_and_the_next_step_gets_the_results_in_order(
    harness: Harness,
) -> None:
    api = harness.stubs()
    items_seen: list[Any] = []
    upstream_seen: dict[str, Any] = {}

    async def run(ctx: Any) -> dict[str, Any]:
        if ctx.job.step_name == "list":
            return {"files": ["a", 2, "ccc"]}
        if ctx.job.step_name.startswith("each["):
            items_seen.append(ctx.item)
            assert ctx.payload["mode"] == "fast", "the step's payload, with the item"
            # The last item finishes first: the order is the items', not the ends'.
            await asyncio.sleep(0.2 if ctx.item == "a" else 0)
            return {"item": ctx.item, "n": 10 + len(str(ctx.item))}
        upstream_seen.update(ctx.upstream)
        assert ctx.item is None
        return {"total": sum(r["n"] for r in ctx.upstream["each"])}

    async with runtime_worker(harness.target, {"svc": run}, max_concurrency=3):
        wf = (await api.jobs.SubmitWorkflow(fan_out_workflow())).workflow
        done = await wait_workflow(api, wf.id)
    assert done.state == c.RUN_STATE_COMPLETED, done.failure.reason
    assert sorted(map(str, items_seen)) == ["2", "a", "ccc"]
    assert upstream_seen["each"] == [
        {"item": "a", "n": 11},
        {"item": 2, "n": 11},
        {"item": "ccc", "n": 13},
    ]
    # Progress counts the children: 3 steps and 3 children.
    assert (done.progress.completed_steps, done.progress.total_steps) == (6, 6)
    names = [s.name for s in done.steps]
    assert names == ["list", "each", "sum", "each[0]", "each[1]", "each[2]"]
    assert json.loads(done.outputs_json) == {"sum": {"total": 35}}, "children are not outputs"


async def test_progress_counts_children_while_they_run(api: Stubs) -> None:
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=3)
    wf = (await api.jobs.SubmitWorkflow(fan_out_workflow())).workflow
    a = await raw.expect("assignment")
    await raw.send(
        complete=w.CompleteReport(job_id=a.job.id, attempt=1, result=struct({"files": [1, 2]}))
    )
    await raw.expect("ack")
    first = await raw.expect("assignment")
    await raw.expect("assignment")
    assert first.job.step_name in ("each[0]", "each[1]")
    await raw.send(complete=w.CompleteReport(job_id=first.job.id, attempt=1))
    await raw.expect("ack")
    got = (await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf.id))).workflow
    assert (got.progress.completed_steps, got.progress.total_steps) == (2, 5)
    await raw.close()


async def test_an_empty_list_completes_the_step_with_an_empty_list(harness: Harness) -> None:
    api = harness.stubs()
    upstream_seen: dict[str, Any] = {}

    async def run(ctx: Any) -> dict[str, Any]:
        if ctx.job.step_name == "list":
            return {"files": []}
        assert not ctx.job.step_name.startswith("each"), "no child, and the step runs no job"
        upstream_seen.update(ctx.upstream)
        return {}

    async with runtime_worker(harness.target, {"svc": run}):
        wf = (await api.jobs.SubmitWorkflow(fan_out_workflow())).workflow
        done = await wait_workflow(api, wf.id)
    assert done.state == c.RUN_STATE_COMPLETED
    assert upstream_seen == {"each": []}
    assert (done.progress.completed_steps, done.progress.total_steps) == (3, 3)


async def test_more_items_than_the_bound_fail_the_step_with_a_reason(harness: Harness) -> None:
    api = harness.stubs()

    async def run(ctx: Any) -> dict[str, Any]:
        assert ctx.job.step_name == "list", "nothing else runs"
        return {"files": list(range(1001))}

    async with runtime_worker(harness.target, {"svc": run}):
        wf = (await api.jobs.SubmitWorkflow(fan_out_workflow())).workflow
        done = await wait_workflow(api, wf.id)
    assert done.state == c.RUN_STATE_FAILED
    assert "1001 items" in done.failure.reason and "at most 1,000" in done.failure.reason
    states = {s.name: s.state for s in done.steps}
    assert states == {
        "list": c.RUN_STATE_COMPLETED,
        "each": c.RUN_STATE_FAILED,
        "sum": c.RUN_STATE_CANCELLED,
    }, "no child was created"


async def test_a_failing_child_fails_the_workflow_and_cancels_the_rest(api: Stubs) -> None:
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=4)
    wf = (await api.jobs.SubmitWorkflow(fan_out_workflow())).workflow
    a = await raw.expect("assignment")
    await raw.send(
        complete=w.CompleteReport(job_id=a.job.id, attempt=1, result=struct({"files": [1, 2, 3]}))
    )
    await raw.expect("ack")
    children = [await raw.expect("assignment") for _ in range(3)]
    child = next(x for x in children if x.job.step_name == "each[1]")
    await raw.send(
        fail=w.FailReport(
            job_id=child.job.id, attempt=1, error=c.ErrorDetail(message="corrupt file")
        )
    )
    done = await wait_workflow(api, wf.id)
    assert done.state == c.RUN_STATE_FAILED
    assert "each" in done.failure.reason and "item 1" in done.failure.reason
    assert "corrupt file" in done.failure.reason
    states = {s.name: s.state for s in done.steps}
    assert states == {
        "list": c.RUN_STATE_COMPLETED,
        "each": c.RUN_STATE_FAILED,
        "sum": c.RUN_STATE_CANCELLED,
        "each[0]": c.RUN_STATE_CANCELLED,
        "each[1]": c.RUN_STATE_FAILED,
        "each[2]": c.RUN_STATE_CANCELLED,
    }
    await raw.close()


async def test_a_bad_for_each_is_refused_with_its_field_path(api: Stubs) -> None:
    request = j.SubmitWorkflowRequest(
        request_id="bad",
        name="bad",
        steps=[
            c.WorkflowStepSpec(name="list", job=c.JobSpec(service="svc")),
            c.WorkflowStepSpec(name="other", job=c.JobSpec(service="svc"), independent=True),
            c.WorkflowStepSpec(
                name="each",
                job=c.JobSpec(service="svc"),
                depends_on=["list"],
                for_each=c.ForEach(step="other", path="files"),
            ),
            c.WorkflowStepSpec(
                name="each2",
                job=c.JobSpec(service="svc", payload=struct({"item": 1})),
                depends_on=["list"],
                for_each=c.ForEach(step="list", path="a..b"),
            ),
        ],
    )
    _, _, violations = await expect_error(
        api.jobs.SubmitWorkflow(request), grpc.StatusCode.INVALID_ARGUMENT
    )
    fields = dict(violations)
    assert set(fields) == {"steps[3].for_each.path", "steps[3].job.payload"}, fields
    # The dependency rule is checked once the rest is valid.
    del request.steps[3]
    _, _, violations = await expect_error(
        api.jobs.SubmitWorkflow(request), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert [f for f, _ in violations] == ["steps[2].for_each.step"]
    assert "'list'" in violations[0][1]
    listed = await api.jobs.ListWorkflows(j.ListWorkflowsRequest())
    assert not listed.workflows, "nothing stored"


def test_a_workflow_file_declares_for_each_and_a_misspelt_key_is_named() -> None:
    import pytest

    from jobtrace.client.errors import InvalidInput
    from jobtrace.client.workflow_file import load_workflow

    text = """
name: x
steps:
  - {name: list, service: svc}
  - {name: each, service: svc, depends_on: [list], for_each: {step: list, path: files}}
"""
    workflow = load_workflow(text)
    assert workflow.steps[1]["for_each"] == {"step": "list", "path": "files"}
    with pytest.raises(InvalidInput) as bad:
        load_workflow(text.replace("path: files", "pth: files"))
    assert [v.field for v in bad.value.violations] == ["steps[1].for_each.pth"]


async def test_the_client_submits_a_dict_step_with_for_each(harness: Harness) -> None:
    from jobtrace.client import Client

    async def run(ctx: Any) -> dict[str, Any]:
        if ctx.job.step_name == "list":
            return {"batch": {"items": [{"n": 1}, {"n": 2}]}}
        return {"double": ctx.item["n"] * 2}

    async with runtime_worker(harness.target, {"svc": run}, max_concurrency=2):
        async with Client(harness.target) as client:
            wf = await client.submit_workflow(
                "dicts",
                [
                    {"name": "list", "job": {"service": "svc"}},
                    {
                        "name": "each",
                        "job": {"service": "svc"},
                        "for_each": {"step": "list", "path": "batch.items"},
                    },
                ],
            )
            done = await wait_workflow(harness.stubs(), wf.id)
    assert done.state == c.RUN_STATE_COMPLETED, done.failure.reason
    assert json.loads(done.outputs_json) == {"each": [{"double": 2}, {"double": 4}]}


async def test_a_child_retries_as_its_job_allows_before_it_fails_the_step(api: Stubs) -> None:
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=2)
    request = fan_out_workflow()
    request.steps[1].job.max_attempts = 2
    request.steps[1].job.backoff.initial_interval.FromMilliseconds(1)
    wf = (await api.jobs.SubmitWorkflow(request)).workflow
    a = await raw.expect("assignment")
    await raw.send(
        complete=w.CompleteReport(job_id=a.job.id, attempt=1, result=struct({"files": ["x"]}))
    )
    await raw.expect("ack")
    child = await raw.expect("assignment")
    assert child.job.step_name == "each[0]" and child.job.spec.max_attempts == 2
    error = c.ErrorDetail(message="flaky")
    await raw.send(fail=w.FailReport(job_id=child.job.id, attempt=1, error=error, retryable=True))
    again = await raw.expect("assignment")
    assert (again.job.id, again.attempt) == (child.job.id, 2), "the same child, retried"
    got = (await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf.id))).workflow
    assert got.state == c.RUN_STATE_RUNNING, "a retry does not fail the step"
    await raw.send(fail=w.FailReport(job_id=child.job.id, attempt=2, error=error, retryable=True))
    done = await wait_workflow(api, wf.id)
    assert done.state == c.RUN_STATE_FAILED and "item 0 failed: flaky" in done.failure.reason
    await raw.close()


async def test_two_fan_outs_of_one_step_one_empty_each_run_once(harness: Harness) -> None:
    api = harness.stubs()
    runs: list[str] = []

    async def run(ctx: Any) -> dict[str, Any]:
        runs.append(ctx.job.step_name)
        if ctx.job.step_name == "list":
            return {"none": [], "two": ["x", "y"]}
        return {"got": ctx.item}

    request = j.SubmitWorkflowRequest(
        request_id="two",
        name="two",
        steps=[
            c.WorkflowStepSpec(name="list", job=c.JobSpec(service="svc")),
            c.WorkflowStepSpec(
                name="empty",
                job=c.JobSpec(service="svc"),
                depends_on=["list"],
                for_each=c.ForEach(step="list", path="none"),
            ),
            c.WorkflowStepSpec(
                name="pair",
                job=c.JobSpec(service="svc"),
                depends_on=["list"],
                for_each=c.ForEach(step="list", path="two"),
            ),
        ],
    )
    async with runtime_worker(harness.target, {"svc": run}, max_concurrency=2):
        wf = (await api.jobs.SubmitWorkflow(request)).workflow
        done = await wait_workflow(api, wf.id)
    assert done.state == c.RUN_STATE_COMPLETED, done.failure.reason
    assert sorted(runs) == ["list", "pair[0]", "pair[1]"], "each child once"
    assert [s.name for s in done.steps] == ["list", "empty", "pair", "pair[0]", "pair[1]"]
    assert json.loads(done.outputs_json) == {"empty": [], "pair": [{"got": "x"}, {"got": "y"}]}


async def test_a_fan_out_ending_at_once_keeps_the_progress_of_the_step_before(
    harness: Harness,
) -> None:
    """The upstream step's completion is counted in the workflow's progress even
    when the fan-out it starts ends at once (an empty list): 1 of 3, 2 of 3, 3 of 3."""
    api = harness.stubs()

    async def run(ctx: Any) -> dict[str, Any]:
        return {"files": []} if ctx.job.step_name == "list" else {"ok": True}

    async with runtime_worker(harness.target, {"svc": run}):
        wf = (await api.jobs.SubmitWorkflow(fan_out_workflow("progress"))).workflow
        done = await wait_workflow(api, wf.id)
    assert done.state == c.RUN_STATE_COMPLETED, done.failure.reason
    events = (
        await api.trace.ListTraceEvents(
            t.ListTraceEventsRequest(run_id=wf.id, node_id="workflow", page_size=100)
        )
    ).events
    progress = [
        (e.step_number, e.total_steps) for e in events if e.type == c.TRACE_EVENT_TYPE_PROGRESS
    ]
    assert progress == [(1, 3), (2, 3), (3, 3)], progress
