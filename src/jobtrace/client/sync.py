"""The blocking client: the asyncio Client run on a private event loop thread.

with SyncClient("127.0.0.1:50051") as jt:
    job = jt.submit_job("resize", {"image": "cat.png"})
    for snapshot in jt.watch_job(job.id):
        print(snapshot.state)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

from jobtrace.client.api import Client, Seconds
from jobtrace.pb import common_pb2

P = ParamSpec("P")
R = TypeVar("R")


def _blocking(
    method: Callable[Concatenate[Client, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[SyncClient, P], R]:
    def call(self: SyncClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._run(method(self.client, *args, **kwargs))

    call.__name__ = method.__name__
    call.__doc__ = method.__doc__
    return call


def _iterating(
    method: Callable[Concatenate[Client, P], AsyncIterator[R]],
) -> Callable[Concatenate[SyncClient, P], Iterator[R]]:
    def call(self: SyncClient, /, *args: P.args, **kwargs: P.kwargs) -> Iterator[R]:
        items = method(self.client, *args, **kwargs)
        try:
            while True:
                try:
                    yield self._run(items.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            # Stopped early (break, exception): end the stream on the server too.
            aclose = getattr(items, "aclose", None)
            if aclose is not None and not self._closed:
                self._run(aclose())

    call.__name__ = method.__name__
    call.__doc__ = method.__doc__
    return call


class SyncClient:
    """Every method of `Client`, blocking; streams are plain iterators. Takes the
    same arguments as Client. Safe to share between threads."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._start(Client(*args, **kwargs))

    @classmethod
    def from_env(cls, **options: Any) -> SyncClient:
        """Settings from JOBTRACE_TARGET, JOBTRACE_TOKEN, JOBTRACE_TLS... (see Endpoint)."""
        sync = cls.__new__(cls)
        sync._start(Client.from_env(**options))
        return sync

    def _start(self, client: Client) -> None:
        self.client = client
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="jobtrace-client", daemon=True
        )
        self._thread.start()

    def _run(self, step: Awaitable[R]) -> R:
        if self._closed:
            raise RuntimeError("the client is closed")

        async def run() -> R:
            return await step

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def close(self) -> None:
        if self._closed:
            return
        self._run(self.client.close())
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    submit_job = _blocking(Client.submit_job)
    submit_workflow = _blocking(Client.submit_workflow)
    get_job = _blocking(Client.get_job)
    get_workflow = _blocking(Client.get_workflow)
    list_jobs = _blocking(Client.list_jobs)
    list_workflows = _blocking(Client.list_workflows)
    cancel_job = _blocking(Client.cancel_job)
    cancel_workflow = _blocking(Client.cancel_workflow)
    watch_job = _iterating(Client.watch_job)
    watch_workflow = _iterating(Client.watch_workflow)
    iter_jobs = _iterating(Client.iter_jobs)
    iter_workflows = _iterating(Client.iter_workflows)
    append_trace_events = _blocking(Client.append_trace_events)
    list_trace_events = _blocking(Client.list_trace_events)
    stream_trace_events = _iterating(Client.stream_trace_events)
    get_run_status = _blocking(Client.get_run_status)
    get_attestation = _blocking(Client.get_attestation)
    export_attestation = _blocking(Client.export_attestation)
    list_attestations = _blocking(Client.list_attestations)
    verify_attestation = _blocking(Client.verify_attestation)
    get_signing_keys = _blocking(Client.get_signing_keys)
    attach_annotations = _blocking(Client.attach_annotations)
    list_annotations = _blocking(Client.list_annotations)

    # Waiting for results: written out, so help() and type checkers see them.

    def await_job(self, job_id: str, *, timeout: Seconds | None = None) -> common_pb2.Job:
        """Block until the job ends and return it (COMPLETED with its result, or
        FAILED, CANCELLED...). `timeout` (seconds) bounds the wait: past it,
        DeadlineExceeded (reason AWAIT_TIMEOUT); None waits as long as it takes."""
        return self._run(self.client.await_job(job_id, timeout=timeout))

    def await_workflow(
        self, workflow_id: str, *, timeout: Seconds | None = None
    ) -> common_pb2.Workflow:
        """Block until the workflow ends and return it, with its outputs when it
        COMPLETED; `timeout` as in await_job."""
        return self._run(self.client.await_workflow(workflow_id, timeout=timeout))

    def result(self, job_id: str, *, timeout: Seconds | None = None) -> Any:
        """The job's result as plain Python values (integers stay ints), once it
        completes. Raises RunFailed when it ended otherwise, DeadlineExceeded
        when `timeout` seconds pass first."""
        return self._run(self.client.result(job_id, timeout=timeout))

    def outputs(self, workflow_id: str, *, timeout: Seconds | None = None) -> dict[str, Any]:
        """The workflow's outputs (step name -> result, plain Python values) once
        it completes. Raises RunFailed when it ended otherwise, DeadlineExceeded
        when `timeout` seconds pass first."""
        return self._run(self.client.outputs(workflow_id, timeout=timeout))
