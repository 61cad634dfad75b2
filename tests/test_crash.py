"""Crash safety: kill -9 the server under load, restart it on the same database,
and check that nothing acknowledged was lost and nothing ran twice."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from typing import Any

import grpc
from google.protobuf import struct_pb2

from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t

from .conftest import Stubs, execute_sql, stubs_for, wait_for
from .procs import drain, serve
from .workers import demo_worker_process, terminate


async def start_server(port: int, db: str) -> tuple[asyncio.subprocess.Process, int]:
    """`jobtrace serve` on 127.0.0.1:PORT (0: any free port); the process and its port."""
    proc, port, _ = await serve(
        "--db", db, "--lease-seconds", "2", "--heartbeat-seconds", "0.5", listen=f"127.0.0.1:{port}"
    )
    drain(proc)  # so the pipe never fills
    return proc, port


async def test_kill_dash_nine_loses_nothing_acknowledged(db_url: str) -> None:
    """The server and two of the four workers are killed with SIGKILL under load.
    The survivors reconnect to the restarted server and keep their leases; the
    leases of the dead workers expire and their jobs run again elsewhere."""
    server, port = await start_server(0, db_url)
    workers = [await demo_worker_process(f"127.0.0.1:{port}", f"w{i}") for i in range(4)]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    api = stubs_for(channel)
    acked_jobs: dict[str, str] = {}  # request id -> job id
    acked_events: dict[str, str] = {}  # event key -> run id
    acked_notes: list[tuple[str, str]] = []  # (run id, key)
    stop = asyncio.Event()

    async def submitter(n: int) -> None:
        i = 0
        while not stop.is_set() and i < 400:
            i += 1
            rid = f"s{n}-{i}"
            payload = struct_pb2.Struct()
            payload.update({"seconds": 0.2, "n": i})
            try:
                job = (
                    await api.jobs.SubmitJob(
                        j.SubmitJobRequest(
                            request_id=rid,
                            job=c.JobSpec(service="demo", payload=payload, max_attempts=10),
                        ),
                        timeout=5,
                    )
                ).job
                acked_jobs[rid] = job.id
                key = f"ev-{rid}"
                await api.trace.AppendTraceEvents(
                    t.AppendTraceEventsRequest(
                        run_id=job.id, events=[c.TraceEvent(event_key=key, message="hello")]
                    ),
                    timeout=5,
                )
                acked_events[key] = job.id
                await api.attest.AttachAnnotations(
                    a.AttachAnnotationsRequest(
                        run_id=job.id,
                        actor=c.Actor(kind=c.ACTOR_KIND_SERVICE, id="crash-test"),
                        attributes={"trigger.source": struct_pb2.Value(string_value="crash")},
                    ),
                    timeout=5,
                )
                acked_notes.append((job.id, "trigger.source"))
            except grpc.aio.AioRpcError:
                if stop.is_set():
                    return
                await asyncio.sleep(0.05)  # back off while the server is down

    long_jobs: set[str] = set()

    async def held_by_the_doomed() -> set[str]:
        """Long jobs running on w0 or w1: they cannot finish before the kill."""
        running = (
            await api.jobs.ListJobs(
                j.ListJobsRequest(state=c.RUN_STATE_RUNNING, page_size=1000), timeout=5
            )
        ).jobs
        return {job.id for job in running if job.worker_id in {"w0", "w1"} and job.id in long_jobs}

    try:
        tasks = [asyncio.create_task(submitter(n)) for n in range(3)]
        await wait_for(lambda: len(acked_jobs) >= 60, timeout=60)
        for i in range(8):
            payload = struct_pb2.Struct()
            payload.update({"seconds": 4})
            request = j.SubmitJobRequest(
                request_id=f"long-{i}",
                job=c.JobSpec(service="demo", payload=payload, max_attempts=10),
            )
            long_job = (await api.jobs.SubmitJob(request, timeout=5)).job.id
            long_jobs.add(long_job)
            acked_jobs[f"long-{i}"] = long_job
        doomed_jobs = await wait_for(held_by_the_doomed, timeout=30)
        for victim in (server, workers[0], workers[1]):
            victim.send_signal(signal.SIGKILL)
        for victim in (server, workers[0], workers[1]):
            await victim.wait()
        stop.set()
        await asyncio.gather(*tasks)
        assert len(acked_jobs) >= 60
        server, _ = await start_server(port, db_url)  # the same port: workers reconnect
        workers += [
            await demo_worker_process(f"127.0.0.1:{port}", f"w{i}") for i in (4, 5)
        ]  # new ids
        await channel.close()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        api = stubs_for(channel)

        # Every acknowledged write survived.
        for rid, job_id in acked_jobs.items():
            got = (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id))).job
            assert got.request_id == rid
        for key, run_id in acked_events.items():
            events = (
                await api.trace.ListTraceEvents(
                    t.ListTraceEventsRequest(run_id=run_id, page_size=1000)
                )
            ).events
            assert key in {e.event_key for e in events}
        for run_id, key in acked_notes:
            notes = (
                await api.attest.ListAnnotations(a.ListAnnotationsRequest(run_id=run_id))
            ).annotations
            assert key in {n.key for n in notes}

        # Every job finishes: the dead workers' leases expire and are requeued.
        async def all_completed() -> bool:
            for job_id in {*acked_jobs.values(), *doomed_jobs}:
                job = (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id))).job
                if job.state != c.RUN_STATE_COMPLETED:
                    return False
            return True

        await wait_for(all_completed, timeout=90, interval=0.5)
        for job_id in doomed_jobs:
            job = (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id))).job
            assert job.attempt >= 2 and job.worker_id not in {"w0", "w1"}, job
        attestations = await _all_attestations(api)
        completed = [
            x.job_id for x in attestations if x.type == a.ATTESTATION_TYPE_WORKER_COMPLETION
        ]
        assert len(completed) == len(set(completed)), "no job completed twice"
        assert set(acked_jobs.values()) <= set(completed)
        failures = [x for x in attestations if x.type == a.ATTESTATION_TYPE_WORKER_FAILURE]
        assert {x.job_id for x in failures} >= doomed_jobs, "each lost lease is attested"
        for item in attestations:
            verdict = await api.attest.VerifyAttestation(a.VerifyAttestationRequest(key=item.key))
            assert verdict.valid, (item.key, verdict.reason)
    finally:
        stop.set()
        await terminate(*workers)
        await channel.close()
        await terminate(server)

    twice = await execute_sql(
        db_url,
        "SELECT run_id, count(*) FROM trace_events WHERE type = 3 GROUP BY run_id "
        "HAVING count(*) > 1",
    )
    assert twice == [], "no job recorded COMPLETED twice"
    if db_url.startswith("sqlite"):
        with sqlite3.connect(db_url.split("///", 1)[1]) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def _all_attestations(api: Stubs) -> list[Any]:
    out: list[Any] = []
    token = ""
    while True:
        page = await api.attest.ListAttestations(
            a.ListAttestationsRequest(page_size=1000, page_token=token)
        )
        out += page.attestations
        token = page.next_page_token
        if not token:
            return out
