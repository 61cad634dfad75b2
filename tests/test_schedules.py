"""Schedules: exactly once per tick across replicas and restarts, catch-up,
overlap policies, time zones and DST, the lifecycle RPCs and bad inputs.
Time is a ManualClock the tests move; the scanners' loops are off and each
pass is run by the test (scan_once), so nothing waits on the wall clock."""

from __future__ import annotations

import asyncio
import datetime as dt
import tempfile
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobtrace.clock import Clock, ManualClock
from jobtrace.config import Settings
from jobtrace.domain.schedules import Schedules, next_tick
from jobtrace.pb import (
    attestation_service_pb2,
    attestation_service_pb2_grpc,
    common_pb2,
    duration_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)
from jobtrace.pb import schedule_service_pb2 as spb
from jobtrace.pb import schedule_service_pb2_grpc as spb_grpc
from jobtrace.server import JobtraceServer
from tests.conftest import expect_error, wait_for


def at(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp() * 1_000_000)


class Replica:
    def __init__(self, db_url: str, clock: Clock, key: str) -> None:
        self.db_url, self.clock, self.key = db_url, clock, key
        self.server: JobtraceServer | None = None
        self.channel: grpc.aio.Channel | None = None

    async def start(self, scan_seconds: float = 0) -> Replica:
        settings = Settings(
            listen="127.0.0.1:0",
            db=self.db_url,
            signing_key_file=self.key,
            schedule_scan_seconds=scan_seconds,
        )
        self.server = JobtraceServer(settings, clock=self.clock)
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.schedules = spb_grpc.ScheduleServiceStub(self.channel)
        self.jobs = job_service_pb2_grpc.JobServiceStub(self.channel)
        self.attest = attestation_service_pb2_grpc.AttestationServiceStub(self.channel)
        return self

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.server is not None:
            await self.server.stop(0.5)
        self.server = None

    async def scan(self) -> int:
        assert self.server is not None
        return await self.server.schedules.scan_once()


def job_template(service: str = "nightly") -> job_service_pb2.SubmitJobRequest:
    return job_service_pb2.SubmitJobRequest(job=common_pb2.JobSpec(service=service))


def schedule(sid: str, **fields: Any) -> spb.Schedule:
    s = spb.Schedule(id=sid, job=job_template(), **fields)
    return s


def minutes(n: float) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=int(n * 60))


async def runs(r: Replica, service: str = "nightly") -> list[Any]:
    page = await r.jobs.ListJobs(job_service_pb2.ListJobsRequest(service=service, page_size=1000))
    return list(page.jobs)


@pytest.fixture
def key() -> str:
    return str(Path(tempfile.mkdtemp(prefix="jt-key-")) / "signing.key")


async def test_cron_ticks_once_across_two_scanners_and_a_restart(db_url: str, key: str) -> None:
    clock = ManualClock(at("2026-01-01T00:00:01+00:00"))
    a = await Replica(db_url, clock, key).start()
    b: Replica | None = None
    try:
        # The other replica's clock runs 20 s ahead (a clock skew).
        skewed = Skewed(clock, 20_000_000)
        if db_url.startswith("postgresql"):
            b = await Replica(db_url, skewed, key).start()
            assert b.server is not None
            other: Schedules = b.server.schedules
        else:
            other = second_scanner(a, skewed)
        created = await a.schedules.CreateSchedule(
            spb.CreateScheduleRequest(
                schedule=schedule(
                    "five", cron="*/5 * * * *", overlap_policy=spb.OVERLAP_POLICY_ALLOW_ALL
                )
            )
        )
        assert created.schedule.next_run_time.ToJsonString() == "2026-01-01T00:05:00Z"
        assert created.schedule.owner
        for minute in (5, 10):
            clock.set(at(f"2026-01-01T00:{minute:02d}:00+00:00"))
            # Both scanners at once, each twice: a doubled pass changes nothing.
            await asyncio.gather(a.scan(), other.scan_once(), a.scan(), other.scan_once())
        assert len(await runs(a)) == 2
        # A restart in between: the next tick is stored, so it resumes.
        await a.stop()
        a = await Replica(db_url, clock, key).start()
        if b is None:
            other = second_scanner(a, skewed)
        clock.set(at("2026-01-01T00:15:00+00:00"))
        await asyncio.gather(a.scan(), other.scan_once())
        jobs = await runs(a)
        assert sorted(j.request_id for j in jobs) == [
            f"schedule:five:{at(f'2026-01-01T00:{m:02d}:00+00:00')}" for m in (5, 10, 15)
        ]
        assert {j.submitted_by for j in jobs} == {created.schedule.owner}
        # The run says where it came from.
        notes = await a.attest.ListAnnotations(
            attestation_service_pb2.ListAnnotationsRequest(run_id=jobs[0].id, key_prefix="trigger.")
        )
        attrs = {n.key: n.value.string_value for n in notes.annotations}
        assert attrs["trigger.source"] == "schedule"
        assert attrs["trigger.schedule_id"] == "five"
        assert attrs["trigger.scheduled_time"].startswith("2026-01-01T00:")
        got = (await a.schedules.GetSchedule(spb.GetScheduleRequest(schedule_id="five"))).schedule
        assert got.last_run_time.ToJsonString() == "2026-01-01T00:15:00Z"
        assert got.next_run_time.ToJsonString() == "2026-01-01T00:20:00Z"
        assert got.last_run_state == common_pb2.RUN_STATE_QUEUED
        listed = await a.schedules.ListSchedules(spb.ListSchedulesRequest())
        assert [s.id for s in listed.schedules] == ["five"]
        assert listed.schedules[0].last_run_id == got.last_run_id
    finally:
        await a.stop()
        if b is not None:
            await b.stop()


async def test_every_replica_scans_on_its_own(db_url: str, key: str) -> None:
    """The scanners' own loops (every 20 ms here) fire the ticks: with two
    replicas on PostgreSQL (one on SQLite), each tick once."""
    clock = ManualClock(at("2026-01-01T00:00:00+00:00"))
    replicas = [await Replica(db_url, clock, key).start(scan_seconds=0.02)]
    try:
        if db_url.startswith("postgresql"):
            replicas.append(await Replica(db_url, clock, key).start(scan_seconds=0.02))
        r = replicas[0]
        await r.schedules.CreateSchedule(
            spb.CreateScheduleRequest(
                schedule=schedule(
                    "loop", interval=minutes(1), overlap_policy=spb.OVERLAP_POLICY_ALLOW_ALL
                )
            )
        )
        for n in (1, 2, 3):
            clock.advance(60)
            await wait_for(lambda n=n: _count(r, n), timeout=10)
        # A few more passes of every loop at this time change nothing.
        for replica in replicas:
            await replica.scan()
        jobs = await runs(r)
        assert sorted(j.request_id for j in jobs) == [
            f"schedule:loop:{at('2026-01-01T00:00:00+00:00') + m * 60_000_000}" for m in (1, 2, 3)
        ]
    finally:
        for replica in replicas:
            await replica.stop()


async def _count(r: Replica, n: int) -> bool:
    return len(await runs(r)) >= n


def second_scanner(r: Replica, clock: Clock) -> Schedules:
    """SQLite: a second scanner in the same process, on the same database."""
    from jobtrace.api.schedule_service import build

    assert r.server is not None
    s = r.server
    return Schedules(s.db, s.schedules._tokens, s.jobs, build, clock=clock)


class Skewed(Clock):
    def __init__(self, base: Clock, offset_us: int) -> None:
        self.base, self.offset_us = base, offset_us

    def now_us(self) -> int:
        return self.base.now_us() + self.offset_us


async def test_catch_up_policies_after_downtime(db_url: str, key: str) -> None:
    clock = ManualClock(at("2026-01-01T00:00:01+00:00"))
    r = await Replica(db_url, clock, key).start()
    try:
        policies = {
            "none": (spb.CATCH_UP_POLICY_NONE, None),
            "last": (spb.CATCH_UP_POLICY_LAST, None),
            "all": (spb.CATCH_UP_POLICY_ALL, minutes(12)),
        }
        for name, (policy, window) in policies.items():
            s = spb.Schedule(
                id=name,
                cron="*/5 * * * *",
                catch_up_policy=policy,
                overlap_policy=spb.OVERLAP_POLICY_ALLOW_ALL,
                job=job_template(name),
            )
            if window is not None:
                s.catch_up_window.CopyFrom(window)
            await r.schedules.CreateSchedule(spb.CreateScheduleRequest(schedule=s))
        # Down from 00:00:01 to 00:31:30: ticks 00:05 ... 00:30 were missed.
        await r.stop()
        r = await Replica(db_url, clock, key).start()
        clock.set(at("2026-01-01T00:31:30+00:00"))
        await r.scan()
        assert await runs(r, "none") == []
        assert [j.request_id for j in await runs(r, "last")] == [
            f"schedule:last:{at('2026-01-01T00:30:00+00:00')}"
        ]
        assert sorted(j.request_id for j in await runs(r, "all")) == [
            f"schedule:all:{at(f'2026-01-01T00:{m}:00+00:00')}" for m in (20, 25, 30)
        ]
        for name, skipped in (("none", 6), ("last", 5), ("all", 3)):
            got = await r.schedules.GetSchedule(spb.GetScheduleRequest(schedule_id=name))
            assert got.schedule.skipped_ticks == skipped, name
            assert got.schedule.next_run_time.ToJsonString() == "2026-01-01T00:35:00Z"
        # Back on time: every policy runs the next tick.
        clock.set(at("2026-01-01T00:35:00+00:00"))
        await r.scan()
        assert len(await runs(r, "none")) == 1
    finally:
        await r.stop()


async def test_overlap_policies(db_url: str, key: str) -> None:
    clock = ManualClock(at("2026-01-01T00:00:00+00:00"))
    r = await Replica(db_url, clock, key).start()
    try:
        for name, policy in (
            ("skip", spb.OVERLAP_POLICY_SKIP),
            ("buffer", spb.OVERLAP_POLICY_BUFFER_ONE),
            ("allow", spb.OVERLAP_POLICY_ALLOW_ALL),
            ("cancel", spb.OVERLAP_POLICY_CANCEL_OTHER),
        ):
            await r.schedules.CreateSchedule(
                spb.CreateScheduleRequest(
                    schedule=spb.Schedule(
                        id=name,
                        interval=minutes(1),
                        overlap_policy=policy,
                        job=job_template(name),
                    )
                )
            )
        # No worker serves these: each run stays QUEUED (not ended).
        clock.advance(60)
        await r.scan()
        first = {n: await runs(r, n) for n in ("skip", "buffer", "allow", "cancel")}
        assert all(len(v) == 1 for v in first.values())
        clock.advance(60)
        await r.scan()
        assert len(await runs(r, "skip")) == 1
        skip = await r.schedules.GetSchedule(spb.GetScheduleRequest(schedule_id="skip"))
        assert skip.schedule.skipped_ticks == 1
        assert len(await runs(r, "allow")) == 2
        cancel = await runs(r, "cancel")
        assert len(cancel) == 2
        assert {j.id: j.state for j in cancel}[first["cancel"][0].id] == (
            common_pb2.RUN_STATE_CANCELLED
        )
        buffered = await r.schedules.GetSchedule(spb.GetScheduleRequest(schedule_id="buffer"))
        assert buffered.schedule.buffered_run_time.ToJsonString() == "2026-01-01T00:02:00Z"
        assert len(await runs(r, "buffer")) == 1
        # A third tick while one waits: skipped (at most one waits).
        clock.advance(60)
        await r.scan()
        assert len(await runs(r, "buffer")) == 1
        # The previous run ends: the buffered tick starts.
        await r.jobs.CancelJob(job_service_pb2.CancelJobRequest(job_id=first["buffer"][0].id))
        await r.scan()
        started = await runs(r, "buffer")
        assert len(started) == 2
        assert f"schedule:buffer:{at('2026-01-01T00:02:00+00:00')}" in {
            j.request_id for j in started
        }
        got = await r.schedules.GetSchedule(spb.GetScheduleRequest(schedule_id="buffer"))
        assert not got.schedule.HasField("buffered_run_time")
        assert got.schedule.skipped_ticks == 1
    finally:
        await r.stop()


def test_dst_days_in_berlin() -> None:
    row = {"cron": "30 2 * * *", "time_zone": "Europe/Berlin", "interval_us": 0, "anchor_us": 0}
    # Spring forward (2026-03-29, 02:00 -> 03:00): 02:30 does not exist; it
    # runs at the first instant after the gap, 03:00 CEST (01:00 UTC).
    spring = next_tick(row, at("2026-03-28T12:00:00+00:00"))
    assert spring == at("2026-03-29T01:00:00+00:00")
    assert next_tick(row, spring) == at("2026-03-30T00:30:00+00:00")
    # Fall back (2026-10-25, 03:00 -> 02:00): 02:30 happens twice; it runs
    # once, at the first (02:30 CEST = 00:30 UTC).
    fall = next_tick(row, at("2026-10-24T12:00:00+00:00"))
    assert fall == at("2026-10-25T00:30:00+00:00")
    assert next_tick(row, fall) == at("2026-10-26T01:30:00+00:00")
    # Also from inside the repeated hour.
    assert next_tick(row, at("2026-10-25T01:10:00+00:00")) == at("2026-10-26T01:30:00+00:00")
    ny = {**row, "time_zone": "America/New_York"}
    assert next_tick(ny, at("2026-03-08T00:00:00+00:00")) == at("2026-03-08T07:00:00+00:00")


async def test_dst_day_through_the_server(sqlite_url: str, key: str) -> None:
    clock = ManualClock(at("2026-03-28T12:00:00+00:00"))
    r = await Replica(sqlite_url, clock, key).start()
    try:
        created = await r.schedules.CreateSchedule(
            spb.CreateScheduleRequest(
                schedule=schedule("berlin", cron="30 2 * * *", time_zone="Europe/Berlin")
            )
        )
        assert created.schedule.next_run_time.ToJsonString() == "2026-03-29T01:00:00Z"
        clock.set(at("2026-03-29T01:00:00+00:00"))
        await r.scan()
        assert [j.request_id for j in await runs(r)] == [
            f"schedule:berlin:{at('2026-03-29T01:00:00+00:00')}"
        ]
    finally:
        await r.stop()


async def test_lifecycle_rpcs(db_url: str, key: str) -> None:
    clock = ManualClock(at("2026-01-01T00:00:00+00:00"))
    r = await Replica(db_url, clock, key).start()
    try:
        s = schedule("life", interval=minutes(10), jitter=duration_pb2.Duration(seconds=30))
        first = await r.schedules.CreateSchedule(spb.CreateScheduleRequest(schedule=s))
        assert not first.deduplicated
        again = await r.schedules.CreateSchedule(spb.CreateScheduleRequest(schedule=s))
        assert again.deduplicated and again.schedule.created_at == first.schedule.created_at
        changed = spb.Schedule()
        changed.CopyFrom(s)
        changed.description = "other"
        await expect_error(
            r.schedules.CreateSchedule(spb.CreateScheduleRequest(schedule=changed)),
            grpc.StatusCode.ALREADY_EXISTS,
        )
        # Pause: no tick fires, however late.
        paused = await r.schedules.PauseSchedule(spb.PauseScheduleRequest(schedule_id="life"))
        assert paused.schedule.paused and not paused.schedule.HasField("next_run_time")
        clock.advance(3600)
        await r.scan()
        assert await runs(r) == []
        # Trigger runs now, even paused; idempotent by request_id.
        t1 = await r.schedules.TriggerSchedule(
            spb.TriggerScheduleRequest(schedule_id="life", request_id="once")
        )
        t2 = await r.schedules.TriggerSchedule(
            spb.TriggerScheduleRequest(schedule_id="life", request_id="once")
        )
        assert t1.run_id == t2.run_id and t2.deduplicated and not t1.deduplicated
        assert len(await runs(r)) == 1
        # Resume from now: the paused hour is not caught up.
        resumed = await r.schedules.ResumeSchedule(spb.ResumeScheduleRequest(schedule_id="life"))
        assert not resumed.schedule.paused
        assert resumed.schedule.next_run_time.ToJsonString() == "2026-01-01T01:10:00Z"
        # Update: a new template and interval; the next tick is computed anew.
        # (ALLOW_ALL: the triggered run, still QUEUED, would make SKIP skip it.)
        upd = spb.Schedule(
            id="life",
            interval=minutes(1),
            overlap_policy=spb.OVERLAP_POLICY_ALLOW_ALL,
            job=job_template("other"),
        )
        updated = await r.schedules.UpdateSchedule(spb.UpdateScheduleRequest(schedule=upd))
        assert updated.schedule.next_run_time.ToJsonString() == "2026-01-01T01:01:00Z"
        clock.advance(60)
        await r.scan()
        assert len(await runs(r, "other")) == 1
        await r.schedules.DeleteSchedule(spb.DeleteScheduleRequest(schedule_id="life"))
        await expect_error(
            r.schedules.GetSchedule(spb.GetScheduleRequest(schedule_id="life")),
            grpc.StatusCode.NOT_FOUND,
        )
        clock.advance(600)
        await r.scan()
        assert len(await runs(r, "other")) == 1
        await expect_error(
            r.schedules.DeleteSchedule(spb.DeleteScheduleRequest(schedule_id="life")),
            grpc.StatusCode.NOT_FOUND,
        )
    finally:
        await r.stop()


BAD: list[tuple[dict[str, Any], str]] = [
    ({"cron": "61 * * * *"}, "schedule.cron"),
    ({"cron": "* * *"}, "schedule.cron"),
    ({"cron": "0 2 * * *", "time_zone": "Mars/Olympus"}, "schedule.time_zone"),
    ({"cron": "0 2 * * *", "interval": duration_pb2.Duration(seconds=60)}, "schedule.interval"),
    ({}, "schedule.cron"),
    ({"interval": duration_pb2.Duration(nanos=500_000_000)}, "schedule.interval"),
    ({"interval": duration_pb2.Duration(seconds=400 * 86400)}, "schedule.interval"),
    (
        {
            "interval": duration_pb2.Duration(seconds=60),
            "jitter": duration_pb2.Duration(seconds=60),
        },
        "schedule.jitter",
    ),
    (
        {"cron": "0 2 * * *", "catch_up_policy": spb.CATCH_UP_POLICY_ALL},
        "schedule.catch_up_window",
    ),
    ({"cron": "0 2 * * *", "overlap_policy": 9}, "schedule.overlap_policy"),
    ({"interval": duration_pb2.Duration(seconds=60), "time_zone": "UTC"}, "schedule.time_zone"),
]


async def test_bad_inputs_store_nothing(sqlite_url: str, key: str) -> None:
    clock = ManualClock(at("2026-01-01T00:00:00+00:00"))
    r = await Replica(sqlite_url, clock, key).start()
    try:
        for fields, field in BAD:
            s = spb.Schedule(id="bad", job=job_template(), **fields)
            _, _, violations = await expect_error(
                r.schedules.CreateSchedule(spb.CreateScheduleRequest(schedule=s)),
                grpc.StatusCode.INVALID_ARGUMENT,
            )
            assert field in {f for f, _ in violations}, (fields, violations)
        # The template is checked as a tick would submit it.
        s = spb.Schedule(id="bad", cron="0 2 * * *", job=job_template(""))
        _, _, violations = await expect_error(
            r.schedules.CreateSchedule(spb.CreateScheduleRequest(schedule=s)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert any(f.startswith("schedule.job.") for f, _ in violations), violations
        s = spb.Schedule(id="bad", cron="0 2 * * *")
        await expect_error(
            r.schedules.CreateSchedule(spb.CreateScheduleRequest(schedule=s)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        s = spb.Schedule(id="bad", cron="0 2 * * *", job=job_template())
        s.job.request_id = "mine"
        await expect_error(
            r.schedules.CreateSchedule(spb.CreateScheduleRequest(schedule=s)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        s = spb.Schedule(id="no spaces", cron="0 2 * * *", job=job_template())
        await expect_error(
            r.schedules.CreateSchedule(spb.CreateScheduleRequest(schedule=s)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        await expect_error(
            r.schedules.GetSchedule(spb.GetScheduleRequest(schedule_id="bad")),
            grpc.StatusCode.NOT_FOUND,
        )
        listed = await r.schedules.ListSchedules(spb.ListSchedulesRequest())
        assert list(listed.schedules) == []
        # Pages, by id.
        for sid in ("p3", "p1", "p2"):
            await r.schedules.CreateSchedule(
                spb.CreateScheduleRequest(schedule=schedule(sid, cron="0 2 * * *"))
            )
        page = await r.schedules.ListSchedules(spb.ListSchedulesRequest(page_size=2))
        assert [x.id for x in page.schedules] == ["p1", "p2"] and page.next_page_token
        page = await r.schedules.ListSchedules(
            spb.ListSchedulesRequest(page_size=2, page_token=page.next_page_token)
        )
        assert [x.id for x in page.schedules] == ["p3"] and not page.next_page_token
        await expect_error(
            r.schedules.ListSchedules(spb.ListSchedulesRequest(page_size=5000)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        await expect_error(
            r.schedules.ListSchedules(spb.ListSchedulesRequest(page_token="forged")),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    finally:
        await r.stop()


async def test_typed_clients(sqlite_url: str, key: str) -> None:
    from jobtrace.client import Client, SyncClient

    clock = ManualClock(at("2026-01-01T00:00:00+00:00"))
    r = await Replica(sqlite_url, clock, key).start()
    assert r.server is not None
    target = f"127.0.0.1:{r.server.port}"
    try:
        async with Client(target) as client:
            made = await client.create_schedule(schedule("typed", cron="0 3 * * *"))
            assert made.next_run_time.ToJsonString() == "2026-01-01T03:00:00Z"
            assert (await client.get_schedule("typed")).id == "typed"
            assert [x.id async for x in client.iter_schedules()] == ["typed"]
            assert (await client.pause_schedule("typed")).paused
            assert not (await client.resume_schedule("typed")).paused
            upd = schedule("typed", cron="0 4 * * *")
            assert (await client.update_schedule(upd)).cron == "0 4 * * *"
            fired = await client.trigger_schedule("typed", request_id="t1")
            assert fired.run_id.startswith("job_")

        def blocking() -> None:
            with SyncClient(target) as sync:
                assert sync.list_schedules().items[0].id == "typed"
                again = sync.trigger_schedule("typed", request_id="t1")
                assert again.deduplicated and again.run_id == fired.run_id
                sync.delete_schedule("typed")
                assert sync.list_schedules().items == []

        await asyncio.to_thread(blocking)
    finally:
        await r.stop()


async def test_migration_0024_downgrades_and_upgrades(db_url: str, key: str) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect
    from sqlalchemy.ext.asyncio import create_async_engine

    from jobtrace.store.db import MIGRATIONS

    r = await Replica(db_url, ManualClock(), key).start()  # migrated to head
    await r.stop()
    engine = create_async_engine(db_url)

    def migrate(connection: Any, target: str, down: bool) -> list[str]:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, target)
        return list(inspect(connection).get_table_names())

    try:
        async with engine.begin() as conn:
            assert "schedules" not in await conn.run_sync(migrate, "0024", True)
        async with engine.begin() as conn:
            assert "schedules" in await conn.run_sync(migrate, "0025", False)
            indexes = await conn.run_sync(
                lambda sync: [i["name"] for i in inspect(sync).get_indexes("schedules")]
            )
            assert "ix_schedules_due" in indexes
    finally:
        await engine.dispose()


async def test_cli_schedules(sqlite_url: str, key: str, tmp_path: Path) -> None:
    import json

    from .procs import jobtrace

    clock = ManualClock(at("2026-01-01T00:00:00+00:00"))
    r = await Replica(sqlite_url, clock, key).start()
    assert r.server is not None
    target = f"127.0.0.1:{r.server.port}"
    try:
        spec = tmp_path / "nightly.yaml"
        spec.write_text(
            "id: nightly\ncron: '30 2 * * *'\ntime_zone: Europe/Berlin\n"
            "overlap_policy: OVERLAP_POLICY_ALLOW_ALL\njob: {job: {service: report}}\n"
        )
        code, out, err = await jobtrace("schedules", "create", str(spec), "--json", target=target)
        assert code == 0, err
        made = json.loads(out)
        assert made["id"] == "nightly" and made["next_run_time"] == "2026-01-01T01:30:00Z"
        code, out, err = await jobtrace("schedules", "list", target=target)
        assert code == 0 and "nightly" in out and "30 2 * * * (Europe/Berlin)" in out, err
        code, out, _ = await jobtrace("schedules", "pause", "nightly", "--json", target=target)
        assert json.loads(out)["paused"] is True
        code, out, _ = await jobtrace("schedules", "resume", "nightly", target=target)
        assert code == 0 and "active" in out
        code, out, err = await jobtrace("schedules", "trigger", "nightly", target=target)
        assert code == 0 and out.strip().startswith("job_"), err
        run_id = out.strip()
        code, out, _ = await jobtrace("schedules", "get", "nightly", "--json", target=target)
        assert json.loads(out)["last_run_id"] == run_id
        code, out, _ = await jobtrace("schedules", "delete", "nightly", target=target)
        assert code == 0
        code, _, err = await jobtrace("schedules", "get", "nightly", target=target)
        assert code != 0 and "not found" in err
        bad = tmp_path / "bad.yaml"
        bad.write_text("id: bad\ncron: 'not cron'\njob: {job: {service: report}}\n")
        code, _, err = await jobtrace("schedules", "create", str(bad), target=target)
        assert code != 0 and "schedule.cron" in err
    finally:
        await r.stop()


async def test_jitter_delays_each_tick_the_same_on_every_replica(sqlite_url: str, key: str) -> None:
    from jobtrace.domain.schedules import jitter_of

    start = at("2026-01-01T00:00:00+00:00")
    clock = ManualClock(start)
    r = await Replica(sqlite_url, clock, key).start()
    try:
        await r.schedules.CreateSchedule(
            spb.CreateScheduleRequest(
                schedule=schedule(
                    "jit",
                    interval=minutes(10),
                    jitter=minutes(5),
                    overlap_policy=spb.OVERLAP_POLICY_ALLOW_ALL,
                )
            )
        )
        row = {"tenant": "default", "id": "jit", "jitter_us": 300_000_000}
        for k in (1, 2, 3):
            tick = start + k * 600_000_000
            delay = jitter_of(row, tick)
            assert 0 <= delay < 300_000_000
            if delay:
                clock.set(tick + delay - 1)
                await r.scan()
                assert len(await runs(r)) == k - 1
            clock.set(tick + delay)
            await r.scan()
            jobs = await runs(r)
            assert len(jobs) == k
            assert f"schedule:jit:{tick}" in {j.request_id for j in jobs}
        assert len({jitter_of(row, start + k * 600_000_000) for k in range(1, 20)}) > 1
    finally:
        await r.stop()


async def test_a_workflow_template_and_cancel_other(db_url: str, key: str) -> None:
    clock = ManualClock(at("2026-01-01T00:00:00+00:00"))
    r = await Replica(db_url, clock, key).start()
    try:
        template = job_service_pb2.SubmitWorkflowRequest(
            name="nightly-report",
            steps=[
                common_pb2.WorkflowStepSpec(name="a", job=common_pb2.JobSpec(service="wf-a")),
                common_pb2.WorkflowStepSpec(name="b", job=common_pb2.JobSpec(service="wf-b")),
            ],
            labels={"team": "reports"},
        )
        made = await r.schedules.CreateSchedule(
            spb.CreateScheduleRequest(
                schedule=spb.Schedule(
                    id="wf",
                    cron="0 * * * *",
                    overlap_policy=spb.OVERLAP_POLICY_CANCEL_OTHER,
                    workflow=template,
                )
            )
        )
        assert made.schedule.workflow.name == "nightly-report"
        clock.set(at("2026-01-01T01:00:00+00:00"))
        await r.scan()
        clock.set(at("2026-01-01T02:00:00+00:00"))
        await r.scan()
        listed = await r.jobs.ListWorkflows(job_service_pb2.ListWorkflowsRequest())
        by_request = {w.request_id: w for w in listed.workflows}
        first = by_request[f"schedule:wf:{at('2026-01-01T01:00:00+00:00')}"]
        second = by_request[f"schedule:wf:{at('2026-01-01T02:00:00+00:00')}"]
        assert first.state == common_pb2.RUN_STATE_CANCELLED
        assert second.state == common_pb2.RUN_STATE_QUEUED
        got = await r.schedules.GetSchedule(spb.GetScheduleRequest(schedule_id="wf"))
        assert got.schedule.last_run_id == second.id
        assert got.schedule.last_run_state == common_pb2.RUN_STATE_QUEUED
        notes = await r.attest.ListAnnotations(
            attestation_service_pb2.ListAnnotationsRequest(run_id=second.id, key_prefix="trigger.")
        )
        assert {n.key: n.value.string_value for n in notes.annotations}["trigger.source"] == (
            "schedule"
        )
    finally:
        await r.stop()


async def test_a_replica_dying_between_submit_and_advance_loses_no_tick(
    db_url: str, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run was submitted but the next tick not advanced (the replica died):
    its claim expires and the next pass submits the same tick again, which
    finds the run already there; the tick runs once."""
    from jobtrace.store import schedules as store

    clock = ManualClock(at("2026-01-01T00:00:00+00:00"))
    r = await Replica(db_url, clock, key).start()
    try:
        await r.schedules.CreateSchedule(
            spb.CreateScheduleRequest(schedule=schedule("crash", interval=minutes(1)))
        )
        real = store.change

        async def dies(*args: Any, **kwargs: Any) -> bool:
            if kwargs.get("next_tick_us") is not None:
                raise ConnectionError("replica died before the advance")
            return await real(*args, **kwargs)

        monkeypatch.setattr(store, "change", dies)
        clock.advance(60)
        await r.scan()
        assert len(await runs(r)) == 1
        monkeypatch.setattr(store, "change", real)
        # Still claimed: another pass before the claim expires does nothing.
        await r.scan()
        got = await r.schedules.GetSchedule(spb.GetScheduleRequest(schedule_id="crash"))
        assert got.schedule.next_run_time.ToJsonString() == "2026-01-01T00:01:00Z"
        # The claim expires (30 s): the tick is redone, found, and advanced.
        clock.advance(31)
        await r.scan()
        jobs = await runs(r)
        assert [j.request_id for j in jobs] == [f"schedule:crash:{at('2026-01-01T00:01:00+00:00')}"]
        got = await r.schedules.GetSchedule(spb.GetScheduleRequest(schedule_id="crash"))
        assert got.schedule.next_run_time.ToJsonString() == "2026-01-01T00:02:00Z"
        assert got.schedule.last_run_id == jobs[0].id
    finally:
        await r.stop()
