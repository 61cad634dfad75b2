"""`jobtrace schedules`: list, show, create (from a YAML or JSON file), update,
pause, resume, trigger and delete cron and interval schedules."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format

from jobtrace.cli import render
from jobtrace.cli.client_commands import collect, run_command
from jobtrace.cli.render import Style, as_json, print_json, state_name, when
from jobtrace.client import Client
from jobtrace.pb import schedule_service_pb2 as spb


def schedule_from_file(path: str) -> spb.Schedule:
    """A Schedule in its proto3 JSON form, written as YAML or JSON."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping (a Schedule), got {type(data).__name__}")
    try:
        return json_format.ParseDict(data, spb.Schedule())
    except json_format.ParseError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _when(s: spb.Schedule) -> str:
    if s.cron:
        return f"{s.cron} ({s.time_zone or 'UTC'})"
    return f"every {s.interval.ToJsonString()}"


def _show(s: spb.Schedule) -> None:
    state = "paused" if s.paused else "active"
    print(f"{s.id}: {_when(s)}, {state}")
    last = f"{s.last_run_id} {state_name(s.last_run_state)}" if s.last_run_id else "-"
    print(f"  next run {when(s.next_run_time)}, last run {when(s.last_run_time)} {last}")


def _print(args: argparse.Namespace, s: spb.Schedule) -> int:
    if args.json:
        print_json(as_json(s))
    else:
        _show(s)
    return 0


async def list_command(args: argparse.Namespace, client: Client) -> int:
    found, token = await collect(
        lambda t: client.list_schedules(page_size=min(args.limit, 1000), page_token=t),
        args.limit,
    )
    if args.json:
        print_json({"schedules": [as_json(s) for s in found], "next_page_token": token})
        return 0
    render.table(
        ["ID", "WHEN", "STATE", "NEXT RUN", "LAST RUN", "LAST RUN STATE"],
        [
            [
                s.id,
                _when(s),
                "paused" if s.paused else "active",
                when(s.next_run_time),
                when(s.last_run_time),
                state_name(s.last_run_state) if s.last_run_id else "-",
            ]
            for s in found
        ],
    )
    if not found:
        print(Style.choose("auto", sys.stdout).dim("no schedules"))
    return 0


async def get_command(args: argparse.Namespace, client: Client) -> int:
    return _print(args, await client.get_schedule(args.schedule_id))


async def create_command(args: argparse.Namespace, client: Client) -> int:
    return _print(args, await client.create_schedule(schedule_from_file(args.file)))


async def update_command(args: argparse.Namespace, client: Client) -> int:
    return _print(args, await client.update_schedule(schedule_from_file(args.file)))


async def pause_command(args: argparse.Namespace, client: Client) -> int:
    return _print(args, await client.pause_schedule(args.schedule_id))


async def resume_command(args: argparse.Namespace, client: Client) -> int:
    return _print(args, await client.resume_schedule(args.schedule_id))


async def trigger_command(args: argparse.Namespace, client: Client) -> int:
    fired = await client.trigger_schedule(args.schedule_id, request_id=args.request_id)
    if args.json:
        print_json(as_json(fired))
    else:
        print(fired.run_id)
    return 0


async def delete_command(args: argparse.Namespace, client: Client) -> int:
    await client.delete_schedule(args.schedule_id)
    if args.json:
        print_json({"deleted": args.schedule_id})
    else:
        print(f"{args.schedule_id}: deleted")
    return 0


def add_schedule_commands(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    group = sub.add_parser(
        "schedules", help="cron and interval schedules of a job or workflow"
    ).add_subparsers(dest="schedules_command", required=True)
    p = group.add_parser("list", parents=parents, help="the schedules, with last and next runs")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.set_defaults(func=run_command(list_command))
    for name, func, text in (
        ("get", get_command, "show a schedule"),
        ("pause", pause_command, "pause a schedule (no tick fires until resumed)"),
        ("resume", resume_command, "resume a paused schedule from now"),
        ("delete", delete_command, "delete a schedule (its runs are kept)"),
    ):
        p = group.add_parser(name, parents=parents, help=text)
        p.add_argument("schedule_id", help="the schedule's id")
        p.set_defaults(func=run_command(func))
    for name, func, text in (
        ("create", create_command, "create a schedule from a YAML or JSON file"),
        ("update", update_command, "replace a schedule's definition from a YAML or JSON file"),
    ):
        p = group.add_parser(
            name,
            parents=parents,
            help=text,
            description="FILE holds a Schedule in its proto3 JSON form, as YAML or JSON, "
            'e.g. {id: nightly, cron: "30 2 * * *", time_zone: Europe/Berlin, '
            "job: {job: {service: report}}}.",
        )
        p.add_argument("file", help="the schedule (YAML or JSON)")
        p.set_defaults(func=run_command(func))
    p = group.add_parser("trigger", parents=parents, help="start the schedule's run now")
    p.add_argument("schedule_id", help="the schedule's id")
    p.add_argument("--request-id", help="makes a retried trigger return the same run")
    p.set_defaults(func=run_command(trigger_command))
