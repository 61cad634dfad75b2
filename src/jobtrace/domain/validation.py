"""Field checks shared by every request: each adds violations instead of raising."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from jobtrace.domain import flow
from jobtrace.domain.errors import Violations
from jobtrace.model import Backoff, Comparator, JobSpec, LabelRequirement, View

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
MAX_WORKER_LABEL_REQUIREMENTS = 16
MAX_AFFINITY_WEIGHTS = 32
MAX_PLACEMENT_WEIGHT = 1000.0


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
    v: Violations,
    field: str,
    labels: Mapping[str, str],
    *,
    free_keys: bool = False,
    limit: int = MAX_LABELS,
    noun: str = "labels",
) -> None:
    """At most `limit` labels (`noun` in the message: "label pairs" for a
    filter); keys match LABEL_KEY_RE, or with `free_keys` (the labels a
    worker describes itself with) are any 1-MAX_WORKER_LABEL_KEY characters."""
    if len(labels) > limit:
        v.add(field, f"at most {limit} {noun} (got {len(labels)})")
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


def check_window(
    v: Violations,
    since_field: str,
    since_us: int | None,
    until_field: str,
    until_us: int | None,
    *,
    strict: bool = False,
) -> None:
    """A time window's end (exclusive) is not before its start; with `strict`,
    it is after it (an empty window is refused too)."""
    if since_us is None or until_us is None:
        return
    if strict and until_us <= since_us:
        v.add(until_field, f"must be after {since_field}")
    elif until_us < since_us:
        v.add(until_field, f"must not be before {since_field}")


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
    worker_labels = normalize_requirements(v, f"{field}.worker_labels", spec.worker_labels)
    affinity = normalize_affinity(v, f"{field}.affinity", spec.affinity)
    backoff = _normalize_backoff(v, f"{field}.backoff", spec.backoff)
    rate_limits, concurrency = flow.normalize(v, field, spec)
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
        worker_labels=worker_labels,
        affinity=affinity,
        rate_limits=rate_limits,
        concurrency=concurrency,
    )


def _check_weight(v: Violations, field: str, weight: float) -> float:
    """A placement weight: finite, within +-MAX_PLACEMENT_WEIGHT; 0 (unset) means 1."""
    if not math.isfinite(weight) or abs(weight) > MAX_PLACEMENT_WEIGHT:
        v.add(field, f"must be a finite number between -1000 and 1000 (got {weight})")
    return weight or 1.0


def normalize_requirements(
    v: Violations, field: str, reqs: Sequence[LabelRequirement]
) -> tuple[LabelRequirement, ...]:
    """Desired worker labels: keys as a worker's label keys (1-128 printable
    characters), a string value (at most 256 characters) or a finite number
    (required by the ordering comparators); UNSPECIFIED compares as EQUAL; a
    preference's weight 0 means 1 (a required one's weight is not used)."""
    if len(reqs) > MAX_WORKER_LABEL_REQUIREMENTS:
        v.add(field, f"at most {MAX_WORKER_LABEL_REQUIREMENTS} entries (got {len(reqs)})")
        return ()
    out: list[LabelRequirement] = []
    for i, req in enumerate(reqs):
        at = f"{field}[{i}]"
        if not req.key or len(req.key) > MAX_WORKER_LABEL_KEY or not printable(req.key):
            v.add(f"{at}.key", f"must be 1-{MAX_WORKER_LABEL_KEY} printable characters")
        try:
            cmp = Comparator(req.comparator) or Comparator.EQUAL
        except ValueError:
            v.add(f"{at}.comparator", f"unknown comparator {int(req.comparator)}")
            cmp = Comparator.EQUAL
        value = req.value
        if isinstance(value, str):
            if len(value) > MAX_LABEL_VALUE:
                v.add(f"{at}.value", f"must be at most {MAX_LABEL_VALUE} characters")
            if cmp.numeric:
                v.add(f"{at}.value", f"{cmp.name} compares numbers: the value must be a number")
        elif isinstance(value, float | int) and not isinstance(value, bool):
            value = float(value)
            if not math.isfinite(value):
                v.add(f"{at}.value", "must be a finite number")
        else:
            v.add(f"{at}.value", "required: a string or a number")
        weight = req.weight
        if req.required:
            if not math.isfinite(weight) or abs(weight) > MAX_PLACEMENT_WEIGHT:
                v.add(f"{at}.weight", "must be a finite number between -1000 and 1000")
            weight = 0.0
        else:
            weight = _check_weight(v, f"{at}.weight", weight)
        out.append(LabelRequirement(req.key, value, cmp, req.required, weight))
    return tuple(out)


def normalize_affinity(
    v: Violations, field: str, affinity: Sequence[tuple[str, float]]
) -> tuple[tuple[str, float], ...]:
    """Weighted affinity keys: at most 32 distinct keys of 1-256 characters,
    weights finite within +-1000 (0 means 1)."""
    if len(affinity) > MAX_AFFINITY_WEIGHTS:
        v.add(field, f"at most {MAX_AFFINITY_WEIGHTS} entries (got {len(affinity)})")
        return ()
    out: dict[str, float] = {}
    for i, (key, weight) in enumerate(affinity):
        at = f"{field}[{i}]"
        if not key or len(key) > MAX_AFFINITY_KEY:
            v.add(f"{at}.key", f"must be 1-{MAX_AFFINITY_KEY} characters")
        elif key in out:
            v.add(f"{at}.key", f"{key[:64]!r} is named twice")
        out[key] = _check_weight(v, f"{at}.weight", weight)
    return tuple(out.items())


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
