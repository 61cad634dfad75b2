"""Time-ordered, prefixed identifiers (ULID-style: 48-bit ms time + 80 random bits)."""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lowercase


def _encode(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """`prefix_` then 26 characters that sort by creation time."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    return f"{prefix}_{_encode(ms, 10)}{_encode(rand, 16)}"


JOB_PREFIX = "job"
WORKFLOW_PREFIX = "wf"


def run_kind(run_id: str) -> str:
    """'job', 'workflow' or '' for an id that is neither."""
    if run_id.startswith(JOB_PREFIX + "_"):
        return "job"
    if run_id.startswith(WORKFLOW_PREFIX + "_"):
        return "workflow"
    return ""
