"""W3C trace context of runs and attempts, without OpenTelemetry.

A run's span and each attempt's span have span ids derived from the run's id
(and the attempt's number), not random ones: any replica can name them
without having seen them, and without keeping anything in memory while the
run goes on. The span of an attempt is exported by the replica that ends it
(jobtrace.otel), but its context travels earlier, in the worker's
assignment (Assignment.traceparent), so the worker's handler span names it
as its parent. A run submitted without a traceparent gets a trace id derived
from its root run's id when OTLP is on.

Kept free of OpenTelemetry imports: this is on the dispatch path whether
OTLP is on or not.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from typing import NamedTuple

TRACEPARENT_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
ENDPOINT_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


def enabled(endpoint: str = "", env: Mapping[str, str] | None = None) -> bool:
    """Whether OTLP export is on: an endpoint flag or variable, and the SDK
    not disabled (OTEL_SDK_DISABLED=true)."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(endpoint or any(env.get(name, "").strip() for name in ENDPOINT_VARIABLES))


class TraceContext(NamedTuple):
    """One span's W3C context: ids as lowercase hex, flags as an int."""

    trace_id: str
    span_id: str
    flags: int

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"


def parse(traceparent: str) -> TraceContext | None:
    """A well formed version-00 traceparent with non-zero ids, else None."""
    m = TRACEPARENT_RE.fullmatch(traceparent)
    if m is None or m[1] == _ZERO_TRACE or m[2] == _ZERO_SPAN:
        return None
    return TraceContext(m[1], m[2], int(m[3], 16))


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("\x00".join(parts).encode()).digest()


def span_id(kind: str, run_id: str, attempt: int = 0) -> str:
    """The span id of a run ("run") or an attempt ("attempt") of job `run_id`."""
    raw = _digest("jobtrace", kind, run_id, str(attempt))[:8]
    if raw == bytes(8):  # never the invalid all-zero id
        raw = b"\x00" * 7 + b"\x01"
    return raw.hex()


def trace_id(root_run_id: str) -> str:
    """The trace id of a run submitted without a traceparent (OTLP on)."""
    raw = _digest("jobtrace", "trace", root_run_id)[:16]
    if raw == bytes(16):
        raw = b"\x00" * 15 + b"\x01"
    return raw.hex()


def run_trace(traceparent: str, root_run_id: str, derive: bool) -> TraceContext | None:
    """The caller's context a run continues: its submission's traceparent, or
    (with `derive`: OTLP on) a sampled root context of a trace of its own
    (span id all zero: the run span is the root). None: no trace."""
    parsed = parse(traceparent)
    if parsed is not None:
        return parsed
    if derive:
        return TraceContext(trace_id(root_run_id), _ZERO_SPAN, 1)
    return None


def attempt_traceparent(
    traceparent: str, job_id: str, workflow_id: str, attempt: int, derive: bool
) -> str:
    """What an assignment carries: the context of the attempt's span (its
    trace the run's; its span id derived from the job and the attempt), or
    "" when the run has no trace."""
    caller = run_trace(traceparent, workflow_id or job_id, derive)
    if caller is None:
        return ""
    return TraceContext(caller.trace_id, span_id("attempt", job_id, attempt), caller.flags).header()
