"""JSON columns: compact, deterministic encoding of documents stored as text."""

from __future__ import annotations

import json
from typing import Any

from jobtrace.model import Backoff, Failure, StepResultRef, StepResults


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def loads(text: str | None) -> Any:
    if text is None or text == "null":
        return None
    # Most list and map columns are empty: skip the parser (a new object each time).
    if text == "[]":
        return []
    if text == "{}":
        return {}
    return json.loads(text)


def failure_dumps(failure: Failure | None) -> str | None:
    if failure is None:
        return None
    stored = {
        "reason": failure.reason,
        "code": failure.code,
        "retryable": failure.retryable,
        "details": failure.details,
        "attempt": failure.attempt,
    }
    if failure.kind:  # only classified failures carry one (rows stay as they were)
        stored["kind"] = failure.kind
    return dumps(stored)


def failure_loads(text: str | None) -> Failure | None:
    data = loads(text)
    return None if data is None else Failure(**data)


def backoff_dumps(backoff: Backoff) -> str:
    return dumps(
        {
            "initial_ms": backoff.initial_ms,
            "multiplier": backoff.multiplier,
            "maximum_ms": backoff.maximum_ms,
        }
    )


_BACKOFFS: dict[str, Backoff] = {}


def backoff_loads(text: str) -> Backoff:
    """Backoff is immutable and most jobs share a few policies: decoded once each."""
    found = _BACKOFFS.get(text)
    if found is None:
        found = Backoff(**json.loads(text))
        if len(_BACKOFFS) >= 1024:  # bounded: policies are the caller's to choose
            _BACKOFFS.clear()
        _BACKOFFS[text] = found
    return found


def step_results_dumps(r: StepResults | None) -> str | None:
    if r is None:
        return None
    return dumps(
        {"inline": r.inline, "refs": [[x.step_name, x.job_id, x.size_bytes] for x in r.refs]}
    )


def step_results_loads(text: str | None) -> StepResults | None:
    data = loads(text)
    if data is None:
        return None
    return StepResults(
        data["inline"], tuple(StepResultRef(n, j, int(size)) for n, j, size in data["refs"])
    )
