"""Hostile stream and connection behaviour against a real server: readers that
stop reading, and bursts of HTTP/2 calls that never send their request."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobtrace.config import Settings
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w
from jobtrace.server import JobtraceServer

from .conftest import Harness, Stubs, error_details, stubs_for, wait_for
from .procs import serve_blocking
from .workers import RawWorker

# A client that advertises a small HTTP/2 window and never widens it: once a
# message larger than the window is on its way, the server's next write waits
# until the client reads.
SMALL_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
STALL_S = 0.5


@contextlib.asynccontextmanager
async def slow_reader(harness: Harness) -> AsyncIterator[Stubs]:
    async with grpc.aio.insecure_channel(harness.target, options=SMALL_WINDOW) as channel:
        yield stubs_for(channel)


def big_payload(kib: int) -> struct_pb2.Struct:
    payload = struct_pb2.Struct()
    payload.update({"blob": "x" * (kib * 1024)})
    return payload


async def expect_stalled(call: Any) -> list[Any]:
    """Read what the server sent before it gave up, then its status."""
    received: list[Any] = []
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while True:
            message = await asyncio.wait_for(call.read(), 20)
            assert message is not grpc.aio.EOF, "the stream ended OK, not stalled"
            received.append(message)
    err = ended.value
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
    assert f"reader stalled for {STALL_S:g} s" in (err.details() or "")
    info, _ = error_details(err)
    assert info is not None and info.reason == "READER_STALLED"
    return received


def open_streams(server: JobtraceServer | None) -> int:
    assert server is not None
    return server.streams.open_streams()


async def test_a_trace_stream_whose_reader_stalls_is_ended_and_released(db_url: str) -> None:
    async with Harness(db_url, stream_stall_seconds=STALL_S, metrics_port=0) as h:
        assert h.server is not None
        bus = h.server.trace.bus
        api = h.stubs()
        job = await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="r", job=c.JobSpec(service="svc"))
        )
        run_id = job.job.id
        async with slow_reader(h) as slow:
            call = slow.trace.StreamTraceEvents(
                t.StreamTraceEventsRequest(run_id=run_id, follow=True)
            )
            await wait_for(lambda: bus.subscriber_count == 1, timeout=20)
            # Events far larger than the reader's window, which it never reads.
            events = [
                c.TraceEvent(event_key=f"k{i}", message=f"{i:04} " + "m" * 8000) for i in range(20)
            ]
            await api.trace.AppendTraceEvents(
                t.AppendTraceEventsRequest(run_id=run_id, events=events)
            )
            # The server gives up on the reader and releases its subscription and slot.
            await wait_for(lambda: bus.subscriber_count == 0 and open_streams(h.server) == 0, 20)
            # Reading again, the reader gets what was already on its way, then the status.
            received = await expect_stalled(call)
            assert 0 < len(received) < len(events)
            assert [m.event.event_key for m in received] == [f"k{i}" for i in range(len(received))]
            # Its cursor resumes exactly after the last event it got.
            cursor = received[-1].cursor
        resumed = api.trace.StreamTraceEvents(
            t.StreamTraceEventsRequest(run_id=run_id, cursor=cursor, follow=False)
        )
        rest = [m.event.event_key async for m in resumed if m.WhichOneof("kind") == "event"]
        assert rest == [f"k{i}" for i in range(len(received), len(events))]
        # Counted with the status it ended with.
        assert h.server.metrics is not None
        handled = h.server.metrics.registry.get_sample_value(
            "grpc_server_handled_total",
            {
                "grpc_service": "jobtrace.v1.TraceService",
                "grpc_method": "StreamTraceEvents",
                "grpc_type": "server_stream",
                "grpc_code": "RESOURCE_EXHAUSTED",
            },
        )
        assert handled == 1


async def test_a_job_watch_whose_reader_stalls_is_ended_and_released(db_url: str) -> None:
    async with Harness(db_url, stream_stall_seconds=STALL_S) as h:
        assert h.server is not None
        feed = h.server.jobs.feed
        api = h.stubs()
        job = await api.jobs.SubmitJob(
            j.SubmitJobRequest(
                request_id="r", job=c.JobSpec(service="svc", payload=big_payload(256))
            )
        )
        async with slow_reader(h) as slow:
            call = slow.jobs.WatchJob(j.WatchJobRequest(job_id=job.job.id))
            await wait_for(lambda: feed.subscribers_by_kind()["job"] == 1, timeout=20)
            await api.jobs.CancelJob(j.CancelJobRequest(job_id=job.job.id))
            await wait_for(
                lambda: feed.subscribers_by_kind()["job"] == 0 and open_streams(h.server) == 0,
                timeout=20,
            )
            received = await expect_stalled(call)
            assert len(received) < 2  # the cancellation never reached it


async def test_a_worker_that_stops_reading_loses_its_session(db_url: str) -> None:
    """The worker stream's outgoing side has the same deadline: a worker that
    takes no message (here an assignment larger than its window) is
    disconnected, and its job goes to a worker that reads."""
    async with Harness(db_url, stream_stall_seconds=STALL_S, heartbeat_seconds=1.0) as h:
        assert h.server is not None
        scheduler = h.server.scheduler
        api = h.stubs()
        async with slow_reader(h) as slow:
            stalled = RawWorker(slow)
            await stalled.hello("stalled", ["svc"])
            job = await api.jobs.SubmitJob(
                j.SubmitJobRequest(
                    request_id="r", job=c.JobSpec(service="svc", payload=big_payload(256))
                )
            )
            await wait_for(lambda: not scheduler.sessions and open_streams(h.server) == 0, 20)
            await expect_stalled(stalled.call)
        reader = RawWorker(api)
        await reader.hello("reader", ["svc"])
        assignment = await reader.expect("assignment", timeout=20)
        assert assignment.job.id == job.job.id and assignment.attempt == 2
        await reader.send(complete=w.CompleteReport(job_id=job.job.id, attempt=2))
        await reader.expect("ack")
        await reader.close()


# --- half-open HTTP/2 bursts ----------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_HEADERS, H2_RST_STREAM, H2_SETTINGS, H2_GOAWAY = 0x1, 0x3, 0x4, 0x7
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
NO_ERROR, REFUSED_STREAM, ENHANCE_YOUR_CALM = 0x0, 0x7, 0xB
CALLS_PER_CONNECTION = 50
CONCURRENT_CALLS = 200
MEMORY_SLACK_MIB = 32


def h2_frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    header = len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big")
    return header + payload


def hpack_string(text: str) -> bytes:
    raw = text.encode()
    assert len(raw) < 127
    return bytes([len(raw)]) + raw


def call_headers(path: str, authority: str) -> bytes:
    """HPACK for a gRPC call's request headers, literals only (no DATA follows)."""
    return (
        b"\x83"  # :method POST (static 3)
        + b"\x86"  # :scheme http (static 6)
        + b"\x04"
        + hpack_string(path)  # :path (static name 4), not indexed
        + b"\x01"
        + hpack_string(authority)  # :authority (static name 1)
        + b"\x0f\x10"
        + hpack_string("application/grpc")  # content-type (static name 31)
        + b"\x00"
        + hpack_string("te")
        + hpack_string("trailers")
    )


class HalfOpenConnection:
    """A raw HTTP/2 connection that opens calls with HEADERS and never sends their
    DATA. It reads what the server answers: RST_STREAM codes, and streams the
    server ended with trailers (a gRPC status) before any request arrived."""

    def __init__(self, port: int, frames: threading.Condition) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(H2_PREFACE + h2_frame(H2_SETTINGS, 0, 0))
        self.refused = 0  # RST_STREAM REFUSED_STREAM / ENHANCE_YOUR_CALM
        self.ended = 0  # HEADERS with END_STREAM: the call was answered
        self.other_resets: list[int] = []
        self.goaway = False
        # Shared by a burst's connections: notified as each frame is counted.
        self._lock = frames
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def open_calls(self, count: int, path: str, authority: str) -> None:
        block = call_headers(path, authority)
        self.sock.sendall(
            b"".join(h2_frame(H2_HEADERS, END_HEADERS, 2 * i + 1, block) for i in range(count))
        )

    def answered(self) -> int:
        with self._lock:
            return self.refused + self.ended

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk
            while len(buffer) >= 9:
                length = int.from_bytes(buffer[:3], "big")
                if len(buffer) < 9 + length:
                    break
                kind, flags, payload = buffer[3], buffer[4], buffer[9 : 9 + length]
                buffer = buffer[9 + length :]
                with self._lock:
                    if kind == H2_SETTINGS and not flags & ACK:
                        self.sock.sendall(h2_frame(H2_SETTINGS, ACK, 0))
                    elif kind == H2_RST_STREAM:
                        code = int.from_bytes(payload[:4], "big")
                        if code in (REFUSED_STREAM, ENHANCE_YOUR_CALM):
                            self.refused += 1
                        elif code != NO_ERROR:  # NO_ERROR follows a call the server ended
                            self.other_resets.append(code)
                    elif kind == H2_HEADERS and flags & END_STREAM:
                        self.ended += 1
                    elif kind == H2_GOAWAY:
                        self.goaway = True
                    self._lock.notify_all()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader
        self._reader.join(30)
        self.sock.close()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def memory_returns(proc: subprocess.Popen[str], limit_mib: float, timeout: float) -> float:
    """Wait until the server's RSS is at most `limit_mib` (the allocator gives
    pages back on its own time, so nothing can announce it); fail at once if
    the server exits meanwhile. The last RSS read."""
    deadline = time.monotonic() + timeout
    while (rss := rss_mib(proc.pid)) > limit_mib and time.monotonic() < deadline:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.05)
            raise AssertionError(f"the server exited ({proc.returncode}) after the bursts")
    return rss


def burst(
    port: int, connections: int, calls: int, frames: threading.Condition
) -> list[HalfOpenConnection]:
    """`connections` connections, each opening `calls` calls that never send DATA."""
    opened = [HalfOpenConnection(port, frames) for _ in range(connections)]
    for conn in opened:
        conn.open_calls(calls, "/grpc.health.v1.Health/Check", f"127.0.0.1:{port}")
    return opened


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_half_open_http2_bursts_are_bounded_and_memory_returns(tmp_path: Path) -> None:
    """Unauthenticated HEADERS without DATA: past the per-connection limit
    the server refuses streams (RST_STREAM), past the whole-server limit it
    answers calls at once (RESOURCE_EXHAUSTED), so it never holds more than
    the limit however many connections come; repeated bursts do not ratchet
    its memory up."""
    connections, calls, rounds = 10, 500, 3
    proc, port = serve_blocking(
        "--db",
        str(tmp_path / "burst.db"),
        "--signing-key-file",
        str(tmp_path / "signing.key"),
        "--max-calls-per-connection",
        str(CALLS_PER_CONNECTION),
        "--max-concurrent-calls",
        str(CONCURRENT_CALLS),
    )
    try:
        assert proc.stderr is not None
        threading.Thread(target=lambda: collections.deque(proc.stderr, 0), daemon=True).start()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            health.Check(health_pb2.HealthCheckRequest(), timeout=30)
        baseline = rss_mib(proc.pid)
        sent = connections * calls
        for _ in range(rounds):
            frames = threading.Condition()
            opened = burst(port, connections, calls, frames)
            # The server holds at most its limits; everything else is
            # answered at once: refused past a connection's limit, and
            # RESOURCE_EXHAUSTED past the whole server's.
            with frames:
                held_to_limits = frames.wait_for(
                    lambda opened=opened: (
                        all(
                            conn.refused + conn.ended >= calls - CALLS_PER_CONNECTION
                            for conn in opened
                        )
                        and sum(conn.refused + conn.ended for conn in opened)
                        >= sent - CONCURRENT_CALLS
                    ),
                    60,
                )
            assert held_to_limits, (
                f"half-open calls held: {[calls - conn.answered() for conn in opened]}"
            )
            assert sum(conn.refused for conn in opened) and sum(conn.ended for conn in opened)
            assert all(conn.other_resets == [] and not conn.goaway for conn in opened)
            for conn in opened:
                conn.close()
        # The calls of closed connections are freed: the server is back
        # within a bounded distance of where it started (unbounded, 5,000
        # half-open calls a round grew it by 60-80 MiB, never returned).
        rss = memory_returns(proc, baseline + MEMORY_SLACK_MIB, 30)
        assert rss <= baseline + MEMORY_SLACK_MIB, (
            f"RSS {rss:.0f} MiB after the bursts, baseline {baseline:.0f} MiB"
        )
        # And it still serves.
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            response = health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_the_limits_come_from_the_environment() -> None:
    loaded = Settings.load(
        env={
            "JOBTRACE_STREAM_STALL_SECONDS": "2.5",
            "JOBTRACE_MAX_CALLS_PER_CONNECTION": "64",
            "JOBTRACE_MAX_CONCURRENT_CALLS": "512",
        }
    )
    assert loaded.stream_stall_seconds == 2.5
    assert (loaded.max_calls_per_connection, loaded.max_concurrent_calls) == (64, 512)
    defaults = Settings.load(env={})
    assert defaults.stream_stall_seconds == 30.0
    assert (defaults.max_calls_per_connection, defaults.max_concurrent_calls) == (1000, 10_000)


@pytest.mark.parametrize(
    "bad",
    [
        {"stream_stall_seconds": 0.0},
        {"max_calls_per_connection": 0},
        {"max_concurrent_calls": -1},
    ],
)
async def test_a_limit_that_bounds_nothing_is_refused_at_start(
    sqlite_url: str, bad: dict[str, Any]
) -> None:
    server = JobtraceServer(Settings(listen="127.0.0.1:0", db=sqlite_url, **bad))
    with pytest.raises(OSError, match=next(iter(bad)).replace("_", "-")):
        await server.start()
