"""`jobtrace bench --compare-backends`: the same jobs against gRPC alone, SQLite and
PostgreSQL (one and two replicas) in one run, with the ratios issue 15 targets."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url

from jobtrace import bench as b

LOOPBACK = {"127.0.0.1", "localhost", "::1", ""}  # "" is a local socket
PG_COUNTERS = (
    "xact_commit",
    "xact_rollback",
    "tup_inserted",
    "tup_updated",
    "tup_deleted",
    "tup_fetched",
    "tup_returned",
)
JPS = "jobs_per_s"
# (what, numerator (backend, figure), denominator or None, comparison, target)
TARGETS: list[tuple[str, tuple[str, str], tuple[str, str] | None, str, float]] = [
    ("SQLite / gRPC alone, jobs/s", ("sqlite", JPS), ("grpc_alone", JPS), ">=", 0.70),
    ("PG-1 / SQLite, jobs/s", ("postgresql_1", JPS), ("sqlite", JPS), ">=", 0.80),
    ("PG-2 / PG-1, jobs/s", ("postgresql_2", JPS), ("postgresql_1", JPS), ">=", 1.0),
    (
        "SQLite / gRPC alone, one-at-a-time p50",
        ("sqlite", "one_at_a_time_p50_ms"),
        ("grpc_alone", "one_at_a_time_p50_ms"),
        "<=",
        3.0,
    ),
    (
        "PG-1 / gRPC alone, one-at-a-time p50",
        ("postgresql_1", "one_at_a_time_p50_ms"),
        ("grpc_alone", "one_at_a_time_p50_ms"),
        "<=",
        4.0,
    ),
    ("SQLite statements/job", ("sqlite", "statements_per_job"), None, "<=", 12),
    ("PG-1 statements/job", ("postgresql_1", "statements_per_job"), None, "<=", 12),
    ("PG-2 statements/job", ("postgresql_2", "statements_per_job"), None, "<=", 12),
]  # fmt: skip


@dataclass
class Figures:
    """What one backend measured."""

    key: str
    label: str
    replicas: int = 1
    skipped: str = ""  # why it was not measured
    results: b.Results = field(default_factory=lambda: b.Results({}))
    server_cpu_s: float | None = None
    postgres_cpu_s: float | None = None
    statements: dict[str, Any] | None = None
    latency_ms: list[float] = field(default_factory=list)
    latency_statements: dict[str, Any] | None = None
    postgres_counters: dict[str, Any] | None = None
    postgres_latency_counters: dict[str, Any] | None = None
    ceiling: tuple[float, float, float] | None = None
    database: str = ""  # PostgreSQL: the database created (and dropped) for this run


class Postgres:
    """The PostgreSQL server given by --pg-url: creates, watches and drops the
    bench's databases over one admin connection (asyncpg)."""

    def __init__(self, url: str) -> None:
        self.url: URL = make_url(url)
        self._conn: Any = None

    def _dsn(self, database: str | None = None) -> str:
        url = self.url.set(drivername="postgresql")
        if database is not None:
            url = url.set(database=database)
        return url.render_as_string(hide_password=False)

    async def open(self) -> None:
        import asyncpg

        self._conn = await asyncpg.connect(self._dsn(), timeout=10)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def create(self) -> tuple[str, str]:
        """A fresh database: its name and the server URL for it."""
        name = f"jobtrace_bench_{os.urandom(5).hex()}"
        await self._conn.execute(f"CREATE DATABASE {name}")
        return name, self.url.set(database=name).render_as_string(hide_password=False)

    async def drop(self, name: str) -> None:
        await self._conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    async def enable_statement_statistics(self, name: str) -> bool:
        """Whether pg_stat_statements answers in `name` (it needs the server's
        shared_preload_libraries; CREATE EXTENSION alone is not enough)."""
        import asyncpg

        conn = await asyncpg.connect(self._dsn(name), timeout=10)
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await conn.fetchval("SELECT count(*) FROM pg_stat_statements")
            return True
        except asyncpg.PostgresError:
            return False
        finally:
            await conn.close()

    async def statement_calls(self, name: str) -> int:
        """Statements run in `name` so far, by pg_stat_statements (not this query)."""
        import asyncpg

        conn = await asyncpg.connect(self._dsn(name), timeout=10)
        try:
            calls = await conn.fetchval(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s "
                "JOIN pg_database d ON d.oid = s.dbid "
                "WHERE d.datname = current_database() AND s.query NOT LIKE '%pg_stat_statements%'"
            )
            return int(calls)
        finally:
            await conn.close()

    async def wait_idle(self, name: str, seconds: float = 15.0) -> None:
        """Until no backend is connected to `name`: a backend's statistics reach
        pg_stat_database when it exits, at the latest."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            n = await self._conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1", name
            )
            if not n:
                return
            await asyncio.sleep(0.05)

    async def counters(self, name: str) -> dict[str, int]:
        row = await self._conn.fetchrow(
            f"SELECT {', '.join(PG_COUNTERS)} FROM pg_stat_database WHERE datname = $1", name
        )
        return {k: int(row[k]) for k in PG_COUNTERS}

    async def backend_cpu(self, name: str) -> dict[int, float] | None:
        """CPU seconds of each backend connected to `name` (None when /proc does
        not show them: PostgreSQL on another host or in a container)."""
        pids = await self._conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", name)
        cpu = {int(r["pid"]): b.cpu_seconds(int(r["pid"])) for r in pids}
        if any(v is None for v in cpu.values()):
            return None
        return {pid: v for pid, v in cpu.items() if v is not None}


async def run_backend(
    args: argparse.Namespace,
    tmp: Path,
    fig: Figures,
    start: Callable[[list[b.Server]], Awaitable[None]],
    *,
    jobs: bool = True,
    latency: bool,
    ceiling: bool = False,
    pg: Postgres | None = None,
    database: str = "",
) -> None:
    """The jobs phase and/or the one-at-a-time phase on servers `start` adds."""
    servers: list[b.Server] = []
    workers: list[asyncio.subprocess.Process] = []
    tag = f"{fig.key}-{os.urandom(3).hex()}"
    try:
        await start(servers)
        targets = [s.target for s in servers]
        pids = [s.proc.pid for s in servers]
        if not jobs:
            if latency:
                workers = await b.start_workers(
                    targets[:1], [tmp / f"{tag}-one.txt"], 1, args.report_window_ms
                )
                await one_at_a_time(args, fig, targets)
            return
        done = [tmp / f"{tag}-done-{i}.txt" for i in range(args.workers)]
        workers = await b.start_workers(
            targets, done, args.worker_concurrency, args.report_window_ms
        )
        if ceiling:
            fig.ceiling = await b.unary_ceiling(targets[0], args.ceiling_seconds, args.concurrency)
        before = await b.read_statements(targets)
        cpu_before = b.cpu_total(pids)
        pg_before = await pg.backend_cpu(database) if pg else None
        await b.run_jobs(targets, args.jobs, args.concurrency, done, fig.results, args.max_seconds)
        cpu_after = b.cpu_total(pids)
        pg_after = await pg.backend_cpu(database) if pg else None
        if cpu_before is not None and cpu_after is not None:
            fig.server_cpu_s = cpu_after - cpu_before
        if pg_before is not None and pg_after is not None:
            fig.postgres_cpu_s = sum(v - pg_before.get(pid, 0.0) for pid, v in pg_after.items())
        fig.statements = b.statements_delta(
            before, await b.read_statements(targets), fig.results.completed
        )
        if latency:
            await b.stop_workers(workers)
            workers = await b.start_workers(
                targets[:1], [tmp / f"{tag}-one.txt"], 1, args.report_window_ms
            )
            await one_at_a_time(args, fig, targets)
    finally:
        await b.stop_workers(workers)
        for s in servers:
            await b.stop_server(s)


async def one_at_a_time(args: argparse.Namespace, fig: Figures, targets: list[str]) -> None:
    before = await b.read_statements(targets)
    fig.latency_ms = await b.one_at_a_time(targets[0], args.latency_jobs, args.latency_seconds)
    ran = len(fig.latency_ms) + b.LATENCY_WARMUP_JOBS
    fig.latency_statements = b.statements_delta(before, await b.read_statements(targets), ran)


async def run_postgres(
    args: argparse.Namespace, tmp: Path, pg: Postgres, fig: Figures, *, latency: bool
) -> None:
    """One PostgreSQL configuration on a database of its own, dropped after. The
    jobs phase and the one-at-a-time phase each run on servers of their own, so
    that PostgreSQL's counters (which a backend may report up to seconds late,
    and at the latest when it exits) are read with every server stopped."""
    name, url = await pg.create()
    fig.database = name
    try:
        statements = await pg.enable_statement_statistics(name)

        async def start(servers: list[b.Server]) -> None:
            for r in range(fig.replicas):
                servers.append(await b.start_server(url, tmp / f"{fig.key}-key{r}", []))

        async def counted(jobs: bool, one: bool) -> dict[str, Any]:
            await pg.wait_idle(name)
            counters = await pg.counters(name)
            calls = await pg.statement_calls(name) if statements else 0
            await run_backend(args, tmp, fig, start, jobs=jobs, latency=one, pg=pg, database=name)
            await pg.wait_idle(name)
            after = await pg.counters(name)
            ran = fig.results.completed if jobs else len(fig.latency_ms) + b.LATENCY_WARMUP_JOBS
            per_job: dict[str, Any] = {
                "source": "pg_stat_statements" if statements else "pg_stat_database",
                "jobs": ran,
            }
            if statements:
                calls = await pg.statement_calls(name) - calls
                per_job["statements_per_job"] = round(calls / max(ran, 1), 2)
            for k in PG_COUNTERS:
                per_job[f"{k}_per_job"] = round((after[k] - counters[k]) / max(ran, 1), 2)
            return per_job

        fig.postgres_counters = await counted(True, False)
        if latency:
            fig.postgres_latency_counters = await counted(False, True)
    finally:
        await pg.drop(name)


def new_round() -> dict[str, Figures]:
    return {
        "grpc_alone": Figures("grpc_alone", "gRPC alone"),
        "sqlite": Figures("sqlite", "SQLite"),
        "postgresql_1": Figures("postgresql_1", "PostgreSQL, 1 replica"),
        "postgresql_2": Figures("postgresql_2", "PostgreSQL, 2 replicas", replicas=2),
    }


async def compare(args: argparse.Namespace) -> list[dict[str, Figures]]:
    """Each round runs every backend once, in turn, each on a fresh database, so
    that the machine's drift (other work on it) falls on all of them alike."""
    tmp = Path(tempfile.mkdtemp(prefix="jobtrace-bench-"))
    rounds: list[dict[str, Figures]] = []
    pg = Postgres(args.pg_url) if args.pg_url else None
    if pg is not None:
        await pg.open()
    try:
        for n in range(args.rounds):
            figures = new_round()
            rounds.append(figures)

            async def floor(servers: list[b.Server]) -> None:
                servers.append(await b.start_floor_server())

            async def sqlite(servers: list[b.Server], n: int = n) -> None:
                db = f"sqlite+aiosqlite:///{tmp / f'bench-{n}.db'}"
                servers.append(await b.start_server(db, tmp / "key-sqlite", []))

            await run_backend(args, tmp, figures["grpc_alone"], floor, latency=args.latency)
            await run_backend(
                args, tmp, figures["sqlite"], sqlite, latency=args.latency, ceiling=True
            )
            if pg is None:
                for key in ("postgresql_1", "postgresql_2"):
                    figures[key].skipped = "no --pg-url"
                continue
            await run_postgres(args, tmp, pg, figures["postgresql_1"], latency=args.latency)
            await run_postgres(args, tmp, pg, figures["postgresql_2"], latency=False)
    finally:
        if pg is not None:
            await pg.close()
    return rounds


def median_of(values: list[Any]) -> Any:
    """The median of the rounds' figures: numbers by their median, dicts key by
    key, anything else from the first round (or all of them when they differ)."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        middle = round(statistics.median(present), 3)
        whole = all(isinstance(v, int) for v in present) and middle == int(middle)
        return int(middle) if whole else middle
    if all(isinstance(v, dict) for v in present):
        keys = list(dict.fromkeys(k for v in present for k in v))
        return {k: median_of([v.get(k) for v in present]) for k in keys}
    return present[0] if len(set(map(str, present))) == 1 else present


def _ms(values: list[float], q: float) -> float | None:
    return round(b.pct(values, q), 2) if values else None


def backend_summary(f: Figures) -> dict[str, Any]:
    r = f.results
    per = f.statements or {}
    one = f.latency_statements or {}
    done = r.completed
    return {
        "label": f.label,
        "replicas": f.replicas,
        "skipped": f.skipped or None,
        "jobs_completed": done,
        "jobs_per_s": round(r.jobs_per_s, 1) if done else None,
        "e2e_p50_ms": _ms(r.e2e_ms, 0.5),
        "e2e_p99_ms": _ms(r.e2e_ms, 0.99),
        "statements_per_job": per.get("statements_per_job"),
        "transactions_per_job": per.get("transactions_per_job"),
        "statement_kinds_per_job": per.get("kinds_per_job"),
        "server_cpu_ms_per_job": (
            round(f.server_cpu_s * 1000 / done, 3) if f.server_cpu_s is not None and done else None
        ),
        "postgres_cpu_ms_per_job": (
            round(f.postgres_cpu_s * 1000 / done, 3)
            if f.postgres_cpu_s is not None and done
            else None
        ),
        "one_at_a_time_jobs": len(f.latency_ms),
        "one_at_a_time_p50_ms": _ms(f.latency_ms, 0.5),
        "one_at_a_time_p99_ms": _ms(f.latency_ms, 0.99),
        "one_at_a_time_statements_per_job": one.get("statements_per_job"),
        "one_at_a_time_transactions_per_job": one.get("transactions_per_job"),
        "postgres_counters": f.postgres_counters,
        "postgres_one_at_a_time_counters": f.postgres_latency_counters,
        "database": f.database or None,
    }


def summary(args: argparse.Namespace, rounds: list[dict[str, Figures]]) -> dict[str, Any]:
    """One object: each backend's figures (medians over the rounds), then each
    target computed from the figures shown (rounded as shown), with PASS, MISS
    or null (not measured)."""
    backends = {}
    for key in rounds[0]:
        each = [backend_summary(figures[key]) for figures in rounds]
        backends[key] = median_of(each)
        if len(rounds) > 1:
            for name in ("jobs_per_s", "one_at_a_time_p50_ms"):
                backends[key][f"{name}_rounds"] = [f[name] for f in each]
    targets = []
    for what, (nb, nf), den, op, goal in TARGETS:
        numerator = backends[nb][nf]
        denominator = backends[den[0]][den[1]] if den else None
        value: float | None
        if den is None:
            value = numerator
        else:
            value = round(numerator / denominator, 3) if numerator and denominator else None
        result = None
        if value is not None:
            result = "PASS" if (value >= goal if op == ">=" else value <= goal) else "MISS"
        targets.append(
            {
                "what": what,
                "value": value,
                "numerator": numerator,
                "denominator": denominator,
                "target": f"{op} {goal:g}",
                "result": result,
            }
        )
    ceilings = [f["sqlite"].ceiling for f in rounds if f["sqlite"].ceiling]
    ceiling = (
        tuple(statistics.median(c[i] for c in ceilings) for i in range(3)) if ceilings else None
    )
    return {
        "mode": "compare-backends",
        "backends": backends,
        "targets": targets,
        "unary_ceiling_rps": round(ceiling[0], 1) if ceiling and ceiling[0] else None,
        "unary_p50_ms": round(ceiling[1], 3) if ceiling and ceiling[0] else None,
        "unary_p99_ms": round(ceiling[2], 3) if ceiling and ceiling[0] else None,
        "params": {
            "jobs": args.jobs,
            "workers": args.workers,
            "worker_concurrency": args.worker_concurrency,
            "report_window_ms": args.report_window_ms,
            "submit_concurrency": args.concurrency,
            "latency_jobs": args.latency_jobs if args.latency else 0,
            "latency_seconds": args.latency_seconds,
            "ceiling_seconds": args.ceiling_seconds,
            "rounds": args.rounds,
            "pg_url": _redacted(args.pg_url) if args.pg_url else None,
            "max_seconds": args.max_seconds,
        },
    }


def _redacted(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def print_table(s: dict[str, Any]) -> None:
    def show(value: Any) -> str:
        return "n/a" if value is None else f"{value}"

    def pair(a: Any, c: Any) -> str:
        return "n/a" if a is None else f"{a} / {c}"

    p = s["params"]
    print(
        f"jobtrace bench --compare-backends: {p['jobs']} jobs, {p['workers']} workers x "
        f"{p['worker_concurrency']} slots, {p['submit_concurrency']} submits in flight; "
        f"one at a time: {p['latency_jobs']} jobs"
        + (f"; medians of {p['rounds']} rounds" if p["rounds"] > 1 else "")
    )
    header = (
        "backend",
        "jobs/s",
        "e2e p50 / p99 ms",
        "1-at-a-time p50 / p99 ms",
        "stmts/job",
        "tx/job",
        "server CPU ms/job",
        "PG CPU ms/job",
    )
    rows: list[tuple[str, ...]] = [header]
    for f in s["backends"].values():
        if f["skipped"]:
            rows.append((f["label"], f"skipped ({f['skipped']})", "", "", "", "", "", ""))
            continue
        rows.append(
            (
                f["label"],
                show(f["jobs_per_s"]),
                pair(f["e2e_p50_ms"], f["e2e_p99_ms"]),
                pair(f["one_at_a_time_p50_ms"], f["one_at_a_time_p99_ms"]),
                show(f["statements_per_job"]),
                show(f["transactions_per_job"]),
                show(f["server_cpu_ms_per_job"]),
                show(f["postgres_cpu_ms_per_job"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if p["rounds"] > 1:
        for f in s["backends"].values():
            if not f["skipped"]:
                print(
                    f"  {f['label']} by round: jobs/s {f['jobs_per_s_rounds']}, "
                    f"one at a time p50 ms {f['one_at_a_time_p50_ms_rounds']}"
                )
    print()
    print("statements per job by kind (jobs phase; one at a time in brackets):")
    for f in s["backends"].values():
        if f["statement_kinds_per_job"]:
            kinds = ", ".join(f"{k} {v}" for k, v in f["statement_kinds_per_job"].items())
            print(
                f"  {f['label']}: {kinds} "
                f"[{show(f['one_at_a_time_statements_per_job'])} statements, "
                f"{show(f['one_at_a_time_transactions_per_job'])} transactions]"
            )
    for f in s["backends"].values():
        for phase, c in (
            ("jobs phase", f["postgres_counters"]),
            ("one at a time", f["postgres_one_at_a_time_counters"]),
        ):
            if not c:
                continue
            own = f"statements {c['statements_per_job']}, " if "statements_per_job" in c else ""
            print(
                f"  {f['label']}, {phase}, PostgreSQL's own counters ({c['source']}, "
                f"server start to stop / {c['jobs']} jobs): {own}commits "
                f"{c['xact_commit_per_job']}, rollbacks {c['xact_rollback_per_job']}, rows "
                f"inserted {c['tup_inserted_per_job']}, updated {c['tup_updated_per_job']}, "
                f"deleted {c['tup_deleted_per_job']}, fetched {c['tup_fetched_per_job']}"
            )
    print()
    rows = [("target", "value", "goal", "result")]
    for t in s["targets"]:
        rows.append((t["what"], show(t["value"]), t["target"], t["result"] or "n/a"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print()
    print(
        f"unary ceiling (empty handler on the SQLite server, {p['ceiling_seconds']:g} s): "
        f"{show(s['unary_ceiling_rps'])} calls/s, p50 {show(s['unary_p50_ms'])} / "
        f"p99 {show(s['unary_p99_ms'])} ms"
    )
    print("params:", json.dumps(p))


def check_pg_url(url: str) -> str:
    """'' when `url` is a PostgreSQL URL on loopback, else what is wrong."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError (and ValueError) for bad URLs
        return f"--pg-url is not a database URL: {exc}"
    if parsed.get_backend_name() != "postgresql":
        return "--pg-url must be postgresql+asyncpg://..."
    if (parsed.host or "") not in LOOPBACK:
        return f"--pg-url must be on loopback, not {parsed.host}"
    return ""


def main(args: argparse.Namespace) -> int:
    if args.target or args.db or args.replicas != 1:
        print(
            "jobtrace bench: --compare-backends starts its own servers "
            "(no --target, --db or --replicas)",
            file=sys.stderr,
        )
        return 2
    if not 1 <= args.rounds <= 10:
        print("jobtrace bench: --rounds must be 1..10", file=sys.stderr)
        return 2
    if args.pg_url and (problem := check_pg_url(args.pg_url)):
        print(f"jobtrace bench: {problem}", file=sys.stderr)
        return 2
    try:
        rounds = asyncio.run(compare(args))
    except b.PhaseTimeout as exc:
        print(f"jobtrace bench: {exc}", file=sys.stderr)
        return 1
    s = summary(args, rounds)
    if args.json:
        print(json.dumps(s))
    else:
        print_table(s)
    complete = all(
        f.skipped or f.results.completed == args.jobs for r in rounds for f in r.values()
    )
    return 0 if complete else 1
