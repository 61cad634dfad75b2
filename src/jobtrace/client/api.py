"""The typed asyncio client: one method per RPC, deadlines, retries and resumable streams.

async with Client("127.0.0.1:50051", token=...) as jt:
    job = await jt.submit_job("resize", {"image": "cat.png"})
    async for snapshot in jt.watch_job(job.id):
        print(snapshot.state, snapshot.progress.percent)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from jobtrace.client.channel import DEFAULT_TARGET, Endpoint
from jobtrace.client.errors import (
    FieldViolation,
    InvalidInput,
    JobtraceError,
    RunFailed,
    from_rpc_error,
)
from jobtrace.client.inputs import Inputs, message_from
from jobtrace.pb import (
    attestation_service_pb2,
    attestation_service_pb2_grpc,
    common_pb2,
    duration_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    schedule_service_pb2,
    schedule_service_pb2_grpc,
    struct_pb2,
    timestamp_pb2,
    trace_service_pb2,
    trace_service_pb2_grpc,
    worker_service_pb2,
    worker_service_pb2_grpc,
)

T = TypeVar("T")
M = TypeVar("M", bound=Message)

# Items per SubmitJobs / SubmitWorkflows call (the server's limits).
MAX_BULK_JOBS = 1000
MAX_BULK_WORKFLOWS = 100
# The longest single AwaitJob / AwaitWorkflow call; a longer wait makes several.
AWAIT_ROUND_S = 60.0
# How long past its own timeout an Await call may take before the client gives up.
AWAIT_GRACE_S = 10.0

Seconds = float | timedelta
When = datetime | timestamp_pb2.Timestamp

# No weighted affinity (an immutable default).
NO_AFFINITY: Mapping[str, float] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retries of calls that are safe to repeat, when the server is UNAVAILABLE:
    exponential backoff with jitter (each delay between half and all of its
    ceiling, so the retries of many clients spread out but always span a
    reconnect). A stream that delivered something starts its count afresh."""

    # Tries in all, the first included; 1 disables retries.
    attempts: int = 6
    initial_backoff: float = 0.1
    max_backoff: float = 3.0
    multiplier: float = 2.0

    def delays(self) -> Iterator[float]:
        ceiling = self.initial_backoff
        for _ in range(self.attempts - 1):
            yield random.uniform(ceiling / 2, ceiling)
            ceiling = min(ceiling * self.multiplier, self.max_backoff)


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list; pass `next_page_token` back for the next (empty: the last)."""

    items: list[T]
    next_page_token: str
    # Every item matching the filters, over all pages: set when the listing
    # was asked to count (include_total=True), else None.
    total_size: int | None = None


@dataclass(frozen=True, slots=True)
class TracePage:
    """One page of trace events; `next_cursor` resumes exactly after the last one."""

    events: list[common_pb2.TraceEvent]
    next_cursor: str
    more: bool


class Client:
    """Typed access to every jobtrace RPC over one channel.

    Unary calls get a default deadline (`timeout`, seconds). Calls that are safe
    to repeat are retried on UNAVAILABLE: reads, and submissions, trace appends
    and annotations, which carry an idempotency key (generated when not given) so
    a retry never duplicates. Cancels are not retried. Failures raise
    `jobtrace.client.JobtraceError` subclasses carrying the status, the server's
    ErrorInfo and the field violations.
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        client_cert_file: str | None = None,
        client_key_file: str | None = None,
        endpoint: Endpoint | None = None,
        timeout: float | None = 10.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.endpoint = endpoint or Endpoint(
            target=target or DEFAULT_TARGET,
            token=token,
            tls=tls,
            ca_file=ca_file,
            client_cert_file=client_cert_file,
            client_key_file=client_key_file,
        )
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._channel: grpc.aio.Channel | None = None
        self._jobs: job_service_pb2_grpc.JobServiceStub | None = None
        self._trace: trace_service_pb2_grpc.TraceServiceStub | None = None
        self._attest: attestation_service_pb2_grpc.AttestationServiceStub | None = None
        self._workers: worker_service_pb2_grpc.WorkerServiceStub | None = None
        self._schedules: schedule_service_pb2_grpc.ScheduleServiceStub | None = None

    @classmethod
    def from_env(cls, **options: Any) -> Client:
        """Settings from JOBTRACE_TARGET, JOBTRACE_TOKEN, JOBTRACE_TLS... (see Endpoint)."""
        endpoint_keys = {"target", "token", "tls", "ca_file", "client_cert_file"}
        endpoint_keys |= {"client_key_file", "server_name"}
        chosen = {k: options.pop(k) for k in list(options) if k in endpoint_keys}
        return cls(endpoint=Endpoint.from_env(**chosen), **options)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    # --- plumbing -------------------------------------------------------------

    def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = self.endpoint.channel()
            self._jobs = job_service_pb2_grpc.JobServiceStub(self._channel)
            self._trace = trace_service_pb2_grpc.TraceServiceStub(self._channel)
            self._attest = attestation_service_pb2_grpc.AttestationServiceStub(self._channel)
            self._workers = worker_service_pb2_grpc.WorkerServiceStub(self._channel)
            self._schedules = schedule_service_pb2_grpc.ScheduleServiceStub(self._channel)
        return self._channel

    @property
    def jobs_stub(self) -> job_service_pb2_grpc.JobServiceStub:
        """The raw grpc stub of JobService on this client's channel."""
        self._open()
        assert self._jobs is not None
        return self._jobs

    @property
    def trace_stub(self) -> trace_service_pb2_grpc.TraceServiceStub:
        """The raw grpc stub of TraceService on this client's channel."""
        self._open()
        assert self._trace is not None
        return self._trace

    @property
    def attest_stub(self) -> attestation_service_pb2_grpc.AttestationServiceStub:
        """The raw grpc stub of AttestationService on this client's channel."""
        self._open()
        assert self._attest is not None
        return self._attest

    @property
    def schedules_stub(self) -> schedule_service_pb2_grpc.ScheduleServiceStub:
        """The raw grpc stub of ScheduleService on this client's channel."""
        self._open()
        assert self._schedules is not None
        return self._schedules

    @property
    def workers_stub(self) -> worker_service_pb2_grpc.WorkerServiceStub:
        """The raw grpc stub of WorkerService on this client's channel."""
        self._open()
        assert self._workers is not None
        return self._workers

    async def _call(
        self,
        method: Callable[..., Awaitable[Any]],
        request: Message,
        *,
        retry: bool,
        extra_metadata: tuple[tuple[str, str], ...] = (),
    ) -> Any:
        delays = self.retry.delays() if retry else iter(())
        while True:
            try:
                return with_structs(
                    await method(
                        request,
                        timeout=self.timeout,
                        metadata=self.endpoint.metadata(*extra_metadata),
                    )
                )
            except grpc.aio.AioRpcError as err:
                delay = next(delays, None) if _retryable(err) else None
                if delay is None:
                    raise from_rpc_error(err) from err
                await asyncio.sleep(delay)

    async def _stream(
        self, open_call: Callable[[], Any], *, resume: Callable[[Any], None] | None = None
    ) -> AsyncGenerator[Any, None]:
        """Items of a server stream, reopened after a broken connection (UNAVAILABLE)
        by `open_call`, which resumes from what `resume` has seen."""
        delays = self.retry.delays()
        while True:
            call = open_call()
            try:
                async for item in call:
                    delays = self.retry.delays()  # progress: a fresh retry budget
                    if resume is not None:
                        resume(item)
                    yield with_structs(item)
                return
            except grpc.aio.AioRpcError as err:
                delay = next(delays, None) if _retryable(err) else None
                if delay is None:
                    raise from_rpc_error(err) from err
                await asyncio.sleep(delay)
            finally:
                call.cancel()

    # --- JobService ---------------------------------------------------------------

    async def submit_job(
        self,
        service: str,
        payload: Mapping[str, Any] | None = None,
        *,
        request_id: str | None = None,
        priority: int = 0,
        max_attempts: int = 0,
        timeout: Seconds | None = None,
        not_before: When | None = None,
        affinity_keys: Sequence[str] = (),
        labels: Mapping[str, str] | None = None,
        backoff: common_pb2.BackoffPolicy | None = None,
        request_context: common_pb2.RequestContext | Mapping[str, Any] | None = None,
        annotations: Sequence[common_pb2.AnnotationInput | Mapping[str, Any]] = (),
        traceparent: str | None = None,
        worker_labels: Sequence[common_pb2.LabelRequirement | str] = (),
        affinity: Mapping[str, float] = NO_AFFINITY,
        rate_limits: Sequence[common_pb2.RateLimitUse | str] = (),
        concurrency: common_pb2.ConcurrencyKey | str | None = None,
    ) -> common_pb2.Job:
        """Submit one job. Idempotent by `request_id` (a random one when not given),
        so a retried submit returns the same job. `worker_labels` are
        requirements (see `label_requirement`; a string such as "gpu=a100" or
        "vram_gb>=40" is a required one), `affinity` cache keys by weight;
        `rate_limits` uses of named limits ("openai", "openai@{user_id}:2", see
        `rate_limit_use`), `concurrency` a key ("user:{user_id}:1:cancel_oldest",
        see `concurrency_key`)."""
        spec = job_spec(
            service,
            payload,
            priority=priority,
            max_attempts=max_attempts,
            timeout=timeout,
            not_before=not_before,
            affinity_keys=affinity_keys,
            labels=labels,
            backoff=backoff,
            worker_labels=worker_labels,
            affinity=affinity,
            rate_limits=rate_limits,
            concurrency=concurrency,
        )
        inputs = Inputs()
        request = job_service_pb2.SubmitJobRequest(
            request_id=request_id or _new_request_id(),
            job=spec,
            request_context=inputs.optional(
                common_pb2.RequestContext, request_context, "request_context"
            ),
            annotations=[
                inputs.message(common_pb2.AnnotationInput, a, f"annotations[{i}]")
                for i, a in enumerate(annotations)
            ],
        )
        inputs.done()
        extra = (("traceparent", traceparent),) if traceparent else ()
        response: job_service_pb2.SubmitJobResponse = await self._call(
            self.jobs_stub.SubmitJob, request, retry=True, extra_metadata=extra
        )
        return response.job

    async def submit_workflow(
        self,
        name: str,
        steps: Sequence[common_pb2.WorkflowStepSpec | Mapping[str, Any]],
        *,
        request_id: str | None = None,
        priority: int = 0,
        labels: Mapping[str, str] | None = None,
        request_context: common_pb2.RequestContext | Mapping[str, Any] | None = None,
        annotations: Sequence[common_pb2.AnnotationInput | Mapping[str, Any]] = (),
        traceparent: str | None = None,
        outputs: Sequence[str] = (),
        timeout: Seconds | None = None,
    ) -> common_pb2.Workflow:
        """Submit a workflow. Steps are WorkflowStepSpec messages or mappings in their
        JSON form (`{"name": ..., "job": {"service": ...}, "depends_on": [...]}`).
        `outputs` names the steps whose results are the workflow's outputs
        (default: the steps no other step depends on). `timeout` (seconds) is
        the whole run's, from submission: past it the workflow ends TIMED_OUT."""
        inputs = Inputs()
        request = job_service_pb2.SubmitWorkflowRequest(
            request_id=request_id or _new_request_id(),
            name=name,
            steps=[
                inputs.message(common_pb2.WorkflowStepSpec, s, f"steps[{i}]")
                for i, s in enumerate(steps)
            ],
            priority=priority,
            labels=dict(labels or {}),
            request_context=inputs.optional(
                common_pb2.RequestContext, request_context, "request_context"
            ),
            annotations=[
                inputs.message(common_pb2.AnnotationInput, a, f"annotations[{i}]")
                for i, a in enumerate(annotations)
            ],
            outputs=list(outputs),
            timeout=_duration(timeout),
        )
        inputs.done()
        extra = (("traceparent", traceparent),) if traceparent else ()
        response: job_service_pb2.SubmitWorkflowResponse = await self._call(
            self.jobs_stub.SubmitWorkflow, request, retry=True, extra_metadata=extra
        )
        return response.workflow

    async def submit_jobs(
        self,
        items: Sequence[job_service_pb2.SubmitJobRequest | Mapping[str, Any]],
        *,
        chunk: int = MAX_BULK_JOBS,
        concurrency: int = 4,
        traceparent: str | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[job_service_pb2.SubmitJobResult]:
        """Submit many jobs through SubmitJobs: the items in calls of at most
        `chunk` (1-1,000), `concurrency` calls in flight; one result per item,
        in the order of `items` (each with its job, `deduplicated`, or the
        item's own error: a request_id used before for another request). An
        item is a SubmitJobRequest or a mapping: either its JSON form
        (`{"request_id": ..., "job": {...}}`) or a flat one, a JobSpec's
        fields with request_id, request_context and annotations beside them
        (`{"service": "resize", "payload": {...}, "request_id": "r1"}`). An
        item without request_id gets a random one. Every item is checked
        before any call (InvalidInput naming `items[i]...`). A failed call
        raises its error with its violations and metadata naming items by
        their index in `items` (metadata first_item: where its chunk began);
        calls already answered stay stored. `on_progress` is called with the
        number of items answered so far after each call."""
        requests = bulk_job_requests(items)
        return await self._bulk(
            self.jobs_stub.SubmitJobs,
            job_service_pb2.SubmitJobsRequest,
            requests,
            limit=MAX_BULK_JOBS,
            chunk=chunk,
            concurrency=concurrency,
            traceparent=traceparent,
            on_progress=on_progress,
        )

    async def submit_workflows(
        self,
        items: Sequence[job_service_pb2.SubmitWorkflowRequest | Mapping[str, Any]],
        *,
        chunk: int = MAX_BULK_WORKFLOWS,
        concurrency: int = 4,
        traceparent: str | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[job_service_pb2.SubmitWorkflowResult]:
        """Submit many workflows through SubmitWorkflows, in calls of at most
        `chunk` (1-100), as submit_jobs. An item is a SubmitWorkflowRequest or
        its JSON form (`{"name": ..., "steps": [...], "request_id": ...}`)."""
        inputs = Inputs()
        requests = [
            inputs.message(job_service_pb2.SubmitWorkflowRequest, item, f"items[{i}]")
            for i, item in enumerate(items)
        ]
        inputs.done()
        for r in requests:
            if not r.request_id:
                r.request_id = _new_request_id()
        return await self._bulk(
            self.jobs_stub.SubmitWorkflows,
            job_service_pb2.SubmitWorkflowsRequest,
            requests,
            limit=MAX_BULK_WORKFLOWS,
            chunk=chunk,
            concurrency=concurrency,
            traceparent=traceparent,
            on_progress=on_progress,
        )

    async def _bulk(
        self,
        method: Callable[..., Awaitable[Any]],
        kind: Callable[..., Any],
        requests: Sequence[Message],
        *,
        limit: int,
        chunk: int,
        concurrency: int,
        traceparent: str | None,
        on_progress: Callable[[int], None] | None,
    ) -> list[Any]:
        if not 1 <= chunk <= limit:
            raise InvalidInput(f"chunk must be between 1 and {limit} (got {chunk})")
        if concurrency < 1:
            raise InvalidInput(f"concurrency must be at least 1 (got {concurrency})")
        extra = (("traceparent", traceparent),) if traceparent else ()
        results: list[Any] = [None] * len(requests)
        gate = asyncio.Semaphore(concurrency)
        done = 0

        async def one(start: int) -> None:
            nonlocal done
            part = requests[start : start + chunk]
            async with gate:
                try:
                    response = await self._call(
                        method, kind(items=part), retry=True, extra_metadata=extra
                    )
                except JobtraceError as err:
                    raise _shifted(err, start, len(part)) from err
            results[start : start + len(part)] = list(response.results)
            done += len(part)
            if on_progress is not None:
                on_progress(done)

        tasks = [asyncio.ensure_future(one(start)) for start in range(0, len(requests), chunk)]
        try:
            for task in asyncio.as_completed(tasks):
                await task  # the first failure raises; the others are cancelled
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return results

    async def get_job(self, job_id: str) -> common_pb2.Job:
        """The job now: spec, state, progress, attempt, and its result or failure."""
        request = job_service_pb2.GetJobRequest(job_id=job_id)
        response: job_service_pb2.GetJobResponse = await self._call(
            self.jobs_stub.GetJob, request, retry=True
        )
        return response.job

    async def get_workflow(self, workflow_id: str) -> common_pb2.Workflow:
        """The workflow now, with its steps and their states."""
        request = job_service_pb2.GetWorkflowRequest(workflow_id=workflow_id)
        response: job_service_pb2.GetWorkflowResponse = await self._call(
            self.jobs_stub.GetWorkflow, request, retry=True
        )
        return response.workflow

    async def summarize_failures(
        self, since: When, *, until: When | None = None, service: str = ""
    ) -> list[job_service_pb2.FailureGroup]:
        """Failed attempts (a worker's failure, a lost lease, a timeout) from
        `since` to `until` (default now), grouped by failure kind ("" when no
        failure rule matched) and service, most first, each with its last
        failure."""
        request = job_service_pb2.SummarizeFailuresRequest(
            since=_timestamp(since), until=_timestamp(until), service=service
        )
        response: job_service_pb2.SummarizeFailuresResponse = await self._call(
            self.jobs_stub.SummarizeFailures, request, retry=True
        )
        return list(response.groups)

    async def list_jobs(
        self,
        *,
        state: int | str | None = None,
        service: str = "",
        workflow_id: str = "",
        labels: Mapping[str, str] | None = None,
        user_id: str = "",
        worker_id: str = "",
        created_after: When | None = None,
        created_before: When | None = None,
        include_total: bool = False,
        page_size: int = 0,
        page_token: str = "",
        view: int | str | None = None,
        parent_run_id: str = "",
        root_run_id: str = "",
    ) -> Page[common_pb2.Job]:
        """One page, newest first; `state` is a RunState value or name ("RUNNING").
        `labels` must all match; `user_id` is the request context's user (a
        step's is its workflow's); `worker_id` ran the latest attempt; created
        in [`created_after`, `created_before`). With `include_total`, the
        page's `total_size` counts every matching job. `view` "full" returns
        each job whole; the default ("basic") leaves out spec.payload, result
        and failure.details. A page may hold fewer than `page_size` jobs (it is
        bounded in bytes too): only an empty `next_page_token` ends the listing.
        `parent_run_id`: the reruns of that job (one level); `root_run_id`:
        every rerun of the chain that started with it."""
        request = job_service_pb2.ListJobsRequest(
            state=run_state(state),
            service=service,
            workflow_id=workflow_id,
            labels=dict(labels or {}),
            user_id=user_id,
            worker_id=worker_id,
            created_after=_timestamp(created_after),
            created_before=_timestamp(created_before),
            include_total=include_total,
            page_size=page_size,
            page_token=page_token,
            view=_enum(job_service_pb2.JobView, "JOB_VIEW_", view),
            parent_run_id=parent_run_id,
            root_run_id=root_run_id,
        )
        response: job_service_pb2.ListJobsResponse = await self._call(
            self.jobs_stub.ListJobs, request, retry=True
        )
        total = response.total_size if include_total else None
        return Page(list(response.jobs), response.next_page_token, total)

    def iter_jobs(self, /, **filters: Any) -> AsyncIterator[common_pb2.Job]:
        """Every job matching the filters of list_jobs, page after page."""
        return _every(self.list_jobs, filters)

    async def list_workflows(
        self,
        *,
        state: int | str | None = None,
        name: str = "",
        labels: Mapping[str, str] | None = None,
        user_id: str = "",
        created_after: When | None = None,
        created_before: When | None = None,
        include_total: bool = False,
        page_size: int = 0,
        page_token: str = "",
        view: int | str | None = None,
        parent_run_id: str = "",
        root_run_id: str = "",
    ) -> Page[common_pb2.Workflow]:
        """One page, newest first, filtered as list_jobs is; `view` "full"
        returns each workflow with its steps, the default ("basic") without
        them (progress still counts them). `parent_run_id`: the reruns of that
        workflow (one level); `root_run_id`: every rerun of its chain."""
        request = job_service_pb2.ListWorkflowsRequest(
            state=run_state(state),
            name=name,
            labels=dict(labels or {}),
            user_id=user_id,
            created_after=_timestamp(created_after),
            created_before=_timestamp(created_before),
            include_total=include_total,
            page_size=page_size,
            page_token=page_token,
            view=_enum(job_service_pb2.WorkflowView, "WORKFLOW_VIEW_", view),
            parent_run_id=parent_run_id,
            root_run_id=root_run_id,
        )
        response: job_service_pb2.ListWorkflowsResponse = await self._call(
            self.jobs_stub.ListWorkflows, request, retry=True
        )
        total = response.total_size if include_total else None
        return Page(list(response.workflows), response.next_page_token, total)

    def iter_workflows(self, /, **filters: Any) -> AsyncIterator[common_pb2.Workflow]:
        """Every workflow matching the filters of list_workflows, page after page."""
        return _every(self.list_workflows, filters)

    async def cancel_job(self, job_id: str, reason: str = "") -> common_pb2.Job:
        """Cancel a job; its worker hears of it at once. Not retried: a repeat of
        a cancel that did land would fail as FAILED_PRECONDITION."""
        request = job_service_pb2.CancelJobRequest(job_id=job_id, reason=reason)
        response: job_service_pb2.CancelJobResponse = await self._call(
            self.jobs_stub.CancelJob, request, retry=False
        )
        return response.job

    async def cancel_workflow(self, workflow_id: str, reason: str = "") -> common_pb2.Workflow:
        """Cancel a workflow and every step not yet finished; running workers
        hear of it at once. Not retried (see cancel_job)."""
        request = job_service_pb2.CancelWorkflowRequest(workflow_id=workflow_id, reason=reason)
        response: job_service_pb2.CancelWorkflowResponse = await self._call(
            self.jobs_stub.CancelWorkflow, request, retry=False
        )
        return response.workflow

    async def terminate_job(self, job_id: str, reason: str = "") -> common_pb2.Job:
        """Terminate a job: it ends TERMINATED now, without waiting for its
        worker (which is told to stop; its later reports are refused). Not
        retried (see cancel_job)."""
        request = job_service_pb2.TerminateJobRequest(job_id=job_id, reason=reason)
        response: job_service_pb2.TerminateJobResponse = await self._call(
            self.jobs_stub.TerminateJob, request, retry=False
        )
        return response.job

    async def terminate_workflow(self, workflow_id: str, reason: str = "") -> common_pb2.Workflow:
        """Terminate a workflow and every step not yet finished: TERMINATED
        now, their workers told to stop. Not retried (see cancel_job)."""
        request = job_service_pb2.TerminateWorkflowRequest(workflow_id=workflow_id, reason=reason)
        response: job_service_pb2.TerminateWorkflowResponse = await self._call(
            self.jobs_stub.TerminateWorkflow, request, retry=False
        )
        return response.workflow

    async def rerun_workflow(
        self,
        workflow_id: str,
        *,
        from_steps: Sequence[str] = (),
        failed_only: bool = False,
        reason: str = "",
        request_id: str | None = None,
        traceparent: str | None = None,
    ) -> common_pb2.Workflow:
        """A new run of an ended workflow: `from_steps` (those steps and
        everything downstream run again, the others are carried over),
        `failed_only` (the steps that did not complete, and downstream), or
        neither (the whole workflow again). Its parent_run_id and root_run_id
        name its lineage. Idempotent by `request_id` (one is made when not
        given), so a lost answer is retried safely."""
        request = job_service_pb2.RerunWorkflowRequest(
            workflow_id=workflow_id,
            from_steps=list(from_steps),
            failed_only=failed_only,
            reason=reason,
            request_id=request_id or _new_request_id(),
        )
        extra = (("traceparent", traceparent),) if traceparent else ()
        response: job_service_pb2.RerunWorkflowResponse = await self._call(
            self.jobs_stub.RerunWorkflow, request, retry=True, extra_metadata=extra
        )
        return response.workflow

    async def rerun_job(
        self,
        job_id: str,
        *,
        reason: str = "",
        request_id: str | None = None,
        traceparent: str | None = None,
    ) -> common_pb2.Job:
        """A new run of an ended standalone job (same spec and request
        context), as rerun_workflow."""
        request = job_service_pb2.RerunJobRequest(
            job_id=job_id, reason=reason, request_id=request_id or _new_request_id()
        )
        extra = (("traceparent", traceparent),) if traceparent else ()
        response: job_service_pb2.RerunJobResponse = await self._call(
            self.jobs_stub.RerunJob, request, retry=True, extra_metadata=extra
        )
        return response.job

    async def cancel_runs(
        self,
        *,
        kind: int | str | None = None,
        states: Sequence[int | str] = (),
        service: str = "",
        workflow_name: str = "",
        labels: Mapping[str, str] | None = None,
        user_id: str = "",
        created_after: When | None = None,
        created_before: When | None = None,
        include_steps: bool = False,
        dry_run: bool = False,
        reason: str = "",
        request_id: str = "",
        limit: int = 0,
        page_size: int = 0,
        until_done: bool = False,
    ) -> job_service_pb2.CancelRunsResponse:
        """Cancel in bulk the runs matching the filters (at least one):
        `kind` "job" or "workflow" (default both), `states` (values or names),
        `service` (jobs), `workflow_name` (workflows), `labels`, `user_id`,
        created in [`created_after`, `created_before`); `include_steps` takes
        workflow steps as jobs too. `dry_run` changes nothing: `matched`
        counts the runs, `sample` shows some. Otherwise one call of the
        operation `request_id` (a new random one when empty: the response
        names it), which stops after `limit` runs (default 1,000) or near the
        deadline with `done` False; re-send with the same request_id (or pass
        `until_done`, which does) to go on: no run is handled twice, and the
        counts are the operation's totals. Safe to retry: the request id
        makes it idempotent."""
        request = job_service_pb2.CancelRunsRequest(
            filter=_bulk_filter(
                kind,
                states,
                service,
                workflow_name,
                labels,
                user_id,
                created_after,
                created_before,
                include_steps,
            ),
            dry_run=dry_run,
            reason=reason,
            request_id=request_id or ("" if dry_run else f"bulk-{uuid.uuid4()}"),
            limit=limit,
            page_size=page_size,
        )
        while True:
            response: job_service_pb2.CancelRunsResponse = await self._call(
                self.jobs_stub.CancelRuns, request, retry=True
            )
            if response.done or not until_done:
                return response

    async def rerun_runs(
        self,
        *,
        kind: int | str | None = None,
        states: Sequence[int | str] = (),
        service: str = "",
        workflow_name: str = "",
        labels: Mapping[str, str] | None = None,
        user_id: str = "",
        created_after: When | None = None,
        created_before: When | None = None,
        failed_only: bool = False,
        dry_run: bool = False,
        reason: str = "",
        request_id: str = "",
        limit: int = 0,
        page_size: int = 0,
        until_done: bool = False,
    ) -> job_service_pb2.RerunRunsResponse:
        """Rerun in bulk the ended runs matching the filters (at least one;
        `states` only ended ones), as cancel_runs: standalone jobs as
        rerun_job, workflows as rerun_workflow (whole, or with `failed_only`
        only their steps that did not complete). Each new run has lineage and
        trigger annotations with `reason`; `reruns` names the new runs this
        call created. Re-sending with the same request_id (or `until_done`)
        goes on and never reruns a run twice."""
        request = job_service_pb2.RerunRunsRequest(
            filter=_bulk_filter(
                kind,
                states,
                service,
                workflow_name,
                labels,
                user_id,
                created_after,
                created_before,
                False,
            ),
            dry_run=dry_run,
            reason=reason,
            request_id=request_id or ("" if dry_run else f"bulk-{uuid.uuid4()}"),
            limit=limit,
            page_size=page_size,
            failed_only=failed_only,
        )
        while True:
            response: job_service_pb2.RerunRunsResponse = await self._call(
                self.jobs_stub.RerunRuns, request, retry=True
            )
            if response.done or not until_done:
                return response

    async def approve_step(
        self, workflow_id: str, step: str, *, approve: bool = True, comment: str = ""
    ) -> job_service_pb2.ApproveStepResponse:
        """Decide an approval gate step (WAITING_FOR_HUMAN) of a workflow:
        approve it, or with approve=False reject it; the decision is recorded
        (and attested) as the caller's, who needs the reviewer role and must be
        one of the gate's approvers. Returns the workflow and the gate step
        after the decision. Not retried: a second decision of the same caller
        is ALREADY_EXISTS."""
        request = job_service_pb2.ApproveStepRequest(
            workflow_id=workflow_id,
            step=step,
            disposition=common_pb2.APPROVAL_DISPOSITION_APPROVED
            if approve
            else common_pb2.APPROVAL_DISPOSITION_REJECTED,
            comment=comment,
        )
        response: job_service_pb2.ApproveStepResponse = await self._call(
            self.jobs_stub.ApproveStep, request, retry=False
        )
        return response

    async def list_pending_approvals(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> Page[job_service_pb2.PendingApproval]:
        """One page of the approval gates waiting that the caller may decide
        (and has not), oldest first."""
        request = job_service_pb2.ListPendingApprovalsRequest(
            page_size=page_size, page_token=page_token
        )
        response: job_service_pb2.ListPendingApprovalsResponse = await self._call(
            self.jobs_stub.ListPendingApprovals, request, retry=True
        )
        return Page(list(response.approvals), response.next_page_token)

    def iter_pending_approvals(
        self, /, **filters: Any
    ) -> AsyncIterator[job_service_pb2.PendingApproval]:
        """Every pending approval of list_pending_approvals, page after page."""
        return _every(self.list_pending_approvals, filters)

    async def pause_workflow(self, workflow_id: str, reason: str = "") -> common_pb2.Workflow:
        """Pause a workflow: no new step of it is dispatched until
        resume_workflow; running steps finish. Not retried (a pause that took
        effect would be refused the second time)."""
        request = job_service_pb2.PauseWorkflowRequest(workflow_id=workflow_id, reason=reason)
        response: job_service_pb2.PauseWorkflowResponse = await self._call(
            self.jobs_stub.PauseWorkflow, request, retry=False
        )
        return response.workflow

    async def resume_workflow(self, workflow_id: str) -> common_pb2.Workflow:
        """Resume a paused workflow where it stopped. Not retried (see pause_workflow)."""
        request = job_service_pb2.ResumeWorkflowRequest(workflow_id=workflow_id)
        response: job_service_pb2.ResumeWorkflowResponse = await self._call(
            self.jobs_stub.ResumeWorkflow, request, retry=False
        )
        return response.workflow

    async def pause_queue(
        self, service: str, reason: str = "", *, tenant: str = ""
    ) -> job_service_pb2.Queue:
        """Pause a queue (the jobs of one service of the caller's tenant, or
        of `tenant`): none is dispatched until resume_queue. Admins only. Not
        retried."""
        request = job_service_pb2.PauseQueueRequest(service=service, reason=reason, tenant=tenant)
        response: job_service_pb2.PauseQueueResponse = await self._call(
            self.jobs_stub.PauseQueue, request, retry=False
        )
        return response.queue

    async def resume_queue(self, service: str, *, tenant: str = "") -> job_service_pb2.Queue:
        """Resume a paused queue: its jobs are dispatched at once. Admins only. Not retried."""
        request = job_service_pb2.ResumeQueueRequest(service=service, tenant=tenant)
        response: job_service_pb2.ResumeQueueResponse = await self._call(
            self.jobs_stub.ResumeQueue, request, retry=False
        )
        return response.queue

    async def list_queues(self) -> list[job_service_pb2.Queue]:
        """The queues (tenant and service) with jobs waiting or running, and
        the paused ones: who paused them, when and why."""
        response: job_service_pb2.ListQueuesResponse = await self._call(
            self.jobs_stub.ListQueues, job_service_pb2.ListQueuesRequest(), retry=True
        )
        return list(response.queues)

    # --- schedules ------------------------------------------------------------

    async def create_schedule(
        self, schedule: schedule_service_pb2.Schedule
    ) -> schedule_service_pb2.Schedule:
        """Create a schedule (idempotent by its id: the same definition again
        returns the existing one; a different one is ALREADY_EXISTS). Retried."""
        request = schedule_service_pb2.CreateScheduleRequest(schedule=schedule)
        response: schedule_service_pb2.CreateScheduleResponse = await self._call(
            self.schedules_stub.CreateSchedule, request, retry=True
        )
        return response.schedule

    async def get_schedule(self, schedule_id: str) -> schedule_service_pb2.Schedule:
        """One schedule, with its last and next run."""
        request = schedule_service_pb2.GetScheduleRequest(schedule_id=schedule_id)
        response: schedule_service_pb2.GetScheduleResponse = await self._call(
            self.schedules_stub.GetSchedule, request, retry=True
        )
        return response.schedule

    async def list_schedules(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> Page[schedule_service_pb2.Schedule]:
        """One page of the tenant's schedules, by id."""
        request = schedule_service_pb2.ListSchedulesRequest(
            page_size=page_size, page_token=page_token
        )
        response: schedule_service_pb2.ListSchedulesResponse = await self._call(
            self.schedules_stub.ListSchedules, request, retry=True
        )
        return Page(list(response.schedules), response.next_page_token)

    def iter_schedules(self, /, **filters: Any) -> AsyncIterator[schedule_service_pb2.Schedule]:
        """Every schedule of list_schedules, page after page."""
        return _every(self.list_schedules, filters)

    async def update_schedule(
        self, schedule: schedule_service_pb2.Schedule
    ) -> schedule_service_pb2.Schedule:
        """Replace a schedule's definition (schedule.id names it). Retried: the
        same replacement twice is the same."""
        request = schedule_service_pb2.UpdateScheduleRequest(schedule=schedule)
        response: schedule_service_pb2.UpdateScheduleResponse = await self._call(
            self.schedules_stub.UpdateSchedule, request, retry=True
        )
        return response.schedule

    async def delete_schedule(self, schedule_id: str) -> None:
        """Delete a schedule (its runs are kept). Not retried: a repeat of a
        delete that did land would be NOT_FOUND."""
        request = schedule_service_pb2.DeleteScheduleRequest(schedule_id=schedule_id)
        await self._call(self.schedules_stub.DeleteSchedule, request, retry=False)

    async def pause_schedule(self, schedule_id: str) -> schedule_service_pb2.Schedule:
        """Pause a schedule (no tick fires until resumed)."""
        request = schedule_service_pb2.PauseScheduleRequest(schedule_id=schedule_id)
        response: schedule_service_pb2.PauseScheduleResponse = await self._call(
            self.schedules_stub.PauseSchedule, request, retry=True
        )
        return response.schedule

    async def resume_schedule(self, schedule_id: str) -> schedule_service_pb2.Schedule:
        """Resume a paused schedule from now."""
        request = schedule_service_pb2.ResumeScheduleRequest(schedule_id=schedule_id)
        response: schedule_service_pb2.ResumeScheduleResponse = await self._call(
            self.schedules_stub.ResumeSchedule, request, retry=True
        )
        return response.schedule

    async def trigger_schedule(
        self, schedule_id: str, *, request_id: str | None = None
    ) -> schedule_service_pb2.TriggerScheduleResponse:
        """Start the schedule's run now; the run id (and whether an earlier
        trigger of the same request_id had started it). A request id is
        generated when none is given, so the call is retried safely."""
        request = schedule_service_pb2.TriggerScheduleRequest(
            schedule_id=schedule_id, request_id=request_id or str(uuid.uuid4())
        )
        response: schedule_service_pb2.TriggerScheduleResponse = await self._call(
            self.schedules_stub.TriggerSchedule, request, retry=True
        )
        return response

    # --- rate limits (ScheduleService) -----------------------------------------

    async def create_rate_limit(
        self, key: str, count: int, per: Seconds = 1.0, *, burst: int = 0
    ) -> schedule_service_pb2.RateLimit:
        """Create a named rate limit of the caller's tenant: `count` tokens per
        `per` seconds, holding at most `burst` (0: count). Admins only."""
        request = schedule_service_pb2.CreateRateLimitRequest(
            rate_limit=_rate_limit(key, count, per, burst)
        )
        response: schedule_service_pb2.CreateRateLimitResponse = await self._call(
            self.schedules_stub.CreateRateLimit, request, retry=False
        )
        return response.rate_limit

    async def get_rate_limit(self, key: str) -> schedule_service_pb2.RateLimit:
        """One rate limit of the caller's tenant (NotFound if none)."""
        request = schedule_service_pb2.GetRateLimitRequest(key=key)
        response: schedule_service_pb2.GetRateLimitResponse = await self._call(
            self.schedules_stub.GetRateLimit, request, retry=True
        )
        return response.rate_limit

    async def list_rate_limits(self) -> list[schedule_service_pb2.RateLimit]:
        """Every rate limit of the caller's tenant, by key (all pages)."""
        found: list[schedule_service_pb2.RateLimit] = []
        token = ""
        while True:
            request = schedule_service_pb2.ListRateLimitsRequest(page_size=1000, page_token=token)
            response: schedule_service_pb2.ListRateLimitsResponse = await self._call(
                self.schedules_stub.ListRateLimits, request, retry=True
            )
            found.extend(response.rate_limits)
            token = response.next_page_token
            if not token:
                return found

    async def update_rate_limit(
        self, key: str, count: int, per: Seconds = 1.0, *, burst: int = 0
    ) -> schedule_service_pb2.RateLimit:
        """Change a limit's rate and burst (its buckets keep their tokens,
        capped at the new burst). Admins only."""
        request = schedule_service_pb2.UpdateRateLimitRequest(
            rate_limit=_rate_limit(key, count, per, burst)
        )
        response: schedule_service_pb2.UpdateRateLimitResponse = await self._call(
            self.schedules_stub.UpdateRateLimit, request, retry=True
        )
        return response.rate_limit

    async def delete_rate_limit(self, key: str) -> None:
        """Delete a limit and its buckets. Admins only."""
        request = schedule_service_pb2.DeleteRateLimitRequest(key=key)
        await self._call(self.schedules_stub.DeleteRateLimit, request, retry=False)

    async def watch_job(self, job_id: str) -> AsyncIterator[common_pb2.Job]:
        """The job now, then every change, until it ends (a lost connection is
        reopened; the first snapshot after it is the current state)."""
        request = job_service_pb2.WatchJobRequest(job_id=job_id)
        metadata = self.endpoint.metadata()
        stream = self._stream(lambda: self.jobs_stub.WatchJob(request, metadata=metadata))
        async with contextlib.aclosing(stream):
            async for response in stream:
                yield response.job

    async def watch_workflow(
        self, workflow_id: str
    ) -> AsyncIterator[job_service_pb2.WatchWorkflowResponse]:
        """The workflow now, then every change (with the step that changed), until it ends."""
        request = job_service_pb2.WatchWorkflowRequest(workflow_id=workflow_id)
        metadata = self.endpoint.metadata()
        stream = self._stream(lambda: self.jobs_stub.WatchWorkflow(request, metadata=metadata))
        async with contextlib.aclosing(stream):
            async for response in stream:
                yield response

    async def watch_runs(
        self,
        *,
        services: Sequence[str] = (),
        workflow_names: Sequence[str] = (),
        states: Sequence[int | str] = (),
        labels: Mapping[str, str] | None = None,
        kind: int | str | None = None,
        include_steps: bool = False,
        include_active: bool = False,
        keepalives: bool = False,
    ) -> AsyncIterator[job_service_pb2.WatchRunsResponse]:
        """The live feed of the tenant's runs: with `include_active`, the
        matching runs not yet ended first; then a message with `snapshot_end`
        (from there on every change is sent); then each matching run (a `job`
        or a `workflow`, BASIC view) each time its state or progress changes,
        never going back for one run. Filters: `services` (jobs of these
        services), `workflow_names`, `states` (values or names, "RUNNING"),
        `labels` (every pair must match), `kind` ("job", "workflow"; default
        both), `include_steps` (workflow steps as jobs too). Keepalives are
        left out unless `keepalives`. It never ends on its own; a lost
        connection is not reopened (changes meanwhile would be missed): it
        raises, and a new watch with include_active catches up."""
        request = job_service_pb2.WatchRunsRequest(
            services=list(services),
            workflow_names=list(workflow_names),
            states=[run_state(s) for s in states],
            labels=dict(labels or {}),
            kind=_enum(job_service_pb2.WatchRunsRequest.RunKind, "RUN_KIND_", kind),
            include_steps=include_steps,
            include_active=include_active,
        )
        call = self.jobs_stub.WatchRuns(request, metadata=self.endpoint.metadata())
        try:
            async for response in call:
                if keepalives or response.WhichOneof("kind") != "keepalive":
                    yield with_structs(response)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from err
        finally:
            call.cancel()

    async def await_job(self, job_id: str, *, timeout: Seconds | None = None) -> common_pb2.Job:
        """Wait until the job ends and return it (COMPLETED with its result, or
        FAILED, CANCELLED...: the job says how it ended). `timeout` (seconds)
        bounds the wait: past it, DeadlineExceeded (reason AWAIT_TIMEOUT); None
        waits as long as it takes. The server follows the job's changes (no
        polling); a lost connection is retried."""
        response: job_service_pb2.AwaitJobResponse = await self._await(
            self.jobs_stub.AwaitJob,
            lambda wait: job_service_pb2.AwaitJobRequest(job_id=job_id, timeout=wait),
            timeout,
        )
        return response.job

    async def await_workflow(
        self, workflow_id: str, *, timeout: Seconds | None = None
    ) -> common_pb2.Workflow:
        """Wait until the workflow ends and return it, with its outputs when it
        COMPLETED; `timeout` as in await_job."""
        response: job_service_pb2.AwaitWorkflowResponse = await self._await(
            self.jobs_stub.AwaitWorkflow,
            lambda wait: job_service_pb2.AwaitWorkflowRequest(
                workflow_id=workflow_id, timeout=wait
            ),
            timeout,
        )
        return response.workflow

    async def result(self, job_id: str, *, timeout: Seconds | None = None) -> Any:
        """The job's result as plain Python values (integers stay ints), once
        it completes: Celery's `AsyncResult.get()`, Temporal's
        `handle.result()`. Raises RunFailed when the job ended otherwise,
        DeadlineExceeded when `timeout` seconds pass first."""
        job = await self.await_job(job_id, timeout=timeout)
        if job.state != common_pb2.RUN_STATE_COMPLETED:
            raise RunFailed.of_job(job)
        return job_result(job)

    async def outputs(self, workflow_id: str, *, timeout: Seconds | None = None) -> dict[str, Any]:
        """The workflow's outputs (step name -> result, as plain Python values)
        once it completes; results too large to travel inline are fetched.
        Raises RunFailed when the workflow ended otherwise, DeadlineExceeded
        when `timeout` seconds pass first."""
        workflow = await self.await_workflow(workflow_id, timeout=timeout)
        if workflow.state != common_pb2.RUN_STATE_COMPLETED:
            raise RunFailed.of_workflow(workflow)
        out = workflow_outputs(workflow)
        for ref in workflow.output_refs:
            out[ref.step_name] = job_result(await self.get_job(ref.job_id))
        return out

    async def _await(
        self,
        method: Callable[..., Awaitable[Any]],
        request: Callable[[duration_pb2.Duration], Message],
        timeout: Seconds | None,
    ) -> Any:
        """One Await call after the other, each at most AWAIT_ROUND_S long (so
        no proxy takes a silent call for a dead one), until the run ends or
        `timeout` has passed."""
        total = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        loop = asyncio.get_running_loop()
        end = None if total is None else loop.time() + total
        delays = self.retry.delays()
        while True:
            left = AWAIT_ROUND_S if end is None else max(0.0, end - loop.time())
            wait = min(left, AWAIT_ROUND_S)
            # Zero means "no timeout" on the wire: the least wait instead.
            bound = _duration(wait) if wait > 0 else None
            try:
                return with_structs(
                    await method(
                        request(bound or duration_pb2.Duration(nanos=1)),
                        # The server answers AWAIT_TIMEOUT at `wait`; the deadline
                        # only covers a server that does not answer at all.
                        timeout=wait + AWAIT_GRACE_S,
                        metadata=self.endpoint.metadata(),
                    )
                )
            except grpc.aio.AioRpcError as err:
                error = from_rpc_error(err)
                if error.reason == "AWAIT_TIMEOUT" and (end is None or loop.time() < end):
                    delays = self.retry.delays()
                    continue  # this round ended; the wait goes on
                delay = next(delays, None) if _retryable(err) else None
                if delay is None:
                    raise error from err
                await asyncio.sleep(delay)

    # --- TraceService ---------------------------------------------------------------

    async def append_trace_events(
        self, run_id: str, events: Sequence[common_pb2.TraceEvent | Mapping[str, Any]]
    ) -> list[common_pb2.TraceEvent]:
        """Append up to 1,000 events to a run. Events without an `event_key` get a
        random one first, so the retried append of a lost answer stores nothing twice."""
        messages = [
            _required(common_pb2.TraceEvent, e, f"events[{i}]") for i, e in enumerate(events)
        ]
        for message in messages:
            if not message.event_key:
                message.event_key = _new_request_id()
        request = trace_service_pb2.AppendTraceEventsRequest(run_id=run_id, events=messages)
        response: trace_service_pb2.AppendTraceEventsResponse = await self._call(
            self.trace_stub.AppendTraceEvents, request, retry=True
        )
        return list(response.events)

    async def list_trace_events(
        self,
        /,
        run_id: str,
        *,
        cursor: str = "",
        page_size: int = 0,
        view: int | str | None = None,
        **filters: Any,
    ) -> TracePage:
        """One page of a run's events after `cursor`. Filters: min_level, category,
        node_id, type, since, until, milestones_only (enum names or values),
        min_display_priority (1 low to 10 high).
        `view` "full" returns each event whole; the default ("basic") leaves
        out data, output_summary, error.details and error.stack."""
        request = trace_service_pb2.ListTraceEventsRequest(
            run_id=run_id,
            cursor=cursor,
            page_size=page_size,
            view=_enum(trace_service_pb2.TraceEventView, "TRACE_EVENT_VIEW_", view),
            **trace_filters(**filters),
        )
        response: trace_service_pb2.ListTraceEventsResponse = await self._call(
            self.trace_stub.ListTraceEvents, request, retry=True
        )
        return TracePage(list(response.events), response.next_cursor, response.more)

    async def stream_trace_events(
        self,
        /,
        run_id: str,
        *,
        cursor: str = "",
        follow: bool = True,
        keepalives: bool = False,
        **filters: Any,
    ) -> AsyncIterator[trace_service_pb2.StreamTraceEventsResponse]:
        """Replay a run's events after `cursor`, then (with `follow`) follow it live
        until the message that carries its `final_status`. A broken connection
        is reopened from the last cursor received: no gap, no duplicate."""
        last = {"cursor": cursor}
        chosen = trace_filters(**filters)
        metadata = self.endpoint.metadata()

        def open_call() -> Any:
            request = trace_service_pb2.StreamTraceEventsRequest(
                run_id=run_id, cursor=last["cursor"], follow=follow, **chosen
            )
            return self.trace_stub.StreamTraceEvents(request, metadata=metadata)

        def seen(item: trace_service_pb2.StreamTraceEventsResponse) -> None:
            if item.cursor:
                last["cursor"] = item.cursor

        stream = self._stream(open_call, resume=seen)
        async with contextlib.aclosing(stream):  # a reader that stops early ends the call
            async for item in stream:
                if item.WhichOneof("kind") == "keepalive" and not keepalives:
                    continue
                yield item

    async def get_run_status(self, run_id: str) -> trace_service_pb2.RunStatus:
        """The status of a run (a workflow, or a standalone job): state, times,
        progress and the failure summary."""
        request = trace_service_pb2.GetRunStatusRequest(run_id=run_id)
        response: trace_service_pb2.GetRunStatusResponse = await self._call(
            self.trace_stub.GetRunStatus, request, retry=True
        )
        return response.status

    async def search_trace_events(
        self,
        query: str,
        *,
        run_id: str = "",
        min_level: int | str | None = None,
        category: int | str | None = None,
        type: int | str | None = None,
        service: str = "",
        since: When | None = None,
        until: When | None = None,
        page_size: int = 0,
        page_token: str = "",
        view: int | str | None = None,
    ) -> Page[trace_service_pb2.TraceEventHit]:
        """One page of the trace events whose message or user message match
        `query`, across every run the caller may read (or only `run_id`),
        newest stored first; each hit has its run id, the event and a snippet
        with every match between « and ». The syntax: words (all must match),
        "a phrase", a OR b, -excluded, prefix*. Filters: min_level, category,
        type (enum names or values), service (of the job the event is about),
        since/until (the event's time). `view` "full" returns each event whole."""
        request = trace_service_pb2.SearchTraceEventsRequest(
            query=query,
            page_size=page_size,
            page_token=page_token,
            run_id=run_id,
            min_level=_enum(common_pb2.Level, "LEVEL_", min_level),
            category=_enum(common_pb2.Category, "CATEGORY_", category),
            type=_enum(common_pb2.TraceEventType, "TRACE_EVENT_TYPE_", type),
            service=service,
            since=_timestamp(since),
            until=_timestamp(until),
            view=_enum(trace_service_pb2.TraceEventView, "TRACE_EVENT_VIEW_", view),
        )
        response: trace_service_pb2.SearchTraceEventsResponse = await self._call(
            self.trace_stub.SearchTraceEvents, request, retry=True
        )
        return Page(list(response.hits), response.next_page_token)

    def iter_search_trace_events(
        self, query: str, /, **filters: Any
    ) -> AsyncIterator[trace_service_pb2.TraceEventHit]:
        """Every hit of search_trace_events with these filters, page after page."""
        return _every(self.search_trace_events, {"query": query, **filters})

    async def get_run_summary(
        self, run_id: str = "", *, workflow_name: str = "", recent_runs: int = 0
    ) -> trace_service_pb2.GetRunSummaryResponse:
        """A run's summary, counted by the server: events by level, type and
        node (step), milestones, timeline, and each step's attempts and
        failures. Give a `run_id`, or a `workflow_name`: then its newest run
        is summarised and `recent_runs` lists up to that many runs before it
        (0: 10; at most 100), newest first."""
        request = trace_service_pb2.GetRunSummaryRequest(
            run_id=run_id, workflow_name=workflow_name, recent_runs=recent_runs
        )
        response: trace_service_pb2.GetRunSummaryResponse = await self._call(
            self.trace_stub.GetRunSummary, request, retry=True
        )
        return response

    async def export_trace(
        self, run_id: str, *, page_size: int = 1000, **filters: Any
    ) -> AsyncIterator[common_pb2.TraceEvent]:
        """Every event of a run (each whole, FULL view), in sequence order,
        page after page through ListTraceEvents: one page in memory at a
        time, whatever the run's length. Filters as list_trace_events."""
        cursor = ""
        while True:
            page = await self.list_trace_events(
                run_id, cursor=cursor, page_size=page_size, view="full", **filters
            )
            for event in page.events:
                yield event
            cursor = page.next_cursor or cursor
            if not page.more:
                return

    # --- AttestationService ------------------------------------------------------------

    async def get_attestation(self, key: str) -> attestation_service_pb2.Attestation:
        """One attestation by key (e.g. "workflow-completion:wf_..."); see
        export_attestation for its DSSE envelope and verify_offline to check one."""
        request = attestation_service_pb2.GetAttestationRequest(key=key)
        response: attestation_service_pb2.GetAttestationResponse = await self._call(
            self.attest_stub.GetAttestation, request, retry=True
        )
        return response.attestation

    async def export_attestation(self, key: str) -> dict[str, Any]:
        """The attestation as a DSSE envelope (in-toto Statement) in its standard
        JSON form, for `jobtrace attest verify` and other supply-chain verifiers."""
        request = attestation_service_pb2.GetAttestationRequest(key=key, include_envelope=True)
        response: attestation_service_pb2.GetAttestationResponse = await self._call(
            self.attest_stub.GetAttestation, request, retry=True
        )
        return envelope_json(response.envelope)

    async def list_attestations(
        self,
        *,
        workflow_id: str = "",
        job_id: str = "",
        type: int | str | None = None,
        state: int | str | None = None,
        service: str = "",
        user_id: str = "",
        worker_id: str = "",
        since: When | None = None,
        until: When | None = None,
        page_size: int = 0,
        page_token: str = "",
        view: int | str | None = None,
    ) -> Page[attestation_service_pb2.Attestation]:
        """Attestations in the order they were written, filtered; `type` is an
        AttestationType value or name ("workflow_completion",
        "WORKER_FAILURE"), `state` the attested run's RunState ("FAILED");
        `user_id` the request context's user; written in [`since`, `until`).
        `view` "full" returns each whole; the default ("basic") leaves out data."""
        request = attestation_service_pb2.ListAttestationsRequest(
            workflow_id=workflow_id,
            job_id=job_id,
            type=_enum(attestation_service_pb2.AttestationType, "ATTESTATION_TYPE_", type),
            state=run_state(state),
            service=service,
            user_id=user_id,
            worker_id=worker_id,
            since=_timestamp(since),
            until=_timestamp(until),
            page_size=page_size,
            page_token=page_token,
            view=_enum(attestation_service_pb2.AttestationView, "ATTESTATION_VIEW_", view),
        )
        response: attestation_service_pb2.ListAttestationsResponse = await self._call(
            self.attest_stub.ListAttestations, request, retry=True
        )
        return Page(list(response.attestations), response.next_page_token)

    def iter_attestations(
        self, /, **filters: Any
    ) -> AsyncIterator[attestation_service_pb2.Attestation]:
        """Every attestation matching the filters of list_attestations, page after page."""
        return _every(self.list_attestations, filters)

    async def verify_attestation(
        self, key: str
    ) -> attestation_service_pb2.VerifyAttestationResponse:
        """The server's verdict on a stored attestation: digest, signature, its
        place in the hash chain and the annotations it covers."""
        request = attestation_service_pb2.VerifyAttestationRequest(key=key)
        response: attestation_service_pb2.VerifyAttestationResponse = await self._call(
            self.attest_stub.VerifyAttestation, request, retry=True
        )
        return response

    async def get_signing_keys(self) -> list[attestation_service_pb2.SigningKey]:
        """The server's public signing keys (active and retired), for
        verify_offline."""
        request = attestation_service_pb2.GetSigningKeysRequest()
        response: attestation_service_pb2.GetSigningKeysResponse = await self._call(
            self.attest_stub.GetSigningKeys, request, retry=True
        )
        return list(response.keys)

    async def attach_annotations(
        self,
        run_id: str,
        attributes: Mapping[str, Any],
        *,
        actor: common_pb2.Actor | Mapping[str, Any] | None = None,
        job_id: str = "",
        attempt: int = 0,
        scope: int | str | None = None,
        scope_id: str = "",
        payload: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        emit_event: bool = False,
    ) -> list[common_pb2.Annotation]:
        """Attach key/value provenance to a run (or one job and attempt). Idempotent
        by `idempotency_key` (a random one when not given): a retry returns the
        annotations already stored. jobtrace.conventions names the typed keys
        and builds checked attributes (`conventions.decision(outcome=...)`)."""
        request = attestation_service_pb2.AttachAnnotationsRequest(
            run_id=run_id,
            job_id=job_id,
            attempt=attempt,
            scope=_enum(common_pb2.AnnotationScope, "ANNOTATION_SCOPE_", scope),
            scope_id=scope_id,
            actor=_message(common_pb2.Actor, actor, "actor"),
            attributes={k: _value(v, f"attributes[{k!r}]") for k, v in attributes.items()},
            payload=_struct(payload),
            idempotency_key=idempotency_key or _new_request_id(),
            emit_event=emit_event,
        )
        response: attestation_service_pb2.AttachAnnotationsResponse = await self._call(
            self.attest_stub.AttachAnnotations, request, retry=True
        )
        return list(response.annotations)

    async def list_annotations(
        self,
        run_id: str = "",
        *,
        key: str = "",
        key_prefix: str = "",
        actor_id: str = "",
        actor_kind: int | str | None = None,
        recorded_by: str = "",
        since: When | None = None,
        until: When | None = None,
        job_id: str = "",
        attempt: int = 0,
        scope: int | str | None = None,
        value_equals: str | float | bool | None = None,
        value_min: float | None = None,
        value_max: float | None = None,
        page_size: int = 0,
        page_token: str = "",
        view: int | str | None = None,
    ) -> Page[common_pb2.Annotation]:
        """One page of a run's annotations, oldest first, or without `run_id`
        of every run the caller may read, newest first. `value_equals` matches
        a scalar value; `value_min`/`value_max` bound numeric values
        (inclusive). `view` "full" returns each whole, the default ("basic")
        without its payload."""
        request = attestation_service_pb2.ListAnnotationsRequest(
            run_id=run_id,
            key=key,
            key_prefix=key_prefix,
            actor_id=actor_id,
            actor_kind=_enum(common_pb2.ActorKind, "ACTOR_KIND_", actor_kind),
            recorded_by=recorded_by,
            since=_timestamp(since),
            until=_timestamp(until),
            job_id=job_id,
            attempt=attempt,
            scope=_enum(common_pb2.AnnotationScope, "ANNOTATION_SCOPE_", scope),
            value_equals=None if value_equals is None else _value(value_equals, "value_equals"),
            value_min=value_min,
            value_max=value_max,
            page_size=page_size,
            page_token=page_token,
            view=_enum(attestation_service_pb2.AnnotationView, "ANNOTATION_VIEW_", view),
        )
        response: attestation_service_pb2.ListAnnotationsResponse = await self._call(
            self.attest_stub.ListAnnotations, request, retry=True
        )
        return Page(list(response.annotations), response.next_page_token)

    def iter_annotations(self, /, **filters: Any) -> AsyncIterator[common_pb2.Annotation]:
        """Every annotation matching the filters of list_annotations, page after page."""
        return _every(self.list_annotations, filters)

    # --- WorkerService: the fleet ---------------------------------------------------

    async def list_workers(
        self,
        *,
        service: str = "",
        labels: Mapping[str, str] | None = None,
        draining: bool | None = None,
        holding_job: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[worker_service_pb2.ConnectedWorker]:
        """One page of the connected workers of the whole fleet (every replica)
        that the caller's tenant may use, in the order they connected. Every
        filter given must match: a service they run, labels they carry (all
        pairs), draining or not (None: either), the job they hold."""
        request = worker_service_pb2.ListWorkersRequest(
            filter=worker_filter(service, labels, draining, holding_job),
            page_size=page_size,
            page_token=page_token,
        )
        response: worker_service_pb2.ListWorkersResponse = await self._call(
            self.workers_stub.ListWorkers, request, retry=True
        )
        return Page(list(response.workers), response.next_page_token)

    def iter_workers(self, /, **filters: Any) -> AsyncIterator[worker_service_pb2.ConnectedWorker]:
        """Every worker matching the filters of list_workers, page after page."""
        return _every(self.list_workers, filters)

    async def watch_workers(
        self,
        *,
        service: str = "",
        labels: Mapping[str, str] | None = None,
        draining: bool | None = None,
        holding_job: str = "",
        keepalives: bool = False,
    ) -> AsyncIterator[worker_service_pb2.WatchWorkersResponse]:
        """The matching workers now (changes of type PRESENT, then
        `snapshot_done`), then every change: CONNECTED, UPDATED, DISCONNECTED,
        EXPIRED (its replica died), UNMATCHED (it left the filter). Runs until
        the caller stops reading; a lost connection is reopened and starts over
        with a fresh snapshot. Filters as in list_workers."""
        request = worker_service_pb2.WatchWorkersRequest(
            filter=worker_filter(service, labels, draining, holding_job)
        )
        metadata = self.endpoint.metadata()
        stream = self._stream(lambda: self.workers_stub.WatchWorkers(request, metadata=metadata))
        async with contextlib.aclosing(stream):
            async for item in stream:
                if item.WhichOneof("kind") == "keepalive" and not keepalives:
                    continue
                yield item


async def _every(
    list_page: Callable[..., Awaitable[Page[T]]], filters: dict[str, Any]
) -> AsyncIterator[T]:
    token = ""
    while True:
        page = await list_page(page_token=token, **filters)
        for item in page.items:
            yield item
        if not page.next_page_token:
            return
        token = page.next_page_token


# --- reading results ----------------------------------------------------------------


def with_structs(message: M) -> M:
    """The message with the Struct twin of each exact JSON field filled in.
    The client asks for exact JSON (metadata `jobtrace-json: exact`) and the
    server sends one form only; code that reads `job.result` or
    `job.spec.payload` keeps working, and `job_result(job)` reads the exact
    form (integers as ints)."""
    for field, value in message.ListFields():
        if field.type == field.TYPE_MESSAGE:
            kind = field.message_type
            if kind is None or kind.full_name.startswith("google.protobuf."):
                continue
            if isinstance(value, Message):
                with_structs(value)
            elif not kind.GetOptions().map_entry:  # repeated (a map's values are left)
                for item in value:
                    with_structs(item)
        elif field.type == field.TYPE_BYTES and field.name.endswith("_json"):
            twin = field.name.removesuffix("_json")
            if twin in message.DESCRIPTOR.fields_by_name and not message.HasField(twin):
                getattr(message, twin).update(json.loads(value))
    return message


def plain_json(exact: bytes, struct: struct_pb2.Struct | None) -> Any:
    """A JSON value as plain Python: from its exact JSON when the server sent
    it (integers stay ints), else from the Struct (whose numbers are floats)."""
    if exact:
        return json.loads(exact)
    if struct is None:
        return None
    return json_format.MessageToDict(struct)


def job_result(job: common_pb2.Job) -> Any:
    """A job's result as plain Python values (None before it completes)."""
    if not job.result_json and not job.HasField("result"):
        return None
    return plain_json(job.result_json, job.result)


def job_payload(job: common_pb2.Job) -> dict[str, Any]:
    """A job's payload as plain Python values (integers stay ints)."""
    spec = job.spec
    return plain_json(spec.payload_json, spec.payload) or {}


def workflow_outputs(workflow: common_pb2.Workflow) -> dict[str, Any]:
    """The outputs a workflow carries inline (step name -> result); the steps
    in `workflow.output_refs` are not among them (see Client.outputs)."""
    if not workflow.outputs_json and not workflow.HasField("outputs"):
        return {}
    return plain_json(workflow.outputs_json, workflow.outputs) or {}


# --- building requests --------------------------------------------------------------


def job_spec(
    service: str,
    payload: Mapping[str, Any] | None = None,
    *,
    priority: int = 0,
    max_attempts: int = 0,
    timeout: Seconds | None = None,
    not_before: When | None = None,
    affinity_keys: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
    backoff: common_pb2.BackoffPolicy | None = None,
    worker_labels: Sequence[common_pb2.LabelRequirement | str] = (),
    affinity: Mapping[str, float] = NO_AFFINITY,
    rate_limits: Sequence[common_pb2.RateLimitUse | str] = (),
    concurrency: common_pb2.ConcurrencyKey | str | None = None,
) -> common_pb2.JobSpec:
    """A JobSpec from plain Python values; the payload travels as exact JSON
    (payload_json), so integers stay integers. `worker_labels`: requirements
    (`label_requirement`), a string being a required one ("gpu=a100",
    "vram_gb>=40"); `affinity`: cache keys by weight; `rate_limits` and
    `concurrency`: see `rate_limit_use` and `concurrency_key`."""
    return common_pb2.JobSpec(
        rate_limits=[rate_limit_use(u) if isinstance(u, str) else u for u in rate_limits],
        concurrency=concurrency_key(concurrency) if isinstance(concurrency, str) else concurrency,
        worker_labels=[parse_requirement(r) if isinstance(r, str) else r for r in worker_labels],
        affinity=[common_pb2.AffinityWeight(key=k, weight=w) for k, w in affinity.items()],
        service=service,
        payload_json=_exact(payload),
        priority=priority,
        max_attempts=max_attempts,
        timeout=_duration(timeout),
        not_before=_timestamp(not_before),
        affinity_keys=list(affinity_keys),
        labels=dict(labels or {}),
        backoff=backoff,
    )


_UNITS_RE = re.compile(r"(?s)(.+):([0-9]+)")
_STRATEGIES = {
    "queue": common_pb2.ConcurrencyKey.STRATEGY_QUEUE,
    "cancel_newest": common_pb2.ConcurrencyKey.STRATEGY_CANCEL_NEWEST,
    "cancel_oldest": common_pb2.ConcurrencyKey.STRATEGY_CANCEL_OLDEST,
}


def rate_limit_use(text: str) -> common_pb2.RateLimitUse:
    """A job's use of a named rate limit from text: "KEY[@PARTITION][:UNITS]",
    for example "openai", "openai:2", "openai@{user_id}" (a bucket per user:
    the partition template is resolved from the payload by the server)."""
    units = 0
    m = _UNITS_RE.fullmatch(text)
    if m is not None:
        text, units = m.group(1), int(m.group(2))
    key, _, partition = text.partition("@")
    return common_pb2.RateLimitUse(key=key, units=units, partition=partition)


def concurrency_key(text: str) -> common_pb2.ConcurrencyKey:
    """A concurrency key from text: "KEY:MAX[:STRATEGY]", STRATEGY one of
    queue (the default), cancel_newest, cancel_oldest; the KEY template
    ("user:{user_id}") is resolved from the payload by the server."""
    strategy = common_pb2.ConcurrencyKey.STRATEGY_UNSPECIFIED
    head, _, last = text.rpartition(":")
    if head and last.lower() in _STRATEGIES:
        strategy, text = _STRATEGIES[last.lower()], head
    m = _UNITS_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r}: expected KEY:MAX[:STRATEGY], e.g. 'user:{{user_id}}:1'")
    return common_pb2.ConcurrencyKey(key=m.group(1), max_running=int(m.group(2)), strategy=strategy)


_COMPARATORS = {
    "=": common_pb2.COMPARATOR_EQUAL,
    "==": common_pb2.COMPARATOR_EQUAL,
    "!=": common_pb2.COMPARATOR_NOT_EQUAL,
    ">": common_pb2.COMPARATOR_GREATER,
    ">=": common_pb2.COMPARATOR_AT_LEAST,
    "<": common_pb2.COMPARATOR_LESS,
    "<=": common_pb2.COMPARATOR_AT_MOST,
}
_REQUIREMENT_RE = re.compile(r"(?s)(.+?)(==|!=|>=|<=|=|>|<)(.*)")


def label_requirement(
    key: str,
    value: str | float,
    comparator: str = "=",
    *,
    required: bool = True,
    weight: float = 0.0,
) -> common_pb2.LabelRequirement:
    """A worker label a job requires (`required`) or prefers (adding `weight`,
    0 meaning 1, to the score of a worker where it holds). `comparator` is
    one of = != > >= < <= (the ordering ones need a number `value`)."""
    if comparator not in _COMPARATORS:
        raise ValueError(f"unknown comparator {comparator!r} (one of {' '.join(_COMPARATORS)})")
    v = (
        struct_pb2.Value(string_value=value)
        if isinstance(value, str)
        else struct_pb2.Value(number_value=float(value))
    )
    return common_pb2.LabelRequirement(
        key=key,
        value=v,
        comparator=_COMPARATORS[comparator],
        required=required,
        weight=weight,
    )


def parse_requirement(
    text: str, *, required: bool = True, weight: float = 0.0
) -> common_pb2.LabelRequirement:
    """A requirement as written: "gpu=a100", "zone!=eu", "vram_gb>=40". With =
    and != the value is a string; with > >= < <= it must be a number."""
    m = _REQUIREMENT_RE.fullmatch(text.strip())
    if m is None or not m.group(1).strip():
        raise ValueError(f"not a label requirement: {text!r} (e.g. gpu=a100 or vram_gb>=40)")
    key, op, raw = m.group(1).strip(), m.group(2), m.group(3).strip()
    if op in ("=", "==", "!="):
        return label_requirement(key, raw, op, required=required, weight=weight)
    try:
        number = float(raw)
    except ValueError:
        raise ValueError(f"{text!r}: {op} compares numbers, {raw!r} is not one") from None
    return label_requirement(key, number, op, required=required, weight=weight)


def worker_filter(
    service: str = "",
    labels: Mapping[str, str] | None = None,
    draining: bool | None = None,
    holding_job: str = "",
) -> worker_service_pb2.WorkerFilter:
    """The WorkerFilter of list_workers and watch_workers."""
    chosen = {
        None: worker_service_pb2.DRAINING_FILTER_UNSPECIFIED,
        True: worker_service_pb2.DRAINING_FILTER_DRAINING,
        False: worker_service_pb2.DRAINING_FILTER_NOT_DRAINING,
    }[draining]
    return worker_service_pb2.WorkerFilter(
        service=service, labels=dict(labels or {}), draining=chosen, holding_job=holding_job
    )


def run_state(value: int | str | None) -> Any:
    """A RunState from its value or name ("RUNNING", "RUN_STATE_RUNNING", "running")."""
    return _enum(common_pb2.RunState, "RUN_STATE_", value)


def trace_filters(
    *,
    min_level: int | str | None = None,
    category: int | str | None = None,
    node_id: str = "",
    type: int | str | None = None,
    since: When | None = None,
    until: When | None = None,
    milestones_only: bool = False,
    min_display_priority: int = 0,
) -> dict[str, Any]:
    """The filter fields shared by ListTraceEvents and StreamTraceEvents.
    `min_display_priority` keeps events at least this prominent (1 low to 10
    high; 0 keeps all)."""
    return {
        "min_level": _enum(common_pb2.Level, "LEVEL_", min_level),
        "category": _enum(common_pb2.Category, "CATEGORY_", category),
        "node_id": node_id,
        "type": _enum(common_pb2.TraceEventType, "TRACE_EVENT_TYPE_", type),
        "since": _timestamp(since),
        "until": _timestamp(until),
        "milestones_only": milestones_only,
        "min_display_priority": min_display_priority,
    }


def envelope_json(envelope: attestation_service_pb2.DsseEnvelope) -> dict[str, Any]:
    """A DSSE envelope in its standard JSON form (base64 payload and signatures)."""
    import base64

    return {
        "payloadType": envelope.payload_type,
        "payload": base64.b64encode(envelope.payload).decode(),
        "signatures": [
            {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode()} for s in envelope.signatures
        ],
    }


def _enum(enum: Any, prefix: str, value: int | str | None) -> Any:
    """An enum value from its number or its name, with or without the prefix."""
    if value is None or value == "":
        return 0
    if isinstance(value, int):
        return value
    name = value.strip().upper()
    if not name.startswith(prefix):
        name = prefix + name
    try:
        return int(enum.Value(name))
    except ValueError:
        known = ", ".join(n.removeprefix(prefix) for n in enum.keys()[1:])
        raise ValueError(
            f"unknown {prefix.rstrip('_').lower()} {value!r} (one of {known})"
        ) from None


def _message(kind: type[M], value: M | Mapping[str, Any] | None, path: str) -> M | None:
    """A message from itself or from its JSON form (a mapping), checked with field
    paths under `path` (see jobtrace.client.inputs)."""
    if value is None:
        return None
    return message_from(kind, value, path)


def _required(kind: type[M], value: M | Mapping[str, Any], path: str) -> M:
    return message_from(kind, value, path)


def _exact(value: Mapping[str, Any] | None) -> bytes:
    """A payload as exact JSON; InvalidInput (field `payload`) if JSON cannot hold it."""
    if value is None:
        return b""
    try:
        return json.dumps(dict(value), separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidInput([FieldViolation("payload", f"not JSON: {exc}")]) from None


def _struct(value: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    if value is None:
        return None
    struct = struct_pb2.Struct()
    struct.update(value)
    return struct


def _value(value: Any, path: str) -> struct_pb2.Value:
    if isinstance(value, struct_pb2.Value):
        return value
    return message_from(struct_pb2.Value, value, path)


def _rate_limit(key: str, count: int, per: Seconds, burst: int) -> schedule_service_pb2.RateLimit:
    return schedule_service_pb2.RateLimit(key=key, count=count, period=_duration(per), burst=burst)


def _duration(value: Seconds | None) -> duration_pb2.Duration | None:
    if value is None:
        return None
    d = duration_pb2.Duration()
    d.FromTimedelta(value if isinstance(value, timedelta) else timedelta(seconds=value))
    return d


def _timestamp(value: When | None) -> timestamp_pb2.Timestamp | None:
    if value is None or isinstance(value, timestamp_pb2.Timestamp):
        return value
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


# The keys of a flat bulk job item that belong to SubmitJobRequest, not JobSpec.
_REQUEST_KEYS = ("request_id", "requestId", "request_context", "requestContext", "annotations")


def bulk_job_requests(
    items: Sequence[job_service_pb2.SubmitJobRequest | Mapping[str, Any]],
) -> list[job_service_pb2.SubmitJobRequest]:
    """submit_jobs' items as SubmitJobRequests (see there), each with a
    request_id; InvalidInput naming every bad field by its item
    (`items[3].servce: unknown field`) when any is malformed."""
    inputs = Inputs()
    out: list[job_service_pb2.SubmitJobRequest] = []
    for i, item in enumerate(items):
        path = f"items[{i}]"
        if isinstance(item, job_service_pb2.SubmitJobRequest) or (
            isinstance(item, Mapping) and "job" in item
        ):
            request = inputs.message(job_service_pb2.SubmitJobRequest, item, path)
        elif isinstance(item, Mapping):
            spec = {k: v for k, v in item.items() if k not in _REQUEST_KEYS}
            outer = {k: v for k, v in item.items() if k in _REQUEST_KEYS}
            request = inputs.message(job_service_pb2.SubmitJobRequest, outer, path)
            request.job.CopyFrom(inputs.message(common_pb2.JobSpec, spec, path))
        else:
            inputs.violations.append(
                FieldViolation(
                    path, f"must be a mapping or a SubmitJobRequest, got {type(item).__name__}"
                )
            )
            request = job_service_pb2.SubmitJobRequest()
        if not request.request_id:
            request.request_id = _new_request_id()
        out.append(request)
    inputs.done()
    return out


_ITEM_INDEX = re.compile(r"items\[(\d+)\]")


def _shifted(err: JobtraceError, start: int, count: int) -> JobtraceError:
    """A bulk call's error with the items it names counted from the start of
    the caller's input, not of the call's chunk."""

    def shift(text: str) -> str:
        return _ITEM_INDEX.sub(lambda m: f"items[{int(m.group(1)) + start}]", text)

    shifted = JobtraceError.__new__(type(err))
    JobtraceError.__init__(
        shifted,
        err.code,
        f"items {start}-{start + count - 1}: {shift(err.message)}",
        reason=err.reason,
        metadata={**err.metadata, "first_item": str(start)},
        violations=tuple(FieldViolation(shift(v.field), v.description) for v in err.violations),
    )
    return shifted


def _new_request_id() -> str:
    return uuid.uuid4().hex


def _retryable(err: grpc.aio.AioRpcError) -> bool:
    return bool(err.code() == grpc.StatusCode.UNAVAILABLE)


def _bulk_filter(
    kind: int | str | None,
    states: Sequence[int | str],
    service: str,
    workflow_name: str,
    labels: Mapping[str, str] | None,
    user_id: str,
    created_after: When | None,
    created_before: When | None,
    include_steps: bool,
) -> job_service_pb2.BulkRunFilter:
    """A bulk operation's filter (cancel_runs, rerun_runs)."""
    return job_service_pb2.BulkRunFilter(
        kind=_enum(job_service_pb2.WatchRunsRequest.RunKind, "RUN_KIND_", kind),
        states=[run_state(s) for s in states],
        service=service,
        workflow_name=workflow_name,
        labels=dict(labels or {}),
        user_id=user_id,
        created_after=_timestamp(created_after),
        created_before=_timestamp(created_before),
        include_steps=include_steps,
    )
