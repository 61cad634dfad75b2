"""The README's Python snippets, run as written against a real server and the real worker runtime.

How a snippet is run, the only liberties taken with its text:
- the README's address "127.0.0.1:50051" is replaced by the test server's;
- top-level `await` / `async with` is compiled with `ast.PyCF_ALLOW_TOP_LEVEL_AWAIT`
  and awaited on the test's event loop (as the asyncio REPL does);
- a snippet that defines a worker and then uses a client is cut at its
  `async with Client(` line so the worker can be started in between (in the
  README they are two programs), and a closing `asyncio.run(worker.run())` is
  replaced by starting `worker.run()` as a task;
- names a snippet takes from an earlier one (`jt`, `wf`) are passed in, and
  `print` is captured.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import threading
from pathlib import Path
from typing import Any

from jobtrace.client import Client, job_result, workflow_outputs
from jobtrace.pb import common_pb2 as c

from .conftest import Harness, wait_for
from .workers import running

README = Path(__file__).resolve().parents[1] / "README.md"
README_TARGET = "127.0.0.1:50051"


def python_snippet(marker: str) -> str:
    """The first ```python block after the README line starting with `marker`
    (a heading or a lead-in sentence), within that section."""
    lines = README.read_text().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(marker)), None)
    assert start is not None, f"README has no line starting with {marker!r}"
    opening = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "```python")
    between = [line for line in lines[start + 1 : opening] if line.startswith("## ")]
    assert not between, f"no python snippet in README section {marker!r}"
    closing = next(i for i in range(opening + 1, len(lines)) if lines[i].strip() == "```")
    return "\n".join(lines[opening + 1 : closing]) + "\n"


def aimed_at(snippet: str, target: str) -> str:
    assert README_TARGET in snippet, f"the snippet no longer uses {README_TARGET}"
    return snippet.replace(README_TARGET, target)


def cut_at(snippet: str, prefix: str) -> tuple[str, str]:
    """The snippet before and from its first line starting with `prefix`."""
    lines = snippet.splitlines(keepends=True)
    at = next((i for i, line in enumerate(lines) if line.startswith(prefix)), None)
    assert at is not None, f"the snippet has no line starting with {prefix!r}"
    return "".join(lines[:at]), "".join(lines[at:])


async def run_snippet(source: str, namespace: dict[str, Any], name: str) -> None:
    """Execute README text in `namespace`, awaiting it if it awaits at top level."""
    code = compile(source, f"README.md ({name})", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    outcome = eval(code, namespace)  # the README's own text, compiled above
    if inspect.iscoroutine(outcome):
        await asyncio.wait_for(outcome, timeout=60)


async def test_readme_download_transcode_notify_retries_shows_progress_and_waits(
    harness: Harness,
) -> None:
    """ "Data between steps": download -> transcode (its first attempt crashes and
    is retried) -> notify, with the snippet's progress bar and outputs; then
    "Waiting for results" against the same server and workflow."""
    worker_part, client_part = cut_at(
        aimed_at(python_snippet("### Data between steps"), harness.target), "async with Client("
    )
    printed: list[tuple[Any, ...]] = []
    ns: dict[str, Any] = {"__name__": "readme", "print": lambda *a, **_k: printed.append(a)}
    await run_snippet(worker_part, ns, "Data between steps, worker")
    worker = ns["worker"]

    @worker.handler("resize")  # for "Waiting for results", which submits a resize job
    async def resize(ctx: Any) -> dict[str, Any]:
        return dict(ctx.payload)

    async with running(worker):
        await run_snippet(client_part, ns, "Data between steps, client")

        outputs = ns["outputs"]
        assert outputs == {"notify": {"sent_to": "a@example.com", "bytes": 524288}}
        assert type(outputs["notify"]["bytes"]) is int
        async with Client(harness.target) as jt:
            done = await jt.await_workflow(ns["wf"].id, timeout=5)
            assert done.state == c.RUN_STATE_COMPLETED
            assert [(s.name, s.attempt) for s in done.steps] == [
                ("download", 1),
                ("transcode", 2),
                ("notify", 1),
            ], "transcode's first attempt failed and was retried"

            # The progress bar: one line per update, the workflow's percent never
            # going back, each step's percent rising to 100, transcode's 50 seen.
            percents = [float(line[0].rstrip("%")) for line in printed]
            assert len(percents) >= 4, printed
            assert percents == sorted(percents), printed
            assert percents[0] < 100 and percents[-1] == 100, printed
            final_steps = printed[-1][1]
            assert final_steps == {"download": 100, "transcode": 100, "notify": 100}
            assert any(0 < line[1]["transcode"] < 100 for line in printed), printed

            waiting = python_snippet("Waiting for results")  # uses the open `jt` and `wf`
            wait_ns: dict[str, Any] = {"__name__": "readme", "jt": jt, "wf": ns["wf"]}
            await run_snippet(waiting, wait_ns, "Waiting for results")
        assert wait_ns["result"] == {"image": "cat.png", "width": 640}
        assert type(wait_ns["result"]["width"]) is int
        assert wait_ns["done"].state == c.RUN_STATE_COMPLETED
        assert job_result(wait_ns["done"]) == wait_ns["result"]
        assert wait_ns["wf_done"].state == c.RUN_STATE_COMPLETED
        assert workflow_outputs(wait_ns["wf_done"]) == outputs


async def test_readme_worker_handlers_fail_fast_and_see_a_cancel(harness: Harness) -> None:
    """The Workers section's handlers: download completes, or fails at once
    without retries on a bad payload; transcode (a plain def) is cancelled half
    way, sees the cancel in `ctx.wait_cancelled` and stops early."""
    snippet = aimed_at(python_snippet("## Workers"), harness.target)
    body, last = cut_at(snippet, "asyncio.run(worker.run())")
    assert last.strip().startswith("asyncio.run(worker.run())") and "\n" not in last.strip()
    ns: dict[str, Any] = {"__name__": "readme"}
    await run_snippet(body, ns, "Workers")
    worker = ns["worker"]
    assert worker.max_concurrency == 4

    readme_transcode = ns["transcode"]
    seen: dict[str, Any] = {}
    returned = threading.Event()

    def transcode(job: c.Job, ctx: Any) -> dict[str, Any]:  # the README's handler, observed
        result = readme_transcode(job, ctx)
        seen.update(result=result, cancelled=ctx.cancelled, reason=ctx.cancel_reason)
        returned.set()
        return result

    worker.handler("transcode")(transcode)

    async with running(worker), Client(harness.target) as jt:
        fetched = await jt.submit_job("download", {"url": "https://x/a.mov"})
        assert await jt.result(fetched.id, timeout=30) == {"path": "/data/a.mov"}

        bad = await jt.submit_job("download", {}, max_attempts=3)
        failed = await jt.await_job(bad.id, timeout=30)
        assert failed.state == c.RUN_STATE_FAILED
        assert failed.failure.code == "BAD_PAYLOAD"
        assert failed.attempt == 1, "NonRetryableError: no second attempt"

        job = await jt.submit_job("transcode", {"file": "a.mov"})
        async for snapshot in jt.watch_job(job.id):
            if snapshot.progress.percent >= 25:
                break
        assert not returned.is_set()
        await jt.cancel_job(job.id, reason="user changed their mind")
        await wait_for(returned.is_set, timeout=5)
        cancelled = await jt.await_job(job.id, timeout=5)

    assert seen["cancelled"] is True, "the handler saw the cancel"
    assert seen["result"] == {}, "it returned from inside its loop, before annotating"
    assert cancelled.state == c.RUN_STATE_CANCELLED
    assert cancelled.progress.percent < 75, "the cancel ended the wait, not the loop's end"
