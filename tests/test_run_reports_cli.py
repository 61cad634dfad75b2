"""`jobtrace trace summary` and `jobtrace trace export` as real processes, and
the client's export_trace, against a real server."""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jobtrace.cli.run_reports import CSV_COLUMNS
from jobtrace.client import Client, JobContext

from .conftest import Harness
from .procs import jobtrace
from .workers import runtime_worker

EVENTS = 3000


async def flaky_once(ctx: JobContext) -> dict[str, Any]:
    if ctx.job.step_name == "fetch" and ctx.job.attempt == 1:
        raise RuntimeError("mirror down")  # retryable: tried again
    await ctx.log(f"{ctx.job.step_name} working", milestone=True)
    return {"step": ctx.job.step_name}


async def _retried_workflow(target: str, request_id: str) -> str:
    async with Client(target) as jt:
        wf = await jt.submit_workflow(
            "render",
            [
                {
                    "name": "fetch",
                    "job": {
                        "service": "demo",
                        "max_attempts": 3,
                        "backoff": {"initial_interval": "0.001s"},
                    },
                },
                {"name": "encode", "job": {"service": "demo"}, "depends_on": ["fetch"]},
            ],
            request_id=request_id,
        )
        await jt.outputs(wf.id, timeout=30)
        return wf.id


async def test_trace_summary_prints_a_table_or_json(sqlite_harness: Harness) -> None:
    target = sqlite_harness.target
    async with runtime_worker(target, {"demo": flaky_once}):
        older = await _retried_workflow(target, "r1")
        newest = await _retried_workflow(target, "r2")
    code, out, err = await jobtrace("trace", "summary", newest, "--json", target=target)
    assert code == 0, err
    summary = json.loads(out)["summary"]
    assert summary["run_id"] == newest and summary["workflow_name"] == "render"
    steps = {n["node_id"]: n for n in summary["nodes"]}
    assert (steps["fetch"]["attempts"], steps["fetch"]["failures"]) == (2, 1)
    assert steps["encode"]["attempts"] == 1 and "failures" not in steps["encode"], "0: left out"
    assert int(summary["total_events"]) == int(summary["status"]["history_length"])

    code, out, err = await jobtrace("trace", "summary", newest, target=target)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"run {newest} (workflow render): COMPLETED"
    header = next(i for i, line in enumerate(lines) if line.startswith("NODE"))
    assert lines[header].split() == [
        "NODE", "STEP", "STATE", "ATTEMPTS", "FAILURES", "EVENTS", "ERRORS", "FIRST", "LAST",
        "DURATION",
    ]  # fmt: skip
    fetch = lines[header + 1].split()
    assert fetch[:5] == ["fetch", "1", "COMPLETED", "2", "1"]
    milestones = int(summary["total_milestones"])
    assert f"milestones ({milestones} of {milestones}):" in out
    assert "fetch: fetch working" in out and "encode: encode working" in out

    code, out, err = await jobtrace(
        "trace", "summary", "--workflow-name", "render", "--recent", "5", "--json", target=target
    )
    assert code == 0, err
    response = json.loads(out)
    assert response["summary"]["run_id"] == newest
    assert [r["run_id"] for r in response["recent_runs"]] == [older]
    code, out, _ = await jobtrace("trace", "summary", "--workflow-name", "render", target=target)
    assert code == 0 and "earlier runs of render:" in out and older in out

    code, _, err = await jobtrace("trace", "summary", target=target)
    assert code == 2 and "give a RUN id or --workflow-name NAME" in err
    code, _, err = await jobtrace(
        "trace", "summary", "--workflow-name", "render", "--recent", "101", target=target
    )
    assert code == 2 and "recent_runs" in err and "Traceback" not in err
    code, _, err = await jobtrace("trace", "summary", "wf_nope", target=target)
    assert code == 2 and "not found" in err


def _event(i: int) -> dict[str, Any]:
    # Text that CSV must quote, and JSON data, on some events.
    message = f"event {i}" if i % 7 else f'event {i}, with "quotes",\na newline and ü'
    return {
        "message": message,
        "node_id": f"n{i % 3}",
        "level": "LEVEL_WARN" if i % 10 == 0 else "LEVEL_INFO",
        "milestone": i % 500 == 0,
        "data": {"i": i, "tags": ["a", "b"]} if i % 2 else None,
    }


async def _long_run(target: str) -> str:
    async with Client(target) as jt:
        job = await jt.submit_job("nobody", {}, request_id="long")
        for start in range(0, EVENTS, 1000):
            await jt.append_trace_events(
                job.id,
                [
                    {k: v for k, v in _event(i).items() if v is not None}
                    for i in range(start, start + 1000)
                ],
            )
        return job.id


async def test_trace_export_writes_every_event_in_order(
    sqlite_harness: Harness, tmp_path: Path
) -> None:
    target = sqlite_harness.target
    run_id = await _long_run(target)
    jsonl, table = tmp_path / "run.jsonl", tmp_path / "run.csv"
    code, _, err = await jobtrace(
        "trace", "export", run_id, "--format", "jsonl", "-o", str(jsonl), target=target
    )
    assert code == 0 and f"wrote {EVENTS} events" in err, err
    lines = jsonl.read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in lines]
    assert [int(e["sequence"]) for e in events] == list(range(1, EVENTS + 1))
    for i, e in enumerate(events):
        want = _event(i)
        assert e["message"] == want["message"] and e["node_id"] == want["node_id"]
        assert e.get("data") == want["data"], "each event whole (FULL view)"

    code, _, err = await jobtrace(
        "trace",
        "export",
        run_id,
        "--format",
        "csv",
        "-o",
        str(table),
        "--page-size",
        "250",
        target=target,
    )
    assert code == 0, err
    with table.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        assert tuple(next(reader)) == CSV_COLUMNS
        rows = [dict(zip(CSV_COLUMNS, row, strict=True)) for row in reader]
    assert [int(r["sequence"]) for r in rows] == list(range(1, EVENTS + 1))
    for i, r in enumerate(rows):
        want = _event(i)
        assert r["run_id"] == run_id and r["message"] == want["message"]
        assert r["level"] == ("WARN" if i % 10 == 0 else "INFO") and r["type"] == "LOG"
        assert r["milestone"] == ("true" if want["milestone"] else "false")
        assert (json.loads(r["data"]) if r["data"] else None) == want["data"]
        assert datetime.fromisoformat(r["timestamp"]).tzinfo is not None, "RFC 3339, with zone"
    assert rows[0]["timestamp"] == events[0]["timestamp"]

    code, out, err = await jobtrace(
        "trace", "export", run_id, "--format", "csv", "-o", "-", target=target
    )
    assert code == 0 and err == ""
    assert out == table.read_text(encoding="utf-8"), "stdout gets the same bytes"
    assert len(list(csv.reader(io.StringIO(out)))) == EVENTS + 1

    missing = tmp_path / "missing.csv"
    code, _, err = await jobtrace("trace", "export", "job_nope", "-o", str(missing), target=target)
    assert code == 2 and "not found" in err and not missing.exists()


async def test_client_export_trace_reads_page_by_page(harness: Harness) -> None:
    run_id = await _long_run(harness.target)
    async with Client(harness.target) as jt:
        calls = 0
        list_page = jt.list_trace_events

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return await list_page(*args, **kwargs)

        jt.list_trace_events = counted  # type: ignore[method-assign]
        events = jt.export_trace(run_id, page_size=400)
        first = await anext(events)
        assert first.sequence == 1 and calls == 1, "one page asked for, not the run"
        rest = [e.sequence async for e in events]
    assert [first.sequence, *rest] == list(range(1, EVENTS + 1))
    assert calls == -(-EVENTS // 400)
