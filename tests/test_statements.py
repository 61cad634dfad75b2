"""Database statements per job on the hot path, counted at the database's door.

One job at a time: submit, claim, three progress reports, completion (its
trace events and its signed, chained attestation), through the real server
and the real worker runtime, on both backends, against a bound per backend."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from sqlalchemy.engine import make_url

from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2, job_service_pb2
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, execute_sql, wait_for
from .statements import CountingPgProxy, Statements, kinds, traced_sqlite
from .workers import runtime_worker

# Statements per job (BEGIN/COMMIT not counted), by backend: the bound this
# suite holds the hot path to. Issue 15 aims at 12; what is left is listed in
# the README's benchmark notes (PostgreSQL: 6 are NOTIFYs, one per commit; on
# both, the completion attestation reads the run's annotations, its evidence).
# Triggers (job labels, trace search) run inside the statement that fires
# them: tests/statements.py counts what SQLite's trace hook re-reports of them
# once, as PostgreSQL's wire shows them.
MAX_STATEMENTS_PER_JOB = {"sqlite": 21, "postgresql": 15}
WARM_UP_JOBS = 3
MEASURED_JOBS = 12


@contextlib.asynccontextmanager
async def counting(
    db_url: str, monkeypatch: pytest.MonkeyPatch, **settings: Any
) -> AsyncIterator[tuple[Harness, Statements]]:
    """A server whose every database statement is recorded."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        with traced_sqlite(monkeypatch) as seen:
            async with Harness(db_url, **settings) as h:
                yield h, seen
        return
    proxy = CountingPgProxy(url.host or "127.0.0.1", url.port or 5432)
    port = await proxy.start()
    proxied = url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    try:
        async with Harness(proxied, **settings) as h:
            yield h, proxy.statements
    finally:
        await proxy.stop()


@pytest.fixture
async def counted(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Harness, Statements]]:
    async with counting(db_url, monkeypatch) as pair:
        yield pair


@contextlib.asynccontextmanager
async def writer_held(h: Harness, queued: int) -> AsyncIterator[None]:
    """The group-commit writer busy with an operation that waits: what is
    written meanwhile queues up behind it. On leaving, once `queued`
    operations wait, it lets go: they run as one group commit."""
    assert h.server is not None
    db = h.server.db
    started, release = asyncio.Event(), asyncio.Event()

    async def hold(_db: Any, _tx: Any) -> None:
        started.set()
        await release.wait()

    holding = asyncio.create_task(db.write(hold))
    try:
        await wait_for(started.is_set, timeout=10)
        yield
        await wait_for(lambda: db._queue.qsize() >= queued, timeout=10)
    finally:
        release.set()
        await holding


def _background(statement: str) -> bool:
    """Statements a server runs on a clock, whatever its jobs do: storage
    probes, the supervisor's scans of leases and timeouts (each second), the
    quota's recount of a tenant's waiting jobs (at most each second), the
    fleet registry's write of the replica's changed sessions (at most once per
    heartbeat interval, all sessions in one statement), the schedule
    scanner's reads of due schedules and the supervisor's read of workflows
    past their deadline (each second)."""
    s = statement.strip().rstrip(";")
    return (
        s.upper() == "SELECT 1"
        or s.startswith("SELECT schedules.")
        or (s.startswith("SELECT workflows.id") and "workflows.deadline_us <" in s)
        or s.startswith(("INSERT INTO worker_sessions", "DELETE FROM worker_sessions"))
        or (s.startswith("SELECT jobs.seq, jobs.id,") and "jobs.state =" in s)
        or s.startswith("SELECT count(*) AS count_1 FROM (SELECT jobs.seq")
    )


async def test_a_job_costs_a_bounded_number_of_statements(
    counted: tuple[Harness, Statements], db_url: str
) -> None:
    h, seen = counted
    bound = MAX_STATEMENTS_PER_JOB[make_url(db_url).get_backend_name()]
    stubs = h.stubs()
    done: asyncio.Queue[str] = asyncio.Queue()

    async def run(job: Any) -> dict[str, Any]:
        for step in (1, 2, 3):
            await job.progress(step * 33.0, f"step {step}")
        return {"ok": True}

    async with runtime_worker(h.target, {"bench": run}, worker_id="counted") as worker:
        worker.on_completed = lambda job_id, stored: done.put_nowait(job_id) if stored else None

        async def one_job(i: int) -> None:
            response = await stubs.jobs.SubmitJob(
                job_service_pb2.SubmitJobRequest(
                    request_id=f"count-{i}", job=common_pb2.JobSpec(service="bench")
                )
            )
            assert await asyncio.wait_for(done.get(), 10) == response.job.id

        async def settled() -> bool:
            # Nothing more arrives for a moment: the dispatcher went back to
            # sleep after the last completion.
            before = seen.mark()
            await asyncio.sleep(0.05)
            return seen.mark() == before

        for i in range(WARM_UP_JOBS):
            await one_job(i)
        await wait_for(settled, timeout=10)
        mark = seen.mark()
        for i in range(WARM_UP_JOBS, WARM_UP_JOBS + MEASURED_JOBS):
            await one_job(i)
        await wait_for(settled, timeout=10)
        statements = [s for s in seen.since(mark) if not _background(s)]
    per_job = len(statements) / MEASURED_JOBS
    breakdown = "\n".join(
        f"{n / MEASURED_JOBS:6.2f}  {k}" for k, n in kinds(statements).most_common()
    )
    print(f"\n{per_job:.2f} statements per job\n{breakdown}")
    assert per_job <= bound, f"{per_job:.2f} statements per job (at most {bound}):\n{breakdown}"


def _quota_count(statement: str) -> bool:
    return statement.startswith("SELECT count(*) AS count_1 FROM (SELECT jobs.seq")


async def test_the_quota_does_not_count_the_queue_per_submit(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waiting jobs of a tenant are counted (a scan of up to the quota)
    when the count is a second old or the bound kept since says the quota
    could be exceeded, not on every submit near the quota."""
    async with counting(db_url, monkeypatch, max_queued_per_tenant=10) as (h, seen):
        stubs = h.stubs()
        mark = seen.mark()
        started = time.monotonic()
        for i in range(10):
            await stubs.jobs.SubmitJob(
                job_service_pb2.SubmitJobRequest(
                    request_id=f"quota-{i}", job=common_pb2.JobSpec(service="nobody")
                )
            )
        with pytest.raises(Exception) as refused:
            await stubs.jobs.SubmitJob(
                job_service_pb2.SubmitJobRequest(
                    request_id="quota-10", job=common_pb2.JobSpec(service="nobody")
                )
            )
        assert "QUEUED_JOB_QUOTA" in str(refused.value) or "quota" in str(refused.value)
        elapsed = time.monotonic() - started
        counts = sum(1 for s in seen.since(mark) if _quota_count(s))
    # The first submit's count, the refusal's (twice: a refused operation's
    # group commit runs again, with savepoints), and one per second passed.
    assert counts <= 3 + int(elapsed), f"{counts} counts of the queue in {elapsed:.2f}s"


async def test_progress_reports_queued_together_share_their_statements(
    counted: tuple[Harness, Statements],
) -> None:
    """A batch of progress reports of many jobs is written by a few multi-row
    statements (the group commit merges adjacent reports: one UPDATE of the
    jobs, one reservation of their runs' sequence numbers, one INSERT of the
    events), not by a few statements per report."""
    from .test_batching import report, take_assignments
    from .workers import RawWorker

    h, seen = counted
    api = h.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=24, accepts_batches=True)
    jobs = [
        (
            await api.jobs.SubmitJob(
                job_service_pb2.SubmitJobRequest(
                    request_id=f"merged-{i}", job=common_pb2.JobSpec(service="svc")
                )
            )
        ).job.id
        for i in range(24)
    ]
    assert set(await take_assignments(raw, 24)) == set(jobs)
    mark = seen.mark()
    batch = [
        report(i + 1, progress=w.ProgressReport(job_id=job_id, attempt=1, percent=50))
        for i, job_id in enumerate(jobs)
    ]
    async with writer_held(h, queued=24):  # the 24 reports queue up together
        await raw.send(batch=w.ReportBatch(reports=batch))
    acks = await raw.expect("acks")
    assert len(acks.acks) == 24 and not acks.errors
    writes = [s for s in seen.since(mark) if "progress_percent" in s and s.startswith("UPDATE")]
    # Merged as they were queued: one round of 24 distinct jobs, one UPDATE.
    assert len(writes) == 1, writes
    await raw.close()


async def test_a_dispatch_round_claims_its_jobs_together(
    counted: tuple[Harness, Statements],
) -> None:
    """Standalone jobs a dispatch round hands out are claimed by one multi-row
    UPDATE (with one reservation and one INSERT of their STARTED events), not
    one claim statement per job; every job is then RUNNING with its event."""
    from .test_batching import events_of, take_assignments
    from .workers import RawWorker

    h, seen = counted
    api = h.stubs()
    items = [
        job_service_pb2.SubmitJobRequest(
            request_id=f"round-{i}", job=common_pb2.JobSpec(service="round")
        )
        for i in range(16)
    ]
    jobs = [
        r.job.id
        for r in (await api.jobs.SubmitJobs(job_service_pb2.SubmitJobsRequest(items=items))).results
    ]
    mark = seen.mark()
    raw = RawWorker(api)
    await raw.hello("w", ["round"], max_concurrency=16, accepts_batches=True)
    got = await take_assignments(raw, 16)
    assert set(got) == set(jobs) and {x.attempt for x in got.values()} == {1}
    claims = [s for s in seen.since(mark) if "attempt = attempt + 1" in s]
    assert len(claims) == 1, claims  # the worker's 16 free slots: one round
    for job_id in jobs[:3]:
        started = [
            e for e in await events_of(api, job_id) if e.type == common_pb2.TRACE_EVENT_TYPE_STARTED
        ]
        assert [(e.attempt, e.worker_id) for e in started] == [(1, "w")]
    await raw.close()


async def test_completions_queued_together_are_read_and_written_together(
    counted: tuple[Harness, Statements],
) -> None:
    """A batch of completions of standalone jobs reads (and locks) its jobs
    with one statement and their runs' annotations with another, and writes
    them with one UPDATE of the jobs, one INSERT (an executemany) of their
    COMPLETED events and one of their attestations, not a read and a write
    per completion; every job then COMPLETED with its own result, its
    COMPLETED event numbered after its STARTED and carrying its own
    traceparent, its run ended for those following it, and attested, the
    head of its attestation chain recorded on its row."""
    from .test_batching import events_of, report, take_assignments
    from .workers import RawWorker

    h, seen = counted
    api = h.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=16, accepts_batches=True)
    jobs = [  # each with its own W3C traceparent
        (
            await api.jobs.SubmitJob(
                job_service_pb2.SubmitJobRequest(
                    request_id=f"done-{i}", job=common_pb2.JobSpec(service="svc")
                ),
                metadata=(("traceparent", _traceparent(i)),),
            )
        ).job.id
        for i in range(16)
    ]
    assert set(await take_assignments(raw, 16)) == set(jobs)
    mark = seen.mark()
    batch = [
        report(i + 1, complete=w.CompleteReport(job_id=job_id, attempt=1, result=_result(i)))
        for i, job_id in enumerate(jobs)
    ]
    async with writer_held(h, queued=16):  # the 16 completions queue up together
        await raw.send(batch=w.ReportBatch(reports=batch))
    acks = await raw.expect("acks")
    assert len(acks.acks) == 16 and not acks.errors
    statements = seen.since(mark)
    job_reads = [s for s in statements if s.startswith("SELECT * FROM jobs")]
    annotation_reads = [
        s for s in statements if s.startswith("SELECT") and "annotations" in s.split(" WHERE")[0]
    ]
    assert len(job_reads) == 1 and len(annotation_reads) == 1, statements
    job_writes = [s for s in statements if s.startswith("UPDATE jobs SET")]
    event_writes = [s for s in statements if s.startswith("INSERT INTO trace_events ")]
    attestation_writes = [s for s in statements if s.startswith("INSERT INTO attestations")]
    assert len(job_writes) == 1 and "completed_us" in job_writes[0], statements
    # One executemany each, which both backends' counters see as a statement per row.
    assert len(event_writes) == len(attestation_writes) == 16, statements
    for i, job_id in enumerate(jobs):  # each job's own result, state and stamps
        got = await api.jobs.GetJob(job_service_pb2.GetJobRequest(job_id=job_id))
        assert got.job.state == common_pb2.RUN_STATE_COMPLETED
        assert got.job.result == _result(i) and got.job.progress.percent == 100.0
        assert got.job.HasField("completed_at")
        events = await events_of(api, job_id)
        assert events[0].type == common_pb2.TRACE_EVENT_TYPE_STARTED
        assert events[-1].type == common_pb2.TRACE_EVENT_TYPE_COMPLETED
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
        assert events[-1].job_id == job_id and events[-1].attempt == 1
        assert {e.traceparent for e in events} == {_traceparent(i)}
        listed = await api.attest.ListAttestations(a.ListAttestationsRequest(job_id=job_id))
        [attested] = listed.attestations
        assert attested.type == a.ATTESTATION_TYPE_WORKER_COMPLETION
        verdict = await api.attest.VerifyAttestation(a.VerifyAttestationRequest(key=attested.key))
        assert verdict.valid and verdict.signature_valid and verdict.chain_valid, verdict.reason
        head = await execute_sql(
            h.db_url, "SELECT chain_seq, chain_digest FROM jobs WHERE id = :id", id=job_id
        )
        assert tuple(head[0]) == (attested.chain_sequence, attested.digest) == (1, attested.digest)
    await raw.close()


async def test_completions_written_together_end_their_runs_for_their_followers(
    harness: Harness,
) -> None:
    """Whoever follows a run sees its COMPLETED event and then its end when
    its completion is written with others' (Lifecycle.complete_many)."""
    from .test_batching import report, take_assignments
    from .workers import RawWorker

    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=8, accepts_batches=True)
    items = [
        job_service_pb2.SubmitJobRequest(
            request_id=f"end-{i}", job=common_pb2.JobSpec(service="svc")
        )
        for i in range(8)
    ]
    response = await api.jobs.SubmitJobs(job_service_pb2.SubmitJobsRequest(items=items))
    jobs = [r.job.id for r in response.results]
    assert set(await take_assignments(raw, 8)) == set(jobs)
    calls = [
        api.trace.StreamTraceEvents(t.StreamTraceEventsRequest(run_id=job_id, follow=True))
        for job_id in jobs
    ]
    for call in calls:  # each reader has the STARTED event: it follows the run live
        first = await call.read()
        assert first.event.type == common_pb2.TRACE_EVENT_TYPE_STARTED, first

    async def rest(call: Any) -> tuple[list[Any], Any]:
        events, final = [], None
        while (message := await call.read()) is not grpc.aio.EOF:
            if message.HasField("event"):
                events.append(message.event)
            elif message.HasField("final_status"):
                final = message.final_status
        return events, final

    following = [asyncio.create_task(rest(call)) for call in calls]
    batch = [
        report(i + 1, complete=w.CompleteReport(job_id=job_id, attempt=1))
        for i, job_id in enumerate(jobs)
    ]
    async with writer_held(harness, queued=8):  # the 8 completions queue up together
        await raw.send(batch=w.ReportBatch(reports=batch))
    acks = await raw.expect("acks")
    assert len(acks.acks) == 8 and not acks.errors
    async with asyncio.timeout(30):
        for reader in following:
            streamed, final = await reader
            assert final is not None and final.state == common_pb2.RUN_STATE_COMPLETED
            assert [e.type for e in streamed] == [common_pb2.TRACE_EVENT_TYPE_COMPLETED]
    await raw.close()


def _result(i: int) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update({"i": i, "text": f"result of {i}", "nested": {"ok": i % 2 == 0}})
    return out


def _traceparent(i: int) -> str:
    return f"00-{i + 1:032x}-{i + 1:016x}-01"
