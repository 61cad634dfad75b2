"""The size of attestation evidence: what it weighs as stored and as sent, and a
workflow's step outputs fitted to a budget, the largest replaced by digests."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from jobtrace.domain import attest
from jobtrace.domain.attest import (
    MARKER_MEMBER,
    Sanitized,
    canonical,
    off_loop_if_large,
    sanitize_name,
)
from jobtrace.domain.redact import DEFAULT, Redaction
from jobtrace.model import JSON

# The most an attestation's data weighs, both as RFC 8785 JSON (what its digest
# covers, what the database stores and a DSSE envelope carries) and as the
# protobuf Struct that GetAttestation and ListAttestations send. With its
# envelope, an attestation then fits in 3 MiB and change: under the 4 MiB a gRPC
# client accepts by default, and under a FULL listing's page. A server whose
# largest message is smaller takes a quarter of it (see data_budget).
ATTESTATION_DATA_BYTES = 3 * 1024 * 1024 // 2
# The marker kind of a step output left out for its size.
OVERSIZE = "oversize"
# Step results loaded at once while fitting outputs (by stored size; at least one).
LOAD_BYTES = 4 * 1024 * 1024
# Room for the length prefixes that grow with the outputs object (three nested
# ones, up to 4 more bytes each).
_STRUCT_SLACK = 12


def data_budget(max_message_bytes: int) -> int:
    """The budget of an attestation's data on a server whose largest message is
    `max_message_bytes`: ATTESTATION_DATA_BYTES, or a quarter of the largest
    message if that is less (an attestation and its envelope in half of it)."""
    return min(ATTESTATION_DATA_BYTES, max_message_bytes // 4)


def oversize_marker(value: Any) -> JSON:
    """What stands for a step result left out of an attestation for its size:
    the SHA-256 and byte length of the result's RFC 8785 encoding (the result
    as GetJob returns it), so that the attestation still proves what came back.
    Shaped as the sanitiser's markers, and as unforgeable: caller data cannot
    hold an object with a "redacted" member (see attest.sanitize)."""
    encoded = canonical(value)
    return {
        MARKER_MEMBER: OVERSIZE,
        "media_type": "application/json",
        "sha256": hashlib.sha256(encoded).hexdigest(),
        "length": len(encoded),
    }


# An oversize marker as large as any: the most one reserves.
_LARGEST_MARKER: JSON = {
    MARKER_MEMBER: OVERSIZE,
    "media_type": "application/json",
    "sha256": "0" * 64,
    "length": 2**53,
}


def struct_bytes(value: Any) -> int:
    """The bytes of `value`, a JSON value, encoded as a google.protobuf.Value
    (what a Struct field holds); at least as many as protobuf writes."""
    if value is None or isinstance(value, bool):
        return 2  # tag, then the enum or the bool
    if isinstance(value, int | float):
        return 9  # tag, then 8 bytes of double
    if isinstance(value, str):
        return _field(len(value.encode()))
    if isinstance(value, dict):
        return _field(_members_bytes(value))
    if isinstance(value, list | tuple):
        return _field(sum(_field(struct_bytes(v)) for v in value))
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _members_bytes(members: dict[str, Any]) -> int:
    return sum(_member_bytes(name, v) for name, v in members.items())


def _member_bytes(name: str, value: Any) -> int:
    """One entry of a Struct's map: key and value, each tagged and length-prefixed."""
    return _field(_field(len(name.encode())) + _field(struct_bytes(value)))


def _field(length: int) -> int:
    """A length-delimited field: tag, length, content."""
    return 1 + max(1, (length.bit_length() + 6) // 7) + length


def member_weight(name: str, value: Any) -> tuple[int, int]:
    """(JSON bytes, Struct bytes) that a member `name: value` adds to an object:
    `"name":value` and a comma; its map entry."""
    return len(canonical(name)) + 1 + len(canonical(value)) + 1, _member_bytes(name, value)


@dataclass(frozen=True, slots=True)
class StoredOutput:
    """A completed step's result as stored: which step, which job, how many bytes."""

    step_name: str
    job_id: str
    stored_bytes: int


async def fit_outputs(
    base: JSON,
    member: str,
    outputs: Sequence[StoredOutput],
    load: Callable[[list[str]], Awaitable[dict[str, Any]]],
    *,
    budget: int,
    redaction: Redaction = DEFAULT,
) -> Sanitized:
    """`base` with `member` holding each step's result by step name, sanitised,
    so that the whole weighs at most `budget` (as JSON and as a Struct, see
    ATTESTATION_DATA_BYTES). Results are taken smallest first, as stored sizes
    order them (`outputs`, in that order); from the first that does not fit,
    each is replaced by its oversize_marker. `load(job_ids)` reads results by
    job id, LOAD_BYTES of them at a time, so memory holds the budget and one
    load, never every result. The rest of `base` (the request context, the
    step list) is never replaced: with every output a marker, the data may
    weigh more than `budget` only if that rest does."""
    clean, (json_used, struct_used) = await off_loop_if_large(
        base, _weighed_whole, {**base, member: {}}, redaction
    )
    json_left = budget - json_used
    struct_left = budget - struct_used - _STRUCT_SLACK
    # Every output holds at least a marker: their room is set aside first.
    names = {o.job_id: sanitize_name(o.step_name, redaction) for o in outputs}
    reserved = {job_id: member_weight(name, _LARGEST_MARKER) for job_id, name in names.items()}
    json_left -= sum(j for j, _ in reserved.values())
    struct_left -= sum(s for _, s in reserved.values())
    fitted: JSON = {}
    fitting = True
    for chunk in _chunks(outputs):
        results = await load([o.job_id for o in chunk])
        for o in chunk:
            raw, name = results.get(o.job_id), names[o.job_id]
            if fitting:
                value, (j, s) = await off_loop_if_large(raw, _weighed, name, raw, redaction)
                marker_j, marker_s = reserved[o.job_id]
                if j - marker_j <= json_left and s - marker_s <= struct_left:
                    fitted[name] = value
                    json_left -= j - marker_j
                    struct_left -= s - marker_s
                    continue
                fitting = False  # this one and every larger one: markers
            fitted[name] = await off_loop_if_large(raw, oversize_marker, raw)
    return Sanitized({**clean, member: fitted})


# attest.sanitize is looked up when called (not imported by name): the tests
# wrap it to observe on which thread evidence is sanitised.
def _weighed_whole(raw: JSON, redaction: Redaction) -> tuple[JSON, tuple[int, int]]:
    value = attest.sanitize(raw, redaction)
    return value, (len(canonical(value)), struct_bytes(value))


def _weighed(name: str, raw: Any, redaction: Redaction) -> tuple[Any, tuple[int, int]]:
    value = attest.sanitize(raw, redaction)
    return value, member_weight(name, value)


def _chunks(outputs: Sequence[StoredOutput]) -> list[list[StoredOutput]]:
    chunks: list[list[StoredOutput]] = []
    size = 0
    for o in outputs:
        if not chunks or size + o.stored_bytes > LOAD_BYTES:
            chunks.append([])
            size = 0
        chunks[-1].append(o)
        size += o.stored_bytes
    return chunks
