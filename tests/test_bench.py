"""`jobtrace bench` runs end to end (tiny sizes here: the figures are for `make bench`)."""

from __future__ import annotations

import asyncio
import json
import sys

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


SMALL = ("--jobs", "60", "--workers", "2", "--subscribers", "5", "--rate", "20")


async def test_bench_prints_every_figure_as_json() -> None:
    code, out, err = await bench(*SMALL, "--trace-seconds", "1", "--json")
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


async def test_bench_prints_a_table() -> None:
    code, out, err = await bench(*SMALL, "--trace-seconds", "0.5", "--no-floor")
    assert code == 0, err
    assert "jobs/s end to end" in out and "of ceiling" in out and "gRPC alone" in out
    floor_row = next(line for line in out.splitlines() if line.startswith("jobs/s, gRPC alone"))
    assert floor_row.split()[3] == "n/a", "--no-floor skips the gRPC-alone run"


async def test_bench_refuses_a_target_beyond_loopback() -> None:
    code, _, err = await bench("--target", "203.0.113.7:50051", "--json")
    assert code == 2 and "loopback" in err


async def test_a_phase_past_its_time_bound_is_reported() -> None:
    code, _, err = await bench(
        "--jobs", "20000", "--workers", "1", "--subscribers", "0", "--max-seconds", "1"
    )
    assert code == 1 and "did not finish within 1 s" in err
