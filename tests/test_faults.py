"""Storage faults: a real PostgreSQL of the test's own restarted under load,
health that follows storage, durability settings checked on every connection,
and retention sweeps running on their own timer."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobtrace.client.worker import JobContext
from jobtrace.pb import SERVICE_NAMES
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j

from .conftest import Harness, Stubs, wait_for
from .pgcluster import PgCluster, pg_cluster
from .workers import runtime_worker

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def cluster() -> Any:
    async with pg_cluster() as running:
        yield running


class Load:
    """Submits, reads and lists in bounded loops, recording every answer's code."""

    def __init__(self, api: Stubs, limit: int = 5000) -> None:
        self.api = api
        self.limit = limit
        self.codes: collections.Counter[str] = collections.Counter()
        self.acknowledged: dict[str, str] = {}  # request id -> job id
        self.stop = asyncio.Event()
        self._calls = 0

    def _more(self) -> bool:
        self._calls += 1
        return not self.stop.is_set() and self._calls <= self.limit

    async def _call(self, call: Any) -> Any:
        try:
            answer = await call
        except grpc.aio.AioRpcError as err:
            self.codes[err.code().name] += 1
            return None
        self.codes["OK"] += 1
        return answer

    async def submits(self) -> None:
        n = 0
        while self._more():
            rid = f"r{n}"
            request = j.SubmitJobRequest(request_id=rid, job=c.JobSpec(service="svc"))
            answer = await self._call(self.api.jobs.SubmitJob(request, timeout=10))
            if answer is not None:  # else the same request id is sent again
                self.acknowledged[rid] = answer.job.id
                n += 1
            await asyncio.sleep(0.02)  # pace the load (not a synchronisation)

    async def reads(self) -> None:
        while self._more():
            ids = list(self.acknowledged.values())
            if ids:
                await self._call(self.api.jobs.GetJob(j.GetJobRequest(job_id=ids[-1]), timeout=10))
            await self._call(self.api.jobs.ListJobs(j.ListJobsRequest(page_size=20), timeout=10))
            await asyncio.sleep(0.02)  # pace the load (not a synchronisation)


async def test_a_postgresql_restart_under_load_is_answered_unavailable_and_loses_nothing(
    cluster: PgCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL is stopped with `-m immediate` and started again twice while
    jobs are submitted, read, listed and run: every refusal (connection
    refused, "the database system is starting up", terminated sessions) is
    UNAVAILABLE, never INTERNAL, and every acknowledged job completes once."""
    caplog.set_level(logging.WARNING)
    caplog.set_level(logging.INFO, logger="jobtrace.client.worker")
    runs: collections.Counter[str] = collections.Counter()
    stored: collections.Counter[str] = collections.Counter()

    async def run(ctx: JobContext) -> dict[str, Any]:
        runs[ctx.job_id] += 1
        return {"ok": True}

    # A lease well beyond an outage plus the resend backoff: no lease expires
    # under a worker that is running the job. One that expires anyway is an
    # assignment whose claim committed as the connection died (outcome
    # unknown): the worker never got it, and the job runs once, on its retry.
    async with Harness(cluster.url, heartbeat_seconds=0.3, lease_seconds=10) as h:
        load = Load(h.stubs())
        async with runtime_worker(h.target, {"svc": run}, max_concurrency=4) as worker:
            worker.on_completed = lambda job_id, ok: stored.update([job_id] if ok else [])
            loops = [asyncio.create_task(load.submits()), asyncio.create_task(load.reads())]
            try:
                for _cycle in range(2):
                    done = len(stored)
                    await wait_for(lambda d=done: len(stored) >= d + 5, timeout=20)  # type: ignore[misc]
                    refused = load.codes[UNAVAILABLE.name]
                    await cluster.stop("immediate")
                    # Down until the load has met the outage a few times.
                    await wait_for(
                        lambda r=refused: load.codes[UNAVAILABLE.name] >= r + 150,  # type: ignore[misc]
                        timeout=20,
                    )
                    acked = len(load.acknowledged)
                    await cluster.start(wait=False)  # calls now meet "starting up"
                    await wait_for(lambda a=acked: len(load.acknowledged) > a, timeout=20)  # type: ignore[misc]
            finally:
                load.stop.set()
                await asyncio.gather(*loops)
            jobs = set(load.acknowledged.values())
            await wait_for(lambda: jobs <= set(stored), timeout=40, interval=0.1)
        api = h.stubs()
        for job_id in jobs:
            job = (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id))).job
            assert job.state == c.RUN_STATE_COMPLETED, job
    refusals = [r for r in caplog.records if r.getMessage().startswith("server refused")]
    internal = [r.getMessage() for r in refusals if getattr(r, "code", "") == "INTERNAL"]
    assert load.codes["INTERNAL"] == 0 and not internal, (load.codes, internal)
    assert set(load.codes) <= {"OK", UNAVAILABLE.name}, load.codes
    assert load.codes[UNAVAILABLE.name] >= 10, "the outages were met by the load"
    assert all(stored[job_id] == 1 for job_id in jobs), "each completion acknowledged once"
    assert all(runs[job_id] == 1 for job_id in jobs), "each job ran once"
    unexpected = [r.getMessage() for r in caplog.records if "unexpectedly" in r.getMessage()]
    assert not unexpected, unexpected


async def test_terminated_sessions_and_too_many_connections_are_unavailable(
    cluster: PgCluster,
) -> None:
    """The server's sessions are terminated by an administrator (57P01) and its
    role may open no connection (53300, "too many connections"): every call is
    UNAVAILABLE with STORAGE_UNAVAILABLE, never INTERNAL, until the limit is
    lifted."""
    from .conftest import error_details

    await cluster.execute("CREATE ROLE jt LOGIN")
    await cluster.execute("CREATE DATABASE jt OWNER jt")
    url = f"postgresql+asyncpg://jt@127.0.0.1:{cluster.port}/jt"
    async with Harness(url) as h:
        api = h.stubs()
        job = (
            await api.jobs.SubmitJob(j.SubmitJobRequest(request_id="a", job=c.JobSpec(service="s")))
        ).job
        await cluster.execute("ALTER ROLE jt CONNECTION LIMIT 0")
        await cluster.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'jt'"
        )
        for i in range(3):
            for call in (
                api.jobs.SubmitJob(
                    j.SubmitJobRequest(request_id=f"b{i}", job=c.JobSpec(service="s"))
                ),
                api.jobs.GetJob(j.GetJobRequest(job_id=job.id)),
                api.jobs.ListJobs(j.ListJobsRequest()),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                info, _ = error_details(caught.value)
                assert caught.value.code() == UNAVAILABLE, caught.value.details()
                assert info is not None and info.reason == "STORAGE_UNAVAILABLE"
        await cluster.execute("ALTER ROLE jt CONNECTION LIMIT -1")

        async def submitted() -> bool:
            request = j.SubmitJobRequest(request_id="c", job=c.JobSpec(service="s"))
            try:
                await api.jobs.SubmitJob(request)
            except grpc.aio.AioRpcError as err:
                assert err.code() == UNAVAILABLE, err.details()
                return False
            return True

        await wait_for(submitted, timeout=20, interval=0.1)


# --- the worker runtime resends a terminal report until it is stored ------------


async def test_a_completion_answered_internal_is_sent_again_until_stored(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault of the server's (INTERNAL) does not lose the handler's result:
    the runtime keeps the report and sends it again, with backoff."""
    assert harness.server is not None
    scheduler = harness.server.scheduler
    real_complete = scheduler.complete
    faults: list[str] = []

    async def faulty(*args: Any, **kwargs: Any) -> None:
        if len(faults) < 2:  # a bug of the server's, twice (cannot be caused for real)
            faults.append("bug")
            raise KeyError("a bug")
        await real_complete(*args, **kwargs)

    monkeypatch.setattr(scheduler, "complete", faulty)
    outcomes: list[tuple[str, bool]] = []

    async def run(ctx: JobContext) -> dict[str, Any]:
        return {"n": 7}

    api = harness.stubs()
    async with runtime_worker(harness.target, {"svc": run}) as worker:
        worker.on_completed = lambda job_id, ok: outcomes.append((job_id, ok))
        job = (
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="r", job=c.JobSpec(service="svc", max_attempts=1))
            )
        ).job
        await wait_for(lambda: outcomes, timeout=20)
    done = (await api.jobs.GetJob(j.GetJobRequest(job_id=job.id))).job
    assert faults == ["bug", "bug"]
    assert outcomes == [(job.id, True)]
    assert done.state == c.RUN_STATE_COMPLETED and done.attempt == 1 and done.result["n"] == 7


async def test_a_completion_found_already_stored_counts_as_acknowledged(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The completion is stored but its answer is lost (the database connection
    dropped as COMMIT returned): the resend is answered "already completed",
    which means stored, not "refused"."""
    from sqlalchemy import exc as sa_exc

    assert harness.server is not None
    scheduler = harness.server.scheduler
    real_complete = scheduler.complete
    lost: list[str] = []

    async def answer_lost(*args: Any, **kwargs: Any) -> None:
        await real_complete(*args, **kwargs)
        if not lost:
            lost.append("answer")
            raise sa_exc.OperationalError("COMMIT", {}, ConnectionResetError("reset"))

    monkeypatch.setattr(scheduler, "complete", answer_lost)
    outcomes: list[tuple[str, bool]] = []

    async def run(ctx: JobContext) -> dict[str, Any]:
        return {"n": 1}

    api = harness.stubs()
    caplog.set_level(logging.INFO, logger="jobtrace.client.worker")
    async with runtime_worker(harness.target, {"svc": run}) as worker:
        worker.on_completed = lambda job_id, ok: outcomes.append((job_id, ok))
        job = (
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="r", job=c.JobSpec(service="svc", max_attempts=1))
            )
        ).job
        await wait_for(lambda: outcomes, timeout=20)
        assert not worker._unacked, "nothing is owed any more"
    assert lost == ["answer"]
    assert outcomes == [(job.id, True)], "already stored is stored"
    messages = [r.getMessage() for r in caplog.records if r.name == "jobtrace.client.worker"]
    assert any("already stored" in m for m in messages), messages
    assert not any("refused complete" in m and "DUPLICATE" in m for m in messages), messages


async def test_a_completion_refused_for_good_is_not_sent_again(harness: Harness) -> None:
    """A report the server refuses for a reason resending cannot change (here
    the job was cancelled while the handler, ignoring the cancel, went on) is
    dropped at once: nothing kept, no resend scheduled."""
    outcomes: list[tuple[str, bool]] = []
    started = asyncio.Event()
    release = asyncio.Event()

    async def stubborn(ctx: JobContext) -> dict[str, Any]:
        started.set()
        while True:
            try:
                await release.wait()
                return {"late": True}
            except asyncio.CancelledError:  # ignores the cancel and reports anyway
                release.set()

    api = harness.stubs()
    async with runtime_worker(harness.target, {"svc": stubborn}) as worker:
        worker.on_completed = lambda job_id, ok: outcomes.append((job_id, ok))
        job = (
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="r", job=c.JobSpec(service="svc"))
            )
        ).job
        await asyncio.wait_for(started.wait(), 10)
        await api.jobs.CancelJob(j.CancelJobRequest(job_id=job.id))
        await wait_for(lambda: outcomes, timeout=10)
        assert outcomes == [(job.id, False)]
        assert not worker._unacked and not worker._background, "no resend pending"
    done = (await api.jobs.GetJob(j.GetJobRequest(job_id=job.id))).job
    assert done.state == c.RUN_STATE_CANCELLED


# --- health follows storage ------------------------------------------------------


async def test_health_is_not_serving_while_storage_is_unreachable(
    cluster: PgCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """With PostgreSQL down, the overall and every per-service status turn
    NOT_SERVING (the probe notices without any call), calls are UNAVAILABLE, and
    both turn back when it returns; the outage is logged once when it begins and
    once when it ends, with the count of failed calls, and no traceback."""
    caplog.set_level(logging.WARNING)
    async with Harness(cluster.url, storage_probe_seconds=0.2) as h:
        api = h.stubs()
        health = health_pb2_grpc.HealthStub(api.channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING
        await api.jobs.SubmitJob(j.SubmitJobRequest(request_id="a", job=c.JobSpec(service="svc")))

        await cluster.stop("immediate")
        assert (await asyncio.wait_for(watch.read(), 20)).status == NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert answer.status == NOT_SERVING, name
        calls = [
            api.jobs.ListJobs(j.ListJobsRequest()),
            api.jobs.SubmitJob(j.SubmitJobRequest(request_id="b", job=c.JobSpec(service="svc"))),
            api.jobs.GetJob(j.GetJobRequest(job_id="job_00000000000000000000000000")),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == UNAVAILABLE, caught.value.details()

        await cluster.start(wait=False)
        assert (await asyncio.wait_for(watch.read(), 30)).status == SERVING
        for name in ("", *SERVICE_NAMES):
            answer = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert answer.status == SERVING, name
        await api.jobs.SubmitJob(j.SubmitJobRequest(request_id="b", job=c.JobSpec(service="svc")))
        watch.cancel()
    messages = [r.getMessage() for r in caplog.records]
    down = [m for m in messages if m.startswith("storage unavailable")]
    back = [m for m in messages if m.startswith("storage back after")]
    assert len(down) == 1 and len(back) == 1, messages
    failed = int(back[0].split()[3])
    assert failed >= len(calls), back
    traced = [
        r.getMessage() for r in caplog.records if r.exc_info and r.name.startswith("jobtrace")
    ]
    assert not traced, traced


# --- durability settings are checked, not assumed --------------------------------


async def _settings_of_every_connection(h: Harness) -> list[str]:
    """The durability setting as each of the server's own pooled connections
    reports it (every connection each pool can hold is checked out at once, so
    none is skipped): SQLite's synchronous level, PostgreSQL's synchronous_commit."""
    from sqlalchemy import text

    assert h.server is not None
    db = h.server.db
    query = "PRAGMA synchronous" if db.is_sqlite else "SHOW synchronous_commit"
    seen: list[str] = []
    for engine in (db._write_engine, db._read_engine):
        assert engine is not None
        pool = engine.sync_engine.pool
        capacity = pool.size() + max(pool._max_overflow, 0)  # type: ignore[attr-defined]
        async with contextlib.AsyncExitStack() as held:
            for _ in range(capacity):
                conn = await held.enter_async_context(engine.connect())
                seen.append(str((await conn.execute(text(query))).scalar()))
    return seen


async def test_every_connection_the_server_opens_is_durable(db_url: str) -> None:
    async with Harness(db_url) as h:
        api = h.stubs()
        await asyncio.gather(
            *(
                api.jobs.SubmitJob(
                    j.SubmitJobRequest(request_id=f"r{i}", job=c.JobSpec(service="s"))
                )
                for i in range(50)
            ),
            *(api.jobs.ListJobs(j.ListJobsRequest()) for _ in range(20)),
        )
        seen = await _settings_of_every_connection(h)
    durable = "2" if db_url.startswith("sqlite") else "on"  # 2: FULL
    assert seen and all(value == durable for value in seen), seen


async def test_a_sqlite_connection_below_full_is_refused(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A regression to synchronous=NORMAL (which passes every crash test, and
    loses acknowledged writes on power failure) stops the server from starting."""
    from jobtrace.store import db

    monkeypatch.setattr(db, "SQLITE_SYNCHRONOUS", "NORMAL")  # the regression
    h = Harness(sqlite_url)
    with pytest.raises(OSError, match=r"synchronous is NORMAL.*not FULL"):
        await h.start()


async def test_postgresql_with_synchronous_commit_off_is_refused_unless_allowed(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from .conftest import _pg_admin
    from .procs import jobtrace

    name = pg_url.rsplit("/", 1)[1]
    await _pg_admin(f"ALTER DATABASE {name} SET synchronous_commit = off")
    code, _, err = await jobtrace("serve", "--listen", "127.0.0.1:0", "--db", pg_url)
    assert code == 1, err
    assert "synchronous_commit is off" in err and "--allow-async-commit" in err, err
    assert "Traceback" not in err

    with pytest.raises(OSError, match="synchronous_commit is off"):
        await Harness(pg_url).start()

    caplog.set_level(logging.WARNING)
    async with Harness(pg_url, allow_async_commit=True) as h:
        api = h.stubs()
        await api.jobs.SubmitJob(j.SubmitJobRequest(request_id="r", job=c.JobSpec(service="s")))
        assert set(await _settings_of_every_connection(h)) == {"off"}
    warnings = [r.getMessage() for r in caplog.records if "--allow-async-commit" in r.getMessage()]
    assert len(warnings) == 1 and "synchronous_commit is off" in warnings[0], warnings


def test_allow_async_commit_is_read_from_the_environment() -> None:
    from jobtrace.config import Settings

    assert Settings.load(env={"JOBTRACE_ALLOW_ASYNC_COMMIT": "1"}).allow_async_commit
    assert not Settings.load(env={}).allow_async_commit


# --- retention runs on its own timer ---------------------------------------------


async def test_retention_sweeps_prune_on_their_own_and_the_chain_still_verifies(
    db_url: str,
) -> None:
    """With retention of half a second and a short sweep interval, a failed
    attempt's attestation and the run's trace events disappear without anyone
    calling the sweep; after a restart with normal retention the next attempt's
    attestation, chained to the pruned one, still verifies."""
    from jobtrace.pb import attestation_service_pb2 as a
    from jobtrace.pb import trace_service_pb2 as t
    from jobtrace.pb import worker_service_pb2 as w

    from .workers import RawWorker

    half_second = 0.5 / 86400  # in days
    h = Harness(
        db_url,
        attestation_retention_days=half_second,
        trace_retention_days=half_second,
        retention_sweep_seconds=0.1,
    )
    await h.start()
    try:
        api = h.stubs()
        raw = RawWorker(api)
        await raw.hello("w", ["svc"])
        job = (
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="r", job=c.JobSpec(service="svc", max_attempts=2))
            )
        ).job
        await raw.expect("assignment")
        error = c.ErrorDetail(message="flaky", code="E")
        await raw.send(fail=w.FailReport(job_id=job.id, attempt=1, error=error, retryable=True))
        await raw.expect("ack")
        await raw.close()

        async def attestations() -> list[Any]:
            page = await api.attest.ListAttestations(a.ListAttestationsRequest(job_id=job.id))
            return list(page.attestations)

        async def events() -> list[Any]:
            page = await api.trace.ListTraceEvents(t.ListTraceEventsRequest(run_id=job.id))
            return list(page.events)

        first = await attestations()
        assert len(first) == 1, "the failed attempt is attested"
        # Pruned by the timer: nobody calls a sweep here.
        await wait_for(lambda: _empty(attestations()), timeout=30, interval=0.05)
        await wait_for(lambda: _empty(events()), timeout=30, interval=0.05)
        await h.stop()

        await h.start(
            attestation_retention_days=7.0, trace_retention_days=30.0, retention_sweep_seconds=0.1
        )
        api = h.stubs()
        raw = RawWorker(api)
        await raw.hello("w", ["svc"])
        assignment = await raw.expect("assignment", timeout=30)
        assert assignment.job.id == job.id and assignment.attempt == 2
        await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=2))
        await raw.expect("ack")
        await raw.close()
        (last,) = await attestations()
        assert last.attempt == 2 and last.previous_digest == first[0].digest
        verdict = await api.attest.VerifyAttestation(a.VerifyAttestationRequest(key=last.key))
        assert verdict.valid and verdict.chain_valid and verdict.previous_pruned, verdict
        assert await events(), "the new attempt's events are kept"
    finally:
        await h.stop()


async def _empty(items: Any) -> bool:
    return not await items
