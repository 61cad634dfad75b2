"""Results you can wait for, data between workflow steps, workflow outputs,
exact numbers and step progress: through the real server on both backends."""

from __future__ import annotations

import asyncio
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
