"""Failure rules: the operator's file that classifies failed attempts (a kind) and
may make them non-retryable, retried later, or retried on another worker."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from jobtrace.domain.redact import backtracking_problem
from jobtrace.model import Backoff, Failure

# A kind is a short identifier: it becomes a metric label and an annotation value.
KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
MAX_RULES = 1000
# Bounds of BackoffPolicy (common.proto), which a rule's override keeps to.
MAX_INITIAL_MS = 3_600_000
MAX_DELAY_MS = 86_400_000
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_MS = {"ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}

_RULE_FIELDS = {"match", "kind", "retryable", "backoff", "avoid_same_worker"}
_MATCH_FIELDS = {"service", "code", "message"}
_BACKOFF_FIELDS = {"initial", "multiplier", "maximum", "delay"}


# Reports one problem: the field (dotted, within the rule) and what is wrong.
Fault = Callable[[str, str], None]


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the file, the rule
    and the field of every problem."""


@dataclass(frozen=True, slots=True)
class BackoffOverride:
    """A rule's backoff: the fields it sets replace the job's own."""

    initial_ms: int | None = None
    multiplier: float | None = None
    maximum_ms: int | None = None

    def applied_to(self, policy: Backoff) -> Backoff:
        return Backoff(
            initial_ms=policy.initial_ms if self.initial_ms is None else self.initial_ms,
            multiplier=policy.multiplier if self.multiplier is None else self.multiplier,
            maximum_ms=policy.maximum_ms if self.maximum_ms is None else self.maximum_ms,
        )


@dataclass(frozen=True, slots=True)
class FailureRule:
    """One rule: what it matches (every condition given must hold) and what it sets."""

    kind: str
    service: str | None = None
    codes: frozenset[str] | None = None
    message: re.Pattern[str] | None = None
    # None: the worker's word stands; False: not retried whatever the worker said.
    retryable: bool | None = None
    backoff: BackoffOverride | None = None
    avoid_same_worker: bool = False

    def matches(self, service: str, failure: Failure) -> bool:
        if self.service is not None and not fnmatch.fnmatchcase(service, self.service):
            return False
        if self.codes is not None and failure.code not in self.codes:
            return False
        return self.message is None or self.message.search(failure.reason) is not None


@dataclass(frozen=True, slots=True)
class FailureRules:
    """The rules in service, in file order: the first that matches wins."""

    rules: tuple[FailureRule, ...] = ()

    def classify(self, service: str, failure: Failure) -> FailureRule | None:
        for rule in self.rules:
            if rule.matches(service, failure):
                return rule
        return None


def load_rules_file(path: Path) -> FailureRules:
    """The rules in `path`: OSError when it cannot be read, RulesError when it
    is not a valid rules file."""
    return parse_rules(path.read_text(encoding="utf-8"), str(path))


def parse_rules(text: str, source: str) -> FailureRules:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RulesError(f"{source}: not valid YAML: {exc}") from None
    problems: list[str] = []
    if doc is None:
        return FailureRules()
    if not isinstance(doc, dict) or set(doc) - {"rules"}:
        unknown = sorted(map(str, set(doc) - {"rules"})) if isinstance(doc, dict) else []
        why = f"unknown fields {unknown}" if unknown else "must be a mapping"
        raise RulesError(f"{source}: {why}; expected a mapping with one field, 'rules' (a list)")
    items = [] if doc.get("rules") is None else doc["rules"]
    if not isinstance(items, list):
        raise RulesError(f"{source}: rules: must be a list of rules")
    if len(items) > MAX_RULES:
        raise RulesError(f"{source}: rules: at most {MAX_RULES} rules (got {len(items)})")
    rules = []
    for i, item in enumerate(items):

        def fault(field: str, problem: str, i: int = i) -> None:
            where = f"rules[{i}].{field}" if field else f"rules[{i}]"
            problems.append(f"{source}: {where}: {problem}")

        rule = _rule(item, fault)
        if rule is not None:
            rules.append(rule)
    if problems:
        raise RulesError("; ".join(problems))
    return FailureRules(tuple(rules))


def _rule(item: Any, bad: Fault) -> FailureRule | None:
    if not isinstance(item, dict):
        bad("", "must be a mapping with match and kind")
        return None
    errors: list[str] = []

    def fault(field: str, problem: str) -> None:
        errors.append(field)
        bad(field, problem)

    for name in sorted(map(str, set(item) - _RULE_FIELDS)):
        fault(name, f"unknown field (known: {', '.join(sorted(_RULE_FIELDS))})")
    kind = item.get("kind")
    if not isinstance(kind, str) or not KIND_RE.fullmatch(kind):
        fault("kind", "required: a short identifier such as oom ([a-z][a-z0-9_]*, at most 64)")
    service = codes = message = None
    match = item.get("match")
    if not isinstance(match, dict) or not match:
        fault("match", "required: a mapping with at least one of service, code, message")
        match = {}
    for name in sorted(map(str, set(match) - _MATCH_FIELDS)):
        fault(f"match.{name}", "unknown field (known: code, message, service)")
    if "service" in match:
        service = match["service"]
        if not isinstance(service, str) or not service:
            fault("match.service", "must be a non-empty glob such as 'llm-*'")
    if "code" in match:
        raw = match["code"]
        # A code that YAML reads as a number (code: 137) is its text.
        listed = [
            str(c) if isinstance(c, int) and not isinstance(c, bool) else c
            for c in (raw if isinstance(raw, list) else [raw])
        ]
        if not listed or not all(isinstance(c, str) and c for c in listed):
            fault("match.code", "must be a non-empty code or a list of them")
        else:
            codes = frozenset(listed)
    if "message" in match:
        message = _regex(match["message"], fault)
    retryable = item.get("retryable")
    if retryable is not None and not isinstance(retryable, bool):
        fault("retryable", "must be true or false")
    avoid = item.get("avoid_same_worker", False)
    if not isinstance(avoid, bool):
        fault("avoid_same_worker", "must be true or false")
    backoff = _backoff(item["backoff"], fault) if item.get("backoff") is not None else None
    if errors:
        return None
    return FailureRule(
        kind=str(kind),
        service=service,
        codes=codes,
        message=message,
        retryable=retryable,
        backoff=backoff,
        avoid_same_worker=bool(avoid),
    )


def _regex(value: Any, fault: Fault) -> re.Pattern[str] | None:
    if not isinstance(value, str) or not value:
        fault("match.message", "must be a non-empty regular expression")
        return None
    try:
        pattern = re.compile(value)
    except re.error as exc:
        fault("match.message", f"bad regular expression {value!r}: {exc}")
        return None
    problem = backtracking_problem(value)
    if problem:
        fault("match.message", f"regular expression {value!r} is not safe to apply: {problem}")
        return None
    return pattern


def _backoff(value: Any, fault: Fault) -> BackoffOverride | None:
    if not isinstance(value, dict) or not value:
        fault("backoff", "must be a mapping: initial, multiplier, maximum, or delay alone")
        return None
    unknown = sorted(map(str, set(value) - _BACKOFF_FIELDS))
    for name in unknown:
        fault(f"backoff.{name}", "unknown field (known: delay, initial, maximum, multiplier)")
    if unknown:
        return None
    if "delay" in value:
        if len(value) > 1:
            fault("backoff.delay", "a fixed delay stands alone (no initial, multiplier, maximum)")
            return None
        delay = _duration_ms(value["delay"], "backoff.delay", MAX_DELAY_MS, fault)
        return None if delay is None else BackoffOverride(delay, 1.0, delay)
    initial = maximum = None
    multiplier: float | None = None
    if "initial" in value:
        initial = _duration_ms(value["initial"], "backoff.initial", MAX_INITIAL_MS, fault)
        if initial is None:
            return None
    if "maximum" in value:
        maximum = _duration_ms(value["maximum"], "backoff.maximum", MAX_DELAY_MS, fault)
        if maximum is None:
            return None
    if "multiplier" in value:
        m = value["multiplier"]
        if isinstance(m, bool) or not isinstance(m, int | float) or not 1.0 <= m <= 10.0:
            fault("backoff.multiplier", "must be a number from 1 to 10")
            return None
        multiplier = float(m)
    return BackoffOverride(initial, multiplier, maximum)


def _duration_ms(value: Any, field: str, bound_ms: int, fault: Fault) -> int | None:
    """A duration: seconds (a number) or text such as 500ms, 1.5s, 2m, 1h."""
    ms: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        ms = float(value) * 1000
    elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value.strip())):
        ms = float(m.group(1)) * _UNIT_MS[m.group(2)]
    if ms is None or not 0 <= ms <= bound_ms:
        fault(field, f"must be a duration from 0 to {bound_ms // 1000}s (seconds, or 500ms, 2m)")
        return None
    return int(ms)
