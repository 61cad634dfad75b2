"""CLI commands that talk to a running server: submit, watch, get, cancel, terminate, rerun, jobs,
workflows, trace, attest, annotate, annotations, failures, keys list|export."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from jobtrace import conventions
from jobtrace.cli import render, trace_search
from jobtrace.cli.render import Style, as_json, print_json, state_name, when
from jobtrace.cli.run_reports import add_trace_reports
from jobtrace.client import Client, Endpoint
from jobtrace.client.api import (
    Page,
    concurrency_key,
    job_payload,
    job_result,
    parse_requirement,
    rate_limit_use,
)
from jobtrace.client.workflow_file import SCHEMA, load_workflow
from jobtrace.ids import run_kind
from jobtrace.pb import attestation_service_pb2, common_pb2

Command = Callable[[argparse.Namespace, Client], Awaitable[int]]


def client_options() -> argparse.ArgumentParser:
    """Options shared by every command that calls the server (also JOBTRACE_* variables)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection (defaults from JOBTRACE_TARGET, JOBTRACE_TOKEN, ...)")
    g.add_argument("--target", help="server HOST:PORT (JOBTRACE_TARGET, default 127.0.0.1:50051)")
    g.add_argument("--token", help="bearer token (JOBTRACE_TOKEN)")
    g.add_argument("--tls", action="store_true", default=None, help="use TLS (JOBTRACE_TLS=1)")
    g.add_argument("--tls-ca", help="CA certificate of the server, PEM (JOBTRACE_TLS_CA)")
    g.add_argument("--client-cert", help="client certificate, PEM (JOBTRACE_CLIENT_CERT)")
    g.add_argument("--client-key", help="client private key, PEM (JOBTRACE_CLIENT_KEY)")
    g.add_argument("--tls-server-name", help="name expected in the server certificate")
    g.add_argument("--timeout", type=float, default=10.0, help="deadline per call, s (10)")
    return p


def endpoint_of(args: argparse.Namespace) -> Endpoint:
    return Endpoint.from_env(
        target=args.target,
        token=args.token,
        tls=args.tls,
        ca_file=args.tls_ca,
        client_cert_file=args.client_cert,
        client_key_file=args.client_key,
        server_name=args.tls_server_name,
    )


def run_command(command: Command) -> Callable[[argparse.Namespace], int]:
    """Run an async command with a client built from the connection options."""

    def run(args: argparse.Namespace) -> int:
        async def main() -> int:
            async with Client(endpoint=endpoint_of(args), timeout=args.timeout) as client:
                return await command(args, client)

        return asyncio.run(main())

    return run


# --- parsing helpers ------------------------------------------------------------------

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")


def parse_when(text: str) -> datetime:
    """An ISO 8601 time (UTC unless it says otherwise) or an age: 30s, 10m, 2h, 1d."""
    if m := _RELATIVE.match(text.strip()):
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: float(m.group(1))})
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time: {text!r} (ISO 8601, or an age such as 10m, 2h)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object")
    return value


def read_text(path: str) -> str:
    return sys.stdin.read() if path == "-" else Path(path).read_text()


def write_file(path: str, text: str) -> None:
    Path(path).write_text(text)


def _weight_suffix(item: str) -> tuple[str, float | None]:
    """ "text:3.5" -> ("text", 3.5); no number after the last colon -> (item, None)."""
    head, sep, tail = item.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return item, None


def parse_placement(
    required: list[str] | None, preferred: list[str] | None
) -> list[common_pb2.LabelRequirement]:
    """--require EXPR and --prefer EXPR[:WEIGHT] as label requirements."""
    out = [parse_requirement(item) for item in required or []]
    for item in preferred or []:
        expr, weight = _weight_suffix(item)
        out.append(parse_requirement(expr, required=False, weight=weight or 0.0))
    return out


def parse_weights(items: list[str] | None) -> dict[str, float]:
    """--affinity-weight KEY:WEIGHT (the last colon splits)."""
    weights: dict[str, float] = {}
    for item in items or []:
        key, weight = _weight_suffix(item)
        if weight is None or not key:
            raise ValueError(f"--affinity-weight wants KEY:WEIGHT, e.g. my-model:10 (got {item!r})")
        weights[key] = weight
    return weights


def parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} must be KEY=VALUE, got {item!r}")
        pairs[key] = value
    return pairs


# --- submit, get, cancel, watch ------------------------------------------------------


async def submit(args: argparse.Namespace, client: Client) -> int:
    if args.bulk:
        if args.service or args.workflow:
            raise ValueError("give one of SERVICE, --workflow FILE and --bulk FILE")
        from jobtrace.cli.bulk_submit import submit_bulk

        return await submit_bulk(args, client)
    if args.workflow:
        if args.service:
            raise ValueError("give either SERVICE (a job) or --workflow FILE, not both")
        workflow = await submit_workflow_file(client, args.workflow, args.request_id)
        print(
            f"submitted workflow {workflow.name!r} ({len(workflow.steps)} steps): "
            f"{state_name(workflow.state)}",
            file=sys.stderr,
        )
        if args.json:
            print_json(as_json(workflow))
        else:
            print(workflow.id)
        run_id = workflow.id
    else:
        if not args.service:
            raise ValueError("give the SERVICE to run (or --workflow FILE)")
        if args.payload is not None and args.payload_file:
            raise ValueError("give the payload as an argument or with --payload-file, not both")
        payload: dict[str, Any] | None = None
        if args.payload is not None:
            payload = parse_json_object(args.payload, "the payload")
        elif args.payload_file:
            payload = parse_json_object(read_text(args.payload_file), args.payload_file)
        context = {"user_context": {"user_id": args.user}} if args.user else None
        job = await client.submit_job(
            args.service,
            payload,
            request_id=args.request_id,
            priority=args.priority,
            max_attempts=args.max_attempts,
            timeout=args.job_timeout,
            not_before=parse_when(args.not_before) if args.not_before else None,
            affinity_keys=args.affinity or (),
            labels=parse_pairs(args.label, "--label"),
            request_context=context,
            worker_labels=parse_placement(args.require, args.prefer),
            affinity=parse_weights(args.affinity_weight),
            rate_limits=[rate_limit_use(x) for x in args.rate_limit or ()],
            concurrency=concurrency_key(args.concurrency) if args.concurrency else None,
        )
        print(f"submitted job for {job.spec.service!r}: {state_name(job.state)}", file=sys.stderr)
        if args.json:
            print_json(as_json(job))
        else:
            print(job.id)
        run_id = job.id
    if args.watch:
        from jobtrace.cli.watch import watch

        style = Style.choose(args.color, sys.stdout)
        return await watch(
            client, run_id, sys.stdout, json_lines=args.json, style=style, live=_live(args)
        )
    return 0


async def submit_workflow_file(
    client: Client, path: str, request_id: str | None
) -> common_pb2.Workflow:
    """Submit the workflow a YAML/JSON file describes (jobtrace.client.workflow_file.SCHEMA)."""
    workflow = load_workflow(read_text(path), source=path)
    return await client.submit_workflow(
        workflow.name,
        workflow.steps,
        request_id=request_id or workflow.request_id,
        priority=workflow.priority,
        labels=workflow.labels,
        request_context=workflow.request_context,
        annotations=workflow.annotations,
        timeout=workflow.timeout,
    )


async def watch_command(args: argparse.Namespace, client: Client) -> int:
    from jobtrace.cli.watch import watch

    style = Style.choose(args.color, sys.stdout)
    return await watch(
        client, args.id, sys.stdout, json_lines=args.json, style=style, live=_live(args)
    )


def _live(args: argparse.Namespace) -> bool:
    return not args.json and not args.plain and sys.stdout.isatty()


async def get(args: argparse.Namespace, client: Client) -> int:
    kind = _kind(args.id)
    if kind == "workflow":
        workflow = await client.get_workflow(args.id)
        if args.json:
            print_json(as_json(workflow))
        else:
            describe_workflow(workflow, Style.choose("auto", sys.stdout))
    else:
        job = await client.get_job(args.id)
        if args.json:
            print_json(as_json(job))
        else:
            describe_job(job, Style.choose("auto", sys.stdout))
    return 0


async def cancel(args: argparse.Namespace, client: Client) -> int:
    if _kind(args.id) == "workflow":
        workflow = await client.cancel_workflow(args.id, args.reason)
        print_json(as_json(workflow)) if args.json else print(
            f"{workflow.id}: {state_name(workflow.state)}"
        )
    else:
        job = await client.cancel_job(args.id, args.reason)
        print_json(as_json(job)) if args.json else print(f"{job.id}: {state_name(job.state)}")
    return 0


async def terminate(args: argparse.Namespace, client: Client) -> int:
    if _kind(args.id) == "workflow":
        workflow = await client.terminate_workflow(args.id, args.reason)
        print_json(as_json(workflow)) if args.json else print(
            f"{workflow.id}: {state_name(workflow.state)}"
        )
    else:
        job = await client.terminate_job(args.id, args.reason)
        print_json(as_json(job)) if args.json else print(f"{job.id}: {state_name(job.state)}")
    return 0


async def rerun(args: argparse.Namespace, client: Client) -> int:
    """A new run of an ended job or workflow, with its lineage."""
    if _kind(args.id) == "workflow":
        workflow = await client.rerun_workflow(
            args.id,
            from_steps=args.from_steps or (),
            failed_only=args.failed_only,
            reason=args.reason,
            request_id=args.request_id,
        )
        if args.json:
            print_json(as_json(workflow))
            return 0
        print(f"{workflow.id}: {state_name(workflow.state)} (rerun of {workflow.parent_run_id})")
        reused = [s.name for s in workflow.steps if s.reused_from]
        fresh = [s.name for s in workflow.steps if not s.reused_from]
        if reused:
            print("carried over: " + ", ".join(reused))
        print("runs again: " + ", ".join(fresh))
        return 0
    if args.from_steps or args.failed_only:
        raise ValueError("--from and --failed-only are for a workflow; a job is rerun whole")
    job = await client.rerun_job(args.id, reason=args.reason, request_id=args.request_id)
    if args.json:
        print_json(as_json(job))
    else:
        print(f"{job.id}: {state_name(job.state)} (rerun of {job.parent_run_id})")
    return 0


def _kind(run_id: str) -> str:
    kind = run_kind(run_id)
    if not kind:
        raise ValueError(f"{run_id!r} is neither a job id (job_...) nor a workflow id (wf_...)")
    return kind


def describe_job(job: common_pb2.Job, s: Style) -> None:
    rows = [
        ("id", job.id),
        ("service", job.spec.service),
        ("state", s.state(job.state)),
    ]
    if job.waiting_reason:
        reason = common_pb2.WaitingReason.Name(job.waiting_reason)
        rows.append(("waiting", reason.removeprefix("WAITING_REASON_").lower().replace("_", " ")))
    rows += [
        ("attempt", str(job.attempt)),
        ("progress", f"{job.progress.percent:.0f}% {job.progress.message}".rstrip()),
        ("workflow", f"{job.workflow_id} step {job.step_name}" if job.workflow_id else "-"),
        ("worker", job.worker_id or "-"),
        ("submitter", job.submitted_by or "-"),
        ("created", when(job.created_at)),
        ("started", when(job.started_at)),
        ("completed", when(job.completed_at)),
        ("payload", json.dumps(job_payload(job)) if _has_payload(job) else "-"),
    ]
    if job.HasField("result") or job.result_json:
        rows.append(("result", json.dumps(job_result(job))))
    if job.HasField("failure"):
        f = job.failure
        rows.append(("failure", f"{f.code or '-'}: {f.reason} (retryable: {f.retryable})"))
    if job.spec.worker_labels:
        rows.append(("requires", ", ".join(_requirement_text(r) for r in job.spec.worker_labels)))
    if job.spec.affinity:
        rows.append(("affinity", ", ".join(f"{a.key}:{a.weight:g}" for a in job.spec.affinity)))
    for key, value in rows:
        print(f"{key:>10}  {value}")


_OPS = {0: "=", 1: "=", 2: "!=", 3: ">", 4: ">=", 5: "<", 6: "<="}


def _requirement_text(r: common_pb2.LabelRequirement) -> str:
    """ "gpu=a100", "vram_gb>=40", "zone=eu (prefer 5)"."""
    kind = r.value.WhichOneof("kind")
    value = r.value.string_value if kind == "string_value" else f"{r.value.number_value:g}"
    text = f"{r.key}{_OPS.get(r.comparator, '?')}{value}"
    return text if r.required else f"{text} (prefer {r.weight:g})"


def _has_payload(job: common_pb2.Job) -> bool:
    return bool(job.spec.payload_json) or job.spec.HasField("payload")


def describe_workflow(workflow: common_pb2.Workflow, s: Style) -> None:
    p = workflow.progress
    print(f"{'id':>10}  {workflow.id}")
    print(f"{'name':>10}  {workflow.name}")
    print(f"{'state':>10}  {s.state(workflow.state)}")
    print(f"{'progress':>10}  {p.completed_steps}/{p.total_steps} steps")
    print(f"{'submitter':>10}  {workflow.submitted_by or '-'}")
    print(f"{'created':>10}  {when(workflow.created_at)}")
    print(f"{'completed':>10}  {when(workflow.completed_at)}")
    if workflow.HasField("paused_at"):
        why = f": {workflow.pause_reason}" if workflow.pause_reason else ""
        print(f"{'paused':>10}  {when(workflow.paused_at)}{why}")
    if workflow.HasField("failure"):
        print(f"{'failure':>10}  {workflow.failure.code or '-'}: {workflow.failure.reason}")
    render.table(
        ["  STEP", "STATE", "ATTEMPT", "JOB", "DEPENDS ON"],
        [
            [
                "  "
                + step.name
                + (
                    f" (approval {step.approval.approvals}/{step.approval.gate.min_approvals})"
                    if step.HasField("approval")
                    else ""
                ),
                s.state(step.state),
                str(step.attempt),
                step.job_id,
                ",".join(step.depends_on) or "-",
            ]
            for step in workflow.steps
        ],
    )


# --- lists ---------------------------------------------------------------------------


def whole(args: argparse.Namespace) -> str | None:
    """The list view a command asks for: --json prints items whole (FULL); a
    table shows only what the default (BASIC) view returns."""
    return "full" if args.json else None


async def collect(
    fetch: Callable[[str], Awaitable[Page[Any]]], limit: int
) -> tuple[list[Any], str]:
    """Up to `limit` items, page after page; and the token to continue from."""
    items, token, _ = await collect_counted(fetch, limit)
    return items, token


async def collect_counted(
    fetch: Callable[[str], Awaitable[Page[Any]]], limit: int
) -> tuple[list[Any], str, int | None]:
    """As collect, with the total the last page read counted (None unless asked)."""
    items: list[Any] = []
    token = ""
    while True:
        page = await fetch(token)
        items += page.items
        token = page.next_page_token
        if not token or len(items) >= limit:
            return items[:limit], token if len(items) <= limit else "", page.total_size


def run_filters(args: argparse.Namespace) -> dict[str, Any]:
    """The filters across runs that `jobs` and `workflows` share."""
    return {
        "labels": parse_pairs(args.label, "--label"),
        "user_id": args.user or "",
        "created_after": parse_when(args.since) if args.since else None,
        "created_before": parse_when(args.until) if args.until else None,
        "include_total": args.total,
    }


def listed(kind: str, found: list[Any], token: str, total: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {kind: [as_json(x) for x in found], "next_page_token": token}
    if total is not None:
        out["total_size"] = total
    return out


def print_total(shown: int, total: int | None) -> None:
    if total is not None:
        print(f"{shown} shown of {total} matching")


async def jobs(args: argparse.Namespace, client: Client) -> int:
    filters = run_filters(args)
    found, token, total = await collect_counted(
        lambda t: client.list_jobs(
            state=args.state,
            service=args.service or "",
            workflow_id=args.workflow or "",
            worker_id=args.worker or "",
            parent_run_id=args.parent or "",
            root_run_id=args.root or "",
            **filters,
            page_size=min(args.limit, 1000),
            page_token=t,
            view=whole(args),
        ),
        args.limit,
    )
    if args.json:
        print_json(listed("jobs", found, token, total))
        return 0
    s = Style.choose("auto", sys.stdout)
    render.table(
        ["ID", "SERVICE", "STATE", "ATTEMPT", "PROGRESS", "WORKER", "CREATED"],
        [
            [
                j.id,
                j.spec.service,
                s.state(j.state),
                str(j.attempt),
                f"{j.progress.percent:.0f}%",
                j.worker_id or "-",
                when(j.created_at),
            ]
            for j in found
        ],
    )
    print_total(len(found), total)
    return 0


async def workflows(args: argparse.Namespace, client: Client) -> int:
    filters = run_filters(args)
    found, token, total = await collect_counted(
        lambda t: client.list_workflows(
            state=args.state,
            name=args.name or "",
            parent_run_id=args.parent or "",
            root_run_id=args.root or "",
            **filters,
            page_size=min(args.limit, 1000),
            page_token=t,
            view=whole(args),
        ),
        args.limit,
    )
    if args.json:
        print_json(listed("workflows", found, token, total))
        return 0
    s = Style.choose("auto", sys.stdout)
    render.table(
        ["ID", "NAME", "STATE", "STEPS", "CREATED", "COMPLETED"],
        [
            [
                w.id,
                w.name,
                s.state(w.state),
                f"{w.progress.completed_steps}/{w.progress.total_steps}",
                when(w.created_at),
                when(w.completed_at),
            ]
            for w in found
        ],
    )
    print_total(len(found), total)
    return 0


# --- trace ---------------------------------------------------------------------------


def trace_filters(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "min_level": args.level,
        "category": args.category,
        "node_id": args.node or "",
        "type": args.type,
        "since": parse_when(args.since) if args.since else None,
        "until": parse_when(args.until) if args.until else None,
        "milestones_only": args.milestones,
        "min_display_priority": args.min_priority or 0,
    }


def event_line(event: common_pb2.TraceEvent, s: Style) -> str:
    text = event.message
    if event.user_message and event.user_message != event.message:
        text += f" ({event.user_message})"
    if event.HasField("error") and event.error.message:
        text += f" — {event.error.code + ': ' if event.error.code else ''}{event.error.message}"
    if event.HasField("duration"):
        text += f" (took {event.duration.ToMicroseconds() / 1e6:.3f} s)"
    mark = "*" if event.milestone else " "
    kind = common_pb2.TraceEventType.Name(event.type).removeprefix("TRACE_EVENT_TYPE_")
    # A step's event: its place in the workflow (the workflow's own say it).
    place = (
        f" [{event.step_number}/{event.total_steps}]" if event.job_id and event.total_steps else ""
    )
    return (
        f"{s.dim(str(event.sequence).rjust(5))} {when(event.timestamp)} "
        f"{s.level(event.level, render.level_name(event.level).ljust(8))}{mark}"
        f"{kind.ljust(9)} {event.node_id}{place}: {text}"
    )


async def trace_list(args: argparse.Namespace, client: Client) -> int:
    events: list[common_pb2.TraceEvent] = []
    cursor = args.cursor or ""
    more = True
    while more and len(events) < args.limit:
        page = await client.list_trace_events(
            args.run_id,
            cursor=cursor,
            page_size=min(1000, args.limit - len(events)),
            view=whole(args),
            **trace_filters(args),
        )
        events += page.events
        cursor, more = page.next_cursor or cursor, page.more
    if args.json:
        print_json({"events": [as_json(e) for e in events], "next_cursor": cursor, "more": more})
        return 0
    s = Style.choose(args.color, sys.stdout)
    for event in events:
        print(event_line(event, s))
    print(f"next cursor: {cursor}" + (" (more)" if more else ""), file=sys.stderr)
    return 0


async def trace_tail(args: argparse.Namespace, client: Client) -> int:
    s = Style.choose(args.color, sys.stdout)
    async for item in client.stream_trace_events(
        args.run_id, cursor=args.cursor or "", follow=not args.no_follow, **trace_filters(args)
    ):
        if item.WhichOneof("kind") == "event":
            if args.json:
                print_json({"event": as_json(item.event), "cursor": item.cursor})
            else:
                print(event_line(item.event, s), flush=True)
        elif item.WhichOneof("kind") == "final_status":
            status = item.final_status
            if args.json:
                print_json({"final_status": as_json(status), "cursor": item.cursor})
            else:
                print(f"run {status.run_id} ended {s.state(status.state)}", flush=True)
            return render.exit_code_for(status.state)
    return 0


# --- attestations and keys ---------------------------------------------------------


async def attest_get(args: argparse.Namespace, client: Client) -> int:
    a = await client.get_attestation(args.key)
    if args.json:
        print_json(as_json(a))
        return 0
    kind = attestation_service_pb2.AttestationType.Name(a.type).removeprefix("ATTESTATION_TYPE_")
    for key, value in [
        ("key", a.key),
        ("type", kind.lower()),
        ("entity", f"{a.entity_type} {a.entity_id}"),
        ("state", state_name(a.state)),
        ("worker", a.worker_id or "-"),
        ("attempt", str(a.attempt)),
        ("recorder", a.recorded_by or "-"),
        ("created", when(a.create_time)),
        ("expires", when(a.expire_time)),
        ("digest", a.digest),
        ("previous", a.previous_digest or "-"),
        ("key id", a.key_id),
    ]:
        print(f"{key:>9}  {value}")
    print(json.dumps(as_json(a.data), indent=2, ensure_ascii=False))
    return 0


async def attest_list(args: argparse.Namespace, client: Client) -> int:
    found, token = await collect(
        lambda t: client.list_attestations(
            workflow_id=args.workflow or "",
            job_id=args.job or "",
            type=args.type,
            state=args.state,
            service=args.service or "",
            user_id=args.user or "",
            worker_id=args.worker or "",
            since=parse_when(args.since) if args.since else None,
            until=parse_when(args.until) if args.until else None,
            page_size=min(args.limit, 1000),
            page_token=t,
            view=whole(args),
        ),
        args.limit,
    )
    if args.json:
        print_json({"attestations": [as_json(a) for a in found], "next_page_token": token})
        return 0
    render.table(
        ["KEY", "STATE", "ATTEMPT", "CREATED", "DIGEST"],
        [
            [a.key, state_name(a.state), str(a.attempt), when(a.create_time), a.digest[:23]]
            for a in found
        ],
    )
    return 0


async def attest_verify_online(args: argparse.Namespace, client: Client) -> int:
    verdict = await client.verify_attestation(args.target_key)
    if args.json:
        print_json(as_json(verdict) | {"valid": verdict.valid})
    elif verdict.valid:
        checked = (
            "signature, chain and annotations"
            if verdict.annotations_attested
            else "signature and chain"
        )
        print(f"{args.target_key}: valid ({checked})")
    else:
        print(f"{args.target_key}: INVALID: {verdict.reason}")
    return 0 if verdict.valid else 1


async def attest_export(args: argparse.Namespace, client: Client) -> int:
    envelope = await client.export_attestation(args.key)
    text = json.dumps(envelope, indent=2) + "\n"
    if args.output and args.output != "-":
        write_file(args.output, text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


async def keys_list(args: argparse.Namespace, client: Client) -> int:
    keys = await client.get_signing_keys()
    if args.json:
        print_json({"keys": [as_json(k) for k in keys]})
        return 0
    render.table(
        ["KEY ID", "ALGORITHM", "ACTIVE", "CREATED", "PUBLIC KEY (hex)"],
        [
            [
                k.key_id,
                k.algorithm,
                "yes" if k.active else "no",
                when(k.create_time),
                k.public_key.hex(),
            ]
            for k in keys
        ],
    )
    return 0


async def keys_export(args: argparse.Namespace, client: Client) -> int:
    """A public signing key as PEM: the active one, or --key-id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    keys = await client.get_signing_keys()
    chosen = [k for k in keys if (k.key_id == args.key_id if args.key_id else k.active)]
    if not chosen:
        raise ValueError(f"no signing key {args.key_id!r}" if args.key_id else "no active key")
    pem = (
        Ed25519PublicKey.from_public_bytes(chosen[0].public_key)
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    if args.output and args.output != "-":
        write_file(args.output, pem)
        print(f"wrote {args.output} ({chosen[0].key_id})", file=sys.stderr)
    else:
        sys.stdout.write(pem)
    return 0


# --- annotations -----------------------------------------------------------------------


def parse_actor(text: str) -> dict[str, str]:
    """KIND:ID[@VERSION], e.g. user:alice or model:ranker@2.1."""
    kind, sep, rest = text.partition(":")
    if not sep or not rest:
        raise ValueError(f"--actor must be KIND:ID[@VERSION], got {text!r}")
    ident, _, version = rest.partition("@")
    return {"kind": f"ACTOR_KIND_{kind.upper()}", "id": ident, "version": version}


def parse_value(text: str) -> Any:
    """JSON when it parses (numbers, booleans, objects), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def attribute_value(key: str, text: str) -> Any:
    """parse_value, except that a convention key typed as text keeps the text:
    `approval.policy.version=3` is the string "3", not the number."""
    value = parse_value(text)
    if conventions.check(key, value) is not None and conventions.check(key, text) is None:
        return text
    return value


async def annotate(args: argparse.Namespace, client: Client) -> int:
    pairs = parse_pairs(args.pairs, "an attribute")
    attributes = {k: attribute_value(k, v) for k, v in pairs.items()}
    if not attributes:
        raise ValueError("give at least one KEY=VALUE")
    stored = await client.attach_annotations(
        args.run_id,
        attributes,
        actor=parse_actor(args.actor),
        job_id=args.job or "",
        attempt=args.attempt,
        scope=args.scope,
        scope_id=args.scope_id or "",
        payload=parse_json_object(args.payload, "--payload") if args.payload else None,
        idempotency_key=args.idempotency_key,
        emit_event=args.emit_event,
    )
    if args.json:
        print_json({"annotations": [as_json(a) for a in stored]})
    else:
        for a in stored:
            print(f"{a.id}  {a.key} = {json.dumps(as_json(a.value))}")
    return 0


def scalar(text: str | None) -> str | float | bool | None:
    """A --equals value: a JSON number or bool (0.3, true), else the text itself
    (quote it as JSON, '"0.3"', to match a string that looks like a number)."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        return float(value)
    return text


async def annotations_command(args: argparse.Namespace, client: Client) -> int:
    found, token = await collect(
        lambda t: client.list_annotations(
            args.run_id or "",
            key=args.key or "",
            key_prefix=args.prefix or "",
            actor_id=args.actor or "",
            actor_kind=args.actor_kind,
            recorded_by=args.recorded_by or "",
            since=parse_when(args.since) if args.since else None,
            until=parse_when(args.until) if args.until else None,
            job_id=args.job or "",
            attempt=args.attempt,
            scope=args.scope,
            value_equals=scalar(args.equals),
            value_min=args.min,
            value_max=args.max,
            page_size=min(args.limit, 1000),
            page_token=t,
            view=whole(args),
        ),
        args.limit,
    )
    if args.json:
        print_json({"annotations": [as_json(a) for a in found], "next_page_token": token})
        return 0
    render.table(
        ["TIME", "KEY", "VALUE", "ACTOR", "RECORDED BY", "JOB", "ATTEMPT"],
        [
            [
                when(a.create_time),
                a.key,
                render.shorten(json.dumps(as_json(a.value), ensure_ascii=False), 40),
                f"{common_pb2.ActorKind.Name(a.actor.kind).removeprefix('ACTOR_KIND_').lower()}:"
                f"{a.actor.id}",
                a.recorded_by or "-",
                a.job_id or "-",
                str(a.attempt or "-"),
            ]
            for a in found
        ],
    )
    return 0


async def failures_command(args: argparse.Namespace, client: Client) -> int:
    groups = await client.summarize_failures(
        parse_when(args.since),
        until=parse_when(args.until) if args.until else None,
        service=args.service or "",
    )
    if args.json:
        print_json(
            {
                "groups": [
                    {
                        "kind": g.kind,
                        "service": g.service,
                        "count": g.count,
                        "last": {
                            "job_id": g.last.job_id,
                            "attempt": g.last.attempt,
                            "time": g.last.time.ToJsonString(),
                            "code": g.last.code,
                            "message": g.last.message,
                        },
                    }
                    for g in groups
                ]
            }
        )
        return 0
    render.table(
        ["KIND", "SERVICE", "COUNT", "LAST", "JOB", "CODE", "MESSAGE"],
        [
            [
                g.kind or "unclassified",
                g.service,
                str(g.count),
                when(g.last.time),
                g.last.job_id,
                g.last.code or "-",
                render.shorten(g.last.message, 60),
            ]
            for g in groups
        ],
    )
    return 0


# --- the parser ---------------------------------------------------------------------


def add_commands(sub: Any, attest: Any, keys: Any) -> None:
    """Register the client commands on the top-level, `attest` and `keys` sub-parsers."""
    conn = client_options()
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--json", action="store_true", help="print JSON instead of text")
    colour = argparse.ArgumentParser(add_help=False)
    colour.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    states = [state_name(v) for v in common_pb2.RunState.values()][1:]

    p = sub.add_parser(
        "submit",
        parents=[conn, out, colour],
        help="submit a job (SERVICE [PAYLOAD]) or a workflow (--workflow FILE)",
        description="Submit a job (SERVICE [PAYLOAD]) or a workflow (--workflow FILE).",
        epilog=SCHEMA,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("service", nargs="?", help="the service (capability) that runs the job")
    p.add_argument("payload", nargs="?", help="the job's payload as a JSON object")
    p.add_argument("--payload-file", help="read the payload from a JSON file (- for stdin)")
    p.add_argument("--workflow", metavar="FILE", help="submit the workflow a YAML/JSON file holds")
    p.add_argument(
        "--bulk",
        metavar="FILE",
        help="submit the jobs a JSONL file holds (- for stdin), one JSON object per line:"
        ' {"service": ..., "payload": {...}, "request_id": ...} and any other JobSpec field,'
        " request_context, annotations; through SubmitJobs, in chunks",
    )
    p.add_argument(
        "--chunk", type=int, default=1000, help="with --bulk: jobs per call (1-1000, default 1000)"
    )
    p.add_argument(
        "--bulk-concurrency",
        type=int,
        default=4,
        help="with --bulk: calls in flight (default 4)",
    )
    p.add_argument("--request-id", help="idempotency key (default: random)")
    p.add_argument("--priority", type=int, default=0, help="higher runs first")
    p.add_argument("--max-attempts", type=int, default=0, help="attempts in all (default 3)")
    p.add_argument("--job-timeout", type=float, help="seconds an attempt may run")
    p.add_argument("--not-before", help="earliest start: ISO 8601 time")
    p.add_argument("--affinity", action="append", help="affinity key (repeatable)")
    p.add_argument("--label", action="append", help="KEY=VALUE label (repeatable)")
    p.add_argument(
        "--require",
        action="append",
        metavar="EXPR",
        help="worker label the job requires: gpu=a100, zone!=eu, vram_gb>=40 (> >= < <= take"
        " a number; repeatable)",
    )
    p.add_argument(
        "--prefer",
        action="append",
        metavar="EXPR[:WEIGHT]",
        help="worker label preferred, adding WEIGHT (default 1) to a worker's score:"
        " zone=eu:5 (repeatable)",
    )
    p.add_argument(
        "--affinity-weight",
        action="append",
        metavar="KEY:WEIGHT",
        help="cached affinity key and its weight in a worker's score: my-model:10 (repeatable)",
    )
    p.add_argument(
        "--rate-limit",
        action="append",
        metavar="KEY[@PARTITION][:UNITS]",
        help="take UNITS (default 1) tokens of the named rate limit KEY when it starts;"
        " @PARTITION, a template of payload keys such as @{user_id}, gives each value its"
        " own bucket (repeatable)",
    )
    p.add_argument(
        "--concurrency",
        metavar="KEY:MAX[:STRATEGY]",
        help="at most MAX running jobs with the key (a template of payload keys such as"
        " user:{user_id}); STRATEGY when full: queue (default), cancel_newest, cancel_oldest",
    )
    p.add_argument("--user", help="user id recorded in the request context")
    p.add_argument("--watch", action="store_true", help="then watch it until it ends")
    p.add_argument("--plain", action="store_true", help="with --watch: one line per change")
    p.set_defaults(func=run_command(submit))

    p = sub.add_parser(
        "watch",
        parents=[conn, out, colour],
        help="live progress of a job or workflow until it ends (exit code: its final state)",
    )
    p.add_argument("id", help="job id (job_...) or workflow id (wf_...)")
    p.add_argument("--plain", action="store_true", help="one line per change, even on a terminal")
    p.set_defaults(func=run_command(watch_command))

    from jobtrace.cli.runs import add_runs_command  # it builds on this module

    add_runs_command(sub, [conn, out, colour])

    from jobtrace.cli.approvals import add_approval_commands  # it builds on this module

    add_approval_commands(sub, [conn, out])

    from jobtrace.cli.schedules import add_schedule_commands

    add_schedule_commands(sub, [conn, out])

    p = sub.add_parser("get", parents=[conn, out], help="show a job or workflow")
    p.add_argument("id", help="job id (job_...) or workflow id (wf_...)")
    p.set_defaults(func=run_command(get))

    p = sub.add_parser("cancel", parents=[conn, out], help="cancel a job or workflow")
    p.add_argument("id", help="job id (job_...) or workflow id (wf_...)")
    p.add_argument("--reason", default="", help="recorded with the cancellation")
    p.set_defaults(func=run_command(cancel))

    p = sub.add_parser(
        "terminate",
        parents=[conn, out],
        help="end a job or workflow now (TERMINATED), without waiting for its workers",
    )
    p.add_argument("id", help="job id (job_...) or workflow id (wf_...)")
    p.add_argument("--reason", default="", help="recorded with the termination")
    p.set_defaults(func=run_command(terminate))

    p = sub.add_parser(
        "rerun",
        parents=[conn, out],
        help="run an ended job or workflow again, as a new run with lineage",
    )
    p.add_argument("id", help="job id (job_...) or workflow id (wf_...)")
    p.add_argument(
        "--from",
        dest="from_steps",
        nargs="+",
        action="extend",
        metavar="STEP",
        help="run these steps and everything downstream again; carry the others over",
    )
    p.add_argument(
        "--failed-only",
        action="store_true",
        help="run the steps that did not complete (and downstream) again",
    )
    p.add_argument("--reason", default="", help="why (recorded as trigger.reason)")
    p.add_argument("--request-id", help="idempotency key (default: a new one)")
    p.set_defaults(func=run_command(rerun))

    from jobtrace.cli.bulk import (  # it builds on this module
        add_cancel_runs_command,
        add_rerun_runs_command,
    )

    add_cancel_runs_command(sub, [conn, out])
    add_rerun_runs_command(sub, [conn, out])

    across = argparse.ArgumentParser(add_help=False)
    across.add_argument(
        "--label", action="append", metavar="KEY=VALUE", help="only with this label (repeatable)"
    )
    across.add_argument("--user", help="only requested for this user (request context user_id)")
    across.add_argument(
        "--since",
        "--created-after",
        dest="since",
        help="only created at or after this time (ISO 8601, or an age: 10m, 2h, 7d)",
    )
    across.add_argument(
        "--until",
        "--created-before",
        dest="until",
        help="only created before this time (ISO 8601, or an age: 10m, 2h, 7d)",
    )
    across.add_argument("--total", action="store_true", help="also count every match (all pages)")
    p = sub.add_parser("jobs", parents=[conn, out, across], help="list jobs, newest first")
    p.add_argument("--state", choices=states, type=str.upper, help="only jobs in this state")
    p.add_argument("--service", help="only jobs of this service")
    p.add_argument("--workflow", help="only the steps of this workflow")
    p.add_argument("--worker", help="only jobs whose latest attempt ran on this worker id")
    p.add_argument("--parent", help="only the reruns of this job (one level)")
    p.add_argument("--root", help="only the reruns, at any depth, of the chain started by this job")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.set_defaults(func=run_command(jobs))

    p = sub.add_parser(
        "workflows", parents=[conn, out, across], help="list workflows, newest first"
    )
    p.add_argument("--state", choices=states, type=str.upper, help="only workflows in this state")
    p.add_argument("--name", help="only workflows of this name")
    p.add_argument("--parent", help="only the reruns of this workflow (one level)")
    p.add_argument(
        "--root", help="only the reruns, at any depth, of the chain started by this workflow"
    )
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.set_defaults(func=run_command(workflows))

    trace = sub.add_parser("trace", help="a run's trace events").add_subparsers(
        dest="trace_command", required=True
    )
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("run_id", help="a workflow id, or a standalone job id")
    filters.add_argument("--level", help="minimum level: debug, info, warn, error, critical")
    filters.add_argument("--category", help="business or technical")
    filters.add_argument("--node", help="only events of this step (node id)")
    filters.add_argument("--type", help="started, progress, completed, failed or log")
    filters.add_argument("--since", help="from this time (ISO 8601, or an age: 10m, 2h)")
    filters.add_argument("--until", help="up to this time")
    filters.add_argument("--milestones", action="store_true", help="milestones only")
    filters.add_argument(
        "--min-priority",
        type=int,
        help="only events of at least this display priority (1 low to 10 high)",
    )
    filters.add_argument("--cursor", help="resume after this cursor")
    p = trace.add_parser(
        "list", parents=[conn, out, colour, filters], help="page through stored events"
    )
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.set_defaults(func=run_command(trace_list))
    p = trace.add_parser(
        "tail", parents=[conn, out, colour, filters], help="replay, then follow live to the end"
    )
    p.add_argument("--no-follow", action="store_true", help="stop after the replay")
    p.set_defaults(func=run_command(trace_tail))
    trace_search.add_parser(trace, [conn, out, colour], run_command)
    add_trace_reports(trace, run_command, conn, out, colour)

    p = attest.add_parser("get", parents=[conn, out], help="show an attestation by key")
    p.add_argument("key", help="e.g. workflow-completion:wf_...")
    p.set_defaults(func=run_command(attest_get))
    p = attest.add_parser("list", parents=[conn, out], help="list attestations")
    p.add_argument("--workflow", help="of this workflow")
    p.add_argument("--job", help="of this job")
    p.add_argument("--type", help="e.g. worker_completion, workflow_failure")
    p.add_argument("--state", choices=states, type=str.upper, help="of runs in this state")
    p.add_argument("--service", help="of jobs of this service")
    p.add_argument("--user", help="of runs requested for this user (request context user_id)")
    p.add_argument("--worker", help="of attempts run by this worker id")
    p.add_argument("--since", help="written at or after this time (ISO 8601, or an age: 7d)")
    p.add_argument("--until", help="written before this time (ISO 8601, or an age: 7d)")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.set_defaults(func=run_command(attest_list))
    p = attest.add_parser("export", parents=[conn], help="an attestation as a DSSE envelope")
    p.add_argument("key", help="e.g. workflow-completion:wf_...")
    p.add_argument("-o", "--output", help="write to this file (default: standard output)")
    p.set_defaults(func=run_command(attest_export))

    p = keys.add_parser("list", parents=[conn, out], help="the server's public signing keys")
    p.set_defaults(func=run_command(keys_list))
    p = keys.add_parser("export", parents=[conn], help="a public signing key as PEM")
    p.add_argument("--key-id", help="this key (default: the active one)")
    p.add_argument("-o", "--output", help="write to this file (default: standard output)")
    p.set_defaults(func=run_command(keys_export))

    p = sub.add_parser("annotate", parents=[conn, out], help="attach annotations to a run")
    p.add_argument("run_id", help="a workflow id, or a standalone job id")
    p.add_argument("pairs", nargs="*", metavar="KEY=VALUE", help="values are JSON or text")
    p.add_argument("--actor", default="user:cli", help="KIND:ID[@VERSION] (default user:cli)")
    p.add_argument("--job", help="about this job of the run")
    p.add_argument("--attempt", type=int, default=0, help="about this attempt of --job")
    p.add_argument("--scope", help="run, step or attempt")
    p.add_argument("--scope-id", help="the step name or attempt the scope names")
    p.add_argument("--payload", help="rich JSON object kept with it (not indexed)")
    p.add_argument("--idempotency-key", help="a retry with the same key stores nothing twice")
    p.add_argument("--emit-event", action="store_true", help="also record a trace event")
    p.set_defaults(func=run_command(annotate))

    p = sub.add_parser(
        "annotations",
        parents=[conn, out],
        help="list a run's annotations (oldest first), or every run's (newest first)",
    )
    p.add_argument(
        "run_id", nargs="?", default="", help="a workflow id, or a standalone job id; omit: all"
    )
    p.add_argument("--key", help="only this exact key, e.g. decision.confidence")
    p.add_argument("--prefix", help="key prefix, e.g. decision.")
    p.add_argument("--actor", help="only by this actor id")
    p.add_argument("--actor-kind", help="only by actors of this kind: user, service, worker...")
    p.add_argument("--recorded-by", help="only recorded by this authenticated subject")
    p.add_argument("--since", help="from this time (ISO 8601, or an age: 10m, 2h)")
    p.add_argument("--until", help="before this time (ISO 8601, or an age: 10m, 2h)")
    p.add_argument("--job", help="only about this job")
    p.add_argument("--equals", help="only this scalar value: 0.3, true, approve")
    p.add_argument("--min", type=float, help="only numeric values at or above this")
    p.add_argument("--max", type=float, help="only numeric values at or below this")
    p.add_argument("--attempt", type=int, default=0, help="only this attempt")
    p.add_argument("--scope", help="run, step or attempt")
    p.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    p.set_defaults(func=run_command(annotations_command))

    p = sub.add_parser(
        "failures",
        parents=[conn, out],
        help="failed attempts by kind (as the failure rules classify them) and service",
    )
    p.add_argument("--since", default="1d", help="from this time (ISO 8601, or an age; 1d)")
    p.add_argument("--until", help="before this time (ISO 8601, or an age: 10m, 2h)")
    p.add_argument("--service", help="only failures of this service")
    p.set_defaults(func=run_command(failures_command))
