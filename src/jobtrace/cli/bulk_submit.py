"""`jobtrace submit --bulk FILE.jsonl`: many jobs through SubmitJobs, in chunks,
with a progress bar on stderr and a summary."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from jobtrace.cli.render import as_json, bar, print_json
from jobtrace.client import Client
from jobtrace.client.api import bulk_job_requests
from jobtrace.client.errors import FieldViolation, InvalidInput

_ITEM = re.compile(r"items\[(\d+)\]")


def read_jsonl(text: str, source: str) -> list[dict[str, Any]]:
    """One JSON object per line (blank lines skipped); InvalidInput naming
    each bad line."""
    items: list[dict[str, Any]] = []
    bad: list[FieldViolation] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append(FieldViolation(f"line {number}", f"not JSON: {exc.msg}"))
            continue
        if not isinstance(value, dict):
            bad.append(FieldViolation(f"line {number}", "must be a JSON object"))
            continue
        value["__line"] = number
        items.append(value)
    if bad:
        raise InvalidInput(bad, source=source)
    if not items:
        raise InvalidInput("no jobs in the file (one JSON object per line)", source=source)
    return items


async def submit_bulk(args: argparse.Namespace, client: Client) -> int:
    """Submit the jobs a JSONL file holds ({service, payload, request_id?,
    ...JobSpec fields, request_context?, annotations?} per line)."""
    from jobtrace.cli.client_commands import read_text

    source = args.bulk if args.bulk != "-" else "stdin"
    items = read_jsonl(read_text(args.bulk), source)
    lines = [int(item.pop("__line")) for item in items]

    def line_of(text: str) -> str:
        return _ITEM.sub(lambda m: f"line {lines[int(m.group(1))]}", text)

    try:
        requests = bulk_job_requests(items)
    except InvalidInput as exc:
        raise InvalidInput(
            [FieldViolation(line_of(v.field), v.description) for v in exc.violations],
            source=source,
        ) from None
    total = len(requests)
    tty = sys.stderr.isatty()

    def progress(done: int) -> None:
        text = f"{bar(done / total)} {done}/{total} jobs"
        if tty:
            print("\r" + text, end="" if done < total else "\n", file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)

    try:
        results = await client.submit_jobs(
            requests, chunk=args.chunk, concurrency=args.bulk_concurrency, on_progress=progress
        )
    except InvalidInput:
        raise
    except Exception as exc:
        # Name the file's lines, not the call's items.
        if hasattr(exc, "violations") and hasattr(exc, "message"):
            exc.message = line_of(exc.message)
            exc.violations = tuple(
                FieldViolation(line_of(v.field), v.description) for v in exc.violations
            )
        raise
    new = sum(1 for r in results if r.HasField("job") and not r.deduplicated)
    deduplicated = sum(1 for r in results if r.deduplicated)
    refused = [(i, r) for i, r in enumerate(results) if r.HasField("error")]
    for i, r in refused:
        print(
            f"line {lines[i]} ({requests[i].request_id}): {r.error.reason}: {r.error.message}",
            file=sys.stderr,
        )
    print(
        f"submitted {total} jobs from {source}: {new} new, {deduplicated} deduplicated,"
        f" {len(refused)} refused",
        file=sys.stderr,
    )
    if args.json:
        print_json(
            {
                "submitted": total,
                "new": new,
                "deduplicated": deduplicated,
                "refused": len(refused),
                "results": [as_json(r) for r in results],
            }
        )
    else:
        for r in results:
            print(r.job.id if r.HasField("job") else "-")
    return 1 if refused else 0
