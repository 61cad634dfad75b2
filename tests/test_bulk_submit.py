"""Bulk submission (SubmitJobs, SubmitWorkflows) over a real server, both backends:
per-item results and idempotency, validation of the whole batch, one transaction,
dispatch to workers; the client's chunking and the CLI's --bulk."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from sqlalchemy.engine import make_url

from jobtrace.client import Client
from jobtrace.client.errors import InvalidArgument
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j

from .conftest import Harness, execute_sql, expect_error, wait_for
from .test_statements import _background, counting
from .workers import runtime_worker

COMPLETED = c.RUN_STATE_COMPLETED


def item(request_id: str, service: str = "bulk", **payload: object) -> j.SubmitJobRequest:
    body = struct_pb2.Struct()
    body.update(payload or {"n": request_id})
    return j.SubmitJobRequest(
        request_id=request_id,
        job=c.JobSpec(service=service, payload=body, labels={"batch": "b1"}),
        request_context=c.RequestContext(user_context=c.UserContext(user_id=f"u-{request_id}")),
    )


def workflow(request_id: str, steps: int = 2) -> j.SubmitWorkflowRequest:
    return j.SubmitWorkflowRequest(
        request_id=request_id,
        name="fan",
        steps=[
            c.WorkflowStepSpec(
                name=f"s{k}",
                job=c.JobSpec(service="bulk"),
                depends_on=[f"s{k - 1}"] if k else [],
            )
            for k in range(steps)
        ],
    )


async def count(db_url: str, sql: str) -> int:
    return int((await execute_sql(db_url, sql))[0][0])


async def test_a_thousand_jobs_with_duplicates_and_a_conflict_are_stored_and_run(
    db_url: str,
) -> None:
    async with Harness(db_url) as h:
        api = h.stubs()
        earlier = [(await api.jobs.SubmitJob(item(f"dup-{k}"))).job for k in range(3)]
        conflicting = (await api.jobs.SubmitJob(item("taken", n="first"))).job
        items = [item(f"b-{i}") for i in range(1000)]
        for at, job in zip((10, 500, 999), earlier, strict=True):
            items[at] = item(job.request_id)  # identical to the earlier submission
        items[42] = item("taken", n="another body")
        before = await count(db_url, "SELECT count(*) FROM jobs")
        t0 = asyncio.get_running_loop().time()
        results = (await api.jobs.SubmitJobs(j.SubmitJobsRequest(items=items))).results
        print("submit", asyncio.get_running_loop().time() - t0)

        assert len(results) == 1000
        for i, (sent, got) in enumerate(zip(items, results, strict=True)):
            if i == 42:
                assert not got.HasField("job")
                assert got.error.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
                assert got.error.reason == "IDEMPOTENCY_CONFLICT"
                assert got.error.metadata["existing_id"] == conflicting.id
                continue
            assert not got.HasField("error"), (i, got.error)
            assert got.job.request_id == sent.request_id
            assert got.job.spec.payload == sent.job.payload
            assert got.deduplicated == (i in (10, 500, 999))
        assert [results[i].job.id for i in (10, 500, 999)] == [e.id for e in earlier]
        new_ids = {r.job.id for i, r in enumerate(results) if i not in (10, 42, 500, 999)}
        assert len(new_ids) == 996
        # Exactly the new jobs were stored, each with its request id recorded.
        assert await count(db_url, "SELECT count(*) FROM jobs") == before + 996
        assert await count(db_url, "SELECT count(*) FROM submissions") == 4 + 996
        # Each with its own request context.
        assert (
            await count(db_url, "SELECT count(*) FROM jobs WHERE user_id = 'u-' || request_id")
            == before + 996
        )
        got = (await api.jobs.GetJob(j.GetJobRequest(job_id=results[7].job.id))).job
        assert got == results[7].job

        # Every job is dispatched and completed by a worker.
        async def run(job: Any) -> dict[str, Any]:
            return {"done": job.payload["n"]}

        async with runtime_worker(h.target, {"bulk": run}, max_concurrency=32):
            await wait_for(
                lambda: count(db_url, f"SELECT count(*) FROM jobs WHERE state = {COMPLETED}"),
                timeout=120,
            )

            async def all_done() -> bool:
                done = await count(db_url, f"SELECT count(*) FROM jobs WHERE state = {COMPLETED}")
                return done == before + 996

            t0 = asyncio.get_running_loop().time()
            await wait_for(all_done, timeout=120, interval=0.1)
            print("run", asyncio.get_running_loop().time() - t0)
        assert await count(db_url, "SELECT count(*) FROM jobs") == before + 996


async def test_one_bad_item_rejects_the_whole_batch_naming_every_violation(
    db_url: str,
) -> None:
    async with Harness(db_url) as h:
        api = h.stubs()
        await api.jobs.SubmitJob(item("seed"))
        before = (
            await count(db_url, "SELECT count(*) FROM jobs"),
            await count(db_url, "SELECT count(*) FROM submissions"),
        )
        items = [item(f"v-{i}") for i in range(40)]
        items[3].job.service = ""
        items[7].request_id = ""
        items[12].job.max_attempts = -1
        items[20].job.ClearField("payload")
        items[20].job.payload_json = b"[1, 2]"  # not a JSON object
        items[30] = item("twice", n="one")
        items[31] = item("twice", n="two")  # the same request id, another body
        _, _, violations = await expect_error(
            api.jobs.SubmitJobs(j.SubmitJobsRequest(items=items)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        fields = [f for f, _ in violations]
        assert "items[3].job.service" in fields
        assert "items[7].request_id" in fields
        assert "items[12].job.max_attempts" in fields
        assert "items[20].job.payload_json" in fields
        assert "items[30].request_id" in fields and "items[31].request_id" in fields
        assert all(
            f.startswith(("items[3]", "items[7]", "items[12]", "items[2", "items[3"))
            for f in fields
        )
        after = (
            await count(db_url, "SELECT count(*) FROM jobs"),
            await count(db_url, "SELECT count(*) FROM submissions"),
        )
        assert after == before, "nothing of the batch is stored"

        # Too many items, or none.
        _, _, violations = await expect_error(
            api.jobs.SubmitJobs(j.SubmitJobsRequest(items=[item(f"m-{i}") for i in range(1001)])),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [f for f, _ in violations] == ["items"]
        await expect_error(
            api.jobs.SubmitJobs(j.SubmitJobsRequest()), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert (await count(db_url, "SELECT count(*) FROM jobs")) == before[0]

        # The same request id twice with the same body: one job, both answered.
        same = [item("same"), item("other"), item("same")]
        results = (await api.jobs.SubmitJobs(j.SubmitJobsRequest(items=same))).results
        assert results[0].job.id == results[2].job.id != results[1].job.id
        assert [r.deduplicated for r in results] == [False, False, True]
        assert (await count(db_url, "SELECT count(*) FROM jobs")) == before[0] + 2
        # Sent again: every item deduplicated, nothing more stored.
        again = (await api.jobs.SubmitJobs(j.SubmitJobsRequest(items=same))).results
        assert [r.job.id for r in again] == [r.job.id for r in results]
        assert all(r.deduplicated for r in again)
        assert (await count(db_url, "SELECT count(*) FROM jobs")) == before[0] + 2


async def test_a_hundred_workflows_in_one_call_and_a_bad_one(db_url: str) -> None:
    async with Harness(db_url) as h:
        api = h.stubs()
        items = [workflow(f"wf-{i}") for i in range(100)]
        bad = list(items)
        bad[57] = workflow("wf-57")
        bad[57].steps[1].name = "bad name!"
        bad[88] = workflow("wf-88")
        bad[88].steps[0].job.service = ""
        _, _, violations = await expect_error(
            api.jobs.SubmitWorkflows(j.SubmitWorkflowsRequest(items=bad)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [f for f, _ in violations] == [
            "items[57].steps[1].name",
            "items[88].steps[0].job.service",
        ]
        assert await count(db_url, "SELECT count(*) FROM workflows") == 0
        assert await count(db_url, "SELECT count(*) FROM jobs") == 0
        await expect_error(
            api.jobs.SubmitWorkflows(
                j.SubmitWorkflowsRequest(items=[workflow(f"x-{i}", 1) for i in range(101)])
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )

        single = (await api.jobs.SubmitWorkflow(items[5])).workflow
        taken = (await api.jobs.SubmitJob(item("wf-9"))).job  # a job holds that request id
        results = (await api.jobs.SubmitWorkflows(j.SubmitWorkflowsRequest(items=items))).results
        assert len(results) == 100
        assert results[5].deduplicated and results[5].workflow.id == single.id
        assert results[9].error.reason == "IDEMPOTENCY_CONFLICT"
        assert results[9].error.metadata["existing_id"] == taken.id
        for i, r in enumerate(results):
            if i not in (5, 9):
                assert r.workflow.request_id == f"wf-{i}" and not r.deduplicated
                assert [s.name for s in r.workflow.steps] == ["s0", "s1"]
        assert await count(db_url, "SELECT count(*) FROM workflows") == 99
        assert await count(db_url, "SELECT count(*) FROM jobs") == 99 * 2 + 1

        async def run(job: Any) -> dict[str, Any]:
            return {}

        async with runtime_worker(h.target, {"bulk": run}, max_concurrency=16):

            async def all_done() -> bool:
                done = await count(
                    db_url, f"SELECT count(*) FROM workflows WHERE state = {COMPLETED}"
                )
                return done == 99

            await wait_for(all_done, timeout=120, interval=0.1)


async def test_a_bulk_insert_costs_a_few_statements_not_some_per_job(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with counting(db_url, monkeypatch) as (h, seen):
        api = h.stubs()
        await api.jobs.SubmitJob(item("warm"))
        await api.jobs.SubmitJobs(j.SubmitJobsRequest(items=[item("warm-bulk")]))
        mark = seen.mark()
        for i in range(20):
            await api.jobs.SubmitJob(item(f"one-{i}"))
        single = [s for s in seen.since(mark) if not _background(s)]
        mark = seen.mark()
        results = (
            await api.jobs.SubmitJobs(
                j.SubmitJobsRequest(items=[item(f"many-{i}") for i in range(1000)])
            )
        ).results
        bulk = [s for s in seen.since(mark) if not _background(s)]
    assert all(r.HasField("job") and not r.deduplicated for r in results)
    per_single = len(single) / 20
    per_bulk = len(bulk) / 1000
    print(f"\nstatements per job: single {per_single:.2f}, bulk {per_bulk:.3f}")
    # Looked up, recorded and stored in a few multi-row statements (and, on
    # PostgreSQL, the NOTIFYs that tell other replicas, 40 jobs a notice).
    bound = 0.05 if make_url(db_url).get_backend_name() == "postgresql" else 0.02
    assert per_bulk <= bound, bulk
    assert per_bulk * 20 < per_single


async def test_the_client_chunks_a_large_input_and_keeps_its_order(
    sqlite_harness: Harness,
) -> None:
    async with Client(sqlite_harness.target) as client:
        calls: list[int] = []
        stub = client.jobs_stub
        real = stub.SubmitJobs

        def counted(request: j.SubmitJobsRequest, **kw: Any) -> Any:
            calls.append(len(request.items))
            return real(request, **kw)

        stub.SubmitJobs = counted  # type: ignore[method-assign]
        items: list[Any] = [
            {"service": "bulk", "payload": {"i": i}, "request_id": f"c-{i}"} for i in range(2500)
        ]
        items[7] = {"request_id": "c-7", "job": {"service": "bulk", "payload": {"i": 7}}}
        seen: list[int] = []
        results = await client.submit_jobs(items, concurrency=3, on_progress=seen.append)
        assert sorted(calls) == [500, 1000, 1000]
        assert [r.job.request_id for r in results] == [f"c-{i}" for i in range(2500)]
        assert [r.job.spec.payload["i"] for r in results] == list(range(2500))
        assert seen[-1] == 2500 and not any(r.deduplicated for r in results)

        # A failed chunk names the caller's items, not the chunk's.
        calls.clear()
        bad: list[Any] = [{"service": "bulk", "request_id": f"d-{i}"} for i in range(2500)]
        bad[2100]["service"] = ""
        with pytest.raises(InvalidArgument) as caught:
            await client.submit_jobs(bad, chunk=1000, concurrency=1)
        assert [v.field for v in caught.value.violations] == ["items[2100].job.service"]
        assert caught.value.metadata["first_item"] == "2000"
        # Malformed input is refused before any call, by item.
        calls.clear()
        with pytest.raises(InvalidArgument) as caught:
            await client.submit_jobs([{"service": "bulk"}, {"servce": "bulk"}])
        assert caught.value.violations[0].field.startswith("items[1]")
        assert calls == []

        wfs = await client.submit_workflows(
            [
                {"name": "w", "steps": [{"name": "a", "job": {"service": "bulk"}}]}
                for _ in range(150)
            ]
        )
        assert len(wfs) == 150 and len({r.workflow.id for r in wfs}) == 150


async def test_cli_submits_a_jsonl_file_in_bulk(sqlite_harness: Harness, tmp_path: Path) -> None:
    from .procs import jobtrace

    path = tmp_path / "jobs.jsonl"
    lines = [
        json.dumps({"service": "bulk", "payload": {"i": i}, "request_id": f"cli-{i}"})
        for i in range(1500)
    ]
    path.write_text("\n".join(lines) + "\n")
    code, out, err = await jobtrace(
        "submit", "--bulk", str(path), "--json", target=sqlite_harness.target
    )
    assert code == 0, err
    summary = json.loads(out)
    assert (summary["submitted"], summary["new"], summary["deduplicated"]) == (1500, 1500, 0)
    assert [r["job"]["request_id"] for r in summary["results"]][:3] == ["cli-0", "cli-1", "cli-2"]
    assert "1500/1500 jobs" in err and "1500 new, 0 deduplicated, 0 refused" in err
    # Again, plain: every line deduplicated, one job id per line.
    code, out, err = await jobtrace("submit", "--bulk", str(path), target=sqlite_harness.target)
    assert code == 0 and len(out.split()) == 1500
    assert "0 new, 1500 deduplicated" in err
    # A bad line is named by its line number; nothing is sent.
    path.write_text(lines[0] + "\n" + json.dumps({"servce": "x"}) + "\nnot json\n")
    code, out, err = await jobtrace("submit", "--bulk", str(path), target=sqlite_harness.target)
    assert code != 0 and "line 3" in err
    path.write_text(lines[0] + "\n" + json.dumps({"servce": "x"}) + "\n")
    code, out, err = await jobtrace("submit", "--bulk", str(path), target=sqlite_harness.target)
    assert code != 0 and "line 2" in err, err


async def test_a_bulk_item_naming_an_unknown_rate_limit_is_refused_naming_it(
    sqlite_harness: Harness,
) -> None:
    """Bulk submission checks what SubmitJob checks in the database too: a
    rate limit the tenant does not have is named by item, nothing stored."""
    api = sqlite_harness.stubs()
    items = [item(f"rl-{i}") for i in range(3)]
    items[1].job.rate_limits.add(key="nope")
    _, _, violations = await expect_error(
        api.jobs.SubmitJobs(j.SubmitJobsRequest(items=items)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert [f for f, _ in violations] == ["items[1].job.rate_limits[0].key"]
    wf = workflow("rl-wf")
    wf.steps[1].job.rate_limits.add(key="nope")
    _, _, violations = await expect_error(
        api.jobs.SubmitWorkflows(j.SubmitWorkflowsRequest(items=[workflow("ok-wf"), wf])),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [f for f, _ in violations] == ["items[1].steps[1].job.rate_limits[0].key"]
    assert await count(sqlite_harness.db_url, "SELECT count(*) FROM jobs") == 0
