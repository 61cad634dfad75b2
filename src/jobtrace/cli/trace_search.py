"""`jobtrace trace search QUERY`: trace events across runs by their words."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from jobtrace.cli import render
from jobtrace.cli.render import Style, as_json, print_json, when
from jobtrace.client import Client
from jobtrace.pb import common_pb2

SYNTAX = (
    'QUERY: words (all must match), "a phrase", a OR b, -excluded, prefix*; '
    "words are letters and digits, matched whole and without regard to case. A query "
    'that starts with "-" goes last, after "--": jobtrace trace search --json -- "-retry oom"'
)
_MATCH = re.compile("«([^«»]*)»")


async def trace_search(args: argparse.Namespace, client: Client) -> int:
    # Imported here: client_commands registers this command.
    from jobtrace.cli.client_commands import collect, parse_when, whole

    found, token = await collect(
        lambda t: client.search_trace_events(
            args.query,
            run_id=args.run or "",
            min_level=args.level,
            category=args.category,
            type=args.type,
            service=args.service or "",
            since=parse_when(args.since) if args.since else None,
            until=parse_when(args.until) if args.until else None,
            page_size=min(args.limit, 1000),
            page_token=t,
            view=whole(args),
        ),
        args.limit,
    )
    if args.json:
        print_json({"hits": [as_json(h) for h in found], "next_page_token": token})
        return 0
    s = Style.choose(args.color, sys.stdout)
    for hit in found:
        e = hit.event
        kind = common_pb2.TraceEventType.Name(e.type).removeprefix("TRACE_EVENT_TYPE_")
        snippet = _MATCH.sub(lambda m: s.bold(m.group(1)) if s.enabled else m.group(0), hit.snippet)
        print(
            f"{when(e.timestamp)} {s.level(e.level, render.level_name(e.level).ljust(8))} "
            f"{kind.ljust(9)} {s.dim(e.id)}  {snippet}"
        )
    if token:
        print(f"more: --limit {args.limit * 2} shows more", file=sys.stderr)
    return 0


def add_parser(trace: Any, parents: list[argparse.ArgumentParser], run: Any) -> None:
    """Register `trace search` on the `trace` sub-parsers; `run` wraps the command."""
    p = trace.add_parser(
        "search",
        parents=parents,
        help="find trace events across runs by their words",
        description="Find trace events across runs by the words of their message or "
        "user message, newest first; matches are shown between « and » (bold on a terminal).",
        epilog=SYNTAX,
    )
    p.add_argument("query", help='e.g. "CUDA OOM", \'"out of memory" -retry\', cud*')
    p.add_argument("--run", help="only events of this run (workflow or standalone job id)")
    p.add_argument("--level", help="minimum level: debug, info, warn, error, critical")
    p.add_argument("--category", help="business or technical")
    p.add_argument("--type", help="started, progress, completed, failed or log")
    p.add_argument("--service", help="only events of jobs of this service")
    p.add_argument("--since", help="from this time (ISO 8601, or an age: 10m, 2h)")
    p.add_argument("--until", help="up to this time")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.set_defaults(func=run(trace_search))
