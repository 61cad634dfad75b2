"""The worker runtime says what it does: plain `def` handlers, handler shapes
refused at registration, cancellation, its logs and its default concurrency."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from jobtrace.cli import build_parser
from jobtrace.client import Client, JobContext, SyncJobContext, Worker
from jobtrace.pb import common_pb2 as c

from .conftest import Harness, wait_for
from .workers import runtime_worker


async def _ended(jt: Client, job_id: str) -> c.Job | None:
    job = await jt.get_job(job_id)
    return job if job.state >= c.RUN_STATE_COMPLETED else None


async def test_a_plain_def_handler_runs_in_a_thread_with_blocking_context_methods(
    sqlite_harness: Harness,
) -> None:
    loop_thread = threading.get_ident()

    def transcode(job: c.Job, ctx: SyncJobContext) -> dict[str, Any]:
        ctx.progress(50, "halfway")
        ctx.log("transcoded", data={"stream": "stdout"})
        ctx.annotate({"decision.outcome": "av1"})
        return {
            "codec": ctx.payload["codec"],
            "same_job": job.id == ctx.job_id,
            "in_a_thread": threading.get_ident() != loop_thread,
        }

    worker = Worker(sqlite_harness.target)
    assert worker.handler("transcode")(transcode) is transcode
    async with (
        Client(sqlite_harness.target) as jt,
        runtime_worker(sqlite_harness.target, {"transcode": transcode}),
    ):
        job = await jt.submit_job("transcode", {"codec": "av1"})
        done = await wait_for(lambda: _ended(jt, job.id), timeout=10)
        assert done.state == c.RUN_STATE_COMPLETED, done.failure.reason
        assert dict(done.result) == {"codec": "av1", "same_job": True, "in_a_thread": True}
        events = await jt.list_trace_events(job.id, type="log", view="full")
        assert [e.message for e in events.events] == ["transcoded"]
        annotations = await jt.list_annotations(job.id, key_prefix="decision.")
        assert [a.key for a in annotations.items] == ["decision.outcome"]


async def test_a_plain_def_handler_sees_the_cancel_and_its_result_is_dropped(
    sqlite_harness: Harness,
) -> None:
    started = threading.Event()
    saw: list[tuple[bool, str]] = []

    def slow(ctx: SyncJobContext) -> dict[str, Any]:
        started.set()
        cancelled = ctx.wait_cancelled(timeout=20)  # a cancellable sleep
        saw.append((cancelled and ctx.cancelled, ctx.cancel_reason))
        return {"finished": True}

    async with (
        Client(sqlite_harness.target) as jt,
        runtime_worker(sqlite_harness.target, {"slow": slow}) as worker,
    ):
        job = await jt.submit_job("slow", {})
        await wait_for(started.is_set, timeout=10)
        await jt.cancel_job(job.id, reason="user changed their mind")
        await wait_for(lambda: saw, timeout=10)
        assert saw == [(True, "user changed their mind")]
        await wait_for(lambda: not worker.running_jobs, timeout=10)
        final = await jt.get_job(job.id)
        assert final.state == c.RUN_STATE_CANCELLED and not final.result


async def test_an_async_handler_is_cancelled_and_can_tell_a_cancel_from_a_shutdown(
    sqlite_harness: Harness,
) -> None:
    seen: list[tuple[bool, str]] = []
    waiter_done = asyncio.Event()

    async def long(ctx: JobContext) -> dict[str, Any]:
        async def watch() -> None:  # code outside the handler's task waits instead
            await ctx.wait_cancelled()
            waiter_done.set()

        asyncio.get_running_loop().create_task(watch())
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append((ctx.cancelled, ctx.cancel_reason))
            raise
        return {}

    async with (
        Client(sqlite_harness.target) as jt,
        runtime_worker(sqlite_harness.target, {"long": long}) as worker,
    ):
        job = await jt.submit_job("long", {})
        await wait_for(lambda: worker.running_jobs, timeout=10)
        await jt.cancel_job(job.id, reason="stop")
        await wait_for(waiter_done.is_set, timeout=10)
        assert seen == [(True, "stop")]


def _generator(ctx: JobContext) -> Iterator[int]:
    yield 1


async def _async_generator(ctx: JobContext) -> AsyncIterator[int]:
    yield 1


class _Callable:
    async def __call__(self, job: c.Job, ctx: JobContext) -> None:
        return None


async def _three(a: Any, b: Any, c: Any) -> None:
    return None


async def _keyword_only(ctx: JobContext, *, size: int) -> None:
    return None


async def _none() -> None:
    return None


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        (42, "must be a function, got int"),
        (_generator, "is a generator"),
        (_async_generator, "is a generator"),
        (_three, "must take (ctx) or (job, ctx), but its signature is (a, b, c)"),
        (_keyword_only, "missing a required argument: 'size'"),
        (_none, "must take (ctx) or (job, ctx), but its signature is ()"),
    ],
)
def test_an_unsupported_handler_shape_is_refused_at_registration(fn: Any, message: str) -> None:
    worker = Worker("127.0.0.1:1")
    with pytest.raises(TypeError) as refused:
        worker.handler("resize")(fn)
    assert "the handler of 'resize'" in str(refused.value) and message in str(refused.value)
    assert "resize" not in worker._handlers


def test_callable_objects_and_partials_are_accepted() -> None:
    async def scaled(factor: int, ctx: JobContext) -> None:
        return None

    worker = Worker("127.0.0.1:1")
    worker.handler("a")(_Callable())
    worker.handler("b")(functools.partial(scaled, 2))
    assert set(worker._handlers) == {"a", "b"}


def test_the_default_concurrency_is_the_clis_and_the_readmes() -> None:
    assert Worker().max_concurrency == 4
    assert build_parser().parse_args(["worker"]).concurrency == Worker().max_concurrency
    with pytest.raises(ValueError, match="at least 1"):
        Worker(max_concurrency=0)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_worker_logs_connect_reconnect_and_drain_with_the_address(
    sqlite_harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jobtrace.client.worker")
    dead = f"127.0.0.1:{_closed_port()}"

    async def noop(ctx: JobContext) -> None:
        return None

    # The first replica is down: the worker fails over to the second.
    worker = Worker(f"{dead},{sqlite_harness.target}", reconnect_initial=0.01)
    worker.handler("noop")(noop)
    task = asyncio.create_task(worker.run())
    try:
        await wait_for(worker.connected.is_set, timeout=10)
        await worker.drain(timeout=5)
        await asyncio.wait_for(task, timeout=10)
    finally:
        worker.stop()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert f"reconnecting to {sqlite_harness.target} in" in "\n".join(lines)
    assert any(line.startswith(f"connected to {sqlite_harness.target} as worker") for line in lines)
    assert any("draining" in line and sqlite_harness.target in line for line in lines)


async def test_a_plain_def_that_returns_a_coroutine_fails_without_retries(
    sqlite_harness: Harness,
) -> None:
    async def real(ctx: Any) -> dict[str, Any]:
        return {}

    def wrapper(ctx: Any) -> Any:  # e.g. a decorator that lost `async`
        return real(ctx)

    async with (
        Client(sqlite_harness.target) as jt,
        runtime_worker(sqlite_harness.target, {"wrapped": wrapper}),
    ):
        job = await jt.submit_job("wrapped", {}, max_attempts=3)
        done = await wait_for(lambda: _ended(jt, job.id), timeout=10)
    assert done.state == c.RUN_STATE_FAILED and done.attempt == 1
    assert done.failure.code == "HANDLER_SHAPE" and "declare it `async def`" in done.failure.reason
