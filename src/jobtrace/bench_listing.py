"""`jobtrace bench --listing`: filtered list pages across runs over gRPC, on a
database holding many stored jobs, workflows and attestations, per filter."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from sqlalchemy import insert, text
from sqlalchemy.ext.asyncio import create_async_engine

from jobtrace import bench as b
from jobtrace.auth import hash_token
from jobtrace.model import Attestation, AttestationType, Job, JobSpec, RunState
from jobtrace.pb import (
    attestation_service_pb2,
    attestation_service_pb2_grpc,
    common_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)
from jobtrace.store import attest as attest_store
from jobtrace.store import jobs as job_store
from jobtrace.store.tables import AttestationRow, JobRow, WorkflowRow

LISTING_JOBS = 50_000
LISTING_ROUNDS = 30
WARMUP_ROUNDS = 2
TENANT = "bench"  # the reader's tenant
OTHER_TENANT = "bench-other"  # a tenth of the rows: the reader never sees them
READER_TOKEN = "bench-listing-reader"
SERVICES = 20
USERS = 500
WORKERS = 50
TEAMS = 20
DAY_US = 86_400 * 1_000_000
SPAN_US = 30 * DAY_US  # rows are created over 30 days
STATES = (
    (RunState.COMPLETED, 70),
    (RunState.FAILED, 10),
    (RunState.QUEUED, 10),
    (RunState.RUNNING, 5),
    (RunState.CANCELLED, 5),
)
BATCH = 1000


def _ts(us: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=us % 1_000_000 * 1000)


class Rows:
    """Realistic rows, spread over tenants, services, users, workers, states,
    labels and 30 days, the same for every backend (a fixed seed)."""

    def __init__(self, jobs: int, start_us: int) -> None:
        self.jobs = jobs
        self.workflows = max(1, jobs // 10)
        self.start_us = start_us
        self.rng = random.Random(17)
        self.states = [s for s, weight in STATES for _ in range(weight)]

    def _common(self, i: int, n: int) -> dict[str, Any]:
        rng = self.rng
        tenant = OTHER_TENANT if i % 10 == 9 else TENANT
        labels = {
            "env": rng.choice(("prod", "prod", "staging", "dev")),
            "team": f"team-{rng.randrange(TEAMS)}",
            "region": rng.choice(("eu", "us", "ap", "sa", "af")),
            "batch": f"b-{i // 100}",  # rare: 100 runs each
        }
        return {
            "tenant": tenant,
            "labels": labels,
            "user": f"user-{rng.randrange(USERS)}",
            "created_us": self.start_us + SPAN_US * i // n,
            "state": rng.choice(self.states),
        }

    def job(self, i: int) -> tuple[dict[str, Any], Attestation | None]:
        c = self._common(i, self.jobs)
        state: RunState = c["state"]
        ran = state != RunState.QUEUED
        worker = f"worker-{self.rng.randrange(WORKERS)}" if ran else ""
        job = Job(
            id=f"job_bench{i:08d}",
            tenant=c["tenant"],
            request_id=f"bench-{i}",
            spec=JobSpec(
                service=f"svc-{self.rng.randrange(SERVICES)}",
                payload={"input": f"s3://bucket/{i}", "n": i},
                labels=c["labels"],
            ),
            state=state,
            created_us=c["created_us"],
            updated_us=c["created_us"] + 1_000_000,
            attempt=1 if ran else 0,
            worker_id=worker,
            started_us=c["created_us"] + 500_000 if ran else 0,
            completed_us=c["created_us"] + 1_000_000 if state.terminal else 0,
            # A running job's lease outlives the bench: the supervisor leaves it.
            lease_deadline_us=self.start_us + 400 * DAY_US if state == RunState.RUNNING else 0,
            result={"ok": True} if state == RunState.COMPLETED else None,
        )
        context = {"user_context": {"user_id": c["user"]}, "body": {"i": i}}
        values = job_store.job_values(job, context)
        if not state.terminal:
            return values, None
        attestation = Attestation(
            key=f"worker-completion:{job.id}",
            tenant=job.tenant,
            type=AttestationType.WORKER_COMPLETION,
            entity_type="job",
            entity_id=job.id,
            workflow_id="",
            job_id=job.id,
            worker_id=worker,
            attempt=1,
            state=state,
            data={"service": job.spec.service, "request_context": context},
            chain_id=job.id,
            chain_seq=1,
            digest="sha256:" + "0" * 64,
            previous_digest="",
            signature=b"\0" * 64,
            key_id="bench",
            created_us=job.completed_us,
            expire_us=self.start_us + 400 * DAY_US,
        )
        return values, attestation

    def workflow(self, i: int) -> dict[str, Any]:
        c = self._common(i, self.workflows)
        return {
            "id": f"wf_bench{i:08d}",
            "tenant": c["tenant"],
            "request_id": f"bench-wf-{i}",
            "name": f"nightly-{i % 10}",
            "state": int(c["state"]),
            "priority": 0,
            "labels": json.dumps(c["labels"]),
            "request_context": json.dumps({"user_context": {"user_id": c["user"]}}),
            "total_steps": 0,
            "completed_steps": 0,
            "created_us": c["created_us"],
            "updated_us": c["created_us"],
            "user_id": c["user"],
        }


async def store_rows(url: str, rows: Rows) -> float:
    """Insert the rows in batches (the label triggers fill job_labels and
    workflow_labels); the seconds it took."""
    engine = create_async_engine(url)
    began = time.perf_counter()
    try:
        for start in range(0, rows.jobs, BATCH):
            made = [rows.job(i) for i in range(start, min(rows.jobs, start + BATCH))]
            async with engine.begin() as conn:
                await conn.execute(insert(JobRow), [values for values, _ in made])
                signed = [attest_store.attestation_values(a) for _, a in made if a is not None]
                if signed:
                    await conn.execute(insert(AttestationRow), signed)
        for start in range(0, rows.workflows, BATCH):
            async with engine.begin() as conn:
                await conn.execute(
                    insert(WorkflowRow),
                    [rows.workflow(i) for i in range(start, min(rows.workflows, start + BATCH))],
                )
        if engine.dialect.name == "postgresql":
            # As autovacuum soon would after so many inserts (statistics, and
            # the visibility map that index-only scans read). SQLite gets no
            # statistics: jobtrace never runs ANALYZE there, so its plans
            # must be good without.
            async with engine.connect() as conn:
                auto = await conn.execution_options(isolation_level="AUTOCOMMIT")
                await auto.execute(text("VACUUM ANALYZE"))
    finally:
        await engine.dispose()
    return time.perf_counter() - began


def queries(rows: Rows) -> list[tuple[str, str, Any]]:
    """(name, RPC, request) of every filter timed."""
    j, a = job_service_pb2, attestation_service_pb2
    old, recent = rows.start_us + 10 * DAY_US, rows.start_us + 29 * DAY_US
    day: dict[str, Any] = {"created_after": _ts(old), "created_before": _ts(old + DAY_US)}
    return [
        ("jobs: tenant only", "ListJobs", j.ListJobsRequest()),
        ("jobs: state", "ListJobs", j.ListJobsRequest(state=common_pb2.RUN_STATE_FAILED)),
        ("jobs: service", "ListJobs", j.ListJobsRequest(service="svc-3")),
        ("jobs: user_id", "ListJobs", j.ListJobsRequest(user_id="user-42")),
        ("jobs: worker_id", "ListJobs", j.ListJobsRequest(worker_id="worker-7")),
        ("jobs: label env=prod", "ListJobs", j.ListJobsRequest(labels={"env": "prod"})),
        ("jobs: label batch (rare)", "ListJobs", j.ListJobsRequest(labels={"batch": "b-123"})),
        (
            "jobs: labels team+env",
            "ListJobs",
            j.ListJobsRequest(labels={"team": "team-4", "env": "staging"}),
        ),
        ("jobs: created one day", "ListJobs", j.ListJobsRequest(**day)),
        ("jobs: created_after", "ListJobs", j.ListJobsRequest(created_after=_ts(recent))),
        (
            "jobs: created last 7 days",
            "ListJobs",
            j.ListJobsRequest(created_after=_ts(rows.start_us + 23 * DAY_US)),
        ),
        (
            "jobs: user_id+state",
            "ListJobs",
            j.ListJobsRequest(user_id="user-42", state=common_pb2.RUN_STATE_COMPLETED),
        ),
        ("workflows: user_id", "ListWorkflows", j.ListWorkflowsRequest(user_id="user-42")),
        (
            "workflows: label team",
            "ListWorkflows",
            j.ListWorkflowsRequest(labels={"team": "team-4"}),
        ),
        ("workflows: created one day", "ListWorkflows", j.ListWorkflowsRequest(**day)),
        (
            "attestations: state",
            "ListAttestations",
            a.ListAttestationsRequest(state=common_pb2.RUN_STATE_FAILED),
        ),
        ("attestations: service", "ListAttestations", a.ListAttestationsRequest(service="svc-3")),
        (
            "attestations: user_id",
            "ListAttestations",
            a.ListAttestationsRequest(user_id="user-42"),
        ),
        (
            "attestations: worker_id",
            "ListAttestations",
            a.ListAttestationsRequest(worker_id="worker-7"),
        ),
        (
            "attestations: since/until",
            "ListAttestations",
            a.ListAttestationsRequest(since=_ts(old), until=_ts(old + DAY_US)),
        ),
    ]


async def time_queries(
    target: str, rows: Rows, rounds: int, deadline: float
) -> list[dict[str, Any]]:
    """p50/p95 ms of each filter's first page, and of it with include_total
    (ListAttestations has no total), over `rounds` calls after a warm-up."""
    out: list[dict[str, Any]] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stubs: dict[str, Any] = {
            "ListJobs": job_service_pb2_grpc.JobServiceStub(channel).ListJobs,
            "ListWorkflows": job_service_pb2_grpc.JobServiceStub(channel).ListWorkflows,
            "ListAttestations": attestation_service_pb2_grpc.AttestationServiceStub(
                channel
            ).ListAttestations,
        }
        for name, rpc, request in queries(rows):
            call: Callable[..., Awaitable[Any]] = stubs[rpc]
            figures: dict[str, Any] = {"filter": name}
            totals = [False] if rpc == "ListAttestations" else [False, True]
            for with_total in totals:
                if with_total:
                    request = type(request)(include_total=True, **_fields(request))
                times: list[float] = []
                items = total = 0
                for r in range(WARMUP_ROUNDS + rounds):
                    if time.monotonic() > deadline:
                        raise b.PhaseTimeout("listing bench ran past --max-seconds")
                    began = time.perf_counter()
                    page = await call(request, metadata=READER)
                    elapsed = (time.perf_counter() - began) * 1000
                    if r >= WARMUP_ROUNDS:
                        times.append(elapsed)
                    items = len(_items(page))
                    total = getattr(page, "total_size", 0)
                key = "total" if with_total else "page"
                # The least is what the query costs when nothing else runs.
                figures[f"{key}_min_ms"] = round(min(times), 2)
                figures[f"{key}_p50_ms"] = round(b.pct(times, 0.50), 2)
                figures[f"{key}_p95_ms"] = round(b.pct(times, 0.95), 2)
                figures["items"] = items
                if with_total:
                    figures["total_size"] = total
            out.append(figures)
    return out


READER = (("authorization", f"Bearer {READER_TOKEN}"),)


def _fields(request: Any) -> dict[str, Any]:
    return {f.name: value for f, value in request.ListFields()}


def _items(page: Any) -> list[Any]:
    for name in ("jobs", "workflows", "attestations"):
        if hasattr(page, name):
            return list(getattr(page, name))
    return []


async def run_backend(name: str, url: str, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    deadline = time.monotonic() + args.max_seconds
    # Listings as a tenant's reader sees them (a server without tokens lists
    # every tenant's runs).
    tokens = tmp / "tokens.json"
    entry = {"sha256": hash_token(READER_TOKEN), "subject": "bench", "tenant": TENANT}
    tokens.write_text(json.dumps({"tokens": [{**entry, "roles": ["reader"]}]}))
    server = await b.start_server(url, tmp / f"{name}-key", ["--tokens-file", str(tokens)])
    try:
        rows = Rows(args.listing_jobs, int(time.time() * 1e6) - SPAN_US)
        stored_s = await b.bounded(store_rows(url, rows), args.max_seconds, "listing store")
        filters = await time_queries(server.target, rows, args.listing_rounds, deadline)
    finally:
        await b.stop_server(server)
    return {"backend": name, "jobs": rows.jobs, "store_s": round(stored_s, 1), "filters": filters}


async def listing(args: argparse.Namespace) -> list[dict[str, Any]]:
    tmp = Path(tempfile.mkdtemp(prefix="jobtrace-bench-listing-"))
    out = [
        await run_backend(
            "sqlite", args.db or f"sqlite+aiosqlite:///{tmp / 'listing.db'}", tmp, args
        )
    ]
    if args.pg_url:
        from jobtrace.bench_compare import Postgres

        pg = Postgres(args.pg_url)
        await pg.open()
        try:
            database, url = await pg.create()
            try:
                out.append(await run_backend("postgresql", url, tmp, args))
            finally:
                await pg.drop(database)
        finally:
            await pg.close()
    return out


def print_table(results: list[dict[str, Any]]) -> None:
    for r in results:
        print(f"{r['backend']}: {r['jobs']} jobs stored in {r['store_s']} s")
        print(
            f"  {'filter':<28} {'items':>5} {'min ms':>7} {'p50 ms':>7} {'p95 ms':>7}"
            "   include_total: min / p50 / p95 ms (total)"
        )
        for f in r["filters"]:
            total = (
                f"{f['total_min_ms']:7.2f} / {f['total_p50_ms']:.2f} / {f['total_p95_ms']:.2f}"
                f" ({f['total_size']})"
                if "total_p50_ms" in f
                else "      -"
            )
            print(
                f"  {f['filter']:<28} {f['items']:>5} {f['page_min_ms']:7.2f} "
                f"{f['page_p50_ms']:7.2f} {f['page_p95_ms']:7.2f}   {total}"
            )


def main(args: argparse.Namespace) -> int:
    if not 1 <= args.listing_jobs <= 1_000_000 or not 1 <= args.listing_rounds <= 10_000:
        print(
            "jobtrace bench: --listing-jobs must be 1..1000000, --listing-rounds 1..10000",
            file=sys.stderr,
        )
        return 2
    if args.pg_url:
        from jobtrace.bench_compare import check_pg_url

        if problem := check_pg_url(args.pg_url):
            print(f"jobtrace bench: {problem}", file=sys.stderr)
            return 2
    try:
        results = asyncio.run(listing(args))
    except b.PhaseTimeout as exc:
        print(f"jobtrace bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"listing": results}))
    else:
        print_table(results)
    return 0
