"""Pausing runs: a paused workflow dispatches no new step, a paused queue no
job, until resumed; refusals name the state."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobtrace.client import Client
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, wait_for
from .procs import jobtrace
from .test_replicas import client, replicas
from .workers import RawWorker


async def _workflow(api: Stubs, rid: str, names: list[str], service: str = "svc") -> c.Workflow:
    steps = [
        c.WorkflowStepSpec(
            name=n, job=c.JobSpec(service=service), depends_on=[names[i - 1]] if i else []
        )
        for i, n in enumerate(names)
    ]
    request = j.SubmitWorkflowRequest(request_id=rid, name="chain", steps=steps)
    return (await api.jobs.SubmitWorkflow(request)).workflow


async def _job(api: Stubs, rid: str, service: str) -> c.Job:
    request = j.SubmitJobRequest(request_id=rid, job=c.JobSpec(service=service))
    return (await api.jobs.SubmitJob(request)).job


async def _get(api: Stubs, job_id: str) -> c.Job:
    return (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id))).job


async def _wf(api: Stubs, workflow_id: str) -> c.Workflow:
    return (await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=workflow_id))).workflow


async def _complete(worker: RawWorker, assignment: w.Assignment) -> None:
    await worker.send(
        complete=w.CompleteReport(job_id=assignment.job.id, attempt=assignment.attempt)
    )
    await worker.expect("ack")


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_a_paused_workflow_dispatches_no_new_step_until_resumed(db_url: str) -> None:
    async with Harness(db_url) as h:
        api = h.stubs()
        worker = RawWorker(api)
        await worker.hello("w", ["svc"], max_concurrency=1)
        wf = await _workflow(api, "chain", ["a", "b", "c"])
        first = await worker.expect("assignment")
        assert first.job.step_name == "a"

        paused = (
            await api.jobs.PauseWorkflow(
                j.PauseWorkflowRequest(workflow_id=wf.id, reason="maintenance")
            )
        ).workflow
        assert paused.state == c.RUN_STATE_PAUSED
        assert paused.pause_reason == "maintenance" and paused.HasField("paused_at")

        # The running step finishes and its completion records; the next
        # step is queued, held.
        await _complete(worker, first)
        now = await _wf(api, wf.id)
        states = {s.name: s.state for s in now.steps}
        assert states == {
            "a": c.RUN_STATE_COMPLETED,
            "b": c.RUN_STATE_QUEUED,
            "c": c.RUN_STATE_PENDING,
        }
        assert now.state == c.RUN_STATE_PAUSED and now.progress.completed_steps == 1
        b_id = next(s.job_id for s in now.steps if s.name == "b")
        b = await _get(api, b_id)
        assert b.held and b.waiting_reason == c.WAITING_REASON_PAUSED

        # The dispatcher has had its chance: a younger job of the same service
        # goes to the same free worker, b (older, same priority) does not.
        other = await _job(api, "other", "svc")
        given = await worker.expect("assignment")
        assert given.job.id == other.id
        await _complete(worker, given)
        b = await _get(api, b_id)
        assert b.state == c.RUN_STATE_QUEUED and b.attempt == 0

        resumed = (
            await api.jobs.ResumeWorkflow(j.ResumeWorkflowRequest(workflow_id=wf.id))
        ).workflow
        assert resumed.state == c.RUN_STATE_RUNNING
        assert not resumed.HasField("paused_at") and resumed.pause_reason == ""
        for name in ("b", "c"):
            given = await worker.expect("assignment")
            assert given.job.step_name == name and not given.job.held
            await _complete(worker, given)
        done = await wait_for(lambda: _wf_in(api, wf.id, c.RUN_STATE_COMPLETED), timeout=10)
        assert done.progress.completed_steps == 3

        events = (
            await api.trace.ListTraceEvents(t.ListTraceEventsRequest(run_id=wf.id, page_size=200))
        ).events
        said = [(e.message, e.recorded_by) for e in events if e.node_id == "workflow"]
        assert ("workflow paused: maintenance", "anonymous") in said
        assert ("workflow resumed", "anonymous") in said
        await worker.close()


async def _wf_in(api: Stubs, workflow_id: str, state: int) -> c.Workflow | None:
    found = await _wf(api, workflow_id)
    return found if found.state == state else None


async def test_pause_and_resume_are_refused_from_other_states(db_url: str) -> None:
    async with Harness(db_url) as h:
        api = h.stubs()
        wf = await _workflow(api, "wf", ["a"])
        refused = await _refused(
            api.jobs.ResumeWorkflow(j.ResumeWorkflowRequest(workflow_id=wf.id))
        )
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "QUEUED" in (refused.details() or "")

        # Paused from QUEUED (no step started): resumed to QUEUED.
        await api.jobs.PauseWorkflow(j.PauseWorkflowRequest(workflow_id=wf.id))
        again = await _refused(api.jobs.PauseWorkflow(j.PauseWorkflowRequest(workflow_id=wf.id)))
        assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "PAUSED" in (again.details() or "")
        back = (await api.jobs.ResumeWorkflow(j.ResumeWorkflowRequest(workflow_id=wf.id))).workflow
        assert back.state == c.RUN_STATE_QUEUED

        await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=wf.id))
        ended = await _refused(api.jobs.PauseWorkflow(j.PauseWorkflowRequest(workflow_id=wf.id)))
        assert ended.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "CANCELLED" in (ended.details() or "")
        missing = await _refused(
            api.jobs.PauseWorkflow(j.PauseWorkflowRequest(workflow_id="wf_missing"))
        )
        assert missing.code() == grpc.StatusCode.NOT_FOUND

        # A paused workflow whose last running step completes completes.
        worker = RawWorker(api)
        await worker.hello("w", ["svc"])
        one = await _workflow(api, "one", ["only"])
        given = await worker.expect("assignment")
        await api.jobs.PauseWorkflow(j.PauseWorkflowRequest(workflow_id=one.id, reason="x"))
        await _complete(worker, given)
        done = await _wf(api, one.id)
        assert done.state == c.RUN_STATE_COMPLETED
        await worker.close()


async def test_a_paused_queue_holds_its_jobs_until_resumed(db_url: str) -> None:
    async with Harness(db_url) as h:
        api = h.stubs()
        before = await _job(api, "before", "svc")
        queue = (
            await api.jobs.PauseQueue(j.PauseQueueRequest(service="svc", reason="db migration"))
        ).queue
        assert queue.paused and queue.paused_by == "anonymous" and queue.queued == 1
        again = await _refused(api.jobs.PauseQueue(j.PauseQueueRequest(service="svc")))
        assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
        after = await _job(api, "after", "svc")  # submitted while paused: held too

        worker = RawWorker(api)
        await worker.hello("w", ["svc", "other"], max_concurrency=1)
        # The dispatcher has had its chance: a younger job of another service
        # goes to the free worker, the paused queue's older jobs do not.
        other = await _job(api, "other", "other")
        given = await worker.expect("assignment")
        assert given.job.id == other.id
        await _complete(worker, given)
        for job in (before, after):
            now = await _get(api, job.id)
            assert now.state == c.RUN_STATE_QUEUED
            assert now.waiting_reason == c.WAITING_REASON_PAUSED

        listed = (await api.jobs.ListQueues(j.ListQueuesRequest())).queues
        by_service = {q.service: q for q in listed}
        svc = by_service["svc"]
        assert svc.paused and svc.pause_reason == "db migration" and svc.queued == 2
        assert svc.HasField("paused_at")
        assert "other" not in by_service or not by_service["other"].paused

        resumed = (await api.jobs.ResumeQueue(j.ResumeQueueRequest(service="svc"))).queue
        assert not resumed.paused and not resumed.HasField("paused_at")
        for job in (before, after):
            given = await worker.expect("assignment")
            assert given.job.id == job.id
            await _complete(worker, given)
        not_paused = await _refused(api.jobs.ResumeQueue(j.ResumeQueueRequest(service="svc")))
        assert not_paused.code() == grpc.StatusCode.FAILED_PRECONDITION
        bad = await _refused(api.jobs.PauseQueue(j.PauseQueueRequest(service="")))
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
        await worker.close()


async def test_cli_and_client_pause_resume_and_list_queues(sqlite_harness: Harness) -> None:
    target = sqlite_harness.target
    async with Client(target) as jt:
        wf = await jt.submit_workflow("chain", [{"name": "a", "job": {"service": "svc"}}])
        code, out, err = await jobtrace("pause", wf.id, "--reason", "look", "--json", target=target)
        assert code == 0, err
        shown = json.loads(out)
        assert shown["state"] == "RUN_STATE_PAUSED" and shown["pause_reason"] == "look"
        code, out, err = await jobtrace("get", wf.id, target=target)
        assert code == 0 and "paused" in out and "look" in out, out + err
        code, out, err = await jobtrace("resume", wf.id, target=target)
        assert code == 0 and out.strip() == f"{wf.id}: QUEUED", out + err
        refused, _, err = await jobtrace("resume", wf.id, target=target)
        assert refused == 2 and "QUEUED" in err

        code, out, err = await jobtrace("queues", "pause", "svc", "--reason", "mig", target=target)
        assert code == 0 and "paused (1 queued)" in out, out + err
        code, out, err = await jobtrace("queues", "--json", target=target)
        assert code == 0, err
        (svc,) = [q for q in json.loads(out)["queues"] if q["service"] == "svc"]
        assert svc["paused"] and svc["pause_reason"] == "mig" and svc["paused_by"] == "anonymous"
        code, out, err = await jobtrace("queues", target=target)
        assert code == 0 and re.search(r"default\s+svc\s+paused\s+1\s+0\s+anonymous", out), out
        listed = await jt.list_queues()
        assert [q.paused for q in listed if q.service == "svc"] == [True]
        resumed = await jt.resume_queue("svc")
        assert not resumed.paused
        code, out, err = await jobtrace("queues", "resume", "svc", target=target)
        assert code == 2 and "not paused" in err
        paused = await jt.pause_workflow(wf.id, "again")
        assert paused.state == c.RUN_STATE_PAUSED
        assert (await jt.resume_workflow(wf.id)).state == c.RUN_STATE_QUEUED


async def test_pauses_and_resumes_reach_every_replica(pg_url: str, tmp_path: Path) -> None:
    """Paused and resumed on B, dispatched (or not) by A, whose worker is there."""
    async with (
        replicas(pg_url, tmp_path, 2) as (a, b),
        client(a.target) as on_a,
        client(b.target) as on_b,
    ):
        worker = RawWorker(on_a)
        await worker.hello("w", ["svc", "other"], max_concurrency=1)

        await on_b.jobs.PauseQueue(j.PauseQueueRequest(service="svc", reason="r"))
        held = await _job(on_b, "held", "svc")
        other = await _job(on_b, "other", "other")
        given = await worker.expect("assignment")
        assert given.job.id == other.id  # A's dispatcher ran, and skipped `held`
        await _complete(worker, given)
        await wait_for(lambda: _waiting(on_a, held.id, c.WAITING_REASON_PAUSED), timeout=10)
        assert (await _get(on_a, held.id)).state == c.RUN_STATE_QUEUED
        await on_b.jobs.ResumeQueue(j.ResumeQueueRequest(service="svc"))
        # Woken by B's notice (the dispatcher's own look-again is 5 s away).
        given = await worker.expect("assignment", timeout=4)
        assert given.job.id == held.id
        await _complete(worker, given)

        wf = await _workflow(on_b, "wf", ["a", "b"])
        first = await worker.expect("assignment")
        await on_b.jobs.PauseWorkflow(j.PauseWorkflowRequest(workflow_id=wf.id))
        await _complete(worker, first)
        other = await _job(on_b, "other-2", "other")
        given = await worker.expect("assignment")
        assert given.job.id == other.id
        await _complete(worker, given)
        await on_b.jobs.ResumeWorkflow(j.ResumeWorkflowRequest(workflow_id=wf.id))
        given = await worker.expect("assignment", timeout=4)
        assert given.job.step_name == "b"
        await _complete(worker, given)
        await wait_for(lambda: _wf_in(on_a, wf.id, c.RUN_STATE_COMPLETED), timeout=10)
        await worker.close()


async def _waiting(api: Stubs, job_id: str, reason: int) -> bool:
    return (await _get(api, job_id)).waiting_reason == reason


async def test_watchers_see_a_pause_and_a_resume(db_url: str) -> None:
    async with Harness(db_url) as h:
        api = h.stubs()
        wf = await _workflow(api, "watched", ["a", "b"])
        watch = api.jobs.WatchWorkflow(j.WatchWorkflowRequest(workflow_id=wf.id))
        assert (await watch.read()).workflow.state == c.RUN_STATE_QUEUED
        runs = api.jobs.WatchRuns(j.WatchRunsRequest(kind=j.WatchRunsRequest.RUN_KIND_WORKFLOW))
        assert (await runs.read()).WhichOneof("kind") == "snapshot_end"

        async def next_state(call: Any) -> int:
            while True:
                message = await call.read()
                if isinstance(message, j.WatchWorkflowResponse):
                    return int(message.workflow.state)
                if message.WhichOneof("kind") == "workflow":
                    return int(message.workflow.state)

        await api.jobs.PauseWorkflow(j.PauseWorkflowRequest(workflow_id=wf.id, reason="why"))
        assert await next_state(watch) == c.RUN_STATE_PAUSED
        assert await next_state(runs) == c.RUN_STATE_PAUSED
        await api.jobs.ResumeWorkflow(j.ResumeWorkflowRequest(workflow_id=wf.id))
        assert await next_state(watch) == c.RUN_STATE_QUEUED
        assert await next_state(runs) == c.RUN_STATE_QUEUED
        watch.cancel()
        runs.cancel()


async def test_the_pause_migration_goes_down_and_up(db_url: str) -> None:
    """Revision 0024 downgrades (a paused queue and a workflow's pause
    columns are dropped) and upgrades again on a database that used them."""
    from .test_worker_stream import migrate_down

    h = Harness(db_url)
    await h.start()
    try:
        api = h.stubs()
        wf = await _workflow(api, "mig", ["a"])
        await api.jobs.PauseWorkflow(j.PauseWorkflowRequest(workflow_id=wf.id, reason="x"))
        await api.jobs.PauseQueue(j.PauseQueueRequest(service="svc"))
    finally:
        await h.stop()
    await migrate_down(db_url, "0023")
    await h.start()  # migrates up again
    try:
        api = h.stubs()
        assert not [
            q for q in (await api.jobs.ListQueues(j.ListQueuesRequest())).queues if q.paused
        ]
        again = await _wf(api, wf.id)
        assert not again.HasField("paused_at")
    finally:
        await h.stop()


async def test_a_claim_read_before_a_pause_is_refused_by_the_claim_itself(db_url: str) -> None:
    """The dispatcher read a job, then its workflow (or its queue) was paused:
    the claim re-checks in its own statement and changes nothing."""
    from jobtrace.store import jobs as store

    async with Harness(db_url) as h:
        server = h.server
        assert server is not None
        api = h.stubs()
        wf = await _workflow(api, "stale", ["a"])
        standalone = await _job(api, "stale-job", "other")
        async with server.db.read() as db:
            seen = {
                j.id: j for j in await store.jobs_by_id(db, [wf.steps[0].job_id, standalone.id])
            }
        await api.jobs.PauseWorkflow(j.PauseWorkflowRequest(workflow_id=wf.id))
        await api.jobs.PauseQueue(j.PauseQueueRequest(service="other"))

        async def claim(job_id: str) -> Any:
            async def op(db: Any, tx: Any) -> Any:
                return await server.lifecycle.claim(
                    db, tx, seen[job_id], "w", 1, 1, "ses", "holder", by="w"
                )

            return await server.db.write(op)

        assert await claim(wf.steps[0].job_id) is None
        assert await claim(standalone.id) is None
        for job_id in seen:
            assert (await _get(api, job_id)).state == c.RUN_STATE_QUEUED
        # Resumed, the same claim goes through.
        await api.jobs.ResumeQueue(j.ResumeQueueRequest(service="other"))
        assert (await claim(standalone.id)) is not None


async def test_a_resume_between_a_pauses_two_transactions_leaves_nothing_held(
    db_url: str,
) -> None:
    """PauseQueue commits its row, then marks the queue's jobs in a second
    transaction: a ResumeQueue that commits in between must not find them
    held again afterwards."""
    from jobtrace.store import jobs as store

    async with Harness(db_url) as h:
        server = h.server
        assert server is not None
        api = h.stubs()
        job = await _job(api, "queued", "svc")
        pauses = server.pauses
        db = server.db

        class Between:
            """The database, with a ResumeQueue run before PauseQueue's second write."""

            writes = 0

            async def write(self, op: Any) -> Any:
                Between.writes += 1
                if Between.writes == 2:
                    pauses._db = db  # the resume writes as usual
                    await pauses.resume_queue("default", "svc", "anonymous")
                return await db.write(op)

            def read(self) -> Any:
                return db.read()

        pauses._db = Between()  # type: ignore[assignment]
        try:
            await api.jobs.PauseQueue(j.PauseQueueRequest(service="svc"))
        finally:
            pauses._db = db
        assert Between.writes == 2
        async with db.read() as session:
            (stored,) = await store.jobs_by_id(session, [job.id])
        assert stored.held == 0
        assert not [
            q for q in (await api.jobs.ListQueues(j.ListQueuesRequest())).queues if q.paused
        ]
