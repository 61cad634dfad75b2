"""Workers over the bidi stream: dispatch, fencing, leases, retries, workflows, feeds."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from jobtrace.client.worker import JobContext, NonRetryableError
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, wait_for
from .workers import RawWorker, demo_worker_process, runtime_worker

FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]


def spec(service: str = "svc", **fields: Any) -> c.JobSpec:
    payload = fields.pop("payload", None)
    s = c.JobSpec(service=service, **fields)
    if payload:
        s.payload.update(payload)
    return s


async def submit(api: Stubs, rid: str, service: str = "svc", **fields: Any) -> c.Job:
    return (
        await api.jobs.SubmitJob(j.SubmitJobRequest(request_id=rid, job=spec(service, **fields)))
    ).job


async def get(api: Stubs, job_id: str) -> c.Job:
    return (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id))).job


async def state_is(api: Stubs, job_id: str, state: int) -> c.Job | None:
    job = await get(api, job_id)
    return job if job.state == state else None


async def test_submitted_job_is_pushed_to_a_waiting_worker_and_completes(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    welcome = await raw.hello("w1", ["svc"])
    assert welcome.session_id and welcome.lease_duration.seconds == 30
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(
                request_id="r1",
                job=spec(payload={"n": 1}),
                request_context=c.RequestContext(user_context=c.UserContext(user_id="u1")),
            )
        )
    ).job
    started = time.monotonic()
    assignment = await raw.expect("assignment")
    assert time.monotonic() - started < 1.0, "dispatch is pushed, not polled"
    assert assignment.job.id == job.id and assignment.attempt == 1
    assert assignment.job.spec.payload["n"] == 1
    assert assignment.request_context.user_context.user_id == "u1"
    assert assignment.request_context.metadata.request_id == "r1"
    assert assignment.HasField("lease_deadline")
    running = await get(api, job.id)
    assert running.state == c.RUN_STATE_RUNNING and running.worker_id == "w1"
    mid = await raw.send(
        progress=w.ProgressReport(job_id=job.id, attempt=1, percent=40, message="m")
    )
    assert (await raw.expect("ack")).message_id == mid
    assert (await get(api, job.id)).progress.percent == 40
    result = struct_pb2.Struct()
    result.update({"ok": True})
    mid = await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1, result=result))
    ack = await raw.expect("ack")
    assert ack.message_id == mid and ack.job_id == job.id
    done = await get(api, job.id)
    assert done.state == c.RUN_STATE_COMPLETED and done.result["ok"] is True
    assert done.HasField("completed_at")
    await raw.close()


async def test_first_message_must_be_hello(api: Stubs) -> None:
    raw = RawWorker(api)
    await raw.send(heartbeat=w.WorkerHeartbeat())
    error = await raw.expect("error")
    assert error.fatal and error.reason == "HELLO_REQUIRED"
    assert error.code == FAILED_PRECONDITION
    assert await raw.call.read() is grpc.aio.EOF


async def test_bad_hello_is_refused(api: Stubs) -> None:
    raw = RawWorker(api)
    await raw.send(hello=w.WorkerHello(worker_id="", services=[]))
    error = await raw.expect("error")
    assert error.fatal and error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "hello.worker_id" in error.message and "hello.services" in error.message


async def test_reports_about_unknown_or_foreign_jobs_are_refused_and_stream_stays_up(
    harness: Harness,
) -> None:
    api = harness.stubs()
    owner, intruder = RawWorker(api), RawWorker(api)
    await owner.hello("owner", ["svc"])
    await intruder.hello("intruder", ["other"])
    job = await submit(api, "r1")
    await owner.expect("assignment")
    await intruder.send(complete=w.CompleteReport(job_id="job_nope", attempt=1))
    error = await intruder.expect("error")
    assert error.code == grpc.StatusCode.NOT_FOUND.value[0] and error.reason == "UNKNOWN_JOB"
    assert not error.fatal and error.message_kind == "complete"
    await intruder.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
    error = await intruder.expect("error")
    assert error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert error.reason == "NOT_LEASE_HOLDER" and error.job_id == job.id
    await intruder.send(heartbeat=w.WorkerHeartbeat())
    assert (await intruder.recv()).WhichOneof("kind") == "heartbeat_ack"
    stored = await get(api, job.id)
    assert stored.state == c.RUN_STATE_RUNNING and stored.worker_id == "owner"
    await owner.close()
    await intruder.close()


async def test_stale_attempt_result_is_refused(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    job = await submit(api, "r1", backoff=c.BackoffPolicy(initial_interval={"nanos": 1_000_000}))
    first = await raw.expect("assignment")
    await raw.send(
        fail=w.FailReport(
            job_id=job.id,
            attempt=1,
            retryable=True,
            error=c.ErrorDetail(message="flaky", code="E1"),
        )
    )
    await raw.expect("ack")
    second = await raw.expect("assignment")
    assert first.attempt == 1 and second.attempt == 2
    before = await get(api, job.id)
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
    error = await raw.expect("error")
    assert error.code == FAILED_PRECONDITION and error.reason == "STALE_ATTEMPT"
    assert await get(api, job.id) == before, "a refused report changes nothing"
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=2))
    await raw.expect("ack")
    done = await get(api, job.id)
    assert done.state == c.RUN_STATE_COMPLETED and done.attempt == 2
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=2))
    error = await raw.expect("error")
    assert error.reason == "DUPLICATE_REPORT"
    assert error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert await get(api, job.id) == done
    await raw.close()


async def test_worker_killed_mid_job_is_retried_on_another_worker(
    harness: Harness, tmp_path: Path
) -> None:
    api = harness.stubs()
    proc = await demo_worker_process(harness.target, "doomed", concurrency=1)
    try:
        job = await submit(api, "long", "demo", payload={"seconds": 120})
        running = await wait_for(lambda: state_is(api, job.id, c.RUN_STATE_RUNNING), timeout=20)
        assert running.worker_id == "doomed" and running.attempt == 1
        proc.send_signal(signal.SIGKILL)
        await proc.wait()

        async def quick(ctx: JobContext) -> dict[str, Any]:
            return {"attempt": ctx.attempt}

        async with runtime_worker(harness.target, {"demo": quick}, worker_id="survivor"):
            done = await wait_for(lambda: state_is(api, job.id, c.RUN_STATE_COMPLETED), timeout=15)
        assert done.attempt == 2 and done.worker_id == "survivor"
        assert done.result["attempt"] == 2
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cancel_reaches_a_running_handler(harness: Harness) -> None:
    api = harness.stubs()
    started, stopped = asyncio.Event(), asyncio.Event()
    reasons: list[str] = []

    async def wait_forever(ctx: JobContext) -> dict[str, Any]:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            reasons.append(ctx.cancel_reason)
            stopped.set()
        return {}

    async with runtime_worker(harness.target, {"svc": wait_forever}):
        job = await submit(api, "c1")
        await asyncio.wait_for(started.wait(), 5)
        t0 = time.monotonic()
        cancelled = (await api.jobs.CancelJob(j.CancelJobRequest(job_id=job.id))).job
        assert cancelled.state == c.RUN_STATE_CANCELLED
        await asyncio.wait_for(stopped.wait(), 5)
        assert time.monotonic() - t0 < 1.0, "cancel arrives within one round trip"
        assert reasons == ["Run cancelled by user"]
    assert (await get(api, job.id)).state == c.RUN_STATE_CANCELLED


async def test_dispatch_order_is_priority_then_age(harness: Harness) -> None:
    api = harness.stubs()
    low = await submit(api, "low", priority=1)
    high_old = await submit(api, "high-old", priority=10)
    mid = await submit(api, "mid", priority=5)
    high_new = await submit(api, "high-new", priority=10)
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"], max_concurrency=1)
    order = []
    for _ in range(4):
        a = await raw.expect("assignment")
        order.append(a.job.id)
        await raw.send(complete=w.CompleteReport(job_id=a.job.id, attempt=a.attempt))
    assert order == [high_old.id, high_new.id, mid.id, low.id]
    await raw.close()


async def test_affinity_is_preferred_but_never_waited_for(harness: Harness) -> None:
    api = harness.stubs()
    cached, plain = RawWorker(api), RawWorker(api)
    await plain.hello("plain", ["svc"], max_concurrency=1)
    await cached.hello("cached", ["svc"], max_concurrency=1, affinity_keys=["model-a"])
    first = await submit(api, "a1", affinity_keys=["model-a"])
    assert (await cached.expect("assignment")).job.id == first.id
    # The preferred worker is busy: the next job with the same key still runs.
    second = await submit(api, "a2", affinity_keys=["model-a"])
    assert (await plain.expect("assignment")).job.id == second.id
    await cached.close()
    await plain.close()


async def test_concurrency_is_never_exceeded(harness: Harness) -> None:
    api = harness.stubs()
    active = 0
    peak = 0

    async def busy(ctx: JobContext) -> dict[str, Any]:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.02)
        active -= 1
        return {}

    ids = [(await submit(api, f"j{i}")).id for i in range(30)]
    async with runtime_worker(harness.target, {"svc": busy}, max_concurrency=3) as worker:
        held_peak = 0

        async def all_done() -> bool:
            nonlocal held_peak
            assert harness.server is not None
            for info in harness.server.scheduler.snapshot().values():
                held_peak = max(held_peak, len(info["held"]))
            jobs = (await api.jobs.ListJobs(j.ListJobsRequest(state=c.RUN_STATE_COMPLETED))).jobs
            return len(jobs) == len(ids)

        await wait_for(all_done, timeout=20)
        assert worker.completed == 30
    assert peak == 3 and held_peak <= 3


async def test_workflow_with_parallel_branch_runs_in_dependency_order(harness: Harness) -> None:
    api = harness.stubs()
    events: list[str] = []

    async def record(ctx: JobContext) -> dict[str, Any]:
        step = ctx.job.step_name
        events.append(f"start:{step}")
        await asyncio.sleep(0.05)
        events.append(f"end:{step}")
        return {"step": step}

    request = j.SubmitWorkflowRequest(
        request_id="wf",
        name="diamond",
        steps=[
            c.WorkflowStepSpec(name="a", job=spec()),
            c.WorkflowStepSpec(name="b", job=spec(), depends_on=["a"]),
            c.WorkflowStepSpec(name="c", job=spec(), depends_on=["a"]),
            c.WorkflowStepSpec(name="d", job=spec(), depends_on=["b", "c"]),
        ],
    )
    wf = (await api.jobs.SubmitWorkflow(request)).workflow
    watch = api.jobs.WatchWorkflow(j.WatchWorkflowRequest(workflow_id=wf.id))
    async with runtime_worker(harness.target, {"svc": record}, max_concurrency=4):
        states = [m.workflow.state async for m in watch]
    assert states[0] == c.RUN_STATE_QUEUED and states[-1] == c.RUN_STATE_COMPLETED
    assert c.RUN_STATE_RUNNING in states
    pos = {e: i for i, e in enumerate(events)}
    assert pos["end:a"] < pos["start:b"] and pos["end:a"] < pos["start:c"]
    assert pos["start:c"] < pos["end:b"] and pos["start:b"] < pos["end:c"], "b and c in parallel"
    assert pos["end:b"] < pos["start:d"] and pos["end:c"] < pos["start:d"]
    final = (await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf.id))).workflow
    assert final.state == c.RUN_STATE_COMPLETED
    assert final.progress.completed_steps == 4 and final.progress.percent == 100
    assert final.HasField("started_at") and final.HasField("completed_at")


async def test_terminal_failure_fails_the_workflow_and_cancels_the_rest(harness: Harness) -> None:
    api = harness.stubs()

    async def broken(ctx: JobContext) -> dict[str, Any]:
        raise NonRetryableError("bad input", code="BAD_INPUT")

    request = j.SubmitWorkflowRequest(
        request_id="wf",
        name="w",
        steps=[
            c.WorkflowStepSpec(name="a", job=spec("broken")),
            c.WorkflowStepSpec(name="b", job=spec()),
            c.WorkflowStepSpec(name="side", job=spec("slow"), independent=True),
        ],
    )
    wf = (await api.jobs.SubmitWorkflow(request)).workflow
    side_cancelled = asyncio.Event()

    async def slow(ctx: JobContext) -> dict[str, Any]:
        try:
            await asyncio.sleep(3600)
        finally:
            side_cancelled.set()
        return {}

    async with runtime_worker(harness.target, {"slow": slow}, worker_id="slow"):
        side = wf.steps[2].job_id
        await wait_for(lambda: state_is(api, side, c.RUN_STATE_RUNNING))
        async with runtime_worker(harness.target, {"broken": broken}, worker_id="broken"):

            async def ended() -> Any:
                got = await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf.id))
                return got.workflow if got.workflow.state == c.RUN_STATE_FAILED else None

            final = await wait_for(ended, timeout=10)
        await asyncio.wait_for(side_cancelled.wait(), 5)
    steps = {s.name: s for s in final.steps}
    assert steps["a"].state == c.RUN_STATE_FAILED
    assert steps["b"].state == c.RUN_STATE_CANCELLED
    assert steps["side"].state == c.RUN_STATE_CANCELLED
    assert "bad input" in final.failure.reason and final.failure.code == "BAD_INPUT"
    failed = await get(api, steps["a"].job_id)
    assert failed.failure.code == "BAD_INPUT" and not failed.failure.retryable
    assert failed.attempt == 1, "a non-retryable failure is not retried"


async def test_retryable_failure_is_retried_until_attempts_run_out(harness: Harness) -> None:
    api = harness.stubs()
    attempts: dict[str, list[int]] = {}

    async def flaky(ctx: JobContext) -> dict[str, Any]:
        attempts.setdefault(ctx.job_id, []).append(ctx.attempt)
        if ctx.payload.get("succeed_on") == ctx.attempt:
            return {"ok": True}
        raise RuntimeError(f"boom {ctx.attempt}")

    fast_backoff = c.BackoffPolicy(initial_interval={"nanos": 10_000_000}, multiplier=2.0)
    ok = await submit(api, "ok", payload={"succeed_on": 2}, backoff=fast_backoff)
    doomed = await submit(api, "doomed", max_attempts=3, backoff=fast_backoff)
    async with runtime_worker(harness.target, {"svc": flaky}, max_concurrency=2):
        done = await wait_for(lambda: state_is(api, ok.id, c.RUN_STATE_COMPLETED), timeout=10)
        failed = await wait_for(lambda: state_is(api, doomed.id, c.RUN_STATE_FAILED), timeout=10)
    assert done.attempt == 2 and attempts[ok.id] == [1, 2]
    assert failed.attempt == 3 and attempts[doomed.id] == [1, 2, 3]
    assert failed.failure.reason == "boom 3" and failed.failure.attempt == 3


async def test_backoff_delays_the_retry(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    job = await submit(api, "b", backoff=c.BackoffPolicy(initial_interval={"nanos": 400_000_000}))
    await raw.expect("assignment")
    await raw.send(
        fail=w.FailReport(
            job_id=job.id, attempt=1, retryable=True, error=c.ErrorDetail(message="later")
        )
    )
    await raw.expect("ack")
    waiting = await get(api, job.id)
    assert waiting.state == c.RUN_STATE_QUEUED and waiting.HasField("next_attempt_at")
    assert waiting.failure.retryable and waiting.failure.reason == "later"
    failed_us = waiting.updated_at.ToMicroseconds()
    retry_us = waiting.next_attempt_at.ToMicroseconds()
    assert retry_us - failed_us == 400_000, "the first retry waits the initial interval"
    second = await raw.expect("assignment", timeout=5)
    assert second.attempt == 2
    # Server timestamps, so a slow test process cannot make the check pass or fail.
    started_us = second.job.started_at.ToMicroseconds()
    assert retry_us <= started_us < retry_us + 2_000_000, "retried at its time, pushed"
    await raw.close()


async def test_silent_worker_loses_its_lease(fast: Harness) -> None:
    api = fast.stubs()
    silent = RawWorker(api)
    await silent.hello("silent", ["svc"])
    job = await submit(api, "s", max_attempts=1)
    await silent.expect("assignment")
    # No heartbeats: the lease (1 s) expires although the stream is open.
    failed = await wait_for(lambda: state_is(api, job.id, c.RUN_STATE_FAILED), timeout=10)
    assert failed.failure.reason == "lease expired" and failed.failure.code == "LEASE_EXPIRED"
    error = await silent.expect("error")
    assert error.fatal and error.reason == "HEARTBEAT_TIMEOUT"


async def test_heartbeats_keep_the_lease_alive(fast: Harness) -> None:
    api = fast.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    job = await submit(api, "hb")
    a = await raw.expect("assignment")
    deadline = time.monotonic() + 2.5  # 2.5 lease lengths
    while time.monotonic() < deadline:
        await raw.send(
            heartbeat=w.WorkerHeartbeat(running=[w.JobAttempt(job_id=job.id, attempt=1)])
        )
        ack = await raw.expect("heartbeat_ack")
        assert not ack.cancels
        await asyncio.sleep(0.2)
    still = await get(api, job.id)
    assert still.state == c.RUN_STATE_RUNNING and still.attempt == a.attempt == 1
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
    await raw.expect("ack")


async def test_closed_stream_gives_jobs_back_for_retry(no_grace: Harness) -> None:
    api = no_grace.stubs()
    first = RawWorker(api)
    await first.hello("first", ["svc"])
    job = await submit(api, "x", backoff=c.BackoffPolicy(initial_interval={"nanos": 1_000_000}))
    await first.expect("assignment")
    await first.close()
    second = RawWorker(api)
    await second.hello("second", ["svc"])
    again = await second.expect("assignment")
    assert again.job.id == job.id and again.attempt == 2
    first_failure = await get(api, job.id)
    assert first_failure.worker_id == "second"
    await second.close()


async def test_job_past_its_timeout_is_timed_out_and_its_worker_cancelled(harness: Harness) -> None:
    api = harness.stubs()
    cancelled = asyncio.Event()

    async def hang(ctx: JobContext) -> dict[str, Any]:
        try:
            await asyncio.sleep(3600)
        finally:
            cancelled.set()
        return {}

    async with runtime_worker(harness.target, {"svc": hang}):
        job = await submit(api, "t", timeout={"nanos": 300_000_000})
        timed_out = await wait_for(lambda: state_is(api, job.id, c.RUN_STATE_TIMED_OUT), timeout=10)
        await asyncio.wait_for(cancelled.wait(), 5)
    assert timed_out.failure.code == "TIMED_OUT"


async def test_not_before_holds_a_job_back_until_its_time(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    later = c.JobSpec(service="svc")
    not_before_ns = time.time_ns() + 500_000_000
    later.not_before.FromNanoseconds(not_before_ns)
    job = (await api.jobs.SubmitJob(j.SubmitJobRequest(request_id="nb", job=later))).job
    a = await raw.expect("assignment", timeout=5)
    # Server and test share one clock: the job must not be handed out before its time,
    # however long the submit itself took.
    assert a.job.id == job.id
    assert time.time_ns() >= not_before_ns
    assert a.job.started_at.ToMicroseconds() >= not_before_ns // 1000
    await raw.close()


async def test_watch_job_streams_every_change_until_terminal(harness: Harness) -> None:
    api = harness.stubs()
    job = await submit(api, "watched")
    watch = api.jobs.WatchJob(j.WatchJobRequest(job_id=job.id))
    first = await watch.read()
    assert first.job.state == c.RUN_STATE_QUEUED
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    await raw.expect("assignment")
    for pct in (10, 60):
        await raw.send(progress=w.ProgressReport(job_id=job.id, attempt=1, percent=pct))
        await raw.expect("ack")
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
    await raw.expect("ack")
    rest = []
    while (message := await watch.read()) is not grpc.aio.EOF:
        rest.append(message.job)
    assert [(m.state, m.progress.percent) for m in rest] == [
        (c.RUN_STATE_RUNNING, 0),
        (c.RUN_STATE_RUNNING, 10),
        (c.RUN_STATE_RUNNING, 60),
        (c.RUN_STATE_COMPLETED, 100),
    ]
    assert harness.server is not None
    await wait_for(lambda: harness.server.jobs.feed.subscriber_count == 0)
    await raw.close()


async def test_cancelled_watch_leaves_no_subscriber(harness: Harness) -> None:
    api = harness.stubs()
    job = await submit(api, "w")
    watch = api.jobs.WatchJob(j.WatchJobRequest(job_id=job.id))
    await watch.read()
    assert harness.server is not None
    assert harness.server.jobs.feed.subscriber_count == 1
    watch.cancel()
    await wait_for(lambda: harness.server.jobs.feed.subscriber_count == 0)


async def test_watch_of_unknown_job_is_not_found(api: Stubs) -> None:
    watch = api.jobs.WatchJob(j.WatchJobRequest(job_id="job_nope"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await watch.read()
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_shutdown_drains_workers_and_a_reconnect_resumes_the_lease(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    job = await submit(api, "d")
    a = await raw.expect("assignment")
    assert harness.server is not None
    await harness.server.stop(grace=1.0)
    harness.server = None
    drain = await raw.expect("drain")
    assert drain.reason
    await harness.start()
    api = harness.stubs()
    kept = await get(api, job.id)
    assert kept.state == c.RUN_STATE_RUNNING and kept.attempt == 1, "leases survive a drain"
    back = RawWorker(api)
    welcome = await back.hello(
        "w", ["svc"], running=[w.JobAttempt(job_id=job.id, attempt=a.attempt)]
    )
    assert [(r.job_id, r.attempt) for r in welcome.resumed] == [(job.id, 1)]
    await back.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
    await back.expect("ack")
    assert (await get(api, job.id)).state == c.RUN_STATE_COMPLETED
    await back.close()


async def test_reconnect_after_losing_the_lease_is_told_it_was_revoked(no_grace: Harness) -> None:
    api = no_grace.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    job = await submit(api, "rv", max_attempts=1)
    await raw.expect("assignment")
    await raw.close()  # lost stream: without a grace the lease is given back at once
    await wait_for(lambda: state_is(api, job.id, c.RUN_STATE_FAILED))
    back = RawWorker(api)
    welcome = await back.hello("w", ["svc"], running=[w.JobAttempt(job_id=job.id, attempt=1)])
    assert [(r.job_id, r.attempt) for r in welcome.revoked] == [(job.id, 1)]
    assert not welcome.resumed
    await back.close()


@pytest.mark.timeout(300)
async def test_thousand_jobs_over_four_workers_complete_exactly_once(harness: Harness) -> None:
    api = harness.stubs()
    seen: dict[str, list[str]] = {}
    stored: set[str] = set()

    def handler_for(name: str) -> Any:
        async def handle(ctx: JobContext) -> dict[str, Any]:
            seen.setdefault(ctx.job_id, []).append(name)
            return {"by": name}

        return handle

    ids = set()
    for batch in range(10):
        responses = await asyncio.gather(
            *(
                api.jobs.SubmitJob(j.SubmitJobRequest(request_id=f"k{batch}-{i}", job=spec()))
                for i in range(100)
            )
        )
        ids |= {r.job.id for r in responses}
    async with contextlib.AsyncExitStack() as stack:
        for i in range(4):
            worker = await stack.enter_async_context(
                runtime_worker(
                    harness.target,
                    {"svc": handler_for(f"w{i}")},
                    worker_id=f"w{i}",
                    max_concurrency=8,
                )
            )
            # Counted when the server acknowledges the stored completion.
            worker.on_completed = lambda job_id, ok: stored.add(job_id) if ok else None
        await wait_for(lambda: len(stored) == len(ids), timeout=240, interval=0.2)
    completed: list[str] = []
    token = ""
    while True:
        page = await api.jobs.ListJobs(
            j.ListJobsRequest(state=c.RUN_STATE_COMPLETED, page_size=1000, page_token=token)
        )
        completed += [x.id for x in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert set(completed) == ids and len(completed) == len(ids)
    assert set(seen) == ids
    assert all(len(v) == 1 for v in seen.values()), "each job ran exactly once"
    assert len({v[0] for v in seen.values()}) == 4, "every worker took part"


async def test_cancel_workflow_reaches_its_running_step(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    workflow = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="wf-cancel",
                name="long",
                steps=[
                    c.WorkflowStepSpec(name="first", job=spec()),
                    c.WorkflowStepSpec(name="second", job=spec()),
                ],
            )
        )
    ).workflow
    assignment = await raw.expect("assignment")
    await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=workflow.id))
    cancel = await raw.expect("cancel", timeout=5)
    assert cancel.job_id == assignment.job.id
    await raw.send(complete=w.CompleteReport(job_id=assignment.job.id, attempt=1))
    error = await raw.expect("error")
    assert error.reason == "JOB_TERMINAL", "a late result of a cancelled step changes nothing"
    ended = (await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=workflow.id))).workflow
    assert ended.state == c.RUN_STATE_CANCELLED
    assert {s.state for s in ended.steps} == {c.RUN_STATE_CANCELLED}
    await raw.close()


async def test_worker_process_drains_on_sigterm(harness: Harness) -> None:
    """`jobtrace worker` on SIGTERM finishes the job it runs, takes no new one, exits 0."""
    api = harness.stubs()
    proc = await demo_worker_process(harness.target, "drainer", concurrency=1)
    try:
        running = await submit(api, "d1", "demo", payload={"seconds": 1.0})
        await wait_for(lambda: state_is(api, running.id, c.RUN_STATE_RUNNING), timeout=20)
        proc.send_signal(signal.SIGTERM)
        later = await submit(api, "d2", "demo", payload={"seconds": 0.1})
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
    done = await get(api, running.id)
    assert done.state == c.RUN_STATE_COMPLETED and done.attempt == 1
    assert (await get(api, later.id)).state == c.RUN_STATE_QUEUED, "no new work while draining"
