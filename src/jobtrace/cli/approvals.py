"""`jobtrace approve` and `jobtrace pending-approvals`: deciding approval gate
steps of workflows, and the gates waiting for the caller."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jobtrace.cli import render
from jobtrace.cli.client_commands import collect, run_command
from jobtrace.cli.render import Style, as_json, print_json, shorten, state_name, when
from jobtrace.client import Client


async def approve_command(args: argparse.Namespace, client: Client) -> int:
    response = await client.approve_step(
        args.workflow_id, args.step, approve=not args.reject, comment=args.comment
    )
    if args.json:
        print_json({"workflow": as_json(response.workflow), "step": as_json(response.step)})
        return 0
    gate = response.step.approval
    print(
        f"{args.workflow_id} {args.step}: {'rejected' if args.reject else 'approved'}; "
        f"step {state_name(response.step.state)} ({gate.approvals} of "
        f"{gate.gate.min_approvals} approvals), workflow {state_name(response.workflow.state)}"
    )
    return 0


async def pending_command(args: argparse.Namespace, client: Client) -> int:
    found, token = await collect(
        lambda t: client.list_pending_approvals(page_size=min(args.limit, 1000), page_token=t),
        args.limit,
    )
    if args.json:
        print_json({"approvals": [as_json(p) for p in found], "next_page_token": token})
        return 0
    s = Style.choose("auto", sys.stdout)
    render.table(
        ["WORKFLOW", "STEP", "APPROVERS", "APPROVALS", "WAITING SINCE", "DEADLINE"],
        [
            [
                p.workflow_id,
                p.step,
                shorten(", ".join(p.approval.gate.approvers), 40),
                f"{p.approval.approvals}/{p.approval.gate.min_approvals}",
                when(p.waiting_since),
                when(p.approval.deadline) if p.approval.HasField("deadline") else "-",
            ]
            for p in found
        ],
    )
    if not found:
        print(s.dim("no approval gate waits for you"))
    return 0


def add_approval_commands(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "approve",
        parents=parents,
        help="approve (or --reject) an approval gate step of a workflow",
        description="Decide an approval gate step that is WAITING_FOR_HUMAN. The decision "
        "is recorded and attested as the caller's (the token's subject), which needs the "
        "reviewer role and must be one of the gate's approvers.",
    )
    p.add_argument("workflow_id", help="the workflow (wf_...)")
    p.add_argument("step", help="the approval gate step's name")
    p.add_argument("--reject", action="store_true", help="reject instead of approving")
    p.add_argument("--comment", default="", help="why; recorded with the decision")
    p.set_defaults(func=run_command(approve_command))

    p = sub.add_parser(
        "pending-approvals",
        parents=parents,
        help="the approval gates waiting that you may decide, oldest first",
    )
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.set_defaults(func=run_command(pending_command))
