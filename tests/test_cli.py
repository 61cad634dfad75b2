"""The `jobtrace` command line, run as real processes: the README tour, `watch` in a
pseudo-terminal, JSON output, exit codes and helpful errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import signal
import stat
import sys
from pathlib import Path
from typing import Any

from jobtrace.client import Client, JobContext

from .conftest import Harness, wait_for
from .procs import jobtrace
from .workers import runtime_worker

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


async def instant(ctx: JobContext) -> dict[str, Any]:
    if ctx.payload.get("fail"):
        raise RuntimeError(str(ctx.payload["fail"]))
    await ctx.progress(50, "halfway")
    return {"done": ctx.job.step_name or ctx.job.id}


# --- the README tour --------------------------------------------------------------


def tour_blocks() -> tuple[list[str], str]:
    """The README tour's two shell blocks: the long-running lines, and the rest."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Five-minute tour", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) == 2, "the tour has a setup block and a command block"
    setup = [line.split("#", 1)[0].strip() for line in blocks[0].splitlines() if line.strip()]
    return setup, blocks[1]


async def test_the_readme_tour_works_as_written(tmp_path: Path) -> None:
    setup, commands = tour_blocks()
    assert setup == ["make run", ".venv/bin/jobtrace worker --demo"]
    recipe = re.search(r"^run:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert recipe is not None
    assert recipe.group(1).strip() == "$(BIN)/jobtrace serve --http-listen 127.0.0.1:8080"
    # A working copy as a newcomer has it: .venv/bin/jobtrace and examples/.
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    launcher = bin_dir / "jobtrace"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m jobtrace "$@"\n')
    launcher.chmod(launcher.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "NO_COLOR": "1", "JOBTRACE_LISTEN": "127.0.0.1:0"}
    env["JOBTRACE_DB"] = str(tmp_path / "jobtrace.db")  # what `make run` uses, in tmp
    env.pop("JOBTRACE_TARGET", None)

    # `make run` is `$(BIN)/jobtrace serve --http-listen 127.0.0.1:8080` (checked
    # above); here its HTTP listener takes a free port.
    serve = await asyncio.create_subprocess_exec(
        str(launcher),
        "serve",
        "--http-listen",
        "127.0.0.1:0",
        cwd=tmp_path,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    worker = None
    try:
        assert serve.stderr is not None
        port = await _listening_port(serve.stderr)
        env["JOBTRACE_TARGET"] = f"127.0.0.1:{port}"
        worker = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            "exec " + setup[1],
            cwd=tmp_path,
            env=env,
            stderr=asyncio.subprocess.DEVNULL,
        )
        tour = await asyncio.create_subprocess_exec(
            "/bin/bash",
            "-euo",
            "pipefail",
            "-c",
            commands,
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(tour.communicate(), 90)
        text = out.decode()
        assert tour.returncode == 0, text
    finally:
        for proc in (worker, serve):
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        codes = [await asyncio.wait_for(p.wait(), 30) for p in (worker, serve) if p is not None]
    assert codes == [0, 0], "the worker and the server stop cleanly on SIGTERM"
    assert re.search(r"workflow wf_\w+ 'tour': COMPLETED \(4/4 steps completed\)", text)
    assert text.count("worker-completion:job_") == 4 and "workflow-completion:wf_" in text
    assert re.search(
        r"workflow-completion:wf_\w+: valid \(signature, chain and annotations\)", text
    )
    last = text.rstrip().splitlines()[-1]
    assert last.startswith("valid (signature and digest"), "the offline verification is last"
    assert json.loads((tmp_path / "tour.dsse.json").read_text())["payloadType"]


async def _listening_port(stderr: asyncio.StreamReader) -> int:
    async with asyncio.timeout(30):
        while True:
            line = (await stderr.readline()).decode()
            assert line, "the server exited before listening"
            if m := re.search(r"\(port (\d+)\)", line):
                # Keep the pipe drained so the server never blocks on its log.
                asyncio.get_running_loop().create_task(_drain(stderr))
                return int(m.group(1))


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass


# --- watch ---------------------------------------------------------------------------


async def test_watch_draws_live_progress_bars_in_a_terminal(sqlite_harness: Harness) -> None:
    halfway = asyncio.Event()
    release = asyncio.Event()

    async def step(ctx: JobContext) -> dict[str, Any]:
        await ctx.progress(50, f"{ctx.job.step_name} halfway")
        if ctx.job.step_name == "render":
            halfway.set()
            await release.wait()
        return {}

    async with runtime_worker(sqlite_harness.target, {"demo": step}, max_concurrency=2):
        async with Client(sqlite_harness.target) as jt:
            workflow = await jt.submit_workflow(
                "draw",
                [
                    {"name": "fetch", "job": {"service": "demo"}},
                    {"name": "render", "job": {"service": "demo"}},
                    {"name": "publish", "job": {"service": "demo"}},
                ],
            )
        primary, secondary = pty.openpty()
        env = {**os.environ, "JOBTRACE_TARGET": sqlite_harness.target, "COLUMNS": "120"}
        env.pop("NO_COLOR", None)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "jobtrace",
            "watch",
            workflow.id,
            stdin=secondary,
            stdout=secondary,
            stderr=secondary,
            env=env,
        )
        os.close(secondary)
        screen = bytearray()
        reader = asyncio.create_task(asyncio.to_thread(_read_all, primary, screen))
        try:
            # The bar of the running step is drawn at 50 % while the step waits.
            await asyncio.wait_for(halfway.wait(), 20)
            await wait_for(
                lambda: re.search(rb"render\s+RUNNING\s+\[#{10}\.{10}\]\s+50\.0%", _plain(screen)),
                timeout=20,
            )
            release.set()
            code = await asyncio.wait_for(proc.wait(), 30)
            await asyncio.wait_for(reader, 10)
        finally:
            if proc.returncode is None:
                proc.kill()
            os.close(primary)
    text = _plain(screen).decode()
    raw = screen.decode()
    assert code == 0, text
    assert "\x1b[32m" in raw and "\x1b[J" in raw, "coloured and redrawn in place"
    assert re.search(r"render\s+RUNNING\s+\[##########\.{10}\]\s+50\.0%", text)
    for name in ("fetch", "render", "publish"):
        assert re.search(rf"{name}\s+COMPLETED\s+\[#{{20}}\] 100\.0%", text), name
    assert "render: render halfway" in text, "the business trace is tailed"
    assert text.rstrip().endswith("COMPLETED (3/3 steps completed)")


def _read_all(fd: int, into: bytearray) -> None:
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the terminal's other side closed
            return
        if not chunk:
            return
        into += chunk


def _plain(screen: bytearray | bytes) -> bytes:
    return ANSI.sub("", bytes(screen).decode(errors="replace")).encode()


async def test_watch_exit_code_reflects_the_final_state(sqlite_harness: Harness) -> None:
    async with runtime_worker(sqlite_harness.target, {"demo": instant}):
        async with Client(sqlite_harness.target) as jt:
            ok = await jt.submit_job("demo")
            failed = await jt.submit_job("demo", {"fail": "boom"}, max_attempts=1)
            cancelled = await jt.submit_job("nobody-serves-this")
            await jt.cancel_job(cancelled.id)
        code_ok, out_ok, _ = await jobtrace("watch", ok.id, target=sqlite_harness.target)
        code_failed, out_failed, _ = await jobtrace(
            "watch", failed.id, target=sqlite_harness.target
        )
        code_cancelled, _, _ = await jobtrace("watch", cancelled.id, target=sqlite_harness.target)
    assert (code_ok, code_failed, code_cancelled) == (0, 1, 3)
    assert out_ok.rstrip().endswith("COMPLETED") and "boom" in out_failed


async def test_watch_json_lines_end_with_the_final_state(sqlite_harness: Harness) -> None:
    async with runtime_worker(sqlite_harness.target, {"demo": instant}):
        code, out, _ = await jobtrace(
            "submit", "demo", '{"n": 1}', "--watch", "--json", target=sqlite_harness.target
        )
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and lines[0]["spec"]["payload"] == {"n": 1}
    assert any("event" in line for line in lines) and any("job" in line for line in lines)
    assert lines[-1] == {"final_state": "COMPLETED"}


# --- reading commands, JSON, errors ------------------------------------------------------


async def test_reading_commands_print_json(sqlite_harness: Harness, tmp_path: Path) -> None:
    workflow_file = tmp_path / "wf.yaml"
    workflow_file.write_text(
        "name: report\nrequest_context: {user_context: {user_id: dana}}\n"
        "steps:\n  - {name: a, service: demo}\n  - {name: b, service: demo, payload: {x: 1}}\n"
    )
    async with runtime_worker(sqlite_harness.target, {"demo": instant}):
        code, wf_id, _ = await jobtrace(
            "submit",
            "--workflow",
            str(workflow_file),
            "--watch",
            "--plain",
            target=sqlite_harness.target,
        )
        assert code == 0
        wf_id = wf_id.splitlines()[0].strip()
    t = sqlite_harness.target
    _, out, _ = await jobtrace("get", wf_id, "--json", target=t)
    workflow = json.loads(out)
    assert workflow["state"] == "RUN_STATE_COMPLETED" and len(workflow["steps"]) == 2
    _, out, _ = await jobtrace("jobs", "--workflow", wf_id, "--json", target=t)
    # --json prints items whole (the FULL view), as before lists had views.
    listed = {j["step_name"]: j for j in json.loads(out)["jobs"]}
    assert listed.keys() == {"a", "b"} and listed["b"]["spec"]["payload"] == {"x": 1}
    _, out, _ = await jobtrace("workflows", "--state", "completed", "--json", target=t)
    assert [(w["id"], len(w["steps"])) for w in json.loads(out)["workflows"]] == [(wf_id, 2)]
    _, out, _ = await jobtrace("trace", "list", wf_id, "--type", "completed", "--json", target=t)
    events = json.loads(out)["events"]
    assert {e["node_id"] for e in events} == {"a", "b", "workflow"}
    assert all(e["duration"].endswith("s") for e in events), "each says how long it took"
    _, out, _ = await jobtrace("trace", "list", wf_id, "--type", "completed", target=t)
    assert re.search(r"COMPLETED +a \[1/2\]: a completed \(took \d+\.\d{3} s\)", out), out
    assert re.search(r"COMPLETED +workflow: workflow completed .*\(took \d+\.\d{3} s\)", out)
    _, out, _ = await jobtrace("trace", "tail", wf_id, "--json", target=t)
    streamed = [json.loads(line) for line in out.splitlines()]
    assert streamed[-1]["final_status"]["state"] == "RUN_STATE_COMPLETED"
    _, out, _ = await jobtrace("attest", "list", "--workflow", wf_id, "--json", target=t)
    assert len(json.loads(out)["attestations"]) == 3
    assert all("request_context" in x["data"] for x in json.loads(out)["attestations"])
    code, out, _ = await jobtrace(
        "attest", "get", f"workflow-completion:{wf_id}", "--json", target=t
    )
    attestation = json.loads(out)
    assert code == 0 and attestation["data"]["request_context"]["user_context"]["user_id"] == "dana"
    code, out, _ = await jobtrace(
        "annotate",
        wf_id,
        "decision.outcome=approve",
        "decision.confidence=0.9",
        "--actor",
        "reviewer:erin@1",
        "--json",
        target=t,
    )
    assert code == 0 and len(json.loads(out)["annotations"]) == 2
    _, out, _ = await jobtrace("annotations", wf_id, "--prefix", "decision.", "--json", target=t)
    values = {a["key"]: a["value"] for a in json.loads(out)["annotations"]}
    assert values == {"decision.outcome": "approve", "decision.confidence": 0.9}
    _, out, _ = await jobtrace(
        "annotations", "--key", "decision.confidence", "--max", "0.95", "--json", target=t
    )
    assert [(a["run_id"], a["value"]) for a in json.loads(out)["annotations"]] == [(wf_id, 0.9)]
    _, out, _ = await jobtrace("annotations", "--equals", "approve", target=t)
    assert "decision.outcome" in out and "decision.confidence" not in out
    _, out, _ = await jobtrace("keys", "list", "--json", target=t)
    assert [k["active"] for k in json.loads(out)["keys"]] == [True]


async def test_trace_tail_colours_levels_and_resumes_from_a_cursor(sqlite_harness: Harness) -> None:
    async with Client(sqlite_harness.target) as jt:
        job = await jt.submit_job("svc")
        await jt.append_trace_events(
            job.id,
            [
                {"message": "fine", "level": "LEVEL_INFO"},
                {"message": "odd", "level": "LEVEL_WARN"},
                {"message": "bad", "level": "LEVEL_ERROR"},
            ],
        )
        await jt.cancel_job(job.id)
    code, out, _ = await jobtrace(
        "trace",
        "tail",
        job.id,
        "--color",
        "always",
        "--level",
        "warn",
        target=sqlite_harness.target,
    )
    assert code == 3, "the run ended CANCELLED"
    assert "\x1b[33mWARN" in out and "\x1b[31mERROR" in out and "fine" not in out
    _, page, _ = await jobtrace(
        "trace", "list", job.id, "--limit", "1", "--json", target=sqlite_harness.target
    )
    cursor = json.loads(page)["next_cursor"]
    _, rest, _ = await jobtrace(
        "trace", "list", job.id, "--cursor", cursor, "--json", target=sqlite_harness.target
    )
    assert [e["message"] for e in json.loads(rest)["events"]][:2] == ["odd", "bad"]


async def test_errors_are_explained_not_tracebacks(sqlite_harness: Harness) -> None:
    code, _, err = await jobtrace(
        "get", "job_00000000000000000000000000", target=sqlite_harness.target
    )
    assert code == 2 and "NOT_FOUND" in err and "Traceback" not in err
    code, _, err = await jobtrace("submit", "demo", "{not json", target=sqlite_harness.target)
    assert code == 2 and "not valid JSON" in err and "Traceback" not in err
    code, _, err = await jobtrace("submit", "bad service!", target=sqlite_harness.target)
    assert code == 2 and "INVALID_ARGUMENT" in err and "job.service" in err
    code, _, err = await jobtrace("get", "nonsense", target=sqlite_harness.target)
    assert code == 2 and "neither a job id" in err
    with contextlib.closing(__import__("socket").socket()) as probe:
        probe.bind(("127.0.0.1", 0))  # a port nobody listens on while we hold it
        port = probe.getsockname()[1]
        code, _, err = await jobtrace("jobs", "--timeout", "2", target=f"127.0.0.1:{port}")
    assert code == 2 and "cannot reach jobtrace" in err and "Traceback" not in err
