"""The annotation conventions as typed key names, and builders that check values as the server does.

    from jobtrace import conventions as cv

    await client.attach_annotations(run_id, {
        **cv.decision(outcome="approve", confidence=0.92, rationale="matches policy"),
        cv.Revision.number: 3,
    })

The server refuses a value that breaks its key's rule (INVALID_ARGUMENT, one
field violation per key); the builders raise ConventionError for the same
values before anything is sent. Keys outside these five namespaces are free
dotted lowercase names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final, Literal

__all__ = [
    "KEYS",
    "RENAMED",
    "RULES",
    "Approval",
    "ConventionError",
    "Decision",
    "Failure",
    "Revision",
    "Trigger",
    "approval",
    "check",
    "decision",
    "failure",
    "revision",
    "trigger",
]


class Trigger:
    """What started a run."""

    source: Final = "trigger.source"
    """Non-empty string: what started it, e.g. "schedule", "webhook", "api"."""
    reason: Final = "trigger.reason"
    """Non-empty string: why, in words."""
    parent_run_id: Final = "trigger.parent_run_id"
    """String run id (no spaces, at most 256 characters) of the run that started this one."""
    actor_id: Final = "trigger.actor.id"
    """Non-empty string: who started it."""


class Decision:
    """A choice made during a run, by a person, a rule or a model."""

    outcome: Final = "decision.outcome"
    """Non-empty string: what was decided."""
    rationale: Final = "decision.rationale"
    """Non-empty string: why."""
    confidence: Final = "decision.confidence"
    """Number in [0, 1]."""
    alternatives: Final = "decision.alternatives"
    """Array: the options that were not chosen."""
    used_fallback: Final = "decision.used_fallback"
    """Boolean: the decision came from a fallback rather than the primary path."""


class Approval:
    """A human sign-off."""

    approvers: Final = "approval.approvers"
    """Non-empty array of non-empty strings."""
    disposition: Final = "approval.disposition"
    """"approved" or "rejected"."""
    timestamp: Final = "approval.timestamp"
    """RFC 3339 date-time with an offset, e.g. "2026-05-01T12:00:00Z"."""
    policy_version: Final = "approval.policy.version"
    """Non-empty string: the version of the policy that was applied."""


class Revision:
    """Which version of a thing a run produced or used."""

    number: Final = "revision.number"
    """Non-negative integer."""
    parent: Final = "revision.parent"
    """Non-empty string: the revision this one derives from."""


class Failure:
    """How a run or attempt failed."""

    kind: Final = "failure.kind"
    """Non-empty string, e.g. "timeout", "network", "validation"."""
    retryable: Final = "failure.retryable"
    """Boolean."""


KEYS: Final[frozenset[str]] = frozenset(
    value
    for kind in (Trigger, Decision, Approval, Revision, Failure)
    for name, value in vars(kind).items()
    if not name.startswith("_")
)
"""Every key of the conventions."""

RENAMED: Final[Mapping[str, str]] = {
    "decision.reason": Decision.rationale,
    "approval.approver": Approval.approvers,
    "approval.approved": Approval.disposition,
    "failure.category": Failure.kind,
    "trigger.type": Trigger.source,
}
"""Keys of earlier releases, which the server now refuses, and what replaced each."""


class ConventionError(ValueError):
    """A value breaks the rule of its convention key; the server would refuse it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key} {problem}")
        self.key = key
        self.problem = problem


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) and value else "must be a non-empty string"


def _number_0_1(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        return "must be a number in [0, 1]"
    return None


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be a boolean"


def _run_id(value: Any) -> str | None:
    if not isinstance(value, str) or not 0 < len(value) <= 256 or not value.isprintable():
        return "must be a run id: a non-empty string of at most 256 printable characters"
    if any(c.isspace() for c in value):
        return "must be a run id: a string without spaces"
    return None


def _array(value: Any) -> str | None:
    return None if isinstance(value, list | tuple) else "must be an array"


def _strings(value: Any) -> str | None:
    if not isinstance(value, list | tuple) or not value:
        return "must be a non-empty array of non-empty strings"
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            return f"must be a non-empty array of non-empty strings (item {i} is not)"
    return None


def _disposition(value: Any) -> str | None:
    return None if value in ("approved", "rejected") else "must be 'approved' or 'rejected'"


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.\d{1,9})?"
    r"(?:[Zz]|[+-](\d{2}):(\d{2}))"
)


def _rfc3339(value: Any) -> str | None:
    problem = "must be an RFC 3339 timestamp with an offset, e.g. '2026-05-01T12:00:00Z'"
    match = _RFC3339.fullmatch(value) if isinstance(value, str) and len(value) <= 64 else None
    if match is None:
        return problem
    year, month, day, hour, minute, second = (int(x) for x in match.groups()[:6])
    offset_hours, offset_minutes = (int(x or 0) for x in match.groups()[6:])
    try:
        datetime(year, month, day, hour, minute, min(second, 59))  # 60: a leap second
    except ValueError:
        return problem
    if second > 60 or offset_hours > 23 or offset_minutes > 59:
        return problem
    return None


def _non_negative_integer(value: Any) -> str | None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= 2**53  # beyond, a JSON number (a double) is no longer exact
        or (isinstance(value, float) and not value.is_integer())
    ):
        return "must be a non-negative integer"
    return None


RULES: Final[Mapping[str, Callable[[Any], str | None]]] = {
    Trigger.source: _string,
    Trigger.reason: _string,
    Trigger.parent_run_id: _run_id,
    Trigger.actor_id: _string,
    Decision.outcome: _string,
    Decision.rationale: _string,
    Decision.confidence: _number_0_1,
    Decision.alternatives: _array,
    Decision.used_fallback: _boolean,
    Approval.approvers: _strings,
    Approval.disposition: _disposition,
    Approval.timestamp: _rfc3339,
    Approval.policy_version: _string,
    Revision.number: _non_negative_integer,
    Revision.parent: _string,
    Failure.kind: _string,
    Failure.retryable: _boolean,
}
"""Each key's rule: what is wrong with a value (as the server words it), or None.
The server checks annotations with this same table."""


def check(key: str, value: Any) -> str | None:
    """What is wrong with `value` for a convention key, worded as the server's
    field violation; None if nothing is, or if the key is not one of the
    conventions. A key of RENAMED is always wrong."""
    if key in RENAMED:
        return f"was replaced by {RENAMED[key]}"
    rule = RULES.get(key)
    return rule(value) if rule is not None else None


def _checked(fields: Mapping[str, Any], what: str) -> dict[str, Any]:
    out = {key: value for key, value in fields.items() if value is not None}
    if not out:
        raise ValueError(f"{what}() needs at least one field")
    for key, value in out.items():
        problem = check(key, value)
        if problem is not None:
            raise ConventionError(key, problem)
    return out


def _array_of(value: Sequence[Any] | None, key: str) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, str | bytes):  # a string is a sequence, but not of alternatives
        raise ConventionError(key, "must be an array")
    return list(value)


def trigger(
    *,
    source: str | None = None,
    reason: str | None = None,
    parent_run_id: str | None = None,
    actor_id: str | None = None,
) -> dict[str, Any]:
    """The `trigger.*` attributes given; raises ConventionError for a bad value."""
    return _checked(
        {
            Trigger.source: source,
            Trigger.reason: reason,
            Trigger.parent_run_id: parent_run_id,
            Trigger.actor_id: actor_id,
        },
        "trigger",
    )


def decision(
    *,
    outcome: str | None = None,
    rationale: str | None = None,
    confidence: float | None = None,
    alternatives: Sequence[Any] | None = None,
    used_fallback: bool | None = None,
) -> dict[str, Any]:
    """The `decision.*` attributes given; raises ConventionError for a bad value
    (e.g. a confidence outside [0, 1])."""
    return _checked(
        {
            Decision.outcome: outcome,
            Decision.rationale: rationale,
            Decision.confidence: confidence,
            Decision.alternatives: _array_of(alternatives, Decision.alternatives),
            Decision.used_fallback: used_fallback,
        },
        "decision",
    )


def approval(
    *,
    disposition: Literal["approved", "rejected"],
    approvers: Sequence[str],
    timestamp: datetime | str | None = None,
    policy_version: str | None = None,
) -> dict[str, Any]:
    """The `approval.*` attributes of one sign-off. `timestamp` is an aware
    datetime or an RFC 3339 string; raises ConventionError for a bad value."""
    if isinstance(timestamp, datetime):
        if timestamp.utcoffset() is None:
            raise ConventionError(Approval.timestamp, "must have a time zone (a naive datetime)")
        timestamp = timestamp.isoformat()
    return _checked(
        {
            Approval.disposition: disposition,
            Approval.approvers: _array_of(approvers, Approval.approvers),
            Approval.timestamp: timestamp,
            Approval.policy_version: policy_version,
        },
        "approval",
    )


def revision(*, number: int, parent: str | None = None) -> dict[str, Any]:
    """The `revision.*` attributes; raises ConventionError for a bad value."""
    return _checked({Revision.number: number, Revision.parent: parent}, "revision")


def failure(*, kind: str, retryable: bool | None = None) -> dict[str, Any]:
    """The `failure.*` attributes; raises ConventionError for a bad value."""
    return _checked({Failure.kind: kind, Failure.retryable: retryable}, "failure")
