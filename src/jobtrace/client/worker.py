"""The worker runtime: handlers for services, one stream, heartbeats, reconnects, drain.

worker = Worker("127.0.0.1:50051", services_concurrency=4)

@worker.handler("resize")
async def resize(job: JobContext) -> dict:
    await job.progress(50, "halfway")
    return {"ok": True}

await worker.run()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from jobtrace.pb import common_pb2, worker_service_pb2, worker_service_pb2_grpc

log = logging.getLogger(__name__)

Handler = Callable[["JobContext"], Awaitable[dict[str, Any] | None]]


class NonRetryableError(Exception):
    """Raise from a handler to fail the job without retries."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class JobContext:
    """What a handler sees: the job, its payload and a way to report progress."""

    job: common_pb2.Job
    attempt: int
    payload: dict[str, Any]
    request_context: common_pb2.RequestContext
    traceparent: str
    _worker: Worker
    _cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_reason: str = ""

    @property
    def job_id(self) -> str:
        return self.job.id

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    async def wait_cancelled(self) -> None:
        await self._cancelled.wait()

    async def progress(self, percent: float, message: str = "") -> None:
        report = worker_service_pb2.ProgressReport(
            job_id=self.job.id, attempt=self.attempt, percent=percent, message=message
        )
        await self._worker._send(worker_service_pb2.ConnectRequest(progress=report), wait=False)


class Worker:
    def __init__(
        self,
        target: str,
        *,
        worker_id: str | None = None,
        max_concurrency: int = 1,
        affinity_keys: tuple[str, ...] = (),
        labels: dict[str, str] | None = None,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        reconnect_initial: float = 0.2,
        reconnect_max: float = 10.0,
    ) -> None:
        # Several comma-separated replicas: the worker fails over between them.
        self.targets = [t.strip() for t in target.split(",") if t.strip()]
        self.target = self.targets[0]
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.max_concurrency = max_concurrency
        self.affinity_keys = affinity_keys
        self.labels = labels or {}
        self._token = token
        self._credentials = credentials
        self._reconnect = (reconnect_initial, reconnect_max)
        self._handlers: dict[str, Handler] = {}
        self._running: dict[str, tuple[JobContext, asyncio.Task[None]]] = {}
        self._outbox: asyncio.Queue[worker_service_pb2.ConnectRequest] | None = None
        self._pending: dict[int, asyncio.Future[worker_service_pb2.ConnectResponse]] = {}
        self._unacked: dict[int, worker_service_pb2.ConnectRequest] = {}
        self._next_id = 0
        self._draining = False
        self._stop = asyncio.Event()
        self._call: Any = None
        self._acked = asyncio.Event()  # set on every ack and when a stream ends
        self.connected = asyncio.Event()
        self.completed = 0
        self.failed = 0
        # Called when a completion is acknowledged (stored) or refused: (job id, stored).
        self.on_completed: Callable[[str, bool], None] | None = None

    def handler(self, service: str) -> Callable[[Handler], Handler]:
        def register(fn: Handler) -> Handler:
            self._handlers[service] = fn
            return fn

        return register

    @property
    def running_jobs(self) -> list[str]:
        return list(self._running)

    # --- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        """Connect and serve until stop() (or drain()) finishes; reconnect with
        exponential backoff and jitter when the stream breaks."""
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
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay * (0.5 + random.random())):
                    await self._stop.wait()
            delay = min(delay * 2, self._reconnect[1])

    async def drain(self, timeout: float = 30.0) -> None:
        """Take no new work, let running handlers finish, then stop."""
        self._draining = True
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

    # --- one stream -------------------------------------------------------------

    async def _session(self) -> None:
        metadata = (("authorization", f"Bearer {self._token}"),) if self._token else None
        if self._credentials is not None:
            channel = grpc.aio.secure_channel(self.target, self._credentials)
        else:
            channel = grpc.aio.insecure_channel(self.target)
        outbox: asyncio.Queue[worker_service_pb2.ConnectRequest] = asyncio.Queue()
        self._outbox = outbox
        hello = worker_service_pb2.WorkerHello(
            worker_id=self.worker_id,
            services=list(self._handlers),
            max_concurrency=self.max_concurrency,
            labels=self.labels,
            affinity_keys=list(self.affinity_keys),
            running=[
                worker_service_pb2.JobAttempt(job_id=j, attempt=ctx.attempt)
                for j, (ctx, _) in self._running.items()
            ],
        )
        await outbox.put(worker_service_pb2.ConnectRequest(hello=hello))
        # Reports not acknowledged on the previous stream are sent again.
        for message in self._unacked.values():
            await outbox.put(message)

        async def requests() -> AsyncIterator[worker_service_pb2.ConnectRequest]:
            while True:
                message = await outbox.get()
                yield message

        heartbeats: asyncio.Task[None] | None = None
        async with channel:
            stub = worker_service_pb2_grpc.WorkerServiceStub(channel)
            call = stub.Connect(requests(), metadata=metadata)
            self._call = call
            try:
                async for response in call:
                    kind = response.WhichOneof("kind")
                    if kind == "welcome":
                        self.connected.set()
                        interval = response.welcome.heartbeat_interval.ToTimedelta()
                        heartbeats = asyncio.create_task(self._heartbeat(interval.total_seconds()))
                        for revoked in response.welcome.revoked:
                            self._cancel(revoked.job_id, "lease revoked after reconnect")
                    elif kind == "assignment":
                        self._start(response.assignment)
                    elif kind == "cancel":
                        self._cancel(response.cancel.job_id, response.cancel.reason)
                    elif kind == "heartbeat_ack":
                        for c in response.heartbeat_ack.cancels:
                            self._cancel(c.job_id, c.reason)
                        self._settle(response.heartbeat_ack.message_id, response)
                    elif kind == "ack":
                        self._settle(response.ack.message_id, response)
                    elif kind == "error":
                        log.warning(
                            "server refused %s: %s",
                            response.error.message_kind,
                            response.error.message,
                        )
                        self._settle(response.error.message_id, response)
                        if response.error.fatal:
                            break
                    elif kind == "drain":
                        log.info("server draining: %s", response.drain.reason)
                        break
            finally:
                self.connected.clear()
                self._acked.set()
                self._outbox = None
                if heartbeats is not None:
                    heartbeats.cancel()
                call.cancel()

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            beat = worker_service_pb2.WorkerHeartbeat(
                running=[
                    worker_service_pb2.JobAttempt(job_id=j, attempt=ctx.attempt)
                    for j, (ctx, _) in self._running.items()
                ],
                draining=self._draining,
            )
            await self._send(worker_service_pb2.ConnectRequest(heartbeat=beat), wait=False)

    async def _send(
        self, message: worker_service_pb2.ConnectRequest, *, wait: bool, keep: bool = False
    ) -> worker_service_pb2.ConnectResponse | None:
        self._next_id += 1
        message.message_id = self._next_id
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
        report = self._unacked.pop(message_id, None)
        if report is not None and report.WhichOneof("kind") == "complete" and self.on_completed:
            self.on_completed(report.complete.job_id, response.WhichOneof("kind") == "ack")
        self._acked.set()
        future = self._pending.pop(message_id, None)
        if future is not None and not future.done():
            future.set_result(response)

    # --- jobs --------------------------------------------------------------------

    def _start(self, a: worker_service_pb2.Assignment) -> None:
        ctx = JobContext(
            job=a.job,
            attempt=a.attempt,
            payload=json_format.MessageToDict(a.job.spec.payload),
            request_context=a.request_context,
            traceparent=a.traceparent,
            _worker=self,
        )
        task = asyncio.create_task(self._run_job(ctx))
        self._running[a.job.id] = (ctx, task)

    def _cancel(self, job_id: str, reason: str) -> None:
        entry = self._running.get(job_id)
        if entry is None:
            return
        ctx, task = entry
        ctx.cancel_reason = reason
        ctx._cancelled.set()
        task.cancel()

    async def _run_job(self, ctx: JobContext) -> None:
        handler = self._handlers.get(ctx.job.spec.service)
        report: worker_service_pb2.ConnectRequest | None = None
        try:
            if handler is None:
                raise NonRetryableError(f"no handler for service {ctx.job.spec.service!r}")
            result = await handler(ctx)
            body = struct_pb2.Struct()
            body.update(result or {})
            report = worker_service_pb2.ConnectRequest(
                complete=worker_service_pb2.CompleteReport(
                    job_id=ctx.job.id, attempt=ctx.attempt, result=body
                )
            )
            self.completed += 1
        except asyncio.CancelledError:
            if not ctx.cancelled:
                raise
            return  # the server ended the job; nothing to report
        except Exception as exc:
            retryable = not isinstance(exc, NonRetryableError)
            report = worker_service_pb2.ConnectRequest(
                fail=worker_service_pb2.FailReport(
                    job_id=ctx.job.id,
                    attempt=ctx.attempt,
                    error=common_pb2.ErrorDetail(
                        message=str(exc) or type(exc).__name__,
                        code=getattr(exc, "code", "") or type(exc).__name__,
                    ),
                    retryable=retryable,
                )
            )
            self.failed += 1
        finally:
            self._running.pop(ctx.job.id, None)
            if report is not None:
                await self._send(report, wait=False, keep=True)
