"""Deliberate mistakes that `mypy --strict` must report (tests/test_typed.py
checks that each line with an error comment is reported, and no other), so
the typed-app check can fail."""

from __future__ import annotations

from jobtrace.client import JobContext, SyncClient, Worker

worker = Worker()


@worker.handler("resize")
async def resize(ctx: JobContext) -> dict[str, int]:
    return {"width": 1}


async def misuse(jt: SyncClient) -> None:
    await resize("ctx")  # error: the decorated handler keeps its signature
    jt.get_job(42)  # error: job_id is a str
    jt.cancel_job("job_1", reason=None)  # error: reason is a str
    jt.list_workers(draining="yes")  # error: draining is a bool or None
    print(jt.list_workers().items[0].no_such_field)  # error: ConnectedWorker has no such field


@worker.handler("bad")  # error: not a handler shape
async def bad(width: int) -> None:
    return None
