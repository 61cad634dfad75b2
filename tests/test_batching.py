"""Batched worker traffic: several reports in one message (ReportBatch, answered
by one Acks), several assignments in one message (Assignments), and the
runtime's report window; older one-report-per-message workers beside them."""

from __future__ import annotations

from typing import Any

import grpc

from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, wait_for
from .test_worker_stream import QUICK_RETRY, notes, scheduler_of, submit, value
from .test_workers import get
from .workers import RawWorker, runtime_worker

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]


async def events_of(api: Stubs, run_id: str) -> list[c.TraceEvent]:
    page = await api.trace.ListTraceEvents(t.ListTraceEventsRequest(run_id=run_id, page_size=1000))
    return list(page.events)


async def take_assignments(raw: RawWorker, n: int) -> dict[str, w.Assignment]:
    """The next n jobs assigned, whether one per message or several in one."""
    got: dict[str, w.Assignment] = {}
    while len(got) < n:
        message = await raw.recv()
        kind = message.WhichOneof("kind")
        if kind == "assignment":
            got[message.assignment.job.id] = message.assignment
        elif kind == "assignments":
            for item in message.assignments.assignments:
                got[item.job.id] = item
        elif kind != "heartbeat_ack":
            raw._stash.append(message)
    return got


def report(message_id: int, **kind: Any) -> w.BatchedReport:
    return w.BatchedReport(message_id=message_id, **kind)


def log_event(key: str, text: str) -> c.TraceEvent:
    return c.TraceEvent(
        type=c.TRACE_EVENT_TYPE_LOG,
        level=c.LEVEL_INFO,
        category=c.CATEGORY_BUSINESS,
        message=text,
        event_key=key,
    )


async def test_a_batch_of_mixed_reports_refuses_only_its_stale_report(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    welcome = await raw.hello("w", ["svc"], max_concurrency=4, accepts_batches=True)
    assert welcome.max_batch == 500
    first = await submit(api, "a")
    second = await submit(api, "b", backoff=QUICK_RETRY)
    third = await submit(api, "c")
    assert set(await take_assignments(raw, 3)) == {first.id, second.id, third.id}
    # The second job's first attempt fails and it runs again: attempt 1 is stale.
    await raw.send(
        fail=w.FailReport(
            job_id=second.id, attempt=1, retryable=True, error=c.ErrorDetail(message="flaky")
        )
    )
    await raw.expect("ack")
    assert (await take_assignments(raw, 1))[second.id].attempt == 2

    batch = w.ReportBatch(
        reports=[
            report(101, progress=w.ProgressReport(job_id=first.id, attempt=1, percent=50)),
            report(
                102,
                trace=w.TraceReport(job_id=first.id, attempt=1, events=[log_event("k1", "one")]),
            ),
            report(103, progress=w.ProgressReport(job_id=second.id, attempt=1, percent=10)),
            report(
                104,
                trace=w.TraceReport(job_id=second.id, attempt=2, events=[log_event("k2", "two")]),
            ),
            report(
                105,
                annotate=w.AnnotationReport(
                    job_id=third.id, attempt=1, attributes={"review.note": value("checked")}
                ),
            ),
            report(
                106,
                fail=w.FailReport(
                    job_id=third.id, attempt=1, error=c.ErrorDetail(message="bad input")
                ),
            ),
            report(107, complete=w.CompleteReport(job_id=first.id, attempt=1)),
            report(108),  # no kind: refused alone
        ]
    )
    await raw.send(batch=batch)
    acks = await raw.expect("acks")
    assert [x.message_id for x in acks.acks] == [101, 102, 104, 105, 106, 107]
    assert [(x.job_id, x.attempt) for x in acks.acks][2] == (second.id, 2)
    assert [(e.message_id, e.message_kind, e.job_id, e.attempt) for e in acks.errors] == [
        (103, "progress", second.id, 1),
        (108, "", "", 0),
    ]
    stale, empty = acks.errors
    assert (stale.code, stale.reason) == (FAILED_PRECONDITION, "STALE_ATTEMPT")
    assert "stale" in stale.message
    assert (empty.code, empty.reason) == (INVALID_ARGUMENT, "INVALID_ARGUMENT")
    # Terminal reports are acknowledged once committed: readable at once.
    done = await get(api, first.id)
    assert done.state == c.RUN_STATE_COMPLETED
    assert (await get(api, third.id)).state == c.RUN_STATE_FAILED
    assert (await get(api, second.id)).state == c.RUN_STATE_RUNNING
    # In order per job: progress, the log event, then the completion.
    trail = await events_of(api, first.id)
    progress = [e.sequence for e in trail if e.type == c.TRACE_EVENT_TYPE_PROGRESS]
    logged = [e.sequence for e in trail if e.message == "one"]
    completed = [e.sequence for e in trail if e.type == c.TRACE_EVENT_TYPE_COMPLETED]
    assert len(progress) == len(logged) == len(completed) == 1
    assert progress[0] < logged[0] < completed[0]
    # The stale report stored nothing; the current attempt's event is there.
    second_events = await events_of(api, second.id)
    assert not [e for e in second_events if e.type == c.TRACE_EVENT_TYPE_PROGRESS]
    assert [e.attempt for e in second_events if e.message == "two"] == [2]
    # The completion is attested; the failed attempt's annotation is visible.
    attested = await api.attest.ListAttestations(
        a.ListAttestationsRequest(job_id=first.id, view=a.ATTESTATION_VIEW_FULL)
    )
    assert attested.attestations
    assert "review.note" in {n.key for n in await notes(api, third.id)}
    # Single reports still work on the same stream after a batch.
    mid = await raw.send(complete=w.CompleteReport(job_id=second.id, attempt=2))
    assert (await raw.expect("ack")).message_id == mid
    await raw.close()


async def test_progress_reports_written_together_keep_each_jobs_order(harness: Harness) -> None:
    """A batch of progress reports of several jobs (three each, and one of
    an attempt not started among them) is written together (store: one UPDATE for the distinct
    jobs of a round): every job ends at its last percent with its PROGRESS
    events in the order sent, and only the report of an attempt that does
    not exist is refused."""
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=8, accepts_batches=True)
    jobs = [await submit(api, f"merge-{i}") for i in range(6)]
    assert set(await take_assignments(raw, 6)) == {x.id for x in jobs}
    reports = []
    for percent in (10.0, 20.0, 30.0):
        for x in jobs:
            reports.append(
                report(
                    len(reports) + 1,
                    progress=w.ProgressReport(
                        job_id=x.id, attempt=1, percent=percent, message=f"at {percent:g}"
                    ),
                )
            )
    unknown = report(99, progress=w.ProgressReport(job_id=jobs[2].id, attempt=2, percent=99))
    reports.insert(7, unknown)
    await raw.send(batch=w.ReportBatch(reports=reports))
    acks = await raw.expect("acks")
    assert sorted(x.message_id for x in acks.acks) == list(range(1, 19))
    assert [(e.message_id, e.reason) for e in acks.errors] == [(99, "UNKNOWN_ATTEMPT")]
    for x in jobs:
        stored = await get(api, x.id)
        assert (stored.progress.percent, stored.progress.message) == (30.0, "at 30")
        trail = [e for e in await events_of(api, x.id) if e.type == c.TRACE_EVENT_TYPE_PROGRESS]
        assert [e.percent for e in trail] == [10.0, 20.0, 30.0]
        assert [e.sequence for e in trail] == sorted(e.sequence for e in trail)
        assert len({e.sequence for e in trail}) == 3
    await raw.close()


async def test_a_malformed_batch_is_refused_whole(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], accepts_batches=True)
    job = await submit(api, "a")
    await take_assignments(raw, 1)
    progress = w.ProgressReport(job_id=job.id, attempt=1, percent=5)
    malformed = [
        (w.ReportBatch(), "batch.reports: required"),
        (
            w.ReportBatch(reports=[report(1, progress=progress), report(1, progress=progress)]),
            "used twice",
        ),
        (
            w.ReportBatch(reports=[report(i + 1, progress=progress) for i in range(501)]),
            "at most 500 reports",
        ),
    ]
    for batch, words in malformed:
        mid = await raw.send(batch=batch)
        error = await raw.expect("error")
        assert (error.message_id, error.message_kind) == (mid, "batch")
        assert error.code == INVALID_ARGUMENT and words in error.message
        assert not error.fatal
    assert not [e for e in await events_of(api, job.id) if e.type == c.TRACE_EVENT_TYPE_PROGRESS]
    # The stream goes on.
    await raw.send(batch=w.ReportBatch(reports=[report(7, progress=progress)]))
    assert [x.message_id for x in (await raw.expect("acks")).acks] == [7]
    await raw.close()


async def test_old_and_batching_workers_share_a_server(harness: Harness) -> None:
    """A worker that accepts batches gets its free slots' jobs in one
    Assignments; an old-style one gets one Assignment per message; every job
    completes, through batches and single reports."""
    api = harness.stubs()
    jobs = [await submit(api, f"r{i}") for i in range(8)]
    batching = RawWorker(api)
    await batching.hello("new", ["svc"], max_concurrency=4, accepts_batches=True)
    message = await batching.recv()
    assert message.WhichOneof("kind") == "assignments"
    mine = list(message.assignments.assignments)
    assert len(mine) == 4
    old = RawWorker(api)
    await old.hello("old", ["svc"], max_concurrency=4)
    theirs = [await old.expect("assignment") for _ in range(4)]
    assert not [m for m in old._stash if m.WhichOneof("kind") == "assignments"]
    assert {x.job.id for x in mine + theirs} == {job.id for job in jobs}

    await batching.send(
        batch=w.ReportBatch(
            reports=[
                report(
                    i + 1,
                    complete=w.CompleteReport(job_id=x.job.id, attempt=x.attempt),
                )
                for i, x in enumerate(mine)
            ]
        )
    )
    acks = await batching.expect("acks")
    assert len(acks.acks) == 4 and not acks.errors
    for x in theirs:
        await old.send(complete=w.CompleteReport(job_id=x.job.id, attempt=x.attempt))
        await old.expect("ack")
    for job in jobs:
        assert (await get(api, job.id)).state == c.RUN_STATE_COMPLETED
    # More work: both keep getting it in their own style.
    more = [await submit(api, f"m{i}") for i in range(2)]
    await wait_for(lambda: all_running(api, more), timeout=10)
    await batching.close()
    await old.close()


async def all_running(api: Stubs, jobs: list[c.Job]) -> bool:
    for job in jobs:
        if (await get(api, job.id)).state != c.RUN_STATE_RUNNING:
            return False
    return True


async def progress_events(api: Stubs, job_id: str) -> list[c.TraceEvent]:
    return [e for e in await events_of(api, job_id) if e.type == c.TRACE_EVENT_TYPE_PROGRESS]


async def test_the_runtime_batches_within_its_window_and_coalesces_only_when_asked(
    harness: Harness,
) -> None:
    """A burst of reports queued within the window goes out in fewer messages;
    every progress report stays a trace event unless coalesce=True."""
    api = harness.stubs()

    async def burst(ctx: Any) -> dict[str, Any]:
        coalesce = bool(ctx.payload.get("coalesce"))
        for step in range(1, 11):
            await ctx.progress(step * 10.0, f"step {step}", coalesce=coalesce)
        return {"ok": True}

    # A long window: the burst (queued without the handler yielding) and the
    # completion are surely in one window.
    async with runtime_worker(harness.target, {"burst": burst}, report_window_ms=200) as worker:
        messages, reports = worker.messages_sent, worker.reports_sent
        kept = await submit(api, "kept", service="burst")
        await wait_for(lambda: job_done(api, kept.id), timeout=10)
        sent = worker.messages_sent - messages
        assert worker.reports_sent - reports == 11  # ten progress reports and the completion
        assert sent < 11
        steps = [e.message for e in await progress_events(api, kept.id)]
        assert steps == [f"step {i}" for i in range(1, 11)]

        coalesced = await submit(api, "coalesced", service="burst", payload=struct({"coalesce": 1}))
        await wait_for(lambda: job_done(api, coalesced.id), timeout=10)
        last = await progress_events(api, coalesced.id)
        assert [(e.message) for e in last] == ["step 10"]
        assert (await get(api, coalesced.id)).state == c.RUN_STATE_COMPLETED

    # Window 0 without batches (a worker from before them): one message per
    # report, nothing coalesced, and the server hands it one job per message.
    async with runtime_worker(
        harness.target, {"burst": burst}, report_window_ms=0, accepts_batches=False
    ) as worker:
        sessions = scheduler_of(harness).sessions.values()
        assert [s.accepts_batches for s in sessions if s.worker_id == worker.worker_id] == [False]
        messages, reports = worker.messages_sent, worker.reports_sent
        plain = await submit(api, "plain", service="burst", payload=struct({"coalesce": 1}))
        await wait_for(lambda: job_done(api, plain.id), timeout=10)
        assert worker.messages_sent - messages == worker.reports_sent - reports == 11
        assert len(await progress_events(api, plain.id)) == 10


def struct(values: dict[str, Any]) -> Any:
    from google.protobuf import struct_pb2

    s = struct_pb2.Struct()
    s.update(values)
    return s


async def job_done(api: Stubs, job_id: str) -> bool:
    job = (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id))).job
    return bool(job.state == c.RUN_STATE_COMPLETED)
