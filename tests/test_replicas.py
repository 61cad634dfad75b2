"""Several jobtrace replicas on one PostgreSQL: cross-replica dispatch and streams,
and a replica killed mid-load whose workers finish every job on another."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2

from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Stubs, execute_sql, stubs_for, wait_for
from .procs import drain, serve
from .workers import RawWorker, demo_worker_process, terminate


class Replica:
    def __init__(
        self, proc: asyncio.subprocess.Process, port: int, metrics_port: int | None = None
    ) -> None:
        self.proc = proc
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self.metrics_port = metrics_port


async def start_replica(db_url: str, key: Path, *extra: str) -> Replica:
    proc, port, lines = await serve(
        "--db",
        db_url,
        "--signing-key-file",
        str(key),
        "--lease-seconds",
        "3",
        "--heartbeat-seconds",
        "0.5",
        *extra,
        timeout=60,
    )
    metrics = re.search(r'"metrics_port": (\d+)', lines[-1])
    drain(proc)
    return Replica(proc, port, int(metrics.group(1)) if metrics else None)


@contextlib.asynccontextmanager
async def replicas(db_url: str, tmp: Path, n: int, *extra: str) -> AsyncIterator[list[Replica]]:
    started: list[Replica] = []
    try:
        for i in range(n):  # one after the other: they share the migrations
            started.append(await start_replica(db_url, tmp / f"key{i}.pem", *extra))
        yield started
    finally:
        await terminate(*(r.proc for r in started))


@contextlib.asynccontextmanager
async def client(target: str) -> AsyncIterator[Stubs]:
    channel = grpc.aio.insecure_channel(target)
    try:
        yield stubs_for(channel)
    finally:
        await channel.close()


async def test_job_submitted_on_one_replica_reaches_a_worker_on_another(
    pg_url: str, tmp_path: Path
) -> None:
    async with (
        replicas(pg_url, tmp_path, 2) as (a, b),
        client(a.target) as on_a,
        client(b.target) as on_b,
    ):
        raw = RawWorker(on_a)
        await raw.hello("w", ["svc"])
        t0 = time.monotonic()
        job = (
            await on_b.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="x", job=c.JobSpec(service="svc"))
            )
        ).job
        assignment = await raw.expect("assignment", timeout=5)
        assert assignment.job.id == job.id
        assert time.monotonic() - t0 < 2.0, "woken by NOTIFY, not by a poll"
        # A cancel on B reaches the worker on A.
        await on_b.jobs.CancelJob(j.CancelJobRequest(job_id=job.id))
        cancel = await raw.expect("cancel", timeout=5)
        assert cancel.job_id == job.id
        # A watch on A sees B's change.
        second = (
            await on_b.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="y", job=c.JobSpec(service="nobody"))
            )
        ).job
        watch = on_a.jobs.WatchJob(j.WatchJobRequest(job_id=second.id))
        assert (await watch.read()).job.state == c.RUN_STATE_QUEUED
        await on_b.jobs.CancelJob(j.CancelJobRequest(job_id=second.id))
        last = await asyncio.wait_for(watch.read(), 5)
        assert last.job.state == c.RUN_STATE_CANCELLED
        await raw.close()


async def test_another_replica_sees_every_step_of_the_largest_workflow(
    pg_url: str, tmp_path: Path
) -> None:
    """A workflow of MAX_STEPS steps submitted and cancelled on A: every step's
    change reaches B, though the notices of one transaction (one NOTIFY
    payload is under 8000 bytes) list every step. B's dispatcher hands each
    step to its worker, and each cancel reaches that worker."""
    from jobtrace.domain.validation import MAX_STEPS

    # Leases longer than the test: the raw worker sends no heartbeats.
    lease = ("--lease-seconds", "120", "--heartbeat-seconds", "60")
    async with (
        replicas(pg_url, tmp_path, 2, *lease) as (a, b),
        client(a.target) as on_a,
        client(b.target) as on_b,
    ):
        raw = RawWorker(on_b)
        await raw.hello("w", ["svc"], max_concurrency=MAX_STEPS)
        steps = [
            c.WorkflowStepSpec(name=f"s{i}", job=c.JobSpec(service="svc"), independent=True)
            for i in range(MAX_STEPS)
        ]
        wf = (
            await on_a.jobs.SubmitWorkflow(
                j.SubmitWorkflowRequest(request_id="wide", name="wide", steps=steps)
            )
        ).workflow
        expected = {s.job_id for s in wf.steps}
        assigned = {(await raw.expect("assignment", timeout=30)).job.id for _ in expected}
        assert assigned == expected
        watch = on_b.jobs.WatchWorkflow(j.WatchWorkflowRequest(workflow_id=wf.id))
        assert (await watch.read()).workflow.state == c.RUN_STATE_RUNNING
        await on_a.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=wf.id))
        cancelled = {(await raw.expect("cancel", timeout=30)).job_id for _ in expected}
        assert cancelled == expected, "each step's cancel reached its worker on B"
        last = (await asyncio.wait_for(watch.read(), 30)).workflow
        while not last.state == c.RUN_STATE_CANCELLED:
            last = (await asyncio.wait_for(watch.read(), 30)).workflow
        assert {s.state for s in last.steps} == {c.RUN_STATE_CANCELLED}
        await raw.close()


async def test_notices_reach_other_replicas_whatever_their_size(pg_url: str) -> None:
    """A transaction's notices travel in NOTIFY payloads of under 8000 bytes
    (PostgreSQL refuses longer ones, failing the transaction): many notices
    are spread over several payloads, all delivered in order; a notice too
    large for any payload commits too, and tells the other replicas to catch
    up from the database instead."""
    from jobtrace.store.db import Database, Tx

    sender, receiver = Database(pg_url), Database(pg_url)
    await sender.start()
    await receiver.start()
    received: list[dict[str, object]] = []
    caught_up = asyncio.Event()
    try:
        await receiver.listen(received.extend, caught_up.set)
        many = [{"k": "test", "n": i, "pad": "x" * 100} for i in range(500)]

        async def notify_many(session: object, tx: Tx) -> None:
            for notice in many:
                tx.notify(notice)

        await sender.write(notify_many)
        await wait_for(lambda: len(received) == len(many), timeout=10)
        assert received == many
        assert not caught_up.is_set()

        async def notify_huge(session: object, tx: Tx) -> str:
            tx.notify({"k": "test", "pad": "x" * 10_000})
            return "committed"

        assert await sender.write(notify_huge) == "committed"
        await asyncio.wait_for(caught_up.wait(), 10)
        assert received == many
    finally:
        await sender.close()
        await receiver.close()


async def test_events_appended_on_one_replica_stream_on_another_in_order(
    pg_url: str, tmp_path: Path
) -> None:
    async with (
        replicas(pg_url, tmp_path, 2) as (a, b),
        client(a.target) as on_a,
        client(b.target) as on_b,
    ):
        job = (
            await on_b.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="r", job=c.JobSpec(service="none"))
            )
        ).job
        stream = on_a.trace.StreamTraceEvents(
            t.StreamTraceEventsRequest(run_id=job.id, follow=True)
        )
        received: list[int] = []

        async def collect() -> None:
            async for message in stream:
                if message.WhichOneof("kind") == "event":
                    received.append(message.event.sequence)
                elif message.WhichOneof("kind") == "final_status":
                    return

        collector = asyncio.create_task(collect())
        writers = [on_a, on_b]
        for batch in range(20):
            api = writers[batch % 2]
            await api.trace.AppendTraceEvents(
                t.AppendTraceEventsRequest(
                    run_id=job.id,
                    events=[c.TraceEvent(event_key=f"k{batch}-{i}") for i in range(5)],
                )
            )
        await on_b.jobs.CancelJob(j.CancelJobRequest(job_id=job.id))
        await asyncio.wait_for(collector, 20)
        assert received == list(range(1, 102)), "no gap, no duplicate, in cursor order"


async def test_subscribers_follow_another_replicas_appends_with_one_read_for_all(
    pg_url: str, tmp_path: Path
) -> None:
    """Events appended on B reach A's live subscribers through one read on A per
    notice: none of them falls back to reading the database for itself (which,
    with many subscribers at once, queued them all behind the connection pool)."""
    from .test_observability import scrape

    extra = ("--metrics-port", "0", "--keepalive-seconds", "0.3")
    async with (
        replicas(pg_url, tmp_path, 2, *extra) as (a, b),
        client(a.target) as on_a,
        client(b.target) as on_b,
    ):
        job = (
            await on_b.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="fan", job=c.JobSpec(service="none"))
            )
        ).job
        subscribers = 20
        received: list[list[int]] = [[] for _ in range(subscribers)]
        live: list[asyncio.Event] = [asyncio.Event() for _ in range(subscribers)]

        async def follow(i: int) -> None:
            request = t.StreamTraceEventsRequest(run_id=job.id, follow=True)
            async for message in on_a.trace.StreamTraceEvents(request):
                kind = message.WhichOneof("kind")
                if kind == "keepalive":  # sent only from the live loop
                    live[i].set()
                elif kind == "event":
                    received[i].append(message.event.sequence)
                elif kind == "final_status":
                    return

        followers = [asyncio.create_task(follow(i)) for i in range(subscribers)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in live)), 20)
        for batch in range(10):
            await on_b.trace.AppendTraceEvents(
                t.AppendTraceEventsRequest(
                    run_id=job.id,
                    events=[c.TraceEvent(event_key=f"k{batch}-{i}") for i in range(3)],
                )
            )
        expected = list(range(1, 31))
        await wait_for(
            lambda: all(r[: len(expected)] == expected for r in received) or None, timeout=20
        )
        metrics = await scrape(a.metrics_port)
        assert metrics.value("jobtrace_trace_events_delivered_total") == subscribers * 30
        assert metrics.value("jobtrace_trace_stream_catchups_total") == 0
        await on_b.jobs.CancelJob(j.CancelJobRequest(job_id=job.id))
        await asyncio.wait_for(asyncio.gather(*followers), 20)
        assert all(r[:30] == expected for r in received), "no gap, no duplicate"


async def _listeners(db_url: str) -> set[int]:
    """Backend pids of the replicas' LISTEN connections on this test's database."""
    rows = await execute_sql(
        db_url,
        "SELECT pid FROM pg_stat_activity "
        "WHERE application_name = 'jobtrace-listener' AND datname = current_database()",
    )
    return {pid for (pid,) in rows}


async def test_a_lost_listen_connection_is_re_established_and_streams_catch_up(
    pg_url: str, tmp_path: Path
) -> None:
    """The LISTEN connection's backend is terminated: the replica reconnects, and
    its live stream gets what was appended on the other replica meanwhile (that
    notice was lost), what comes after, and the final status."""
    async with (
        replicas(pg_url, tmp_path, 2) as (a, b),
        client(a.target) as on_a,
        client(b.target) as on_b,
    ):
        job = (
            await on_b.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="l", job=c.JobSpec(service="none"))
            )
        ).job
        stream = on_a.trace.StreamTraceEvents(
            t.StreamTraceEventsRequest(run_id=job.id, follow=True)
        )
        received: list[str] = []
        final: list[t.RunStatus] = []

        async def collect() -> None:
            async for message in stream:
                if message.WhichOneof("kind") == "event":
                    received.append(message.event.event_key or message.event.message)
                elif message.WhichOneof("kind") == "final_status":
                    final.append(message.final_status)
                    return

        async def append(key: str) -> None:
            await on_b.trace.AppendTraceEvents(
                t.AppendTraceEventsRequest(run_id=job.id, events=[c.TraceEvent(event_key=key)])
            )

        collector = asyncio.create_task(collect())
        await append("before")
        await wait_for(lambda: received == ["before"], timeout=10)
        old = await _listeners(pg_url)
        assert len(old) == 2, "one LISTEN connection per replica, named"
        killed = await execute_sql(
            pg_url,
            "SELECT pg_terminate_backend(pid) FROM unnest(CAST(:pids AS int[])) AS pid",
            pids=sorted(old),
        )
        assert killed == [(True,), (True,)]
        await append("during")  # most likely while no replica listens: its notice is lost

        async def restored() -> bool:
            now = await _listeners(pg_url)
            return len(now) == 2 and not now & old

        await wait_for(restored, timeout=20, interval=0.1)
        await wait_for(lambda: received == ["before", "during"], timeout=10)
        await append("after")
        await wait_for(lambda: received == ["before", "during", "after"], timeout=10)
        await on_b.jobs.CancelJob(j.CancelJobRequest(job_id=job.id))
        await asyncio.wait_for(collector, 10)
        assert received == ["before", "during", "after", "Run cancelled by user"]
        assert final[0].state == c.RUN_STATE_CANCELLED


async def test_a_replica_killed_mid_load_loses_no_job(pg_url: str, tmp_path: Path) -> None:
    async with replicas(pg_url, tmp_path, 2) as (a, b):
        workers = [
            await demo_worker_process(f"{a.target},{b.target}", f"w{i}", concurrency=8)
            for i in range(2)
        ]
        try:
            async with client(b.target) as on_b:
                ids = []
                for i in range(80):
                    payload = struct_pb2.Struct()
                    payload.update({"seconds": 0.4})
                    ids.append(
                        (
                            await on_b.jobs.SubmitJob(
                                j.SubmitJobRequest(
                                    request_id=f"j{i}",
                                    job=c.JobSpec(service="demo", payload=payload, max_attempts=5),
                                )
                            )
                        ).job.id
                    )

                async def running() -> bool:
                    page = await on_b.jobs.ListJobs(j.ListJobsRequest(state=c.RUN_STATE_RUNNING))
                    return len(page.jobs) >= 4

                await wait_for(running, timeout=30)
                a.proc.send_signal(signal.SIGKILL)
                await a.proc.wait()

                async def all_done() -> bool:
                    page = await on_b.jobs.ListJobs(
                        j.ListJobsRequest(state=c.RUN_STATE_COMPLETED, page_size=1000)
                    )
                    return len(page.jobs) == len(ids)

                await wait_for(all_done, timeout=90, interval=0.5)
        finally:
            await terminate(*workers)
    twice = await execute_sql(
        pg_url,
        "SELECT run_id FROM trace_events WHERE type = 3 GROUP BY run_id HAVING count(*) > 1",
    )
    assert twice == [], "no job completed twice"
    completions = await execute_sql(pg_url, "SELECT count(*) FROM attestations WHERE type = 1")
    assert completions == [(80,)]


@pytest.mark.parametrize("n", [3])
async def test_replicas_start_together_on_a_fresh_database(
    pg_url: str, tmp_path: Path, n: int
) -> None:
    procs = await asyncio.gather(*(start_replica(pg_url, tmp_path / f"k{i}") for i in range(n)))
    try:
        for r in procs:
            async with client(r.target) as api:
                assert (await api.jobs.ListJobs(j.ListJobsRequest())).jobs == []
        keys = await execute_sql(pg_url, "SELECT count(*) FROM signing_keys")
        assert keys == [(n,)]
    finally:
        await terminate(*(r.proc for r in procs))


async def test_replicas_contending_for_jobs_lease_each_attempt_once(
    pg_url: str, tmp_path: Path
) -> None:
    """Three replicas, a worker on each, submitters on each: every job is leased
    once (one assignment per attempt across the whole cluster) and completes once."""
    async with replicas(pg_url, tmp_path, 3) as nodes, contextlib.AsyncExitStack() as stack:
        apis = [await stack.enter_async_context(client(r.target)) for r in nodes]
        seen: list[tuple[str, int, int]] = []  # (job id, attempt, worker)

        async def serve(n: int, api: Stubs) -> None:
            raw = RawWorker(api)
            await raw.hello(f"w{n}", ["svc"], max_concurrency=16)

            async def beat() -> None:
                while True:
                    await raw.send(heartbeat=w.WorkerHeartbeat())
                    await asyncio.sleep(0.5)  # the heartbeat interval asked for

            beating = asyncio.create_task(beat())
            try:
                while True:
                    message = await raw.recv(timeout=60)
                    if message.WhichOneof("kind") == "assignment":
                        job = message.assignment.job
                        seen.append((job.id, message.assignment.attempt, n))
                        await raw.send(
                            complete=w.CompleteReport(
                                job_id=job.id, attempt=message.assignment.attempt
                            )
                        )
            finally:
                beating.cancel()
                await raw.close()

        servers = [asyncio.create_task(serve(n, api)) for n, api in enumerate(apis)]

        async def submit(n: int) -> list[str]:
            ids = []
            for i in range(100):
                request = j.SubmitJobRequest(request_id=f"c{n}-{i}", job=c.JobSpec(service="svc"))
                ids.append((await apis[n].jobs.SubmitJob(request)).job.id)
            return ids

        batches = await asyncio.gather(*(submit(n) for n in range(3)))
        ids = {i for batch in batches for i in batch}

        async def all_done() -> bool:
            page = await apis[0].jobs.ListJobs(
                j.ListJobsRequest(state=c.RUN_STATE_COMPLETED, page_size=1000)
            )
            return len(page.jobs) == len(ids)

        await wait_for(all_done, timeout=60, interval=0.2)
        for task in servers:
            task.cancel()
        await asyncio.gather(*servers, return_exceptions=True)
    assignments = [(job_id, attempt) for job_id, attempt, _ in seen]
    assert len(assignments) == len(set(assignments)) == len(ids), "each attempt leased once"
    assert {job_id for job_id, _ in assignments} == ids
    assert {attempt for _, attempt in assignments} == {1}
    assert len({n for _, _, n in seen}) == 3, "every replica's worker got work"
    completions = await execute_sql(pg_url, "SELECT count(*) FROM attestations WHERE type = 1")
    assert completions == [(300,)]


async def test_an_expired_lease_is_retried_once_across_replicas(
    pg_url: str, tmp_path: Path
) -> None:
    """Supervision runs on every replica; a lost lease is handled exactly once."""
    async with (
        replicas(pg_url, tmp_path, 3) as (a, b, _c),
        client(a.target) as on_a,
        client(b.target) as on_b,
    ):
        silent = RawWorker(on_a)
        await silent.hello("silent", ["svc"])
        job = (
            await on_b.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="lost", job=c.JobSpec(service="svc", max_attempts=5))
            )
        ).job
        await silent.expect("assignment", timeout=10)
        # No heartbeats: the 3 s lease runs out; another worker gets attempt 2.
        rescuer = RawWorker(on_b)
        await rescuer.hello("rescuer", ["svc"])

        async def beat() -> None:  # the rescuer stays alive meanwhile
            while True:
                await rescuer.send(heartbeat=w.WorkerHeartbeat())
                await asyncio.sleep(0.5)  # the heartbeat interval asked for

        beating = asyncio.create_task(beat())
        second = await rescuer.expect("assignment", timeout=20)
        beating.cancel()
        assert second.job.id == job.id and second.attempt == 2
        await rescuer.send(complete=w.CompleteReport(job_id=job.id, attempt=2))
        await rescuer.expect("ack")
        done = (await on_a.jobs.GetJob(j.GetJobRequest(job_id=job.id))).job
        assert done.state == c.RUN_STATE_COMPLETED and done.attempt == 2
        await silent.close()
        await rescuer.close()
    failures = await execute_sql(pg_url, "SELECT key FROM attestations WHERE type = 2 ORDER BY key")
    assert failures == [(f"worker-failure:{job.id}:1",)], "one failed attempt, attested once"
    failed_events = await execute_sql(
        pg_url,
        "SELECT count(*) FROM trace_events WHERE run_id = :run AND type = 4",
        run=job.id,
    )
    assert failed_events == [(1,)]
