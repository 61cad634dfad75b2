"""Annotation conventions: key syntax and the rule of each well-known key's value."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from jobtrace.conventions import RULES
from jobtrace.domain.errors import Violations

# Applied with fullmatch to at most MAX_KEY characters; possessive, so no backtracking.
KEY_RE = re.compile(r"[a-z][a-z0-9_]*+(?:\.[a-z0-9_]++)++")
MAX_KEY = 256


def _scalar(value: Any) -> str | None:
    if value is None or isinstance(value, dict | list):
        return "must be a string, number or boolean"
    return None


# The workflow-engine annotation conventions: each key with the rule of its
# value, from jobtrace.conventions, the one table the client's builders check
# against too (it is a plain module: no client, no server in it).
WELL_KNOWN: Mapping[str, Callable[[Any], str | None]] = RULES
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
