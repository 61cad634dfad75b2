"""The worker stream under reconnects, bad and unexpected input, other tenants'
jobs, and the durability of the annotations a worker sends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import resource
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import json_format, struct_pb2
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from jobtrace.auth import hash_token
from jobtrace.clock import now_us
from jobtrace.domain.dispatch import Scheduler, WorkerSession
from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, _pg_admin, stubs_for, wait_for
from .test_crash import start_server
from .test_workers import get, state_is
from .workers import RawWorker, terminate

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
QUICK_RETRY = c.BackoffPolicy(initial_interval={"nanos": 1_000_000})


def value(x: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    json_format.ParseDict(x, v)
    return v


async def submit(api: Stubs, rid: str, service: str = "svc", **fields: Any) -> c.Job:
    request = j.SubmitJobRequest(request_id=rid, job=c.JobSpec(service=service, **fields))
    return (await api.jobs.SubmitJob(request)).job


async def notes(api: Stubs, run_id: str) -> list[c.Annotation]:
    page = await api.attest.ListAnnotations(a.ListAnnotationsRequest(run_id=run_id, page_size=1000))
    return list(page.annotations)


def scheduler_of(h: Harness) -> Scheduler:
    assert h.server is not None
    return h.server.scheduler


def track_session_ends(scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Ids of the sessions whose end the scheduler has finished handling (leases
    given back or kept), in order."""
    ended: list[str] = []
    original = scheduler.close_session

    async def close_session(session: WorkerSession, **how: Any) -> None:
        try:
            await original(session, **how)
        finally:
            ended.append(session.session_id)

    monkeypatch.setattr(scheduler, "close_session", close_session)
    return ended


# --- reconnects: resume the lease or lose it cleanly, never both ----------------


async def test_reconnect_with_the_old_stream_still_open_resumes_the_lease(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = harness.stubs()
    ended = track_session_ends(scheduler_of(harness), monkeypatch)
    old = RawWorker(api)
    old_session = (await old.hello("w", ["svc"])).session_id
    job = await submit(api, "r")
    await old.expect("assignment")
    # A proxy keeps the old stream open; the worker comes back on a new one.
    new = RawWorker(api)
    welcome = await new.hello("w", ["svc"], running=[w.JobAttempt(job_id=job.id, attempt=1)])
    assert [(r.job_id, r.attempt) for r in welcome.resumed] == [(job.id, 1)]
    assert not welcome.revoked
    assert await asyncio.wait_for(old.call.read(), 5) is grpc.aio.EOF, "the old stream ends"
    await wait_for(lambda: old_session in ended)
    kept = await get(api, job.id)
    assert kept.state == c.RUN_STATE_RUNNING and kept.attempt == 1 and kept.worker_id == "w"
    mid = await new.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
    ack = await new.expect("ack")
    assert ack.message_id == mid
    done = await get(api, job.id)
    assert done.state == c.RUN_STATE_COMPLETED and done.attempt == 1
    await new.close()


async def test_reconnect_while_the_old_stream_ends_resumes_the_lease(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old stream closes while the new hello is resuming its leases: its end
    must find itself replaced and give nothing back."""
    api = harness.stubs()
    scheduler = scheduler_of(harness)
    ended = track_session_ends(scheduler, monkeypatch)
    resuming, proceed = asyncio.Event(), asyncio.Event()
    resume = scheduler._resume

    async def paused_resume(session: WorkerSession, running: dict[str, int]) -> Any:
        if running:  # the reconnect, not the first hello
            resuming.set()
            await proceed.wait()
        return await resume(session, running)

    monkeypatch.setattr(scheduler, "_resume", paused_resume)
    old = RawWorker(api)
    old_session = (await old.hello("w", ["svc"])).session_id
    job = await submit(api, "r")
    await old.expect("assignment")
    new = RawWorker(api)
    await new.send(
        hello=w.WorkerHello(
            worker_id="w",
            services=["svc"],
            running=[w.JobAttempt(job_id=job.id, attempt=1)],
        )
    )
    await asyncio.wait_for(resuming.wait(), 5)
    await old.close()
    await wait_for(lambda: old_session in ended)
    proceed.set()
    welcome = await new.expect("welcome")
    assert [(r.job_id, r.attempt) for r in welcome.resumed] == [(job.id, 1)]
    assert (await get(api, job.id)).state == c.RUN_STATE_RUNNING
    await new.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
    await new.expect("ack")
    done = await get(api, job.id)
    assert done.state == c.RUN_STATE_COMPLETED and done.attempt == 1
    await new.close()


async def test_reconnect_on_another_replica_keeps_the_lease_when_the_old_stream_ends(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica A cannot know that its worker came back on replica B: the end of
    A's stream gives back only the leases A's session still holds."""
    first, second = Harness(pg_url), Harness(pg_url)
    await first.start()
    await second.start()
    try:
        on_a, on_b = first.stubs(), second.stubs()
        ended_on_a = track_session_ends(scheduler_of(first), monkeypatch)
        old = RawWorker(on_a)
        old_session = (await old.hello("w", ["svc"])).session_id
        job = await submit(on_a, "x")
        await old.expect("assignment")
        new = RawWorker(on_b)
        welcome = await new.hello("w", ["svc"], running=[w.JobAttempt(job_id=job.id, attempt=1)])
        assert [(r.job_id, r.attempt) for r in welcome.resumed] == [(job.id, 1)]
        await old.close()
        await wait_for(lambda: old_session in ended_on_a)
        kept = await get(on_b, job.id)
        assert kept.state == c.RUN_STATE_RUNNING and kept.attempt == 1
        await new.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
        await new.expect("ack")
        assert (await get(on_b, job.id)).state == c.RUN_STATE_COMPLETED
        await new.close()
    finally:
        await first.stop()
        await second.stop()


async def test_a_stale_resume_does_not_renew_the_lease_of_a_later_attempt(
    harness: Harness,
) -> None:
    api = harness.stubs()
    old = RawWorker(api)
    await old.hello("w", ["svc"])
    job = await submit(api, "s", backoff=QUICK_RETRY)
    await old.expect("assignment")
    await old.send(
        fail=w.FailReport(
            job_id=job.id, attempt=1, retryable=True, error=c.ErrorDetail(message="flaky")
        )
    )
    await old.expect("ack")
    assert (await old.expect("assignment")).attempt == 2
    before = await get(api, job.id)
    assert before.state == c.RUN_STATE_RUNNING and before.attempt == 2
    # A reconnect that claims the first attempt, which is over (and not the
    # second, which the worker therefore no longer runs).
    new = RawWorker(api)
    welcome = await new.hello("w", ["svc"], running=[w.JobAttempt(job_id=job.id, attempt=1)])
    assert [(r.job_id, r.attempt) for r in welcome.revoked] == [(job.id, 1)]
    assert not welcome.resumed
    # The second attempt's lease was neither resumed nor renewed: the replaced
    # stream gives it back, and the job runs again.
    third = await new.expect("assignment")
    assert (third.job.id, third.attempt) == (job.id, 3)
    assert third.job.failure.attempt == 2 and third.job.failure.details == "worker stream lost"
    await new.close()


async def test_a_worker_reconnecting_within_the_grace_resumes_its_leases(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A network blip: the stream is lost, the worker comes back under the same
    id (within the default grace, one heartbeat interval) and goes on with the
    job it still runs; the one it no longer runs is given back and retried."""
    api = harness.stubs()
    ended = track_session_ends(scheduler_of(harness), monkeypatch)
    old = RawWorker(api)
    old_session = (await old.hello("w", ["svc"], max_concurrency=2)).session_id
    kept = await submit(api, "kept")
    dropped = await submit(api, "dropped", backoff=QUICK_RETRY)
    first = {(await old.expect("assignment")).job.id for _ in range(2)}
    assert first == {kept.id, dropped.id}
    started = (await get(api, kept.id)).started_at
    await old.close()
    await wait_for(lambda: old_session in ended)  # the server has handled the loss
    new = RawWorker(api)
    welcome = await new.hello(
        "w", ["svc"], max_concurrency=2, running=[w.JobAttempt(job_id=kept.id, attempt=1)]
    )
    assert [(r.job_id, r.attempt) for r in welcome.resumed] == [(kept.id, 1)]
    assert not welcome.revoked
    again = await new.expect("assignment", timeout=30)
    assert (again.job.id, again.attempt) == (dropped.id, 2)
    assert again.job.failure.details == "worker stream lost"
    await new.send(complete=w.CompleteReport(job_id=kept.id, attempt=1))
    await new.expect("ack")
    done = await get(api, kept.id)
    assert done.state == c.RUN_STATE_COMPLETED and done.attempt == 1
    assert done.started_at == started, "the attempt went on, it did not run again"
    await new.close()


async def test_a_worker_that_does_not_come_back_loses_its_leases_when_the_grace_ends(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    grace_us = 500_000
    async with Harness(db_url, reconnect_grace_seconds=grace_us / 1e6) as h:  # 30 s leases
        scheduler = scheduler_of(h)
        lost_at: dict[str, int] = {}
        close_session = scheduler.close_session

        async def timed_close(session: WorkerSession, **how: Any) -> None:
            lost_at[session.session_id] = now_us()  # the server's clock
            await close_session(session, **how)

        monkeypatch.setattr(scheduler, "close_session", timed_close)
        api = h.stubs()
        raw = RawWorker(api)
        session = (await raw.hello("w", ["svc"])).session_id
        job = await submit(api, "gone")
        await raw.expect("assignment")
        await raw.close()
        requeued = await wait_for(lambda: state_is(api, job.id, c.RUN_STATE_QUEUED), timeout=20)
    # Given back when the grace ended, long before the lease would have expired.
    assert requeued.failure.code == "LEASE_EXPIRED" and requeued.failure.attempt == 1
    assert requeued.failure.details == "worker stream lost"
    kept_us = requeued.updated_at.ToMicroseconds() - lost_at[session]
    assert kept_us >= grace_us - 1_000, f"given back after {kept_us} us, within the grace"


async def migrate_down(db_url: str, revision: str) -> None:
    """Take the schema back to an older revision (as a database written by an
    older jobtrace is)."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy.ext.asyncio import create_async_engine

    from jobtrace.store.db import MIGRATIONS

    def downgrade(connection: Any) -> None:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.downgrade(config, revision)

    engine = create_async_engine(db_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(downgrade)
    finally:
        await engine.dispose()


async def test_a_lease_taken_before_the_upgrade_is_resumed_after_it(db_url: str) -> None:
    """Leases record their holder since revision 0006; one held across the
    upgrade by a worker of a server without authentication is still its own."""
    h = Harness(db_url)
    await h.start()
    raw = RawWorker(h.stubs())
    await raw.hello("w", ["svc"])
    job = await submit(h.stubs(), "old")
    await raw.expect("assignment")
    await h.stop()  # a shutdown keeps the lease
    await migrate_down(db_url, "0005")
    await h.start()  # migrates up again
    try:
        api = h.stubs()
        back = RawWorker(api)
        welcome = await back.hello("w", ["svc"], running=[w.JobAttempt(job_id=job.id, attempt=1)])
        assert [(r.job_id, r.attempt) for r in welcome.resumed] == [(job.id, 1)]
        await back.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
        await back.expect("ack")
        done = await get(api, job.id)
        assert done.state == c.RUN_STATE_COMPLETED and done.attempt == 1
        await back.close()
    finally:
        await h.stop()


@contextlib.asynccontextmanager
async def serving(
    db_url: str, *flags: str
) -> AsyncIterator[tuple[int, asyncio.subprocess.Process, list[dict[str, Any]]]]:
    """`jobtrace serve` as a real process on any free port: its port, the
    process, and its log (one JSON object per line, collected as it comes)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jobtrace", "serve", "--listen", "127.0.0.1:0", "--db", db_url,
        "--log-format", "json", *flags,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[dict[str, Any]] = []
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def collect(stream: asyncio.StreamReader) -> None:
        while raw := await stream.readline():
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"message": raw.decode(errors="replace")}
            lines.append(line)
            if not port.done() and (m := re.search(r"\(port (\d+)\)", line["message"])):
                port.set_result(int(m.group(1)))
        if not port.done():
            port.set_exception(AssertionError("server exited during start"))

    reader = asyncio.create_task(collect(proc.stderr))
    try:
        async with asyncio.timeout(30):
            started = await port
        yield started, proc, lines
    finally:
        await terminate(proc)
        await reader


@contextlib.asynccontextmanager
async def storage_outage(db_url: str, server: asyncio.subprocess.Process) -> AsyncIterator[None]:
    """The server's storage refuses every write meanwhile. SQLite: the server
    process may write no file past its first byte (RLIMIT_FSIZE, so its writes
    fail as on a full disk). PostgreSQL: the database stops accepting
    connections and the server's are terminated."""
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite":
        limits = resource.prlimit(server.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(server.pid, resource.RLIMIT_FSIZE, (1, limits[1]))
        try:
            yield
        finally:
            resource.prlimit(server.pid, resource.RLIMIT_FSIZE, limits)
        return
    name = url.database
    await _pg_admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
    await _pg_admin(
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
    )
    try:
        yield
    finally:
        await _pg_admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")


async def test_a_disconnect_during_a_storage_outage_gives_the_leases_back_afterwards(
    db_url: str,
) -> None:
    # Leases far longer than the test: the jobs can only come back given back.
    flags = ("--lease-seconds", "120", "--reconnect-grace-seconds", "0.1")
    async with serving(db_url, *flags) as (port, server, log):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            api = stubs_for(channel)
            raw = RawWorker(api)
            await raw.hello("w", ["svc"], max_concurrency=2)
            jobs = [await submit(api, f"d{i}") for i in range(2)]
            for _ in jobs:
                await raw.expect("assignment")

            def give_back_failed() -> list[dict[str, Any]]:
                return [r for r in log if "could not give back" in r["message"]]

            async with storage_outage(db_url, server):
                await raw.close()
                await wait_for(give_back_failed, timeout=30)

            async def requeued(job_id: str) -> c.Job | None:
                try:
                    return await state_is(api, job_id, c.RUN_STATE_QUEUED)
                except grpc.aio.AioRpcError as exc:  # storage is coming back: ask again
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    return None

            for job in jobs:
                back = await wait_for(lambda job=job: requeued(job.id), timeout=30, interval=0.1)
                assert back.failure.details == "worker stream lost", "given back, not expired"
        (failed,) = give_back_failed()
        assert failed["level"] == "WARNING" and "exception" not in failed, "one line, once"
        assert not [r for r in log if "raised by servicer method" in r["message"]]


# --- heartbeat and hello bounds ---------------------------------------------------


async def test_heartbeats_with_many_affinity_keys_keep_the_lease_alive(fast: Harness) -> None:
    """Hello accepts up to 1,000 cached keys; so must every heartbeat."""
    api = fast.stubs()
    keys = [f"model-{i}" for i in range(100)]
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], affinity_keys=keys)
    job = await submit(api, "hb")
    await raw.expect("assignment")
    loop = asyncio.get_running_loop()
    until = loop.time() + 2.5  # two and a half lease lengths
    while loop.time() < until:
        running = [w.JobAttempt(job_id=job.id, attempt=1)]
        await raw.send(heartbeat=w.WorkerHeartbeat(running=running, affinity_keys=keys))
        ack = await raw.expect("heartbeat_ack")
        assert not ack.cancels
        await asyncio.sleep(0.2)  # the worker's heartbeat interval
    still = await get(api, job.id)
    assert still.state == c.RUN_STATE_RUNNING and still.attempt == 1


async def test_heartbeats_renew_only_the_leases_they_list(fast: Harness) -> None:
    """A job the worker's heartbeats no longer list (its completion report was
    lost, say) keeps its lease only until it expires: then the worker is told to
    stop it and it is retried, on the same open stream, while the lease the
    heartbeats list lives on."""
    api = fast.stubs()
    raw = RawWorker(api)
    session = (await raw.hello("w", ["svc"], max_concurrency=2)).session_id
    listed = await submit(api, "listed")
    unlisted = await submit(api, "unlisted", backoff=QUICK_RETRY)
    assert {(await raw.expect("assignment")).job.id for _ in range(2)} == {listed.id, unlisted.id}

    async def beat() -> None:
        while True:
            running = [w.JobAttempt(job_id=listed.id, attempt=1)]
            await raw.send(heartbeat=w.WorkerHeartbeat(running=running))
            await asyncio.sleep(0.2)  # the heartbeat interval asked for

    beating = asyncio.create_task(beat())
    try:
        cancel = await raw.expect("cancel", timeout=20)
        assert (cancel.job_id, cancel.attempt) == (unlisted.id, 1)
        retry = await raw.expect("assignment", timeout=20)
        assert (retry.job.id, retry.attempt) == (unlisted.id, 2)
        assert retry.job.failure.code == "LEASE_EXPIRED" and retry.job.failure.attempt == 1
        still = await get(api, listed.id)
        assert still.state == c.RUN_STATE_RUNNING and still.attempt == 1
        assert [s.session_id for s in scheduler_of(fast).sessions.values()] == [session]
    finally:
        beating.cancel()
    await raw.close()


async def test_a_refused_heartbeat_changes_nothing(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], affinity_keys=["a"])
    (session,) = scheduler_of(harness).sessions.values()
    before = (session.last_heartbeat_us, session.affinity_keys, session.draining)
    for keys, field in [
        ([f"k{i}" for i in range(1001)], "heartbeat.affinity_keys"),
        (["ok", "x" * 257], "heartbeat.affinity_keys[1]"),
        (["ok", ""], "heartbeat.affinity_keys[1]"),
    ]:
        mid = await raw.send(heartbeat=w.WorkerHeartbeat(affinity_keys=keys, draining=True))
        error = await raw.expect("error")
        assert error.message_id == mid and error.code == INVALID_ARGUMENT
        assert field in error.message and not error.fatal
        assert (session.last_heartbeat_us, session.affinity_keys, session.draining) == before
    await raw.send(heartbeat=w.WorkerHeartbeat(affinity_keys=["b"]))
    await raw.expect("heartbeat_ack")
    assert session.affinity_keys == frozenset({"b"})
    await raw.close()


@pytest.mark.parametrize(
    ("hello", "field"),
    [
        ({"labels": {f"k{i}": "v" for i in range(65)}}, "hello.labels"),
        ({"labels": {"k" * 129: "v"}}, "hello.labels"),
        ({"labels": {"zone": "v" * 257}}, "hello.labels['zone']"),
        ({"affinity_keys": [f"k{i}" for i in range(1001)]}, "hello.affinity_keys"),
        ({"affinity_keys": ["ok", "x" * 257]}, "hello.affinity_keys[1]"),
        (
            {"running": [w.JobAttempt(job_id=f"job_{i}", attempt=1) for i in range(1001)]},
            "hello.running",
        ),
        ({"running": [w.JobAttempt(job_id="", attempt=1)]}, "hello.running[0].job_id"),
        ({"running": [w.JobAttempt(job_id="job_x", attempt=0)]}, "hello.running[0].attempt"),
    ],
)
async def test_hello_out_of_bounds_is_refused(
    harness: Harness, hello: dict[str, Any], field: str
) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.send(hello=w.WorkerHello(worker_id="w", services=["svc"], **hello))
    error = await raw.expect("error")
    assert error.fatal and error.code == INVALID_ARGUMENT
    assert field in error.message, error.message
    assert await raw.call.read() is grpc.aio.EOF
    assert scheduler_of(harness).sessions == {}


# --- unexpected failures are answered, the stream stays up -----------------------


async def test_an_unexpected_failure_is_answered_internal_and_the_stream_stays_up(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    api = harness.stubs()
    scheduler = scheduler_of(harness)
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    job = await submit(api, "u")
    await raw.expect("assignment")

    async def broken(*args: Any, **kwargs: Any) -> None:
        raise KeyError("a bug")

    with monkeypatch.context() as patch:
        patch.setattr(scheduler, "progress", broken)
        mid = await raw.send(progress=w.ProgressReport(job_id=job.id, attempt=1, percent=5))
        error = await raw.expect("error")
    assert error.message_id == mid and error.code == INTERNAL and not error.fatal
    assert error.message_kind == "progress" and error.job_id == job.id
    assert "a bug" not in error.message, "internals stay in the server log"
    (record,) = [r for r in caplog.records if "handling progress failed" in r.getMessage()]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    await raw.send(heartbeat=w.WorkerHeartbeat())
    await raw.expect("heartbeat_ack")
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
    await raw.expect("ack")
    assert (await get(api, job.id)).state == c.RUN_STATE_COMPLETED
    await raw.close()


async def test_a_storage_failure_is_answered_unavailable_so_the_worker_resends(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = harness.stubs()
    scheduler = scheduler_of(harness)
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    job = await submit(api, "u")
    await raw.expect("assignment")
    complete = scheduler.complete

    async def connection_lost(*args: Any, **kwargs: Any) -> None:
        raise sa_exc.OperationalError("UPDATE jobs", {}, ConnectionResetError("reset by peer"))

    monkeypatch.setattr(scheduler, "complete", connection_lost)
    mid = await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
    error = await raw.expect("error")
    assert error.message_id == mid and error.code == UNAVAILABLE and not error.fatal
    assert error.reason == "STORAGE_UNAVAILABLE"
    assert (await get(api, job.id)).state == c.RUN_STATE_RUNNING
    monkeypatch.setattr(scheduler, "complete", complete)
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1))  # the resend
    await raw.expect("ack")
    assert (await get(api, job.id)).state == c.RUN_STATE_COMPLETED
    await raw.close()


async def test_a_hello_that_fails_unexpectedly_is_answered(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = harness.stubs()
    scheduler = scheduler_of(harness)

    async def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise sa_exc.OperationalError("UPDATE jobs", {}, ConnectionRefusedError("refused"))

    monkeypatch.setattr(scheduler, "_resume", unreachable)
    raw = RawWorker(api)
    await raw.send(
        hello=w.WorkerHello(
            worker_id="w", services=["svc"], running=[w.JobAttempt(job_id="job_x", attempt=1)]
        )
    )
    error = await raw.expect("error")
    assert error.fatal and error.code == UNAVAILABLE and error.message_kind == "hello"
    assert await raw.call.read() is grpc.aio.EOF
    assert scheduler.sessions == {}


async def test_a_non_finite_result_is_refused_and_the_stream_stays_up(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    job = await submit(api, "nan")
    await raw.expect("assignment")
    for bad in (math.nan, math.inf):
        result = struct_pb2.Struct()
        result.fields["score"].number_value = bad
        mid = await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1, result=result))
        error = await raw.expect("error")
        assert error.message_id == mid and error.code == INVALID_ARGUMENT and not error.fatal
        assert "complete.result" in error.message
    assert (await get(api, job.id)).state == c.RUN_STATE_RUNNING
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
    await raw.expect("ack")
    await raw.close()


# --- trace reports: keyed events are idempotent -------------------------------------


async def test_a_resent_trace_report_stores_each_event_key_once(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    job = await submit(api, "t")
    await raw.expect("assignment")
    report = w.TraceReport(
        job_id=job.id,
        attempt=1,
        events=[
            c.TraceEvent(event_key="k1", message="first"),
            c.TraceEvent(message="unkeyed"),
            c.TraceEvent(event_key="k1", message="same key in one report"),
        ],
    )
    for _ in range(2):  # the resend of a report whose ack was lost
        mid = await raw.send(trace=report)
        assert (await raw.expect("ack")).message_id == mid
    events = (await api.trace.ListTraceEvents(t.ListTraceEventsRequest(run_id=job.id))).events
    keyed = [(e.event_key, e.message) for e in events if e.event_key]
    assert keyed == [("k1", "first")]
    assert [e.message for e in events].count("unkeyed") == 2, "unkeyed events are not deduplicated"
    assert all(e.attempt == 1 and e.worker_id == "w" for e in events if e.event_key)
    await raw.close()


# --- tenants: another tenant's job does not exist for a worker ----------------------


@pytest.fixture
async def tenants(db_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    entries = [
        {"sha256": hash_token(f"{role}-{tenant}"), "subject": f"{role}-{tenant}",
         "tenant": tenant, "roles": [role]}
        for role in ("worker", "submitter")
        for tenant in ("acme", "umbrella")
    ]  # fmt: skip
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": entries}))
    h = Harness(db_url, tokens_file=str(tokens))
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_reports_on_another_tenants_job_are_not_found(tenants: Harness) -> None:
    api = tenants.stubs()
    umbrella = bearer("submitter-umbrella")
    leased = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="l", job=c.JobSpec(service="svc")), metadata=umbrella
        )
    ).job
    owner = RawWorker(api, bearer("worker-umbrella"))
    await owner.hello("u", ["svc"])
    assert (await owner.expect("assignment")).job.id == leased.id
    queued = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="q", job=c.JobSpec(service="nobody")),
            metadata=umbrella,
        )
    ).job
    intruder = RawWorker(api, bearer("worker-acme"))
    await intruder.hello("a", ["svc"])
    reports = {
        "complete": lambda job_id, n: w.ConnectRequest(
            complete=w.CompleteReport(job_id=job_id, attempt=n)
        ),
        "fail": lambda job_id, n: w.ConnectRequest(
            fail=w.FailReport(job_id=job_id, attempt=n, error=c.ErrorDetail(message="x"))
        ),
        "progress": lambda job_id, n: w.ConnectRequest(
            progress=w.ProgressReport(job_id=job_id, attempt=n, percent=1)
        ),
        "trace": lambda job_id, n: w.ConnectRequest(
            trace=w.TraceReport(job_id=job_id, attempt=n, events=[c.TraceEvent(message="x")])
        ),
        "annotate": lambda job_id, n: w.ConnectRequest(
            annotate=w.AnnotationReport(
                job_id=job_id, attempt=n, attributes={"decision.outcome": value("x")}
            )
        ),
    }

    async def answer(kind: str, job_id: str, attempt: int) -> w.StreamError:
        await intruder.send(**{kind: getattr(reports[kind](job_id, attempt), kind)})
        return await intruder.expect("error")

    for kind in reports:
        unknown = await answer(kind, "job_doesnotexist", 1)
        assert unknown.code == NOT_FOUND and unknown.reason == "UNKNOWN_JOB"
        for job in (leased, queued):
            for attempt in (0, 1, 2):
                error = await answer(kind, job.id, attempt)
                assert (error.code, error.reason) == (NOT_FOUND, "UNKNOWN_JOB"), (kind, error)
                assert error.message == unknown.message.replace("job_doesnotexist", job.id)
                assert not error.fatal
    stored = (await api.jobs.GetJob(j.GetJobRequest(job_id=leased.id), metadata=umbrella)).job
    assert stored.state == c.RUN_STATE_RUNNING and stored.progress.percent == 0
    events = (
        await api.trace.ListTraceEvents(
            t.ListTraceEventsRequest(run_id=leased.id), metadata=umbrella
        )
    ).events
    assert [e.type for e in events] == [c.TRACE_EVENT_TYPE_STARTED]
    await owner.close()
    await intruder.close()


# --- worker annotations: durable when acknowledged, visible when the attempt ends ----


async def annotate(raw: RawWorker, job_id: str, attempt: int, **attrs: Any) -> None:
    await raw.send(
        annotate=w.AnnotationReport(
            job_id=job_id, attempt=attempt, attributes={k: value(v) for k, v in attrs.items()}
        )
    )
    await raw.expect("ack")


async def test_annotations_persist_with_the_failure_when_the_lease_expires(fast: Harness) -> None:
    api = fast.stubs()
    silent = RawWorker(api)
    await silent.hello("w", ["svc"])
    job = await submit(
        api, "e", max_attempts=2, backoff=c.BackoffPolicy(initial_interval={"seconds": 60})
    )
    await silent.expect("assignment")
    await annotate(silent, job.id, 1, **{"decision.outcome": "half-way", "failure.retryable": True})
    assert await notes(api, job.id) == []
    # No heartbeats: the lease (1 s) expires although the stream is open.
    waiting = await wait_for(lambda: state_is(api, job.id, c.RUN_STATE_QUEUED), timeout=10)
    assert waiting.failure.code == "LEASE_EXPIRED" and waiting.failure.attempt == 1
    listed = await notes(api, job.id)
    assert [(n.key, n.attempt, n.job_id) for n in listed] == [
        ("decision.outcome", 1, job.id),
        ("failure.retryable", 1, job.id),
    ]
    assert all(n.scope == c.ANNOTATION_SCOPE_ATTEMPT and n.actor.id == "w" for n in listed)


async def test_annotations_persist_when_the_attempt_is_cancelled_or_times_out(
    harness: Harness,
) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=10)
    cancelled = await submit(api, "c")
    timed = await submit(api, "t", timeout={"seconds": 1})
    wf, failing = [
        (
            await api.jobs.SubmitWorkflow(
                j.SubmitWorkflowRequest(
                    request_id=rid,
                    name="w",
                    steps=[
                        c.WorkflowStepSpec(name=first, job=c.JobSpec(service="svc")),
                        c.WorkflowStepSpec(
                            name=second, job=c.JobSpec(service="svc"), independent=True
                        ),
                    ],
                )
            )
        ).workflow
        for rid, first, second in (("wf", "a", "b"), ("wf-fail", "bad", "side"))
    ]
    assigned = {}
    for _ in range(6):
        assignment = await raw.expect("assignment")
        assigned[assignment.job.id] = assignment.attempt
    steps = {s.name: s.job_id for x in (wf, failing) for s in x.steps}
    assert set(assigned) == {cancelled.id, timed.id, *steps.values()}
    for job_id in sorted(assigned, key=lambda i: i != timed.id):  # the timed job first
        await annotate(raw, job_id, 1, **{"decision.outcome": job_id})
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=cancelled.id))
    await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=wf.id))
    await raw.send(
        fail=w.FailReport(
            job_id=steps["bad"], attempt=1, retryable=False, error=c.ErrorDetail(message="no")
        )
    )
    await raw.expect("ack")
    await wait_for(lambda: state_is(api, timed.id, c.RUN_STATE_TIMED_OUT), timeout=10)
    expected = {
        cancelled.id: [cancelled.id],
        timed.id: [timed.id],
        wf.id: [steps["a"], steps["b"]],
        failing.id: [steps["bad"], steps["side"]],
    }
    for run_id, job_ids in expected.items():
        listed = await notes(api, run_id)
        assert sorted((n.job_id, n.attempt) for n in listed) == sorted((i, 1) for i in job_ids)
        assert all(json_format.MessageToDict(n.value) == n.job_id for n in listed)
    await raw.close()


async def test_acknowledged_annotations_survive_a_server_crash(db_url: str) -> None:
    server, port = await start_server(0, db_url)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        api = stubs_for(channel)
        raw = RawWorker(api)
        await raw.hello("w", ["svc"])
        job = await submit(api, "k", backoff=c.BackoffPolicy(initial_interval={"seconds": 60}))
        await raw.expect("assignment")
        await annotate(raw, job.id, 1, **{"decision.outcome": "before the crash"})
        assert await notes(api, job.id) == []
        server.send_signal(signal.SIGKILL)  # before any terminal report
        await server.wait()
        raw.call.cancel()
        await channel.close()
        server, port = await start_server(0, db_url)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        api = stubs_for(channel)
        # The lease held at the crash expires; the attempt's annotations come with it.
        requeued = await wait_for(
            lambda: state_is(api, job.id, c.RUN_STATE_QUEUED), timeout=30, interval=0.1
        )
        assert requeued.failure.code == "LEASE_EXPIRED" and requeued.failure.attempt == 1
        (note,) = await notes(api, job.id)
        assert (note.key, note.attempt, note.job_id) == ("decision.outcome", 1, job.id)
        assert json_format.MessageToDict(note.value) == "before the crash"
    finally:
        await channel.close()
        await terminate(server)


# --- reports of one job, sent back to back, share a group commit ------------------------


async def test_a_jobs_reports_sent_together_share_a_commit_and_apply_in_order(
    harness: Harness,
) -> None:
    """Progress reports and the completion of one job, sent back to back, are all
    queued for the writer without waiting for each other's commit (one group
    commit can take them all), yet they apply and are acknowledged in order."""
    from sqlalchemy.ext.asyncio import AsyncSession

    from jobtrace.store.db import Tx

    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    job = await submit(api, "back-to-back")
    await raw.expect("assignment")
    assert harness.server is not None
    db = harness.server.db
    # Hold the writer in a transaction of its own, so the reports pile up behind it.
    release = asyncio.Event()
    holding = asyncio.Event()

    async def hold(session: AsyncSession, tx: Tx) -> None:
        holding.set()
        await release.wait()

    blocker = asyncio.create_task(db.write(hold))
    try:
        await asyncio.wait_for(holding.wait(), 10)
        ids = []
        for pct in (25.0, 50.0, 75.0):
            progress = w.ProgressReport(job_id=job.id, attempt=1, percent=pct, message=f"{pct}")
            ids.append(await raw.send(progress=progress))
        ids.append(await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1)))
        # All four are queued while the writer is held: none waited for another's commit.
        await wait_for(lambda: db._queue.qsize() >= 4, timeout=10)
        batches = db.batches_committed
    finally:
        release.set()
        await blocker
    acks = [(await raw.expect("ack")).message_id for _ in ids]
    assert acks == ids
    assert db.batches_committed - batches <= 2  # the blocker's, and one for all four
    done = await get(api, job.id)
    assert done.state == c.RUN_STATE_COMPLETED and done.progress.percent == 100.0
    events = await api.trace.ListTraceEvents(t.ListTraceEventsRequest(run_id=job.id, page_size=100))
    kinds = [(c.TraceEventType.Name(e.type), e.percent) for e in events.events]
    progress_events = [p for k, p in kinds if k == "TRACE_EVENT_TYPE_PROGRESS"]
    assert progress_events == [25.0, 50.0, 75.0]
    assert kinds[-1][0] == "TRACE_EVENT_TYPE_COMPLETED"
    await raw.close()
