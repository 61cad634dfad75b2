"""The web console in a real browser: Debian's Chromium driven by Playwright
(headless), against a real server (SQLite) with its HTTP listener and a real
worker runtime. One server, worker and browser page for the whole module.

Where no Chromium (or no Playwright) is installed these tests are skipped
with the reason, unless JOBTRACE_REQUIRE_BROWSER=1 (as .ci/run sets), which
makes them fail. JOBTRACE_SCREENSHOT=docs/console.png saves the README's
screenshot of a run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from jobtrace.client.worker import JobContext, Worker
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t

from .conftest import Harness, Stubs, wait_for
from .test_security import ISSUER, SECRET, bearer, make_jwt, token, write_tokens
from .workers import running, runtime_worker

# One shared server, worker and browser for the module: keep its tests on one
# xdist worker (make test runs in parallel).
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.xdist_group("browser")]

# Generous deadlines: a browser on a loaded CI machine.
DEADLINE_MS = 15_000
# The server ends every EventSource stream after this long; the page's
# EventSource reconnects with Last-Event-ID (Chromium waits about 3 s first).
SSE_MAX_STREAM_S = 2.0
# The heartbeat interval of the module's server (seconds).
FLEET_TICK_S = 1.0


def browser_problem() -> str:
    """'' when a Chromium and Playwright are there, else why not."""
    if shutil.which("chromium") is None:
        return "no Chromium on PATH (apt-get install chromium chromium-driver)"
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[dev]')"
    return ""


@dataclass
class Console:
    harness: Harness
    api: Stubs
    page: Any
    base: str
    gates: dict[str, asyncio.Event]
    cancels: dict[str, str] = field(default_factory=dict)  # job id -> the worker's cancel reason
    errors: list[str] = field(default_factory=list)

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    def assert_no_errors(self) -> None:
        assert self.errors == [], "the page logged errors:\n" + "\n".join(self.errors)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    """One headless Chromium for the module (Debian's, never Playwright's own)."""
    problem = browser_problem()
    if problem:
        if os.environ.get("JOBTRACE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"JOBTRACE_REQUIRE_BROWSER=1 but {problem}")
        pytest.skip(problem)
    from playwright.async_api import async_playwright, expect

    # The deadline of every expect() too (Playwright's default is 5 s).
    expect.set_options(timeout=DEADLINE_MS)
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=shutil.which("chromium"), headless=True)
        try:
            yield chromium
        finally:
            await chromium.close()


@contextlib.asynccontextmanager
async def console_on(
    browser: Any, db: Path, worker_token: str | None = None, **settings: Any
) -> AsyncIterator[Console]:
    """A server with its HTTP listener, a worker runtime serving console.step
    (progress, trace lines, then a gate the test opens) and console.hold (runs
    until cancelled, recording what its worker was told), and a fresh page."""
    harness = Harness(f"sqlite+aiosqlite:///{db}", http_listen="127.0.0.1:0", **settings)
    await harness.start()
    gates: dict[str, asyncio.Event] = {}
    cancels: dict[str, str] = {}

    async def step(ctx: JobContext) -> dict[str, Any]:
        name = str(ctx.payload.get("gate", ctx.job.step_name))
        await ctx.progress(40, f"{name}: half way")
        await ctx.log(
            f"{name}: started work", category="business", user_message=f"{name} is running"
        )
        await ctx.log(f"{name}: technical detail", level="debug", category="technical")
        await gates.setdefault(name, asyncio.Event()).wait()
        await ctx.log(f"{name}: done", category="business", milestone=True)
        return {"step": name}

    async def hold(ctx: JobContext) -> dict[str, Any]:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if ctx.cancelled:
                cancels[ctx.job_id] = ctx.cancel_reason
            raise
        return {}

    worker = Worker(
        harness.target, worker_id="console-worker", reconnect_initial=0.05, token=worker_token
    )
    worker.handler("console.step")(step)
    worker.handler("console.hold")(hold)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(harness.stop)
        await stack.enter_async_context(running(worker))
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        stack.push_async_callback(context.close)
        page = await context.new_page()
        page.set_default_timeout(DEADLINE_MS)
        state = Console(
            harness=harness,
            api=harness.stubs(),
            page=page,
            base=harness.http_url,
            gates=gates,
            cancels=cancels,
        )
        page.on(
            "console", lambda m: m.type == "error" and state.errors.append(f"console: {m.text}")
        )
        page.on("pageerror", lambda e: state.errors.append(f"pageerror: {e}"))
        try:
            yield state
        finally:
            for gate in gates.values():
                gate.set()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def console(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Console]:
    db = tmp_path_factory.mktemp("console") / "jobtrace.db"
    # Heartbeats each second: the fleet registry (the Workers page) takes a
    # worker's changes at most once per heartbeat interval.
    async with console_on(
        browser, db, http_max_stream_seconds=SSE_MAX_STREAM_S, heartbeat_seconds=FLEET_TICK_S
    ) as state:
        yield state


async def submit_workflow(api: Stubs, rid: str) -> c.Workflow:
    """fetch -> (parse, index) -> publish: each step opens at its own gate."""

    def step(name: str, *after: str) -> c.WorkflowStepSpec:
        spec = c.JobSpec(service="console.step")
        spec.payload.update({"gate": f"{rid}.{name}"})
        return c.WorkflowStepSpec(name=name, job=spec, depends_on=list(after))

    response = await api.jobs.SubmitWorkflow(
        j.SubmitWorkflowRequest(
            request_id=rid,
            name="nightly-report",
            steps=[
                step("fetch"),
                step("parse", "fetch"),
                step("index", "fetch"),
                step("publish", "parse", "index"),
            ],
            labels={"team": "data"},
            request_context=c.RequestContext(
                user_context=c.UserContext(user_id="u-42", display_name="Ada"),
            ),
        )
    )
    return response.workflow


async def test_console_loads_without_errors(console: Console) -> None:
    from playwright.async_api import expect

    page = console.page
    response = await page.goto(console.base + "/")
    assert response is not None and response.ok
    assert "default-src 'none'" in (response.headers.get("content-security-policy") or "")
    await expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible()
    await expect(page.locator("#live-status")).to_have_text("● live")
    await expect(page.locator("#history-runs")).to_be_attached()
    # Workers: the listener serves the fleet reads (features.json lists them),
    # and the module's worker is there.
    await page.get_by_role("link", name="Workers").click()
    await expect(page.locator("#workers-status")).to_have_text("● live")
    await expect(page.locator('#workers tr[data-worker="console-worker"]')).to_contain_text(
        "console.hold"
    )
    await page.get_by_role("link", name="Runs", exact=True).click()
    await expect(page.locator("#live-status")).to_have_text("● live")
    console.assert_no_errors()


async def test_a_workflow_appears_live_and_its_progress_moves(console: Console) -> None:
    from playwright.async_api import expect

    page = console.page
    # A mark that a reload would wipe: the list must change without one.
    await page.evaluate("window.__noReload = true")
    workflow = await submit_workflow(console.api, "wf-live")
    row = page.locator(f'#live-runs tr[data-run-id="{workflow.id}"]')
    await expect(row).to_be_visible()
    await expect(row.locator("progress")).to_have_attribute("value", "0")
    console.gate("wf-live.fetch").set()
    # 1 of 4 steps completed: the workflow's bar moves to 25.
    await expect(row.locator("progress")).to_have_attribute("value", "25")
    await expect(row.locator("[data-state]")).to_have_attribute("data-state", "RUNNING")
    assert await page.evaluate("window.__noReload === true")
    # Filtered to running runs, the list drops the run once it leaves RUNNING.
    await page.get_by_label("State").select_option("RUNNING")
    await page.get_by_role("button", name="Apply filters").click()
    await expect(row).to_be_visible()
    for name in ("parse", "index", "publish"):
        console.gate(f"wf-live.{name}").set()
    await expect(row).to_have_count(0)
    await page.get_by_role("button", name="Clear").click()
    await expect(page.locator("#history-runs tr").first).to_be_visible()
    history = page.locator(f'#history-runs tr[data-run-id="{workflow.id}"]')
    await expect(history.locator("[data-state]")).to_have_attribute("data-state", "COMPLETED")
    await expect(history.locator("progress")).to_have_attribute("value", "100")
    assert await page.evaluate("window.__noReload === true")
    console.assert_no_errors()


async def test_a_run_shows_its_graph_and_its_trace_streams_in(console: Console) -> None:
    from playwright.async_api import expect

    page = console.page
    workflow = await submit_workflow(console.api, "wf-trace")
    await page.goto(f"{console.base}/#/runs/{workflow.id}")
    nodes = page.locator("#steps .node")
    await expect(nodes).to_have_count(4)
    # Layered by dependency depth: fetch, then parse and index, then publish.
    layers = page.locator("#steps .layer")
    await expect(layers).to_have_count(3)
    await expect(layers.nth(1).locator(".node")).to_have_count(2)
    await expect(page.locator('#steps .node[data-step="publish"] .node-deps')).to_have_text(
        "after parse, index"
    )
    await expect(page.locator('#steps .node[data-step="fetch"]')).to_have_attribute(
        "data-state", "RUNNING"
    )
    # The first step's trace lines arrive while it runs.
    lines = page.locator("#trace-lines li:not([hidden])")
    await expect(lines.filter(has_text="wf-trace.fetch is running")).to_have_count(1)
    # The business audience hides the technical lines; the level filter debug ones.
    await expect(lines.filter(has_text="technical detail")).to_have_count(1)
    await page.get_by_label("technical", exact=True).check()
    await expect(lines.filter(has_text="wf-trace.fetch is running")).to_have_count(0)
    await page.get_by_label("business", exact=True).check()
    await expect(lines.filter(has_text="technical detail")).to_have_count(0)
    await page.get_by_label("all", exact=True).check()

    for name in ("fetch", "parse", "index", "publish"):
        console.gate(f"wf-trace.{name}").set()
        await expect(page.locator(f'#steps .node[data-step="{name}"]')).to_have_attribute(
            "data-state", "COMPLETED"
        )
    await expect(page.locator("#run-summary [data-state]").first).to_have_attribute(
        "data-state", "COMPLETED"
    )
    await expect(lines.filter(has_text="wf-trace.publish: done")).to_have_count(1)
    # The final status event closes the stream; the page does not reconnect.
    await expect(page.locator("#trace-status")).to_contain_text("run ended")
    await page.get_by_label("Milestones only").check()
    milestones = await lines.count()
    assert milestones >= 4, "each step's 'done' line is a milestone"
    await expect(lines.filter(has_text="technical detail")).to_have_count(0)
    await page.get_by_label("Milestones only").uncheck()
    # Attempts and durations on the nodes; the step's detail on selection.
    await expect(page.locator('#steps .node[data-step="publish"] .node-meta')).to_contain_text(
        "attempt 1"
    )
    await page.locator('#steps .node[data-step="parse"]').click()
    await expect(page.locator("#step-detail")).to_contain_text("Step parse")
    await expect(page.locator("#step-detail")).to_contain_text("console-worker")
    await expect(page.locator("#step-detail")).to_contain_text('"gate": "wf-trace.parse"')
    stats = await page.evaluate("window.jobtraceConsole.trace")
    assert stats["duplicates"] == 0, stats
    console.assert_no_errors()


async def test_an_attestation_verifies_and_its_envelope_downloads(console: Console) -> None:
    from playwright.async_api import expect

    # The run the graph test drove (submitted again: the same run, by its
    # request id; or anew if this module's server is a fresh one), completed,
    # opened on its own page: this test does not lean on the one before.
    workflow = await submit_workflow(console.api, "wf-trace")
    for name in ("fetch", "parse", "index", "publish"):
        console.gate(f"wf-trace.{name}").set()

    async def completed() -> bool:
        return (await get_workflow(console.api, workflow.id)).state == c.RUN_STATE_COMPLETED

    await wait_for(completed, timeout=30)
    page = console.page
    await page.goto(f"{console.base}/#/runs/{workflow.id}")
    key_prefix = "workflow-completion:"
    row = page.locator(f'#attestations tr[data-key^="{key_prefix}"]')
    await expect(row).to_have_count(1)
    await row.get_by_role("button", name="Verify").click()
    verdict = row.locator(".verdict")
    await expect(verdict).to_have_attribute("data-valid", "true")
    await expect(verdict).to_contain_text("✓ valid")
    await expect(verdict).to_contain_text("signature ✓")
    await row.get_by_role("button", name="DSSE envelope").click()
    link = row.locator(".download a")
    await expect(link).to_have_attribute(
        "download", re.compile(r"^workflow-completion_wf_\S+\.dsse\.json$")
    )
    envelope = await page.evaluate(
        "async (href) => (await fetch(href)).json()", await link.get_attribute("href")
    )
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert envelope["payload"] and envelope["signatures"][0]["sig"]
    # The request context as attested (redacted by the server).
    await expect(page.locator("#context")).to_contain_text('"user_id": "u-42"')
    # Screenshot for the README, only when asked (test runs leave the tree clean).
    target = os.environ.get("JOBTRACE_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        await page.evaluate("window.scrollTo(0, 0)")
        await page.screenshot(path=target, full_page=False)
    console.assert_no_errors()


async def submit_hold(api: Stubs, rid: str) -> c.Job:
    response = await api.jobs.SubmitJob(
        j.SubmitJobRequest(request_id=rid, job=c.JobSpec(service="console.hold"))
    )
    return response.job


async def test_a_cancel_from_the_console_reaches_the_worker(console: Console) -> None:
    from playwright.async_api import expect

    page = console.page
    job = await submit_hold(console.api, "job-cancel")
    await page.goto(f"{console.base}/#/runs/{job.id}")
    await expect(page.locator("#run-summary [data-state]").first).to_have_attribute(
        "data-state", "RUNNING"
    )
    await page.get_by_label("Reason").fill("stopped by the browser test")
    await page.locator("#run-actions").get_by_role("button", name="Cancel").click()
    await wait_for(lambda: job.id in console.cancels, timeout=DEADLINE_MS / 1000)
    assert console.cancels[job.id] == "stopped by the browser test"
    await expect(page.locator("#run-summary [data-state]").first).to_have_attribute(
        "data-state", "CANCELLED"
    )
    # A terminal run offers no cancel any more.
    await expect(page.locator('#run-actions [data-action="cancel"]')).to_have_count(0)
    console.assert_no_errors()


async def test_the_trace_resumes_with_last_event_id_after_the_server_drops_it(
    console: Console,
) -> None:
    from playwright.async_api import expect

    page = console.page
    job = await submit_hold(console.api, "job-resume")
    await page.goto(f"{console.base}/#/runs/{job.id}")
    await wait_for(lambda: console.harness.server is not None)

    async def append(first: int, count: int) -> None:
        events = [
            c.TraceEvent(message=f"line {n}", event_key=f"resume-{n}", category=c.CATEGORY_BUSINESS)
            for n in range(first, first + count)
        ]
        await console.api.trace.AppendTraceEvents(
            t.AppendTraceEventsRequest(run_id=job.id, events=events)
        )

    lines = page.locator("#trace-lines li")
    await append(1, 3)
    await expect(lines.nth(3)).to_be_attached()  # STARTED and the 3 lines
    # The server ends the stream after SSE_MAX_STREAM_S; EventSource reconnects
    # by itself, sending Last-Event-ID.
    await wait_for(lambda: opens(page, 2), timeout=DEADLINE_MS / 1000, interval=0.05)
    await append(4, 3)
    await expect(lines.filter(has_text="line 6")).to_have_count(1)
    # And once more, across a second drop.
    await wait_for(lambda: opens(page, 3), timeout=DEADLINE_MS / 1000, interval=0.05)
    await append(7, 2)
    await expect(lines.filter(has_text="line 8")).to_have_count(1)
    sequences = [
        int(s) for s in await lines.evaluate_all("els => els.map(e => e.dataset.sequence)")
    ]
    assert sequences == list(range(1, len(sequences) + 1)), "no gap and no repeat across reconnects"
    stats = await page.evaluate("window.jobtraceConsole.trace")
    assert stats["duplicates"] == 0, f"the server replayed events already seen: {stats}"
    messages = await lines.evaluate_all("els => els.map(e => e.textContent)")
    assert [n for n in range(1, 9) if any(f"line {n}" in m for m in messages)] == list(range(1, 9))
    await console.api.jobs.CancelJob(j.CancelJobRequest(job_id=job.id))
    console.assert_no_errors()


async def test_phone_width_has_no_horizontal_scroll(console: Console) -> None:
    from playwright.async_api import expect

    page = console.page
    workflow = await submit_workflow(console.api, "wf-phone")
    await page.set_viewport_size({"width": 375, "height": 740})
    try:
        await page.goto(f"{console.base}/#/runs")
        await expect(page.locator(f'#live-runs tr[data-run-id="{workflow.id}"]')).to_be_visible()
        await expect(page.locator("#history-runs tr").first).to_be_visible()
        assert await no_horizontal_scroll(page), "the run list scrolls sideways at 375 px"
        await page.goto(f"{console.base}/#/runs/{workflow.id}")
        await expect(page.locator("#steps .node")).to_have_count(4)
        await expect(page.locator("#trace-lines li").first).to_be_visible()
        assert await no_horizontal_scroll(page), "the run view scrolls sideways at 375 px"
        # Keyboard: the step nodes are buttons reachable with Tab and Enter.
        await page.locator('#steps .node[data-step="fetch"]').focus()
        await page.keyboard.press("Enter")
        await expect(page.locator("#step-detail")).to_contain_text("Step fetch")
    finally:
        for name in ("fetch", "parse", "index", "publish"):
            console.gate(f"wf-phone.{name}").set()
        await page.set_viewport_size({"width": 1280, "height": 800})
    assert await no_horizontal_scroll(page)
    console.assert_no_errors()


async def test_the_workers_page_shows_a_worker_and_what_it_holds_live(console: Console) -> None:
    from playwright.async_api import expect

    page = console.page
    await page.goto(f"{console.base}/#/workers")
    await expect(page.locator("#workers-status")).to_have_text("● live", timeout=DEADLINE_MS)
    await expect(page.locator('#workers tr[data-worker="console-worker"]')).to_be_visible(
        timeout=DEADLINE_MS
    )
    # A mark that a reload would wipe: the page must change without one.
    await page.evaluate("window.__noReload = true")
    release = asyncio.Event()

    async def fleet(ctx: JobContext) -> dict[str, Any]:
        await release.wait()
        return {"done": True}

    row = page.locator('#workers tr[data-worker="fleet-worker"]')
    try:
        async with runtime_worker(
            console.harness.target,
            {"console.fleet": fleet},
            worker_id="fleet-worker",
            max_concurrency=2,
            labels={"pool": "browser"},
        ):
            # It connects: its row appears, with its services, labels and slots.
            await expect(row).to_be_visible(timeout=DEADLINE_MS)
            await expect(row).to_contain_text("console.fleet", timeout=DEADLINE_MS)
            await expect(row).to_contain_text("pool=browser", timeout=DEADLINE_MS)
            await expect(row).to_contain_text("2 of 2 slots free", timeout=DEADLINE_MS)
            await expect(row).to_contain_text("nothing", timeout=DEADLINE_MS)
            # A job it runs shows in its held list while it runs.
            job = (
                await console.api.jobs.SubmitJob(
                    j.SubmitJobRequest(
                        request_id="fleet-held", job=c.JobSpec(service="console.fleet")
                    )
                )
            ).job
            held = row.locator(f'a[href="#/runs/{job.id}"]')
            await expect(held).to_be_visible(timeout=DEADLINE_MS)
            await expect(row).to_contain_text("attempt 1", timeout=DEADLINE_MS)
            await expect(row).to_contain_text("1 of 2 slots free", timeout=DEADLINE_MS)
            # Done: the worker holds nothing again and counts it.
            release.set()
            await expect(held).to_have_count(0, timeout=DEADLINE_MS)
            await expect(row).to_contain_text("nothing", timeout=DEADLINE_MS)
            await expect(row).to_contain_text("1 done", timeout=DEADLINE_MS)
        # Disconnected: its row goes.
        await expect(row).to_have_count(0, timeout=DEADLINE_MS)
    finally:
        release.set()
    await expect(page.locator('#workers tr[data-worker="console-worker"]')).to_be_visible(
        timeout=DEADLINE_MS
    )
    assert await page.evaluate("window.__noReload === true")
    console.assert_no_errors()


# ---- operator actions on a workflow: approve and reject a gate, pause and
# resume, terminate, rerun (each button against the real RPC).


async def submit_gated(api: Stubs, rid: str, *, job_step: bool = True) -> c.Workflow:
    """build (a console.step the test opens at gate `<rid>.build`) -> review
    (an approval gate any reviewer may decide)."""
    steps = []
    if job_step:
        spec = c.JobSpec(service="console.step")
        spec.payload.update({"gate": f"{rid}.build"})
        steps.append(c.WorkflowStepSpec(name="build", job=spec))
    steps.append(
        c.WorkflowStepSpec(
            name="review",
            approval=c.ApprovalGate(approvers=["role:reviewer"]),
            depends_on=["build"] if job_step else [],
        )
    )
    response = await api.jobs.SubmitWorkflow(
        j.SubmitWorkflowRequest(request_id=rid, name="gated-release", steps=steps)
    )
    return response.workflow


async def get_workflow(api: Stubs, workflow_id: str) -> c.Workflow:
    response = await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=workflow_id))
    return response.workflow


async def in_state(api: Stubs, workflow_id: str, state: int) -> bool:
    return (await get_workflow(api, workflow_id)).state == state


def summary_state(page: Any) -> Any:
    return page.locator("#run-summary [data-state]").first


async def open_waiting_gate(
    console: Console, rid: str, *, from_summary: bool = False
) -> c.Workflow:
    """A gated workflow whose build the test completes, shown on the page with
    its review gate selected: waiting for approval."""
    from playwright.async_api import expect

    page = console.page
    workflow = await submit_gated(console.api, rid)
    await page.goto(f"{console.base}/#/runs/{workflow.id}")
    gate = page.locator('#steps .node[data-step="review"]')
    await expect(gate).to_have_attribute("data-state", "PENDING")
    console.gate(f"{rid}.build").set()
    await expect(gate).to_have_attribute("data-state", "WAITING_FOR_HUMAN")
    await expect(summary_state(page)).to_have_attribute("data-state", "WAITING_FOR_HUMAN")
    await expect(summary_state(page)).to_have_text("✋ waiting for approval")
    # The gate opens from its graph node, or from the summary's list of waiting gates.
    if from_summary:
        await page.locator('#run-summary button[data-gate="review"]').click()
    else:
        await gate.click()
    detail = page.locator("#step-detail")
    await expect(detail).to_contain_text("Step review")
    await expect(detail).to_contain_text("waiting for approval")
    await expect(detail).to_contain_text("role:reviewer")
    await expect(detail).to_contain_text("0 of 1 approval")
    return workflow


async def test_approve_from_the_console_completes_the_gate_and_the_workflow(
    console: Console,
) -> None:
    from google.protobuf import json_format
    from playwright.async_api import expect

    from jobtrace.pb import attestation_service_pb2 as a

    page = console.page
    workflow = await open_waiting_gate(console, "wf-approve")
    detail = page.locator("#step-detail")
    await detail.get_by_label("Comment").fill("ship it, checked in the browser")
    await detail.get_by_role("button", name="Approve").click()
    await expect(page.locator('#steps .node[data-step="review"]')).to_have_attribute(
        "data-state", "COMPLETED"
    )
    await expect(summary_state(page)).to_have_attribute("data-state", "COMPLETED")
    # The decision, with its comment, in the gate's detail.
    decision = detail.locator('.decisions li[data-disposition="approved"]')
    await expect(decision).to_contain_text("ship it, checked in the browser")
    await expect(detail.get_by_role("button", name="Approve")).to_have_count(0)
    await expect(page.locator("#annotations")).to_contain_text("approval.disposition")
    done = await get_workflow(console.api, workflow.id)
    assert done.state == c.RUN_STATE_COMPLETED
    review = next(s for s in done.steps if s.name == "review")
    assert review.state == c.RUN_STATE_COMPLETED
    [decided] = review.approval.decisions
    assert decided.disposition == c.APPROVAL_DISPOSITION_APPROVED
    assert decided.comment == "ship it, checked in the browser"
    # Recorded as approval.* annotations by the caller's subject (no auth: the
    # local admin), the comment in their payload.
    annotations = (
        await console.api.attest.ListAnnotations(
            a.ListAnnotationsRequest(
                run_id=workflow.id, key_prefix="approval.", view=a.ANNOTATION_VIEW_FULL
            )
        )
    ).annotations
    assert annotations, "the decision is recorded as annotations"
    by_key = {n.key: n for n in annotations}
    disposition = by_key["approval.disposition"]
    assert disposition.value.string_value == "approved"
    assert disposition.scope_id == "review"
    assert disposition.recorded_by == decided.approver != ""
    assert disposition.actor.id == decided.approver
    approvers = [v.string_value for v in by_key["approval.approvers"].value.list_value.values]
    assert approvers == [decided.approver]
    payload = json_format.MessageToDict(disposition.payload)
    assert payload == {"comment": "ship it, checked in the browser"}
    console.assert_no_errors()


async def test_reject_from_the_console_fails_the_workflow(console: Console) -> None:
    from playwright.async_api import expect

    page = console.page
    workflow = await open_waiting_gate(console, "wf-reject", from_summary=True)
    detail = page.locator("#step-detail")
    await detail.get_by_label("Comment").fill("not today")
    await detail.get_by_role("button", name="Reject").click()
    await expect(page.locator('#steps .node[data-step="review"]')).to_have_attribute(
        "data-state", "FAILED"
    )
    await expect(summary_state(page)).to_have_attribute("data-state", "FAILED")
    await expect(detail.locator('.decisions li[data-disposition="rejected"]')).to_contain_text(
        "not today"
    )
    failed = await get_workflow(console.api, workflow.id)
    assert failed.state == c.RUN_STATE_FAILED
    # An ended run offers a rerun, no longer pause, cancel or terminate.
    actions = page.locator("#run-actions")
    await expect(actions.locator('[data-action="rerun"]')).to_have_count(1)
    for gone in ("cancel", "terminate", "pause", "resume"):
        await expect(actions.locator(f'[data-action="{gone}"]')).to_have_count(0)
    console.assert_no_errors()


async def test_pause_and_resume_from_the_console(console: Console) -> None:
    from playwright.async_api import expect

    page = console.page
    workflow = await submit_gated(console.api, "wf-pause")
    await page.goto(f"{console.base}/#/runs/{workflow.id}")
    await expect(page.locator('#steps .node[data-step="build"]')).to_have_attribute(
        "data-state", "RUNNING"
    )
    actions = page.locator("#run-actions")
    await expect(actions.locator('[data-action="resume"]')).to_have_count(0)
    await page.get_by_label("Reason").fill("maintenance window")
    await actions.get_by_role("button", name="Pause").click()
    await expect(summary_state(page)).to_have_attribute("data-state", "PAUSED")
    await expect(summary_state(page)).to_have_text("⏸ paused")
    paused = await get_workflow(console.api, workflow.id)
    assert paused.state == c.RUN_STATE_PAUSED
    # Paused: Resume instead of Pause; still live (cancel, terminate); no rerun.
    await expect(actions.locator('[data-action="pause"]')).to_have_count(0)
    await expect(actions.locator('[data-action="rerun"]')).to_have_count(0)
    await expect(actions.locator('[data-action="terminate"]')).to_have_count(1)
    # The runs list shows it live, with a readable badge.
    await page.goto(f"{console.base}/#/runs")
    row = page.locator(f'#live-runs tr[data-run-id="{workflow.id}"]')
    await expect(row).to_have_attribute("data-live", "true")
    await expect(row.locator("[data-state]")).to_have_text("⏸ paused")
    await page.goto(f"{console.base}/#/runs/{workflow.id}")
    await actions.get_by_role("button", name="Resume").click()
    await expect(summary_state(page)).to_have_attribute("data-state", "RUNNING")
    resumed = await get_workflow(console.api, workflow.id)
    assert resumed.state == c.RUN_STATE_RUNNING
    await expect(actions.locator('[data-action="pause"]')).to_have_count(1)
    # Done with it: the build ends, the gate waits; terminate it from here.
    console.gate("wf-pause.build").set()
    await expect(summary_state(page)).to_have_attribute("data-state", "WAITING_FOR_HUMAN")
    await console.api.jobs.TerminateWorkflow(
        j.TerminateWorkflowRequest(workflow_id=workflow.id, reason="test done")
    )
    console.assert_no_errors()


async def test_a_refused_action_shows_the_servers_reason(console: Console) -> None:
    """The run ends between the page's last news and the click: the page still
    offers Pause, and shows the server's FAILED_PRECONDITION when it refuses."""
    from google.protobuf import json_format
    from playwright.async_api import expect

    page = console.page
    workflow = await submit_gated(console.api, "wf-race")
    await wait_for(lambda: in_state(console.api, workflow.id, c.RUN_STATE_RUNNING))
    running_now = await get_workflow(console.api, workflow.id)
    # The page's watch sees the run RUNNING, then its stream ends: no later news.
    message = json.dumps({"workflow": json_format.MessageToDict(running_now)}).encode()
    stream = b"\x00" + len(message).to_bytes(4, "big") + message + b"\x02\x00\x00\x00\x02{}"
    watch = "**/jobtrace.v1.JobService/WatchWorkflow"

    async def frozen(route: Any) -> None:
        await route.fulfill(status=200, content_type="application/connect+json", body=stream)

    await page.route(watch, frozen)
    try:
        await page.goto(f"{console.base}/#/runs/{workflow.id}")
        await expect(summary_state(page)).to_have_attribute("data-state", "RUNNING")
        pause = page.locator('#run-actions [data-action="pause"]')
        await expect(pause).to_have_count(1)
        await console.api.jobs.TerminateWorkflow(
            j.TerminateWorkflowRequest(workflow_id=workflow.id, reason="raced")
        )
        await pause.click()
        status = page.locator("#action-status")
        await expect(status).to_contain_text("Pause refused: failed precondition")
        await expect(status).to_contain_text("TERMINATED")
        await expect(status).to_have_attribute("data-kind", "error")
    finally:
        await page.unroute(watch)
        console.gate("wf-race.build").set()
    # The only error the page logged is the refusal the server answered.
    assert all("status of 400" in e for e in console.errors), console.errors
    console.errors.clear()


async def test_terminate_from_the_console_reaches_the_worker(console: Console) -> None:
    from playwright.async_api import expect

    page = console.page
    workflow = (
        await console.api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="wf-terminate",
                name="long-haul",
                steps=[c.WorkflowStepSpec(name="hold", job=c.JobSpec(service="console.hold"))],
            )
        )
    ).workflow
    await page.goto(f"{console.base}/#/runs/{workflow.id}")
    await expect(page.locator('#steps .node[data-step="hold"]')).to_have_attribute(
        "data-state", "RUNNING"
    )
    job_id = workflow.steps[0].job_id
    await page.get_by_label("Reason").fill("terminated by the browser test")
    await page.locator("#run-actions").get_by_role("button", name="Terminate").click()
    await expect(summary_state(page)).to_have_attribute("data-state", "TERMINATED")
    await wait_for(lambda: job_id in console.cancels, timeout=DEADLINE_MS / 1000)
    assert "terminated by the browser test" in console.cancels[job_id]
    assert (await get_workflow(console.api, workflow.id)).state == c.RUN_STATE_TERMINATED
    await expect(page.locator('#steps .node[data-step="hold"]')).to_have_attribute(
        "data-state", "TERMINATED"
    )
    console.assert_no_errors()


async def test_rerun_from_the_console_links_the_new_run(console: Console) -> None:
    from playwright.async_api import expect

    page = console.page
    old = await submit_gated(console.api, "wf-rerun", job_step=False)
    await wait_for(lambda: in_state(console.api, old.id, c.RUN_STATE_WAITING_FOR_HUMAN))
    await console.api.jobs.ApproveStep(
        j.ApproveStepRequest(
            workflow_id=old.id, step="review", disposition=c.APPROVAL_DISPOSITION_REJECTED
        )
    )
    await page.goto(f"{console.base}/#/runs/{old.id}")
    await expect(summary_state(page)).to_have_attribute("data-state", "FAILED")
    await page.get_by_label("Reason").fill("try again")
    await page.locator("#run-actions").get_by_role("button", name="Rerun").click()
    link = page.locator("#action-status #rerun-link")
    await expect(link).to_have_text(re.compile(r"^wf_"))
    new_id = await link.text_content()
    assert new_id and new_id != old.id
    reruns = (
        await console.api.jobs.ListWorkflows(j.ListWorkflowsRequest(parent_run_id=old.id))
    ).workflows
    assert [w.id for w in reruns] == [new_id]
    assert reruns[0].parent_run_id == old.id
    await link.click()
    await expect(page.locator("h2 code")).to_have_text(new_id)
    await expect(page.locator(f'#run-summary a[href="#/runs/{old.id}"]')).to_be_visible()
    await expect(page.locator('#steps .node[data-step="review"]')).to_have_attribute(
        "data-state", "WAITING_FOR_HUMAN"
    )
    await console.api.jobs.TerminateWorkflow(
        j.TerminateWorkflowRequest(workflow_id=new_id, reason="test done")
    )
    console.assert_no_errors()


async def opens(page: Any, at_least: int) -> bool:
    """Whether the page's EventSource has opened at least this many times."""
    count: int = await page.evaluate("window.jobtraceConsole.trace.opens")
    return count >= at_least


async def no_horizontal_scroll(page: Any) -> bool:
    width: int = await page.evaluate(
        "Math.max(document.documentElement.scrollWidth, document.body.scrollWidth)"
    )
    viewport: int = await page.evaluate("window.innerWidth")
    return width <= viewport


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secured(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Console]:
    """The console of a server with authentication (a tokens file and JWTs)."""
    folder = tmp_path_factory.mktemp("secured")
    write_tokens(folder / "tokens.yaml")
    async with console_on(
        browser,
        folder / "jobtrace.db",
        worker_token=token("worker", "acme"),
        tokens_file=str(folder / "tokens.yaml"),
        jwt_secret=SECRET,
        jwt_issuer=ISSUER,
    ) as state:
        yield state


async def use_token(page: Any, value: str) -> None:
    await page.get_by_text("Access token").click()
    await page.get_by_label("Bearer token").fill(value)
    await page.get_by_role("button", name="Use token").click()
    await page.get_by_text("Access token").click()


async def test_with_auth_the_token_stays_in_session_storage_and_actions_follow_roles(
    secured: Console,
) -> None:
    from playwright.async_api import expect

    page = secured.page
    submitter = bearer(token("submitter", "acme"))
    job = (
        await secured.api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="auth-hold", job=c.JobSpec(service="console.hold")),
            metadata=submitter,
        )
    ).job
    # No token: the live list says why it is empty.
    await page.goto(secured.base + "/")
    await expect(page.locator("#live-status")).to_contain_text("unauthenticated")

    # A reader's JWT: its roles claim hides the actions up front.
    await use_token(page, make_jwt(roles=["reader"]))
    await expect(page.locator("#live-status")).to_have_text("● live")
    await expect(page.locator(f'#live-runs tr[data-run-id="{job.id}"]')).to_be_visible()
    await page.goto(f"{secured.base}/#/runs/{job.id}")
    await expect(page.locator("#run-summary [data-state]").first).to_have_attribute(
        "data-state", "RUNNING"
    )
    # The trace streams through EventSource with ?access_token= (no header).
    await expect(page.locator('#trace-lines li[data-type="started"]')).to_have_count(1)
    await expect(page.locator('#run-actions [data-action="cancel"]')).to_have_count(0)

    # A reader's opaque token: offered, refused by the server, then hidden.
    await use_token(page, token("reader", "acme"))
    cancel = page.locator('#run-actions [data-action="cancel"]')
    await cancel.click()
    await expect(page.locator("#action-status")).to_contain_text("permission denied")
    await expect(cancel).to_have_count(0)
    assert job.id not in secured.cancels

    # The token lives in this tab's session storage, never in the URL or local storage.
    assert token("reader", "acme") not in page.url
    stored = await page.evaluate("[sessionStorage.getItem('jobtrace.token'), localStorage.length]")
    assert stored == [token("reader", "acme"), 0]

    # A submitter may cancel: the worker hears of it.
    await use_token(page, token("submitter", "acme"))
    await page.locator('#run-actions [data-action="cancel"]').click()
    await wait_for(lambda: job.id in secured.cancels, timeout=DEADLINE_MS / 1000)
    await expect(page.locator("#run-summary [data-state]").first).to_have_attribute(
        "data-state", "CANCELLED"
    )
    # The only errors the page logged are the refusals the server answered.
    assert all("401" in e or "403" in e for e in secured.errors), secured.errors
