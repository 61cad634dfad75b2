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
    ctx.set_output_summary({"path": "/tmp/a.mov"})
    return {"path": "/tmp/a.mov", "bytes": 1048576}


@worker.handler("transcode")
def transcode(job: common_pb2.Job, ctx: SyncJobContext) -> dict[str, Any]:
    for percent in (25, 50, 75):
        if ctx.wait_cancelled(0.01):
            return {}
        ctx.progress(percent, "transcoding")
    ctx.annotate(conventions.decision(outcome="av1", confidence=0.9))
    ctx.set_output_summary(None)  # the server derives one from the result
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
        async for worker_change in jt.watch_workers(draining=True):
            print(worker_change.change.worker.last_heartbeat.ToDatetime())
            break
        fleet = await jt.list_workers(page_size=10)
        print([w.session_id for w in fleet.items], fleet.next_page_token)
        async for change in jt.watch_workflow(workflow.id):
            print(change.workflow.progress.percent)
        keys = await jt.get_signing_keys()
        envelope = await jt.export_attestation(f"workflow-completion:{workflow.id}")
        verdict: OfflineVerdict = verify_offline(envelope, keys)
        assert verdict.valid, verdict.reason
        summary = (await jt.get_run_summary(workflow.id)).summary
        failures: int = sum(node.failures for node in summary.nodes)
        print(summary.total_events, failures)
        async for event in jt.export_trace(workflow.id):
            print(event.sequence, event.message)
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
        page = jt.list_workers(service="download", labels={"gpu": "a100"}, draining=False)
        free: int = sum(w.free_slots for w in page.items)
        print(free, [h.job_id for w in jt.iter_workers(holding_job=job.id) for h in w.held_jobs])
        for message in jt.watch_workers(service="download"):
            if message.WhichOneof("kind") == "change":
                print(message.change.type, message.change.worker.worker_id)
            break
        for change in jt.watch_runs(states=["RUNNING"], labels={"team": "a"}, include_active=True):
            if change.HasField("snapshot_end"):
                break
            run: common_pb2.Job | common_pb2.Workflow = (
                change.job if change.HasField("job") else change.workflow
            )
            print(run.id, run.updated_at.ToDatetime())
        jt.submit_workflow(workflow.name, workflow.steps)
        recent = jt.get_run_summary(workflow_name="media", recent_runs=5).recent_runs
        print([run.run_id for run in recent])
        for event in jt.export_trace(job.id):
            print(event.sequence)
        return int(job.state)


if __name__ == "__main__":
    # Kept apart from the typed code above: the test only type-checks this file.
    print(asyncio.run(submit()), blocking("job_1"))
    asyncio.run(worker.run())
