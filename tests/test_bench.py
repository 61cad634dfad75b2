"""`jobtrace bench` runs end to end (tiny sizes here: the figures are for `make bench`)."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc
import pytest

from jobtrace import bench as bench_module

from .conftest import PG_ADMIN_URL, Harness, pg_problem, require_pg

REQUIRED = {
    "jobs_per_s",
    "submit_p50_ms",
    "submit_p99_ms",
    "e2e_p50_ms",
    "e2e_p99_ms",
    "trace_p50_ms",
    "trace_p99_ms",
    "unary_ceiling_rps",
    "server_peak_rss_mb",
    "params",
}


async def bench(*args: str, timeout: float = 240) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jobtrace",
        "bench",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


SMALL = (
    "--jobs", "60", "--workers", "2", "--subscribers", "5", "--rate", "20",
    "--ceiling-seconds", "0.2",
)  # fmt: skip


async def test_bench_prints_every_figure_as_json() -> None:
    code, out, err = await bench(
        *SMALL, "--trace-seconds", "1", "--latency", "--latency-jobs", "8", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert REQUIRED <= set(result)
    assert result["jobs_completed"] == 60 and result["jobs_per_s"] > 0
    assert result["params"]["jobs"] == 60 and result["params"]["subscribers"] == 5
    assert result["trace_deliveries"] == 5 * 20, "every subscriber got every event"
    assert 0 < result["submit_p50_ms"] <= result["submit_p99_ms"]
    assert 0 < result["unary_ceiling_rps"] and 0 < result["server_peak_rss_mb"]
    ratios = result["vs_ceiling"]
    assert all(isinstance(v, float) and v > 0 for v in ratios.values()), ratios
    # The same jobs against a server that stores nothing: what gRPC alone allows.
    assert result["grpc_alone_jobs_per_s"] > 0 and result["params"]["grpc_floor"] is True
    share = result["jobs_per_s"] / result["grpc_alone_jobs_per_s"]
    assert abs(result["jobs_per_s_vs_grpc_alone"] - share) < 0.01 * share + 0.002
    # Counted by the server at the driver over the jobs phase; CPU from /proc.
    assert result["statements_per_job"] > 1 and result["transactions_per_job"] > 0
    assert result["statement_kinds_per_job"]["INSERT"] > 0
    assert result["server_cpu_ms_per_job"] > 0
    # --latency: one job at a time, here and on gRPC alone.
    one = result["one_at_a_time"]
    assert one["jobs"] == 8 and one["grpc_alone_jobs"] == 8
    assert 0 < one["p50_ms"] <= one["p99_ms"] and 0 < one["grpc_alone_p50_ms"]
    assert one["p50_vs_grpc_alone"] == round(one["p50_ms"] / one["grpc_alone_p50_ms"], 2)


async def test_bench_prints_a_table() -> None:
    code, out, err = await bench(*SMALL, "--trace-seconds", "0.5", "--no-floor")
    assert code == 0, err
    assert "jobs/s end to end" in out and "of ceiling" in out and "gRPC alone" in out
    floor_row = next(line for line in out.splitlines() if line.startswith("jobs/s, gRPC alone"))
    assert floor_row.split()[3] == "n/a", "--no-floor skips the gRPC-alone run"
    assert "statements / transactions per job" in out and "one at a time" not in out


def check_targets(result: dict[str, object]) -> None:
    """Each target is computed from the figures shown, and judged by its goal."""
    backends = result["backends"]
    assert isinstance(backends, dict)
    for t in result["targets"]:  # type: ignore[attr-defined]
        if t["value"] is None:
            assert t["result"] is None
            continue
        if t["denominator"] is not None:
            assert abs(t["value"] - t["numerator"] / t["denominator"]) <= 0.0006 * t["value"] + 1e-3
        else:
            assert t["value"] == t["numerator"]
        op, goal = t["target"].split()
        met = t["value"] >= float(goal) if op == ">=" else t["value"] <= float(goal)
        assert t["result"] == ("PASS" if met else "MISS"), t


async def test_compare_backends_prints_each_backend_and_the_target_ratios() -> None:
    problem = await pg_problem()
    if problem and require_pg():
        pytest.fail(f"JOBTRACE_REQUIRE_PG=1 but {problem}")
    pg = (
        []
        if problem
        else ["--pg-url", PG_ADMIN_URL.replace("postgresql://", "postgresql+asyncpg://")]
    )
    code, out, err = await bench(
        "--compare-backends", "--jobs", "10", "--workers", "1", "--latency",
        "--latency-jobs", "6", "--ceiling-seconds", "0.2", *pg, "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    backends = result["backends"]
    measured = ["grpc_alone", "sqlite"] + ([] if problem else ["postgresql_1", "postgresql_2"])
    for key in measured:
        f = backends[key]
        assert f["jobs_completed"] == 10 and f["jobs_per_s"] > 0, key
        assert f["server_cpu_ms_per_job"] > 0, key
    for key in measured[1:]:
        f = backends[key]
        assert f["statements_per_job"] > 1 and f["transactions_per_job"] > 0, key
        # On PostgreSQL a transition's inserts travel in one WITH statement.
        kinds = f["statement_kinds_per_job"]
        assert kinds.get("INSERT", 0) + kinds.get("WITH", 0) > 0, key
    for key in measured[:3]:
        f = backends[key]
        assert f["one_at_a_time_jobs"] == 6, key
        assert 0 < f["one_at_a_time_p50_ms"] <= f["one_at_a_time_p99_ms"], key
    assert backends["grpc_alone"]["statements_per_job"] is None, "nothing stored, nothing counted"
    assert result["unary_ceiling_rps"] > 0
    check_targets(result)
    targets = {t["what"]: t for t in result["targets"]}
    sqlite_share = targets["SQLite / gRPC alone, jobs/s"]
    assert sqlite_share["numerator"] == backends["sqlite"]["jobs_per_s"]
    assert sqlite_share["denominator"] == backends["grpc_alone"]["jobs_per_s"]
    if problem:
        assert backends["postgresql_1"]["skipped"] == "no --pg-url"
        assert targets["PG-1 / SQLite, jobs/s"]["result"] is None
        return
    for key in ("postgresql_1", "postgresql_2"):
        counters = backends[key]["postgres_counters"]
        assert counters["xact_commit_per_job"] > 0 and counters["tup_inserted_per_job"] > 0
    assert backends["postgresql_2"]["replicas"] == 2
    assert targets["PG-2 / PG-1, jobs/s"]["result"] in ("PASS", "MISS")
    # The bench dropped the databases it created.
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        names = [backends[k]["database"] for k in ("postgresql_1", "postgresql_2")]
        assert all(n.startswith("jobtrace_bench_") for n in names)
        left = await conn.fetch("SELECT datname FROM pg_database WHERE datname = ANY($1)", names)
        assert not left, left
    finally:
        await conn.close()


def test_rounds_are_summarised_by_their_medians() -> None:
    from jobtrace.bench_compare import median_of

    rounds = [
        {"jobs_per_s": 10.0, "jobs": 5, "kinds": {"INSERT": 13.0}, "label": "SQLite", "x": None},
        {
            "jobs_per_s": 30.0,
            "jobs": 5,
            "kinds": {"INSERT": 12.0, "SELECT": 2.0},
            "label": "SQLite",
        },
        {"jobs_per_s": 20.0, "jobs": 6, "kinds": {"INSERT": 11.0}, "label": "SQLite", "x": None},
    ]
    assert median_of(rounds) == {
        "jobs_per_s": 20.0,
        "jobs": 5,
        "kinds": {"INSERT": 12.0, "SELECT": 2.0},
        "label": "SQLite",
        "x": None,
    }


async def test_compare_backends_refuses_a_postgresql_server_beyond_loopback() -> None:
    code, _, err = await bench(
        "--compare-backends", "--pg-url", "postgresql+asyncpg://postgres@203.0.113.7/postgres"
    )
    assert code == 2 and "loopback" in err


async def test_the_unary_ceiling_is_measured_for_a_fixed_time() -> None:
    server = await bench_module.start_floor_server()
    try:
        for seconds in (0.3, 1.0):
            t0 = time.monotonic()
            rate, p50, p99 = await bench_module.unary_ceiling(server.target, seconds, 4, 0.1)
            elapsed = time.monotonic() - t0
            assert seconds + 0.1 <= elapsed < seconds + 3, elapsed
            assert rate > 0 and 0 < p50 <= p99
    finally:
        await bench_module.stop_server(server)


async def test_statement_counting_is_off_unless_the_bench_asks(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Harness(sqlite_url) as plain:
        async with grpc.aio.insecure_channel(plain.target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary(bench_module.STATEMENTS_METHOD)(b"", timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    monkeypatch.setenv("JOBTRACE_BENCH_COUNT_STATEMENTS", "1")
    async with Harness(sqlite_url) as counting:
        before = await bench_module.read_statements([counting.target])
        assert before is not None
        from jobtrace.pb import common_pb2, job_service_pb2

        await counting.stubs().jobs.SubmitJob(
            job_service_pb2.SubmitJobRequest(
                request_id="count-1", job=common_pb2.JobSpec(service="bench")
            )
        )
        after = await bench_module.read_statements([counting.target])
        assert after is not None
        assert after["kinds"].get("INSERT", 0) > before["kinds"].get("INSERT", 0)
        assert after["transactions"] > before["transactions"]


async def test_bench_refuses_a_target_beyond_loopback() -> None:
    code, _, err = await bench("--target", "203.0.113.7:50051", "--json")
    assert code == 2 and "loopback" in err


async def test_a_phase_past_its_time_bound_is_reported() -> None:
    code, _, err = await bench(
        "--jobs", "20000", "--workers", "1", "--subscribers", "0", "--max-seconds", "1",
        "--ceiling-seconds", "0.2",
    )  # fmt: skip
    assert code == 1 and "did not finish within 1 s" in err


async def test_bulk_bench_runs_both_paths_side_by_side_with_every_job_accounted_for() -> None:
    """`--bulk N`: SubmitJob and SubmitJobs (here in chunks of 25) on one
    server and the same workers; every job of both checked completed, traced
    and attested in the database; on PostgreSQL too when it is there."""
    problem = await pg_problem()
    if problem and require_pg():
        pytest.fail(f"JOBTRACE_REQUIRE_PG=1 but {problem}")
    pg = (
        []
        if problem
        else ["--pg-url", PG_ADMIN_URL.replace("postgresql://", "postgresql+asyncpg://")]
    )
    code, out, err = await bench(
        "--bulk", "60", "--chunk", "25", "--workers", "1", "--report-window-ms", "2", *pg, "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["params"]["chunk"] == 25 and result["params"]["report_window_ms"] == 2
    for backend in ["sqlite"] + ([] if problem else ["postgresql"]):
        for path in ("single", "bulk"):
            p = result[backend][path]
            assert p["completed"] == 60 and p["jobs_per_s"] > 0, (backend, path)
            assert p["checks"] == {"completed": 60, "traced": 60, "attested": 60}
            assert 0 < p["e2e_p50_ms"] <= p["e2e_p99_ms"]
        assert result[backend]["bulk_vs_single_jobs_per_s"] > 0
