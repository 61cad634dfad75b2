"""The fleet view: ListWorkers and WatchWorkers through the real server, on both
backends; tenancy; and the registry shared by replicas on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, expect_error, wait_for
from .workers import RawWorker

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
async def fleet(db_url: str) -> AsyncIterator[Harness]:
    """Short heartbeats (the registry is written once per interval); leases
    long enough that a worker sending none keeps its session for the test."""
    async with Harness(db_url, lease_seconds=30.0, heartbeat_seconds=0.2) as h:
        yield h


@contextlib.asynccontextmanager
async def beating(*raws: RawWorker, every: float = 0.2) -> AsyncIterator[None]:
    """Heartbeats from these workers (holding nothing) while in the block."""

    async def beat() -> None:
        while True:
            for raw in raws:
                await raw.send(heartbeat=w.WorkerHeartbeat())
            await asyncio.sleep(every)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def workers(api: Stubs, **filters: Any) -> list[w.ConnectedWorker]:
    response = await api.workers.ListWorkers(w.ListWorkersRequest(filter=w.WorkerFilter(**filters)))
    return list(response.workers)


async def one(api: Stubs, worker_id: str, **filters: Any) -> w.ConnectedWorker | None:
    found = [x for x in await workers(api, **filters) if x.worker_id == worker_id]
    return found[0] if found else None


async def submit(api: Stubs, rid: str, service: str = "svc") -> c.Job:
    request = j.SubmitJobRequest(request_id=rid, job=c.JobSpec(service=service))
    return (await api.jobs.SubmitJob(request)).job


def running(*pairs: tuple[str, int]) -> list[w.JobAttempt]:
    return [w.JobAttempt(job_id=job_id, attempt=attempt) for job_id, attempt in pairs]


async def test_a_connected_worker_is_listed_with_what_it_holds_and_did(fleet: Harness) -> None:
    api = fleet.stubs()
    assert await workers(api) == []
    raw = RawWorker(api)
    welcome = await raw.hello(
        "w1",
        ["svc", "other"],
        max_concurrency=2,
        labels={"gpu": "a100", "zone": "eu"},
        affinity_keys=["model-a"],
        version="1.2.3",
    )
    listed = await wait_for(lambda: one(api, "w1"))
    assert listed.session_id == welcome.session_id
    assert listed.replica.endswith(fleet.server.db.replica_id)  # type: ignore[union-attr]
    assert sorted(listed.services) == ["other", "svc"]
    assert dict(listed.labels) == {"gpu": "a100", "zone": "eu"}
    assert list(listed.affinity_keys) == ["model-a"]
    assert listed.version == "1.2.3"
    assert listed.max_concurrency == 2 and listed.free_slots == 2
    assert not listed.draining and not listed.held_jobs
    assert listed.connected_at.seconds and listed.last_heartbeat.seconds
    assert listed.expires_at.ToMicroseconds() > listed.connected_at.ToMicroseconds()

    # It holds a job: listed with its attempt and since when.
    job = await submit(api, "a")
    assignment = await raw.expect("assignment")
    assert assignment.job.id == job.id

    async def holding() -> w.ConnectedWorker | None:
        found = await one(api, "w1")
        return found if found is not None and found.held_jobs else None

    held = (await wait_for(holding)).held_jobs
    assert [(h.job_id, h.attempt, h.service) for h in held] == [(job.id, 1, "svc")]
    assert held[0].since.seconds
    assert [x.worker_id for x in await workers(api, holding_job=job.id)] == ["w1"]
    assert await workers(api, holding_job="job_nobody") == []

    # Completed, then a failure: counted since connect, slots free again.
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
    await raw.expect("ack")
    second = await submit(api, "b")
    await raw.expect("assignment")
    await raw.send(
        fail=w.FailReport(
            job_id=second.id, attempt=1, error=c.ErrorDetail(message="boom"), retryable=False
        )
    )
    await raw.expect("ack")

    async def counted() -> w.ConnectedWorker | None:
        found = await one(api, "w1")
        return found if found is not None and found.completed == 1 and found.failed == 1 else None

    done = await wait_for(counted)
    assert not done.held_jobs and done.free_slots == 2 and done.lease_losses == 0

    # Draining: shown, no free slots, and filtered.
    await raw.send(heartbeat=w.WorkerHeartbeat(draining=True))

    async def draining() -> w.ConnectedWorker | None:
        found = await one(api, "w1")
        return found if found is not None and found.draining else None

    assert (await wait_for(draining)).free_slots == 0
    assert [x.worker_id for x in await workers(api, draining=w.DRAINING_FILTER_DRAINING)] == ["w1"]
    assert await workers(api, draining=w.DRAINING_FILTER_NOT_DRAINING) == []

    # Disconnected: gone at once.
    await raw.close()
    await wait_for(lambda: _none(one(api, "w1")))


async def _none(value: Any) -> bool:
    return await value is None


async def test_a_lost_lease_is_counted(db_url: str) -> None:
    async with Harness(db_url, lease_seconds=1.0, heartbeat_seconds=0.2) as h:
        await _lost_lease_is_counted(h.stubs())


async def _lost_lease_is_counted(api: Stubs) -> None:
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    job = await submit(api, "a")
    await raw.expect("assignment")

    # Heartbeats that do not list the job: its lease runs out while connected.
    async def lost() -> w.ConnectedWorker | None:
        await raw.send(heartbeat=w.WorkerHeartbeat())
        found = await one(api, "w1")
        return found if found is not None and found.lease_losses == 1 else None

    found = await wait_for(lost, timeout=15, interval=0.1)
    assert job.id not in {h.job_id for h in found.held_jobs}
    await raw.close()


async def test_filters_select_workers(fleet: Harness) -> None:
    api = fleet.stubs()
    a, b, d = RawWorker(api), RawWorker(api), RawWorker(api)
    await a.hello("a", ["svc"], labels={"gpu": "a100", "zone": "eu"})
    await b.hello("b", ["svc", "cpu"], labels={"gpu": "t4", "zone": "eu"})
    await d.hello("d", ["cpu"])
    await wait_for(lambda: _count(api, 3))

    async def ids(**filters: Any) -> list[str]:
        return sorted(x.worker_id for x in await workers(api, **filters))

    assert await ids(service="svc") == ["a", "b"]
    assert await ids(service="cpu") == ["b", "d"]
    assert await ids(labels={"zone": "eu"}) == ["a", "b"]
    assert await ids(labels={"zone": "eu", "gpu": "t4"}) == ["b"]
    assert await ids(labels={"zone": "us"}) == []
    assert await ids(service="cpu", labels={"gpu": "a100"}) == []

    # Pages, in connection order; a token is bound to its filter.
    first = await api.workers.ListWorkers(w.ListWorkersRequest(page_size=2))
    assert [x.worker_id for x in first.workers] == ["a", "b"] and first.next_page_token
    rest = await api.workers.ListWorkers(
        w.ListWorkersRequest(page_size=2, page_token=first.next_page_token)
    )
    assert [x.worker_id for x in rest.workers] == ["d"] and not rest.next_page_token
    _, _, violations = await expect_error(
        api.workers.ListWorkers(
            w.ListWorkersRequest(
                page_token=first.next_page_token, filter=w.WorkerFilter(service="svc")
            )
        ),
        INVALID,
    )
    assert [f for f, _ in violations] == ["page_token"]
    for raw in (a, b, d):
        await raw.close()


async def _count(api: Stubs, n: int) -> bool:
    return len(await workers(api)) == n


async def test_bad_filters_are_invalid_argument(fleet: Harness) -> None:
    api = fleet.stubs()
    cases: list[tuple[Any, str]] = [
        (w.ListWorkersRequest(filter=w.WorkerFilter(service="no spaces")), "filter.service"),
        (w.ListWorkersRequest(filter=w.WorkerFilter(labels={"": "x"})), "filter.labels['']"),
        (
            w.ListWorkersRequest(filter=w.WorkerFilter(labels={"k": "v" * 257})),
            "filter.labels['k']",
        ),
        (w.ListWorkersRequest(filter=w.WorkerFilter(holding_job="x" * 65)), "filter.holding_job"),
        (w.ListWorkersRequest(filter=w.WorkerFilter(draining=7)), "filter.draining"),  # type: ignore[arg-type]
        (w.ListWorkersRequest(page_size=-1), "page_size"),
        (w.ListWorkersRequest(page_size=1001), "page_size"),
        (w.ListWorkersRequest(page_token="garbage"), "page_token"),
    ]
    for request, field in cases:
        _, _, violations = await expect_error(api.workers.ListWorkers(request), INVALID)
        assert [f for f, _ in violations] == [field], (request, violations)
    for request, field in cases[:5]:
        stream = api.workers.WatchWorkers(w.WatchWorkersRequest(filter=request.filter))
        _, _, violations = await expect_error(stream.read(), INVALID)
        assert [f for f, _ in violations] == [field]


async def read_change(stream: Any, timeout: float = 10.0) -> w.WorkerChange:
    """The next change (keepalives skipped)."""
    while True:
        message = await asyncio.wait_for(stream.read(), timeout)
        assert message is not grpc.aio.EOF, "stream ended"
        if message.WhichOneof("kind") == "change":
            return message.change
        assert message.WhichOneof("kind") == "keepalive", message


async def test_watch_sends_the_snapshot_then_connects_changes_and_disconnects(
    fleet: Harness,
) -> None:
    api = fleet.stubs()
    first = RawWorker(api)
    await first.hello("first", ["svc"])
    await wait_for(lambda: _count(api, 1))
    stream = api.workers.WatchWorkers(w.WatchWorkersRequest())
    present = await read_change(stream)
    assert present.type == w.WORKER_CHANGE_TYPE_PRESENT and present.worker.worker_id == "first"
    done = await asyncio.wait_for(stream.read(), 10)
    assert done.WhichOneof("kind") == "snapshot_done" and done.snapshot_done.workers == 1

    second = RawWorker(api)
    await second.hello("second", ["svc"], max_concurrency=3)
    connected = await read_change(stream)
    assert connected.type == w.WORKER_CHANGE_TYPE_CONNECTED
    assert connected.worker.worker_id == "second" and connected.worker.max_concurrency == 3

    # A heartbeat that changes something is an update.
    await second.send(heartbeat=w.WorkerHeartbeat(affinity_keys=["m"]))
    updated = await read_change(stream)
    assert updated.type == w.WORKER_CHANGE_TYPE_UPDATED
    assert list(updated.worker.affinity_keys) == ["m"]

    await first.close()
    gone = await read_change(stream)
    assert gone.type == w.WORKER_CHANGE_TYPE_DISCONNECTED and gone.worker.worker_id == "first"
    stream.cancel()
    await second.close()


async def test_a_filtered_watch_reports_a_worker_leaving_its_filter(fleet: Harness) -> None:
    api = fleet.stubs()
    stream = api.workers.WatchWorkers(
        w.WatchWorkersRequest(filter=w.WorkerFilter(draining=w.DRAINING_FILTER_NOT_DRAINING))
    )
    done = await asyncio.wait_for(stream.read(), 10)
    assert done.snapshot_done.workers == 0
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    assert (await read_change(stream)).type == w.WORKER_CHANGE_TYPE_CONNECTED
    await raw.send(heartbeat=w.WorkerHeartbeat(draining=True))
    left = await read_change(stream)
    assert left.type == w.WORKER_CHANGE_TYPE_UNMATCHED and left.worker.draining
    stream.cancel()
    await raw.close()


async def test_a_cancelled_watch_leaves_no_subscriber(fleet: Harness) -> None:
    api = fleet.stubs()
    stream = api.workers.WatchWorkers(w.WatchWorkersRequest())
    await asyncio.wait_for(stream.read(), 10)
    feed = fleet.server.fleet.feed  # type: ignore[union-attr]
    assert feed.subscriber_count == 1
    stream.cancel()
    await wait_for(lambda: feed.subscriber_count == 0)


async def test_watchers_are_counted_in_the_metrics(sqlite_url: str) -> None:
    from .test_observability import scrape, until_metric

    async with Harness(sqlite_url, metrics_port=0) as h:
        stream = h.stubs().workers.WatchWorkers(w.WatchWorkersRequest())
        await asyncio.wait_for(stream.read(), 10)
        s = await scrape(h.server)
        assert s.value("jobtrace_stream_subscribers", kind="worker_watch") == 1
        stream.cancel()
        await until_metric(h, "jobtrace_stream_subscribers", 0, kind="worker_watch")


# --- tenancy ------------------------------------------------------------------


TENANCY = [
    # (token, subject, tenant, roles, tenants)
    ("tok-worker-a", "worker-a", "a", ["worker"], None),  # its own tenant's jobs only
    ("tok-worker-ab", "worker-ab", "a", ["worker"], ["a", "b"]),
    ("tok-worker-any", "worker-any", "ops", ["worker"], "*"),
    ("tok-reader-a", "reader-a", "a", ["reader"], None),
    ("tok-reader-b", "reader-b", "b", ["reader"], None),
    ("tok-reader-c", "reader-c", "c", ["reader"], None),
    ("tok-admin", "root", "ops", ["admin"], None),
]


@pytest.fixture
async def tenancy(db_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    from jobtrace.auth import hash_token

    entries = []
    for tok, subject, tenant, roles, scope in TENANCY:
        entry: dict[str, Any] = {
            "sha256": hash_token(tok),
            "subject": subject,
            "tenant": tenant,
            "roles": roles,
        }
        if scope is not None:
            entry["tenants"] = scope
        entries.append(entry)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": entries}))
    async with Harness(
        db_url, tokens_file=str(tokens), lease_seconds=2.0, heartbeat_seconds=0.2
    ) as h:
        yield h


def bearer(tok: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {tok}"),)


async def test_a_reader_sees_the_workers_that_can_serve_its_tenant(tenancy: Harness) -> None:
    api = tenancy.stubs()
    connected = []
    for tok, worker_id in (
        ("tok-worker-a", "wa"),
        ("tok-worker-ab", "wab"),
        ("tok-worker-any", "wany"),
    ):
        raw = RawWorker(api, metadata=bearer(tok))
        await raw.hello(worker_id, ["svc"])
        connected.append(raw)

    async def seen(tok: str, n: int | None = None) -> list[str] | None:
        response = await api.workers.ListWorkers(w.ListWorkersRequest(), metadata=bearer(tok))
        names = sorted(x.worker_id for x in response.workers)
        return names if n is None or len(names) == n else None

    assert await wait_for(lambda: seen("tok-admin", 3)) == [
        "worker-a/wa",
        "worker-ab/wab",
        "worker-any/wany",
    ]
    assert await seen("tok-reader-a") == ["worker-a/wa", "worker-ab/wab", "worker-any/wany"]
    assert await seen("tok-reader-b") == ["worker-ab/wab", "worker-any/wany"]
    assert await seen("tok-reader-c") == ["worker-any/wany"]

    # The watch too.
    stream = api.workers.WatchWorkers(w.WatchWorkersRequest(), metadata=bearer("tok-reader-c"))
    present = await read_change(stream)
    assert present.worker.worker_id == "worker-any/wany"
    assert (await asyncio.wait_for(stream.read(), 10)).snapshot_done.workers == 1
    stream.cancel()

    # Workers and anonymous callers may not list.
    await expect_error(
        api.workers.ListWorkers(w.ListWorkersRequest(), metadata=bearer("tok-worker-any")),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await expect_error(
        api.workers.ListWorkers(w.ListWorkersRequest()), grpc.StatusCode.UNAUTHENTICATED
    )
    for raw in connected:
        await raw.close()


# --- replicas (PostgreSQL) ---------------------------------------------------------


async def test_every_replica_lists_the_whole_fleet_and_a_dead_replicas_workers_expire(
    pg_url: str, tmp_path: Path
) -> None:
    from .test_replicas import client, replicas

    async with (
        replicas(pg_url, tmp_path, 2) as (a, b),
        client(a.target) as on_a,
        client(b.target) as on_b,
    ):
        connected: dict[str, RawWorker] = {}
        for api, name in ((on_a, "a1"), (on_a, "a2"), (on_b, "b1"), (on_b, "b2")):
            connected[name] = RawWorker(api)
            await connected[name].hello(name, ["svc"])
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(beating(*connected.values()))

            async def listed(api: Stubs) -> dict[str, str] | None:
                found = {x.worker_id: x.replica for x in await workers(api)}
                return found if len(found) == 4 else None

            on_each = [
                await wait_for(lambda api=api: listed(api), timeout=15) for api in (on_a, on_b)
            ]
            assert on_each[0] == on_each[1]
            by_name = on_each[0]
            assert by_name["a1"] == by_name["a2"] != by_name["b1"] == by_name["b2"]
            assert by_name["a1"].partition("/")[0].endswith(f":{a.port}")
            assert by_name["b1"].partition("/")[0].endswith(f":{b.port}")

            # A watch on A hears of a worker connecting on B.
            stream = on_a.workers.WatchWorkers(w.WatchWorkersRequest())
            while (await asyncio.wait_for(stream.read(), 10)).WhichOneof("kind") != "snapshot_done":
                pass
            late = RawWorker(on_b)
            await late.hello("b3", ["svc"])
            await stack.enter_async_context(beating(late))
            change = await read_change(stream)
            assert change.type == w.WORKER_CHANGE_TYPE_CONNECTED
            assert change.worker.worker_id == "b3"

            # B dies without a word: its workers stay listed until their
            # expiry (about a lease, 3 s here), then are gone from A's list
            # and A's watch.
            b.proc.send_signal(signal.SIGKILL)
            await b.proc.wait()

            async def only_a() -> bool:
                return sorted(x.worker_id for x in await workers(on_a)) == ["a1", "a2"]

            await wait_for(only_a, timeout=30, interval=0.2)
            gone = [await read_change(stream, 30) for _ in range(3)]
            assert {c.worker.worker_id for c in gone} == {"b1", "b2", "b3"}
            assert {c.type for c in gone} == {w.WORKER_CHANGE_TYPE_EXPIRED}
            stream.cancel()
        for raw in (connected["a1"], connected["a2"]):
            await raw.close()


# --- the clients and the CLI ----------------------------------------------------


@pytest.fixture
async def sqlite_fleet(sqlite_url: str) -> AsyncIterator[Harness]:
    async with Harness(sqlite_url, lease_seconds=30.0, heartbeat_seconds=0.2) as h:
        yield h


async def test_the_clients_list_and_watch_workers(sqlite_fleet: Harness) -> None:
    from jobtrace.client import Client, SyncClient

    api = sqlite_fleet.stubs()
    gpu, cpu = RawWorker(api), RawWorker(api)
    await gpu.hello("gpu", ["svc"], labels={"gpu": "a100"})
    await cpu.hello("cpu", ["svc"])
    async with Client(sqlite_fleet.target) as jt:
        await wait_for(lambda: _count(api, 2))
        page = await jt.list_workers(labels={"gpu": "a100"}, draining=False)
        assert [x.worker_id for x in page.items] == ["gpu"] and not page.next_page_token
        assert [x.worker_id async for x in jt.iter_workers(page_size=1)] == ["gpu", "cpu"]
        watch = jt.watch_workers(service="svc")
        first = await anext(watch)
        assert first.change.type == w.WORKER_CHANGE_TYPE_PRESENT
        assert (await anext(watch)).change.worker.worker_id == "cpu"
        assert (await anext(watch)).snapshot_done.workers == 2
        await cpu.close()
        gone = await asyncio.wait_for(anext(watch), 10)
        assert gone.change.type == w.WORKER_CHANGE_TYPE_DISCONNECTED
        await watch.aclose()

    def blocking() -> list[str]:
        with SyncClient(sqlite_fleet.target) as sync:
            return [x.worker_id for x in sync.list_workers(service="svc").items]

    assert await asyncio.to_thread(blocking) == ["gpu"]
    await gpu.close()


async def test_jobtrace_workers_prints_a_table_json_and_follows_changes(
    sqlite_fleet: Harness,
) -> None:
    from .procs import jobtrace

    api = sqlite_fleet.stubs()
    raw = RawWorker(api)
    await raw.hello("render-1", ["render"], max_concurrency=4, labels={"gpu": "a100"})
    await wait_for(lambda: _count(api, 1))
    t = sqlite_fleet.target
    code, out, err = await jobtrace("workers", target=t)
    assert code == 0, err
    header, line = out.splitlines()
    assert header.split()[:5] == ["WORKER", "SESSION", "REPLICA", "SERVICES", "SLOTS"]
    assert line.split()[0] == "render-1" and "4/4" in line.split()
    code, out, _ = await jobtrace("workers", "--json", "--label", "gpu=a100", target=t)
    listed = json.loads(out)["workers"]
    assert code == 0 and [x["worker_id"] for x in listed] == ["render-1"]
    assert listed[0]["labels"] == {"gpu": "a100"} and listed[0]["max_concurrency"] == 4
    code, out, _ = await jobtrace("workers", "--json", "--draining", "yes", target=t)
    assert code == 0 and json.loads(out)["workers"] == []
    code, _, err = await jobtrace("workers", "--label", "gpu", target=t)
    assert code == 2 and "KEY=VALUE" in err
    code, _, err = await jobtrace("workers", "--service", "bad service", target=t)
    assert code == 2 and "filter.service" in err

    # --watch: the snapshot, then each change, one JSON object a line.
    env = {**os.environ, "JOBTRACE_TARGET": t, "NO_COLOR": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jobtrace",
        "workers",
        "--watch",
        "--json",
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    try:

        async def line() -> dict[str, Any]:
            read = await asyncio.wait_for(proc.stdout.readline(), 30)  # type: ignore[union-attr]
            return dict(json.loads(read))

        assert (await line())["change"]["type"] == "WORKER_CHANGE_TYPE_PRESENT"
        assert (await line())["snapshot_done"]["workers"] == 1
        await raw.close()
        gone = await line()
        assert gone["change"]["type"] == "WORKER_CHANGE_TYPE_DISCONNECTED"
        assert gone["change"]["worker"]["worker_id"] == "render-1"
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 30)


async def test_gauges_per_service_count_workers_free_slots_and_held_jobs(db_url: str) -> None:
    from .test_observability import scrape

    async with Harness(
        db_url, metrics_port=0, metrics_max_services=2, lease_seconds=30.0, heartbeat_seconds=0.2
    ) as h:
        api = h.stubs()
        first, second, third = RawWorker(api), RawWorker(api), RawWorker(api)
        await first.hello("first", ["a"], max_concurrency=2)
        job = await submit(api, "a-1", service="a")
        assert (await first.expect("assignment")).job.id == job.id
        await second.hello("second", ["a", "b"], max_concurrency=3)
        await third.hello("third", ["c"])
        s = await scrape(h.server)
        gauges = {
            name: {x.labels["service"]: x.value for x in s.matching(name)}
            for name in (
                "jobtrace_workers",
                "jobtrace_worker_free_slots",
                "jobtrace_worker_held_jobs",
            )
        }
        # At most 2 services named (a, then b by their workers); c is "(other)".
        assert gauges == {
            "jobtrace_workers": {"a": 2, "b": 1, "(other)": 1},
            "jobtrace_worker_free_slots": {"a": 4, "b": 3, "(other)": 1},
            "jobtrace_worker_held_jobs": {"a": 1, "b": 0, "(other)": 0},
        }, gauges
        for raw in (first, second, third):
            await raw.close()


async def test_an_idle_watch_gets_keepalives(sqlite_url: str) -> None:
    async with Harness(sqlite_url, keepalive_seconds=0.2, heartbeat_seconds=0.2) as h:
        stream = h.stubs().workers.WatchWorkers(w.WatchWorkersRequest())
        assert (await asyncio.wait_for(stream.read(), 10)).WhichOneof("kind") == "snapshot_done"
        idle = await asyncio.wait_for(stream.read(), 10)
        assert idle.WhichOneof("kind") == "keepalive" and idle.keepalive.time.seconds
        stream.cancel()


async def test_a_watcher_behind_its_buffer_still_gets_every_worker(
    sqlite_fleet: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its buffer of pending changes a watcher re-reads the whole fleet:
    changes coalesce, none is lost."""
    from jobtrace.events import workers as feed

    monkeypatch.setattr(feed, "WATCH_BUFFER", 1)
    api = sqlite_fleet.stubs()
    stream = api.workers.WatchWorkers(w.WatchWorkersRequest())
    assert (await asyncio.wait_for(stream.read(), 10)).snapshot_done.workers == 0
    raws = [RawWorker(api) for _ in range(5)]
    await asyncio.gather(*(raw.hello(f"w{i}", ["svc"]) for i, raw in enumerate(raws)))
    seen = {(await read_change(stream)).worker.worker_id for _ in range(5)}
    assert seen == {f"w{i}" for i in range(5)}
    stream.cancel()
    for raw in raws:
        await raw.close()


async def test_the_worker_runtime_reports_its_version(sqlite_fleet: Harness) -> None:
    from jobtrace import __version__

    from .workers import runtime_worker

    async def noop(ctx: Any) -> dict[str, Any]:
        return {}

    api = sqlite_fleet.stubs()
    async with (
        runtime_worker(sqlite_fleet.target, {"svc": noop}, worker_id="default"),
        runtime_worker(sqlite_fleet.target, {"svc": noop}, worker_id="app", version="app 2.0"),
    ):
        await wait_for(lambda: _count(api, 2))
        versions = {x.worker_id: x.version for x in await workers(api)}
    assert versions == {"default": f"jobtrace-python/{__version__}", "app": "app 2.0"}
