"""Reruns: which steps of an ended workflow a new run carries over and which
it runs again, and the new run's lineage and trigger annotations.

A rerun point is `from_steps` (those steps and everything downstream of
them run again), `failed_only` (every declared step that did not complete,
and everything downstream), or neither (the whole workflow, nothing carried
over). Only a COMPLETED step is ever carried over: with from_steps, a step
upstream of them that did not complete (cancelled with its run, say) runs
again too. A carried-over step is stored in the new run as a COMPLETED step whose
`reused_from` names the parent run's job: its result, attestations and
annotations are that job's, referenced (never copied). A fan-out step is a
unit: carried over, it brings its result (its children's, in item order)
and none of its children; run again, it fans out anew."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from jobtrace import conventions
from jobtrace.domain.errors import FailedPrecondition, Violations
from jobtrace.domain.validation import MAX_STEPS, check_id, check_request_id, check_text
from jobtrace.model import AnnotationInput, Category, Job, RunState, TraceEvent, TraceType

MAX_REASON = 1000
# ActorKind.USER (jobtrace.v1.ActorKind): a rerun's trigger is the caller's.
ACTOR_KIND_USER = 1
TRIGGER_SOURCE = "rerun"
# Refusals a bulk rerun counts as skips: the run's rerun exists, or (failed_only)
# every step of the workflow completed.
RERUN_EXISTS = "RERUN_EXISTS"
NOTHING_TO_RERUN = "NOTHING_TO_RERUN"
# A bulk rerun's request id: room for "/" and a run id in each rerun's (256).
MAX_BULK_REQUEST_ID = 256 - 1 - 64


@dataclass(frozen=True, slots=True)
class RerunRequest:
    """A RerunWorkflow or RerunJob request (from_steps and failed_only:
    workflows only); `request_hash` identifies its content (idempotency)."""

    request_id: str
    request_hash: str
    reason: str = ""
    from_steps: tuple[str, ...] = ()
    failed_only: bool = False
    traceparent: str = ""


def check(v: Violations, id_field: str, run_id: str, req: RerunRequest) -> None:
    """What can be checked before the run is read."""
    check_id(v, id_field, run_id)
    check_request_id(v, "request_id", req.request_id)
    check_text(v, "reason", req.reason, MAX_REASON)
    if req.from_steps and req.failed_only:
        v.add("failed_only", "not with from_steps: give one rerun point")
    if len(req.from_steps) > MAX_STEPS:
        v.add("from_steps", f"at most {MAX_STEPS} steps (got {len(req.from_steps)})")
    seen: set[str] = set()
    for i, name in enumerate(req.from_steps):
        if name in seen:
            v.add(f"from_steps[{i}]", f"step {name!r} is named twice")
        seen.add(name)


def rerun_set(workflow_id: str, steps: Sequence[Job], req: RerunRequest) -> set[str]:
    """The declared steps (`steps`, in submission order) the new run runs
    again: the rerun point, the steps that did not complete, and everything
    downstream of them. INVALID_ARGUMENT
    naming each unknown from_steps name; FAILED_PRECONDITION
    (NOTHING_TO_RERUN) for failed_only when every step completed."""
    names = [s.step_name for s in steps]
    if req.from_steps:
        v = Violations()
        known = set(names)
        for i, name in enumerate(req.from_steps):
            if name not in known:
                v.add(
                    f"from_steps[{i}]",
                    f"workflow {workflow_id!r} has no step {name!r}"
                    f" (its steps: {', '.join(names)})"[:1000],
                )
        v.raise_if_any()
        # A step that did not complete has no result to carry over: it runs
        # again wherever the rerun point is.
        start = set(req.from_steps) | {s.step_name for s in steps if s.state != RunState.COMPLETED}
    elif req.failed_only:
        start = {s.step_name for s in steps if s.state != RunState.COMPLETED}
        if not start:
            raise FailedPrecondition(
                f"workflow {workflow_id!r}: every step completed, none failed to rerun",
                reason=NOTHING_TO_RERUN,
                metadata={"workflow_id": workflow_id},
            )
    else:
        return set(names)
    # Downstream, to a fixed point (a step may depend on a later one).
    again = set(start)
    grew = True
    while grew:
        grew = False
        for s in steps:
            if s.step_name not in again and any(d in again for d in s.depends_on):
                again.add(s.step_name)
                grew = True
    return again


def bulk_request_hash(kind: str, run_id: str, reason: str, failed_only: bool) -> str:
    """What a bulk rerun's submission of one run is (its idempotency hash)."""
    text = json.dumps(
        {
            "bulk": "rerun",
            "kind": kind,
            "run_id": run_id,
            "reason": reason,
            "failed_only": failed_only,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode()).hexdigest()


def rerun_exists(run_id: str, key: str, existing_id: str) -> FailedPrecondition:
    """A bulk rerun's refusal of a run whose rerun key is taken already."""
    return FailedPrecondition(
        f"run {run_id!r} has a rerun under request_id {key!r} already"
        + (f" ({existing_id})" if existing_id else ""),
        reason=RERUN_EXISTS,
        metadata={"run_id": run_id, "request_id": key, "existing_id": existing_id},
    )


def lineage(parent_id: str, parent_root: str) -> tuple[str, str]:
    """(parent_run_id, root_run_id) of a rerun of `parent_id`."""
    return parent_id, parent_root or parent_id


def trigger(parent_id: str, reason: str, subject: str) -> AnnotationInput:
    """The trigger.* annotations a rerun is created with (the caller's)."""
    return AnnotationInput(
        actor_kind=ACTOR_KIND_USER,
        actor_id=subject or "anonymous",
        actor_version="",
        attributes=conventions.trigger(
            source=TRIGGER_SOURCE,
            reason=reason or TRIGGER_SOURCE,
            parent_run_id=parent_id,
            actor_id=subject or "anonymous",
        ),
    )


def created_event(
    run_id: str,
    node_id: str,
    parent_id: str,
    req: RerunRequest,
    carried: Sequence[str],
    fresh: Sequence[str],
    now_us: int,
    by: str,
) -> TraceEvent:
    """The new run's first trace event: what it reruns, why, and (a
    workflow's) which steps it carries over and runs again."""
    message = f"rerun of {parent_id}" + (f": {req.reason}" if req.reason else "")
    data: dict[str, object] = {"parent_run_id": parent_id}
    if carried or fresh:
        data.update(carried_over=list(carried), runs_again=list(fresh))
    return TraceEvent(
        run_id=run_id,
        node_id=node_id,
        type=TraceType.LOG,
        category=Category.BUSINESS,
        message=message[:1000],
        data=data,
        traceparent=req.traceparent,
        recorded_by=by,
        ts_us=now_us,
    )
