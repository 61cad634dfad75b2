"""Annotation rules: attaching, listing and building annotations; their actors and sizes."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.clock import now_us
from jobtrace.domain import redact as redact_rules
from jobtrace.domain.attest import redact, redact_text
from jobtrace.domain.conventions import KEY_RE, MAX_KEY, check_key_value
from jobtrace.domain.errors import (
    FieldViolation,
    Invalid,
    NotFound,
    PermissionDenied,
    Violations,
)
from jobtrace.domain.pagination import Encoder, PageTokens, fill, position
from jobtrace.domain.redact import Redaction
from jobtrace.domain.trace import PRIORITY_NOTE
from jobtrace.domain.validation import check_page_size, check_text, check_view
from jobtrace.ids import new_id
from jobtrace.model import (
    Annotation,
    AnnotationInput,
    AnnotationScope,
    Caller,
    Category,
    Level,
    RunState,
    TraceEvent,
    TraceType,
)
from jobtrace.store import codec
from jobtrace.store import jobs as store
from jobtrace.store.db import Database, Tx

if TYPE_CHECKING:
    from jobtrace.domain.trace import Trace

MAX_ATTRIBUTES = 64
MAX_ANNOTATION_PAYLOAD = 64 * 1024
MAX_SUBMIT_ANNOTATIONS = 16
ACTOR_KINDS = range(1, 8)
ACTOR_KIND_REVIEWER = 6  # jobtrace.v1.ActorKind
# Keys only a principal with the reviewer role may write.
REVIEWER_PREFIX = "approval."
REVIEWER_ROLE = "reviewer"


def check_input(v: Violations, field: str, item: AnnotationInput, payload_bytes: int) -> None:
    if item.actor_kind not in ACTOR_KINDS:
        v.add(f"{field}.actor.kind", "required: one of the ActorKind values")
    if not item.actor_id:
        v.add(f"{field}.actor.id", "required")
    check_text(v, f"{field}.actor.id", item.actor_id, 256)
    check_text(v, f"{field}.actor.version", item.actor_version, 128)
    check_text(v, f"{field}.idempotency_key", item.idempotency_key, 256)
    if not item.attributes:
        v.add(f"{field}.attributes", "required: at least one key")
    elif len(item.attributes) > MAX_ATTRIBUTES:
        v.add(f"{field}.attributes", f"at most {MAX_ATTRIBUTES} entries")
    for key, value in item.attributes.items():
        check_key_value(v, f"{field}.attributes[{key!r}]", key, value)
    if payload_bytes > MAX_ANNOTATION_PAYLOAD:
        v.add(f"{field}.payload", f"must be at most {MAX_ANNOTATION_PAYLOAD} bytes")


def check_authority(item: AnnotationInput, caller: Caller) -> None:
    """Claims that need a role: only a reviewer may write approval.* keys or
    speak as actor kind REVIEWER. PERMISSION_DENIED names what needed it."""
    if caller.reviewer:
        return
    metadata = {"role": REVIEWER_ROLE}
    if item.actor_kind == ACTOR_KIND_REVIEWER:
        raise PermissionDenied(
            f"{caller.subject!r} lacks the {REVIEWER_ROLE!r} role that actor kind "
            "ACTOR_KIND_REVIEWER requires",
            reason="ROLE_REQUIRED",
            metadata={**metadata, "actor_kind": "ACTOR_KIND_REVIEWER"},
        )
    for key in sorted(item.attributes):
        if key.startswith(REVIEWER_PREFIX):
            raise PermissionDenied(
                f"{caller.subject!r} lacks the {REVIEWER_ROLE!r} role that annotation key "
                f"{key!r} ({REVIEWER_PREFIX}*) requires",
                reason="ROLE_REQUIRED",
                metadata={**metadata, "key": key},
            )


def build(
    item: AnnotationInput,
    *,
    recorded_by: str,
    tenant: str,
    run_id: str,
    now_us: int,
    job_id: str = "",
    attempt: int = 0,
    scope: AnnotationScope = AnnotationScope.RUN,
    scope_id: str = "",
    redaction: Redaction,
) -> list[Annotation]:
    """One annotation per attribute, ordered by key, value and payload redacted
    (see attest.redact): a string value stays a string."""
    payload = None if item.payload is None else redact(item.payload, redaction)
    return [
        Annotation(
            id=new_id("ann"),
            tenant=tenant,
            run_id=run_id,
            key=key,
            value=redact_value(key, item.attributes[key], redaction),
            actor_kind=item.actor_kind,
            actor_id=item.actor_id,
            actor_version=item.actor_version,
            created_us=now_us,
            job_id=job_id,
            attempt=attempt,
            scope=scope,
            scope_id=scope_id,
            payload=payload,
            idempotency_key=item.idempotency_key,
            recorded_by=recorded_by,
        )
        for key in sorted(item.attributes)
    ]


def redact_value(key: str, value: Any, r: Redaction) -> Any:
    """An annotation's value as stored: redacted whole if its key names a
    secret, else its credentials redacted; text stays text."""
    rule = r.secret_member(key)
    if rule is not None:
        return (
            redact_rules.marker_text(rule) if isinstance(value, str) else redact_rules.marker(rule)
        )
    return redact_text(value, r) if isinstance(value, str) else redact(value, r)


class Annotations:
    """AttachAnnotations and ListAnnotations."""

    def __init__(self, db: Database, tokens: PageTokens, trace: Trace) -> None:
        self._db = db
        self._tokens = tokens
        self._trace = trace

    async def attach(
        self,
        scope_tenant: str | None,
        *,
        caller: Caller,
        run_id: str,
        job_id: str,
        attempt: int,
        scope: int,
        scope_id: str,
        item: AnnotationInput,
        payload_bytes: int,
        emit_event: bool,
    ) -> list[Annotation]:
        check_authority(item, caller)
        v = Violations()
        if not run_id:
            v.add("run_id", "required")
        check_input(v, "", item, payload_bytes)
        if scope not in AnnotationScope.__members__.values():
            v.add("scope", f"unknown AnnotationScope value {scope}")
        if attempt < 0:
            v.add("attempt", "must not be negative")
        if attempt and not job_id:
            v.add("attempt", "requires job_id")
        if scope == AnnotationScope.ATTEMPT and not (job_id and attempt):
            v.add("scope", "ATTEMPT scope requires job_id and attempt")
        check_text(v, "scope_id", scope_id, 128)
        # check_input reports paths like ".actor.kind"; drop the leading dot.
        v.items = [FieldViolation(x.field.lstrip("."), x.description) for x in v.items]
        v.raise_if_any()

        async def op(session: AsyncSession, tx: Tx) -> list[Annotation]:
            state: RunState | None = None
            traceparent = ""
            if emit_event:  # under the run's lock: its event must not follow the final one
                tenant, traceparent, state = await self._trace.locked_run(
                    session, scope_tenant, run_id
                )
            else:
                tenant = await self._trace.require_run(session, scope_tenant, run_id)
            resolved_scope = AnnotationScope(scope or AnnotationScope.RUN)
            resolved_scope_id = scope_id
            if job_id:
                job = await store.get_job(session, job_id, tenant)
                if job is None or (job.id != run_id and job.workflow_id != run_id):
                    raise NotFound(
                        f"job {job_id!r} is not part of run {run_id!r}",
                        reason="JOB_NOT_FOUND",
                        metadata={"job_id": job_id},
                    )
                if attempt > job.attempt:
                    raise Invalid(
                        [FieldViolation("attempt", f"job {job_id!r} has no attempt {attempt} yet")]
                    )
                if resolved_scope == AnnotationScope.STEP and not resolved_scope_id:
                    resolved_scope_id = job.step_name
            keys = sorted(item.attributes)
            existing: dict[str, Annotation] = {}
            if item.idempotency_key:
                existing = await store.annotations_by_idempotency(
                    session, run_id, item.idempotency_key, keys
                )
            fresh = [
                a
                for a in build(
                    item,
                    recorded_by=caller.subject,
                    tenant=tenant,
                    run_id=run_id,
                    now_us=now_us(),
                    job_id=job_id,
                    attempt=attempt,
                    scope=resolved_scope,
                    scope_id=resolved_scope_id,
                    redaction=self._trace.redaction,
                )
                if a.key not in existing
            ]
            if emit_event and fresh and state is not None and state.terminal:
                from jobtrace.domain.trace import run_ended  # (trace imports this module)

                raise run_ended(run_id, state)  # a retry of an earlier attach still answers
            await store.insert_annotations(session, fresh)
            if emit_event and fresh:
                await self._trace.record(
                    session,
                    tx,
                    tenant,
                    [
                        TraceEvent(
                            run_id=run_id,
                            traceparent=traceparent,
                            node_id=resolved_scope_id or job_id or "",
                            job_id=job_id,
                            attempt=attempt,
                            type=TraceType.LOG,
                            level=Level.INFO,
                            category=Category.TECHNICAL,
                            display_priority=PRIORITY_NOTE,
                            message="annotated " + ", ".join(a.key for a in fresh),
                            data={
                                "annotations": {a.key: a.value for a in fresh},
                                "actor": {"kind": item.actor_kind, "id": item.actor_id},
                            },
                            recorded_by=caller.subject,
                        )
                    ],
                )
            stored = (
                await store.annotations_by_idempotency(session, run_id, item.idempotency_key, keys)
                if item.idempotency_key
                else {a.key: a for a in fresh}
            )
            return [stored[k] for k in keys]

        return await self._db.write(op)

    async def list(
        self,
        tenant: str | None,
        *,
        query: AnnotationFilter,
        page_size: int,
        page_token: str,
        view: int,
        out: Encoder[Annotation, Any],
    ) -> tuple[list[Any], str]:
        """One page, as `out` encodes it, and the token of the next: of one
        run oldest first, across runs (no run_id) newest first."""
        v = Violations()
        limit = check_page_size(v, "page_size", page_size)
        q = check_filter(v, query)
        full = check_view(v, "view", view)
        filters = token_filters(query, tenant)
        after = position(self._tokens, v, "page_token", page_token, "annotations", filters)
        v.raise_if_any()
        async with self._db.read() as session:
            if q.run_id:
                await self._trace.require_run(session, tenant, q.run_id)
            filled = await fill(
                lambda start, n, max_bytes: store.read_annotations(
                    session,
                    tenant=tenant,
                    query=q,
                    after=start,
                    limit=n,
                    max_bytes=max_bytes,
                    full=full,
                ),
                # Newest first reads down from the top: no token, no bound.
                start=after if q.run_id or after else None,
                count=limit,
                out=out,
                position=lambda a: a.seq,
                name=lambda a: f"annotation {a.id}",
            )
        return filled.items, self._tokens.next_token("annotations", filters, filled)


@dataclasses.dataclass(frozen=True, slots=True)
class AnnotationFilter:
    """A ListAnnotations request's filters; empty / zero / None match all.
    `value_equals` is a scalar (str, float or bool) or None."""

    run_id: str = ""
    key: str = ""
    key_prefix: str = ""
    actor_id: str = ""
    actor_kind: int = 0
    recorded_by: str = ""
    since_us: int = 0
    until_us: int = 0
    job_id: str = ""
    attempt: int = 0
    scope: int = 0
    value_equals: str | float | bool | None = None
    value_min: float | None = None
    value_max: float | None = None


def token_filters(f: AnnotationFilter, tenant: str | None) -> dict[str, Any]:
    """What a page token is bound to: the filters of earlier releases under
    their names (their tokens stay valid across an upgrade), the others when set."""
    filters: dict[str, Any] = {
        "run_id": f.run_id,
        "key_prefix": f.key_prefix,
        "actor_id": f.actor_id,
        "since": f.since_us,
        "attempt": f.attempt,
        "scope": f.scope,
        "tenant": tenant,
    }
    default = AnnotationFilter()
    later = ("key", "actor_kind", "recorded_by", "until_us", "job_id", "value_min", "value_max")
    for name in later:
        if getattr(f, name) != getattr(default, name):
            filters[name] = getattr(f, name)
    if f.value_equals is not None:  # True and 1.0 are different filters
        filters["value_equals"] = [type(f.value_equals).__name__, f.value_equals]
    return filters


def check_filter(v: Violations, f: AnnotationFilter) -> store.AnnotationQuery:
    """The store's query for these filters; each bad one a violation naming its field."""
    if f.key and (len(f.key) > MAX_KEY or not KEY_RE.fullmatch(f.key)):
        v.add("key", "must be a dotted lowercase name such as 'decision.outcome'")
    check_text(v, "key_prefix", f.key_prefix, MAX_KEY)
    if f.actor_kind and f.actor_kind not in ACTOR_KINDS:
        v.add("actor_kind", f"unknown ActorKind value {f.actor_kind}")
    if f.scope not in AnnotationScope.__members__.values():
        v.add("scope", f"unknown AnnotationScope value {f.scope}")
    if f.attempt < 0:
        v.add("attempt", "must not be negative")
    if f.since_us and f.until_us and f.until_us < f.since_us:
        v.add("until", "must not be before since")
    for name in ("value_min", "value_max"):
        bound = getattr(f, name)
        if bound is not None and not math.isfinite(bound):
            v.add(name, "must be a finite number")
    if f.value_min is not None and f.value_max is not None and f.value_min > f.value_max:
        v.add("value_min", "must not be greater than value_max")
    value_text: str | None = None
    value_num: float | None = None
    if isinstance(f.value_equals, bool | str):
        value_text = codec.dumps(f.value_equals)
    elif isinstance(f.value_equals, float):
        if math.isfinite(f.value_equals):
            value_num = f.value_equals
        else:
            v.add("value_equals", "must be a finite number")
    # Every filter but the value passes through as it is; the value is encoded
    # as the store compares it.
    same = {
        field.name: getattr(f, field.name)
        for field in dataclasses.fields(store.AnnotationQuery)
        if field.name not in ("value_text", "value_num")
    }
    return store.AnnotationQuery(**same, value_text=value_text, value_num=value_num)
