"""Annotation rules: key names, well-known value types, actors."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from jobtrace.domain.errors import Violations
from jobtrace.domain.validation import check_text
from jobtrace.ids import new_id
from jobtrace.model import Annotation, AnnotationInput, AnnotationScope

KEY_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")
MAX_KEY = 256
MAX_ATTRIBUTES = 64
MAX_ANNOTATION_PAYLOAD = 64 * 1024
MAX_SUBMIT_ANNOTATIONS = 16
ACTOR_KINDS = range(1, 8)


def _number_0_1(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        return "must be a number in [0, 1]"
    return None


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be a boolean"


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "must be a non-empty string"


def _scalar(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list):
        return "must be a string, number or boolean"
    return None


def _number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "must be a number"
    return None


# Exact well-known keys first, then the rule of each well-known prefix.
WELL_KNOWN: dict[str, Callable[[Any], str | None]] = {
    "decision.confidence": _number_0_1,
    "decision.outcome": _string,
    "decision.reason": _string,
    "approval.approved": _boolean,
    "approval.approver": _string,
    "revision.number": _number,
    "revision.parent": _string,
    "failure.category": _string,
    "failure.retryable": _boolean,
    "trigger.source": _string,
    "trigger.type": _string,
}
PREFIX_RULES: dict[str, Callable[[Any], str | None]] = {
    "trigger.": _scalar,
    "decision.": lambda value: None,
    "approval.": lambda value: None,
    "revision.": lambda value: None,
    "failure.": lambda value: None,
}


def check_key_value(v: Violations, field: str, key: str, value: Any) -> None:
    if len(key) > MAX_KEY or not KEY_RE.match(key):
        v.add(field, "key must be a dotted lowercase name such as 'decision.outcome'")
        return
    rule = WELL_KNOWN.get(key)
    if rule is None:
        rule = next((r for p, r in PREFIX_RULES.items() if key.startswith(p)), None)
    problem = rule(value) if rule is not None else None
    if problem:
        v.add(field, f"{key} {problem}")


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


def build(
    item: AnnotationInput,
    *,
    tenant: str,
    run_id: str,
    now_us: int,
    job_id: str = "",
    attempt: int = 0,
    scope: AnnotationScope = AnnotationScope.RUN,
    scope_id: str = "",
) -> list[Annotation]:
    """One annotation per attribute, ordered by key."""
    return [
        Annotation(
            id=new_id("ann"),
            tenant=tenant,
            run_id=run_id,
            key=key,
            value=item.attributes[key],
            actor_kind=item.actor_kind,
            actor_id=item.actor_id,
            actor_version=item.actor_version,
            created_us=now_us,
            job_id=job_id,
            attempt=attempt,
            scope=scope,
            scope_id=scope_id,
            payload=item.payload,
            idempotency_key=item.idempotency_key,
        )
        for key in sorted(item.attributes)
    ]
