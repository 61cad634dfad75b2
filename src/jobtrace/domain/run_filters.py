"""The filters of listings across runs (jobs, workflows, attestations): their
checks, and what a page token is bound to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jobtrace.domain.errors import Violations
from jobtrace.domain.validation import LABEL_KEY_RE, MAX_LABEL_VALUE, printable
from jobtrace.model import RunState
from jobtrace.store.attest import AttestationQuery

# Label pairs one listing may require: each is one more indexed lookup.
MAX_LABEL_FILTERS = 16
MAX_USER_ID = 256
MAX_WORKER_ID = 128
MAX_SERVICE = 128
# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
MIN_SECONDS = -62_135_596_800
MAX_SECONDS = 253_402_300_799

# A point in time as a Timestamp gives it: (seconds, nanos).
Instant = tuple[int, int]


@dataclass(frozen=True, slots=True)
class RunFilter:
    """The filters ListJobs and ListWorkflows share (worker_id: jobs only);
    empty / None match all. `created_after` is inclusive, `created_before`
    exclusive."""

    labels: Mapping[str, str] = field(default_factory=dict)
    user_id: str = ""
    worker_id: str = ""
    created_after: Instant | None = None
    created_before: Instant | None = None
    include_total: bool = False


NO_RUN_FILTER = RunFilter()


@dataclass(frozen=True, slots=True)
class CheckedRunFilter:
    """A RunFilter as the store reads it: labels as sorted pairs, times in µs."""

    labels: tuple[tuple[str, str], ...]
    user_id: str
    worker_id: str
    after_us: int | None
    before_us: int | None

    def token_filters(self) -> dict[str, Any]:
        """What a page token is bound to besides a listing's older filters:
        only the filters that are set, so tokens of earlier releases (which
        had none of them) stay valid."""
        out: dict[str, Any] = {}
        if self.labels:
            out["labels"] = [list(pair) for pair in self.labels]
        if self.user_id:
            out["user_id"] = self.user_id
        if self.worker_id:
            out["worker_id"] = self.worker_id
        if self.after_us is not None:
            out["after_us"] = self.after_us
        if self.before_us is not None:
            out["before_us"] = self.before_us
        return out


def check_instant(v: Violations, name: str, instant: Instant | None) -> int | None:
    """The instant in µs since the epoch; a violation when it is no valid Timestamp."""
    if instant is None:
        return None
    seconds, nanos = instant
    if not MIN_SECONDS <= seconds <= MAX_SECONDS or not 0 <= nanos < 1_000_000_000:
        v.add(
            name,
            "must be a valid Timestamp: seconds within 0001-01-01..9999-12-31 UTC "
            f"and nanos within 0..999999999 (got seconds={seconds}, nanos={nanos})",
        )
        return None
    return seconds * 1_000_000 + nanos // 1_000


def check_range(
    v: Violations,
    after_field: str,
    after: Instant | None,
    before_field: str,
    before: Instant | None,
) -> tuple[int | None, int | None]:
    """[after, before) in µs; a violation when either is malformed or before < after."""
    after_us = check_instant(v, after_field, after)
    before_us = check_instant(v, before_field, before)
    if after_us is not None and before_us is not None and before_us < after_us:
        v.add(before_field, f"must not be before {after_field}")
    return after_us, before_us


def check_name(v: Violations, name: str, value: str, limit: int) -> None:
    """An id given as a filter: at most `limit` printable characters."""
    if len(value) > limit or not printable(value):
        v.add(name, f"must be at most {limit} printable characters (got {len(value)})")


def check_label_filter(v: Violations, name: str, labels: Mapping[str, str]) -> None:
    if len(labels) > MAX_LABEL_FILTERS:
        v.add(name, f"at most {MAX_LABEL_FILTERS} label pairs (got {len(labels)})")
        return
    for key, value in labels.items():
        at = f"{name}[{key[:64]!r}]"
        if not key:
            v.add(at, "key must not be empty")
        elif not LABEL_KEY_RE.fullmatch(key):
            v.add(at, "key must be 1-63 characters of [a-z0-9._/-], starting with [a-z0-9]")
        if len(value) > MAX_LABEL_VALUE:
            v.add(at, f"value must be at most {MAX_LABEL_VALUE} characters (got {len(value)})")


def check_run_filter(v: Violations, f: RunFilter) -> CheckedRunFilter:
    check_label_filter(v, "labels", f.labels)
    check_name(v, "user_id", f.user_id, MAX_USER_ID)
    check_name(v, "worker_id", f.worker_id, MAX_WORKER_ID)
    after_us, before_us = check_range(
        v, "created_after", f.created_after, "created_before", f.created_before
    )
    return CheckedRunFilter(
        labels=tuple(sorted(f.labels.items())),
        user_id=f.user_id,
        worker_id=f.worker_id,
        after_us=after_us,
        before_us=before_us,
    )


@dataclass(frozen=True, slots=True)
class AttestationFilter:
    """ListAttestations' filters across runs; empty / zero / None match all.
    `since` is inclusive, `until` exclusive."""

    state: int = 0
    service: str = ""
    user_id: str = ""
    worker_id: str = ""
    since: Instant | None = None
    until: Instant | None = None


def check_attestation_filter(
    v: Violations, f: AttestationFilter
) -> tuple[AttestationQuery, dict[str, Any]]:
    """The store's query for these filters, and what a page token is bound
    to (only the filters that are set, as CheckedRunFilter.token_filters)."""
    if f.state not in RunState.__members__.values():
        v.add("state", f"unknown RunState value {f.state}")
    check_name(v, "service", f.service, MAX_SERVICE)
    check_name(v, "user_id", f.user_id, MAX_USER_ID)
    check_name(v, "worker_id", f.worker_id, MAX_WORKER_ID)
    since_us, until_us = check_range(v, "since", f.since, "until", f.until)
    query = AttestationQuery(
        state=f.state,
        service=f.service,
        user_id=f.user_id,
        worker_id=f.worker_id,
        since_us=since_us,
        until_us=until_us,
    )
    bound: dict[str, Any] = {
        name: value
        for name, value in (
            ("state", f.state),
            ("service", f.service),
            ("user_id", f.user_id),
            ("worker_id", f.worker_id),
        )
        if value
    }
    if since_us is not None:
        bound["since_us"] = since_us
    if until_us is not None:
        bound["until_us"] = until_us
    return query, bound


NO_ATTESTATION_FILTER = AttestationFilter()
