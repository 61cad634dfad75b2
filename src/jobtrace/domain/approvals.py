"""Approval gates: workflow steps that people decide instead of a worker.

A gate is a step row (a job no worker ever runs: it is never QUEUED). Once its
dependencies completed it is WAITING_FOR_HUMAN; its workflow shows
WAITING_FOR_HUMAN too while a gate waits and no step is queued or running.
Approvers decide with ApproveStep, under the workflow's lock (then the gate's
row lock): enough distinct approvals complete it with the decisions as its
result and the workflow goes on as after any step; a rejection fails it (and
the workflow), or with on_reject SKIP completes it unapproved, and the steps
after it run. Past its timeout the supervisor times it out: TIMED_OUT (the
workflow fails), or with on_timeout REJECT a rejection by the server.

Every decision is recorded as approval.* annotations by the deciding subject
(about the gate's job; the annotation's attempt is the decision's number, so
each decision's attestation covers exactly its own) and attested in the
workflow's chain: key "approval:<workflow>:<step>:<n>"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.clock import iso, now_us
from jobtrace.domain import annotations as annotation_rules
from jobtrace.domain import states
from jobtrace.domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Violations,
)
from jobtrace.domain.lifecycle import Lifecycle
from jobtrace.domain.pagination import PageTokens, position
from jobtrace.domain.validation import STEP_NAME_RE, check_id, check_page_size, check_text
from jobtrace.model import (
    ANY_REVIEWER,
    JSON,
    SYSTEM_SUBJECT,
    AnnotationInput,
    AnnotationScope,
    ApprovalDecision,
    ApprovalGate,
    Caller,
    Disposition,
    Failure,
    Job,
    OnReject,
    OnTimeout,
    RunState,
    Workflow,
)
from jobtrace.store import jobs as store
from jobtrace.store.db import Database, Tx

MAX_APPROVERS = 32
MAX_APPROVER = 256
MAX_POLICY_VERSION = 128
MAX_COMMENT = 1000
MAX_GATE_TIMEOUT_MS = 30 * 24 * 3600 * 1000
# The service a gate's step row records (no worker ever runs it: a gate is
# never QUEUED).
GATE_SERVICE = "approval"
ACTOR_KIND_REVIEWER = annotation_rules.ACTOR_KIND_REVIEWER
# Gates read per round while filling a page of ListPendingApprovals.
PENDING_CHUNK = 200


def check_gate(v: Violations, field: str, gate: ApprovalGate) -> ApprovalGate:
    """The gate with its defaults applied; its problems reported in `v`."""
    if not gate.approvers:
        v.add(f"{field}.approvers", "required: at least one subject or 'role:reviewer'")
    elif len(gate.approvers) > MAX_APPROVERS:
        v.add(f"{field}.approvers", f"at most {MAX_APPROVERS} entries")
    seen: set[str] = set()
    for i, who in enumerate(gate.approvers):
        where = f"{field}.approvers[{i}]"
        if not who or len(who) > MAX_APPROVER or not who.isprintable():
            v.add(where, f"1-{MAX_APPROVER} printable characters")
        elif who.startswith("role:") and who != ANY_REVIEWER:
            v.add(where, f"the only role an approver may name is {ANY_REVIEWER!r}")
        elif who in seen:
            v.add(where, f"{who!r} is listed twice")
        seen.add(who)
    minimum = gate.min_approvals or 1
    if not 1 <= minimum <= MAX_APPROVERS:
        v.add(f"{field}.min_approvals", f"must be between 1 and {MAX_APPROVERS} (0 means 1)")
    elif ANY_REVIEWER not in seen and seen and minimum > len(seen):
        v.add(
            f"{field}.min_approvals",
            f"{minimum} approvals needed but only {len(seen)} approvers listed",
        )
    if gate.timeout_ms and not 1000 <= gate.timeout_ms <= MAX_GATE_TIMEOUT_MS:
        v.add(f"{field}.timeout", "must be between 1 s and 30 days (unset: no limit)")
    if gate.on_timeout not in OnTimeout.__members__.values():
        v.add(f"{field}.on_timeout", f"unknown OnTimeout value {int(gate.on_timeout)}")
    if gate.on_reject not in OnReject.__members__.values():
        v.add(f"{field}.on_reject", f"unknown OnReject value {int(gate.on_reject)}")
    check_text(v, f"{field}.policy_version", gate.policy_version, MAX_POLICY_VERSION)
    return ApprovalGate(
        approvers=tuple(gate.approvers),
        min_approvals=minimum,
        timeout_ms=gate.timeout_ms,
        on_timeout=OnTimeout(gate.on_timeout or OnTimeout.FAIL)
        if gate.on_timeout in OnTimeout.__members__.values()
        else OnTimeout.FAIL,
        policy_version=gate.policy_version,
        on_reject=OnReject(gate.on_reject or OnReject.FAIL)
        if gate.on_reject in OnReject.__members__.values()
        else OnReject.FAIL,
    )


def may_decide(gate: ApprovalGate, caller: Caller) -> bool:
    """A reviewer listed by subject, or any reviewer when 'role:reviewer' is listed."""
    return caller.reviewer and (caller.subject in gate.approvers or ANY_REVIEWER in gate.approvers)


def approvals(decisions: tuple[ApprovalDecision, ...]) -> int:
    return len({d.approver for d in decisions if d.disposition == Disposition.APPROVED})


def gate_result(
    decisions: tuple[ApprovalDecision, ...], *, approved: bool, timed_out: bool = False
) -> JSON:
    """A decided gate's result: whether it was approved (or skipped after a
    rejection) and the decisions it relied on."""
    result: JSON = {
        "approved": approved,
        "skipped": not approved,
        "approvals": approvals(decisions),
        "decisions": [
            {
                "approver": d.approver,
                "disposition": d.disposition.name.lower(),
                "comment": d.comment,
                "decided_at": iso(d.decided_us),
            }
            for d in decisions
        ],
    }
    if timed_out:
        result["timed_out"] = True
    return result


@dataclass(frozen=True, slots=True)
class PendingPage:
    items: list[Job]
    next_page_token: str


class Approvals:
    """ApproveStep, ListPendingApprovals and gate timeouts over one database."""

    def __init__(self, db: Database, tokens: PageTokens, life: Lifecycle, notify: Any) -> None:
        self._db = db
        self._tokens = tokens
        self._life = life
        # Tells the feeds and the dispatcher of changed jobs once tx commits.
        self._notify = notify

    async def approve(
        self,
        tenant: str | None,
        workflow_id: str,
        step: str,
        disposition: int,
        comment: str,
        caller: Caller,
    ) -> tuple[Workflow, Job]:
        v = Violations()
        check_id(v, "workflow_id", workflow_id)
        if not STEP_NAME_RE.fullmatch(step):
            v.add("step", "required: 1-128 characters of [A-Za-z0-9._-]")
        if disposition not in (Disposition.APPROVED, Disposition.REJECTED):
            v.add("disposition", "required: APPROVAL_DISPOSITION_APPROVED or _REJECTED")
        check_text(v, "comment", comment, MAX_COMMENT)
        v.raise_if_any()

        async def op(db: AsyncSession, tx: Tx) -> tuple[Workflow, Job]:
            await store.lock_workflow(db, workflow_id)
            found = await store.get_workflow_row(db, workflow_id, tenant)
            if found is None:
                raise NotFound(
                    f"workflow {workflow_id!r} not found",
                    reason="WORKFLOW_NOT_FOUND",
                    metadata={"workflow_id": workflow_id},
                )
            ref = await store.step_job(db, workflow_id, step)
            if ref is None:
                raise NotFound(
                    f"workflow {workflow_id!r} has no step {step!r}",
                    reason="STEP_NOT_FOUND",
                    metadata={"workflow_id": workflow_id, "step": step},
                )
            gate = await store.load_locked(db, ref.id)
            assert gate is not None
            if gate.approval is None:
                raise FailedPrecondition(
                    f"step {step!r} of workflow {workflow_id!r} is not an approval gate",
                    reason="NOT_AN_APPROVAL_GATE",
                    metadata={"workflow_id": workflow_id, "step": step},
                )
            states.require(states.RunKind.JOB, gate.id, gate.state, states.Action.APPROVE)
            if not may_decide(gate.approval, caller):
                raise PermissionDenied(
                    f"{caller.subject!r} is not an approver of step {step!r} "
                    f"(approvers: {', '.join(gate.approval.approvers)}; a decider needs "
                    "the 'reviewer' role too)",
                    reason="NOT_AN_APPROVER",
                    metadata={"workflow_id": workflow_id, "step": step},
                )
            if any(d.approver == caller.subject for d in gate.decisions):
                raise AlreadyExists(
                    f"{caller.subject!r} already decided step {step!r}: one decision per "
                    "approver per gate",
                    reason="ALREADY_DECIDED",
                    metadata={"workflow_id": workflow_id, "step": step},
                )
            now = now_us()
            decision = ApprovalDecision(
                caller.subject,
                Disposition(disposition),
                annotation_rules.redact_value("comment", comment, self._life.trace.redaction),
                now,
            )
            changed = await self._decide(db, tx, gate, decision, now)
            self._notify(tx, changed)
            workflow = await store.get_workflow(db, workflow_id)
            after = await store.get_job(db, gate.id)
            assert workflow is not None and after is not None
            return workflow, after

        result: tuple[Workflow, Job] = await self._db.write(op)
        return result

    async def _decide(
        self, db: AsyncSession, tx: Tx, gate: Job, decision: ApprovalDecision, now: int
    ) -> list[Job]:
        """Record and attest one decision, and end the gate when it decides it."""
        assert gate.approval is not None and gate.workflow_id
        rules = gate.approval
        decisions = (*gate.decisions, decision)
        number = len(decisions)
        count = approvals(decisions)
        if decision.disposition == Disposition.REJECTED:
            outcome = "skipped" if rules.on_reject == OnReject.SKIP else "rejected"
        else:
            outcome = "approved" if count >= rules.min_approvals else "waiting"
        by = decision.approver
        await store.insert_annotations(
            db,
            annotation_rules.build(
                AnnotationInput(
                    actor_kind=ACTOR_KIND_REVIEWER,
                    actor_id=by,
                    actor_version="",
                    attributes={
                        "approval.approvers": [by],
                        "approval.disposition": decision.disposition.name.lower(),
                        "approval.timestamp": iso(now),
                        **(
                            {"approval.policy.version": rules.policy_version}
                            if rules.policy_version
                            else {}
                        ),
                    },
                    payload={"comment": decision.comment} if decision.comment else None,
                    idempotency_key=f"approval:{gate.id}:{number}",
                ),
                recorded_by=by,
                tenant=gate.tenant,
                run_id=gate.workflow_id,
                now_us=now,
                job_id=gate.id,
                attempt=number,
                scope=AnnotationScope.STEP,
                scope_id=gate.step_name,
                redaction=self._life.trace.redaction,
            ),
        )
        await self._life.attest_approval(
            db,
            gate,
            number,
            {
                "approver": by,
                "disposition": decision.disposition.name.lower(),
                "comment": decision.comment,
                "decided_at": iso(now),
                "policy_version": rules.policy_version,
                "approvers": list(rules.approvers),
                "min_approvals": rules.min_approvals,
                "approvals": count,
                "outcome": outcome,
            },
            by,
        )
        label = f"{gate.step_name} {decision.disposition.name.lower()} by {by}"
        if outcome == "waiting":
            return await self._life.gate_decision(
                db, tx, gate, decisions, now, by, f"{label} ({count} of {rules.min_approvals})"
            )
        if outcome == "approved":
            return await self._life.gate_completed(
                db, tx, gate, decisions, gate_result(decisions, approved=True), now, by
            )
        if outcome == "skipped":
            return await self._life.gate_completed(
                db, tx, gate, decisions, gate_result(decisions, approved=False), now, by
            )
        why = f"rejected by {by}" + (f": {decision.comment}" if decision.comment else "")
        failure = Failure(reason=why, code="APPROVAL_REJECTED")
        return await self._life.gate_ended(
            db, tx, gate, decisions, RunState.FAILED, failure, now, by
        )

    async def time_out(self, db: AsyncSession, tx: Tx, now: int) -> list[Job]:
        """End the gates past their timeout (the supervisor's pass; each re-read
        under its workflow's lock: another replica may have ended it)."""
        changed: list[Job] = []
        for candidate in await store.timed_out_gates(db, now):
            gate = await store.load_locked(db, candidate.id)
            if (
                gate is None
                or gate.approval is None
                or not states.can(states.RunKind.JOB, gate.state, states.Action.TIME_OUT)
                or gate.state != RunState.WAITING_FOR_HUMAN
                or not 0 < gate.gate_deadline_us < now
            ):
                continue
            rules = gate.approval
            why = f"no decision within {rules.timeout_ms / 1000:g} s"
            if rules.on_timeout == OnTimeout.REJECT and rules.on_reject == OnReject.SKIP:
                result = gate_result(gate.decisions, approved=False, timed_out=True)
                changed += await self._life.gate_completed(
                    db, tx, gate, gate.decisions, result, now, SYSTEM_SUBJECT
                )
            elif rules.on_timeout == OnTimeout.REJECT:
                failure = Failure(reason=f"{why}: a rejection", code="APPROVAL_REJECTED")
                changed += await self._life.gate_ended(
                    db, tx, gate, gate.decisions, RunState.FAILED, failure, now, SYSTEM_SUBJECT
                )
            else:
                failure = Failure(reason=why, code="APPROVAL_TIMED_OUT")
                changed += await self._life.gate_ended(
                    db, tx, gate, gate.decisions, RunState.TIMED_OUT, failure, now, SYSTEM_SUBJECT
                )
        return changed

    async def pending(
        self, tenant: str | None, caller: Caller, page_size: int, page_token: str
    ) -> PendingPage:
        """The waiting gates `caller` may decide and has not decided, oldest first."""
        v = Violations()
        count = check_page_size(v, "page_size", page_size)
        filters = {"tenant": tenant, "subject": caller.subject}
        after = position(self._tokens, v, "page_token", page_token, "pending", filters)
        v.raise_if_any()
        items: list[Job] = []
        more = False
        if caller.reviewer:
            async with self._db.read() as db:
                while not more:
                    chunk = await store.waiting_gates(db, tenant, after, PENDING_CHUNK)
                    for gate in chunk:
                        if not (
                            gate.approval is not None
                            and may_decide(gate.approval, caller)
                            and all(d.approver != caller.subject for d in gate.decisions)
                        ):
                            after = gate.seq
                            continue
                        if len(items) == count:
                            more = True
                            break
                        items.append(gate)
                        after = gate.seq
                    if len(chunk) < PENDING_CHUNK:
                        break
        token = self._tokens.encode("pending", filters, items[-1].seq) if more else ""
        return PendingPage(items, token)
