"""The filters of listings across runs (jobs, workflows, attestations): their
checks, and what a page token is bound to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jobtrace.domain.errors import Violations
from jobtrace.domain.validation import check_labels, check_window, printable
from jobtrace.model import RunState
from jobtrace.store.attest import AttestationQuery

# Label pairs one listing may require: each is one more indexed lookup.
MAX_LABEL_FILTERS = 16
MAX_USER_ID = 256
MAX_WORKER_ID = 128
MAX_SERVICE = 128
MAX_RUN_ID = 64
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
    # A run's reruns: one level (parent_run_id), or its whole chain (root_run_id).
    parent_run_id: str = ""
    root_run_id: str = ""


NO_RUN_FILTER = RunFilter()


@dataclass(frozen=True, slots=True)
class CheckedRunFilter:
    """A RunFilter as the store reads it: labels as sorted pairs, times in µs."""

    labels: tuple[tuple[str, str], ...]
    user_id: str
    worker_id: str
    after_us: int | None
    before_us: int | None
    parent_run_id: str = ""
    root_run_id: str = ""

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
        if self.parent_run_id:
            out["parent_run_id"] = self.parent_run_id
        if self.root_run_id:
            out["root_run_id"] = self.root_run_id
        return out


def micros(instant: Instant | None) -> int | None:
    """The instant in µs since the epoch (a malformed Timestamp never gets
    here: every request's Timestamps are checked as it arrives, api.wellformed)."""
    if instant is None:
        return None
    seconds, nanos = instant
    return seconds * 1_000_000 + nanos // 1_000


def check_range(
    v: Violations,
    after_field: str,
    after: Instant | None,
    before_field: str,
    before: Instant | None,
) -> tuple[int | None, int | None]:
    """[after, before) in µs; a violation when before < after."""
    after_us, before_us = micros(after), micros(before)
    check_window(v, after_field, after_us, before_field, before_us)
    return after_us, before_us


def check_name(v: Violations, name: str, value: str, limit: int) -> None:
    """An id given as a filter: at most `limit` printable characters."""
    if len(value) > limit or not printable(value):
        v.add(name, f"must be at most {limit} printable characters (got {len(value)})")


def check_run_filter(v: Violations, f: RunFilter) -> CheckedRunFilter:
    check_labels(v, "labels", f.labels, limit=MAX_LABEL_FILTERS, noun="label pairs")
    check_name(v, "user_id", f.user_id, MAX_USER_ID)
    check_name(v, "worker_id", f.worker_id, MAX_WORKER_ID)
    check_name(v, "parent_run_id", f.parent_run_id, MAX_RUN_ID)
    check_name(v, "root_run_id", f.root_run_id, MAX_RUN_ID)
    after_us, before_us = check_range(
        v, "created_after", f.created_after, "created_before", f.created_before
    )
    return CheckedRunFilter(
        labels=tuple(sorted(f.labels.items())),
        user_id=f.user_id,
        worker_id=f.worker_id,
        after_us=after_us,
        before_us=before_us,
        parent_run_id=f.parent_run_id,
        root_run_id=f.root_run_id,
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
