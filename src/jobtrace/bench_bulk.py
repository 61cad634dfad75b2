"""`jobtrace bench --bulk N`: the same jobs on one server, first by the single
path (one SubmitJob call per job, run by workers from before batches) then by
the bulk path (SubmitJobs chunks, run by batching workers), side by side: jobs/s
end to end and submit -> complete latency of both, with the same guarantees
checked in the database after each (every job stored COMPLETED, traced and
attested). SQLite (a temporary file, or --db), and with --pg-url PostgreSQL on a
database the bench creates and drops."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2

from jobtrace import bench as b
from jobtrace.pb import common_pb2, job_service_pb2, job_service_pb2_grpc

CHUNK = 1000


@dataclass
class Phase:
    jobs: int = 0
    completed: int = 0
    seconds: float = 0.0
    submit_seconds: float = 0.0
    e2e_ms: list[float] = field(default_factory=list)
    checks: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        def ms(q: float) -> float | None:
            return round(b.pct(self.e2e_ms, q), 1) if self.e2e_ms else None

        return {
            "jobs": self.jobs,
            "completed": self.completed,
            "jobs_per_s": round(self.completed / self.seconds, 1) if self.seconds else None,
            "submit_per_s": round(self.jobs / self.submit_seconds, 1)
            if self.submit_seconds
            else None,
            "e2e_p50_ms": ms(0.5),
            "e2e_p99_ms": ms(0.99),
            "checks": self.checks,
        }


def _request(prefix: str, i: int) -> job_service_pb2.SubmitJobRequest:
    payload = struct_pb2.Struct()
    payload.update({"i": i})
    return job_service_pb2.SubmitJobRequest(
        request_id=f"{prefix}-{i}", job=common_pb2.JobSpec(service="bench", payload=payload)
    )


async def _completions(done_files: list[Path], want: int, seconds: float) -> dict[str, float]:
    completions: dict[str, float] = {}
    deadline = time.monotonic() + seconds
    while len(completions) < want and time.monotonic() < deadline:
        for f in done_files:
            if f.exists():
                for line in f.read_text().splitlines():
                    job_id, at = line.split()
                    if job_id != b.READY:
                        completions[job_id] = float(at)
        if len(completions) < want:
            await asyncio.sleep(0.05)
    return completions


async def single(target: str, jobs: int, concurrency: int, prefix: str) -> dict[str, float]:
    """SubmitJob, `concurrency` in flight (as `jobtrace bench`): job id -> submit time."""
    submitted: dict[str, float] = {}
    queue = iter(range(jobs))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)

        async def submitter() -> None:
            for i in queue:
                t0 = time.time()
                response = await stub.SubmitJob(_request(prefix, i), timeout=30)
                submitted[response.job.id] = t0

        await asyncio.gather(*(submitter() for _ in range(concurrency)))
    return submitted


async def bulk(
    target: str, jobs: int, chunk: int, concurrency: int, prefix: str
) -> dict[str, float]:
    """SubmitJobs in chunks, `concurrency` calls in flight: job id -> submit
    time (its call's start)."""
    submitted: dict[str, float] = {}
    starts = iter(range(0, jobs, chunk))
    async with grpc.aio.insecure_channel(
        target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    ) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)

        async def submitter() -> None:
            for start in starts:
                items = [_request(prefix, i) for i in range(start, min(jobs, start + chunk))]
                t0 = time.time()
                response = await stub.SubmitJobs(
                    job_service_pb2.SubmitJobsRequest(items=items), timeout=60
                )
                for r in response.results:
                    if r.HasField("error"):
                        raise RuntimeError(f"bulk item refused: {r.error.message}")
                    submitted[r.job.id] = t0

        await asyncio.gather(*(submitter() for _ in range(concurrency)))
    return submitted


async def guarantees(db: str, prefix: str) -> dict[str, int]:
    """Jobs of the phase stored COMPLETED, with trace events, with an attestation."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(db)
    like: dict[str, Any] = {"p": f"{prefix}-%"}
    try:
        async with engine.connect() as conn:

            async def one(sql: str, **more: Any) -> int:
                return int((await conn.execute(text(sql), {**like, **more})).scalar_one())

            return {
                "completed": await one(
                    "SELECT count(*) FROM jobs WHERE request_id LIKE :p AND state = :s",
                    s=int(common_pb2.RUN_STATE_COMPLETED),
                ),
                "traced": await one(
                    "SELECT count(DISTINCT e.job_id) FROM trace_events e"
                    " JOIN jobs j ON j.id = e.job_id WHERE j.request_id LIKE :p"
                ),
                "attested": await one(
                    "SELECT count(DISTINCT a.job_id) FROM attestations a"
                    " JOIN jobs j ON j.id = a.job_id WHERE j.request_id LIKE :p"
                ),
            }
    finally:
        await engine.dispose()


async def phase(
    args: argparse.Namespace, db: str, target: str, tmp: Path, kind: str, jobs: int
) -> Phase:
    prefix = f"bench-{kind}-{os.urandom(4).hex()}"
    done_files = [tmp / f"{prefix}-{i}.txt" for i in range(args.workers)]
    # The single path is today's: SubmitJob per job, and workers from before
    # batches (a message per report and per assignment). The bulk path's
    # workers batch (args.report_window_ms).
    window = b.OLD_STYLE if kind.endswith("single") else args.report_window_ms
    workers = await b.start_workers([target], done_files, args.worker_concurrency, window)
    out = Phase(jobs=jobs)
    try:
        start = time.time()
        if kind.endswith("single"):
            submitted = await b.bounded(
                single(target, jobs, args.concurrency, prefix), args.max_seconds, "submit"
            )
        else:
            submitted = await b.bounded(
                bulk(target, jobs, args.chunk, args.bulk_concurrency, prefix),
                args.max_seconds,
                "bulk submit",
            )
        out.submit_seconds = time.time() - start
        done = await _completions(done_files, jobs, args.max_seconds)
        out.completed = len(done)
        if done:
            out.seconds = max(done.values()) - start
            out.e2e_ms = [(at - submitted[j]) * 1000 for j, at in done.items() if j in submitted]
    finally:
        await b.stop_workers(workers)
    out.checks = await guarantees(db, prefix)
    return out


async def run_backend(args: argparse.Namespace, db: str, tmp: Path) -> dict[str, Phase]:
    server = await b.start_server(db, tmp / f"key-{os.urandom(3).hex()}", [])
    try:
        # Warm the server up (first connections, caches), unmeasured.
        await phase(args, db, server.target, tmp, "warm-single", min(args.bulk, 200))
        await phase(args, db, server.target, tmp, "warm-bulk", min(args.bulk, 200))
        return {
            kind: await phase(args, db, server.target, tmp, kind, args.bulk)
            for kind in ("single", "bulk")
        }
    finally:
        await b.stop_server(server)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="jobtrace-bench-bulk-"))
    backends: dict[str, dict[str, Phase]] = {}
    db = args.db or f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
    backends["postgresql" if db.startswith("postgresql") else "sqlite"] = await run_backend(
        args, db, tmp
    )
    if args.pg_url:
        from jobtrace.bench_compare import Postgres

        pg = Postgres(args.pg_url)
        await pg.open()
        name = ""
        try:
            name, url = await pg.create()
            backends["postgresql"] = await run_backend(args, url, tmp)
        finally:
            if name:
                await pg.drop(name)
            await pg.close()
    out: dict[str, Any] = {
        "params": {
            "jobs": args.bulk,
            "chunk": args.chunk,
            "bulk_calls_in_flight": args.bulk_concurrency,
            "single_submits_in_flight": args.concurrency,
            "workers": args.workers,
            "worker_concurrency": args.worker_concurrency,
            "report_window_ms": args.report_window_ms,
        }
    }
    for backend, phases in backends.items():
        s, k = phases["single"].summary(), phases["bulk"].summary()
        ratio = (
            round(k["jobs_per_s"] / s["jobs_per_s"], 2)
            if k["jobs_per_s"] and s["jobs_per_s"]
            else None
        )
        out[backend] = {"single": s, "bulk": k, "bulk_vs_single_jobs_per_s": ratio}
    return out


def ok(s: dict[str, Any]) -> bool:
    """Every job of every phase completed, traced and attested."""
    for key, value in s.items():
        if key == "params":
            continue
        for p in (value["single"], value["bulk"]):
            want = p["jobs"]
            if p["completed"] != want or any(v != want for v in p["checks"].values()):
                return False
    return True


def print_table(s: dict[str, Any]) -> None:
    def show(v: Any, unit: str = "") -> str:
        return "n/a" if v is None else f"{v}{unit}"

    for backend, value in s.items():
        if backend == "params":
            continue
        print(f"{backend}:")
        print(f"  {'':<30}{'SubmitJob':>16}{'SubmitJobs':>16}")
        rows = [
            ("jobs/s end to end", "jobs_per_s", ""),
            ("submits/s", "submit_per_s", ""),
            ("submit -> complete p50", "e2e_p50_ms", " ms"),
            ("submit -> complete p99", "e2e_p99_ms", " ms"),
        ]
        for name, key, unit in rows:
            print(
                f"  {name:<30}{show(value['single'][key], unit):>16}"
                f"{show(value['bulk'][key], unit):>16}"
            )
        for check in ("completed", "traced", "attested"):
            print(
                f"  {'jobs ' + check:<30}{value['single']['checks'].get(check, 0):>16}"
                f"{value['bulk']['checks'].get(check, 0):>16}"
            )
        print(f"  bulk / single jobs/s: {show(value['bulk_vs_single_jobs_per_s'], ' x')}")
    print("params:", json.dumps(s["params"]))


def main(args: argparse.Namespace) -> int:
    if not 1 <= args.bulk <= 1_000_000 or not 1 <= args.chunk <= CHUNK:
        print("jobtrace bench: --bulk must be 1..1000000, --chunk 1..1000", file=sys.stderr)
        return 2
    if args.pg_url:
        from jobtrace.bench_compare import check_pg_url

        problem = check_pg_url(args.pg_url)
        if problem:
            print(f"jobtrace bench: {problem}", file=sys.stderr)
            return 2
    # The servers' statement counting (on by default for `jobtrace bench`) is
    # off: this bench reports no statement counts, and SQLite's trace hook
    # renders each multi-row INSERT with its thousands of values.
    os.environ.setdefault("JOBTRACE_BENCH_COUNT_STATEMENTS", "0")
    try:
        s = asyncio.run(run(args))
    except b.PhaseTimeout as exc:
        print(f"jobtrace bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(s))
    else:
        print_table(s)
    if not ok(s):
        print("jobtrace bench: not every job completed, traced and attested", file=sys.stderr)
        return 1
    return 0
