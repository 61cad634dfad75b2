"""`jobtrace cancel-runs` and `jobtrace rerun-runs`: cancel (CancelRuns) or
rerun (RerunRuns) in bulk the runs a filter matches, after showing how many
match and asking (or with --yes); --dry-run only shows them. Interrupted,
they resume with --request-id."""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from jobtrace.cli.client_commands import parse_pairs, parse_when, run_command
from jobtrace.cli.render import as_json, print_json, state_name
from jobtrace.client import Client
from jobtrace.pb import common_pb2, job_service_pb2


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    steps = {"include_steps": args.steps} if hasattr(args, "steps") else {}
    return steps | {
        "kind": args.kind,
        "states": args.state or (),
        "service": args.service or "",
        "workflow_name": args.name or "",
        "labels": parse_pairs(args.label, "--label"),
        "user_id": args.user or "",
        "created_after": parse_when(args.since) if args.since else None,
        "created_before": parse_when(args.until) if args.until else None,
    }


def _kind_name(kind: int) -> str:
    return "workflow" if kind == job_service_pb2.WatchRunsRequest.RUN_KIND_WORKFLOW else "job"


Response = job_service_pb2.CancelRunsResponse | job_service_pb2.RerunRunsResponse


def _verb(response: Response) -> tuple[str, int]:
    """What the operation did ("cancelled", "rerun") and to how many runs."""
    if isinstance(response, job_service_pb2.RerunRunsResponse):
        return "rerun", response.rerun
    return "cancelled", response.cancelled


def describe_dry_run(response: Response) -> str:
    lines = [f"{response.matched} runs match and would be {_verb(response)[0]}"]
    lines += [
        f"  {r.run_id}  {_kind_name(r.kind).ljust(8)}  {state_name(r.state)}"
        for r in response.sample
    ]
    if response.matched > len(response.sample):
        lines.append(f"  ... and {response.matched - len(response.sample)} more")
    return "\n".join(lines)


def describe_result(response: Response) -> str:
    skipped = ", ".join(f"{k.lower()}: {n}" for k, n in sorted(response.skipped_reasons.items()))
    verb, count = _verb(response)
    lines = [
        f"operation {response.request_id}: {'done' if response.done else 'not done'}",
        f"  {verb} {count}, skipped {response.skipped}"
        + (f" ({skipped})" if skipped else "")
        + f", failed {response.failed}",
    ]
    lines += [f"  failed {f.run_id}: {f.code} {f.message}" for f in response.failures]
    if isinstance(response, job_service_pb2.RerunRunsResponse):
        lines += [f"  rerun {r.run_id} as {r.new_run_id}" for r in response.reruns]
    if not response.done:
        lines.append(f"  go on with: --request-id {response.request_id}")
    return "\n".join(lines)


async def _run_in_bulk(
    args: argparse.Namespace,
    call: Callable[..., Awaitable[Response]],
    options: dict[str, Any],
    verbs: tuple[str, str, str],
) -> int:
    """Cancel or rerun (`call`: the client's cancel_runs or rerun_runs, with
    these `options` besides the filters): the matching runs shown first and
    asked for (unless --yes or --request-id), then the operation until done.
    `verbs`: the action as in "not cancelling", "to cancel", "nothing cancelled"."""
    doing, do, done = verbs
    filters = _filters(args) | options
    if args.dry_run or not (args.yes or args.request_id):
        dry = await call(**filters, dry_run=True)
        if args.dry_run:
            print_json(as_json(dry)) if args.json else print(describe_dry_run(dry))
            return 0
        print(describe_dry_run(dry), file=sys.stderr)
        if dry.matched == 0:
            if args.json:
                print_json(as_json(dry))
            return 0
        if not sys.stdin.isatty():
            print(f"not {doing}: pass --yes to {do} without asking", file=sys.stderr)
            return 2
        answer = await asyncio.to_thread(
            input, f"{do.capitalize()} these {dry.matched} runs? [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            print(f"nothing {done}", file=sys.stderr)
            return 2
    request_id = args.request_id or f"cli-{uuid.uuid4()}"
    if not args.json:
        print(f"operation {request_id} (resume with --request-id {request_id})", file=sys.stderr)
    response = await call(**filters, request_id=request_id, limit=args.batch, until_done=True)
    print_json(as_json(response)) if args.json else print(describe_result(response))
    return 0 if response.failed == 0 else 1


async def cancel_runs_command(args: argparse.Namespace, client: Client) -> int:
    verbs = ("cancelling", "cancel", "cancelled")
    return await _run_in_bulk(args, client.cancel_runs, {"reason": args.reason}, verbs)


def add_cancel_runs_command(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    states = [state_name(v) for v in common_pb2.RunState.values()][1:]
    p = sub.add_parser(
        "cancel-runs",
        parents=parents,
        help="cancel in bulk the runs a filter matches (asks first; --dry-run only counts)",
        description="Cancel every run matching the filters (at least one; they combine "
        "with AND) that may still be cancelled: standalone jobs (with --steps, workflow "
        "steps too) and workflows with their steps. Shows how many match and asks first "
        "unless --yes. Interrupted, run it again with the --request-id it printed: it goes "
        "on where it stopped and cancels nothing twice.",
    )
    p.add_argument(
        "--state", action="append", choices=states, type=str.upper, help="in this state (repeat)"
    )
    p.add_argument("--service", help="only jobs of this service")
    p.add_argument("--name", help="only workflows of this name")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="with this label (repeat)")
    p.add_argument("--user", help="only requested for this user (request context user_id)")
    p.add_argument("--since", help="only created at or after this time (ISO 8601, or an age: 2h)")
    p.add_argument("--until", help="only created before this time (ISO 8601, or an age: 10m)")
    p.add_argument("--kind", choices=["job", "workflow"], help="only jobs, or only workflows")
    p.add_argument("--steps", action="store_true", help="workflow steps as jobs too")
    p.add_argument("--reason", default="", help="recorded on every run cancelled")
    p.add_argument("--dry-run", action="store_true", help="only count and show the matching runs")
    p.add_argument("--yes", "-y", action="store_true", help="cancel without asking")
    p.add_argument(
        "--request-id",
        default="",
        help="the operation to go on with (it was printed); implies --yes",
    )
    p.add_argument(
        "--batch", type=int, default=0, help="runs per call (1-10000; default the server's 1000)"
    )
    p.set_defaults(func=run_command(cancel_runs_command))


async def rerun_runs_command(args: argparse.Namespace, client: Client) -> int:
    options = {"reason": args.reason, "failed_only": args.failed_only}
    return await _run_in_bulk(args, client.rerun_runs, options, ("rerunning", "rerun", "rerun"))


def add_rerun_runs_command(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    rs = common_pb2
    ended = [
        state_name(v)
        for v in (
            rs.RUN_STATE_COMPLETED,
            rs.RUN_STATE_FAILED,
            rs.RUN_STATE_CANCELLED,
            rs.RUN_STATE_TERMINATED,
            rs.RUN_STATE_TIMED_OUT,
        )
    ]
    p = sub.add_parser(
        "rerun-runs",
        parents=parents,
        help="rerun in bulk the ended runs a filter matches (asks first; --dry-run only counts)",
        description="Rerun every ended run matching the filters (at least one; they combine "
        "with AND): standalone jobs as `rerun-job` and workflows as `rerun-workflow` "
        "(whole, or with --failed-only only the steps that did not complete), each new "
        "run with lineage and trigger annotations carrying --reason. Shows how many "
        "match and asks first unless --yes. Interrupted, run it again with the "
        "--request-id it printed: it goes on where it stopped and reruns nothing twice.",
    )
    p.add_argument(
        "--state", action="append", choices=ended, type=str.upper, help="in this state (repeat)"
    )
    p.add_argument("--service", help="only jobs of this service")
    p.add_argument("--name", help="only workflows of this name")
    p.add_argument("--label", action="append", metavar="KEY=VALUE", help="with this label (repeat)")
    p.add_argument("--user", help="only requested for this user (request context user_id)")
    p.add_argument("--since", help="only created at or after this time (ISO 8601, or an age: 2h)")
    p.add_argument("--until", help="only created before this time (ISO 8601, or an age: 10m)")
    p.add_argument("--kind", choices=["job", "workflow"], help="only jobs, or only workflows")
    p.add_argument(
        "--failed-only",
        action="store_true",
        help="workflows: run again only the steps that did not complete (and downstream)",
    )
    p.add_argument("--reason", default="", help="recorded on every new run (trigger.reason)")
    p.add_argument("--dry-run", action="store_true", help="only count and show the matching runs")
    p.add_argument("--yes", "-y", action="store_true", help="rerun without asking")
    p.add_argument(
        "--request-id",
        default="",
        help="the operation to go on with (it was printed); implies --yes",
    )
    p.add_argument(
        "--batch", type=int, default=0, help="runs per call (1-10000; default the server's 1000)"
    )
    p.set_defaults(func=run_command(rerun_runs_command))
