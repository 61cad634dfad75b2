"""`jobtrace bench`: end-to-end throughput and latency on loopback, with the gRPC
unary ceiling measured by the same harness on the same server settings."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2, struct_pb2

from jobtrace.client.worker import DEFAULT_REPORT_WINDOW_MS
from jobtrace.pb import (
    common_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    schedule_service_pb2,
    schedule_service_pb2_grpc,
    trace_service_pb2,
    trace_service_pb2_grpc,
)

NOOP_METHOD = "/jobtrace.bench.Noop/Ping"
STATEMENTS_METHOD = "/jobtrace.bench.Statements/Read"
MAX_SECONDS = 300.0  # default bound of each phase, in time as well as in count
CEILING_SECONDS = 3.0
CEILING_WARMUP_SECONDS = 0.5
LATENCY_JOBS = 300
LATENCY_SECONDS = 60.0
LATENCY_WARMUP_JOBS = 5
READY = "ready"  # a worker's first line in its completions file
TERMINAL = frozenset(
    {
        common_pb2.RUN_STATE_COMPLETED,
        common_pb2.RUN_STATE_FAILED,
        common_pb2.RUN_STATE_CANCELLED,
        common_pb2.RUN_STATE_TERMINATED,
        common_pb2.RUN_STATE_TIMED_OUT,
    }
)


class PhaseTimeout(Exception):
    """A phase of the benchmark ran past its time bound."""


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Server:
    proc: asyncio.subprocess.Process
    target: str
    peak_rss_mb: float = 0.0
    _sampler: asyncio.Task[None] | None = None

    def sample(self) -> None:
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return
        if m := re.search(r"VmHWM:\s+(\d+) kB", text):
            self.peak_rss_mb = max(self.peak_rss_mb, int(m.group(1)) / 1024)


async def start_server(db: str, key: Path, extra: list[str]) -> Server:
    return await _start(
        "jobtrace", "serve", "--listen", "127.0.0.1:0", "--db", db,
        "--signing-key-file", str(key), *extra,
    )  # fmt: skip


async def _start(*args: str) -> Server:
    """Start `python -m <args>`, a server that logs "(port N)" once it listens."""
    # Statement counting is on unless the caller sets JOBTRACE_BENCH_COUNT_STATEMENTS=0
    # (to see what the counting itself costs).
    counting = os.environ.get("JOBTRACE_BENCH_COUNT_STATEMENTS", "1")
    env = {**os.environ, "JOBTRACE_BENCH_NOOP": "1", "JOBTRACE_BENCH_COUNT_STATEMENTS": counting}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, stderr=asyncio.subprocess.PIPE, env=env
    )
    assert proc.stderr is not None
    async with asyncio.timeout(60):
        while True:
            line = (await proc.stderr.readline()).decode()
            if not line:
                raise RuntimeError("server exited during start")
            if m := re.search(r"\(port (\d+)\)", line):
                break
    server = Server(proc, f"127.0.0.1:{m.group(1)}")

    async def drain_and_sample() -> None:
        assert proc.stderr is not None
        while True:
            server.sample()
            try:
                async with asyncio.timeout(0.5):
                    if not await proc.stderr.readline():
                        return
            except TimeoutError:
                continue

    server._sampler = asyncio.create_task(drain_and_sample())
    return server


async def start_floor_server() -> Server:
    """The gRPC-alone server (`floor_server_main`) in its own process."""
    return await _start("jobtrace.bench", "--floor-server")


async def stop_server(server: Server) -> None:
    server.sample()
    if server.proc.returncode is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                await server.proc.wait()
        except TimeoutError:
            server.proc.kill()
    if server._sampler is not None:
        server._sampler.cancel()


# --- the bench worker (a separate process) -------------------------------------------


# start_workers' window for workers from before batches (see worker_main).
OLD_STYLE = -1.0


async def worker_main(
    target: str, log: Any, concurrency: int, window_ms: float = DEFAULT_REPORT_WINDOW_MS
) -> None:
    """Runs 'bench' jobs (3 progress reports, then complete) and writes a line per
    stored completion: '<job id> <unix time>'. Reports queued within `window_ms`
    go out as one batch (0: one message per report; below 0: a worker from
    before batches, one message per report and per assignment)."""
    from jobtrace.client.worker import JobContext, Worker

    worker = Worker(
        target,
        worker_id=f"bench-{os.getpid()}",
        max_concurrency=concurrency,
        report_window_ms=max(window_ms, 0.0),
        accepts_batches=window_ms >= 0,
    )

    def completed(job_id: str, stored: bool) -> None:
        if stored:
            log.write(f"{job_id} {time.time()}\n")

    worker.on_completed = completed

    @worker.handler("bench")
    async def run(job: JobContext) -> dict[str, Any]:
        for step in (1, 2, 3):
            await job.progress(step * 33.0, f"step {step}")
        return {"ok": True}

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, worker.stop)
    # Tell the bench this process is up (imports take a second), so that a
    # measured phase does not start with workers still starting.
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 60)
    log.write(f"{READY} {os.getpid()}\n")
    await worker.run()


# --- gRPC alone: the job's messages with no storage (a separate process) ---------------


async def floor_server_main() -> None:
    """A server that answers the bench's job traffic and does nothing else: a
    submit is queued in memory, handed to a worker as an assignment, and every
    report is acknowledged unread. Run by the same submitters and workers as
    the real server, it shows what gRPC alone allows for a job's messages (one
    unary submit, an assignment, three progress reports, a completion and four
    acks) on this machine. WatchJob streams a job's snapshot at each change
    (assignment, progress, completion) until it is terminal, as the real
    server's does, so the one-at-a-time latency is seen the same way."""
    from collections import OrderedDict

    from google.protobuf import duration_pb2

    from jobtrace.pb import worker_service_pb2 as wpb
    from jobtrace.server import _noop_handler

    queued: asyncio.Queue[common_pb2.Job] = asyncio.Queue()
    count = iter(range(1, 1 << 62))
    live: dict[str, common_pb2.Job] = {}  # submitted, not yet terminal
    ended: OrderedDict[str, common_pb2.Job] = OrderedDict()  # the latest terminal ones
    watchers: dict[str, set[asyncio.Queue[common_pb2.Job]]] = {}

    def changed(job: common_pb2.Job) -> None:
        for watcher in watchers.get(job.id, ()):
            snapshot = common_pb2.Job()
            snapshot.CopyFrom(job)
            watcher.put_nowait(snapshot)
        if job.state in TERMINAL:
            live.pop(job.id, None)
            ended[job.id] = job
            while len(ended) > 10_000:
                ended.popitem(last=False)

    async def submit(request: Any, context: Any) -> Any:
        job = common_pb2.Job(
            id=f"job_floor{next(count)}",
            spec=request.job,
            attempt=1,
            state=common_pb2.RUN_STATE_QUEUED,
        )
        live[job.id] = job
        queued.put_nowait(job)
        return job_service_pb2.SubmitJobResponse(job=job)

    async def watch(request: Any, context: Any) -> Any:
        found = live.get(request.job_id) or ended.get(request.job_id)
        if found is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such job")
        assert found is not None
        job = common_pb2.Job()
        job.CopyFrom(found)  # the live one changes under us
        changes: asyncio.Queue[common_pb2.Job] = asyncio.Queue()
        watchers.setdefault(job.id, set()).add(changes)
        try:
            yield job_service_pb2.WatchJobResponse(job=job)
            while job.state not in TERMINAL:
                async with asyncio.timeout(MAX_SECONDS):
                    job = await changes.get()
                yield job_service_pb2.WatchJobResponse(job=job)
        finally:
            watchers[job.id].discard(changes)
            if not watchers[job.id]:
                del watchers[job.id]

    async def connect(requests: Any, context: Any) -> Any:
        hello = (await anext(requests)).hello
        slots = asyncio.Semaphore(max(1, hello.max_concurrency))
        out: asyncio.Queue[Any] = asyncio.Queue()
        yield wpb.ConnectResponse(
            welcome=wpb.Welcome(
                session_id="floor",
                heartbeat_interval=duration_pb2.Duration(seconds=10),
                lease_duration=duration_pb2.Duration(seconds=60),
            )
        )

        async def dispatch() -> None:
            while True:
                await slots.acquire()
                job = await queued.get()
                job.state = common_pb2.RUN_STATE_RUNNING
                changed(job)
                out.put_nowait(wpb.ConnectResponse(assignment=wpb.Assignment(job=job, attempt=1)))

        async def read() -> None:
            async for m in requests:
                kind = m.WhichOneof("kind")
                if kind == "heartbeat":
                    out.put_nowait(
                        wpb.ConnectResponse(heartbeat_ack=wpb.HeartbeatAck(message_id=m.message_id))
                    )
                elif kind in ("progress", "complete", "fail", "trace", "annotate"):
                    report = getattr(m, kind)
                    ack = wpb.Ack(message_id=m.message_id, job_id=report.job_id, attempt=1)
                    out.put_nowait(wpb.ConnectResponse(ack=ack))
                    job = live.get(report.job_id)
                    if job is not None and kind in ("progress", "complete", "fail"):
                        if kind != "progress":
                            job.state = (
                                common_pb2.RUN_STATE_COMPLETED
                                if kind == "complete"
                                else common_pb2.RUN_STATE_FAILED
                            )
                        changed(job)
                    if kind in ("complete", "fail"):
                        slots.release()
            out.put_nowait(None)

        tasks = [asyncio.create_task(dispatch()), asyncio.create_task(read())]
        try:
            while (message := await out.get()) is not None:
                yield message
        finally:
            for task in tasks:
                task.cancel()

    server = grpc.aio.server()
    jobs = grpc.method_handlers_generic_handler(
        "jobtrace.v1.JobService",
        {
            "SubmitJob": grpc.unary_unary_rpc_method_handler(
                submit,
                request_deserializer=job_service_pb2.SubmitJobRequest.FromString,
                response_serializer=job_service_pb2.SubmitJobResponse.SerializeToString,
            ),
            "WatchJob": grpc.unary_stream_rpc_method_handler(
                watch,
                request_deserializer=job_service_pb2.WatchJobRequest.FromString,
                response_serializer=job_service_pb2.WatchJobResponse.SerializeToString,
            ),
        },
    )
    workers = grpc.method_handlers_generic_handler(
        "jobtrace.v1.WorkerService",
        {
            "Connect": grpc.stream_stream_rpc_method_handler(
                connect,
                request_deserializer=wpb.ConnectRequest.FromString,
                response_serializer=wpb.ConnectResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((jobs, workers, _noop_handler()))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"gRPC-alone bench server listening (port {port})", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


# --- phases -----------------------------------------------------------------------------


@dataclass
class Results:
    params: dict[str, Any]
    jobs_per_s: float = 0.0
    submit_ms: list[float] = field(default_factory=list)
    e2e_ms: list[float] = field(default_factory=list)
    trace_ms: list[float] = field(default_factory=list)
    trace_deliveries: int = 0
    unary_ceiling_rps: float = 0.0
    unary_p50_ms: float = 0.0
    unary_p99_ms: float = 0.0
    submit_rps: float = 0.0
    server_peak_rss_mb: float = 0.0
    completed: int = 0
    floor_jobs_per_s: float = 0.0
    statements: dict[str, Any] | None = None
    server_cpu_s: float | None = None
    latency_ms: list[float] = field(default_factory=list)
    floor_latency_ms: list[float] = field(default_factory=list)
    # --rate-limit: the limit (tokens/s, burst) every job used, and the
    # completion times (s) of the jobs.
    rate_limit: int = 0
    rate_limit_burst: int = 0
    completion_times: list[float] = field(default_factory=list)


async def bounded(step: Any, seconds: float, phase: str) -> Any:
    try:
        return await asyncio.wait_for(step, seconds)
    except TimeoutError:
        raise PhaseTimeout(
            f"the {phase} phase did not finish within {seconds:g} s (see --max-seconds)"
        ) from None


async def unary_ceiling(
    target: str,
    seconds: float,
    concurrency: int,
    warmup_s: float = CEILING_WARMUP_SECONDS,
) -> tuple[float, float, float]:
    """Calls/s, p50 and p99 ms of an empty unary handler on the same server, with the
    submitters' concurrency: what gRPC alone allows here. Measured for a fixed time
    after a warm-up (a count of calls would end before the rate settles). Zeros when
    the server has no such handler (a --target started without JOBTRACE_BENCH_NOOP=1)."""
    async with grpc.aio.insecure_channel(target) as channel:
        ping = channel.unary_unary(NOOP_METHOD)
        try:
            await ping(b"", timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                return 0.0, 0.0, 0.0
            raise
        latencies: list[float] = []

        async def loop(until: float, record: bool) -> int:
            calls = 0
            while time.perf_counter() < until:
                t0 = time.perf_counter()
                await ping(b"", timeout=10)
                calls += 1
                if record:
                    latencies.append((time.perf_counter() - t0) * 1000)
            return calls

        warm = time.perf_counter() + warmup_s
        await bounded(
            asyncio.gather(*(loop(warm, False) for _ in range(concurrency))), 60, "warm-up"
        )
        t0 = time.perf_counter()
        counts = await bounded(
            asyncio.gather(*(loop(t0 + seconds, True) for _ in range(concurrency))),
            seconds + 60,
            "ceiling",
        )
        rate = sum(counts) / (time.perf_counter() - t0)
        return rate, pct(latencies, 0.5), pct(latencies, 0.99)


async def read_statements(targets: list[str]) -> dict[str, Any] | None:
    """The statements and transactions the servers have sent their database so
    far, summed over them (None when a server does not count: a --target)."""
    total: dict[str, Any] = {"statements": 0, "transactions": 0, "kinds": {}}
    for target in targets:
        async with grpc.aio.insecure_channel(target) as channel:
            try:
                raw = await channel.unary_unary(STATEMENTS_METHOD)(b"", timeout=10)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return None
                raise
        one = json.loads(raw)
        total["statements"] += one["statements"]
        total["transactions"] += one["transactions"]
        for kind, n in one["kinds"].items():
            total["kinds"][kind] = total["kinds"].get(kind, 0) + n
    return total


def statements_delta(
    before: dict[str, Any] | None, after: dict[str, Any] | None, jobs: int
) -> dict[str, Any] | None:
    """Statements, transactions and statements by kind per job between two reads."""
    if before is None or after is None or jobs <= 0:
        return None
    kinds = {
        kind: round((n - before["kinds"].get(kind, 0)) / jobs, 2)
        for kind, n in sorted(after["kinds"].items())
        if n != before["kinds"].get(kind, 0)
    }
    return {
        "statements_per_job": round((after["statements"] - before["statements"]) / jobs, 2),
        "transactions_per_job": round((after["transactions"] - before["transactions"]) / jobs, 3),
        "kinds_per_job": kinds,
    }


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far (/proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # Fields after the command name start at the 3rd (state); utime, stime are the 14th, 15th.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_total(pids: list[int]) -> float | None:
    values = [cpu_seconds(pid) for pid in pids]
    return None if not values or None in values else sum(v for v in values if v is not None)


async def one_at_a_time(
    target: str,
    jobs: int = LATENCY_JOBS,
    seconds: float = LATENCY_SECONDS,
    warmup: int = LATENCY_WARMUP_JOBS,
) -> list[float]:
    """Submit -> completion seen by the client, ms, one job in flight: each job is
    submitted, then watched (WatchJob) until its terminal snapshot arrives. The
    watch opens while the job runs, so its set-up overlaps the job's own work; the
    figure includes the server noticing the completion and streaming it out.
    Stops early (with fewer samples) past `seconds`."""
    samples: list[float] = []
    run_id = os.urandom(4).hex()
    deadline = time.monotonic() + seconds

    async def measure() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            for i in range(warmup + jobs):
                if time.monotonic() > deadline:
                    return
                payload = struct_pb2.Struct()
                payload.update({"i": i})
                request = job_service_pb2.SubmitJobRequest(
                    request_id=f"bench-one-{run_id}-{i}",
                    job=common_pb2.JobSpec(service="bench", payload=payload),
                )
                t0 = time.perf_counter()
                job = (await stub.SubmitJob(request, timeout=30)).job
                call = stub.WatchJob(job_service_pb2.WatchJobRequest(job_id=job.id), timeout=30)
                async for message in call:
                    if message.job.state in TERMINAL:
                        break
                else:
                    raise RuntimeError(f"the watch of {job.id} ended before the job did")
                elapsed = (time.perf_counter() - t0) * 1000
                call.cancel()
                if i >= warmup:
                    samples.append(elapsed)

    await bounded(measure(), seconds + 60, "one-at-a-time")
    return samples


async def run_jobs(
    targets: list[str],
    jobs: int,
    concurrency: int,
    done_files: list[Path],
    results: Results,
    max_seconds: float = MAX_SECONDS,
    rate_limit: str = "",
) -> None:
    channels = [grpc.aio.insecure_channel(t) for t in targets]
    uses = [common_pb2.RateLimitUse(key=rate_limit)] if rate_limit else []
    stubs = [job_service_pb2_grpc.JobServiceStub(c) for c in channels]
    submitted: dict[str, float] = {}
    queue = iter(range(jobs))
    run_id = os.urandom(4).hex()

    async def submitter(n: int) -> None:
        stub = stubs[n % len(stubs)]
        for i in queue:
            payload = struct_pb2.Struct()
            payload.update({"i": i})
            request = job_service_pb2.SubmitJobRequest(
                request_id=f"bench-{run_id}-{i}",
                job=common_pb2.JobSpec(service="bench", payload=payload, rate_limits=uses),
            )
            t0 = time.time()
            response = await stub.SubmitJob(request, timeout=30)
            results.submit_ms.append((time.time() - t0) * 1000)
            submitted[response.job.id] = t0

    start = time.time()
    await bounded(
        asyncio.gather(*(submitter(n) for n in range(concurrency))), max_seconds, "submit"
    )
    results.submit_rps = jobs / max(time.time() - start, 1e-9)
    completions: dict[str, float] = {}
    deadline = time.monotonic() + max_seconds
    while len(completions) < jobs and time.monotonic() < deadline:
        for f in done_files:
            if f.exists():
                for line in f.read_text().splitlines():
                    job_id, at = line.split()
                    if job_id != READY:
                        completions[job_id] = float(at)
        if len(completions) < jobs:
            await asyncio.sleep(0.1)
    for channel in channels:
        await channel.close()
    results.completed = len(completions)
    results.completion_times = sorted(completions.values())
    if completions:
        results.jobs_per_s = len(completions) / (max(completions.values()) - start)
        results.e2e_ms = [
            (at - submitted[j]) * 1000 for j, at in completions.items() if j in submitted
        ]


async def trace_fanout(
    targets: list[str], subscribers: int, rate: float, seconds: float, results: Results
) -> None:
    channels = [grpc.aio.insecure_channel(targets[i % len(targets)]) for i in range(4)]
    jobs = job_service_pb2_grpc.JobServiceStub(channels[0])
    run = (
        await jobs.SubmitJob(
            job_service_pb2.SubmitJobRequest(
                request_id=f"bench-trace-{os.urandom(4).hex()}",
                job=common_pb2.JobSpec(service="bench-trace-idle"),
            )
        )
    ).job.id
    acked: dict[str, float] = {}
    received: list[tuple[str, float]] = []
    ready = asyncio.Event()
    connected = 0

    async def subscriber(i: int) -> None:
        nonlocal connected
        stub = trace_service_pb2_grpc.TraceServiceStub(channels[i % len(channels)])
        stream = stub.StreamTraceEvents(
            trace_service_pb2.StreamTraceEventsRequest(run_id=run, follow=True)
        )
        first = True
        async for message in stream:
            if first:
                first = False
                connected += 1
                if connected == subscribers:
                    ready.set()
            if message.WhichOneof("kind") == "event" and message.event.event_key:
                received.append((message.event.event_key, time.time()))
            if message.WhichOneof("kind") == "final_status":
                return

    appender = trace_service_pb2_grpc.TraceServiceStub(channels[0])
    # A first event makes every subscriber answer once: all are then live.
    await appender.AppendTraceEvents(
        trace_service_pb2.AppendTraceEventsRequest(
            run_id=run, events=[common_pb2.TraceEvent(event_key="warmup")]
        )
    )
    tasks = [asyncio.create_task(subscriber(i)) for i in range(subscribers)]
    await bounded(ready.wait(), 60, "subscribe")
    received.clear()
    total = int(rate * seconds)
    for n in range(total):
        key = f"e{n}"
        await appender.AppendTraceEvents(
            trace_service_pb2.AppendTraceEventsRequest(
                run_id=run, events=[common_pb2.TraceEvent(event_key=key, message="tick")]
            )
        )
        acked[key] = time.time()
        await asyncio.sleep(1 / rate)
    await jobs.CancelJob(job_service_pb2.CancelJobRequest(job_id=run))
    await bounded(asyncio.gather(*tasks), 60, "trace delivery")
    results.trace_deliveries = len(received)
    results.trace_ms = [max(0.0, (at - acked[k]) * 1000) for k, at in received if k in acked]
    for channel in channels:
        await channel.close()


async def start_workers(
    targets: list[str],
    done_files: list[Path],
    concurrency: int,
    window_ms: float = DEFAULT_REPORT_WINDOW_MS,
) -> list[asyncio.subprocess.Process]:
    """Worker processes, one per completions file, returned once each is up;
    their report window is `window_ms` (0: one message per report; OLD_STYLE:
    no batches at all, as a worker from before them)."""
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "jobtrace.bench",
            "--worker",
            targets[i % len(targets)],
            str(done),
            str(concurrency),
            str(window_ms),
        )
        for i, done in enumerate(done_files)
    ]
    try:
        await wait_workers_ready(done_files)
    except BaseException:
        await stop_workers(workers)
        raise
    return workers


async def wait_workers_ready(done_files: list[Path], seconds: float = 60.0) -> None:
    """Until every worker has written its ready line (bounded)."""

    def ready(f: Path) -> bool:
        return f.exists() and any(line.startswith(READY) for line in f.read_text().splitlines())

    deadline = time.monotonic() + seconds
    while not all(ready(f) for f in done_files):
        if time.monotonic() > deadline:
            raise PhaseTimeout(f"the workers were not ready within {seconds:g} s")
        await asyncio.sleep(0.05)


async def stop_workers(workers: list[asyncio.subprocess.Process]) -> None:
    for w in workers:
        with contextlib.suppress(ProcessLookupError):
            w.send_signal(signal.SIGTERM)
    for w in workers:
        try:
            async with asyncio.timeout(20):
                await w.wait()
        except TimeoutError:
            w.kill()


async def grpc_floor(args: argparse.Namespace, tmp: Path, results: Results) -> None:
    """The same jobs, submitters and workers against the gRPC-alone server."""
    server = await start_floor_server()
    workers: list[asyncio.subprocess.Process] = []
    try:
        done_files = [tmp / f"floor-done-{i}.txt" for i in range(args.workers)]
        workers = await start_workers(
            [server.target], done_files, args.worker_concurrency, args.report_window_ms
        )
        floor = Results({})
        await run_jobs(
            [server.target], args.jobs, args.concurrency, done_files, floor, args.max_seconds
        )
        results.floor_jobs_per_s = floor.jobs_per_s
        if args.latency:
            await stop_workers(workers)
            workers = await start_workers(
                [server.target], [tmp / "floor-one.txt"], 1, args.report_window_ms
            )
            results.floor_latency_ms = await one_at_a_time(
                server.target, args.latency_jobs, args.latency_seconds
            )
    finally:
        await stop_workers(workers)
        await stop_server(server)


async def bench(args: argparse.Namespace) -> Results:
    params = {
        "jobs": args.jobs,
        "workers": args.workers,
        "worker_concurrency": args.worker_concurrency,
        "report_window_ms": args.report_window_ms,
        "subscribers": args.subscribers,
        "replicas": args.replicas,
        "db": args.db or "sqlite (temporary)",
        "submit_concurrency": args.concurrency,
        "trace_events_per_s": args.rate,
        "trace_seconds": args.trace_seconds,
        "max_seconds": args.max_seconds,
        "target": args.target or "",
        "grpc_floor": args.floor,
        "ceiling_seconds": args.ceiling_seconds,
        "latency_jobs": args.latency_jobs if args.latency else 0,
        "http_listen": args.http_listen,
    }
    results = Results(params)
    tmp = Path(tempfile.mkdtemp(prefix="jobtrace-bench-"))
    servers: list[Server] = []
    workers: list[asyncio.subprocess.Process] = []
    try:
        if args.floor:
            await grpc_floor(args, tmp, results)
        if args.target:
            targets = args.target.split(",")
        else:
            db = args.db or f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
            # --http-listen: the same run with the HTTP listener on (it must cost gRPC nothing).
            extra = ["--http-listen", args.http_listen] if args.http_listen else []
            for r in range(max(1, args.replicas)):
                servers.append(await start_server(db, tmp / f"key{r}", extra))
            targets = [s.target for s in servers]
        done_files = [tmp / f"done-{i}.txt" for i in range(args.workers)]
        workers = await start_workers(
            targets, done_files, args.worker_concurrency, args.report_window_ms
        )
        (
            results.unary_ceiling_rps,
            results.unary_p50_ms,
            results.unary_p99_ms,
        ) = await unary_ceiling(targets[0], args.ceiling_seconds, args.concurrency)
        limit_key = ""
        if args.rate_limit:
            limit_key = f"bench-{os.urandom(4).hex()}"
            results.rate_limit = args.rate_limit
            results.rate_limit_burst = args.rate_limit_burst
            await create_rate_limit(targets[0], limit_key, args.rate_limit, args.rate_limit_burst)
        before = await read_statements(targets)
        pids = [s.proc.pid for s in servers]
        cpu_before = cpu_total(pids)
        await run_jobs(
            targets,
            args.jobs,
            args.concurrency,
            done_files,
            results,
            args.max_seconds,
            limit_key,
        )
        cpu_after = cpu_total(pids)
        if cpu_before is not None and cpu_after is not None:
            results.server_cpu_s = cpu_after - cpu_before
        results.statements = statements_delta(
            before, await read_statements(targets), results.completed
        )
        if args.latency:
            await stop_workers(workers)
            workers = await start_workers(targets[:1], [tmp / "one.txt"], 1, args.report_window_ms)
            results.latency_ms = await one_at_a_time(
                targets[0], args.latency_jobs, args.latency_seconds
            )
        if args.subscribers:
            await trace_fanout(targets, args.subscribers, args.rate, args.trace_seconds, results)
    finally:
        await stop_workers(workers)
        for s in servers:
            await stop_server(s)
        results.server_peak_rss_mb = max((s.peak_rss_mb for s in servers), default=0.0)
    return results


async def create_rate_limit(target: str, key: str, per_s: int, burst: int) -> None:
    """--rate-limit: a limit of `per_s` tokens a second for the jobs to use."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = schedule_service_pb2_grpc.ScheduleServiceStub(channel)
        limit = schedule_service_pb2.RateLimit(
            key=key, count=per_s, period=duration_pb2.Duration(seconds=1), burst=burst
        )
        await stub.CreateRateLimit(
            schedule_service_pb2.CreateRateLimitRequest(rate_limit=limit), timeout=30
        )


def achieved_rate(times: list[float], burst: int) -> float | None:
    """Jobs/s once the burst is spent: the completions after the first
    `burst` ones, over the time from the burst's last to the last."""
    if len(times) <= burst + 1:
        return None
    span = times[-1] - times[burst]
    return (len(times) - 1 - burst) / span if span > 0 else None


def summary(r: Results) -> dict[str, Any]:
    """The figures, each also as a ratio to gRPC alone on this machine: throughputs
    as a fraction of the empty handler's calls/s, latencies as a multiple of its
    latency. Figures that were not measured are null."""

    def ms(values: list[float], q: float) -> float | None:
        return round(pct(values, q), 2) if values else None

    def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
        return round(a / b, digits) if a and b else None

    ceiling = r.unary_ceiling_rps or None
    p50, p99 = r.unary_p50_ms or None, r.unary_p99_ms or None
    out: dict[str, Any] = {
        "jobs_per_s": round(r.jobs_per_s, 1),
        "jobs_completed": r.completed,
        "submit_per_s": round(r.submit_rps, 1),
        "submit_p50_ms": ms(r.submit_ms, 0.5),
        "submit_p99_ms": ms(r.submit_ms, 0.99),
        "e2e_p50_ms": ms(r.e2e_ms, 0.5),
        "e2e_p99_ms": ms(r.e2e_ms, 0.99),
        "trace_p50_ms": ms(r.trace_ms, 0.5),
        "trace_p99_ms": ms(r.trace_ms, 0.99),
        "trace_deliveries": r.trace_deliveries,
        "unary_ceiling_rps": round(r.unary_ceiling_rps, 1) if ceiling else None,
        "grpc_alone_jobs_per_s": round(r.floor_jobs_per_s, 1) if r.floor_jobs_per_s else None,
        "unary_p50_ms": round(r.unary_p50_ms, 2) if p50 else None,
        "unary_p99_ms": round(r.unary_p99_ms, 2) if p99 else None,
        "server_peak_rss_mb": round(r.server_peak_rss_mb, 1) if r.server_peak_rss_mb else None,
        "params": r.params,
    }
    out["vs_ceiling"] = {
        "jobs_per_s": ratio(r.jobs_per_s, ceiling),
        "grpc_alone_jobs_per_s": ratio(r.floor_jobs_per_s, ceiling),
        "submit_per_s": ratio(r.submit_rps, ceiling),
        "submit_p50_x": ratio(out["submit_p50_ms"], p50, 2),
        "submit_p99_x": ratio(out["submit_p99_ms"], p99, 2),
        "e2e_p50_x": ratio(out["e2e_p50_ms"], p50, 2),
        "e2e_p99_x": ratio(out["e2e_p99_ms"], p99, 2),
        "trace_p50_x": ratio(out["trace_p50_ms"], p50, 2),
        "trace_p99_x": ratio(out["trace_p99_ms"], p99, 2),
    }
    out["jobs_per_s_vs_ceiling"] = out["vs_ceiling"]["jobs_per_s"]
    out["jobs_per_s_vs_grpc_alone"] = ratio(r.jobs_per_s, r.floor_jobs_per_s or None)
    per_job = r.statements or {}
    out["statements_per_job"] = per_job.get("statements_per_job")
    out["transactions_per_job"] = per_job.get("transactions_per_job")
    out["statement_kinds_per_job"] = per_job.get("kinds_per_job")
    out["server_cpu_ms_per_job"] = (
        round(r.server_cpu_s * 1000 / r.completed, 3)
        if r.server_cpu_s is not None and r.completed
        else None
    )
    out["one_at_a_time"] = {
        "jobs": len(r.latency_ms),
        "p50_ms": ms(r.latency_ms, 0.5),
        "p99_ms": ms(r.latency_ms, 0.99),
        "grpc_alone_jobs": len(r.floor_latency_ms),
        "grpc_alone_p50_ms": ms(r.floor_latency_ms, 0.5),
        "grpc_alone_p99_ms": ms(r.floor_latency_ms, 0.99),
    }
    one = out["one_at_a_time"]
    one["p50_vs_grpc_alone"] = ratio(one["p50_ms"], one["grpc_alone_p50_ms"], 2)
    if r.rate_limit:
        achieved = achieved_rate(r.completion_times, r.rate_limit_burst)
        share_of = ratio(achieved, float(r.rate_limit))
        out["rate_limit"] = {
            "limit_per_s": r.rate_limit,
            "burst": r.rate_limit_burst,
            "achieved_per_s": round(achieved, 2) if achieved else None,
            "achieved_vs_limit": share_of,
            "within_10_percent": share_of is not None and abs(share_of - 1) <= 0.10,
        }
    return out


def print_table(s: dict[str, Any]) -> None:
    v = s["vs_ceiling"]

    def show(value: Any, unit: str = "") -> str:
        return "n/a" if value is None else f"{value}{unit}"

    def share(value: float | None) -> str:
        return "" if value is None else f"{value:.1%} of ceiling"

    def times(a: float | None, b: float | None) -> str:
        return "" if a is None or b is None else f"{a} x / {b} x gRPC alone"

    rows = [
        ("jobs/s end to end", show(s["jobs_per_s"]), share(v["jobs_per_s"])),
        (
            "jobs/s, gRPC alone",
            show(s["grpc_alone_jobs_per_s"]),
            share(v["grpc_alone_jobs_per_s"]) + " (the same jobs, nothing stored)",
        ),
        ("submits/s", show(s["submit_per_s"]), share(v["submit_per_s"])),
        (
            "submit latency p50 / p99",
            f"{show(s['submit_p50_ms'])} / {show(s['submit_p99_ms'], ' ms')}",
            times(v["submit_p50_x"], v["submit_p99_x"]),
        ),
        (
            "submit -> complete p50 / p99",
            f"{show(s['e2e_p50_ms'])} / {show(s['e2e_p99_ms'], ' ms')}",
            times(v["e2e_p50_x"], v["e2e_p99_x"]),
        ),
        (
            "trace delivery p50 / p99",
            f"{show(s['trace_p50_ms'])} / {show(s['trace_p99_ms'], ' ms')}",
            times(v["trace_p50_x"], v["trace_p99_x"]) + f" ({s['trace_deliveries']} deliveries)",
        ),
        (
            "unary ceiling (empty handler)",
            show(s["unary_ceiling_rps"], " rps"),
            f"p50 {show(s['unary_p50_ms'])} / p99 {show(s['unary_p99_ms'], ' ms')}",
        ),
        ("server peak RSS", show(s["server_peak_rss_mb"], " MB"), ""),
        (
            "statements / transactions per job",
            f"{show(s['statements_per_job'])} / {show(s['transactions_per_job'])}",
            "counted by the server at the driver, over the jobs phase",
        ),
        ("server CPU per job", show(s["server_cpu_ms_per_job"], " ms"), ""),
    ]
    one = s["one_at_a_time"]
    if one["jobs"] or one["grpc_alone_jobs"]:
        rows.append(
            (
                "one at a time p50 / p99",
                f"{show(one['p50_ms'])} / {show(one['p99_ms'], ' ms')}",
                f"gRPC alone {show(one['grpc_alone_p50_ms'])} / "
                f"{show(one['grpc_alone_p99_ms'], ' ms')}; p50 {show(one['p50_vs_grpc_alone'])} x"
                f" ({one['jobs']} jobs, submit -> completion seen by WatchJob)",
            )
        )
    limited = s.get("rate_limit")
    if limited:
        rows.append(
            (
                "rate-limited jobs/s",
                show(limited["achieved_per_s"]),
                f"limit {limited['limit_per_s']}/s, burst {limited['burst']}:"
                f" {show(limited['achieved_vs_limit'])} x the limit"
                f" ({'within' if limited['within_10_percent'] else 'NOT within'} 10%)",
            )
        )
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:<22} {note}")
    print("params:", json.dumps(s["params"]))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=1000, help="jobs to run (default 1000)")
    p.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    p.add_argument("--worker-concurrency", type=int, default=32, help="slots per worker")
    p.add_argument("--subscribers", type=int, default=200, help="trace stream subscribers")
    p.add_argument("--rate", type=float, default=50.0, help="trace events per second")
    p.add_argument("--trace-seconds", type=float, default=5.0, help="trace phase length")
    p.add_argument("--concurrency", type=int, default=32, help="submits in flight")
    p.add_argument(
        "--report-window-ms",
        type=float,
        default=DEFAULT_REPORT_WINDOW_MS,
        help="the workers' report window: reports queued within it go out as one batch "
        f"(default {DEFAULT_REPORT_WINDOW_MS:g}; 0: one message per report)",
    )
    p.add_argument("--db", help="database URL (default: a temporary SQLite file)")
    p.add_argument("--replicas", type=int, default=1, help="server processes (PostgreSQL)")
    p.add_argument("--target", help="benchmark running server(s) instead (HOST:PORT[,...])")
    p.add_argument(
        "--max-seconds", type=float, default=MAX_SECONDS, help="time bound of each phase (300)"
    )
    p.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip the gRPC-alone run of the same jobs against a server that stores nothing",
    )
    p.add_argument(
        "--ceiling-seconds",
        type=float,
        default=CEILING_SECONDS,
        help=f"how long the unary ceiling is measured, after a "
        f"{CEILING_WARMUP_SECONDS:g} s warm-up (default {CEILING_SECONDS:g})",
    )
    p.add_argument(
        "--latency",
        action="store_true",
        help="also run jobs one at a time (one submit in flight, one worker with one slot): "
        "submit -> completion seen by the client through WatchJob, p50/p99, here and gRPC alone",
    )
    p.add_argument(
        "--latency-jobs",
        type=int,
        default=LATENCY_JOBS,
        help=f"jobs of the one-at-a-time run (default {LATENCY_JOBS}, after "
        f"{LATENCY_WARMUP_JOBS} unmeasured)",
    )
    p.add_argument(
        "--latency-seconds",
        type=float,
        default=LATENCY_SECONDS,
        help=f"time bound of each one-at-a-time run (default {LATENCY_SECONDS:g})",
    )
    p.add_argument(
        "--compare-backends",
        action="store_true",
        help="run the same jobs against gRPC alone, SQLite and, with --pg-url, PostgreSQL "
        "with 1 and 2 replicas (each on a database the bench creates and drops); print each "
        "one's jobs/s, statements, transactions and CPU per job, and the speed targets as "
        "ratios with PASS/MISS (SQLite >= 0.70 x gRPC alone, PG-1 >= 0.80 x SQLite, PG-2 >= "
        "PG-1; with --latency, one-at-a-time p50 <= 3 x (SQLite) and 4 x (PG) gRPC alone; "
        "<= 12 statements per job)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="--compare-backends: run every backend this many times, in turn, and show the "
        "medians (default 1; 3 smooths out other work on the machine)",
    )
    p.add_argument(
        "--pg-url",
        help="PostgreSQL server for --compare-backends, on loopback "
        "(postgresql+asyncpg://USER@127.0.0.1:5432/DB; DB is only used to create and drop "
        "jobtrace_bench_<random> databases)",
    )
    p.add_argument(
        "--listing",
        action="store_true",
        help="instead: store --listing-jobs jobs (a tenth as many workflows, an attestation "
        "per ended job) straight into SQLite and, with --pg-url, PostgreSQL, then time each "
        "filter's first page (and with include_total) of ListJobs, ListWorkflows and "
        "ListAttestations over gRPC, p50/p95",
    )
    p.add_argument(
        "--listing-jobs",
        type=int,
        default=50_000,
        help="--listing: jobs stored (default 50000)",
    )
    p.add_argument(
        "--listing-rounds",
        type=int,
        default=30,
        help="--listing: calls timed per filter, after 2 unmeasured (default 30)",
    )
    p.add_argument(
        "--http-listen",
        metavar="HOST:PORT",
        default="",
        help="start the server(s) with this HTTP listener on (127.0.0.1:0: any free port), "
        "to compare gRPC figures with and without it",
    )
    p.add_argument(
        "--rate-limit",
        type=int,
        default=0,
        metavar="N",
        help="create a rate limit of N jobs a second and submit every job using it; report"
        " the rate achieved once its burst is spent (it should be within 10%% of N)",
    )
    p.add_argument(
        "--rate-limit-burst",
        type=int,
        default=1,
        metavar="B",
        help="--rate-limit: the limit's burst (default 1)",
    )
    p.add_argument(
        "--bulk",
        type=int,
        metavar="N",
        help="instead: N jobs submitted one per SubmitJob call and run by workers without"
        " batches, then N through SubmitJobs in chunks and run by batching workers, on one"
        " server (SQLite, or --db; with --pg-url PostgreSQL too); jobs/s and submit ->"
        " complete p50/p99 of both side by side, every job checked completed, traced and"
        " attested",
    )
    p.add_argument(
        "--chunk", type=int, default=1000, help="--bulk: jobs per SubmitJobs call (default 1000)"
    )
    p.add_argument(
        "--bulk-concurrency",
        type=int,
        default=4,
        help="--bulk: SubmitJobs calls in flight (default 4)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    if args.listing:
        from jobtrace import bench_listing

        return bench_listing.main(args)
    if args.jobs < 1 or args.jobs > 1_000_000 or args.workers < 1:
        print("jobtrace bench: --jobs must be 1..1000000 and --workers at least 1", file=sys.stderr)
        return 2
    for target in (args.target or "").split(","):
        host = target.rpartition(":")[0].strip("[]")
        if target and host not in {"127.0.0.1", "localhost", "::1"}:
            print(f"jobtrace bench: --target must be on loopback, not {target}", file=sys.stderr)
            return 2
    if not 0 < args.ceiling_seconds <= 600 or not 0 < args.latency_seconds <= 3600:
        print(
            "jobtrace bench: --ceiling-seconds must be in (0, 600], --latency-seconds in (0, 3600]",
            file=sys.stderr,
        )
        return 2
    if not 0 <= args.report_window_ms <= 1000:
        print("jobtrace bench: --report-window-ms must be 0..1000", file=sys.stderr)
        return 2
    if not 1 <= args.latency_jobs <= 100_000:
        print("jobtrace bench: --latency-jobs must be 1..100000", file=sys.stderr)
        return 2
    if args.bulk is not None:
        from jobtrace import bench_bulk

        return bench_bulk.main(args)
    if args.compare_backends or args.pg_url:
        from jobtrace import bench_compare

        return bench_compare.main(args)
    if args.replicas > 1 and not (args.db or "").startswith("postgresql"):
        print("jobtrace bench: --replicas needs --db postgresql+asyncpg://...", file=sys.stderr)
        return 2
    try:
        results = asyncio.run(bench(args))
    except PhaseTimeout as exc:
        print(f"jobtrace bench: {exc}", file=sys.stderr)
        return 1
    s = summary(results)
    if args.json:
        print(json.dumps(s))
    else:
        print_table(s)
    return 0 if results.completed == args.jobs else 1


if __name__ == "__main__":
    if len(sys.argv) in (5, 6) and sys.argv[1] == "--worker":
        window = float(sys.argv[5]) if len(sys.argv) == 6 else DEFAULT_REPORT_WINDOW_MS
        with open(sys.argv[3], "a", buffering=1) as completions:
            asyncio.run(worker_main(sys.argv[2], completions, int(sys.argv[4]), window))
    elif sys.argv[1:] == ["--floor-server"]:
        asyncio.run(floor_server_main())
    else:
        parser = argparse.ArgumentParser(prog="jobtrace bench")
        add_arguments(parser)
        sys.exit(main(parser.parse_args()))
