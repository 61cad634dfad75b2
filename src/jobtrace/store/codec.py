"""JSON columns: compact, deterministic encoding of documents stored as text."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from jobtrace.model import (
    Backoff,
    Comparator,
    Failure,
    LabelRequirement,
    StepResultRef,
    StepResults,
)


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


def requirements_dumps(reqs: tuple[LabelRequirement, ...]) -> str:
    if not reqs:
        return "[]"
    return dumps(
        [
            {"k": r.key, "v": r.value, "c": int(r.comparator), "r": r.required, "w": r.weight}
            for r in reqs
        ]
    )


def requirements_loads(text: str) -> tuple[LabelRequirement, ...]:
    if text == "[]":
        return ()
    return tuple(
        LabelRequirement(
            key=d["k"],
            value=d["v"] if isinstance(d["v"], str) else float(d["v"]),
            comparator=Comparator(d["c"]),
            required=d["r"],
            weight=float(d["w"]),
        )
        for d in json.loads(text)
    )


def affinity_dumps(affinity: tuple[tuple[str, float], ...]) -> str:
    return dumps([[k, w] for k, w in affinity]) if affinity else "[]"


def affinity_loads(text: str) -> tuple[tuple[str, float], ...]:
    if text == "[]":
        return ()
    return tuple((k, float(w)) for k, w in json.loads(text))


def placement_class(reqs: tuple[LabelRequirement, ...]) -> str:
    """A short digest of the required ones of `reqs` ('' when none is): jobs of
    one class can be taken by the same workers, so the dispatch read skips,
    in SQL, the classes no free worker meets (no head-of-line blocking)."""
    required = sorted(
        (r.key, int(r.comparator), "s" if isinstance(r.value, str) else "n", str(r.value))
        for r in reqs
        if r.required
    )
    if not required:
        return ""
    return hashlib.sha256(dumps(required).encode()).hexdigest()[:16]
