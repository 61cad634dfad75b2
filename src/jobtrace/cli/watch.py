"""`jobtrace watch`: live progress of a job or workflow and a tail of its business trace.

On a terminal the block of progress bars is redrawn in place; otherwise each
change is printed as one line (or, with --json, as one JSON object per line).
The exit code reflects the final state (see render.exit_code_for)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections import deque
from dataclasses import dataclass, field
from typing import TextIO

from jobtrace.cli.render import (
    TERMINAL_STATES,
    Style,
    as_json,
    bar,
    clip,
    exit_code_for,
    level_name,
    print_json,
    shorten,
    state_name,
    when,
)
from jobtrace.client import Client
from jobtrace.ids import run_kind
from jobtrace.pb import common_pb2

REDRAW_SECONDS = 0.05
TRACE_GRACE_SECONDS = 5.0


@dataclass
class StepView:
    name: str
    job_id: str
    state: int
    percent: float = 0.0
    message: str = ""
    attempt: int = 0


@dataclass
class RunView:
    """What is on screen: the run, its steps and the last business messages."""

    run_id: str
    title: str = ""
    state: int = common_pb2.RUN_STATE_UNSPECIFIED
    steps: dict[str, StepView] = field(default_factory=dict)
    tail: deque[common_pb2.TraceEvent] = field(default_factory=lambda: deque(maxlen=6))
    final: bool = False

    def update_job(self, job: common_pb2.Job) -> StepView:
        key = job.step_name or job.id
        view = self.steps.get(key) or StepView(key, job.id, job.state)
        view.state, view.attempt = job.state, job.attempt
        if job.HasField("progress"):
            view.percent, view.message = job.progress.percent, job.progress.message
        if job.state == common_pb2.RUN_STATE_COMPLETED:
            view.percent = 100.0
        self.steps[key] = view
        return view

    def update_workflow(self, workflow: common_pb2.Workflow) -> list[StepView]:
        self.state = workflow.state
        self.title = f"workflow {workflow.id} {workflow.name!r}"
        changed = []
        for step in workflow.steps:
            view = self.steps.get(step.name) or StepView(step.name, step.job_id, step.state)
            if (view.state, view.attempt) != (
                step.state,
                step.attempt,
            ) or step.name not in self.steps:
                changed.append(view)
            view.state, view.attempt, view.job_id = step.state, step.attempt, step.job_id
            if step.state == common_pb2.RUN_STATE_COMPLETED:
                view.percent = 100.0
            self.steps[step.name] = view
        return changed

    def done_steps(self) -> int:
        return sum(1 for s in self.steps.values() if s.state == common_pb2.RUN_STATE_COMPLETED)


class Screen:
    """Redraws the run in place on a terminal (ANSI), at most every REDRAW_SECONDS."""

    def __init__(self, out: TextIO, style: Style) -> None:
        self.out = out
        self.style = style
        self._lines = 0

    def draw(self, view: RunView) -> None:
        s = self.style
        total = len(view.steps)
        lines = [
            f"{s.bold(view.title)}  {s.state(view.state)}"
            + (f"  {view.done_steps()}/{total} steps" if total > 1 else "")
        ]
        width = max([len(n) for n in view.steps] + [4])
        for step in view.steps.values():
            percent = f"{step.percent:5.1f}%"
            attempt = f" (attempt {step.attempt})" if step.attempt > 1 else ""
            state = s.state(step.state, state_name(step.state).ljust(9))
            lines.append(
                f"  {step.name.ljust(width)}  {state}"
                f"  {bar(step.percent / 100)} {percent}{attempt}"
                + (f"  {s.dim(shorten(step.message, 40))}" if step.message else "")
            )
        for event in view.tail:
            lines.append(
                f"  {s.dim(when(event.timestamp, date=False))} {s.level(event.level).ljust(5)}"
                f"  {event.node_id}: {shorten(event.user_message or event.message, 70)}"
            )
        width = max(20, shutil.get_terminal_size().columns - 1)
        lines = [clip(text, width) for text in lines]  # a wrapped line would spoil the redraw
        up = f"\x1b[{self._lines}F\x1b[J" if self._lines else ""
        self.out.write(up + "\n".join(lines) + "\n")
        self.out.flush()
        self._lines = len(lines)


async def watch(
    client: Client, run_id: str, out: TextIO, *, json_lines: bool, style: Style, live: bool
) -> int:
    """Follow `run_id` (a job or workflow id) until it ends; return the exit code."""
    kind = run_kind(run_id)
    view = RunView(run_id)
    trace_run, node = run_id, ""
    if kind == "job":
        job = await client.get_job(run_id)
        view.title = f"job {job.id} ({job.spec.service})"
        if job.workflow_id:
            trace_run, node = job.workflow_id, job.step_name
    elif kind != "workflow":
        raise ValueError(f"{run_id!r} is neither a job id (job_...) nor a workflow id (wf_...)")
    dirty = asyncio.Event()
    screen = Screen(out, style) if live else None

    def line(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    async def follow_state() -> None:
        if kind == "workflow":
            first = True
            async for update in client.watch_workflow(run_id):
                changed = view.update_workflow(update.workflow)
                if update.HasField("changed_job"):
                    changed.append(view.update_job(update.changed_job))
                elif first:
                    # The first snapshot: running steps' progress is on their jobs.
                    for step in view.steps.values():
                        if step.state == common_pb2.RUN_STATE_RUNNING:
                            view.update_job(await client.get_job(step.job_id))
                first = False
                report(changed, update.workflow)
        else:
            async for job in client.watch_job(run_id):
                view.state = job.state
                report([view.update_job(job)], job)

    def report(changed: list[StepView], snapshot: common_pb2.Job | common_pb2.Workflow) -> None:
        if json_lines:
            key = "workflow" if isinstance(snapshot, common_pb2.Workflow) else "job"
            print_json({key: as_json(snapshot)}, out)
        elif screen is None:
            for step in {s.name: s for s in changed}.values():
                line(
                    f"{when(snapshot.updated_at, date=False)}  {step.name}  "
                    f"{state_name(step.state)}  {step.percent:.0f}%"
                    + (f"  {step.message}" if step.message else "")
                )
        dirty.set()

    async def follow_trace() -> None:
        async for item in client.stream_trace_events(
            trace_run, follow=True, category="BUSINESS", node_id=node
        ):
            if item.WhichOneof("kind") == "event":
                event = item.event
                view.tail.append(event)
                step = view.steps.get(event.node_id)
                if event.type == common_pb2.TRACE_EVENT_TYPE_PROGRESS and step is not None:
                    step.percent, step.message = event.percent, event.message
                if json_lines:
                    print_json({"event": as_json(event)}, out)
                elif screen is None:
                    line(
                        f"{when(event.timestamp, date=False)}  [{level_name(event.level)}] "
                        f"{event.node_id}: {event.user_message or event.message}"
                    )
                dirty.set()

    async def redraw() -> None:
        while screen is not None:
            await dirty.wait()
            dirty.clear()
            screen.draw(view)
            await asyncio.sleep(REDRAW_SECONDS)  # frame pacing, not synchronisation

    painter = asyncio.create_task(redraw())
    trace = asyncio.create_task(follow_trace())
    try:
        await follow_state()
        # The trace stream ends with the run's final status just after the state does.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TRACE_GRACE_SECONDS):
                await asyncio.shield(trace)
    finally:
        trace.cancel()
        painter.cancel()
        for task in (trace, painter):
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if screen is not None:
        screen.draw(view)
    final = view.state
    if final not in TERMINAL_STATES:
        raise RuntimeError(f"the watch of {run_id} ended before the run did")
    if json_lines:
        print_json({"final_state": state_name(final)}, out)
    else:
        summary = f"{view.title or run_id}: {style.state(final)}"
        if len(view.steps) > 1:
            summary += f" ({view.done_steps()}/{len(view.steps)} steps completed)"
        line(summary)
    return exit_code_for(final)
