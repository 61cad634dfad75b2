"""CLI commands about the fleet: `jobtrace workers` (a table, --json, --watch)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jobtrace.cli import render
from jobtrace.cli.client_commands import client_options, collect, parse_pairs, run_command
from jobtrace.cli.render import as_json, print_json, when
from jobtrace.client import Client
from jobtrace.pb import worker_service_pb2

HEADERS = ["WORKER", "SESSION", "REPLICA", "SERVICES", "SLOTS", "HELD", "DRAINING", "HEARTBEAT"]


def filters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "service": args.service or "",
        "labels": parse_pairs(args.label, "--label"),
        "draining": {None: None, "yes": True, "no": False}[args.draining],
        "holding_job": args.holding_job or "",
    }


def row(w: worker_service_pb2.ConnectedWorker) -> list[str]:
    return [
        w.worker_id,
        w.session_id,
        w.replica,
        ",".join(w.services),
        f"{w.free_slots}/{w.max_concurrency}",
        ",".join(h.job_id for h in w.held_jobs) or "-",
        "yes" if w.draining else "no",
        when(w.last_heartbeat, date=False),
    ]


async def workers(args: argparse.Namespace, client: Client) -> int:
    if args.watch:
        return await watch(args, client)
    found, token = await collect(
        lambda t: client.list_workers(
            **filters(args), page_size=min(args.limit, 1000), page_token=t
        ),
        args.limit,
    )
    if args.json:
        print_json({"workers": [as_json(w) for w in found], "next_page_token": token})
        return 0
    render.table(HEADERS, [row(w) for w in found])
    return 0


CHANGES = {
    value: name.removeprefix("WORKER_CHANGE_TYPE_").lower()
    for name, value in worker_service_pb2.WorkerChangeType.items()
}


async def watch(args: argparse.Namespace, client: Client) -> int:
    """Follow WatchWorkers: the snapshot, then one line (or JSON object) per
    change, until interrupted."""
    async for message in client.watch_workers(**filters(args)):
        kind = message.WhichOneof("kind")
        if args.json:
            print_json(as_json(message))
            sys.stdout.flush()
            continue
        if kind == "snapshot_done":
            print(f"-- {message.snapshot_done.workers} workers; following changes", flush=True)
        elif kind == "change":
            w = message.change.worker
            change = CHANGES.get(message.change.type, str(message.change.type))
            print(f"{change:<12} " + "  ".join(row(w)), flush=True)
    return 0


def add_commands(sub: Any) -> None:
    """Register `jobtrace workers` on the top-level sub-parsers."""
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="print JSON instead of text")
    p = sub.add_parser(
        "workers",
        parents=[client_options(), out],
        help="the connected workers of the whole fleet",
        description="The connected workers of every replica that your tenant may use, "
        "in the order they connected; --watch follows changes.",
    )
    p.add_argument("--service", help="only workers that run this service")
    p.add_argument("--label", action="append", help="KEY=VALUE label they carry (repeatable)")
    p.add_argument("--draining", choices=["yes", "no"], help="only draining workers, or not")
    p.add_argument("--holding-job", metavar="JOB_ID", help="only the worker holding this job")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.add_argument(
        "--watch",
        action="store_true",
        help="print the workers, then every change (connected, updated, disconnected, "
        "expired, unmatched) until interrupted",
    )
    p.set_defaults(func=run_command(workers))
