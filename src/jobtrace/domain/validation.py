"""Field checks shared by every request: each adds violations instead of raising."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from jobtrace.domain.errors import Violations
from jobtrace.model import Backoff, JobSpec, View

# Applied with fullmatch (a "$" would also accept a trailing newline); each reads
# at most one character past its bound, so the cost never grows with the input.
SERVICE_RE = re.compile(r"[A-Za-z0-9._:/-]{1,128}+")
STEP_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}+")
LABEL_KEY_RE = re.compile(r"[a-z0-9][a-z0-9._/-]{0,62}+")

MAX_PAYLOAD_BYTES = 1 << 20
MAX_LABELS = 64
MAX_LABEL_VALUE = 256
MAX_AFFINITY_KEYS = 32
MAX_AFFINITY_KEY = 256
# A worker may cache more keys than one job names (hello and heartbeat alike).
MAX_WORKER_AFFINITY_KEYS = 1000
MAX_WORKER_LABEL_KEY = 128
MAX_CONCURRENCY = 1000
MAX_PRIORITY = 1000
DEFAULT_MAX_ATTEMPTS = 3
MAX_ATTEMPTS = 100
MAX_TIMEOUT_MS = 7 * 24 * 3600 * 1000
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
MAX_STEPS = 1000


def printable(value: str) -> bool:
    return all(ch.isprintable() for ch in value)


def check_request_id(v: Violations, field: str, value: str) -> None:
    if not value:
        v.add(field, "required: an idempotency key of 1-256 printable characters")
    elif len(value) > 256 or not printable(value):
        v.add(field, "must be 1-256 printable characters")


def check_id(v: Violations, field: str, value: str) -> None:
    if not value:
        v.add(field, "required")
    elif len(value) > 64 or not printable(value):
        v.add(field, "must be an id of at most 64 printable characters")


def check_text(v: Violations, field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        v.add(field, f"must be at most {limit} characters (got {len(value)})")


def check_labels(
    v: Violations, field: str, labels: Mapping[str, str], *, free_keys: bool = False
) -> None:
    """Bounded labels; keys match LABEL_KEY_RE, or with `free_keys` (the labels a
    worker describes itself with) are any 1-MAX_WORKER_LABEL_KEY characters."""
    if len(labels) > MAX_LABELS:
        v.add(field, f"at most {MAX_LABELS} labels (got {len(labels)})")
        return
    for key, value in labels.items():
        at = f"{field}[{key[:64]!r}]"
        if free_keys:
            if not key or len(key) > MAX_WORKER_LABEL_KEY:
                v.add(at, f"key must be 1-{MAX_WORKER_LABEL_KEY} characters")
        elif not LABEL_KEY_RE.fullmatch(key):
            v.add(at, "key must be 1-63 characters of [a-z0-9._/-]")
        if len(value) > MAX_LABEL_VALUE:
            v.add(at, f"value must be at most {MAX_LABEL_VALUE} characters")


def check_page_size(v: Violations, field: str, page_size: int) -> int:
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    if page_size < 0 or page_size > MAX_PAGE_SIZE:
        v.add(field, f"must be between 1 and {MAX_PAGE_SIZE} (got {page_size})")
        return DEFAULT_PAGE_SIZE
    return page_size


def check_size(v: Violations, field: str, size: int, limit: int = MAX_PAYLOAD_BYTES) -> None:
    if size > limit:
        v.add(field, f"must be at most {limit} bytes serialised (got {size})")


def normalize_spec(
    v: Violations,
    field: str,
    spec: JobSpec,
    payload_bytes: int,
    *,
    default_priority: int = 0,
) -> JobSpec:
    """Check a submitted spec and return it with defaults applied."""
    if not spec.service:
        v.add(f"{field}.service", "required: the capability a worker must have")
    elif not SERVICE_RE.fullmatch(spec.service):
        v.add(f"{field}.service", "must be 1-128 characters of [A-Za-z0-9._:/-]")
    check_size(v, f"{field}.payload", payload_bytes)
    if not -MAX_PRIORITY <= spec.priority <= MAX_PRIORITY:
        v.add(f"{field}.priority", f"must be between {-MAX_PRIORITY} and {MAX_PRIORITY}")
    max_attempts = spec.max_attempts or DEFAULT_MAX_ATTEMPTS
    if not 1 <= max_attempts <= MAX_ATTEMPTS:
        v.add(f"{field}.max_attempts", f"must be between 1 and {MAX_ATTEMPTS} (0 means 3)")
    if spec.timeout_ms < 0 or spec.timeout_ms > MAX_TIMEOUT_MS:
        v.add(f"{field}.timeout", "must be positive and at most 7 days")
    if spec.not_before_us < 0:
        v.add(f"{field}.not_before", "must not be before 1970")
    check_affinity(v, f"{field}.affinity_keys", spec.affinity_keys)
    check_labels(v, f"{field}.labels", spec.labels)
    backoff = _normalize_backoff(v, f"{field}.backoff", spec.backoff)
    return JobSpec(
        service=spec.service,
        payload=spec.payload,
        priority=spec.priority or default_priority,
        max_attempts=max_attempts,
        timeout_ms=spec.timeout_ms,
        not_before_us=spec.not_before_us,
        affinity_keys=tuple(dict.fromkeys(spec.affinity_keys)),
        labels=dict(spec.labels),
        backoff=backoff,
    )


def check_affinity(
    v: Violations, field: str, keys: Sequence[str], limit: int = MAX_AFFINITY_KEYS
) -> None:
    if len(keys) > limit:
        # One violation, not one per key of a list that may be huge.
        v.add(field, f"at most {limit} keys (got {len(keys)})")
        return
    for i, key in enumerate(keys):
        if not key or len(key) > MAX_AFFINITY_KEY:
            v.add(f"{field}[{i}]", f"must be 1-{MAX_AFFINITY_KEY} characters")


def _normalize_backoff(v: Violations, field: str, raw: Backoff) -> Backoff:
    default = Backoff()
    initial = raw.initial_ms or default.initial_ms
    multiplier = raw.multiplier or default.multiplier
    maximum = raw.maximum_ms or default.maximum_ms
    if not 0 < initial <= 3_600_000:
        v.add(f"{field}.initial_interval", "must be between 1 ms and 1 hour")
    if not 1.0 <= multiplier <= 10.0:
        v.add(f"{field}.multiplier", "must be between 1.0 and 10.0")
    if not 0 < maximum <= 86_400_000:
        v.add(f"{field}.maximum_interval", "must be between 1 ms and 1 day")
    return Backoff(initial_ms=initial, multiplier=multiplier, maximum_ms=max(maximum, initial))


def check_view(v: Violations, field: str, view: int) -> bool:
    """Whether a listing returns its items whole: FULL; UNSPECIFIED means BASIC."""
    if view not in View.__members__.values():
        v.add(field, f"unknown value {view}: BASIC (1) or FULL (2)")
        return False
    return view == View.FULL
