"""The worker runtime: handlers for services, one stream, heartbeats, reconnects, drain.

worker = Worker("127.0.0.1:50051", max_concurrency=4)

@worker.handler("resize")
async def resize(ctx: JobContext) -> dict[str, Any]:
    await ctx.progress(50, "halfway")
    return {"ok": True}

@worker.handler("checksum")           # a plain def runs in a thread, with blocking ctx methods
def checksum(ctx: SyncJobContext) -> dict[str, Any]:
    ctx.progress(50, "halfway")
    return {"ok": True}

await worker.run()

Cancellation is what asyncio makes it: when the server cancels a job (a user's
cancel, a lost lease, a workflow that failed elsewhere) the handler's task is
cancelled, so the `await` it is in raises CancelledError; `ctx.cancelled` turns
True first. Code that wants to stop at points of its own choosing polls
`ctx.cancelled` or waits on `ctx.wait_cancelled()`. A plain `def` handler runs in
a thread, which Python cannot interrupt: it polls `ctx.cancelled` (or blocks in
`ctx.wait_cancelled(timeout)`), and whatever it returns after the cancel is
dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import threading
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from google.protobuf import struct_pb2
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from jobtrace import __version__
from jobtrace.client.api import job_payload, plain_json, with_structs
from jobtrace.client.channel import Endpoint
from jobtrace.client.handlers import H, Handler, adapt
from jobtrace.client.handlers import NonRetryableError as NonRetryableError
from jobtrace.client.handlers import SyncJobContext as SyncJobContext
from jobtrace.client.inputs import message_from
from jobtrace.pb import common_pb2, worker_service_pb2, worker_service_pb2_grpc

log = logging.getLogger(__name__)

# The default of Worker.max_concurrency; see there.
DEFAULT_CONCURRENCY = 4
# The default of Worker.report_window_ms (and `jobtrace worker --report-window-ms`).
DEFAULT_REPORT_WINDOW_MS = 5.0


@dataclass
class JobContext:
    """What an `async def` handler sees: the job, its payload, its cancellation
    and ways to report progress, trace events and annotations. (A plain `def`
    handler gets the same context as a SyncJobContext, whose methods block.)"""

    job: common_pb2.Job
    attempt: int
    payload: dict[str, Any]
    request_context: common_pb2.RequestContext
    traceparent: str
    _worker: Worker
    _cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    # The same, for handlers running in a thread.
    _cancelled_in_threads: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = ""
    # Step name -> result of each step this one depends on (a workflow step
    # only), as plain Python values: `ctx.upstream["download"]`. Results too
    # large to travel with the assignment are fetched before the handler runs.
    upstream: dict[str, Any] = field(default_factory=dict)
    _upstream_refs: tuple[common_pb2.StepResultRef, ...] = ()
    # What set_output_summary set (None: the server derives one from the result).
    output_summary: dict[str, Any] | None = None

    @property
    def job_id(self) -> str:
        """The job's id (job_...)."""
        return self.job.id

    @property
    def item(self) -> Any:
        """A fan-out child's item (its step's `for_each` names the list; the
        child is named "<step>[<index>]" and its payload carries the item
        under "item"); None for any other job."""
        if not self.job.step_name.endswith("]"):
            return None
        return self.payload.get("item")

    @property
    def cancelled(self) -> bool:
        """Whether the server cancelled this attempt. It turns True just before the
        handler's task is cancelled, so cooperative code that polls it (or that
        caught the CancelledError) can tell a cancel from other errors."""
        return self._cancelled.is_set()

    async def wait_cancelled(self) -> None:
        """Return once the server has cancelled this attempt. The handler's own
        task is cancelled then anyway; this is for code outside it, such as a
        task the handler started that must stop (or kill a subprocess) too."""
        await self._cancelled.wait()

    def set_output_summary(self, summary: Mapping[str, Any] | None) -> None:
        """Say what the trace shows of this attempt's result: its COMPLETED
        event's output_summary (a JSON object, at most 64 KiB serialised;
        redacted by the server like every event). Sent with the result when the
        handler returns; None (the default) lets the server derive one from
        the result (the result itself when small, else its SHA-256, size and
        top-level keys). A summary that is not JSON fails the attempt for good."""
        self.output_summary = None if summary is None else dict(summary)

    def _mark_cancelled(self, reason: str) -> None:
        self.cancel_reason = reason
        self._cancelled.set()
        self._cancelled_in_threads.set()

    async def progress(self, percent: float, message: str = "", *, coalesce: bool = False) -> None:
        """Report progress (0-100). Best effort: while the worker is reconnecting
        the report is dropped (the next one carries the newer state). Every
        report is a trace event; with `coalesce=True`, one still waiting to be
        sent (within the worker's report window) when the next coalescing one
        of this job comes is replaced by it, so only the latest percent is
        stored (never without asking: people read those events)."""
        report = worker_service_pb2.ProgressReport(
            job_id=self.job.id, attempt=self.attempt, percent=percent, message=message
        )
        with contextlib.suppress(ConnectionError):
            await self._worker._send(
                worker_service_pb2.ConnectRequest(progress=report),
                wait=False,
                coalesce=coalesce,
            )

    async def log(
        self,
        message: str,
        *,
        level: str = "info",
        category: str = "business",
        user_message: str = "",
        data: dict[str, Any] | None = None,
        milestone: bool = False,
        node_id: str = "",
        event_key: str | None = None,
    ) -> None:
        """Add an event to the run's trace (level debug..critical, category business
        or technical; `data={"stream": "stdout"}` for captured output). Kept and sent
        again after a reconnect until the server acknowledges it; its `event_key`
        (random unless given) makes the resend idempotent."""
        event = common_pb2.TraceEvent(
            type=common_pb2.TRACE_EVENT_TYPE_LOG,
            level=common_pb2.Level.Value("LEVEL_" + level.upper()),
            category=common_pb2.Category.Value("CATEGORY_" + category.upper()),
            message=message,
            user_message=user_message,
            milestone=milestone,
            node_id=node_id,
            event_key=event_key or os.urandom(12).hex(),
        )
        if data is not None:
            event.data.update(data)
        report = worker_service_pb2.TraceReport(
            job_id=self.job.id, attempt=self.attempt, events=[event]
        )
        await self._worker._send(
            worker_service_pb2.ConnectRequest(trace=report), wait=False, keep=True
        )

    async def annotate(
        self,
        attributes: dict[str, Any],
        *,
        actor: common_pb2.Actor | None = None,
        payload: dict[str, Any] | None = None,
    ) -> None:
        """Record annotations (e.g. `{"decision.outcome": "approve"}`, or
        `conventions.failure(kind="timeout")` from jobtrace.conventions) for this
        attempt; the server makes them visible with the attempt's completion or
        failure. Returns once the server has accepted them; raises
        AnnotationRefused if it refused them, ConnectionError if the stream broke."""
        report = worker_service_pb2.AnnotationReport(
            job_id=self.job.id,
            attempt=self.attempt,
            actor=actor
            or common_pb2.Actor(kind=common_pb2.ACTOR_KIND_WORKER, id=self._worker.worker_id),
        )
        for key, value in attributes.items():
            report.attributes[key].CopyFrom(
                message_from(struct_pb2.Value, value, f"attributes[{key!r}]")
            )
        if payload is not None:
            report.payload.update(payload)
        answer = await self._worker._send(
            worker_service_pb2.ConnectRequest(annotate=report), wait=True
        )
        if answer is not None and answer.WhichOneof("kind") == "error":
            raise AnnotationRefused(answer.error.message, answer.error.reason)


class AnnotationRefused(Exception):
    """The server refused a worker's annotations (e.g. a bad key or value)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class Worker:
    """Runs handlers for services: one stream to the server, which assigns jobs
    up to `max_concurrency` at once; heartbeats renew their leases; a broken
    stream is reopened (another replica when `target` lists several) with the
    running jobs' leases carried over.

    `max_concurrency` defaults to 4: handlers mostly wait (downloads, calls to
    other services, subprocesses), so a few at once keep one worker busy without
    one worker taking a whole queue from its peers; it is also what
    `jobtrace worker --concurrency` defaults to. Plain `def` handlers run in a
    thread pool of this size: for CPU-bound ones, use about one per core (or
    run several worker processes).

    `report_window_ms` (default 5; 0 turns it off): the reports queued within
    this window after the first go out as one batch, when the server takes
    batches (a window with one report sends it alone). Progress reports are
    never merged unless sent with `ctx.progress(..., coalesce=True)`.
    `accepts_batches` (default True): the server may hand several jobs over
    in one message; False, with a window of 0, is a worker from before
    batches (one message per report and per job)."""

    def __init__(
        self,
        target: str | None = None,
        *,
        worker_id: str | None = None,
        max_concurrency: int = DEFAULT_CONCURRENCY,
        affinity_keys: tuple[str, ...] = (),
        labels: dict[str, str] | None = None,
        token: str | None = None,
        endpoint: Endpoint | None = None,
        reconnect_initial: float = 0.2,
        reconnect_max: float = 10.0,
        version: str | None = None,
        report_window_ms: float = DEFAULT_REPORT_WINDOW_MS,
        accepts_batches: bool = True,
    ) -> None:
        # TLS, client certificates and keepalive come with `endpoint`; an explicit
        # target or token overrides its own.
        self.endpoint = endpoint or Endpoint()
        if target is not None:
            self.endpoint = replace(self.endpoint, target=target)
        if token is not None:
            self.endpoint = replace(self.endpoint, token=token)
        # Several comma-separated replicas: the worker fails over between them.
        self.targets = self.endpoint.targets
        self.target = self.targets[0]
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.max_concurrency = max_concurrency
        self.affinity_keys = affinity_keys
        self.labels = labels or {}
        # set_labels: the next heartbeat (sent at once) carries the new labels.
        self._labels_changed = False
        self._beat_now = asyncio.Event()
        # What the fleet view shows as this worker's version (your app's, say);
        # the runtime's own by default.
        self.version = f"jobtrace-python/{__version__}" if version is None else version
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if not 0 <= report_window_ms <= 1000:
            raise ValueError(f"report_window_ms must be between 0 and 1000, got {report_window_ms}")
        # Reports queued within this window go out as one batch (0: each alone).
        self.report_window_ms = report_window_ms
        self.accepts_batches = accepts_batches
        # Most reports per batch the connected server takes (0: no batches).
        self._max_batch = 0
        # Progress reports that may be replaced by a later one of their job.
        self._coalescable: set[int] = set()
        # What went on the stream: messages, and the reports they carried.
        self.messages_sent = 0
        self.reports_sent = 0
        self._reconnect = (reconnect_initial, reconnect_max)
        self._handlers: dict[str, Handler] = {}
        self._threads: ThreadPoolExecutor | None = None  # for plain `def` handlers
        self._running: dict[str, tuple[JobContext, asyncio.Task[None]]] = {}
        self._outbox: asyncio.Queue[worker_service_pb2.ConnectRequest] | None = None
        self._pending: dict[int, asyncio.Future[worker_service_pb2.ConnectResponse]] = {}
        self._unacked: dict[int, worker_service_pb2.ConnectRequest] = {}
        # The backoff before the next resend of a report the server could not
        # store, by the message id it was last sent with.
        self._backoff: dict[int, float] = {}
        self._next_id = 0
        self._draining = False
        self._stop = asyncio.Event()
        self._call: Any = None
        self._stub: Any = None
        self._metadata: Any = None
        self._acked = asyncio.Event()  # set on every ack and when a stream ends
        self._background: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()
        self.completed = 0
        self.failed = 0
        # Called when a completion is acknowledged (stored, or found already
        # stored) or refused for good: (job id, stored).
        self.on_completed: Callable[[str, bool], None] | None = None

    def handler(self, service: str) -> Callable[[H], H]:
        """Register the handler of a service; the decorated function is returned
        unchanged (type checkers keep its signature). Accepted shapes:
        `async def run(ctx: JobContext)`, `async def run(job, ctx: JobContext)`,
        and the same as plain `def` taking a SyncJobContext, run in a thread
        pool. What it returns (a mapping, or None) is the job's result; an
        exception fails the attempt (NonRetryableError: with no retry). Anything
        else (not callable, a generator, a function that cannot take (ctx) or
        (job, ctx)) is refused here with a TypeError."""

        def register(fn: H) -> H:
            self._handlers[service] = adapt(service, fn, self._thread_pool)
            return fn

        return register

    def _thread_pool(self) -> ThreadPoolExecutor:
        """The threads of plain `def` handlers, as many as jobs run at once."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(
                self.max_concurrency, thread_name_prefix="jobtrace-handler"
            )
        return self._threads

    @property
    def running_jobs(self) -> list[str]:
        """The ids of the jobs whose handlers are running now."""
        return list(self._running)

    # --- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        """Connect and serve until stop() (or drain()) finishes; reconnect with
        exponential backoff and jitter when the stream breaks. With OTLP
        configured (OTEL_EXPORTER_OTLP_ENDPOINT, ...), the process exports its
        handler spans and heartbeat (see start_telemetry)."""
        telemetry = start_telemetry()
        try:
            await self._serve()
        finally:
            if telemetry is not None:
                await asyncio.to_thread(telemetry.tracer_provider.force_flush)

    async def _serve(self) -> None:
        delay = self._reconnect[0]
        while not self._stop.is_set():
            try:
                await self._session()
                delay = self._reconnect[0]
            except grpc.aio.AioRpcError as exc:
                log.warning("worker stream ended: %s %s", exc.code().name, exc.details())
            except ConnectionError as exc:
                log.warning("worker stream ended: %s", exc)
            except asyncio.CancelledError:
                if not self._stop.is_set():
                    raise
            self.connected.clear()
            if self._stop.is_set() or (self._draining and not self._running):
                break
            # Try the next replica; the leases of running jobs move with us (hello.running).
            self.target = self.targets[(self.targets.index(self.target) + 1) % len(self.targets)]
            pause = delay * (0.5 + random.random())
            log.info("reconnecting to %s in %.1f s", self.target, pause)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._stop.wait()
            delay = min(delay * 2, self._reconnect[1])

    async def drain(self, timeout: float = 30.0) -> None:
        """Take no new work, let running handlers finish (up to `timeout`
        seconds), wait for the server to store their results, then stop."""
        self._draining = True
        log.info(
            "draining: %d running job(s) to finish, then disconnecting from %s",
            len(self._running),
            self.target,
        )
        with contextlib.suppress(ConnectionError):
            await self._send(
                worker_service_pb2.ConnectRequest(
                    heartbeat=worker_service_pb2.WorkerHeartbeat(draining=True)
                ),
                wait=False,
            )
        tasks = [t for _, t in self._running.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        # Terminal reports are acknowledged once stored: wait for those acks.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._unacked and self.connected.is_set():
                    self._acked.clear()
                    await self._acked.wait()
        self.stop()

    def stop(self) -> None:
        """Stop now: end the stream (held jobs keep their leases until they expire)."""
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        if self._threads is not None:
            # Threads cannot be interrupted: those still running end on their own.
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None

    # --- one stream -------------------------------------------------------------

    async def _session(self) -> None:
        metadata = self.endpoint.metadata()
        channel = self.endpoint.channel(self.target)
        outbox: asyncio.Queue[worker_service_pb2.ConnectRequest] = asyncio.Queue()
        self._outbox = outbox
        self._labels_changed = False  # the hello carries the labels as they are
        self._beat_now.clear()
        hello = worker_service_pb2.WorkerHello(
            worker_id=self.worker_id,
            services=list(self._handlers),
            max_concurrency=self.max_concurrency,
            labels=self.labels,
            affinity_keys=list(self.affinity_keys),
            running=self._held(),
            version=self.version,
            accepts_batches=self.accepts_batches,
        )
        self._max_batch = 0  # until this server's welcome says
        self._coalescable.clear()  # what the last stream did not send is gone
        await outbox.put(worker_service_pb2.ConnectRequest(hello=hello))
        # Reports not acknowledged on the previous stream are sent again.
        for message in self._unacked.values():
            await outbox.put(message)

        async def requests() -> AsyncIterator[worker_service_pb2.ConnectRequest]:
            while True:
                message = await outbox.get()
                if (
                    self.report_window_ms <= 0
                    or self._max_batch < 2
                    or message.WhichOneof("kind") not in BATCHABLE
                ):
                    self.messages_sent += 1
                    self.reports_sent += message.WhichOneof("kind") in BATCHABLE
                    yield message
                    continue
                reports, after = await self._collect(outbox, message)
                self.messages_sent += 1
                self.reports_sent += len(reports)
                yield reports[0] if len(reports) == 1 else batch_of(reports)
                if after is not None:
                    self.messages_sent += 1
                    self.reports_sent += after.WhichOneof("kind") in BATCHABLE
                    yield after

        heartbeats: asyncio.Task[None] | None = None
        async with channel:
            stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
            self._stub, self._metadata = stub, metadata  # for GetStepResult
            call = stub.Connect(requests(), metadata=metadata)
            self._call = call
            try:
                async for response in call:
                    kind = response.WhichOneof("kind")
                    if kind == "welcome":
                        log.info(
                            "connected to %s as worker %s (services %s, max concurrency %d)",
                            self.target,
                            self.worker_id,
                            ", ".join(self._handlers) or "none",
                            self.max_concurrency,
                        )
                        self.connected.set()
                        interval = response.welcome.heartbeat_interval.ToTimedelta()
                        heartbeats = asyncio.create_task(self._heartbeat(interval.total_seconds()))
                        for revoked in response.welcome.revoked:
                            self._cancel(revoked.job_id, "lease revoked after reconnect")
                        self._max_batch = response.welcome.max_batch
                    elif kind == "assignment":
                        self._start(response.assignment)
                    elif kind == "assignments":
                        for assignment in response.assignments.assignments:
                            self._start(assignment)
                    elif kind == "acks":
                        self._settle_batch(response.acks)
                    elif kind == "cancel":
                        self._cancel(response.cancel.job_id, response.cancel.reason)
                    elif kind == "heartbeat_ack":
                        for c in response.heartbeat_ack.cancels:
                            self._cancel(c.job_id, c.reason)
                        self._settle(response.heartbeat_ack.message_id, response)
                    elif kind == "ack":
                        self._settle(response.ack.message_id, response)
                    elif kind == "error":
                        _log_refusal(response.error)
                        self._settle(response.error.message_id, response)
                        if response.error.fatal:
                            break
                    elif kind == "drain":
                        log.info(
                            "server %s is draining (%s): reconnecting",
                            self.target,
                            response.drain.reason,
                        )
                        break
            finally:
                self.connected.clear()
                self._acked.set()
                for future in self._pending.values():  # answers that will never come
                    if not future.done():
                        future.set_exception(ConnectionError("the stream ended"))
                self._pending.clear()
                self._outbox = None
                if heartbeats is not None:
                    heartbeats.cancel()
                call.cancel()

    def set_labels(self, labels: Mapping[str, str]) -> None:
        """Describe this worker with these labels from now on (a model loaded,
        memory freed): a heartbeat carrying them is sent at once when
        connected (the next hello otherwise), and the server places jobs by
        them from then on, dispatching those that waited for such labels."""
        self.labels = dict(labels)
        self._labels_changed = True
        self._beat_now.set()

    async def _heartbeat(self, interval: float) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._beat_now.wait()
            self._beat_now.clear()
            labels = None
            if self._labels_changed:
                labels = worker_service_pb2.WorkerLabels(labels=self.labels)
                self._labels_changed = False
            beat = worker_service_pb2.WorkerHeartbeat(
                running=self._held(), draining=self._draining, labels=labels
            )
            await self._send(worker_service_pb2.ConnectRequest(heartbeat=beat), wait=False)

    def _held(self) -> list[worker_service_pb2.JobAttempt]:
        """The attempts this worker holds, for hello and heartbeats (which renew
        only the leases they list): those its handlers run, and those whose
        result or failure the server has not stored yet. A finished attempt
        whose report is still being resent (storage away, say) keeps its lease,
        so it does not expire and run again while the worker holds its result."""
        held = {j: ctx.attempt for j, (ctx, _) in self._running.items()}
        for report in self._unacked.values():
            kind = report.WhichOneof("kind")
            if kind in ("complete", "fail"):
                body = report.complete if kind == "complete" else report.fail
                held.setdefault(body.job_id, body.attempt)
        return [worker_service_pb2.JobAttempt(job_id=j, attempt=a) for j, a in held.items()]

    async def _collect(
        self,
        outbox: asyncio.Queue[worker_service_pb2.ConnectRequest],
        first: worker_service_pb2.ConnectRequest,
    ) -> tuple[list[worker_service_pb2.ConnectRequest], worker_service_pb2.ConnectRequest | None]:
        """The reports queued within the report window from `first` on (at most
        the server's batch size and MAX_BATCH_BYTES), coalesced where asked;
        and the message that ended the window early (not a report, or one
        that would make the batch too large), if any, sent right after."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.report_window_ms / 1000
        reports = [first]
        size = first.ByteSize()
        after: worker_service_pb2.ConnectRequest | None = None
        while len(reports) < self._max_batch:
            try:
                message = outbox.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(left):
                        message = await outbox.get()
                except TimeoutError:
                    break
            size += message.ByteSize()
            if message.WhichOneof("kind") not in BATCHABLE or size > MAX_BATCH_BYTES:
                after = message  # sent alone, right after the batch
                break
            reports.append(message)
        return self._coalesce(reports), after

    def _coalesce(
        self, reports: list[worker_service_pb2.ConnectRequest]
    ) -> list[worker_service_pb2.ConnectRequest]:
        """A progress report sent with coalesce=True replaces the previous one
        of its job in this window when that one was sent so too and nothing
        else of the job came between (the order per job stays as sent)."""
        if not self._coalescable:
            return reports
        out: list[worker_service_pb2.ConnectRequest] = []
        last: dict[str, int] = {}  # job id -> index in out of its latest report
        replaceable: set[int] = set()  # indexes in out of coalescing progress
        for report in reports:
            kind = report.WhichOneof("kind")
            job_id = getattr(report, kind).job_id if kind else ""
            coalescing = report.message_id in self._coalescable
            self._coalescable.discard(report.message_id)
            previous = last.get(job_id)
            if coalescing and previous is not None and previous in replaceable:
                out[previous] = report
                continue
            last[job_id] = len(out)
            if coalescing:
                replaceable.add(len(out))
            out.append(report)
        return out

    def _settle_batch(self, acks: worker_service_pb2.Acks) -> None:
        """The answer to a batch: each report settled as its own ack or error would."""
        for ack in acks.acks:
            self._settle(ack.message_id, worker_service_pb2.ConnectResponse(ack=ack))
        for e in acks.errors:
            error = worker_service_pb2.StreamError(
                message_id=e.message_id,
                message_kind=e.message_kind,
                job_id=e.job_id,
                attempt=e.attempt,
                code=e.code,
                reason=e.reason,
                message=e.message,
            )
            _log_refusal(error)
            self._settle(e.message_id, worker_service_pb2.ConnectResponse(error=error))

    async def _send(
        self,
        message: worker_service_pb2.ConnectRequest,
        *,
        wait: bool,
        keep: bool = False,
        coalesce: bool = False,
    ) -> worker_service_pb2.ConnectResponse | None:
        self._next_id += 1
        message.message_id = self._next_id
        if coalesce and self._outbox is not None:
            self._coalescable.add(message.message_id)
        future: asyncio.Future[worker_service_pb2.ConnectResponse] | None = None
        if wait:
            future = asyncio.get_running_loop().create_future()
            self._pending[message.message_id] = future
        if keep:
            self._unacked[message.message_id] = message
        if self._outbox is None:
            if keep:
                return None  # sent again after the reconnect
            raise ConnectionError("not connected")
        await self._outbox.put(message)
        return await future if future is not None else None

    def _settle(self, message_id: int, response: worker_service_pb2.ConnectResponse) -> None:
        """A report was answered. A kept report (a completion, a failure, trace
        events) that the server did not store for a reason of its own
        (UNAVAILABLE, INTERNAL, ...) stays kept and is sent again after a
        backoff, until it is stored or refused for a reason resending cannot
        change (a stale attempt, an unknown job, a lost lease); all are fenced
        by (job, attempt), so a resend never applies twice."""
        report = self._unacked.pop(message_id, None)
        delay = self._backoff.pop(message_id, RESEND_INITIAL_S)
        kind = report.WhichOneof("kind") if report is not None else None
        error = response.error if response.WhichOneof("kind") == "error" else None
        if report is not None and error is not None and error.code in RESEND_CODES:
            self._unacked[message_id] = report  # still owed: drain waits, a reconnect resends
            self._background_task(self._resend_later(message_id, report, delay))
            self._acked.set()
            return
        if (
            report is not None
            and error is not None
            and error.code in REFUSED_AS_MALFORMED
            and (kind == "complete" or (kind == "fail" and report.fail.error.code != REFUSED))
        ):
            self._background_task(self._replace_refused(report, error))
        if report is not None and kind == "complete" and self.on_completed:
            stored = error is None or already_stored(error)
            self.on_completed(report.complete.job_id, stored)
        self._acked.set()
        future = self._pending.pop(message_id, None)
        if future is not None and not future.done():
            future.set_result(response)

    def _background_task(self, step: Awaitable[None]) -> None:
        async def run() -> None:
            await step

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _resend_later(
        self, message_id: int, report: worker_service_pb2.ConnectRequest, delay: float
    ) -> None:
        """Send `report` again after `delay` (with jitter), unless it was settled
        meanwhile (a reconnect sends every kept report again by itself)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay * random.uniform(0.5, 1.0)):
                await self._stop.wait()
        if self._stop.is_set() or self._unacked.pop(message_id, None) is None:
            return
        again = worker_service_pb2.ConnectRequest()
        again.CopyFrom(report)
        await self._send(again, wait=False, keep=True)
        self._backoff[again.message_id] = min(delay * 2, RESEND_MAX_S)

    # --- jobs --------------------------------------------------------------------

    def _start(self, a: worker_service_pb2.Assignment) -> None:
        with_structs(a)  # ctx.job.spec.payload as well as ctx.payload
        ctx = JobContext(
            job=a.job,
            attempt=a.attempt,
            payload=job_payload(a.job),
            request_context=a.request_context,
            traceparent=a.traceparent,
            _worker=self,
            upstream=plain_json(a.upstream_json, a.upstream) or {},
            _upstream_refs=tuple(a.upstream_refs),
        )
        task = asyncio.create_task(self._run_job(ctx))
        self._running[a.job.id] = (ctx, task)

    def _cancel(self, job_id: str, reason: str) -> None:
        entry = self._running.get(job_id)
        if entry is None:
            return
        ctx, task = entry
        ctx._mark_cancelled(reason)
        task.cancel()

    async def _run_job(self, ctx: JobContext) -> None:
        handler = self._handlers.get(ctx.job.spec.service)
        report: worker_service_pb2.ConnectRequest | None = None
        try:
            if handler is None:
                raise NonRetryableError(f"no handler for service {ctx.job.spec.service!r}")
            await self._fetch_upstream(ctx)
            with _handler_span(ctx, self.worker_id):
                result = await handler(ctx)
            # Exact JSON, not a Struct: integers stay integers.
            body = result_json(result)
            if len(body) > MAX_RESULT_BYTES:
                raise NonRetryableError(
                    f"the result is {len(body)} bytes; at most {MAX_RESULT_BYTES} are stored",
                    code="RESULT_TOO_LARGE",
                )
            complete = worker_service_pb2.CompleteReport(
                job_id=ctx.job.id, attempt=ctx.attempt, result_json=body
            )
            if ctx.output_summary is not None:
                try:
                    complete.output_summary.update(ctx.output_summary)
                except (TypeError, ValueError) as exc:
                    raise NonRetryableError(
                        f"the output summary is not JSON: {exc}", code="OUTPUT_SUMMARY_NOT_JSON"
                    ) from exc
            report = worker_service_pb2.ConnectRequest(complete=complete)
            self.completed += 1
        except asyncio.CancelledError:
            if not ctx.cancelled:
                raise
            return  # the server ended the job; nothing to report
        except Exception as exc:
            report = fail_report(
                ctx.job.id,
                ctx.attempt,
                str(exc) or type(exc).__name__,
                code=getattr(exc, "code", "") or type(exc).__name__,
                retryable=not isinstance(exc, NonRetryableError),
                details="".join(traceback.format_exception(exc)),
            )
            self.failed += 1
        finally:
            self._running.pop(ctx.job.id, None)
            if report is not None:
                await self._send(report, wait=False, keep=True)

    async def _fetch_upstream(self, ctx: JobContext) -> None:
        """Read the upstream results the assignment carried by reference (too
        large to travel inline) into ctx.upstream. A failure fails the attempt
        (retryable) like any error before the handler's end."""
        for ref in ctx._upstream_refs:
            response = await self._stub.GetStepResult(
                worker_service_pb2.GetStepResultRequest(
                    job_id=ctx.job.id,
                    attempt=ctx.attempt,
                    worker_id=self.worker_id,
                    step_name=ref.step_name,
                ),
                metadata=self._metadata,
                timeout=UPSTREAM_FETCH_TIMEOUT_S,
            )
            ctx.upstream[ref.step_name] = plain_json(response.result_json, response.result)

    async def _replace_refused(
        self, report: worker_service_pb2.ConnectRequest, error: worker_service_pb2.StreamError
    ) -> None:
        """A terminal report the server refused as malformed would leave the job
        running until its lease ran out: report a (non-retryable) failure instead."""
        body = report.complete if report.HasField("complete") else report.fail
        kind = "complete" if report.HasField("complete") else "fail"
        job_id, attempt = body.job_id, body.attempt
        log.error("the server refused the %s of job %s: %s", kind, job_id, error.message)
        replacement = fail_report(
            job_id,
            attempt,
            f"the server refused the worker's {kind} report ({error.reason}): {error.message}",
            code=REFUSED,
            retryable=False,
        )
        await self._send(replacement, wait=False, keep=True)


MAX_RESULT_BYTES = 1024 * 1024
# Most bytes of reports in one batch: well under the server's message limit
# (8 MiB by default), so a batch of large results is never refused whole.
MAX_BATCH_BYTES = 2 * 1024 * 1024
# The reports a ReportBatch carries.
BATCHABLE = frozenset({"progress", "trace", "annotate", "complete", "fail"})


def batch_of(
    reports: list[worker_service_pb2.ConnectRequest],
) -> worker_service_pb2.ConnectRequest:
    """Several reports as one ReportBatch, each with its own message id."""
    batch = worker_service_pb2.ReportBatch()
    for report in reports:
        kind = report.WhichOneof("kind") or ""
        item = batch.reports.add(message_id=report.message_id)
        getattr(item, kind).CopyFrom(getattr(report, kind))
    return worker_service_pb2.ConnectRequest(batch=batch)


_telemetry: Any = None
_telemetry_lock = threading.Lock()


def start_telemetry() -> Any:
    """When OTLP is configured by the standard variables (OTEL_EXPORTER_OTLP_*,
    OTEL_SERVICE_NAME, OTEL_METRIC_EXPORT_INTERVAL, OTEL_RESOURCE_ATTRIBUTES),
    set up OpenTelemetry's SDK for this process once: the global tracer and
    meter providers (so a handler's own instrumented code exports too), the
    service.heartbeat gauge, service.name "jobtrace-worker" by default. Left
    alone when the process has set a provider of its own, or OTLP is not
    configured (then nothing of the SDK is loaded). jobtrace.otel.Telemetry or None."""
    global _telemetry
    from jobtrace import tracing

    if not tracing.enabled():
        return None
    with _telemetry_lock:
        if _telemetry is not None:
            return _telemetry
        from opentelemetry import metrics

        from jobtrace import otel

        if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            return None  # the application set up OpenTelemetry itself
        try:
            telemetry = otel.start(otel.Options(service_name=otel.WORKER_SERVICE_NAME))
        except OSError as exc:
            log.error("OTLP export is off: %s", exc)
            return None
        trace.set_tracer_provider(telemetry.tracer_provider)
        metrics.set_meter_provider(telemetry.meter_provider)
        _telemetry = telemetry
        return telemetry


@contextlib.contextmanager
def _handler_span(ctx: JobContext, worker_id: str) -> Iterator[None]:
    """The handler's span, current while it runs: its parent the attempt's
    context the assignment carries (the server's attempt span when it
    exports over OTLP), so spans of the handler's own code join the trace.
    Without an SDK set up it is OpenTelemetry's no-op span, which still
    carries the attempt's context to the code inside."""
    parent = _PROPAGATOR.extract({"traceparent": ctx.traceparent}) if ctx.traceparent else None
    with _TRACER.start_as_current_span(
        f"handle {ctx.job.spec.service}",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "jobtrace.job.id": ctx.job.id,
            "jobtrace.attempt": ctx.attempt,
            "jobtrace.service": ctx.job.spec.service,
            "jobtrace.worker.id": worker_id,
        },
    ):
        yield


_PROPAGATOR = TraceContextTextMapPropagator()
# A proxy until a provider is set (then it reports to that provider).
_TRACER = trace.get_tracer("jobtrace.worker", __version__)


def result_json(result: Mapping[str, Any] | None) -> bytes:
    """A handler's result as exact JSON; a value JSON cannot hold (NaN, a
    set, an object) fails the attempt for good."""
    try:
        return json.dumps(dict(result or {}), separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise NonRetryableError(f"the result is not JSON: {exc}", code="RESULT_NOT_JSON") from exc


UPSTREAM_FETCH_TIMEOUT_S = 60.0
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
# Answers to a report that mean it was not stored for a reason of the server's
# (its database unreachable, a fault of its own): the same report may be stored
# when sent again. Every other refusal is final.
RESEND_CODES = {
    grpc.StatusCode.UNAVAILABLE.value[0],
    grpc.StatusCode.INTERNAL.value[0],
    grpc.StatusCode.UNKNOWN.value[0],
    grpc.StatusCode.ABORTED.value[0],
    grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
}
RESEND_INITIAL_S = 0.2
RESEND_MAX_S = 10.0
ALREADY_EXISTS = grpc.StatusCode.ALREADY_EXISTS.value[0]
# The reports kept until the server stores them (sent again after a reconnect).
KEPT = {"complete", "fail", "trace"}
REFUSED = "REPORT_REFUSED"
REFUSED_AS_MALFORMED = {
    grpc.StatusCode.INVALID_ARGUMENT.value[0],
    grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
}


def already_stored(error: worker_service_pb2.StreamError) -> bool:
    """The server refused a completion because that attempt's completion is
    already stored (this is a resend whose first answer was lost): done."""
    return (
        error.message_kind == "complete"
        and error.code == ALREADY_EXISTS
        and error.reason == "DUPLICATE_REPORT"
    )


def _log_refusal(error: worker_service_pb2.StreamError) -> None:
    code = _code_name(error.code)
    if already_stored(error):
        log.info(
            "the completion of job %s attempt %d was already stored", error.job_id, error.attempt
        )
        return
    again = (
        " (sent again later)" if error.code in RESEND_CODES and error.message_kind in KEPT else ""
    )
    # The server's storage unavailable is expected in an outage (reports are kept).
    log.log(
        logging.INFO if error.code == UNAVAILABLE else logging.WARNING,
        "server refused %s: %s %s: %s%s",
        error.message_kind,
        code,
        error.reason,
        error.message,
        again,
        extra={"code": code, "reason": error.reason, "job_id": error.job_id},
    )


def _code_name(code: int) -> str:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return str(status.name)
    return str(code)


def fail_report(
    job_id: str, attempt: int, message: str, *, code: str, retryable: bool, details: str = ""
) -> worker_service_pb2.ConnectRequest:
    """A failure report cut to the sizes the server stores (message 10,000
    characters, code 128, details 64 KiB), so it is never refused for its size."""
    return worker_service_pb2.ConnectRequest(
        fail=worker_service_pb2.FailReport(
            job_id=job_id,
            attempt=attempt,
            error=common_pb2.ErrorDetail(
                message=_cut(message, 10_000),
                code=_cut(code, 128),
                details=_cut(details, 60_000),
            ),
            retryable=retryable,
        )
    )


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
