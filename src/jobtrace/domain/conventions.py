"""Annotation conventions: key syntax and the rule of each well-known key's value."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

from jobtrace.domain.errors import Violations

# Applied with fullmatch to at most MAX_KEY characters; possessive, so no backtracking.
KEY_RE = re.compile(r"[a-z][a-z0-9_]*+(?:\.[a-z0-9_]++)++")
MAX_KEY = 256


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


# Largest integer a JSON number (a double, as google.protobuf.Value holds it) keeps exact.
MAX_EXACT_INTEGER = 2**53


def _non_negative_integer(value: Any) -> str | None:
    # A protobuf Value carries every number as a double: 3.0 is the integer 3.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= MAX_EXACT_INTEGER
        or (isinstance(value, float) and not value.is_integer())
    ):
        return "must be a non-negative integer"
    return None


def _run_id(value: Any) -> str | None:
    if not isinstance(value, str) or not 0 < len(value) <= 256 or not value.isprintable():
        return "must be a run id: a non-empty string of at most 256 printable characters"
    if any(c.isspace() for c in value):
        return "must be a run id: a string without spaces"
    return None


def _array(value: Any) -> str | None:
    return None if isinstance(value, list) else "must be an array"


def _strings(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "must be a non-empty array of non-empty strings"
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            return f"must be a non-empty array of non-empty strings (item {i} is not)"
    return None


DISPOSITIONS = ("approved", "rejected")


def _disposition(value: Any) -> str | None:
    return None if value in DISPOSITIONS else "must be 'approved' or 'rejected'"


# RFC 3339 date-time (section 5.6): the offset is required; "T" and "Z" in any case.
RFC3339_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.\d{1,9})?"
    r"(?:[Zz]|[+-](\d{2}):(\d{2}))"
)


def _rfc3339(value: Any) -> str | None:
    problem = "must be an RFC 3339 timestamp with an offset, e.g. '2026-05-01T12:00:00Z'"
    match = RFC3339_RE.fullmatch(value) if isinstance(value, str) and len(value) <= 64 else None
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


# The workflow-engine annotation conventions: each key with the rule of its
# value. jobtrace.conventions (the client's typed constants) names the same
# keys; tests/test_conventions.py keeps the two in step.
WELL_KNOWN: dict[str, Callable[[Any], str | None]] = {
    "trigger.source": _string,
    "trigger.reason": _string,
    "trigger.parent_run_id": _run_id,
    "trigger.actor.id": _string,
    "decision.outcome": _string,
    "decision.rationale": _string,
    "decision.confidence": _number_0_1,
    "decision.alternatives": _array,
    "decision.used_fallback": _boolean,
    "approval.approvers": _strings,
    "approval.disposition": _disposition,
    "approval.timestamp": _rfc3339,
    "approval.policy.version": _string,
    "revision.number": _non_negative_integer,
    "revision.parent": _string,
    "failure.kind": _string,
    "failure.retryable": _boolean,
}
# Keys of earlier releases: refused with the key that replaced them, so that a
# client still writing them notices instead of recording untyped values.
RENAMED: dict[str, str] = {
    "decision.reason": "decision.reason was renamed decision.rationale",
    "approval.approver": (
        "approval.approver was replaced by approval.approvers (an array of strings)"
    ),
    "approval.approved": (
        "approval.approved was replaced by approval.disposition ('approved' or 'rejected')"
    ),
    "failure.category": "failure.category was renamed failure.kind",
    "trigger.type": (
        "trigger.type was replaced by trigger.source (what started the run)"
        " and trigger.reason (why)"
    ),
}
# Other keys of the conventions' namespaces are free, within these rules.
PREFIX_RULES: dict[str, Callable[[Any], str | None]] = {
    "trigger.": _scalar,
    "decision.": lambda value: None,
    "approval.": lambda value: None,
    "revision.": lambda value: None,
    "failure.": lambda value: None,
}


def check_key_value(v: Violations, field: str, key: str, value: Any) -> None:
    """Add a violation of `field` if the key is malformed or retired, or its
    value breaks the rule of its convention."""
    if len(key) > MAX_KEY or not KEY_RE.fullmatch(key):
        v.add(field, "key must be a dotted lowercase name such as 'decision.outcome'")
        return
    renamed = RENAMED.get(key)
    if renamed is not None:
        v.add(field, renamed)
        return
    rule = WELL_KNOWN.get(key)
    if rule is None:
        rule = next((r for p, r in PREFIX_RULES.items() if key.startswith(p)), None)
    problem = rule(value) if rule is not None else None
    if problem:
        v.add(field, problem)
