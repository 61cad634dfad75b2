"""Flow control: named rate limits (token buckets in the database, held
across replicas) and concurrency keys with their strategies, through the
real server on both backends."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import schedule_service_pb2 as s
from jobtrace.pb import schedule_service_pb2_grpc as s_grpc

from .conftest import Harness, Stubs, wait_for
from .workers import RawWorker

CK = c.ConcurrencyKey


def _limits(api: Stubs) -> s_grpc.ScheduleServiceStub:
    return s_grpc.ScheduleServiceStub(api.channel)


async def _create(api: Stubs, key: str, count: int, period_ms: int, burst: int = 0) -> s.RateLimit:
    limit = s.RateLimit(
        key=key,
        count=count,
        period=duration_pb2.Duration(seconds=period_ms // 1000, nanos=(period_ms % 1000) * 10**6),
        burst=burst,
    )
    reply = await _limits(api).CreateRateLimit(s.CreateRateLimitRequest(rate_limit=limit))
    return reply.rate_limit


async def _submit(
    api: Stubs, rid: str, payload: dict[str, Any] | None = None, **spec: Any
) -> c.Job:
    job = c.JobSpec(service=spec.pop("service", "svc"), **spec)
    if payload:
        job.payload.update(payload)
    return (await api.jobs.SubmitJob(j.SubmitJobRequest(request_id=rid, job=job))).job


async def _get(api: Stubs, job_id: str) -> c.Job:
    return (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id))).job


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def _us(ts: Any) -> int:
    return int(ts.seconds * 1_000_000 + ts.nanos // 1000)


def _check_starts(starts: list[int], rate_per_us: float, burst: int) -> None:
    """No window [t_i, t_k] of the starts holds more than burst + rate * span
    (+1 for the token that refilled just as the window closed)."""
    starts = sorted(starts)
    for i in range(len(starts)):
        for k in range(i, len(starts)):
            span = starts[k] - starts[i]
            assert k - i + 1 <= burst + rate_per_us * span + 1e-6, (i, k, span, starts)


async def _run_all(worker: RawWorker, count: int, timeout: float = 20.0) -> list[str]:
    """Complete `count` assignments as they come; their job ids."""
    done = []
    for _ in range(count):
        a = await worker.expect("assignment", timeout=timeout)
        await worker.send(complete=c_complete(a))
        done.append(a.job.id)
    return done


def c_complete(a: Any) -> Any:
    from jobtrace.pb import worker_service_pb2 as w

    return w.CompleteReport(job_id=a.job.id, attempt=a.attempt)


async def test_rate_limit_admin_and_bad_inputs(harness: Harness) -> None:
    api = harness.stubs()
    limits = _limits(api)
    made = await _create(api, "openai", 10, 1000, 20)
    assert (made.key, made.count, made.burst, made.period.seconds) == ("openai", 10, 20, 1)
    assert made.tenant and made.HasField("create_time")
    again = await _refused(_create(api, "openai", 1, 1000))
    assert again.code() == grpc.StatusCode.ALREADY_EXISTS
    bad = await _refused(_create(api, "bad key!", 0, 0))
    assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    for name in ("rate_limit.key", "rate_limit.count", "rate_limit.period"):
        assert name in (bad.details() or "")
    await _create(api, "db", 1, 60_000)  # burst 0 means count
    listed = (await limits.ListRateLimits(s.ListRateLimitsRequest(page_size=1))).rate_limits
    assert [x.key for x in listed] == ["db"]
    got = (await limits.GetRateLimit(s.GetRateLimitRequest(key="db"))).rate_limit
    assert got.burst == 1
    updated = await limits.UpdateRateLimit(
        s.UpdateRateLimitRequest(
            rate_limit=s.RateLimit(key="db", count=5, period=duration_pb2.Duration(seconds=1))
        )
    )
    assert updated.rate_limit.count == 5 and updated.rate_limit.burst == 5

    # Submissions: unknown limit, bad template, resolved keys shown by GetJob.
    unknown = await _refused(_submit(api, "u", rate_limits=[c.RateLimitUse(key="nope")]))
    assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "job.rate_limits[0].key" in (unknown.details() or "")
    missing = await _refused(
        _submit(
            api,
            "m",
            {"x": 1},
            rate_limits=[c.RateLimitUse(key="openai", partition="{user_id}")],
            concurrency=CK(key="user:{user}", max_running=1),
        )
    )
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "job.rate_limits[0].partition" in (missing.details() or "")
    assert "job.concurrency.key" in (missing.details() or "")
    zero = await _refused(_submit(api, "z", concurrency=CK(key="k", max_running=0)))
    assert "job.concurrency.max_running" in (zero.details() or "")
    job = await _submit(
        api,
        "ok",
        {"user_id": "u7", "n": 3},
        rate_limits=[c.RateLimitUse(key="openai", partition="{user_id}"), c.RateLimitUse(key="db")],
        concurrency=CK(key="user:{user_id}:{{n}}", max_running=2),
    )
    shown = await _get(api, job.id)
    assert list(shown.rate_limit_keys) == ["openai/u7", "db"]
    assert shown.concurrency_key == "user:u7:{n}"
    assert shown.spec.rate_limits[0].units == 1
    assert shown.spec.concurrency.strategy == CK.STRATEGY_QUEUE

    await limits.DeleteRateLimit(s.DeleteRateLimitRequest(key="db"))
    gone = await _refused(limits.GetRateLimit(s.GetRateLimitRequest(key="db")))
    assert gone.code() == grpc.StatusCode.NOT_FOUND


async def test_a_rate_limit_holds_its_rate_and_says_why_jobs_wait(harness: Harness) -> None:
    api = harness.stubs()
    await _create(api, "api", 10, 1000, 2)  # 10/s, burst 2
    worker = RawWorker(api)
    await worker.hello("w", ["svc"], max_concurrency=50)
    plain = await _submit(api, "plain")  # no limit: never waits for one
    jobs = [await _submit(api, f"r{i}", rate_limits=[c.RateLimitUse(key="api")]) for i in range(8)]
    last = jobs[-1].id

    async def rate_limited() -> bool:
        got = await _get(api, last)
        return got.waiting_reason == c.WAITING_REASON_RATE_LIMITED

    await wait_for(rate_limited, timeout=5)
    done = await _run_all(worker, 9)
    assert set(done) == {plain.id, *(x.id for x in jobs)}
    starts = [_us((await _get(api, x.id)).first_started_at) for x in jobs]
    _check_starts(starts, 10 / 1e6, 2)
    await worker.close()


async def test_a_rate_limit_holds_across_two_replicas(pg_url: str) -> None:
    async with Harness(pg_url) as one:
        async with Harness(pg_url, signing_key_file=one.settings["signing_key_file"]) as two:
            a, b = one.stubs(), two.stubs()
            await _create(a, "shared", 10, 1000, 3)
            wa, wb = RawWorker(a), RawWorker(b)
            await wa.hello("wa", ["svc"], max_concurrency=50)
            await wb.hello("wb", ["svc"], max_concurrency=50)
            jobs = []
            for i in range(12):
                api = a if i % 2 else b
                jobs.append(await _submit(api, f"x{i}", rate_limits=[c.RateLimitUse(key="shared")]))
            started: list[str] = []
            all_started = asyncio.Event()

            async def drain(worker: RawWorker) -> None:
                while True:  # ended (cancelled) once every job has started
                    got = await worker.expect("assignment", timeout=30)
                    await worker.send(complete=c_complete(got))
                    started.append(got.job.id)
                    if len(started) == len(jobs):
                        all_started.set()

            drains = [asyncio.create_task(drain(wa)), asyncio.create_task(drain(wb))]
            try:
                await asyncio.wait_for(all_started.wait(), 30)
            finally:
                for task in drains:
                    task.cancel()
                await asyncio.gather(*drains, return_exceptions=True)
            assert sorted(started) == sorted(x.id for x in jobs)
            runs = [await _get(a, x.id) for x in jobs]
            _check_starts([_us(r.first_started_at) for r in runs], 10 / 1e6, 3)
            await wa.close()
            await wb.close()


async def test_concurrency_key_queue_waits_per_user(harness: Harness) -> None:
    api = harness.stubs()
    worker = RawWorker(api)
    await worker.hello("w", ["svc"], max_concurrency=4)
    key = CK(key="user:{user_id}", max_running=1)
    a1 = await _submit(api, "a1", {"user_id": "a"}, concurrency=key)
    first = await worker.expect("assignment")
    assert first.job.id == a1.id
    a2 = await _submit(api, "a2", {"user_id": "a"}, concurrency=key)
    b1 = await _submit(api, "b1", {"user_id": "b"}, concurrency=key)
    other = await worker.expect("assignment")
    assert other.job.id == b1.id  # another user's job runs

    async def waits() -> bool:
        got = await _get(api, a2.id)
        return got.waiting_reason == c.WAITING_REASON_CONCURRENCY_LIMIT

    await wait_for(waits, timeout=5)
    assert (await _get(api, a2.id)).state == c.RUN_STATE_QUEUED
    await worker.send(complete=c_complete(first))
    second = await worker.expect("assignment")
    assert second.job.id == a2.id
    ended, started = await _get(api, a1.id), await _get(api, a2.id)
    assert _us(started.started_at) >= _us(ended.completed_at)
    assert started.concurrency_key == "user:a"
    await worker.close()


async def test_concurrency_key_cancel_newest_and_cancel_oldest(harness: Harness) -> None:
    api = harness.stubs()
    worker = RawWorker(api)
    await worker.hello("w", ["svc"], max_concurrency=4)
    newest = CK(key="n:{u}", max_running=1, strategy=CK.STRATEGY_CANCEL_NEWEST)
    n1 = await _submit(api, "n1", {"u": 1}, concurrency=newest)
    got = await worker.expect("assignment")
    assert got.job.id == n1.id
    n2 = await _submit(api, "n2", {"u": 1}, concurrency=newest)

    async def cancelled(job_id: str) -> c.Job | None:
        job = await _get(api, job_id)
        return job if job.state == c.RUN_STATE_CANCELLED else None

    lost = await wait_for(lambda: cancelled(n2.id), timeout=5)
    assert lost.failure.code == "CONCURRENCY_LIMIT"
    assert (await _get(api, n1.id)).state == c.RUN_STATE_RUNNING

    oldest = CK(key="o:{u}", max_running=1, strategy=CK.STRATEGY_CANCEL_OLDEST)
    o1 = await _submit(api, "o1", {"u": 1}, concurrency=oldest)
    first = await worker.expect("assignment")
    assert first.job.id == o1.id
    o2 = await _submit(api, "o2", {"u": 1}, concurrency=oldest)
    notice = await worker.expect("cancel")  # the running one's worker is told
    assert notice.job_id == o1.id
    replaced = await worker.expect("assignment")
    assert replaced.job.id == o2.id
    old = await _get(api, o1.id)
    assert old.state == c.RUN_STATE_CANCELLED and old.failure.code == "CONCURRENCY_LIMIT"
    await worker.close()


async def test_cli_rate_limits_and_submit_flags(harness: Harness, tmp_path: Any) -> None:
    import json

    from .procs import jobtrace

    target = harness.target
    code, out, err = await jobtrace(
        "rate-limits", "create", "openai", "10/s", "--burst", "20", "--json", target=target
    )
    assert code == 0, err
    assert json.loads(out)["burst"] == 20
    code, out, err = await jobtrace("rate-limits", "create", "db", "600/m", target=target)
    assert code == 0 and "db: 600/60s, burst 600" in out, err
    code, out, err = await jobtrace("rate-limits", "--json", target=target)
    assert [x["key"] for x in json.loads(out)["rate_limits"]] == ["db", "openai"]
    code, out, err = await jobtrace("rate-limits", target=target)
    assert "openai" in out and "10/1s" in out
    code, out, err = await jobtrace(
        "submit",
        "svc",
        '{"user_id": "u1"}',
        "--rate-limit",
        "openai@{user_id}:2",
        "--rate-limit",
        "db",
        "--concurrency",
        "user:{user_id}:1:cancel_oldest",
        "--json",
        target=target,
    )
    assert code == 0, err
    job = json.loads(out)
    assert job["rate_limit_keys"] == ["openai/u1", "db"]
    assert job["concurrency_key"] == "user:u1"
    assert job["spec"]["concurrency"]["strategy"] == "STRATEGY_CANCEL_OLDEST"
    code, out, err = await jobtrace("submit", "svc", "{}", "--rate-limit", "nope", target=target)
    assert code != 0 and "job.rate_limits[0].key" in err
    flow_file = tmp_path / "wf.yaml"
    flow_file.write_text(
        "name: limited\n"
        "steps:\n"
        "  - name: a\n"
        "    job:\n"
        "      service: svc\n"
        "      payload: {user_id: u2}\n"
        "      rate_limits: [{key: openai, partition: '{user_id}'}]\n"
        "      concurrency: {key: 'user:{user_id}', max_running: 2, strategy: cancel_newest}\n"
    )
    code, out, err = await jobtrace("submit", "--workflow", str(flow_file), "--json", target=target)
    assert code == 0, err
    step = json.loads(out)["steps"][0]
    code, out, err = await jobtrace("get", step["job_id"], "--json", target=target)
    assert code == 0, err
    got = json.loads(out)
    assert got["rate_limit_keys"] == ["openai/u2"] and got["concurrency_key"] == "user:u2"
    code, out, err = await jobtrace("rate-limits", "delete", "db", target=target)
    assert code == 0 and "db: deleted" in out


async def test_the_flow_migration_goes_down_and_up(db_url: str) -> None:
    """Revision 0026 downgrades (limits, buckets, slots and the jobs' flow
    columns dropped) and upgrades again on a database that used them."""
    from .test_worker_stream import migrate_down

    h = Harness(db_url)
    await h.start()
    try:
        api = h.stubs()
        await _create(api, "mig", 5, 1000)
        worker = RawWorker(api)
        await worker.hello("w", ["svc"], max_concurrency=2)
        job = await _submit(
            api,
            "mig",
            {"u": "x"},
            rate_limits=[c.RateLimitUse(key="mig")],
            concurrency=CK(key="{u}", max_running=1),
        )
        await worker.expect("assignment")  # a bucket and a slot row exist
        await worker.close()
    finally:
        await h.stop()
    await migrate_down(db_url, "0025")
    await h.start()  # migrates up again
    try:
        api = h.stubs()
        assert not (await _limits(api).ListRateLimits(s.ListRateLimitsRequest())).rate_limits
        again = await _get(api, job.id)
        assert not again.rate_limit_keys and not again.concurrency_key
    finally:
        await h.stop()


async def test_a_partitioned_limit_has_a_bucket_per_payload_value(harness: Harness) -> None:
    api = harness.stubs()
    await _create(api, "per-user", 1, 3_600_000, 1)  # one an hour per user
    worker = RawWorker(api)
    await worker.hello("w", ["svc"], max_concurrency=4)
    use = [c.RateLimitUse(key="per-user", partition="{user_id}")]
    a1 = await _submit(api, "a1", {"user_id": "a"}, rate_limits=use)
    assert (await worker.expect("assignment")).job.id == a1.id
    a2 = await _submit(api, "a2", {"user_id": "a"}, rate_limits=use)
    b1 = await _submit(api, "b1", {"user_id": "b"}, rate_limits=use)
    assert (await worker.expect("assignment")).job.id == b1.id  # its own bucket

    async def limited() -> bool:
        got = await _get(api, a2.id)
        return got.waiting_reason == c.WAITING_REASON_RATE_LIMITED

    await wait_for(limited, timeout=5)
    assert (await _get(api, a2.id)).state == c.RUN_STATE_QUEUED
    # Deleting the limit lifts it: the waiting job starts (dispatchers look
    # at an empty bucket again within a second).
    await _limits(api).DeleteRateLimit(s.DeleteRateLimitRequest(key="per-user"))
    assert (await worker.expect("assignment", timeout=10)).job.id == a2.id
    await worker.close()
