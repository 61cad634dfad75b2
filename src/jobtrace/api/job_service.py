"""JobService: submission, queries and cancellation of jobs and workflows."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from jobtrace.api import convert
from jobtrace.api.credentials import guarded
from jobtrace.api.errors import rpc
from jobtrace.api.limits import PageBytes, StreamLimiter
from jobtrace.auth import Authenticator, Role
from jobtrace.domain.jobs import Jobs
from jobtrace.domain.pause import Pauses
from jobtrace.domain.run_feed import run_filter
from jobtrace.model import Caller, Job, WaitingReason
from jobtrace.pb import job_service_pb2 as pb
from jobtrace.pb import job_service_pb2_grpc as pb_grpc

TRACEPARENT_RE = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def traceparent(context: Any) -> str:
    """The caller's W3C traceparent, if well formed (ignored otherwise, per the spec)."""
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent" and isinstance(value, str) and TRACEPARENT_RE.fullmatch(value):
            return value
    return ""


class JobServicer(pb_grpc.JobServiceServicer):
    def __init__(
        self,
        jobs: Jobs,
        auth: Authenticator,
        streams: StreamLimiter,
        *,
        pages: PageBytes,
        waiting: Callable[[Job], WaitingReason] | None = None,
        pauses: Pauses,
    ) -> None:
        self._jobs = jobs
        self._pauses = pauses
        # Why a job waits, as this replica sees its workers (GetJob).
        self._waiting = waiting
        self._auth = auth
        self._streams = streams
        self._pages = pages

    @rpc
    async def SubmitJob(self, request: pb.SubmitJobRequest, context: Any) -> pb.SubmitJobResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        submission = convert.job_submission(request, traceparent(context))
        job, deduplicated = await self._jobs.submit_job(
            principal.tenant, submission, Caller(principal.subject, principal.may(Role.REVIEWER))
        )
        return pb.SubmitJobResponse(
            job=convert.job_to_proto(
                job, exact=convert.wants_exact_json(context), waiting_reason=self._reason(job)
            ),
            deduplicated=deduplicated,
        )

    @rpc
    async def SubmitWorkflow(
        self, request: pb.SubmitWorkflowRequest, context: Any
    ) -> pb.SubmitWorkflowResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        submission = convert.workflow_submission(request, traceparent(context))
        workflow, deduplicated = await self._jobs.submit_workflow(
            principal.tenant, submission, Caller(principal.subject, principal.may(Role.REVIEWER))
        )
        return pb.SubmitWorkflowResponse(
            workflow=convert.workflow_to_proto(workflow, convert.wants_exact_json(context)),
            deduplicated=deduplicated,
        )

    @rpc
    async def SubmitJobs(
        self, request: pb.SubmitJobsRequest, context: Any
    ) -> pb.SubmitJobsResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        parent = traceparent(context)
        items, invalid = convert.bulk_items(
            request.items, lambda item: convert.job_submission(item, parent)
        )
        results = await self._jobs.submit_jobs(
            principal.tenant,
            items,
            Caller(principal.subject, principal.may(Role.REVIEWER)),
            invalid,
        )
        exact = convert.wants_exact_json(context)
        return pb.SubmitJobsResponse(
            results=[
                pb.SubmitJobResult(
                    job=convert.job_to_proto(r.run, exact=exact, waiting_reason=self._reason(r.run))
                    if r.run is not None
                    else None,
                    deduplicated=r.deduplicated,
                    error=convert.item_error(r.error) if r.error is not None else None,
                )
                for r in results
            ]
        )

    @rpc
    async def SubmitWorkflows(
        self, request: pb.SubmitWorkflowsRequest, context: Any
    ) -> pb.SubmitWorkflowsResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        parent = traceparent(context)
        items, invalid = convert.bulk_items(
            request.items, lambda item: convert.workflow_submission(item, parent)
        )
        results = await self._jobs.submit_workflows(
            principal.tenant,
            items,
            Caller(principal.subject, principal.may(Role.REVIEWER)),
            invalid,
        )
        exact = convert.wants_exact_json(context)
        return pb.SubmitWorkflowsResponse(
            results=[
                pb.SubmitWorkflowResult(
                    workflow=convert.workflow_to_proto(r.run, exact) if r.run is not None else None,
                    deduplicated=r.deduplicated,
                    error=convert.item_error(r.error) if r.error is not None else None,
                )
                for r in results
            ]
        )

    @rpc
    async def GetJob(self, request: pb.GetJobRequest, context: Any) -> pb.GetJobResponse:
        principal = self._auth.require(context, Role.READER)
        job = await self._jobs.get_job(principal.read_scope, request.job_id)
        return pb.GetJobResponse(
            job=convert.job_to_proto(
                job, exact=convert.wants_exact_json(context), waiting_reason=self._reason(job)
            )
        )

    def _reason(self, job: Job) -> int:
        """Why the job waits, as this replica sees its workers now."""
        return int(self._waiting(job)) if self._waiting is not None else 0

    @rpc
    async def GetWorkflow(
        self, request: pb.GetWorkflowRequest, context: Any
    ) -> pb.GetWorkflowResponse:
        principal = self._auth.require(context, Role.READER)
        workflow = await self._jobs.get_workflow(principal.read_scope, request.workflow_id)
        return pb.GetWorkflowResponse(
            workflow=convert.workflow_to_proto(workflow, convert.wants_exact_json(context))
        )

    @rpc
    async def ListJobs(self, request: pb.ListJobsRequest, context: Any) -> pb.ListJobsResponse:
        principal = self._auth.require(context, Role.READER)
        page = await self._jobs.list_jobs(
            principal.read_scope,
            state=request.state,
            service=request.service,
            workflow_id=request.workflow_id,
            page_size=request.page_size,
            page_token=request.page_token,
            view=request.view,
            out=self._pages.encoder(
                lambda j: convert.job_to_proto(
                    j,
                    full=request.view == pb.JOB_VIEW_FULL,
                    exact=convert.wants_exact_json(context),
                )
            ),
            more=convert.run_filter(request, jobs=True),
        )
        return pb.ListJobsResponse(
            jobs=page.items, next_page_token=page.next_page_token, total_size=page.total_size or 0
        )

    @rpc
    async def ListWorkflows(
        self, request: pb.ListWorkflowsRequest, context: Any
    ) -> pb.ListWorkflowsResponse:
        principal = self._auth.require(context, Role.READER)
        page = await self._jobs.list_workflows(
            principal.read_scope,
            state=request.state,
            name=request.name,
            page_size=request.page_size,
            page_token=request.page_token,
            view=request.view,
            out=self._pages.encoder(
                lambda w: convert.workflow_to_proto(w, convert.wants_exact_json(context))
            ),
            more=convert.run_filter(request, jobs=False),
        )
        return pb.ListWorkflowsResponse(
            workflows=page.items,
            next_page_token=page.next_page_token,
            total_size=page.total_size or 0,
        )

    @rpc
    async def CancelJob(self, request: pb.CancelJobRequest, context: Any) -> pb.CancelJobResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        job = await self._jobs.cancel_job(
            principal.read_scope, request.job_id, request.reason, principal.subject
        )
        return pb.CancelJobResponse(
            job=convert.job_to_proto(job, exact=convert.wants_exact_json(context))
        )

    @rpc
    async def CancelWorkflow(
        self, request: pb.CancelWorkflowRequest, context: Any
    ) -> pb.CancelWorkflowResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        workflow = await self._jobs.cancel_workflow(
            principal.read_scope, request.workflow_id, request.reason, principal.subject
        )
        return pb.CancelWorkflowResponse(
            workflow=convert.workflow_to_proto(workflow, convert.wants_exact_json(context))
        )

    @rpc
    async def TerminateJob(
        self, request: pb.TerminateJobRequest, context: Any
    ) -> pb.TerminateJobResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        job = await self._jobs.terminate_job(
            principal.read_scope, request.job_id, request.reason, principal.subject
        )
        return pb.TerminateJobResponse(
            job=convert.job_to_proto(job, exact=convert.wants_exact_json(context))
        )

    @rpc
    async def TerminateWorkflow(
        self, request: pb.TerminateWorkflowRequest, context: Any
    ) -> pb.TerminateWorkflowResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        workflow = await self._jobs.terminate_workflow(
            principal.read_scope, request.workflow_id, request.reason, principal.subject
        )
        return pb.TerminateWorkflowResponse(
            workflow=convert.workflow_to_proto(workflow, convert.wants_exact_json(context))
        )

    @rpc
    async def CancelRuns(
        self, request: pb.CancelRunsRequest, context: Any
    ) -> pb.CancelRunsResponse:
        # CancelJob's role, over the caller's tenant (an admin's: every tenant).
        principal = self._auth.require(context, Role.SUBMITTER)
        result = await self._jobs.cancel_runs(
            principal.read_scope,
            principal.tenant,
            principal.subject,
            convert.bulk_request(request),
            context.time_remaining(),
        )
        return convert.cancel_runs_response(result)

    @rpc
    async def RerunRuns(self, request: pb.RerunRunsRequest, context: Any) -> pb.RerunRunsResponse:
        # RerunJob's role, over the caller's tenant (an admin's: every tenant).
        principal = self._auth.require(context, Role.SUBMITTER)
        result = await self._jobs.rerun_runs(
            principal.read_scope,
            principal.tenant,
            Caller(principal.subject, principal.may(Role.REVIEWER)),
            convert.bulk_request(request),
            failed_only=request.failed_only,
            time_left_s=context.time_remaining(),
        )
        return convert.rerun_runs_response(result)

    @rpc
    async def WatchJob(
        self, request: pb.WatchJobRequest, context: Any
    ) -> AsyncIterator[pb.WatchJobResponse]:
        principal = self._auth.require(context, Role.READER)
        watch = self._jobs.watch_job(principal.read_scope, request.job_id)
        with self._streams.hold(principal):
            async with aclosing(guarded(self._auth, context, principal, watch)) as jobs:
                async for job in jobs:
                    yield pb.WatchJobResponse(
                        job=convert.job_to_proto(job, exact=convert.wants_exact_json(context))
                    )

    @rpc
    async def WatchWorkflow(
        self, request: pb.WatchWorkflowRequest, context: Any
    ) -> AsyncIterator[pb.WatchWorkflowResponse]:
        principal = self._auth.require(context, Role.READER)
        watch = self._jobs.watch_workflow(principal.read_scope, request.workflow_id)
        with self._streams.hold(principal):
            async with aclosing(guarded(self._auth, context, principal, watch)) as changes:
                async for workflow, job in changes:
                    yield pb.WatchWorkflowResponse(
                        workflow=convert.workflow_to_proto(
                            workflow, convert.wants_exact_json(context)
                        ),
                        changed_job=convert.job_to_proto(
                            job, exact=convert.wants_exact_json(context)
                        )
                        if job is not None
                        else None,
                    )

    @rpc
    async def AwaitJob(self, request: pb.AwaitJobRequest, context: Any) -> pb.AwaitJobResponse:
        principal = self._auth.require(context, Role.READER)
        with self._streams.hold(principal):
            job = await self._jobs.await_job(
                principal.read_scope, request.job_id, await_seconds(request, context)
            )
        return pb.AwaitJobResponse(
            job=convert.job_to_proto(job, exact=convert.wants_exact_json(context))
        )

    @rpc
    async def AwaitWorkflow(
        self, request: pb.AwaitWorkflowRequest, context: Any
    ) -> pb.AwaitWorkflowResponse:
        principal = self._auth.require(context, Role.READER)
        with self._streams.hold(principal):
            workflow = await self._jobs.await_workflow(
                principal.read_scope, request.workflow_id, await_seconds(request, context)
            )
        return pb.AwaitWorkflowResponse(
            workflow=convert.workflow_to_proto(workflow, convert.wants_exact_json(context))
        )

    @rpc
    async def SummarizeFailures(
        self, request: pb.SummarizeFailuresRequest, context: Any
    ) -> pb.SummarizeFailuresResponse:
        principal = self._auth.require(context, Role.READER)
        groups = await self._jobs.summarize_failures(
            principal.read_scope,
            convert.ts_to_us(request.since) if request.HasField("since") else None,
            convert.ts_to_us(request.until) if request.HasField("until") else None,
            request.service,
        )
        return pb.SummarizeFailuresResponse(groups=[convert.failure_group(g) for g in groups])

    @rpc
    async def RerunWorkflow(
        self, request: pb.RerunWorkflowRequest, context: Any
    ) -> pb.RerunWorkflowResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        workflow, deduplicated = await self._jobs.rerun_workflow(
            principal.read_scope,
            request.workflow_id,
            convert.rerun_request(request, traceparent(context)),
            Caller(principal.subject, principal.may(Role.REVIEWER)),
        )
        return pb.RerunWorkflowResponse(
            workflow=convert.workflow_to_proto(workflow, convert.wants_exact_json(context)),
            deduplicated=deduplicated,
        )

    @rpc
    async def RerunJob(self, request: pb.RerunJobRequest, context: Any) -> pb.RerunJobResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        job, deduplicated = await self._jobs.rerun_job(
            principal.read_scope,
            request.job_id,
            convert.rerun_request(request, traceparent(context)),
            Caller(principal.subject, principal.may(Role.REVIEWER)),
        )
        return pb.RerunJobResponse(
            job=convert.job_to_proto(
                job, exact=convert.wants_exact_json(context), waiting_reason=self._reason(job)
            ),
            deduplicated=deduplicated,
        )

    @rpc
    async def WatchRuns(
        self, request: pb.WatchRunsRequest, context: Any
    ) -> AsyncIterator[pb.WatchRunsResponse]:
        principal = self._auth.require(context, Role.READER)
        feed = self._jobs.runs.watch(
            principal.read_scope,
            run_filter(
                services=request.services,
                workflow_names=request.workflow_names,
                states=request.states,
                labels=request.labels,
                kind=request.kind,
                include_steps=request.include_steps,
                include_active=request.include_active,
            ),
        )
        exact = convert.wants_exact_json(context)
        with self._streams.hold(principal):
            async with aclosing(guarded(self._auth, context, principal, feed)) as changes:
                async for change in changes:
                    yield convert.run_change_to_proto(change, exact)

    @rpc
    async def ApproveStep(
        self, request: pb.ApproveStepRequest, context: Any
    ) -> pb.ApproveStepResponse:
        principal = self._auth.require(context, Role.REVIEWER)
        workflow, step = await self._jobs.approvals.approve(
            principal.read_scope,
            request.workflow_id,
            request.step,
            request.disposition,
            request.comment,
            Caller(principal.subject, principal.may(Role.REVIEWER)),
        )
        exact = convert.wants_exact_json(context)
        return pb.ApproveStepResponse(
            workflow=convert.workflow_to_proto(workflow, exact),
            step=convert.job_to_proto(step, exact=exact),
        )

    @rpc
    async def ListPendingApprovals(
        self, request: pb.ListPendingApprovalsRequest, context: Any
    ) -> pb.ListPendingApprovalsResponse:
        principal = self._auth.require(context, Role.REVIEWER)
        page = await self._jobs.approvals.pending(
            principal.read_scope,
            Caller(principal.subject, principal.may(Role.REVIEWER)),
            request.page_size,
            request.page_token,
        )
        return pb.ListPendingApprovalsResponse(
            approvals=[convert.pending_approval_to_proto(g) for g in page.items],
            next_page_token=page.next_page_token,
        )

    @rpc
    async def PauseWorkflow(
        self, request: pb.PauseWorkflowRequest, context: Any
    ) -> pb.PauseWorkflowResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        workflow = await self._pauses.pause_workflow(
            principal.read_scope, request.workflow_id, request.reason, principal.subject
        )
        return pb.PauseWorkflowResponse(
            workflow=convert.workflow_to_proto(workflow, convert.wants_exact_json(context))
        )

    @rpc
    async def ResumeWorkflow(
        self, request: pb.ResumeWorkflowRequest, context: Any
    ) -> pb.ResumeWorkflowResponse:
        principal = self._auth.require(context, Role.SUBMITTER)
        workflow = await self._pauses.resume_workflow(
            principal.read_scope, request.workflow_id, principal.subject
        )
        return pb.ResumeWorkflowResponse(
            workflow=convert.workflow_to_proto(workflow, convert.wants_exact_json(context))
        )

    @rpc
    async def PauseQueue(
        self, request: pb.PauseQueueRequest, context: Any
    ) -> pb.PauseQueueResponse:
        principal = self._auth.require(context, Role.ADMIN)
        queue = await self._pauses.pause_queue(
            request.tenant or principal.tenant, request.service, request.reason, principal.subject
        )
        return pb.PauseQueueResponse(queue=convert.queue_to_proto(queue))

    @rpc
    async def ResumeQueue(
        self, request: pb.ResumeQueueRequest, context: Any
    ) -> pb.ResumeQueueResponse:
        principal = self._auth.require(context, Role.ADMIN)
        queue = await self._pauses.resume_queue(
            request.tenant or principal.tenant, request.service, principal.subject
        )
        return pb.ResumeQueueResponse(queue=convert.queue_to_proto(queue))

    @rpc
    async def ListQueues(
        self, request: pb.ListQueuesRequest, context: Any
    ) -> pb.ListQueuesResponse:
        principal = self._auth.require(context, Role.READER)
        queues = await self._pauses.list_queues(principal.read_scope)
        return pb.ListQueuesResponse(queues=[convert.queue_to_proto(q) for q in queues])


# Answer a little before the call's deadline, so the caller gets AWAIT_TIMEOUT
# with the current state rather than a bare DEADLINE_EXCEEDED of its own.
_DEADLINE_MARGIN_S = 0.05


def await_seconds(request: Any, context: Any) -> float | None:
    """How long an Await call waits: its timeout, cut to the call's deadline;
    None (until the run ends) when it has neither. A negative timeout is left
    for the domain to refuse."""
    wait: float | None = None
    if request.HasField("timeout"):
        t = request.timeout
        wait = t.seconds + t.nanos / 1e9 or None
    remaining = context.time_remaining()
    if remaining is not None and (wait is None or wait >= 0):
        cut = max(0.0, remaining - _DEADLINE_MARGIN_S)
        wait = cut if wait is None else min(wait, cut)
    return wait
