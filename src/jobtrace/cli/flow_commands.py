"""CLI commands of flow control: `jobtrace rate-limits [create | update | delete]`
(the tenant's named rate limits)."""

from __future__ import annotations

import argparse
from typing import Any

from jobtrace.cli import render
from jobtrace.cli.client_commands import client_options, run_command
from jobtrace.cli.render import as_json, print_json, when
from jobtrace.client import Client
from jobtrace.pb import schedule_service_pb2

HEADERS = ["KEY", "RATE", "BURST", "CREATED BY", "UPDATED AT"]


def _period(limit: schedule_service_pb2.RateLimit) -> str:
    seconds = limit.period.seconds + limit.period.nanos / 1e9
    return f"{limit.count}/{seconds:g}s"


def row(limit: schedule_service_pb2.RateLimit) -> list[str]:
    return [
        limit.key,
        _period(limit),
        str(limit.burst),
        limit.created_by or "-",
        when(limit.update_time),
    ]


def parse_rate(text: str) -> tuple[int, float]:
    """COUNT/PERIOD: "10/s", "600/m", "5/2.5s", "100/h", "10" (per second)."""
    count, sep, period = text.partition("/")
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    try:
        n = int(count)
        if not sep:
            return n, 1.0
        unit = period[-1:] if period[-1:] in units else "s"
        number = period[:-1] if period[-1:] in units else period
        return n, (float(number) if number else 1.0) * units[unit]
    except ValueError:
        raise ValueError(
            f"RATE must be COUNT/PERIOD such as 10/s or 600/m (got {text!r})"
        ) from None


async def list_limits(args: argparse.Namespace, client: Client) -> int:
    found = await client.list_rate_limits()
    if args.json:
        print_json({"rate_limits": [as_json(x) for x in found]})
        return 0
    render.table(HEADERS, [row(x) for x in found])
    return 0


async def create(args: argparse.Namespace, client: Client) -> int:
    count, per = parse_rate(args.rate)
    limit = await client.create_rate_limit(args.key, count, per, burst=args.burst)
    return _print(args, limit)


async def update(args: argparse.Namespace, client: Client) -> int:
    count, per = parse_rate(args.rate)
    limit = await client.update_rate_limit(args.key, count, per, burst=args.burst)
    return _print(args, limit)


async def delete(args: argparse.Namespace, client: Client) -> int:
    await client.delete_rate_limit(args.key)
    if args.json:
        print_json({"deleted": args.key})
    else:
        print(f"{args.key}: deleted")
    return 0


def _print(args: argparse.Namespace, limit: schedule_service_pb2.RateLimit) -> int:
    if args.json:
        print_json(as_json(limit))
    else:
        print(f"{limit.key}: {_period(limit)}, burst {limit.burst}")
    return 0


def add_commands(sub: Any) -> None:
    """Register `jobtrace rate-limits` on the top-level sub-parsers."""
    conn = client_options()
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser(
        "rate-limits",
        parents=[conn, out],
        help="the tenant's named rate limits; create, update or delete one",
        description="Without a subcommand: a table of the tenant's rate limits. Jobs use "
        "them with `jobtrace submit --rate-limit KEY`.",
    )
    p.set_defaults(func=run_command(list_limits))
    actions = p.add_subparsers(dest="rate_limits_command", metavar="{create,update,delete}")
    for name, func, what in (
        ("create", create, "create a named rate limit (admin)"),
        ("update", update, "change a limit's rate and burst (admin)"),
    ):
        q = actions.add_parser(name, parents=[conn, out], help=what)
        q.add_argument("key", help="the limit's name, e.g. openai")
        q.add_argument("rate", help="COUNT/PERIOD: 10/s, 600/m, 5/2.5s")
        q.add_argument("--burst", type=int, default=0, help="tokens at most (default COUNT)")
        q.set_defaults(func=run_command(func))
    q = actions.add_parser("delete", parents=[conn, out], help="delete a rate limit (admin)")
    q.add_argument("key", help="the limit's name")
    q.set_defaults(func=run_command(delete))
