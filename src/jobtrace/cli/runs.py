"""`jobtrace runs`: the runs not yet ended, and with --follow the live feed of
every run's changes (WatchRuns); one line per run, or one JSON object per line."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jobtrace.cli.client_commands import parse_pairs, run_command
from jobtrace.cli.render import Style, as_json, print_json, shorten, state_name, when
from jobtrace.client import Client
from jobtrace.pb import common_pb2, job_service_pb2


def run_line(run: common_pb2.Job | common_pb2.Workflow, s: Style) -> str:
    """One run as a line: time of the change, id, what it runs, state, progress."""
    if isinstance(run, common_pb2.Workflow):
        what = run.name
        progress = f"{run.progress.completed_steps}/{run.progress.total_steps} steps"
    else:
        what = run.spec.service + (f" ({run.step_name})" if run.step_name else "")
        progress = f"{run.progress.percent:.0f}%"
        if run.progress.message:
            progress += f" {shorten(run.progress.message, 40)}"
    return (
        f"{when(run.updated_at)}  {run.id}  {shorten(what, 32)}  "
        f"{s.state(run.state, state_name(run.state).ljust(9))}  {progress}"
    )


async def runs_command(args: argparse.Namespace, client: Client) -> int:
    feed = client.watch_runs(
        services=args.service or (),
        workflow_names=args.workflow_name or (),
        states=args.state or (),
        labels=parse_pairs(args.label, "--label"),
        kind=args.kind,
        include_steps=args.steps,
        include_active=not args.changes_only,
    )
    s = Style.choose(args.color, sys.stdout)
    async for change in feed:
        kind = change.WhichOneof("kind")
        if kind == "snapshot_end":
            if not args.follow:
                return 0
            if args.json:  # from here on every change is printed
                print_json(as_json(change))
            else:
                end = change.snapshot_end
                cut = " (cut short: narrow the filter)" if end.truncated else ""
                print(
                    f"-- {end.run_count} active runs{cut}; following changes (Ctrl-C to stop)",
                    file=sys.stderr,
                    flush=True,
                )
            continue
        if args.json:
            print_json(as_json(change))
        else:
            print(run_line(change.job if kind == "job" else change.workflow, s), flush=True)
    return 0


def add_runs_command(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    states = [state_name(v) for v in common_pb2.RunState.values()][1:]
    kinds = [
        n.removeprefix("RUN_KIND_").lower()
        for n in job_service_pb2.WatchRunsRequest.RunKind.keys()[1:]
    ]
    p = sub.add_parser(
        "runs",
        parents=parents,
        help="the runs not yet ended; with --follow, every change of every run, live",
        description="The runs not yet ended (top-level: standalone jobs and workflows), "
        "then with --follow each run's changes as they happen. Filters combine with AND; "
        "a repeated filter matches any of its values.",
    )
    p.add_argument("--follow", "-f", action="store_true", help="keep following changes")
    p.add_argument(
        "--changes-only", action="store_true", help="with --follow: skip the active runs"
    )
    p.add_argument("--service", action="append", help="only jobs of this service (repeatable)")
    p.add_argument(
        "--workflow-name", action="append", help="only workflows of this name (repeatable)"
    )
    p.add_argument(
        "--state",
        action="append",
        choices=states,
        type=str.upper,
        help="only runs in this state (repeatable)",
    )
    p.add_argument("--label", action="append", help="KEY=VALUE label to match (repeatable)")
    p.add_argument("--kind", choices=kinds, help="only jobs, or only workflows")
    p.add_argument("--steps", action="store_true", help="workflow steps as jobs too")
    p.set_defaults(func=run_command(runs_command))
