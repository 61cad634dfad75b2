"""The annotations an attestation vouches for: which ones it covers, their digest
(data["annotations"] of the signed evidence), and its check against the stored
annotations.

Which annotations (the "selector", written beside the digest):
- a job attestation (worker-completion, worker-failure, worker-cancellation) of a
  workflow step covers the annotations of its attempt: run_id = the workflow,
  job_id = the job, attempt = the attestation's attempt;
- one of a standalone job (its own run) covers those of its attempt and the
  run-level ones, which have no attempt: run_id = the job, attempt in (0, A);
- a workflow attestation covers the workflow's run-level annotations: run_id =
  the workflow, attempt = 0 (RUN scope, and STEP scope ones not about an attempt).
Each as stored when the attestation is written, in the transaction that writes
it: an ended attempt's pending annotations were published in that transaction
already (lifecycle.set_job), so the worker's annotations are all there.

The digest, so that an auditor recomputes it from ListAnnotations (FULL view):
    "sha256:" + hex(SHA-256(RFC 8785 (JCS) encoding of [canonical(a) for a in covered]))
covered in publication order (ListAnnotations order), canonical(a) being
    {"id", "tenant", "run_id", "job_id", "attempt", "scope" (AnnotationScope
     number), "scope_id", "key", "value", "actor": {"kind" (ActorKind number),
     "id", "version"}, "recorded_by", "payload" (null when none), "idempotency_key",
     "create_time_us" (create_time in microseconds since the epoch)}
and each item's "sha256" is the same hash of canonical(a) alone. The empty list's
digest is that of "[]". Annotations are never deleted by retention (only trace
events and attestations are): a covered annotation that is missing was deleted
by hand, and reads as tampered.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from jobtrace.domain import jcs
from jobtrace.model import JSON, Annotation
from jobtrace.store import jobs as store
from jobtrace.store.sql import Row

MEMBER = "annotations"
VERSION = 1
# Items (id, key, sha256) listed in an attestation; the digest and count cover
# every annotation the selector matches, however many (see Attested.listed).
MAX_LISTED = 1000


def canonical(a: Annotation) -> JSON:
    """The fields of an annotation that its digest covers (version 1)."""
    return {
        "id": a.id,
        "tenant": a.tenant,
        "run_id": a.run_id,
        "job_id": a.job_id,
        "attempt": a.attempt,
        "scope": int(a.scope),
        "scope_id": a.scope_id,
        "key": a.key,
        "value": a.value,
        "actor": {"kind": a.actor_kind, "id": a.actor_id, "version": a.actor_version},
        "recorded_by": a.recorded_by,
        "payload": a.payload,
        "idempotency_key": a.idempotency_key,
        "create_time_us": a.created_us,
    }


def _sha256(value: Any) -> str:
    return "sha256:" + hashlib.sha256(jcs.dumps(value)).hexdigest()


def selector(*, run_id: str, workflow_id: str, job_id: str, attempt: int) -> JSON:
    """Which annotations an attestation covers (see the module's docstring):
    a job's when `job_id` is given, else the workflow's run-level ones."""
    if not job_id:
        return {"run_id": run_id, "job_id": "", "attempts": [0]}
    if workflow_id:
        return {"run_id": run_id, "job_id": job_id, "attempts": [attempt]}
    return {"run_id": run_id, "job_id": "", "attempts": sorted({0, attempt})}


def _decode(row: Row) -> Annotation:
    return store.annotation_from_row(row)


async def covered(session: AsyncSession, sel: JSON, limit: int) -> list[Row]:
    """The stored annotations `sel` matches, in publication order (one query on
    the run's index)."""
    return await store.attested_annotations(
        session, sel["run_id"], sel["job_id"], sel["attempts"], limit
    )


def matching(rows: Sequence[Row], sel: JSON) -> list[Row]:
    """The rows of a run's annotations (all of them, in publication order)
    that `sel` matches, as `covered` reads them."""
    job_id, attempts = sel["job_id"], sel["attempts"]
    return [
        r
        for r in rows
        if r["run_id"] == sel["run_id"]
        and r["attempt"] in attempts
        and (not job_id or r["job_id"] == job_id)
    ]


async def evidence(session: AsyncSession, sel: JSON, run_rows: Sequence[Row] | None = None) -> JSON:
    """data["annotations"] of an attestation being written: the selector, the
    count and digest of every annotation it matches, and (id, key, sha256) of the
    first MAX_LISTED. Read in the caller's transaction, or taken from
    `run_rows`: every annotation of the run, read in it already."""
    rows = await covered(session, sel, 2**62) if run_rows is None else matching(run_rows, sel)
    canon = [canonical(_decode(r)) for r in rows]
    return {
        "version": VERSION,
        **sel,
        "count": len(canon),
        "digest": _sha256(canon),
        "items": [
            {"id": c["id"], "key": c["key"], "sha256": _sha256(c)} for c in canon[:MAX_LISTED]
        ],
        "listed_all": len(canon) <= MAX_LISTED,
    }


@dataclass(slots=True)
class AnnotationVerdict:
    """The attested annotations against the stored ones."""

    attested: bool  # the attestation has data.annotations (older ones do not)
    valid: bool = True
    changed_ids: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _shape_problem(block: Any) -> str | None:
    if not isinstance(block, dict) or block.get("version") != VERSION:
        return "data.annotations is not a version 1 annotations digest"
    items = block.get("items")
    attempts = block.get("attempts")
    if not (
        isinstance(block.get("run_id"), str)
        and isinstance(block.get("job_id"), str)
        and isinstance(attempts, list)
        and 1 <= len(attempts) <= 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in attempts)
        and isinstance(block.get("count"), int)
        and isinstance(block.get("digest"), str)
        and isinstance(block.get("listed_all"), bool)
        and isinstance(items, list)
        and all(
            isinstance(i, dict) and all(isinstance(i.get(k), str) for k in ("id", "key", "sha256"))
            for i in items
        )
    ):
        return "data.annotations is malformed"
    return None


def _canonical_of(row: Row) -> JSON | None:
    """The canonical form of a stored row; None when the row no longer decodes
    (edited by hand into something that is not an annotation)."""
    try:
        return canonical(_decode(row))
    except (TypeError, ValueError, KeyError):
        return None


async def verify(session: AsyncSession, data: Any) -> AnnotationVerdict:
    """Recompute the digest of the annotations an attestation's data covers, from
    the stored rows, and name each that changed or disappeared."""
    block = data.get(MEMBER) if isinstance(data, dict) else None
    if block is None:
        return AnnotationVerdict(attested=False)
    problem = _shape_problem(block)
    if problem is not None:
        return AnnotationVerdict(True, False, [], [problem])
    items: list[dict[str, str]] = block["items"]
    if block["listed_all"]:
        stored = await store.annotations_by_id(session, [i["id"] for i in items])
        rows: Sequence[Row | None] = [stored.get(i["id"]) for i in items]
    else:  # the first `count` the selector matches: more than were listed
        found = await covered(session, block, block["count"])
        rows = [*found, *[None] * (block["count"] - len(found))]
    verdict = AnnotationVerdict(attested=True)
    canon: list[JSON | None] = [_canonical_of(r) if r is not None else None for r in rows]
    for i, item in enumerate(items):
        c = canon[i] if i < len(canon) else None
        if c is None or c["id"] != item["id"]:
            verdict.changed_ids.append(item["id"])
            verdict.problems.append(f"annotation {item['id']} ({item['key']}) was deleted")
        elif _sha256(c) != item["sha256"]:
            verdict.changed_ids.append(item["id"])
            verdict.problems.append(
                f"annotation {item['id']} ({item['key']}) changed since it was attested"
            )
    whole = [c for c in canon if c is not None]
    if len(whole) != block["count"] or _sha256(whole) != block["digest"]:
        if not verdict.problems:  # beyond the listed items: unnamed
            verdict.problems.append(
                f"the {block['count']} attested annotations no longer hash to "
                f"data.annotations.digest (one beyond the first {MAX_LISTED} listed changed)"
            )
        verdict.valid = False
    verdict.valid = verdict.valid and not verdict.changed_ids
    return verdict
