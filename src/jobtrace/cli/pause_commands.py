"""CLI commands that pause runs: `jobtrace pause | resume` (a workflow) and
`jobtrace queues [pause | resume]` (a tenant's queue of one service)."""

from __future__ import annotations

import argparse
from typing import Any

from jobtrace.cli import render
from jobtrace.cli.client_commands import client_options, run_command
from jobtrace.cli.render import as_json, print_json, state_name, when
from jobtrace.client import Client
from jobtrace.pb import job_service_pb2

HEADERS = ["TENANT", "SERVICE", "STATE", "QUEUED", "RUNNING", "PAUSED BY", "PAUSED AT", "REASON"]


def row(q: job_service_pb2.Queue) -> list[str]:
    return [
        q.tenant,
        q.service,
        "paused" if q.paused else "active",
        str(q.queued),
        str(q.running),
        q.paused_by or "-",
        when(q.paused_at),
        q.pause_reason or "-",
    ]


async def pause(args: argparse.Namespace, client: Client) -> int:
    workflow = await client.pause_workflow(args.id, args.reason)
    if args.json:
        print_json(as_json(workflow))
    else:
        print(f"{workflow.id}: {state_name(workflow.state)}")
    return 0


async def resume(args: argparse.Namespace, client: Client) -> int:
    workflow = await client.resume_workflow(args.id)
    if args.json:
        print_json(as_json(workflow))
    else:
        print(f"{workflow.id}: {state_name(workflow.state)}")
    return 0


async def queues(args: argparse.Namespace, client: Client) -> int:
    found = await client.list_queues()
    if args.json:
        print_json({"queues": [as_json(q) for q in found]})
        return 0
    render.table(HEADERS, [row(q) for q in found])
    return 0


async def queue_pause(args: argparse.Namespace, client: Client) -> int:
    queue = await client.pause_queue(args.service, args.reason, tenant=args.tenant or "")
    return _print_queue(args, queue)


async def queue_resume(args: argparse.Namespace, client: Client) -> int:
    queue = await client.resume_queue(args.service, tenant=args.tenant or "")
    return _print_queue(args, queue)


def _print_queue(args: argparse.Namespace, queue: job_service_pb2.Queue) -> int:
    if args.json:
        print_json(as_json(queue))
    else:
        state = "paused" if queue.paused else "resumed"
        print(f"{queue.tenant}/{queue.service}: {state} ({queue.queued} queued)")
    return 0


def add_commands(sub: Any) -> None:
    """Register `jobtrace pause`, `resume` and `queues` on the top-level sub-parsers."""
    conn = client_options()
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser(
        "pause",
        parents=[conn, out],
        help="pause a workflow: no new step starts until `jobtrace resume`",
    )
    p.add_argument("id", help="workflow id (wf_...)")
    p.add_argument("--reason", default="", help="recorded in its trace and shown with it")
    p.set_defaults(func=run_command(pause))

    p = sub.add_parser(
        "resume", parents=[conn, out], help="resume a paused workflow where it stopped"
    )
    p.add_argument("id", help="workflow id (wf_...)")
    p.set_defaults(func=run_command(resume))

    p = sub.add_parser(
        "queues",
        parents=[conn, out],
        help="the queues (tenant, service) and which are paused; pause or resume one",
        description="Without a subcommand: a table of the queues with jobs waiting or "
        "running, and every paused one (who paused it, when, why).",
    )
    p.set_defaults(func=run_command(queues))
    actions = p.add_subparsers(dest="queues_command", metavar="{pause,resume}")
    q = actions.add_parser(
        "pause",
        parents=[conn, out],
        help="hold every queued job of a service (new ones too) until resumed (admin)",
    )
    q.add_argument("service", help="the service whose queue is paused")
    q.add_argument("--reason", default="", help="shown by `jobtrace queues`")
    q.add_argument("--tenant", help="the tenant whose queue (default your own)")
    q.set_defaults(func=run_command(queue_pause))
    q = actions.add_parser("resume", parents=[conn, out], help="resume a paused queue (admin)")
    q.add_argument("service", help="the service whose queue is resumed")
    q.add_argument("--tenant", help="the tenant whose queue (default your own)")
    q.set_defaults(func=run_command(queue_resume))
