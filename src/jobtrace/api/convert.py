"""Conversion between protobuf messages and domain records, in one place."""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from jobtrace import tracing
from jobtrace.api.errors import status_code
from jobtrace.domain import step_data
from jobtrace.domain.annotations import AnnotationFilter
from jobtrace.domain.bulk import BulkFilter, BulkRequest, BulkResult
from jobtrace.domain.errors import DomainError, FieldViolation, Invalid
from jobtrace.domain.jobs import (
    JobSubmission,
    SizedAnnotation,
    StepSubmission,
    WorkflowSubmission,
)
from jobtrace.domain.reruns import RerunRequest
from jobtrace.domain.run_feed import RunChange
from jobtrace.domain.search import Found, SearchRequest
from jobtrace.domain.states import RunKind
from jobtrace.model import (
    HELD_BY_WORKFLOW,
    JSON,
    AnnotationInput,
    ApprovalDecision,
    ApprovalGate,
    Backoff,
    Concurrency,
    Failure,
    FailureGroup,
    ForEach,
    Job,
    JobSpec,
    LabelRequirement,
    QueueState,
    RateLimit,
    RateLimitUse,
    StepResults,
    Workflow,
)
from jobtrace.pb import (
    attestation_service_pb2,
    common_pb2,
    duration_pb2,
    job_service_pb2,
    schedule_service_pb2,
    struct_pb2,
    timestamp_pb2,
    trace_service_pb2,
)


def request_hash(message: Message) -> str:
    """Identity of a request's content: deterministic serialisation, hashed."""
    return hashlib.sha256(message.SerializeToString(deterministic=True)).hexdigest()


def ts_to_us(ts: timestamp_pb2.Timestamp) -> int:
    return ts.seconds * 1_000_000 + ts.nanos // 1_000


def instant(message: Any, name: str) -> tuple[int, int] | None:
    """A Timestamp field as (seconds, nanos), unchecked; None when unset."""
    if not message.HasField(name):
        return None
    ts = getattr(message, name)
    return int(ts.seconds), int(ts.nanos)


def run_filter(request: Any, *, jobs: bool) -> Any:
    """ListJobs' or ListWorkflows' filters across runs."""
    from jobtrace.domain.run_filters import RunFilter

    return RunFilter(
        labels=dict(request.labels),
        user_id=request.user_id,
        worker_id=request.worker_id if jobs else "",
        created_after=instant(request, "created_after"),
        created_before=instant(request, "created_before"),
        include_total=request.include_total,
        parent_run_id=request.parent_run_id,
        root_run_id=request.root_run_id,
    )


def bulk_request(
    request: job_service_pb2.CancelRunsRequest | job_service_pb2.RerunRunsRequest,
) -> BulkRequest:
    """CancelRuns' or RerunRuns' request as the domain's BulkRequest."""
    f = request.filter
    return BulkRequest(
        filter=BulkFilter(
            kind=int(f.kind),
            states=tuple(int(s) for s in f.states),
            service=f.service,
            workflow_name=f.workflow_name,
            labels=dict(f.labels),
            user_id=f.user_id,
            created_after=instant(f, "created_after"),
            created_before=instant(f, "created_before"),
            include_steps=f.include_steps,
        ),
        dry_run=request.dry_run,
        reason=request.reason,
        request_id=request.request_id,
        limit=int(request.limit),
        page_size=int(request.page_size),
    )


def bulk_kind(kind: RunKind) -> job_service_pb2.WatchRunsRequest.RunKind.ValueType:
    """A kind of run as WatchRunsRequest.RunKind."""
    jpb = job_service_pb2.WatchRunsRequest
    return jpb.RUN_KIND_JOB if kind is RunKind.JOB else jpb.RUN_KIND_WORKFLOW


def cancel_runs_response(result: BulkResult) -> job_service_pb2.CancelRunsResponse:
    """A bulk result as CancelRunsResponse."""
    jpb = job_service_pb2
    return jpb.CancelRunsResponse(
        request_id=result.request_id,
        matched=result.matched,
        sample=[
            jpb.BulkRun(
                run_id=r.id,
                kind=bulk_kind(r.kind),
                state=common_pb2.RunState.ValueType(int(r.state)),
            )
            for r in result.sample
        ],
        cancelled=result.touched,
        skipped=result.skipped,
        skipped_reasons=dict(result.skipped_reasons),
        failed=result.failed,
        failures=[
            jpb.BulkRunFailure(
                run_id=f.run_id,
                kind=bulk_kind(f.kind),
                code=f.code,
                reason=f.reason,
                message=f.message,
            )
            for f in result.failures
        ],
        done=result.done,
        handled=result.handled,
    )


def rerun_runs_response(result: BulkResult) -> job_service_pb2.RerunRunsResponse:
    """A bulk result as RerunRunsResponse (the same fields as CancelRuns')."""
    cancel = cancel_runs_response(result)
    return job_service_pb2.RerunRunsResponse(
        request_id=cancel.request_id,
        matched=cancel.matched,
        sample=cancel.sample,
        rerun=cancel.cancelled,
        skipped=cancel.skipped,
        skipped_reasons=cancel.skipped_reasons,
        failed=cancel.failed,
        failures=cancel.failures,
        done=cancel.done,
        handled=cancel.handled,
        reruns=[
            job_service_pb2.BulkRerun(run_id=run.id, kind=bulk_kind(run.kind), new_run_id=new)
            for run, new in result.made
        ],
    )


def attestation_filter(request: Any) -> Any:
    """ListAttestations' filters across runs."""
    from jobtrace.domain.run_filters import AttestationFilter

    return AttestationFilter(
        state=int(request.state),
        service=request.service,
        user_id=request.user_id,
        worker_id=request.worker_id,
        since=instant(request, "since"),
        until=instant(request, "until"),
    )


def us_to_ts(us: int) -> timestamp_pb2.Timestamp | None:
    if not us:
        return None
    return timestamp_pb2.Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1_000)


def duration_ms(d: duration_pb2.Duration) -> int:
    return d.seconds * 1000 + d.nanos // 1_000_000


def ms_to_duration(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def struct_to_dict(s: struct_pb2.Struct) -> JSON:
    return json_format.MessageToDict(s)


def dict_to_struct(d: JSON | None) -> struct_pb2.Struct | None:
    if d is None:
        return None
    s = struct_pb2.Struct()
    s.update(d)
    return s


def exact_object(
    field: str, exact: bytes, struct: struct_pb2.Struct, has_struct: bool
) -> tuple[JSON | None, int]:
    """A JSON object sent either as exact JSON (`exact`, integers kept) or as a
    Struct (integral numbers read as integers): (value, its size in bytes);
    (None, 0) when neither was sent. Both at once, or JSON that is not one
    object, is INVALID_ARGUMENT naming `field`."""
    if not exact:
        if not has_struct:
            return None, 0
        return step_data.integral(struct_to_dict(struct)), struct.ByteSize()
    if has_struct and struct.fields:
        raise Invalid([FieldViolation(field, "set the Struct or its _json form, not both")])
    try:
        value = json.loads(exact, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Invalid([FieldViolation(field, f"not valid UTF-8 JSON: {exc}")]) from None
    if not isinstance(value, dict):
        raise Invalid([FieldViolation(field, "must be one JSON object")])
    return value, len(exact)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_bytes(value: JSON | None) -> bytes:
    """A stored JSON value as exact JSON for the wire; empty for none."""
    return b"" if value is None else step_data.exact_json(value)


def wants_exact_json(context: Any) -> bool:
    """Whether the caller asked (metadata `jobtrace-json: exact`) for payloads,
    results and outputs as exact JSON (the *_json fields) instead of Structs.
    One form only, never both: a 1 MiB payload sent twice would not fit the
    messages it travels in."""
    for key, value in context.invocation_metadata() or ():
        if key == EXACT_JSON_HEADER:
            return bool(value == "exact")
    return False


EXACT_JSON_HEADER = "jobtrace-json"


def json_forms(value: JSON | None, exact: bool) -> tuple[struct_pb2.Struct | None, bytes]:
    """(Struct, exact JSON) of a JSON object: one of the two, as the caller asked."""
    if exact:
        return None, json_bytes(value)
    if isinstance(value, list):
        # A fan-out step's result is a list, which a Struct cannot be.
        return dict_to_struct({"items": value}), b""
    return dict_to_struct(value), b""


def step_results_to_proto(
    r: StepResults | None, exact: bool = False
) -> tuple[Any, bytes, list[Any]]:
    """(Struct, exact JSON, refs) of some steps' results."""
    if r is None:
        return None, b"", []
    refs = [
        common_pb2.StepResultRef(step_name=x.step_name, job_id=x.job_id, size_bytes=x.size_bytes)
        for x in r.refs
    ]
    return (*json_forms(r.inline, exact), refs)


def value_to_py(v: struct_pb2.Value) -> Any:
    return json_format.MessageToDict(v)


def py_to_value(x: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    json_format.ParseDict(x, v)
    return v


def message_to_dict(m: Message) -> JSON:
    return json_format.MessageToDict(m, preserving_proto_field_name=True)


# --- requests -> domain -------------------------------------------------------


def spec_from_proto(p: common_pb2.JobSpec, field: str = "job") -> tuple[JobSpec, int]:
    backoff = Backoff(
        initial_ms=duration_ms(p.backoff.initial_interval),
        multiplier=p.backoff.multiplier,
        maximum_ms=duration_ms(p.backoff.maximum_interval),
    )
    payload, payload_bytes = exact_object(
        f"{field}.payload_json", p.payload_json, p.payload, p.HasField("payload")
    )
    timeout_ms = duration_ms(p.timeout)
    if p.timeout.nanos and not timeout_ms:  # sub-millisecond: round up, never to "none"
        timeout_ms = 1
    spec = JobSpec(
        service=p.service,
        payload=payload or {},
        priority=p.priority,
        max_attempts=p.max_attempts,
        timeout_ms=timeout_ms,
        not_before_us=ts_to_us(p.not_before) if p.HasField("not_before") else 0,
        affinity_keys=tuple(p.affinity_keys),
        labels=dict(p.labels),
        backoff=backoff,
        worker_labels=tuple(_requirement_from_proto(r) for r in p.worker_labels),
        affinity=tuple((a.key, a.weight) for a in p.affinity),
        rate_limits=tuple(RateLimitUse(u.key, u.units, u.partition) for u in p.rate_limits),
        concurrency=Concurrency(
            p.concurrency.key,
            p.concurrency.max_running,
            p.concurrency.strategy,  # type: ignore[arg-type]  # checked by validation
        )
        if p.HasField("concurrency")
        else None,
    )
    return spec, payload_bytes


def _requirement_from_proto(r: common_pb2.LabelRequirement) -> LabelRequirement:
    """A requirement as sent; a value that is neither a string nor a number is
    None, refused by validation."""
    kind = r.value.WhichOneof("kind")
    value: str | float | None = None
    if kind == "string_value":
        value = r.value.string_value
    elif kind == "number_value":
        value = r.value.number_value
    return LabelRequirement(
        key=r.key,
        value=value,
        comparator=r.comparator,  # type: ignore[arg-type]  # checked by validation
        required=r.required,
        weight=r.weight,
    )


def _requirement_to_proto(r: LabelRequirement) -> common_pb2.LabelRequirement:
    value = (
        struct_pb2.Value(string_value=r.value)
        if isinstance(r.value, str)
        else struct_pb2.Value(number_value=r.value or 0.0)
    )
    return common_pb2.LabelRequirement(
        key=r.key,
        value=value,
        comparator=int(r.comparator),  # type: ignore[arg-type]
        required=r.required,
        weight=r.weight,
    )


def annotation_input_from_proto(p: common_pb2.AnnotationInput) -> SizedAnnotation:
    item = AnnotationInput(
        actor_kind=p.actor.kind,
        actor_id=p.actor.id,
        actor_version=p.actor.version,
        attributes={k: value_to_py(v) for k, v in p.attributes.items()},
        payload=struct_to_dict(p.payload) if p.HasField("payload") else None,
        idempotency_key=p.idempotency_key,
    )
    return SizedAnnotation(item, p.payload.ByteSize())


def job_submission(request: Any, traceparent: str = "") -> JobSubmission:
    spec, payload_bytes = spec_from_proto(request.job)
    return JobSubmission(
        request_id=request.request_id,
        spec=spec,
        payload_bytes=payload_bytes,
        request_hash=request_hash(request),
        request_context=message_to_dict(request.request_context),
        context_bytes=request.request_context.ByteSize(),
        annotations=tuple(annotation_input_from_proto(a) for a in request.annotations),
        traceparent=traceparent,
    )


T = TypeVar("T")


def bulk_items(
    items: Sequence[Any], convert: Callable[[Any], T]
) -> tuple[list[T | None], list[FieldViolation]]:
    """Each item of a bulk submission converted; an item that does not
    convert (a payload that is not a JSON object, say) is None, its
    violations named by its index ("items[3].job.payload_json")."""
    out: list[T | None] = []
    invalid: list[FieldViolation] = []
    for i, item in enumerate(items):
        try:
            out.append(convert(item))
        except Invalid as exc:
            out.append(None)
            invalid.extend(
                FieldViolation(f"items[{i}].{v.field}" if v.field else f"items[{i}]", v.description)
                for v in exc.violations
            )
    return out, invalid


def item_error(error: DomainError) -> job_service_pb2.SubmitItemError:
    """One bulk item's error, as its own call's status would say it."""
    return job_service_pb2.SubmitItemError(
        code=status_code(error).value[0],
        reason=error.reason,
        message=error.message,
        metadata=error.metadata,
    )


def rerun_request(request: Any, traceparent: str = "") -> RerunRequest:
    """A RerunWorkflowRequest or RerunJobRequest for the domain."""
    workflow = isinstance(request, job_service_pb2.RerunWorkflowRequest)
    return RerunRequest(
        request_id=request.request_id,
        request_hash=request_hash(request),
        reason=request.reason,
        from_steps=tuple(request.from_steps) if workflow else (),
        failed_only=request.failed_only if workflow else False,
        traceparent=traceparent,
    )


def workflow_submission(request: Any, traceparent: str = "") -> WorkflowSubmission:
    steps = []
    for i, step in enumerate(request.steps):
        spec, size = (
            spec_from_proto(step.job, f"steps[{i}].job") if step.HasField("job") else (None, 0)
        )
        steps.append(
            StepSubmission(
                name=step.name,
                spec=spec,
                payload_bytes=size,
                depends_on=tuple(step.depends_on),
                independent=step.independent,
                for_each=ForEach(step.for_each.step, step.for_each.path)
                if step.HasField("for_each")
                else None,
                approval=gate_from_proto(step.approval) if step.HasField("approval") else None,
            )
        )
    return WorkflowSubmission(
        request_id=request.request_id,
        name=request.name,
        steps=tuple(steps),
        request_hash=request_hash(request),
        priority=request.priority,
        request_context=message_to_dict(request.request_context),
        context_bytes=request.request_context.ByteSize(),
        annotations=tuple(annotation_input_from_proto(a) for a in request.annotations),
        labels=dict(request.labels),
        traceparent=traceparent,
        outputs=tuple(request.outputs),
        timeout_ms=_workflow_timeout_ms(request.timeout) if request.HasField("timeout") else None,
    )


def _workflow_timeout_ms(d: duration_pb2.Duration) -> int:
    """A set timeout in ms; a positive one under a millisecond rounds up (never
    to 0, which validation refuses as "not positive")."""
    ms = duration_ms(d)
    return 1 if ms == 0 and (d.seconds > 0 or d.nanos > 0) else ms


def gate_from_proto(g: common_pb2.ApprovalGate) -> ApprovalGate:
    """As submitted: checked (and defaults applied) by domain.approvals.check_gate;
    enum values outside the enums are kept as numbers for it to refuse."""
    return ApprovalGate(
        approvers=tuple(g.approvers),
        min_approvals=g.min_approvals,
        timeout_ms=duration_ms(g.timeout) if g.HasField("timeout") else 0,
        on_timeout=g.on_timeout,  # type: ignore[arg-type]
        policy_version=g.policy_version,
        on_reject=g.on_reject,  # type: ignore[arg-type]
    )


def gate_to_proto(g: ApprovalGate) -> common_pb2.ApprovalGate:
    return common_pb2.ApprovalGate(
        approvers=list(g.approvers),
        min_approvals=g.min_approvals,
        timeout=ms_to_duration(g.timeout_ms) if g.timeout_ms else None,
        on_timeout=int(g.on_timeout),  # type: ignore[arg-type]
        policy_version=g.policy_version,
        on_reject=int(g.on_reject),  # type: ignore[arg-type]
    )


def approval_status_to_proto(
    gate: ApprovalGate | None, decisions: tuple[ApprovalDecision, ...], deadline_us: int
) -> common_pb2.ApprovalStatus | None:
    """A gate step's ApprovalStatus; None for a job step."""
    if gate is None:
        return None
    return common_pb2.ApprovalStatus(
        gate=gate_to_proto(gate),
        decisions=[
            common_pb2.ApprovalDecision(
                approver=d.approver,
                disposition=int(d.disposition),  # type: ignore[arg-type]
                comment=d.comment,
                decided_at=us_to_ts(d.decided_us),
            )
            for d in decisions
        ],
        approvals=len({d.approver for d in decisions if d.disposition == 1}),
        deadline=us_to_ts(deadline_us),
    )


def pending_approval_to_proto(gate: Job) -> job_service_pb2.PendingApproval:
    return job_service_pb2.PendingApproval(
        workflow_id=gate.workflow_id,
        step=gate.step_name,
        job_id=gate.id,
        approval=approval_status_to_proto(gate.approval, gate.decisions, gate.gate_deadline_us),
        waiting_since=us_to_ts(gate.started_us),
        tenant=gate.tenant,
    )


def request_context_to_proto(d: JSON) -> common_pb2.RequestContext:
    """A stored request context (MessageToDict's shape) as its message. Built
    field by field: every assignment carries one, and ParseDict (with its
    strptime for the timestamp) cost more than the rest of the assignment."""
    out = common_pb2.RequestContext()
    if (body := d.get("body")) is not None:
        out.body.SetInParent()
        out.body.update(body)
    if (user := d.get("user_context")) is not None:
        u = out.user_context
        u.SetInParent()
        u.user_id = user.get("user_id", "")
        u.display_name = user.get("display_name", "")
        u.email = user.get("email", "")
        u.roles.extend(user.get("roles", ()))
        u.attributes.update(user.get("attributes", {}))
    if (meta := d.get("metadata")) is not None:
        m = out.metadata
        m.SetInParent()
        if stamp := meta.get("timestamp"):
            _parse_timestamp(m.timestamp, stamp)
        m.request_id = meta.get("request_id", "")
        m.source = meta.get("source", "")
        m.headers.update(meta.get("headers", {}))
    return out


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


def _parse_timestamp(ts: timestamp_pb2.Timestamp, text: str) -> None:
    """RFC 3339, as MessageToDict and jobtrace.clock.iso write it."""
    fraction = text.rpartition(".")[2].rstrip("Z")
    if "." in text and len(fraction) > 6:  # nanoseconds: beyond datetime
        ts.FromJsonString(text)
        return
    delta = datetime.datetime.fromisoformat(text) - _EPOCH
    ts.seconds = delta.days * 86400 + delta.seconds
    ts.nanos = delta.microseconds * 1000


# --- domain -> responses ------------------------------------------------------


def spec_to_proto(spec: JobSpec, *, full: bool = True, exact: bool = False) -> common_pb2.JobSpec:
    payload, payload_json = json_forms(spec.payload, exact) if full else (None, b"")
    return common_pb2.JobSpec(
        service=spec.service,
        payload=payload,
        payload_json=payload_json,
        priority=spec.priority,
        max_attempts=spec.max_attempts,
        timeout=ms_to_duration(spec.timeout_ms) if spec.timeout_ms else None,
        not_before=us_to_ts(spec.not_before_us),
        affinity_keys=list(spec.affinity_keys),
        labels=spec.labels,
        worker_labels=[_requirement_to_proto(r) for r in spec.worker_labels],
        affinity=[common_pb2.AffinityWeight(key=k, weight=w) for k, w in spec.affinity],
        backoff=common_pb2.BackoffPolicy(
            initial_interval=ms_to_duration(spec.backoff.initial_ms),
            multiplier=spec.backoff.multiplier,
            maximum_interval=ms_to_duration(spec.backoff.maximum_ms),
        ),
        rate_limits=[
            common_pb2.RateLimitUse(key=u.key, units=u.units, partition=u.partition)
            for u in spec.rate_limits
        ],
        concurrency=None
        if spec.concurrency is None
        else common_pb2.ConcurrencyKey(
            key=spec.concurrency.key,
            max_running=spec.concurrency.max_running,
            strategy=int(spec.concurrency.strategy),  # type: ignore[arg-type]
        ),
    )


def failure_to_proto(f: Failure | None, *, full: bool = True) -> common_pb2.Failure | None:
    if f is None:
        return None
    return common_pb2.Failure(
        reason=f.reason,
        code=f.code,
        retryable=f.retryable,
        details=f.details if full else "",
        attempt=f.attempt,
        kind=f.kind,
    )


def failure_group(g: FailureGroup) -> job_service_pb2.FailureGroup:
    return job_service_pb2.FailureGroup(
        kind=g.kind,
        service=g.service,
        count=g.count,
        last=job_service_pb2.FailureExample(
            job_id=g.job_id,
            attempt=g.attempt,
            time=us_to_ts(g.failed_us),
            code=g.code,
            message=g.message,
        ),
    )


def job_to_proto(
    job: Job, *, full: bool = True, exact: bool = False, waiting_reason: int = 0
) -> common_pb2.Job:
    """The job; without `full` (a BASIC listing), without spec.payload,
    result and failure.details; with `exact`, payload and result as exact
    JSON (payload_json, result_json) instead of Structs."""
    result, result_json = json_forms(job.result, exact) if full else (None, b"")
    return common_pb2.Job(
        id=job.id,
        workflow_id=job.workflow_id,
        step_name=job.step_name,
        spec=spec_to_proto(job.spec, full=full, exact=exact),
        state=int(job.state),  # type: ignore[arg-type]
        attempt=job.attempt,
        progress=common_pb2.JobProgress(percent=job.progress_percent, message=job.progress_message),
        result=result,
        result_json=result_json,
        failure=failure_to_proto(job.failure, full=full),
        worker_id=job.worker_id,
        created_at=us_to_ts(job.created_us),
        started_at=us_to_ts(job.started_us),
        updated_at=us_to_ts(job.updated_us),
        completed_at=us_to_ts(job.completed_us),
        request_id=job.request_id,
        tenant=job.tenant,
        lease_deadline=us_to_ts(job.lease_deadline_us),
        next_attempt_at=us_to_ts(job.next_attempt_us),
        traceparent=job.traceparent,
        first_started_at=us_to_ts(job.first_started_us),
        submitted_by=job.submitted_by,
        waiting_reason=waiting_reason,  # type: ignore[arg-type]
        parent_run_id=job.parent_run_id,
        root_run_id=job.root_run_id,
        reused_from=job.reused_from,
        approval=approval_status_to_proto(job.approval, job.decisions, job.gate_deadline_us),
        held=bool(job.held & HELD_BY_WORKFLOW),
        concurrency_key="" if job.spec.concurrency is None else job.spec.concurrency.resolved,
        rate_limit_keys=[u.bucket for u in job.spec.rate_limits],
    )


def rate_limit_to_proto(limit: RateLimit) -> schedule_service_pb2.RateLimit:
    return schedule_service_pb2.RateLimit(
        key=limit.key,
        count=limit.count,
        period=us_to_duration(limit.period_us),
        burst=limit.burst,
        tenant=limit.tenant,
        created_by=limit.created_by,
        create_time=us_to_ts(limit.created_us),
        update_time=us_to_ts(limit.updated_us),
    )


def rate_limit_from_proto(p: schedule_service_pb2.RateLimit) -> RateLimit:
    period_us = p.period.seconds * 1_000_000 + p.period.nanos // 1000
    return RateLimit(key=p.key, count=p.count, period_us=period_us, burst=p.burst)


def workflow_to_proto(w: Workflow, exact: bool = False) -> common_pb2.Workflow:
    """The workflow; its steps are those it was read with (none in a BASIC
    listing, whose progress still counts them); with `exact`, its outputs as
    exact JSON."""
    total = w.total_steps
    done = w.completed_steps
    outputs, outputs_json, output_refs = step_results_to_proto(w.outputs, exact)
    return common_pb2.Workflow(
        id=w.id,
        name=w.name,
        state=int(w.state),  # type: ignore[arg-type]
        steps=[
            common_pb2.WorkflowStep(
                name=s.name,
                job_id=s.job_id,
                state=int(s.state),  # type: ignore[arg-type]
                depends_on=list(s.depends_on),
                attempt=s.attempt,
                progress=common_pb2.JobProgress(
                    percent=s.progress_percent, message=s.progress_message
                ),
                reused_from=s.reused_from,
                approval=approval_status_to_proto(s.approval, s.decisions, s.gate_deadline_us),
            )
            for s in w.steps
        ],
        progress=common_pb2.WorkflowProgress(
            completed_steps=done,
            total_steps=total,
            percent=(100.0 * done / total) if total else 0.0,
        ),
        priority=w.priority,
        created_at=us_to_ts(w.created_us),
        started_at=us_to_ts(w.started_us),
        updated_at=us_to_ts(w.updated_us),
        completed_at=us_to_ts(w.completed_us),
        request_id=w.request_id,
        tenant=w.tenant,
        failure=failure_to_proto(w.failure),
        labels=w.labels,
        submitted_by=w.submitted_by,
        outputs=outputs,
        outputs_json=outputs_json,
        output_refs=output_refs,
        timeout=us_to_duration(w.timeout_us) if w.deadline_us else None,
        deadline=us_to_ts(w.deadline_us) if w.deadline_us else None,
        parent_run_id=w.parent_run_id,
        root_run_id=w.root_run_id,
        rerun_reason=w.rerun_reason,
        paused_at=us_to_ts(w.paused_us),
        pause_reason=w.pause_reason,
    )


def queue_to_proto(q: QueueState) -> job_service_pb2.Queue:
    return job_service_pb2.Queue(
        tenant=q.tenant,
        service=q.service,
        paused=q.paused,
        paused_by=q.paused_by,
        paused_at=us_to_ts(q.paused_us),
        pause_reason=q.reason,
        queued=q.queued,
        running=q.running,
    )


def run_change_to_proto(change: RunChange, exact: bool) -> job_service_pb2.WatchRunsResponse:
    """One WatchRuns message; runs in the BASIC view."""
    if change.job is not None:
        return job_service_pb2.WatchRunsResponse(
            job=job_to_proto(change.job, full=False, exact=exact)
        )
    if change.workflow is not None:
        return job_service_pb2.WatchRunsResponse(workflow=workflow_to_proto(change.workflow))
    if change.snapshot_end is not None:
        count, truncated = change.snapshot_end
        return job_service_pb2.WatchRunsResponse(
            snapshot_end=job_service_pb2.WatchRunsSnapshotEnd(run_count=count, truncated=truncated)
        )
    return job_service_pb2.WatchRunsResponse(
        keepalive=trace_service_pb2.Keepalive(time=us_to_ts(change.keepalive_us))
    )


# --- the worker stream ----------------------------------------------------------


def hello_from_proto(p: Any, principal: Any) -> Any:
    """A worker id is scoped to the caller's tenant and subject: two callers can
    never share (or take over) a worker session."""
    from jobtrace.auth import Role
    from jobtrace.domain.dispatch import Hello
    from jobtrace.domain.worker_identity import WorkerIdentity

    return Hello(
        identity=WorkerIdentity(
            principal.tenant, principal.subject, p.worker_id, principal.authenticated
        ),
        services=tuple(dict.fromkeys(p.services)),
        max_concurrency=p.max_concurrency,
        labels=dict(p.labels),
        affinity_keys=tuple(p.affinity_keys),
        running=tuple((r.job_id, r.attempt) for r in p.running),
        allowed_services=principal.allowed_services,
        allowed_tenants=None if principal.is_admin else principal.allowed_tenants,
        reviewer=principal.may(Role.REVIEWER),
        version=p.version,
        accepts_batches=p.accepts_batches,
    )


def assignment_to_proto(message: Any, exact: bool = False, traced: bool = False) -> Any:
    """An Assign as an Assignment; see outgoing_to_proto for `traced`."""
    from jobtrace.pb import worker_service_pb2 as w

    job = message.job
    traceparent = (
        tracing.attempt_traceparent(
            job.traceparent, job.id, job.workflow_id, job.attempt, derive=True
        )
        if traced
        else job.traceparent
    )
    upstream, upstream_json, upstream_refs = step_results_to_proto(message.upstream, exact)
    return w.Assignment(
        job=job_to_proto(message.job, exact=exact),
        attempt=message.job.attempt,
        lease_deadline=us_to_ts(message.lease_deadline_us),
        request_context=request_context_to_proto(message.request_context),
        traceparent=traceparent,
        upstream=upstream,
        upstream_json=upstream_json,
        upstream_refs=upstream_refs,
    )


def outgoing_to_proto(message: Any, exact: bool = False, traced: bool = False) -> Any:
    """A message to a worker. With `traced` (OTLP on), an assignment's
    traceparent is the context of the attempt's span (the run's trace, the
    span id derived from the job and attempt: jobtrace.tracing), so the
    worker's handler span is its child; otherwise the submission's."""
    from jobtrace.domain import dispatch
    from jobtrace.pb import worker_service_pb2 as w

    if isinstance(message, dispatch.Assign):
        return w.ConnectResponse(assignment=assignment_to_proto(message, exact, traced))
    if isinstance(message, dispatch.AssignMany):
        return w.ConnectResponse(
            assignments=w.Assignments(
                assignments=[assignment_to_proto(a, exact, traced) for a in message.assigns]
            )
        )
    if isinstance(message, dispatch.BatchAnswer):
        return w.ConnectResponse(
            acks=w.Acks(
                acks=[
                    w.Ack(message_id=a.message_id, job_id=a.job_id, attempt=a.attempt)
                    for a in message.acked
                ],
                errors=[
                    w.ReportError(
                        message_id=r.message_id,
                        message_kind=r.kind,
                        job_id=r.job_id,
                        attempt=r.attempt,
                        code=int(status_code(r.error).value[0]),
                        reason=r.error.reason,
                        message=r.error.message,
                    )
                    for r in message.refused
                ],
            )
        )
    if isinstance(message, dispatch.Acked):
        return w.ConnectResponse(
            ack=w.Ack(message_id=message.message_id, job_id=message.job_id, attempt=message.attempt)
        )
    if isinstance(message, dispatch.HeartbeatAcked):
        return w.ConnectResponse(
            heartbeat_ack=w.HeartbeatAck(
                message_id=message.message_id,
                lease_deadline=us_to_ts(message.lease_deadline_us),
                cancels=[
                    w.CancelNotice(job_id=c.job_id, attempt=c.attempt, reason=c.reason)
                    for c in message.cancels
                ],
            )
        )
    if isinstance(message, dispatch.Cancel):
        return w.ConnectResponse(
            cancel=w.CancelNotice(
                job_id=message.job_id, attempt=message.attempt, reason=message.reason
            )
        )
    if isinstance(message, dispatch.Refused):
        return w.ConnectResponse(
            error=w.StreamError(
                message_id=message.message_id,
                message_kind=message.kind,
                job_id=message.job_id,
                attempt=message.attempt,
                code=int(status_code(message.error).value[0]),
                reason=message.error.reason,
                message=message.error.message,
                fatal=message.fatal,
            )
        )
    if isinstance(message, dispatch.Welcome):
        return w.ConnectResponse(
            welcome=w.Welcome(
                session_id=message.session_id,
                heartbeat_interval=ms_to_duration(message.heartbeat_ms),
                lease_duration=ms_to_duration(message.lease_ms),
                resumed=[w.JobAttempt(job_id=j, attempt=a) for j, a in message.resumed],
                revoked=[w.JobAttempt(job_id=j, attempt=a) for j, a in message.revoked],
                max_batch=message.max_batch,
            )
        )
    if isinstance(message, dispatch.Drained):
        return w.ConnectResponse(
            drain=w.Drain(reason=message.reason, grace=ms_to_duration(message.grace_ms))
        )
    raise TypeError(f"no conversion for {type(message).__name__}")


# --- trace ------------------------------------------------------------------------


def event_input_from_proto(p: Any) -> Any:
    from jobtrace.domain.trace import EventInput
    from jobtrace.model import Category, ErrorInfo, Level, TraceEvent, TraceType

    def enum(kind: Any, value: int) -> Any:
        try:
            return kind(value)
        except ValueError:
            return value  # validation reports it

    event = TraceEvent(
        run_id="",
        node_id=p.node_id,
        type=enum(TraceType, p.type),
        level=enum(Level, p.level),
        category=enum(Category, p.category),
        ts_us=ts_to_us(p.timestamp) if p.HasField("timestamp") else 0,
        message=p.message,
        user_message=p.user_message,
        error=ErrorInfo(p.error.message, p.error.code, p.error.details, p.error.stack)
        if p.HasField("error")
        else None,
        output_summary=struct_to_dict(p.output_summary) if p.HasField("output_summary") else None,
        data=struct_to_dict(p.data) if p.HasField("data") else None,
        step_number=p.step_number,
        total_steps=p.total_steps,
        percent=p.percent,
        display_priority=p.display_priority,
        milestone=p.milestone,
        event_key=p.event_key,
    )
    return EventInput(event, p.data.ByteSize(), p.output_summary.ByteSize())


def event_to_proto(e: Any, *, full: bool = True) -> common_pb2.TraceEvent:
    """The event; without `full` (a BASIC listing), without data,
    output_summary, error.details and error.stack."""
    return common_pb2.TraceEvent(
        id=f"{e.run_id}:{e.seq}",
        sequence=e.seq,
        run_id=e.run_id,
        node_id=e.node_id,
        type=int(e.type),  # type: ignore[arg-type]
        level=int(e.level),  # type: ignore[arg-type]
        category=int(e.category),  # type: ignore[arg-type]
        timestamp=us_to_ts(e.ts_us),
        message=e.message,
        user_message=e.user_message,
        error=common_pb2.ErrorDetail(
            message=e.error.message,
            code=e.error.code,
            details=e.error.details if full else "",
            stack=e.error.stack if full else "",
        )
        if e.error is not None
        else None,
        output_summary=dict_to_struct(e.output_summary) if full else None,
        data=dict_to_struct(e.data) if full else None,
        step_number=e.step_number,
        total_steps=e.total_steps,
        percent=e.percent,
        display_priority=e.display_priority,
        milestone=e.milestone,
        event_key=e.event_key,
        truncated=e.truncated,
        job_id=e.job_id,
        attempt=e.attempt,
        worker_id=e.worker_id,
        traceparent=e.traceparent,
        recorded_by=e.recorded_by,
        duration=None if e.duration_us is None else us_to_duration(e.duration_us),
    )


def us_to_duration(us: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMicroseconds(us)
    return d


def event_filter(request: Any) -> Any:
    from jobtrace.store.trace import EventFilter

    return EventFilter(
        min_level=request.min_level,
        category=request.category,
        node_id=request.node_id,
        type=request.type,
        since_us=ts_to_us(request.since) if request.HasField("since") else 0,
        until_us=ts_to_us(request.until) if request.HasField("until") else 0,
        milestones_only=request.milestones_only,
        min_display_priority=request.min_display_priority,
    )


def search_request(request: Any) -> SearchRequest:
    """A SearchTraceEventsRequest as the domain takes it."""
    return SearchRequest(
        query=request.query,
        page_size=request.page_size,
        page_token=request.page_token,
        run_id=request.run_id,
        min_level=request.min_level,
        category=request.category,
        type=request.type,
        service=request.service,
        since_us=ts_to_us(request.since) if request.HasField("since") else 0,
        until_us=ts_to_us(request.until) if request.HasField("until") else 0,
        view=request.view,
    )


def hit_to_proto(found: Found, *, full: bool) -> Any:
    from jobtrace.pb import trace_service_pb2 as t

    return t.TraceEventHit(
        run_id=found.event.run_id,
        event=event_to_proto(found.event, full=full),
        snippet=found.snippet,
    )


def run_status_to_proto(s: Any) -> Any:
    from jobtrace.pb import trace_service_pb2 as t

    return t.RunStatus(
        run_id=s.run_id,
        state=int(s.state),  # type: ignore[arg-type]
        started_at=us_to_ts(s.started_us),
        updated_at=us_to_ts(s.updated_us),
        completed_at=us_to_ts(s.completed_us),
        progress=t.RunProgress(
            completed_actions=s.completed_actions, total_actions=s.total_actions
        ),
        service=s.service,
        history_length=s.history_length,
        failure=failure_to_proto(s.failure),
        attempt_started_at=us_to_ts(s.attempt_started_us),
    )


def _timeline(span: Any) -> Any:
    from jobtrace.pb import trace_service_pb2 as t

    if not span.first_us and not span.last_us:
        return t.RunTimeline()
    return t.RunTimeline(
        first_event_at=us_to_ts(span.first_us),
        last_event_at=us_to_ts(span.last_us),
        duration=us_to_duration(span.duration_us),
    )


def run_summary_to_proto(s: Any) -> Any:
    """A domain.summary.RunSummary as its message."""
    from jobtrace.pb import trace_service_pb2 as t

    return t.RunSummary(
        run_id=s.run_id,
        status=run_status_to_proto(s.status),
        workflow_name=s.workflow_name,
        total_events=s.total_events,
        levels=[t.LevelCount(level=lv, events=n) for lv, n in s.levels],
        types=[t.TypeCount(type=ty, events=n) for ty, n in s.types],
        timeline=_timeline(s.span),
        nodes=[
            t.NodeSummary(
                node_id=n.node_id,
                step_number=n.step_number,
                job_id=n.job_id,
                state=int(n.state),  # type: ignore[arg-type]
                events=n.events,
                errors=n.errors,
                timeline=_timeline(n.span),
                attempts=n.attempts,
                failures=n.failures,
            )
            for n in s.nodes
        ],
        milestones=[
            t.Milestone(
                sequence=m.seq,
                time=us_to_ts(m.ts_us),
                type=m.type,
                level=m.level,
                node_id=m.node_id,
                message=m.message,
                user_message=m.user_message,
            )
            for m in s.milestones
        ],
        total_milestones=s.total_milestones,
    )


def recent_run_to_proto(r: Any) -> Any:
    """A store.summary.WorkflowRun as a RecentRun."""
    from jobtrace.pb import trace_service_pb2 as t

    ended = r.started_us and r.completed_us
    return t.RecentRun(
        run_id=r.id,
        state=int(r.state),  # type: ignore[arg-type]
        created_at=us_to_ts(r.created_us),
        started_at=us_to_ts(r.started_us),
        completed_at=us_to_ts(r.completed_us),
        duration=us_to_duration(max(0, r.completed_us - r.started_us)) if ended else None,
    )


# --- attestations and annotations -----------------------------------------------


def attestation_to_proto(a: Any, *, full: bool = True) -> Any:
    """The attestation; without `full` (a BASIC listing), without data."""
    from jobtrace.pb import attestation_service_pb2 as pa

    return pa.Attestation(
        key=a.key,
        type=int(a.type),  # type: ignore[arg-type]
        entity_type=a.entity_type,
        entity_id=a.entity_id,
        workflow_id=a.workflow_id,
        job_id=a.job_id,
        worker_id=a.worker_id,
        attempt=a.attempt,
        state=int(a.state),  # type: ignore[arg-type]
        data=dict_to_struct(a.data) if full else None,
        digest=a.digest,
        previous_digest=a.previous_digest,
        signature=a.signature,
        key_id=a.key_id,
        create_time=us_to_ts(a.created_us),
        expire_time=us_to_ts(a.expire_us),
        chain_sequence=a.chain_seq,
        tenant=a.tenant,
        recorded_by=a.recorded_by,
    )


def envelope_to_proto(e: Any) -> Any:
    from jobtrace.pb import attestation_service_pb2 as pa

    return pa.DsseEnvelope(
        payload=e.payload,
        payload_type=e.payload_type,
        signatures=[pa.DsseSignature(keyid=k, sig=s) for k, s in e.signatures],
    )


def annotation_to_proto(a: Any, *, full: bool = True) -> common_pb2.Annotation:
    """The annotation; without `full` (a BASIC listing), without payload."""
    return common_pb2.Annotation(
        id=a.id,
        run_id=a.run_id,
        job_id=a.job_id,
        attempt=a.attempt,
        scope=int(a.scope),  # type: ignore[arg-type]
        scope_id=a.scope_id,
        actor=common_pb2.Actor(kind=a.actor_kind, id=a.actor_id, version=a.actor_version),
        key=a.key,
        value=py_to_value(a.value),
        payload=dict_to_struct(a.payload) if full else None,
        idempotency_key=a.idempotency_key,
        create_time=us_to_ts(a.created_us),
        tenant=a.tenant,
        recorded_by=a.recorded_by,
    )


def annotation_input(
    actor: Any, attributes: Any, payload: Any, has_payload: bool, idempotency_key: str = ""
) -> tuple[AnnotationInput, int]:
    item = AnnotationInput(
        actor_kind=actor.kind,
        actor_id=actor.id,
        actor_version=actor.version,
        attributes={k: value_to_py(v) for k, v in attributes.items()},
        payload=struct_to_dict(payload) if has_payload else None,
        idempotency_key=idempotency_key,
    )
    return item, payload.ByteSize()


def annotation_filter(r: attestation_service_pb2.ListAnnotationsRequest) -> AnnotationFilter:
    """A ListAnnotations request's filters. A value_equals of another kind than
    string, number or bool is INVALID_ARGUMENT."""
    equals: str | float | bool | None = None
    if r.HasField("value_equals"):
        kind = r.value_equals.WhichOneof("kind")
        if kind == "string_value":
            equals = r.value_equals.string_value
        elif kind == "number_value":
            equals = r.value_equals.number_value
        elif kind == "bool_value":
            equals = r.value_equals.bool_value
        else:
            raise Invalid([FieldViolation("value_equals", "must be a string, number or bool")])
    return AnnotationFilter(
        run_id=r.run_id,
        key=r.key,
        key_prefix=r.key_prefix,
        actor_id=r.actor_id,
        actor_kind=r.actor_kind,
        recorded_by=r.recorded_by,
        since_us=ts_to_us(r.since) if r.HasField("since") else 0,
        until_us=ts_to_us(r.until) if r.HasField("until") else 0,
        job_id=r.job_id,
        attempt=r.attempt,
        scope=r.scope,
        value_equals=equals,
        value_min=r.value_min if r.HasField("value_min") else None,
        value_max=r.value_max if r.HasField("value_max") else None,
    )


# --- the fleet (WorkerService.ListWorkers / WatchWorkers) -----------------------


def worker_filter(f: Any) -> Any:
    """A WorkerFilter message as the domain's filter; an unknown draining
    value is refused."""
    from jobtrace.domain.dispatch.fleet import WorkerFilter
    from jobtrace.pb import worker_service_pb2 as w

    draining = {
        w.DRAINING_FILTER_UNSPECIFIED: None,
        w.DRAINING_FILTER_DRAINING: True,
        w.DRAINING_FILTER_NOT_DRAINING: False,
    }
    if f.draining not in draining:
        raise Invalid(
            [
                FieldViolation(
                    "filter.draining",
                    f"unknown value {f.draining}: DRAINING_FILTER_DRAINING or "
                    "DRAINING_FILTER_NOT_DRAINING, or unset",
                )
            ]
        )
    return WorkerFilter(
        service=f.service,
        labels=dict(f.labels),
        draining=draining[f.draining],
        holding_job=f.holding_job,
    )


def worker_to_proto(r: Any) -> Any:
    from jobtrace.pb import worker_service_pb2 as w

    return w.ConnectedWorker(
        worker_id=r.worker_id,
        session_id=r.session_id,
        replica=r.replica,
        services=list(r.services),
        labels=dict(r.labels),
        version=r.version,
        max_concurrency=r.max_concurrency,
        held_jobs=[
            w.HeldJob(
                job_id=h.job_id, attempt=h.attempt, since=us_to_ts(h.since_us), service=h.service
            )
            for h in r.held
        ],
        connected_at=us_to_ts(r.connected_us),
        last_heartbeat=us_to_ts(r.last_heartbeat_us),
        draining=r.draining,
        affinity_keys=list(r.affinity_keys),
        completed=r.completed,
        failed=r.failed,
        lease_losses=r.lease_losses,
        free_slots=r.free_slots,
        expires_at=us_to_ts(r.expires_us),
    )


def watch_item_to_proto(item: Any) -> Any:
    from jobtrace.pb import trace_service_pb2 as t
    from jobtrace.pb import worker_service_pb2 as w

    if item.change is not None:
        return w.WatchWorkersResponse(
            change=w.WorkerChange(
                type=w.WorkerChangeType.Value(f"WORKER_CHANGE_TYPE_{item.change.name}"),
                worker=worker_to_proto(item.worker),
            )
        )
    if item.snapshot_done is not None:
        return w.WatchWorkersResponse(
            snapshot_done=w.WorkerSnapshotDone(workers=item.snapshot_done)
        )
    return w.WatchWorkersResponse(keepalive=t.Keepalive(time=us_to_ts(item.keepalive_us)))
