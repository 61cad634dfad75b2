"""Test helpers that speak the worker protocol: a raw stream and the real runtime."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from jobtrace.client.worker import JobContext, Worker
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Stubs, wait_for


class RawWorker:
    """Drives WorkerService.Connect message by message."""

    def __init__(self, stubs: Stubs, metadata: Any = None) -> None:
        self._out: asyncio.Queue[w.ConnectRequest | None] = asyncio.Queue()
        self.call = stubs.workers.Connect(self._requests(), metadata=metadata)
        self._next = 0
        self._stash: list[w.ConnectResponse] = []

    async def _requests(self) -> AsyncIterator[w.ConnectRequest]:
        while True:
            message = await self._out.get()
            if message is None:
                return
            yield message

    async def send(self, **kind: Any) -> int:
        self._next += 1
        await self._out.put(w.ConnectRequest(message_id=self._next, **kind))
        return self._next

    async def recv(self, timeout: float = 5.0) -> w.ConnectResponse:
        message = await asyncio.wait_for(self.call.read(), timeout)
        assert message is not grpc.aio.EOF, "stream ended"
        return message

    async def expect(self, kind: str, timeout: float = 5.0) -> Any:
        """The next message of this kind. Messages of other kinds read meanwhile are
        kept for later, since e.g. an ack and the next assignment may cross."""
        for i, message in enumerate(self._stash):
            if message.WhichOneof("kind") == kind:
                del self._stash[i]
                return getattr(message, kind)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            message = await self.recv(max(left, 0.001))
            got = message.WhichOneof("kind")
            if got == kind:
                return getattr(message, kind)
            if got != "heartbeat_ack":
                self._stash.append(message)

    async def hello(
        self, worker_id: str, services: list[str], max_concurrency: int = 1, **extra: Any
    ) -> w.Welcome:
        await self.send(
            hello=w.WorkerHello(
                worker_id=worker_id, services=services, max_concurrency=max_concurrency, **extra
            )
        )
        return await self.expect("welcome")

    async def close(self) -> None:
        await self._out.put(None)
        self.call.cancel()


Handler = Callable[[JobContext], Awaitable[dict[str, Any] | None]]


@contextlib.asynccontextmanager
async def runtime_worker(
    target: str, handlers: dict[str, Handler], **options: Any
) -> AsyncIterator[Worker]:
    """The real worker runtime, in this process, connected before yielding."""
    worker = Worker(target, reconnect_initial=0.05, **options)
    for service, fn in handlers.items():
        worker.handler(service)(fn)
    async with running(worker):
        yield worker


@contextlib.asynccontextmanager
async def running(worker: Worker) -> AsyncIterator[Worker]:
    """`asyncio.run(worker.run())`, but as a task on the test's loop, connected
    before yielding, stopped after."""
    task = asyncio.create_task(worker.run())
    try:
        await wait_for(worker.connected.is_set, timeout=10)
        yield worker
    finally:
        worker.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def demo_worker_process(
    target: str, worker_id: str, concurrency: int = 4
) -> asyncio.subprocess.Process:
    """`jobtrace worker --demo` as a real process (several targets: fail-over)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jobtrace",
        "worker",
        "--demo",
        "--target",
        target,
        "--worker-id",
        worker_id,
        "--concurrency",
        str(concurrency),
        "--log-level",
        "WARNING",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


async def terminate(*procs: asyncio.subprocess.Process, timeout: float = 30.0) -> None:
    """SIGTERM every process still running, wait for each, SIGKILL what hangs."""
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            async with asyncio.timeout(timeout):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
