"""`jobtrace trace summary` and `jobtrace trace export`: what a run adds up to,
and every event of a run written to a file as it arrives."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from jobtrace.cli import render
from jobtrace.cli.render import Style, as_json, print_json, when
from jobtrace.client import Client
from jobtrace.pb import common_pb2, duration_pb2, trace_service_pb2

# The columns of a CSV export, in order: the event's main fields, its error
# in four columns, and its free-form parts as JSON text.
CSV_COLUMNS = (
    "sequence",
    "id",
    "timestamp",
    "run_id",
    "node_id",
    "job_id",
    "attempt",
    "worker_id",
    "type",
    "level",
    "category",
    "message",
    "user_message",
    "milestone",
    "display_priority",
    "step_number",
    "total_steps",
    "percent",
    "truncated",
    "recorded_by",
    "error_code",
    "error_message",
    "error_details",
    "error_stack",
    "data",
    "output_summary",
)


def _enum(value: int, enum: Any, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)


def type_name(value: int) -> str:
    return _enum(value, common_pb2.TraceEventType, "TRACE_EVENT_TYPE_")


def seconds(d: duration_pb2.Duration) -> str:
    return f"{d.seconds + d.nanos / 1e9:.3f}s"


def csv_row(e: common_pb2.TraceEvent) -> list[Any]:
    """An event as a CSV row of CSV_COLUMNS; timestamps in RFC 3339 (UTC)."""
    has_error = e.HasField("error")
    return [
        e.sequence,
        e.id,
        e.timestamp.ToJsonString() if e.HasField("timestamp") else "",
        e.run_id,
        e.node_id,
        e.job_id,
        e.attempt,
        e.worker_id,
        type_name(e.type),
        render.level_name(e.level),
        _enum(e.category, common_pb2.Category, "CATEGORY_"),
        e.message,
        e.user_message,
        "true" if e.milestone else "false",
        e.display_priority,
        e.step_number,
        e.total_steps,
        e.percent,
        "true" if e.truncated else "false",
        e.recorded_by,
        e.error.code if has_error else "",
        e.error.message if has_error else "",
        e.error.details if has_error else "",
        e.error.stack if has_error else "",
        _json_text(as_json(e).get("data")) if e.HasField("data") else "",
        _json_text(as_json(e).get("output_summary")) if e.HasField("output_summary") else "",
    ]


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


@contextlib.contextmanager
def _output(path: str) -> Iterator[TextIO]:
    if path == "-":
        yield sys.stdout
        sys.stdout.flush()
        return
    with open(path, "w", encoding="utf-8", newline="") as out:
        yield out


async def trace_export(args: argparse.Namespace, client: Client) -> int:
    """Every event of the run, page after page, each page written before the
    next is asked for: never the whole run in memory."""
    # A run that is not there (or not the caller's) leaves no file behind.
    await client.get_run_status(args.run_id)
    count = 0
    with _output(args.output) as out:
        write: Callable[[common_pb2.TraceEvent], None]
        if args.format == "csv":
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(CSV_COLUMNS)

            def write(e: common_pb2.TraceEvent) -> None:
                writer.writerow(csv_row(e))
        else:

            def write(e: common_pb2.TraceEvent) -> None:
                out.write(json.dumps(as_json(e), ensure_ascii=False) + "\n")

        async for event in client.export_trace(args.run_id, page_size=args.page_size):
            write(event)
            count += 1
    if args.output != "-":
        print(f"wrote {count} events of {args.run_id} to {args.output}", file=sys.stderr)
    return 0


async def trace_summary(args: argparse.Namespace, client: Client) -> int:
    if bool(args.run_id) == bool(args.workflow_name):
        raise ValueError("give a RUN id or --workflow-name NAME (one of them)")
    response = await client.get_run_summary(
        args.run_id or "", workflow_name=args.workflow_name or "", recent_runs=args.recent or 0
    )
    if args.json:
        print_json(as_json(response))
        return 0
    show_summary(response, Style.choose(args.color, sys.stdout))
    return 0


def show_summary(response: trace_service_pb2.GetRunSummaryResponse, s: Style) -> None:
    summary = response.summary
    status = summary.status
    name = f" (workflow {summary.workflow_name})" if summary.workflow_name else ""
    print(f"run {s.bold(summary.run_id)}{name}: {s.state(status.state)}")
    print(
        f"  started {when(status.started_at)}  completed {when(status.completed_at)}  "
        f"steps {status.progress.completed_actions}/{status.progress.total_actions}"
    )
    timeline = summary.timeline
    span = (
        f"{when(timeline.first_event_at)} .. {when(timeline.last_event_at)} "
        f"({seconds(timeline.duration)})"
        if timeline.HasField("first_event_at")
        else "-"
    )
    print(f"  events {summary.total_events}, from {span}")
    levels = ", ".join(f"{render.level_name(c.level)} {c.events}" for c in summary.levels)
    types = ", ".join(f"{type_name(c.type)} {c.events}" for c in summary.types)
    print(f"  by level: {levels or '-'}")
    print(f"  by type:  {types or '-'}")
    print()
    render.table(
        [
            "NODE",
            "STEP",
            "STATE",
            "ATTEMPTS",
            "FAILURES",
            "EVENTS",
            "ERRORS",
            "FIRST",
            "LAST",
            "DURATION",
        ],
        [
            [
                n.node_id,
                str(n.step_number or "-"),
                s.state(n.state) if n.state else "-",
                str(n.attempts) if n.job_id else "-",
                str(n.failures) if n.job_id else "-",
                str(n.events),
                str(n.errors),
                when(n.timeline.first_event_at),
                when(n.timeline.last_event_at),
                seconds(n.timeline.duration) if n.timeline.HasField("duration") else "-",
            ]
            for n in summary.nodes
        ],
    )
    if summary.total_milestones:
        print(f"\nmilestones ({len(summary.milestones)} of {summary.total_milestones}):")
        for m in summary.milestones:
            print(
                f"  {s.dim(str(m.sequence).rjust(5))} {when(m.time)} "
                f"{type_name(m.type).ljust(9)} {m.node_id}: {m.message}"
            )
    if response.recent_runs:
        print(f"\nearlier runs of {summary.workflow_name}:")
        render.table(
            ["RUN", "STATE", "STARTED", "COMPLETED", "DURATION"],
            [
                [
                    r.run_id,
                    s.state(r.state),
                    when(r.started_at),
                    when(r.completed_at),
                    seconds(r.duration) if r.HasField("duration") else "-",
                ]
                for r in response.recent_runs
            ],
        )


def add_trace_reports(
    trace: Any, run: Callable[[Any], Any], *parents: argparse.ArgumentParser
) -> None:
    """Register `trace summary` and `trace export` on the `trace` sub-parsers;
    `parents`: the connection, --json and --color options."""
    p = trace.add_parser(
        "summary",
        parents=list(parents),
        help="what a run adds up to: events by level, type and step, milestones, attempts",
    )
    p.add_argument("run_id", nargs="?", help="a workflow id, or a standalone job id")
    p.add_argument("--workflow-name", help="instead of RUN: the newest run of this workflow name")
    p.add_argument(
        "--recent",
        type=int,
        help="with --workflow-name: list this many earlier runs (default 10, at most 100)",
    )
    p.set_defaults(func=run(trace_summary))
    p = trace.add_parser(
        "export",
        parents=[parents[0]],
        help="write every event of a run to a file, as JSON lines or CSV",
    )
    p.add_argument("run_id", help="a workflow id, or a standalone job id")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl", help="(default jsonl)")
    p.add_argument("-o", "--output", required=True, help="the file to write; - for stdout")
    p.add_argument(
        "--page-size", type=int, default=1000, help="events per call (1-1000, default 1000)"
    )
    p.set_defaults(func=run(trace_export))
