"""Results you can wait for, data between workflow steps, workflow outputs,
exact numbers and step progress: through the real server on both backends."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from jobtrace.client import Client, DeadlineExceeded, RunFailed, SyncClient
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, expect_error
from .workers import RawWorker


def struct(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


async def submit(api: Stubs, rid: str, service: str = "svc", **fields: Any) -> c.Job:
    request = j.SubmitJobRequest(request_id=rid, job=c.JobSpec(service=service, **fields))
    return (await api.jobs.SubmitJob(request)).job


def step(name: str, service: str, *depends_on: str, **fields: Any) -> c.WorkflowStepSpec:
    return c.WorkflowStepSpec(
        name=name, job=c.JobSpec(service=service, **fields), depends_on=list(depends_on)
    )


async def complete(raw: RawWorker, job_id: str, attempt: int = 1, **result: Any) -> None:
    await raw.send(complete=w.CompleteReport(job_id=job_id, attempt=attempt, **result))
    ack = await raw.expect("ack")
    assert ack.job_id == job_id


# --- AwaitJob / AwaitWorkflow ------------------------------------------------------


async def test_await_job_answers_when_the_worker_completes_it(api: Stubs) -> None:
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    job = await submit(api, "r1")
    waiting = asyncio.ensure_future(api.jobs.AwaitJob(j.AwaitJobRequest(job_id=job.id)))
    assignment = await raw.expect("assignment")
    await asyncio.sleep(0)  # let the call reach the server
    assert not waiting.done(), "it waits for the end"
    await complete(raw, assignment.job.id, result=struct({"size": 3}))
    answer = await asyncio.wait_for(waiting, 5)
    assert answer.job.state == c.RUN_STATE_COMPLETED
    assert json_format.MessageToDict(answer.job.result) == {"size": 3}
    # A job that has already ended is answered at once, even with a zero wait.
    again = await api.jobs.AwaitJob(j.AwaitJobRequest(job_id=job.id, timeout={"nanos": 1}))
    assert again.job.id == job.id and again.job.state == c.RUN_STATE_COMPLETED
    await raw.close()


async def test_await_job_past_its_timeout_is_deadline_exceeded_with_the_state(
    api: Stubs,
) -> None:
    job = await submit(api, "r1", service="nobody")
    _, info, _ = await expect_error(
        api.jobs.AwaitJob(j.AwaitJobRequest(job_id=job.id, timeout={"nanos": 200_000_000})),
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )
    assert info is not None and info.reason == "AWAIT_TIMEOUT"
    assert dict(info.metadata) == {"job_id": job.id, "state": "QUEUED"}
    # The call's own deadline bounds the wait the same way.
    _, info, _ = await expect_error(
        api.jobs.AwaitJob(j.AwaitJobRequest(job_id=job.id), timeout=0.5),
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )
    assert info is not None and info.reason == "AWAIT_TIMEOUT"


async def test_await_bad_requests_are_refused(api: Stubs) -> None:
    job = await submit(api, "r1", service="nobody")
    _, _, violations = await expect_error(
        api.jobs.AwaitJob(j.AwaitJobRequest(job_id=job.id, timeout={"seconds": 7200})),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v[0] for v in violations] == ["timeout"]
    await expect_error(
        api.jobs.AwaitJob(j.AwaitJobRequest(job_id="job_missing")), grpc.StatusCode.NOT_FOUND
    )
    await expect_error(
        api.jobs.AwaitWorkflow(j.AwaitWorkflowRequest(workflow_id="wf_missing")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_await_workflow_answers_a_failed_workflow_with_its_failure(api: Stubs) -> None:
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="wf", name="two", steps=[step("a", "svc"), step("b", "svc", "a")]
            )
        )
    ).workflow
    waiting = asyncio.ensure_future(
        api.jobs.AwaitWorkflow(j.AwaitWorkflowRequest(workflow_id=wf.id))
    )
    a = await raw.expect("assignment")
    await raw.send(
        fail=w.FailReport(job_id=a.job.id, attempt=1, error=c.ErrorDetail(message="boom"))
    )
    answer = (await asyncio.wait_for(waiting, 5)).workflow
    assert answer.state == c.RUN_STATE_FAILED and "boom" in answer.failure.reason
    await raw.close()


async def test_await_on_one_replica_sees_the_end_committed_on_another(pg_url: str) -> None:
    async with Harness(pg_url) as one:
        async with Harness(pg_url, signing_key_file=one.settings["signing_key_file"]) as two:
            on_one, on_two = one.stubs(), two.stubs()
            job = await submit(on_two, "r1", service="nobody")
            waiting = asyncio.ensure_future(
                on_one.jobs.AwaitJob(j.AwaitJobRequest(job_id=job.id, timeout={"seconds": 30}))
            )
            await asyncio.sleep(0.1)
            assert not waiting.done()
            await on_two.jobs.CancelJob(j.CancelJobRequest(job_id=job.id))
            answer = await asyncio.wait_for(waiting, 5)
            assert answer.job.state == c.RUN_STATE_CANCELLED


async def test_client_result_waits_and_raises_for_a_run_that_failed(
    sqlite_harness: Harness,
) -> None:
    api = sqlite_harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    async with Client(sqlite_harness.target) as jt:
        job = await jt.submit_job("svc", {"n": 1})
        waiting = asyncio.ensure_future(jt.result(job.id, timeout=30))
        a = await raw.expect("assignment")
        await complete(raw, a.job.id, result=struct({"bytes": 1048576}))
        assert await asyncio.wait_for(waiting, 5) == {"bytes": 1048576}
        with pytest.raises(DeadlineExceeded) as late:
            await jt.await_job((await jt.submit_job("nobody")).id, timeout=0.2)
        assert late.value.reason == "AWAIT_TIMEOUT"
        failing = await jt.submit_job("svc", max_attempts=1)
        a = await raw.expect("assignment")
        await raw.send(
            fail=w.FailReport(job_id=a.job.id, attempt=1, error=c.ErrorDetail(message="nope"))
        )
        with pytest.raises(RunFailed) as failed:
            await jt.result(failing.id, timeout=30)
        assert failed.value.state == "FAILED" and failed.value.failure.reason == "nope"
    await raw.close()

    def blocking() -> Any:
        with SyncClient(sqlite_harness.target) as sync:
            assert sync.await_job(job.id).state == c.RUN_STATE_COMPLETED
            return sync.result(job.id, timeout=5)

    assert await asyncio.to_thread(blocking) == {"bytes": 1048576}


# --- upstream results in the assignment ----------------------------------------------


def fan_in(rid: str = "wf", **fields: Any) -> j.SubmitWorkflowRequest:
    return j.SubmitWorkflowRequest(
        request_id=rid,
        name="fan-in",
        steps=[
            c.WorkflowStepSpec(name="a", job=c.JobSpec(service="svc"), independent=True),
            c.WorkflowStepSpec(name="b", job=c.JobSpec(service="svc"), independent=True),
            step("c", "svc", "a", "b"),
        ],
        **fields,
    )


async def run_roots(raw: RawWorker, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Complete the two root steps with these results; their assignments."""
    seen = {}
    for _ in results:
        assignment = await raw.expect("assignment")
        assert not assignment.upstream_json and not assignment.upstream_refs, "a root has none"
        seen[assignment.job.step_name] = assignment
        await complete(raw, assignment.job.id, result=struct(results[assignment.job.step_name]))
    return seen


async def test_a_dependent_step_receives_its_upstream_results(api: Stubs) -> None:
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=2)
    await api.jobs.SubmitWorkflow(fan_in())
    await run_roots(raw, {"a": {"bytes": 1048576, "path": "/tmp/x"}, "b": {"ok": True}})
    c_step = await raw.expect("assignment")
    assert c_step.job.step_name == "c"
    assert json.loads(c_step.upstream_json) == {
        "a": {"bytes": 1048576, "path": "/tmp/x"},
        "b": {"ok": True},
    }
    assert json_format.MessageToDict(c_step.upstream)["a"]["path"] == "/tmp/x"
    assert not c_step.upstream_refs
    await raw.close()


async def test_large_upstream_results_travel_by_reference(api: Stubs) -> None:
    big = {"blob": "x" * 300_000}
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=2)
    await api.jobs.SubmitWorkflow(fan_in())
    roots = await run_roots(raw, {"a": big, "b": {"small": 1}})
    c_step = await raw.expect("assignment")
    assert json.loads(c_step.upstream_json) == {"b": {"small": 1}}, "what fits stays inline"
    [ref] = c_step.upstream_refs
    assert ref.step_name == "a" and ref.job_id == roots["a"].job.id
    assert ref.size_bytes > 256 * 1024
    ask = w.GetStepResultRequest(job_id=c_step.job.id, attempt=1, worker_id="w", step_name="a")
    got = await api.workers.GetStepResult(ask)
    assert json.loads(got.result_json) == big
    assert json_format.MessageToDict(got.result) == big
    # Only the holder of the job's current attempt may read, and only its workflow's steps.
    for bad, code in [
        (dict(worker_id="other"), grpc.StatusCode.PERMISSION_DENIED),
        (dict(attempt=2), grpc.StatusCode.FAILED_PRECONDITION),
        (dict(step_name="nope"), grpc.StatusCode.NOT_FOUND),
        (dict(job_id="job_missing"), grpc.StatusCode.NOT_FOUND),
        (dict(step_name="bad name!"), grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        request = w.GetStepResultRequest()
        request.CopyFrom(ask)
        for k, v in bad.items():
            setattr(request, k, v)
        await expect_error(api.workers.GetStepResult(request), code)
    await complete(raw, c_step.job.id)
    _, info, _ = await expect_error(
        api.workers.GetStepResult(ask), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert info is not None and info.reason == "JOB_TERMINAL"
    await raw.close()


async def test_a_step_not_completed_is_refused(api: Stubs) -> None:
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=2)
    await api.jobs.SubmitWorkflow(
        j.SubmitWorkflowRequest(
            request_id="wf",
            name="pair",
            steps=[
                c.WorkflowStepSpec(name="a", job=c.JobSpec(service="svc"), independent=True),
                c.WorkflowStepSpec(name="b", job=c.JobSpec(service="svc"), independent=True),
            ],
        )
    )
    first = await raw.expect("assignment")
    other = "b" if first.job.step_name == "a" else "a"
    await raw.expect("assignment")
    _, info, _ = await expect_error(
        api.workers.GetStepResult(
            w.GetStepResultRequest(job_id=first.job.id, attempt=1, worker_id="w", step_name=other)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert info is not None and info.reason == "STEP_NOT_COMPLETED"
    await raw.close()


async def test_the_worker_runtime_exposes_upstream_results_on_ctx(harness: Harness) -> None:
    from .workers import runtime_worker

    api = harness.stubs()
    seen: dict[str, Any] = {}

    async def run(ctx: Any) -> dict[str, Any]:
        if ctx.job.step_name == "a":
            return {"blob": "y" * 300_000}
        if ctx.job.step_name == "b":
            return {"count": 7}
        seen.update(ctx.upstream)
        return {"sum": len(ctx.upstream["a"]["blob"]) + ctx.upstream["b"]["count"]}

    async with runtime_worker(harness.target, {"svc": run}, max_concurrency=2):
        wf = (await api.jobs.SubmitWorkflow(fan_in())).workflow
        done = await api.jobs.AwaitWorkflow(
            j.AwaitWorkflowRequest(workflow_id=wf.id, timeout={"seconds": 30})
        )
    assert done.workflow.state == c.RUN_STATE_COMPLETED
    assert seen["a"] == {"blob": "y" * 300_000}, "fetched by reference, transparently"
    assert seen["b"] == {"count": 7} and type(seen["b"]["count"]) is int
