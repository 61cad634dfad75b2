"""CancelRuns, bulk cancellation, through the real server on both backends:
a dry run changes nothing; a real call cancels exactly the matching runs, in
pages; a call stopped at its limit resumes by its request id with nothing
handled twice; runs that end meanwhile are skipped; bad requests are refused."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from jobtrace.client import Client, SyncClient
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j

from .conftest import Harness, Stubs, execute_sql, expect_error
from .test_security import bearer, token, write_tokens

CANCELLED_EVENT = "Run cancelled by user"
JOB = j.WatchRunsRequest.RUN_KIND_JOB


async def submit_jobs(api: Stubs, service: str, count: int, prefix: str) -> list[str]:
    replies = await asyncio.gather(
        *(
            api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id=f"{prefix}-{i}", job=c.JobSpec(service=service))
            )
            for i in range(count)
        )
    )
    return [r.job.id for r in replies]


async def submit_workflows(api: Stubs, name: str, count: int, service: str) -> list[c.Workflow]:
    replies = await asyncio.gather(
        *(
            api.jobs.SubmitWorkflow(
                j.SubmitWorkflowRequest(
                    request_id=f"{name}-{i}",
                    name=name,
                    steps=[
                        c.WorkflowStepSpec(name="a", job=c.JobSpec(service=service)),
                        c.WorkflowStepSpec(name="b", job=c.JobSpec(service=service)),
                    ],
                )
            )
            for i in range(count)
        )
    )
    return [r.workflow for r in replies]


async def count_jobs(api: Stubs, **filters: Any) -> int:
    reply = await api.jobs.ListJobs(j.ListJobsRequest(include_total=True, page_size=1, **filters))
    return reply.total_size


async def cancel_events(db_url: str) -> Counter[str]:
    """Cancellation trace events per run."""
    rows = await execute_sql(
        db_url, "SELECT run_id FROM trace_events WHERE message = :m", m=CANCELLED_EVENT
    )
    return Counter(str(r[0]) for r in rows)


async def cancel_attestations(db_url: str) -> Counter[str]:
    rows = await execute_sql(
        db_url, "SELECT key FROM attestations WHERE key LIKE :k", k="worker-cancellation:%"
    )
    return Counter(str(r[0]).split(":", 1)[1] for r in rows)


def by_service(service: str, **more: Any) -> j.BulkRunFilter:
    return j.BulkRunFilter(service=service, **more)


async def test_bulk_cancel_dry_runs_pages_resumes_and_counts_once(harness: Harness) -> None:
    api = harness.stubs()
    a_ids = await submit_jobs(api, "svc-a", 150, "a")
    b_ids = await submit_jobs(api, "svc-b", 100, "b")
    # Workflows whose steps run svc-a: a standalone job filter leaves them out.
    workflows = await submit_workflows(api, "wf-bulk", 3, "svc-a")

    # A dry run counts and samples, and changes nothing.
    dry = await api.jobs.CancelRuns(
        j.CancelRunsRequest(filter=by_service("svc-a"), dry_run=True, reason="incident 7")
    )
    assert dry.matched == 150
    assert len(dry.sample) == 20
    assert {r.run_id for r in dry.sample} <= set(a_ids)
    assert all(r.state == c.RUN_STATE_QUEUED and r.kind == JOB for r in dry.sample)
    assert dry.cancelled == 0 and dry.request_id == "" and dry.done
    assert await count_jobs(api, state=c.RUN_STATE_CANCELLED) == 0
    assert await count_jobs(api, service="svc-a", state=c.RUN_STATE_QUEUED) == 150 + 3

    # Two runs end between the dry run and the call: not taken again.
    ended_before = a_ids[:2]
    for job_id in ended_before:
        await api.jobs.CancelJob(j.CancelJobRequest(job_id=job_id))

    # Two more end after their page was read and before their turn: skipped.
    bulk = harness.server.jobs.bulk  # type: ignore[union-attr]
    page = bulk._page
    racing = a_ids[140:142]  # oldest first submitted: among the last taken

    async def page_then_race(*args: Any, **kwargs: Any) -> Any:
        chunk = await page(*args, **kwargs)
        for run in chunk.items:
            if run.id in racing:
                racing.remove(run.id)
                await api.jobs.CancelJob(j.CancelJobRequest(job_id=run.id))
        return chunk

    bulk._page = page_then_race
    request = j.CancelRunsRequest(
        filter=by_service("svc-a"),
        reason="incident 7",
        request_id="incident-7",
        limit=100,
        page_size=30,
    )
    first = await api.jobs.CancelRuns(request)
    assert first.request_id == "incident-7"
    assert not first.done
    assert first.handled == 100
    assert first.cancelled + first.skipped == first.matched == 100
    # Not all done: svc-a runs are left.
    assert await count_jobs(api, service="svc-a", state=c.RUN_STATE_QUEUED) > 3

    # Re-sent with the same request id (no limit): goes on and reports totals.
    request.limit = 0
    second = await api.jobs.CancelRuns(request)
    assert second.done
    assert second.handled == 48
    assert second.matched == 148
    assert second.cancelled == 146
    assert second.skipped == 2
    assert dict(second.skipped_reasons) == {"ENDED": 2}
    assert second.failed == 0 and not second.failures
    assert not racing, "both racing runs were in a page"

    # Exactly the matching runs: every standalone svc-a job, nothing else.
    assert await count_jobs(api, service="svc-a", state=c.RUN_STATE_CANCELLED) == 150
    assert await count_jobs(api, service="svc-a", state=c.RUN_STATE_QUEUED) == 3
    assert await count_jobs(api, service="svc-b", state=c.RUN_STATE_QUEUED) == 100
    for wf in workflows:
        got = (await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf.id))).workflow
        assert got.state == c.RUN_STATE_QUEUED
    job = (await api.jobs.GetJob(j.GetJobRequest(job_id=a_ids[50]))).job
    assert job.state == c.RUN_STATE_CANCELLED and job.failure.reason == "incident 7"

    # One cancellation per run: one event, one attestation, none for svc-b.
    events = await cancel_events(harness.db_url)
    assert {k: n for k, n in events.items() if k in set(a_ids)} == dict.fromkeys(a_ids, 1)
    assert not set(events) & set(b_ids)
    attestations = await cancel_attestations(harness.db_url)
    assert attestations == Counter(dict.fromkeys(a_ids, 1))

    # A done operation re-sent: its totals, nothing more.
    again = await api.jobs.CancelRuns(request)
    assert (again.done, again.handled, again.cancelled, again.skipped) == (True, 0, 146, 2)

    # The same request id with another filter or reason: a conflict.
    _, info, _ = await expect_error(
        api.jobs.CancelRuns(
            j.CancelRunsRequest(
                filter=by_service("svc-b"), reason="incident 7", request_id="incident-7"
            )
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert info is not None and info.reason == "IDEMPOTENCY_CONFLICT"
    await expect_error(
        api.jobs.CancelRuns(
            j.CancelRunsRequest(filter=by_service("svc-a"), reason="other", request_id="incident-7")
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert await count_jobs(api, service="svc-b", state=c.RUN_STATE_QUEUED) == 100


async def test_bulk_cancel_of_workflows_cancels_their_steps(harness: Harness) -> None:
    api = harness.stubs()
    workflows = await submit_workflows(api, "nightly", 4, "svc-w")
    others = await submit_workflows(api, "hourly", 2, "svc-w")
    await submit_jobs(api, "svc-w", 3, "w")
    wf_kind = j.WatchRunsRequest.RUN_KIND_WORKFLOW

    dry = await api.jobs.CancelRuns(
        j.CancelRunsRequest(filter=j.BulkRunFilter(workflow_name="nightly"), dry_run=True)
    )
    assert dry.matched == 4
    assert {r.run_id for r in dry.sample} == {w.id for w in workflows}
    assert all(r.kind == wf_kind for r in dry.sample)

    # No request id: the server makes one, and the call can be resumed by it.
    done = await api.jobs.CancelRuns(
        j.CancelRunsRequest(filter=j.BulkRunFilter(workflow_name="nightly"), limit=3)
    )
    assert done.request_id and not done.done and done.cancelled == 3
    rest = await api.jobs.CancelRuns(
        j.CancelRunsRequest(
            filter=j.BulkRunFilter(workflow_name="nightly"), request_id=done.request_id
        )
    )
    assert rest.done and rest.cancelled == 4 and rest.handled == 1
    for wf in workflows:
        got = (await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf.id))).workflow
        assert got.state == c.RUN_STATE_CANCELLED
        assert {s.state for s in got.steps} == {c.RUN_STATE_CANCELLED}
    for wf in others:
        got = (await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf.id))).workflow
        assert got.state == c.RUN_STATE_QUEUED

    # Steps as jobs, when asked: the other workflows' queued first steps.
    steps = await api.jobs.CancelRuns(
        j.CancelRunsRequest(
            filter=j.BulkRunFilter(
                kind=JOB, service="svc-w", states=[c.RUN_STATE_QUEUED], include_steps=True
            ),
            dry_run=True,
        )
    )
    assert steps.matched == 3 + 2  # the standalone jobs and each hourly's step a


async def test_bad_bulk_cancels_are_refused_and_change_nothing(harness: Harness) -> None:
    api = harness.stubs()
    ids = await submit_jobs(api, "svc-x", 3, "x")
    _, _, violations = await expect_error(
        api.jobs.CancelRuns(j.CancelRunsRequest(request_id="all")),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert violations and violations[0][0] == "filter"
    assert "needs at least one filter" in violations[0][1]
    # kind alone is no filter
    await expect_error(
        api.jobs.CancelRuns(j.CancelRunsRequest(filter=j.BulkRunFilter(kind=JOB))),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    _, _, violations = await expect_error(
        api.jobs.CancelRuns(
            j.CancelRunsRequest(
                filter=j.BulkRunFilter(
                    states=[c.RUN_STATE_COMPLETED], service="s", workflow_name="w"
                ),
                limit=10_001,
                page_size=501,
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    fields = {f for f, _ in violations}
    assert fields == {"filter.states[0]", "filter.workflow_name", "limit", "page_size"}
    await expect_error(
        api.jobs.CancelRuns(
            j.CancelRunsRequest(
                filter=j.BulkRunFilter(service="svc-x", kind=j.WatchRunsRequest.RUN_KIND_WORKFLOW)
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    for job_id in ids:
        job = (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id))).job
        assert job.state == c.RUN_STATE_QUEUED
    # Nothing recorded: the refused request id is free for a good request.
    ok = await api.jobs.CancelRuns(
        j.CancelRunsRequest(filter=by_service("svc-x"), request_id="all")
    )
    assert ok.done and ok.cancelled == 3


async def test_a_bulk_cancel_touches_only_the_callers_tenant(db_url: str, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    write_tokens(tokens)
    async with Harness(db_url, tokens_file=str(tokens)) as h:
        api = h.stubs()
        acme, umbrella = bearer(token("submitter", "acme")), bearer(token("submitter", "umbrella"))

        async def submit_as(md: Any, rid: str) -> str:
            request = j.SubmitJobRequest(request_id=rid, job=c.JobSpec(service="svc-t"))
            return (await api.jobs.SubmitJob(request, metadata=md)).job.id

        ours = [await submit_as(acme, f"t{i}") for i in range(4)]
        theirs = [await submit_as(umbrella, f"t{i}") for i in range(3)]
        request = j.CancelRunsRequest(filter=by_service("svc-t"), request_id="same-key")
        await expect_error(
            api.jobs.CancelRuns(request, metadata=bearer(token("reader", "umbrella"))),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        admin_dry = await api.jobs.CancelRuns(
            j.CancelRunsRequest(filter=by_service("svc-t"), dry_run=True),
            metadata=bearer(token("admin", "acme")),
        )
        assert admin_dry.matched == 7  # an admin's scope: every tenant
        done = await api.jobs.CancelRuns(request, metadata=umbrella)
        assert done.done and done.cancelled == 3
        # The same request id in another tenant is another operation.
        mine = await api.jobs.CancelRuns(request, metadata=acme)
        assert mine.done and mine.cancelled == 4 and mine.handled == 4
        for md, ids in ((acme, ours), (umbrella, theirs)):
            for job_id in ids:
                job = (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id), metadata=md)).job
                assert job.state == c.RUN_STATE_CANCELLED
                assert job.failure.reason == "Run cancelled by user"


async def test_cli_cancel_runs_shows_asks_and_cancels(sqlite_harness: Harness) -> None:
    from .procs import jobtrace

    api = sqlite_harness.stubs()
    ids = await submit_jobs(api, "svc-cli", 5, "cli")
    await submit_jobs(api, "svc-keep", 2, "keep")
    target = sqlite_harness.target

    code, out, _ = await jobtrace("cancel-runs", "--service", "svc-cli", "--dry-run", target=target)
    assert code == 0 and out.startswith("5 runs match and would be cancelled")
    code, out, _ = await jobtrace(
        "cancel-runs", "--service", "svc-cli", "--dry-run", "--json", target=target
    )
    dry = json.loads(out)
    assert dry["matched"] == "5" and len(dry["sample"]) == 5
    # Without --yes and no terminal to ask on: refused, nothing cancelled.
    code, _, err = await jobtrace("cancel-runs", "--service", "svc-cli", target=target)
    assert code == 2 and "pass --yes" in err
    assert await count_jobs(api, state=c.RUN_STATE_CANCELLED) == 0
    code, _, err = await jobtrace("cancel-runs", target=target)
    assert code == 2 and "needs at least one filter" in err

    code, out, err = await jobtrace(
        "cancel-runs",
        "--service",
        "svc-cli",
        "--state",
        "QUEUED",
        "--reason",
        "incident 9",
        "--yes",
        "--batch",
        "2",
        target=target,
    )
    assert code == 0, err
    assert "cancelled 5, skipped 0, failed 0" in out and ": done" in out
    for job_id in ids:
        job = (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id))).job
        assert job.state == c.RUN_STATE_CANCELLED and job.failure.reason == "incident 9"
    assert await count_jobs(api, service="svc-keep", state=c.RUN_STATE_QUEUED) == 2
    request_id = err.split()[1]
    code, out, _ = await jobtrace(
        "cancel-runs",
        "--service",
        "svc-cli",
        "--state",
        "QUEUED",
        "--reason",
        "incident 9",
        "--request-id",
        request_id,
        "--json",
        target=target,
    )
    again = json.loads(out)
    assert code == 0 and again["done"] and again["cancelled"] == "5" and "handled" not in again


async def test_interrupted_and_concurrent_calls_of_one_operation_cancel_each_run_once(
    harness: Harness,
) -> None:
    api = harness.stubs()
    ids = await submit_jobs(api, "svc-r", 120, "r")
    request = j.CancelRunsRequest(filter=by_service("svc-r"), request_id="op-r", page_size=10)
    # A call cut short by its deadline (wherever it was: answered not done,
    # or DEADLINE_EXCEEDED while a run was being cancelled) ...
    try:
        first = await api.jobs.CancelRuns(request, timeout=0.3)
        assert first.done or first.handled < 120
    except grpc.aio.AioRpcError as err:
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # ... then two calls of the same operation at once ...
    both = await asyncio.gather(api.jobs.CancelRuns(request), api.jobs.CancelRuns(request))
    assert all(r.done for r in both)
    # ... took every run once between them.
    final = await api.jobs.CancelRuns(request)
    assert (final.done, final.cancelled, final.skipped, final.failed) == (True, 120, 0, 0)
    assert await count_jobs(api, service="svc-r", state=c.RUN_STATE_CANCELLED) == 120
    events = await cancel_events(harness.db_url)
    assert {k: n for k, n in events.items() if k in set(ids)} == dict.fromkeys(ids, 1)


async def test_the_clients_cancel_runs_until_done(sqlite_harness: Harness) -> None:
    api = sqlite_harness.stubs()
    ids = await submit_jobs(api, "svc-py", 7, "py")
    await submit_jobs(api, "svc-py-other", 2, "pyo")
    async with Client(sqlite_harness.target) as jt:
        dry = await jt.cancel_runs(service="svc-py", states=["QUEUED"], dry_run=True)
        assert dry.matched == 7 and not dry.request_id
        # A request id of the client's own: its retries are the same operation.
        done = await jt.cancel_runs(service="svc-py", limit=3, until_done=True, reason="py")
        assert done.done and done.cancelled == 7 and done.request_id.startswith("bulk-")

    def sync_dry_run() -> int:
        with SyncClient(sqlite_harness.target) as sync:
            return sync.cancel_runs(
                kind="job", labels=None, service="svc-py-other", dry_run=True
            ).matched

    assert await asyncio.to_thread(sync_dry_run) == 2
    for job_id in ids:
        job = (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id))).job
        assert job.state == c.RUN_STATE_CANCELLED and job.failure.reason == "py"


async def test_an_operation_resumes_after_a_server_restart(db_url: str) -> None:
    async with Harness(db_url) as h:
        api = h.stubs()
        ids = await submit_jobs(api, "svc-restart", 40, "restart")
        request = j.CancelRunsRequest(
            filter=by_service("svc-restart"), request_id="op-restart", limit=15, page_size=4
        )
        first = await api.jobs.CancelRuns(request)
        assert (first.done, first.cancelled) == (False, 15)
        await h.stop()
        await h.start()
        api = h.stubs()
        request.limit = 0
        rest = await api.jobs.CancelRuns(request)
        assert (rest.done, rest.handled, rest.cancelled) == (True, 25, 40)
        events = await cancel_events(h.db_url)
        assert {k: n for k, n in events.items() if k in set(ids)} == dict.fromkeys(ids, 1)
