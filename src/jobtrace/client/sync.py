"""The blocking client: the asyncio Client run on a private event loop thread.

with SyncClient("127.0.0.1:50051") as jt:
    job = jt.submit_job("resize", {"image": "cat.png"})
    for snapshot in jt.watch_job(job.id):
        print(snapshot.state)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from opentelemetry import context as otel_context

from jobtrace.client.api import (
    MAX_BULK_JOBS,
    MAX_BULK_WORKFLOWS,
    NO_AFFINITY,
    Client,
    Page,
    RetryPolicy,
    Seconds,
    TracePage,
    When,
)
from jobtrace.client.channel import Endpoint
from jobtrace.pb import (
    attestation_service_pb2,
    common_pb2,
    job_service_pb2,
    schedule_service_pb2,
    trace_service_pb2,
    worker_service_pb2,
)

R = TypeVar("R")


class SyncClient:
    """Every method of `Client`, blocking, with the same parameters; streams are
    plain iterators. Takes the same arguments as Client. Safe to share between
    threads. (tests/test_typed.py checks that it keeps up with Client.)"""

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
        self._start(
            Client(
                target,
                token=token,
                tls=tls,
                ca_file=ca_file,
                client_cert_file=client_cert_file,
                client_key_file=client_key_file,
                endpoint=endpoint,
                timeout=timeout,
                retry=retry,
            )
        )

    @classmethod
    def from_env(cls, **options: Any) -> SyncClient:
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

        # The caller's OpenTelemetry context (its current span) goes with the
        # call to the loop thread, so the call's metadata carries it.
        caller = otel_context.get_current()

        async def run() -> R:
            token = otel_context.attach(caller)
            try:
                return await step
            finally:
                otel_context.detach(token)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def _iterate(self, items: AsyncIterator[R]) -> Iterator[R]:
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

    def close(self) -> None:
        """Close the client: its channel, then its event loop thread."""
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

    def submit_job(
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
        return self._run(
            self.client.submit_job(
                service,
                payload,
                request_id=request_id,
                priority=priority,
                max_attempts=max_attempts,
                timeout=timeout,
                not_before=not_before,
                affinity_keys=affinity_keys,
                labels=labels,
                backoff=backoff,
                request_context=request_context,
                annotations=annotations,
                traceparent=traceparent,
                worker_labels=worker_labels,
                affinity=affinity,
                rate_limits=rate_limits,
                concurrency=concurrency,
            )
        )

    def submit_workflow(
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
        return self._run(
            self.client.submit_workflow(
                name,
                steps,
                request_id=request_id,
                priority=priority,
                labels=labels,
                request_context=request_context,
                annotations=annotations,
                traceparent=traceparent,
                outputs=outputs,
                timeout=timeout,
            )
        )

    def get_job(self, job_id: str) -> common_pb2.Job:
        return self._run(self.client.get_job(job_id))

    def get_workflow(self, workflow_id: str) -> common_pb2.Workflow:
        return self._run(self.client.get_workflow(workflow_id))

    def summarize_failures(
        self, since: When, *, until: When | None = None, service: str = ""
    ) -> list[job_service_pb2.FailureGroup]:
        return self._run(self.client.summarize_failures(since, until=until, service=service))

    def list_jobs(
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
        return self._run(
            self.client.list_jobs(
                state=state,
                service=service,
                workflow_id=workflow_id,
                labels=labels,
                user_id=user_id,
                worker_id=worker_id,
                created_after=created_after,
                created_before=created_before,
                include_total=include_total,
                page_size=page_size,
                page_token=page_token,
                view=view,
                parent_run_id=parent_run_id,
                root_run_id=root_run_id,
            )
        )

    def iter_jobs(self, /, **filters: Any) -> Iterator[common_pb2.Job]:
        return self._iterate(self.client.iter_jobs(**filters))

    def list_workflows(
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
        return self._run(
            self.client.list_workflows(
                state=state,
                name=name,
                labels=labels,
                user_id=user_id,
                created_after=created_after,
                created_before=created_before,
                include_total=include_total,
                page_size=page_size,
                page_token=page_token,
                view=view,
                parent_run_id=parent_run_id,
                root_run_id=root_run_id,
            )
        )

    def iter_workflows(self, /, **filters: Any) -> Iterator[common_pb2.Workflow]:
        return self._iterate(self.client.iter_workflows(**filters))

    def cancel_job(self, job_id: str, reason: str = "") -> common_pb2.Job:
        return self._run(self.client.cancel_job(job_id, reason))

    def cancel_workflow(self, workflow_id: str, reason: str = "") -> common_pb2.Workflow:
        return self._run(self.client.cancel_workflow(workflow_id, reason))

    def terminate_job(self, job_id: str, reason: str = "") -> common_pb2.Job:
        return self._run(self.client.terminate_job(job_id, reason))

    def terminate_workflow(self, workflow_id: str, reason: str = "") -> common_pb2.Workflow:
        return self._run(self.client.terminate_workflow(workflow_id, reason))

    def rerun_workflow(
        self,
        workflow_id: str,
        *,
        from_steps: Sequence[str] = (),
        failed_only: bool = False,
        reason: str = "",
        request_id: str | None = None,
        traceparent: str | None = None,
    ) -> common_pb2.Workflow:
        return self._run(
            self.client.rerun_workflow(
                workflow_id,
                from_steps=from_steps,
                failed_only=failed_only,
                reason=reason,
                request_id=request_id,
                traceparent=traceparent,
            )
        )

    def rerun_job(
        self,
        job_id: str,
        *,
        reason: str = "",
        request_id: str | None = None,
        traceparent: str | None = None,
    ) -> common_pb2.Job:
        return self._run(
            self.client.rerun_job(
                job_id, reason=reason, request_id=request_id, traceparent=traceparent
            )
        )

    def submit_jobs(
        self,
        items: Sequence[job_service_pb2.SubmitJobRequest | Mapping[str, Any]],
        *,
        chunk: int = MAX_BULK_JOBS,
        concurrency: int = 4,
        traceparent: str | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[job_service_pb2.SubmitJobResult]:
        """Client.submit_jobs (on_progress is called on the client's thread)."""
        return self._run(
            self.client.submit_jobs(
                items,
                chunk=chunk,
                concurrency=concurrency,
                traceparent=traceparent,
                on_progress=on_progress,
            )
        )

    def submit_workflows(
        self,
        items: Sequence[job_service_pb2.SubmitWorkflowRequest | Mapping[str, Any]],
        *,
        chunk: int = MAX_BULK_WORKFLOWS,
        concurrency: int = 4,
        traceparent: str | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[job_service_pb2.SubmitWorkflowResult]:
        """Client.submit_workflows."""
        return self._run(
            self.client.submit_workflows(
                items,
                chunk=chunk,
                concurrency=concurrency,
                traceparent=traceparent,
                on_progress=on_progress,
            )
        )

    def cancel_runs(
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
        """Client.cancel_runs."""
        return self._run(
            self.client.cancel_runs(
                kind=kind,
                states=states,
                service=service,
                workflow_name=workflow_name,
                labels=labels,
                user_id=user_id,
                created_after=created_after,
                created_before=created_before,
                include_steps=include_steps,
                dry_run=dry_run,
                reason=reason,
                request_id=request_id,
                limit=limit,
                page_size=page_size,
                until_done=until_done,
            )
        )

    def rerun_runs(
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
        """Client.rerun_runs."""
        return self._run(
            self.client.rerun_runs(
                kind=kind,
                states=states,
                service=service,
                workflow_name=workflow_name,
                labels=labels,
                user_id=user_id,
                created_after=created_after,
                created_before=created_before,
                failed_only=failed_only,
                dry_run=dry_run,
                reason=reason,
                request_id=request_id,
                limit=limit,
                page_size=page_size,
                until_done=until_done,
            )
        )

    def approve_step(
        self, workflow_id: str, step: str, *, approve: bool = True, comment: str = ""
    ) -> job_service_pb2.ApproveStepResponse:
        return self._run(
            self.client.approve_step(workflow_id, step, approve=approve, comment=comment)
        )

    def list_pending_approvals(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> Page[job_service_pb2.PendingApproval]:
        return self._run(
            self.client.list_pending_approvals(page_size=page_size, page_token=page_token)
        )

    def iter_pending_approvals(
        self, /, **filters: Any
    ) -> Iterator[job_service_pb2.PendingApproval]:
        return self._iterate(self.client.iter_pending_approvals(**filters))

    def pause_workflow(self, workflow_id: str, reason: str = "") -> common_pb2.Workflow:
        return self._run(self.client.pause_workflow(workflow_id, reason))

    def resume_workflow(self, workflow_id: str) -> common_pb2.Workflow:
        return self._run(self.client.resume_workflow(workflow_id))

    def pause_queue(
        self, service: str, reason: str = "", *, tenant: str = ""
    ) -> job_service_pb2.Queue:
        return self._run(self.client.pause_queue(service, reason, tenant=tenant))

    def resume_queue(self, service: str, *, tenant: str = "") -> job_service_pb2.Queue:
        return self._run(self.client.resume_queue(service, tenant=tenant))

    def list_queues(self) -> list[job_service_pb2.Queue]:
        return self._run(self.client.list_queues())

    def create_schedule(
        self, schedule: schedule_service_pb2.Schedule
    ) -> schedule_service_pb2.Schedule:
        return self._run(self.client.create_schedule(schedule))

    def get_schedule(self, schedule_id: str) -> schedule_service_pb2.Schedule:
        return self._run(self.client.get_schedule(schedule_id))

    def list_schedules(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> Page[schedule_service_pb2.Schedule]:
        return self._run(self.client.list_schedules(page_size=page_size, page_token=page_token))

    def iter_schedules(self, /, **filters: Any) -> Iterator[schedule_service_pb2.Schedule]:
        return self._iterate(self.client.iter_schedules(**filters))

    def update_schedule(
        self, schedule: schedule_service_pb2.Schedule
    ) -> schedule_service_pb2.Schedule:
        return self._run(self.client.update_schedule(schedule))

    def delete_schedule(self, schedule_id: str) -> None:
        self._run(self.client.delete_schedule(schedule_id))

    def pause_schedule(self, schedule_id: str) -> schedule_service_pb2.Schedule:
        return self._run(self.client.pause_schedule(schedule_id))

    def resume_schedule(self, schedule_id: str) -> schedule_service_pb2.Schedule:
        return self._run(self.client.resume_schedule(schedule_id))

    def trigger_schedule(
        self, schedule_id: str, *, request_id: str | None = None
    ) -> schedule_service_pb2.TriggerScheduleResponse:
        return self._run(self.client.trigger_schedule(schedule_id, request_id=request_id))

    def create_rate_limit(
        self, key: str, count: int, per: Seconds = 1.0, *, burst: int = 0
    ) -> schedule_service_pb2.RateLimit:
        return self._run(self.client.create_rate_limit(key, count, per, burst=burst))

    def get_rate_limit(self, key: str) -> schedule_service_pb2.RateLimit:
        return self._run(self.client.get_rate_limit(key))

    def list_rate_limits(self) -> list[schedule_service_pb2.RateLimit]:
        return self._run(self.client.list_rate_limits())

    def update_rate_limit(
        self, key: str, count: int, per: Seconds = 1.0, *, burst: int = 0
    ) -> schedule_service_pb2.RateLimit:
        return self._run(self.client.update_rate_limit(key, count, per, burst=burst))

    def delete_rate_limit(self, key: str) -> None:
        self._run(self.client.delete_rate_limit(key))

    def watch_job(self, job_id: str) -> Iterator[common_pb2.Job]:
        return self._iterate(self.client.watch_job(job_id))

    def watch_workflow(self, workflow_id: str) -> Iterator[job_service_pb2.WatchWorkflowResponse]:
        return self._iterate(self.client.watch_workflow(workflow_id))

    def watch_runs(
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
    ) -> Iterator[job_service_pb2.WatchRunsResponse]:
        return self._iterate(
            self.client.watch_runs(
                services=services,
                workflow_names=workflow_names,
                states=states,
                labels=labels,
                kind=kind,
                include_steps=include_steps,
                include_active=include_active,
                keepalives=keepalives,
            )
        )

    def append_trace_events(
        self, run_id: str, events: Sequence[common_pb2.TraceEvent | Mapping[str, Any]]
    ) -> list[common_pb2.TraceEvent]:
        return self._run(self.client.append_trace_events(run_id, events))

    def list_trace_events(
        self,
        /,
        run_id: str,
        *,
        cursor: str = "",
        page_size: int = 0,
        view: int | str | None = None,
        **filters: Any,
    ) -> TracePage:
        return self._run(
            self.client.list_trace_events(
                run_id, cursor=cursor, page_size=page_size, view=view, **filters
            )
        )

    def stream_trace_events(
        self,
        /,
        run_id: str,
        *,
        cursor: str = "",
        follow: bool = True,
        keepalives: bool = False,
        **filters: Any,
    ) -> Iterator[trace_service_pb2.StreamTraceEventsResponse]:
        return self._iterate(
            self.client.stream_trace_events(
                run_id, cursor=cursor, follow=follow, keepalives=keepalives, **filters
            )
        )

    def get_run_status(self, run_id: str) -> trace_service_pb2.RunStatus:
        return self._run(self.client.get_run_status(run_id))

    def search_trace_events(
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
        return self._run(
            self.client.search_trace_events(
                query,
                run_id=run_id,
                min_level=min_level,
                category=category,
                type=type,
                service=service,
                since=since,
                until=until,
                page_size=page_size,
                page_token=page_token,
                view=view,
            )
        )

    def iter_search_trace_events(
        self, query: str, /, **filters: Any
    ) -> Iterator[trace_service_pb2.TraceEventHit]:
        return self._iterate(self.client.iter_search_trace_events(query, **filters))

    def get_run_summary(
        self, run_id: str = "", *, workflow_name: str = "", recent_runs: int = 0
    ) -> trace_service_pb2.GetRunSummaryResponse:
        return self._run(
            self.client.get_run_summary(
                run_id, workflow_name=workflow_name, recent_runs=recent_runs
            )
        )

    def export_trace(
        self, run_id: str, *, page_size: int = 1000, **filters: Any
    ) -> Iterator[common_pb2.TraceEvent]:
        return self._iterate(self.client.export_trace(run_id, page_size=page_size, **filters))

    def get_attestation(self, key: str) -> attestation_service_pb2.Attestation:
        return self._run(self.client.get_attestation(key))

    def export_attestation(self, key: str) -> dict[str, Any]:
        return self._run(self.client.export_attestation(key))

    def list_attestations(
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
        return self._run(
            self.client.list_attestations(
                workflow_id=workflow_id,
                job_id=job_id,
                type=type,
                state=state,
                service=service,
                user_id=user_id,
                worker_id=worker_id,
                since=since,
                until=until,
                page_size=page_size,
                page_token=page_token,
                view=view,
            )
        )

    def iter_attestations(self, /, **filters: Any) -> Iterator[attestation_service_pb2.Attestation]:
        return self._iterate(self.client.iter_attestations(**filters))

    def verify_attestation(self, key: str) -> attestation_service_pb2.VerifyAttestationResponse:
        return self._run(self.client.verify_attestation(key))

    def get_signing_keys(self) -> list[attestation_service_pb2.SigningKey]:
        return self._run(self.client.get_signing_keys())

    def attach_annotations(
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
        return self._run(
            self.client.attach_annotations(
                run_id,
                attributes,
                actor=actor,
                job_id=job_id,
                attempt=attempt,
                scope=scope,
                scope_id=scope_id,
                payload=payload,
                idempotency_key=idempotency_key,
                emit_event=emit_event,
            )
        )

    def list_annotations(
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
        return self._run(
            self.client.list_annotations(
                run_id,
                key=key,
                key_prefix=key_prefix,
                actor_id=actor_id,
                actor_kind=actor_kind,
                recorded_by=recorded_by,
                since=since,
                until=until,
                job_id=job_id,
                attempt=attempt,
                scope=scope,
                value_equals=value_equals,
                value_min=value_min,
                value_max=value_max,
                page_size=page_size,
                page_token=page_token,
                view=view,
            )
        )

    def iter_annotations(self, /, **filters: Any) -> Iterator[common_pb2.Annotation]:
        return self._iterate(self.client.iter_annotations(**filters))

    def list_workers(
        self,
        *,
        service: str = "",
        labels: Mapping[str, str] | None = None,
        draining: bool | None = None,
        holding_job: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[worker_service_pb2.ConnectedWorker]:
        return self._run(
            self.client.list_workers(
                service=service,
                labels=labels,
                draining=draining,
                holding_job=holding_job,
                page_size=page_size,
                page_token=page_token,
            )
        )

    def iter_workers(self, /, **filters: Any) -> Iterator[worker_service_pb2.ConnectedWorker]:
        return self._iterate(self.client.iter_workers(**filters))

    def watch_workers(
        self,
        *,
        service: str = "",
        labels: Mapping[str, str] | None = None,
        draining: bool | None = None,
        holding_job: str = "",
        keepalives: bool = False,
    ) -> Iterator[worker_service_pb2.WatchWorkersResponse]:
        return self._iterate(
            self.client.watch_workers(
                service=service,
                labels=labels,
                draining=draining,
                holding_job=holding_job,
                keepalives=keepalives,
            )
        )

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


# A blocking method documents what its Client coroutine does: one text for both.
for _name, _member in vars(SyncClient).items():
    _method = getattr(_member, "__func__", _member)  # a classmethod's function
    if not _name.startswith("_") and callable(_method) and _method.__doc__ is None:
        _method.__doc__ = getattr(Client, _name).__doc__
