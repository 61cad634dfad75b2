"""WatchRuns, the live feed of a tenant's runs, through the real server on both
backends: the active snapshot, then changes in order per run; filters;
tenancy; bad filters; slow readers; and across PostgreSQL replicas."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobtrace.client.worker import JobContext
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j

from .conftest import Harness, Stubs, error_details, expect_error, wait_for
from .test_abuse_streams import STALL_S, expect_stalled, open_streams, slow_reader
from .test_security import bearer, token, write_tokens
from .workers import runtime_worker

Run = c.Job | c.Workflow
TERMINAL = {
    c.RUN_STATE_COMPLETED,
    c.RUN_STATE_FAILED,
    c.RUN_STATE_CANCELLED,
    c.RUN_STATE_TERMINATED,
    c.RUN_STATE_TIMED_OUT,
}


class Feed:
    """One WatchRuns call read in the background: every run message, in order."""

    def __init__(self, stubs: Stubs, request: j.WatchRunsRequest, metadata: Any = None) -> None:
        self.call = stubs.jobs.WatchRuns(request, metadata=metadata)
        self.snapshot: list[Run] | None = None
        self.snapshot_end: j.WatchRunsSnapshotEnd | None = None
        self.runs: list[Run] = []
        self.error: grpc.aio.AioRpcError | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Feed:
        """Read up to snapshot_end (from then on every change is sent)."""
        before: list[Run] = []
        while True:
            message = await asyncio.wait_for(self.call.read(), 20)
            assert message is not grpc.aio.EOF
            kind = message.WhichOneof("kind")
            if kind == "snapshot_end":
                self.snapshot, self.snapshot_end = before, message.snapshot_end
                break
            assert kind in ("job", "workflow"), kind
            before.append(getattr(message, kind))
        self._task = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            while (message := await self.call.read()) is not grpc.aio.EOF:
                kind = message.WhichOneof("kind")
                if kind in ("job", "workflow"):
                    self.runs.append(getattr(message, kind))
        except grpc.aio.AioRpcError as err:
            self.error = err

    def of(self, run_id: str) -> list[Run]:
        return [r for r in self.runs if r.id == run_id]

    def saw(self, run_id: str, state: int) -> bool:
        return any(r.state == state for r in self.of(run_id))

    async def until(self, predicate: Callable[[], bool], timeout: float = 20) -> None:
        await wait_for(lambda: predicate() or self.error is not None, timeout=timeout)
        assert self.error is None, self.error

    async def close(self) -> None:
        self.call.cancel()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@contextlib.asynccontextmanager
async def feed(stubs: Stubs, metadata: Any = None, **request: Any) -> AsyncIterator[Feed]:
    f = Feed(stubs, j.WatchRunsRequest(**request), metadata)
    try:
        yield await f.start()
    finally:
        await f.close()


def in_order(runs: list[Run]) -> bool:
    """Each run's messages never go back: updated_at never decreases."""
    last: dict[str, int] = {}
    for run in runs:
        at = run.updated_at.ToMicroseconds()
        if at < last.get(run.id, 0):
            return False
        last[run.id] = at
    return True


async def submit(api: Stubs, rid: str, service: str = "svc", **spec: Any) -> c.Job:
    return (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id=rid, job=c.JobSpec(service=service, **spec))
        )
    ).job


async def submit_workflow(
    api: Stubs, rid: str, name: str = "wf", service: str = "step", steps: int = 2, **extra: Any
) -> c.Workflow:
    specs = [c.WorkflowStepSpec(name=f"s{i}", job=c.JobSpec(service=service)) for i in range(steps)]
    return (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(request_id=rid, name=name, steps=specs, **extra)
        )
    ).workflow


async def test_active_runs_come_first_then_every_change_in_order(harness: Harness) -> None:
    api = harness.stubs()
    waiting = await submit(api, "a")
    to_cancel = await submit(api, "b")
    done = await submit(api, "c", service="nobody")
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=done.id))
    wf = await submit_workflow(api, "w")
    async with feed(api, include_active=True) as f:
        # The runs not yet ended, top-level only (the workflow, not its steps).
        assert f.snapshot is not None and f.snapshot_end is not None
        assert [(r.id, r.state) for r in f.snapshot] == [
            (waiting.id, c.RUN_STATE_QUEUED),
            (to_cancel.id, c.RUN_STATE_QUEUED),
            (wf.id, c.RUN_STATE_QUEUED),
        ]
        assert f.snapshot_end.run_count == 3 and not f.snapshot_end.truncated
        # BASIC view: no payload, no steps.
        assert not f.snapshot[0].spec.HasField("payload")
        assert list(f.snapshot[2].steps) == [] and f.snapshot[2].progress.total_steps == 2

        await api.jobs.CancelJob(j.CancelJobRequest(job_id=to_cancel.id))
        await f.until(lambda: f.saw(to_cancel.id, c.RUN_STATE_CANCELLED))
        fresh = await submit(api, "d")
        await f.until(lambda: f.saw(fresh.id, c.RUN_STATE_QUEUED))

        async def work(job: JobContext) -> dict[str, Any]:
            await job.progress(50.0, "half")
            return {"ok": True}

        async with runtime_worker(harness.target, {"svc": work, "step": work}):
            await f.until(
                lambda: all(
                    f.saw(run_id, c.RUN_STATE_COMPLETED) for run_id in (waiting.id, fresh.id, wf.id)
                )
            )
    assert in_order(f.runs)
    jobs = [r for r in f.of(waiting.id)]
    states = [r.state for r in jobs]
    assert states[0] == c.RUN_STATE_RUNNING and states[-1] == c.RUN_STATE_COMPLETED
    assert any(r.progress.percent == 50.0 for r in jobs), "progress is a change"
    # The workflow's own changes, ending with every step completed.
    flow = f.of(wf.id)
    assert all(isinstance(r, c.Workflow) for r in flow)
    assert flow[-1].progress.completed_steps == 2 and flow[-1].state == c.RUN_STATE_COMPLETED
    assert [r.progress.completed_steps for r in flow] == sorted(
        r.progress.completed_steps for r in flow
    )
    # Steps are not sent by default; the job that had ended is not sent.
    step_ids = {r.id for r in f.runs if isinstance(r, c.Job) and r.workflow_id}
    assert not step_ids
    assert not f.of(done.id)


async def test_an_older_state_is_never_sent_after_a_newer_one(harness: Harness) -> None:
    """A stale change arriving late (as another replica's re-read can race a
    newer commit) is not sent: a run's messages never go back."""
    assert harness.server is not None
    jobs = harness.server.jobs
    api = harness.stubs()
    job = await submit(api, "a")
    queued = await jobs.get_job(None, job.id)
    async with feed(api) as f:
        await api.jobs.CancelJob(j.CancelJobRequest(job_id=job.id))
        await f.until(lambda: f.saw(job.id, c.RUN_STATE_CANCELLED))
        jobs.feed.publish([queued])
        later = await submit(api, "z")
        await f.until(lambda: bool(f.of(later.id)))
    assert [r.state for r in f.of(job.id)] == [c.RUN_STATE_CANCELLED]


async def test_filters_select_runs(harness: Harness) -> None:
    api = harness.stubs()
    async with (
        feed(api, services=["svc"]) as by_service,
        feed(api, states=[c.RUN_STATE_CANCELLED]) as by_state,
        feed(api, labels={"team": "a"}) as by_label,
        feed(api, kind=j.WatchRunsRequest.RUN_KIND_WORKFLOW) as workflows_only,
        feed(api, workflow_names=["nightly"]) as by_name,
        feed(api, include_steps=True, kind=j.WatchRunsRequest.RUN_KIND_JOB) as with_steps,
    ):
        plain = await submit(api, "p", service="svc")
        other = await submit(api, "o", service="other", labels={"team": "a"})
        labelled_wf = await submit_workflow(api, "lw", name="nightly", labels={"team": "a"})
        plain_wf = await submit_workflow(api, "pw", name="daily")
        await api.jobs.CancelJob(j.CancelJobRequest(job_id=other.id))
        await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=plain_wf.id))
        # The last change each feed must see: the ones before it were sent first.
        last = await submit(api, "z", service="svc", labels={"team": "a"})
        await api.jobs.CancelJob(j.CancelJobRequest(job_id=last.id))
        last_wf = await submit_workflow(api, "zw", name="nightly", labels={"team": "a"})
        await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=last_wf.id))
        for f in (by_service, by_state, by_label, with_steps):
            await f.until(lambda f=f: f.saw(last.id, c.RUN_STATE_CANCELLED))
        for f in (by_state, by_label, workflows_only, by_name):
            await f.until(lambda f=f: f.saw(last_wf.id, c.RUN_STATE_CANCELLED))
        await with_steps.until(
            lambda: all(with_steps.saw(s.job_id, c.RUN_STATE_CANCELLED) for s in last_wf.steps)
        )

        def ids(f: Feed) -> set[str]:
            return {r.id for r in f.runs}

        assert ids(by_service) == {plain.id, last.id}
        assert ids(by_state) == {other.id, plain_wf.id, last.id, last_wf.id}
        assert all(r.state == c.RUN_STATE_CANCELLED for r in by_state.runs)
        assert ids(by_label) == {other.id, labelled_wf.id, last.id, last_wf.id}
        assert ids(workflows_only) == {labelled_wf.id, plain_wf.id, last_wf.id}
        assert ids(by_name) == {labelled_wf.id, last_wf.id}
        # Every step that changed: the one still waiting for another (PENDING
        # since its submission) has not.
        steps = {s.job_id for w in (labelled_wf, plain_wf, last_wf) for s in w.steps}
        steps.discard(labelled_wf.steps[1].job_id)
        assert ids(with_steps) == {plain.id, other.id, last.id} | steps
        for f in (by_service, by_state, by_label, workflows_only, by_name, with_steps):
            assert in_order(f.runs)


async def test_bad_filters_are_invalid_argument(harness: Harness) -> None:
    api = harness.stubs()

    async def refused(**request: Any) -> list[tuple[str, str]]:
        call = api.jobs.WatchRuns(j.WatchRunsRequest(**request))
        _, info, violations = await expect_error(call.read(), grpc.StatusCode.INVALID_ARGUMENT)
        assert info is not None
        return violations

    assert [v[0] for v in await refused(states=[0, 99])] == ["states[0]", "states[1]"]
    assert [v[0] for v in await refused(services=["bad service"])] == ["services[0]"]
    assert [v[0] for v in await refused(services=[f"s{i}" for i in range(33)])] == ["services"]
    assert [v[0] for v in await refused(workflow_names=[""])] == ["workflow_names[0]"]
    assert [v[0] for v in await refused(labels={"Bad Key": "x"})] == ["labels['Bad Key']"]
    assert [v[0] for v in await refused(kind=7)] == ["kind"]
    violations = await refused(services=["svc"], workflow_names=["w"])
    assert violations[0][0] == "workflow_names" and "matches nothing" in violations[0][1]
    wf = j.WatchRunsRequest.RUN_KIND_WORKFLOW
    assert [v[0] for v in await refused(services=["svc"], kind=wf)] == ["services"]
    assert [v[0] for v in await refused(include_steps=True, kind=wf)] == ["include_steps"]
    jobs = j.WatchRunsRequest.RUN_KIND_JOB
    assert [v[0] for v in await refused(workflow_names=["w"], kind=jobs)] == ["workflow_names"]


async def test_a_cancelled_feed_leaves_nothing_behind(harness: Harness) -> None:
    assert harness.server is not None
    jobs = harness.server.jobs
    api = harness.stubs()
    async with feed(api):
        assert jobs.feed.runs_subscriber_count == 1
    await wait_for(
        lambda: jobs.feed.runs_subscriber_count == 0 and open_streams(harness.server) == 0
    )


async def test_an_idle_feed_sends_keepalives(harness: Harness) -> None:
    assert harness.server is not None
    harness.server.jobs.runs.keepalive_s = 0.05
    api = harness.stubs()
    call = api.jobs.WatchRuns(j.WatchRunsRequest())
    assert (await call.read()).WhichOneof("kind") == "snapshot_end"
    message = await asyncio.wait_for(call.read(), 10)
    assert message.WhichOneof("kind") == "keepalive"
    assert abs(message.keepalive.time.ToMicroseconds() / 1e6 - time.time()) < 60
    call.cancel()


async def test_a_feed_whose_reader_stalls_is_ended_and_released(db_url: str) -> None:
    async with Harness(db_url, stream_stall_seconds=STALL_S) as h:
        assert h.server is not None
        runs = h.server.jobs.feed
        api = h.stubs()
        # Labels are in the BASIC view: each job is about 16 KiB on the wire.
        labels = {f"k{i}": "v" * 256 for i in range(60)}
        for i in range(20):
            await submit(api, f"r{i}", labels=labels)
        async with slow_reader(h) as slow:
            call = slow.jobs.WatchRuns(j.WatchRunsRequest(include_active=True))
            await wait_for(lambda: runs.runs_subscriber_count == 1, timeout=20)
            await wait_for(
                lambda: runs.runs_subscriber_count == 0 and open_streams(h.server) == 0,
                timeout=20,
            )
            received = await expect_stalled(call)
            assert len(received) < 20  # the reader never took the snapshot's end


async def test_a_feed_that_falls_behind_is_ended(harness: Harness) -> None:
    """More changes waiting than the feed's buffer: the stream ends
    RESOURCE_EXHAUSTED (READER_STALLED) instead of holding them all."""
    from jobtrace.events.feed import RUNS_BUFFER

    assert harness.server is not None
    server = harness.server
    api = harness.stubs()
    call = api.jobs.WatchRuns(j.WatchRunsRequest())
    assert (await call.read()).WhichOneof("kind") == "snapshot_end"
    # Other replicas' changes arrive faster than the feed takes them: here all
    # at once, in one turn of the event loop.
    for i in range(RUNS_BUFFER + 1):
        server.jobs.feed.remote_change(f"job-{i}", "")
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while True:
            message = await asyncio.wait_for(call.read(), 20)
            assert message is not grpc.aio.EOF
    assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info, _ = error_details(ended.value)
    assert info is not None and info.reason == "READER_STALLED"
    assert "fell more than" in (ended.value.details() or "")
    await wait_for(lambda: server.jobs.feed.runs_subscriber_count == 0)


# --- across PostgreSQL replicas ---------------------------------------------------------

STATE_RANK = {c.RUN_STATE_QUEUED: 0, c.RUN_STATE_RUNNING: 1, c.RUN_STATE_COMPLETED: 2}


async def test_a_feed_on_one_replica_sees_100_runs_of_two_in_order(
    pg_url: str, tmp_path: Path
) -> None:
    """A feed on replica A; 100 jobs submitted half through A, half through B,
    and worked to completion by workers on both: the feed sees every job
    from its submission to COMPLETED, each job's messages in order (the
    server's updated_at never decreases, its state never goes back)."""
    from google.protobuf import struct_pb2

    from .test_replicas import client, replicas
    from .workers import demo_worker_process, terminate

    async with (
        replicas(pg_url, tmp_path, 2) as (a, b),
        client(a.target) as on_a,
        client(b.target) as on_b,
    ):
        async with feed(on_a, services=["demo"]) as f:
            payload = struct_pb2.Struct()
            payload.update({"seconds": 0})
            submitted = []
            for i in range(100):
                api = on_a if i % 2 == 0 else on_b
                job = (
                    await api.jobs.SubmitJob(
                        j.SubmitJobRequest(
                            request_id=f"r{i}", job=c.JobSpec(service="demo", payload=payload)
                        )
                    )
                ).job
                submitted.append(job.id)
            workers = [
                await demo_worker_process(a.target, "wa", concurrency=8),
                await demo_worker_process(b.target, "wb", concurrency=8),
            ]
            try:
                await f.until(
                    lambda: all(f.saw(run_id, c.RUN_STATE_COMPLETED) for run_id in submitted),
                    timeout=120,
                )
            finally:
                await terminate(*workers)
        assert {r.id for r in f.runs} == set(submitted)
        assert in_order(f.runs)
        for run_id in submitted:
            runs = f.of(run_id)
            ranks = [STATE_RANK[r.state] for r in runs]
            assert ranks == sorted(ranks), (run_id, ranks)
            assert runs[0].state == c.RUN_STATE_QUEUED, "seen from its submission"
            assert runs[-1].state == c.RUN_STATE_COMPLETED
        # Changes made on B reached the feed on A: jobs submitted through B,
        # and jobs worked by B's worker.
        assert any(r.worker_id == "wb" for r in f.runs)


@pytest.fixture
async def tenants(db_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    """A server with the tokens of test_security: each role in acme and umbrella."""
    tokens = tmp_path / "tokens.yaml"
    write_tokens(tokens)
    async with Harness(db_url, tokens_file=str(tokens)) as h:
        yield h


async def test_a_feed_never_sends_another_tenants_runs(tenants: Harness) -> None:
    api = tenants.stubs()
    acme, umbrella = bearer(token("submitter", "acme")), bearer(token("submitter", "umbrella"))

    async def submit_as(md: Any, rid: str) -> c.Job:
        request = j.SubmitJobRequest(request_id=rid, job=c.JobSpec(service="svc"))
        return (await api.jobs.SubmitJob(request, metadata=md)).job

    early = await submit_as(acme, "early")
    async with (
        feed(api, bearer(token("reader", "umbrella")), include_active=True) as theirs,
        feed(api, bearer(token("reader", "acme")), include_active=True) as ours,
    ):
        assert theirs.snapshot == []
        assert ours.snapshot is not None and [r.id for r in ours.snapshot] == [early.id]
        job = await submit_as(acme, "a")
        wf = (
            await api.jobs.SubmitWorkflow(
                j.SubmitWorkflowRequest(
                    request_id="w",
                    name="w",
                    steps=[c.WorkflowStepSpec(name="s", job=c.JobSpec(service="svc"))],
                ),
                metadata=acme,
            )
        ).workflow
        await api.jobs.CancelJob(j.CancelJobRequest(job_id=job.id), metadata=acme)
        mine = await submit_as(umbrella, "u")
        await api.jobs.CancelJob(j.CancelJobRequest(job_id=mine.id), metadata=umbrella)
        await theirs.until(lambda: theirs.saw(mine.id, c.RUN_STATE_CANCELLED))
        await ours.until(lambda: ours.saw(job.id, c.RUN_STATE_CANCELLED) and bool(ours.of(wf.id)))
        assert {r.id for r in theirs.runs} == {mine.id}
        assert mine.id not in {r.id for r in ours.runs}
        assert all(r.tenant == "acme" for r in ours.runs)


# --- the client and the CLI -------------------------------------------------------------


async def test_clients_watch_runs(sqlite_harness: Harness) -> None:
    from jobtrace.client import Client, SyncClient

    api = sqlite_harness.stubs()
    active = await submit(api, "a", labels={"team": "a"})
    async with Client(sqlite_harness.target) as client:
        changes = client.watch_runs(labels={"team": "a"}, states=["queued", "CANCELLED"])
        first = await anext(changes)
        assert first.HasField("snapshot_end") and first.snapshot_end.run_count == 0
        await api.jobs.CancelJob(j.CancelJobRequest(job_id=active.id))
        job = await submit(api, "b", labels={"team": "a"})
        seen = [await anext(changes), await anext(changes)]
        assert [(m.job.id, m.job.state) for m in seen] == [
            (active.id, c.RUN_STATE_CANCELLED),
            (job.id, c.RUN_STATE_QUEUED),
        ]
        await changes.aclose()

    def blocking() -> list[str]:
        with SyncClient(sqlite_harness.target) as jt:
            snapshot = []
            for change in jt.watch_runs(include_active=True, kind="job"):
                if change.HasField("snapshot_end"):
                    break
                snapshot.append(change.job.id)
            return snapshot

    assert await asyncio.to_thread(blocking) == [job.id]


async def test_cli_runs_lists_active_runs_and_follows_changes(sqlite_harness: Harness) -> None:
    from .procs import jobtrace

    api = sqlite_harness.stubs()
    target = sqlite_harness.target
    job = await submit(api, "a")
    ended = await submit(api, "e")
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=ended.id))
    wf = await submit_workflow(api, "w", name="nightly")
    # Without --follow: the active runs, then exit.
    code, out, err = await jobtrace("runs", "--json", target=target)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(next(iter(x)), next(iter(x.values()))["id"]) for x in lines] == [
        ("job", job.id),
        ("workflow", wf.id),
    ]
    code, out, err = await jobtrace("runs", "--kind", "workflow", target=target)
    assert code == 0, err
    assert wf.id in out and "nightly" in out and "QUEUED" in out and job.id not in out
    # A bad filter is refused with the server's reason.
    code, _, err = await jobtrace("runs", "--service", "s", "--workflow-name", "w", target=target)
    assert code == 2 and "matches nothing" in err
    # --follow: the changes as they happen, one JSON object per line.
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "jobtrace", "runs", "--follow", "--json", "--changes-only", "--service", "svc"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "JOBTRACE_TARGET": target},
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert json.loads(line) == {"snapshot_end": {}}
        await api.jobs.CancelJob(j.CancelJobRequest(job_id=job.id))
        await submit(api, "other", service="other")
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        change = json.loads(line)["job"]
        assert (change["id"], change["state"]) == (job.id, "RUN_STATE_CANCELLED")
    finally:
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 130
    rest = (await proc.stdout.read()).decode()
    assert rest == "", "the other service's job is not followed"


async def test_a_feed_that_may_have_missed_changes_ends_unavailable(harness: Harness) -> None:
    """Other replicas' notices may have been lost (the LISTEN connection came
    back): a feed cannot re-read them, so it ends UNAVAILABLE (CHANGES_LOST)
    and its reader watches again with include_active."""
    assert harness.server is not None
    server = harness.server
    api = harness.stubs()
    call = api.jobs.WatchRuns(j.WatchRunsRequest())
    assert (await call.read()).WhichOneof("kind") == "snapshot_end"
    server._on_listen_restored()
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(call.read(), 20)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    info, _ = error_details(ended.value)
    assert info is not None and info.reason == "CHANGES_LOST"
    await wait_for(lambda: server.jobs.feed.runs_subscriber_count == 0)
