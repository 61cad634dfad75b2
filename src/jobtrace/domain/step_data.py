"""Data between workflow steps: upstream results for a step's worker, a
workflow's outputs, and numbers that keep their type."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.model import JSON, Job, StepResultRef, StepResults
from jobtrace.store import jobs as store

# The results carried inline in one assignment (upstream) or on one workflow
# (outputs), in bytes of stored JSON; what does not fit travels by reference
# (StepResultRef), never cut.
INLINE_RESULTS_BYTES = 256 * 1024
# Integers a double holds exactly: a Struct number in this range with no
# fraction was an integer.
_EXACT = 2**53


def fit(rows: Sequence[tuple[str, str, int, JSON | None]], budget: int) -> StepResults:
    """Inline the smallest results first while their total fits `budget`;
    every other one becomes a reference (in step name order)."""
    inline: JSON = {}
    refs: list[StepResultRef] = []
    used = 0
    for name, job_id, size, result in sorted(rows, key=lambda r: (r[2], r[0])):
        if result is not None and used + size <= budget:
            inline[name] = result
            used += size
        else:
            refs.append(StepResultRef(name, job_id, size))
    refs.sort(key=lambda r: r.step_name)
    return StepResults(dict(sorted(inline.items())), tuple(refs))


async def results_of(
    db: AsyncSession, workflow_id: str, step_names: Collection[str]
) -> StepResults:
    """The results of these completed steps of a workflow, fitted: one query."""
    rows = await store.step_results(db, workflow_id, step_names, INLINE_RESULTS_BYTES)
    return fit(rows, INLINE_RESULTS_BYTES)


async def upstream(db: AsyncSession, job: Job) -> StepResults | None:
    """What a step's worker receives of the steps it depends on; None (and no
    query) for a standalone job or a step that depends on nothing."""
    if not job.workflow_id or not job.depends_on:
        return None
    return await results_of(db, job.workflow_id, job.depends_on)


def output_steps(names: Sequence[str], depends_on: Sequence[Sequence[str]]) -> list[str]:
    """The steps whose results are a workflow's outputs by default: those no
    other step depends on, in submission order."""
    needed = {d for deps in depends_on for d in deps}
    # A fan-out step's children ("step[0]", ...) are its result, not outputs.
    return [n for n in names if n not in needed and not n.endswith("]")]


def integral(value: Any) -> Any:
    """A JSON value read from a Struct, whose numbers are all doubles, with
    each integral number (within 2**53) as an int: a Struct cannot tell 2
    from 2.0, and a user who sent 1048576 wants 1048576 back."""
    if isinstance(value, float):
        if value.is_integer() and -_EXACT <= value <= _EXACT:
            return int(value)
        return value
    if isinstance(value, dict):
        return {k: integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [integral(v) for v in value]
    return value


def exact_json(value: Any) -> bytes:
    """A JSON value as exact, compact UTF-8 JSON (ints stay ints)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
