"""A user's app, as the README builds it: download -> transcode -> notify, with an
async handler, a plain `def` handler, the conventions, both clients and offline
verification. tests/test_typed.py runs `mypy --strict` over it; never run."""

from __future__ import annotations

import asyncio
from typing import Any

from jobtrace import conventions
from jobtrace.client import (
    Client,
    JobContext,
    JobtraceError,
    NonRetryableError,
    OfflineVerdict,
    SyncClient,
    SyncJobContext,
    Worker,
    verify_offline,
)
from jobtrace.client.workflow_file import load_workflow
from jobtrace.pb import common_pb2

worker = Worker("127.0.0.1:50051", max_concurrency=4)


@worker.handler("download")
async def download(ctx: JobContext) -> dict[str, Any]:
    url = str(ctx.payload["url"])
    await ctx.progress(50, f"fetching {url}")
    await ctx.log("fetched", data={"stream": "stdout"})
    if ctx.cancelled:
        return {}
    return {"path": "/tmp/a.mov", "bytes": 1048576}


@worker.handler("transcode")
def transcode(job: common_pb2.Job, ctx: SyncJobContext) -> dict[str, Any]:
    for percent in (25, 50, 75):
        if ctx.wait_cancelled(0.01):
            return {}
        ctx.progress(percent, "transcoding")
    ctx.annotate(conventions.decision(outcome="av1", confidence=0.9))
    return {"codec": "av1", "job": job.id}


@worker.handler("notify")
async def notify(job: common_pb2.Job, ctx: JobContext) -> None:
    if not ctx.payload.get("to"):
        raise NonRetryableError("nobody to notify", code="NO_RECIPIENT")
    await ctx.annotate({conventions.Failure.kind: "none"})


async def submit() -> str:
    async with Client("127.0.0.1:50051") as jt:
        workflow = await jt.submit_workflow(
            "media",
            [
                {"name": "download", "job": {"service": "download"}},
                {"name": "transcode", "job": {"service": "transcode", "max_attempts": 2}},
                {"name": "notify", "job": {"service": "notify"}},
            ],
            annotations=[{"attributes": conventions.trigger(source="upload")}],
        )
        async for change in jt.watch_workflow(workflow.id):
            print(change.workflow.progress.percent)
        keys = await jt.get_signing_keys()
        envelope = await jt.export_attestation(f"workflow-completion:{workflow.id}")
        verdict: OfflineVerdict = verify_offline(envelope, keys)
        assert verdict.valid, verdict.reason
        return workflow.id


def blocking(job_id: str) -> int:
    workflow = load_workflow("name: media\nsteps: [{name: a, service: download}]")
    with SyncClient("127.0.0.1:50051") as jt:
        try:
            job = jt.get_job(job_id)
        except JobtraceError as exc:
            print(exc.code, exc.violations)
            return 2
        for snapshot in jt.watch_job(job.id):
            print(snapshot.state)
        for change in jt.watch_runs(states=["RUNNING"], labels={"team": "a"}, include_active=True):
            if change.HasField("snapshot_end"):
                break
            run: common_pb2.Job | common_pb2.Workflow = (
                change.job if change.HasField("job") else change.workflow
            )
            print(run.id, run.updated_at.ToDatetime())
        jt.submit_workflow(workflow.name, workflow.steps)
        return int(job.state)


if __name__ == "__main__":
    # Kept apart from the typed code above: the test only type-checks this file.
    print(asyncio.run(submit()), blocking("job_1"))
    asyncio.run(worker.run())
