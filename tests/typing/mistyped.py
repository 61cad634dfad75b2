"""Deliberate mistakes that `mypy --strict` must report (tests/test_typed.py
checks that each line with an error comment is reported, and no other), so
the typed-app check can fail."""

from __future__ import annotations

from jobtrace.client import JobContext, SyncClient, Worker

worker = Worker()


@worker.handler("resize")
async def resize(ctx: JobContext) -> dict[str, int]:
    ctx.set_output_summary(["width"])  # error: a summary is a mapping
    return {"width": 1}


async def misuse(jt: SyncClient) -> None:
    await resize("ctx")  # error: the decorated handler keeps its signature
    jt.get_job(42)  # error: job_id is a str
    jt.cancel_job("job_1", reason=None)  # error: reason is a str
    jt.get_run_summary(workflow_name="nightly", recent_runs="5")  # error: recent_runs is an int
    jt.list_workers(draining="yes")  # error: draining is a bool or None
    print(jt.list_workers().items[0].no_such_field)  # error: ConnectedWorker has no such field


@worker.handler("bad")  # error: not a handler shape
async def bad(width: int) -> None:
    return None
