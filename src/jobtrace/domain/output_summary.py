"""The output summary of a COMPLETED event: what a reader of the trace sees of a result."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from jobtrace.domain import jcs
from jobtrace.domain.attest import off_loop_if_large, redact
from jobtrace.domain.redact import Redaction
from jobtrace.model import JSON

# A result whose redacted JSON (RFC 8785) is at most this many bytes is its
# own summary; a larger one is summarised by its digest, size and keys.
INLINE_BYTES = 1024
# The most top-level keys (or nothing, for a list) a digest summary names.
MAX_KEYS = 100
# The most a worker's own summary (CompleteReport.output_summary) weighs,
# serialised: as much as an appended event's output_summary.
MAX_WORKER_SUMMARY_BYTES = 64 * 1024


def _canonical(value: Any) -> bytes:
    try:
        return jcs.dumps(value)
    except jcs.NotCanonicalizable:
        # An integer beyond a double, say: its JSON as written.
        return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def derive_now(result: JSON | list[Any] | None, redaction: Redaction) -> JSON:
    """See `derive`; on the caller's thread. The summary is not redacted yet:
    trace.record redacts it with the event."""
    if result is None:
        return {}
    if len(_canonical(redact(result, redaction))) <= INLINE_BYTES:
        # Redacted as it is stored (trace.record redacts every event once:
        # redacting twice would escape the first pass's markers). A fan-out
        # step's result is a list: a summary is an object.
        return result if isinstance(result, dict) else {"items": result}
    raw = _canonical(result)
    summary: JSON = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
    if isinstance(result, dict):
        keys = list(result)
        summary["keys"] = keys[:MAX_KEYS]
        summary["key_count"] = len(keys)
    else:
        summary["item_count"] = len(result)
    # The key names are caller text too: trace.record redacts the summary.
    return summary


async def derive(result: JSON | list[Any] | None, redaction: Redaction) -> JSON:
    """The summary of a result: the result itself, redacted, when its RFC 8785
    JSON is at most INLINE_BYTES (a list, a fan-out step's, as {"items": [...]}),
    else {"sha256": hex SHA-256 of the result's RFC 8785 JSON as stored (before
    redaction: what GetJob returns), "size": bytes of that JSON, "keys": its
    first MAX_KEYS top-level keys in order, "key_count": how many it has} (a
    list: "item_count" instead of the keys). No result: {}. Off the event loop
    when the result is large."""
    return await off_loop_if_large(result, derive_now, result, redaction)
