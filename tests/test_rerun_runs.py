"""RerunRuns, bulk reruns, through the real server on both backends: a dry
run counts and changes nothing; a real call stopped at its limit resumes by
its request id and reruns each matching run exactly once, with lineage and
trigger annotations (even when its progress is lost, or a rerun under a run's
key exists already); failed_only reruns a workflow's unfinished steps; live
states and bad requests are refused, leaving nothing stored."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2

from jobtrace.client import Client, SyncClient
from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, execute_sql, expect_error
from .test_security import bearer, token, write_tokens
from .workers import RawWorker

JOB = j.WatchRunsRequest.RUN_KIND_JOB
WORKFLOW = j.WatchRunsRequest.RUN_KIND_WORKFLOW


async def submit_jobs(api: Stubs, service: str, count: int, prefix: str) -> list[str]:
    spec = c.JobSpec(service=service, max_attempts=1)
    replies = await asyncio.gather(
        *(
            api.jobs.SubmitJob(j.SubmitJobRequest(request_id=f"{prefix}-{i}", job=spec))
            for i in range(count)
        )
    )
    return [r.job.id for r in replies]


async def submit_workflows(api: Stubs, name: str, count: int, prefix: str) -> list[str]:
    spec = c.JobSpec(service="wf-svc", max_attempts=1)
    replies = await asyncio.gather(
        *(
            api.jobs.SubmitWorkflow(
                j.SubmitWorkflowRequest(
                    request_id=f"{prefix}-{i}",
                    name=name,
                    steps=[
                        c.WorkflowStepSpec(name="a", job=spec),
                        c.WorkflowStepSpec(name="b", job=spec, depends_on=["a"]),
                    ],
                )
            )
            for i in range(count)
        )
    )
    return [r.workflow.id for r in replies]


async def work(raw: RawWorker, count: int, complete: set[str]) -> None:
    """Take `count` assignments: complete the workflow steps named in
    `complete`, fail every other job for good."""
    for _ in range(count):
        got = await raw.expect("assignment")
        if got.job.step_name in complete:
            await raw.send(
                complete=w.CompleteReport(
                    job_id=got.job.id, attempt=got.attempt, result=struct_pb2.Struct()
                )
            )
        else:
            await raw.send(
                fail=w.FailReport(
                    job_id=got.job.id, attempt=got.attempt, error=c.ErrorDetail(message="broke")
                )
            )
        await raw.expect("ack")


async def all_jobs(api: Stubs, **filters: Any) -> list[c.Job]:
    page = await api.jobs.ListJobs(j.ListJobsRequest(page_size=1000, **filters))
    assert not page.next_page_token
    return list(page.jobs)


async def all_workflows(api: Stubs, **filters: Any) -> list[c.Workflow]:
    page = await api.jobs.ListWorkflows(j.ListWorkflowsRequest(page_size=1000, **filters))
    assert not page.next_page_token
    return list(page.workflows)


async def trigger(api: Stubs, run_id: str) -> dict[str, str]:
    page = await api.attest.ListAnnotations(a.ListAnnotationsRequest(run_id=run_id))
    return {x.key: x.value.string_value for x in page.annotations if x.key.startswith("trigger.")}


async def test_bulk_rerun_dry_runs_resumes_and_reruns_each_run_once(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc-a", "svc-b"])
    a_ids = await submit_jobs(api, "svc-a", 30, "a")
    b_ids = await submit_jobs(api, "svc-b", 4, "b")
    await work(raw, 34, set())
    await raw.close()
    assert {x.state for x in await all_jobs(api)} == {c.RUN_STATE_FAILED}

    # A live state is refused, naming the states a rerun is taken from; so
    # are steps, and a request id leaving no room for the runs' keys.
    _, _, violations = await expect_error(
        api.jobs.RerunRuns(
            j.RerunRunsRequest(
                filter=j.BulkRunFilter(
                    service="svc-a",
                    states=[c.RUN_STATE_FAILED, c.RUN_STATE_RUNNING],
                    include_steps=True,
                ),
                request_id="x" * 192,
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    fields = dict(violations)
    assert set(fields) == {"filter.states[1]", "filter.include_steps", "request_id"}
    assert "never taken from RUNNING" in fields["filter.states[1]"]
    assert "FAILED" in fields["filter.states[1]"]
    await expect_error(api.jobs.RerunRuns(j.RerunRunsRequest()), grpc.StatusCode.INVALID_ARGUMENT)

    # A dry run counts and samples, and changes nothing.
    by_a = j.BulkRunFilter(service="svc-a")
    dry = await api.jobs.RerunRuns(
        j.RerunRunsRequest(filter=by_a, dry_run=True, reason="incident 9")
    )
    assert (dry.matched, len(dry.sample), dry.rerun, dry.request_id) == (30, 20, 0, "")
    assert {r.run_id for r in dry.sample} <= set(a_ids)
    assert all(r.state == c.RUN_STATE_FAILED and r.kind == JOB for r in dry.sample)
    assert not dry.reruns
    assert len(await all_jobs(api)) == 34

    # One run's rerun exists under its key already (an operation interrupted
    # after that rerun committed, or a RerunJob sent with the key).
    early = a_ids[7]
    prior = (
        await api.jobs.RerunJob(
            j.RerunJobRequest(job_id=early, request_id=f"op9/{early}", reason="incident 9")
        )
    ).job

    request = j.RerunRunsRequest(
        filter=by_a, reason="incident 9", request_id="op9", limit=10, page_size=4
    )
    first = await api.jobs.RerunRuns(request)
    assert (first.request_id, first.done, first.handled) == ("op9", False, 10)
    assert first.rerun + first.skipped == first.matched == 10 and first.failed == 0
    assert len(first.reruns) == first.rerun
    request.limit = 0
    rest = await api.jobs.RerunRuns(request)
    assert (rest.done, rest.handled, rest.matched, rest.failed) == (True, 20, 30, 0)
    assert (rest.rerun, rest.skipped) == (29, 1)
    assert dict(rest.skipped_reasons) == {"RERUN_EXISTS": 1}
    made = {r.run_id: r.new_run_id for r in [*first.reruns, *rest.reruns]}
    assert set(made) == set(a_ids) - {early} and len(set(made.values())) == 29
    assert all(r.kind == JOB for r in [*first.reruns, *rest.reruns])

    # Re-sent once done: nothing more. Its progress lost (the operation's
    # record wound back to the start): every rerun exists under its key.
    again = await api.jobs.RerunRuns(request)
    assert (again.done, again.handled, again.rerun, len(again.reruns)) == (True, 0, 29, 0)
    await execute_sql(
        harness.db_url,
        "UPDATE bulk_operations SET phase = 'jobs', cursor = NULL, state = 'running'"
        " WHERE request_id = :r",
        r="op9",
    )
    lost = await api.jobs.RerunRuns(request)
    assert (lost.done, lost.handled, lost.rerun, len(lost.reruns)) == (True, 30, 29, 0)
    assert dict(lost.skipped_reasons) == {"RERUN_EXISTS": 31}

    # Each matching run has exactly one rerun, with its lineage and request id.
    jobs = await all_jobs(api, service="svc-a")
    reruns = [x for x in jobs if x.parent_run_id]
    assert len(jobs) == 60
    assert Counter(x.parent_run_id for x in reruns) == dict.fromkeys(a_ids, 1)
    for x in reruns:
        assert x.root_run_id == x.parent_run_id and x.state == c.RUN_STATE_QUEUED
        assert x.request_id == f"op9/{x.parent_run_id}"
        if x.parent_run_id != early:
            assert made[x.parent_run_id] == x.id
    listed = await all_jobs(api, parent_run_id=a_ids[0])
    assert [x.id for x in listed] == [made[a_ids[0]]]
    assert [x.id for x in await all_jobs(api, parent_run_id=early)] == [prior.id]
    for old in (a_ids[0], a_ids[-1]):
        assert await trigger(api, made[old]) == {
            "trigger.source": "rerun",
            "trigger.reason": "incident 9",
            "trigger.parent_run_id": old,
            "trigger.actor.id": "anonymous",
        }
    # The other service's runs are untouched.
    others = await all_jobs(api, service="svc-b")
    assert {x.id for x in others} == set(b_ids)
    assert all(x.state == c.RUN_STATE_FAILED and not x.parent_run_id for x in others)
    # The same key for another operation is refused.
    _, info, _ = await expect_error(
        api.jobs.RerunRuns(j.RerunRunsRequest(filter=by_a, reason="other", request_id="op9")),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert info.reason == "IDEMPOTENCY_CONFLICT"


async def test_bulk_rerun_of_workflows_whole_or_failed_steps_only(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["wf-svc"])
    failed = await submit_workflows(api, "wf-x", 3, "f")
    await work(raw, 6, {"a"})  # a completes, b fails
    done = await submit_workflows(api, "wf-x", 1, "d")
    await work(raw, 2, {"a", "b"})
    await raw.close()
    states = {x.id: x.state for x in await all_workflows(api)}
    assert states == {**dict.fromkeys(failed, c.RUN_STATE_FAILED), done[0]: c.RUN_STATE_COMPLETED}

    by_name = j.BulkRunFilter(workflow_name="wf-x")
    request = j.RerunRunsRequest(
        filter=by_name, failed_only=True, reason="flaky b", request_id="wfop", page_size=2
    )
    result = await api.jobs.RerunRuns(request)
    assert (result.done, result.matched, result.rerun, result.failed) == (True, 4, 3, 0)
    assert dict(result.skipped_reasons) == {"NOTHING_TO_RERUN": 1}
    made = {r.run_id: r.new_run_id for r in result.reruns}
    assert set(made) == set(failed) and all(r.kind == WORKFLOW for r in result.reruns)
    for old in failed:
        (listed,) = await all_workflows(api, parent_run_id=old)
        assert listed.id == made[old]
        new = (await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=listed.id))).workflow
        assert new.root_run_id == old
        assert new.rerun_reason == "flaky b" and new.request_id == f"wfop/{old}"
        steps = {s.name: s for s in new.steps}
        # a is carried over from the failed run; only b runs again.
        assert steps["a"].state == c.RUN_STATE_COMPLETED and steps["a"].reused_from
        assert steps["b"].state == c.RUN_STATE_QUEUED and not steps["b"].reused_from
        assert (await trigger(api, new.id))["trigger.parent_run_id"] == old
    # The same key with failed_only changed is another operation: refused.
    request.failed_only = False
    await expect_error(api.jobs.RerunRuns(request), grpc.StatusCode.ALREADY_EXISTS)

    # Whole: every step runs again; only the ended runs are taken (the new
    # reruns above are live).
    whole = await api.jobs.RerunRuns(
        j.RerunRunsRequest(filter=by_name, request_id="whole", reason="all")
    )
    assert (whole.done, whole.rerun, whole.skipped) == (True, 4, 0)
    for r in whole.reruns:
        assert r.run_id in {*failed, *done}
        new = (await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=r.new_run_id))).workflow
        assert new.parent_run_id == r.run_id
        assert [s.reused_from for s in new.steps] == ["", ""]
    assert len(await all_workflows(api)) == 4 + 3 + 4


async def test_clients_and_cli_rerun_runs(sqlite_harness: Harness) -> None:
    from .procs import jobtrace

    api = sqlite_harness.stubs()
    target = sqlite_harness.target
    ids = await submit_jobs(api, "svc-cli", 5, "cli")
    keep = await submit_jobs(api, "svc-keep", 2, "keep")
    for job_id in [*ids, *keep]:
        await api.jobs.CancelJob(j.CancelJobRequest(job_id=job_id))

    code, out, _ = await jobtrace("rerun-runs", "--service", "svc-cli", "--dry-run", target=target)
    assert code == 0 and out.startswith("5 runs match and would be rerun"), out
    code, _, err = await jobtrace("rerun-runs", "--service", "svc-cli", target=target)
    assert code == 2 and "pass --yes" in err
    code, out, err = await jobtrace(
        "rerun-runs", "--service", "svc-cli", "--state", "RUNNING", "--yes", target=target
    )
    assert code != 0
    code, out, err = await jobtrace(
        "rerun-runs",
        "--service",
        "svc-cli",
        "--state",
        "CANCELLED",
        "--reason",
        "incident 3",
        "--yes",
        "--batch",
        "2",
        target=target,
    )
    assert code == 0, err
    assert "rerun 5, skipped 0, failed 0" in out and ": done" in out
    request_id = err.split()[1]
    code, out, _ = await jobtrace(
        "rerun-runs",
        "--service",
        "svc-cli",
        "--state",
        "CANCELLED",
        "--reason",
        "incident 3",
        "--request-id",
        request_id,
        "--json",
        target=target,
    )
    again = json.loads(out)
    assert code == 0 and again["done"] and again["rerun"] == "5" and "reruns" not in again
    reruns = [x for x in await all_jobs(api, service="svc-cli") if x.parent_run_id]
    assert sorted(x.parent_run_id for x in reruns) == sorted(ids)

    async with Client(target) as jt:
        dry = await jt.rerun_runs(service="svc-keep", states=["CANCELLED"], dry_run=True)
        assert dry.matched == 2 and not dry.request_id
        made = await jt.rerun_runs(service="svc-keep", limit=1, until_done=True, reason="py")
        assert made.done and made.rerun == 2 and made.request_id.startswith("bulk-")

    def sync_dry_run() -> int:
        with SyncClient(target) as sync:
            return sync.rerun_runs(kind="job", service="svc-keep", dry_run=True).matched

    # The reruns are QUEUED; their parents still match (ended, and counted).
    assert await asyncio.to_thread(sync_dry_run) == 2


async def test_a_bulk_rerun_touches_only_the_callers_tenant(db_url: str, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    write_tokens(tokens)
    async with Harness(db_url, tokens_file=str(tokens)) as h:
        api = h.stubs()
        acme, umbrella = bearer(token("submitter", "acme")), bearer(token("submitter", "umbrella"))

        async def ended_as(md: Any, rid: str) -> str:
            request = j.SubmitJobRequest(request_id=rid, job=c.JobSpec(service="svc-t"))
            job_id = (await api.jobs.SubmitJob(request, metadata=md)).job.id
            await api.jobs.CancelJob(j.CancelJobRequest(job_id=job_id), metadata=md)
            return job_id

        ours = [await ended_as(acme, f"t{i}") for i in range(4)]
        theirs = [await ended_as(umbrella, f"t{i}") for i in range(3)]
        cancelled = j.BulkRunFilter(service="svc-t", states=[c.RUN_STATE_CANCELLED])
        request = j.RerunRunsRequest(filter=cancelled, request_id="same-key")
        await expect_error(
            api.jobs.RerunRuns(request, metadata=bearer(token("reader", "acme"))),
            grpc.StatusCode.PERMISSION_DENIED,
        )
        mine = await api.jobs.RerunRuns(request, metadata=acme)
        assert (mine.done, mine.rerun) == (True, 4)
        assert {r.run_id for r in mine.reruns} == set(ours)
        # An admin's scope is every tenant; each new run is in its parent's.
        admin = await api.jobs.RerunRuns(
            j.RerunRunsRequest(filter=cancelled, request_id="admin-key"),
            metadata=bearer(token("admin", "acme")),
        )
        assert (admin.done, admin.rerun) == (True, 7)
        for r in admin.reruns:
            md = acme if r.run_id in ours else umbrella
            job = (await api.jobs.GetJob(j.GetJobRequest(job_id=r.new_run_id), metadata=md)).job
            assert job.parent_run_id == r.run_id and job.tenant == (
                "acme" if md is acme else "umbrella"
            )
        assert {r.run_id for r in admin.reruns} == {*ours, *theirs}
