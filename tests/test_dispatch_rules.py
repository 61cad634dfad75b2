"""The pure rules of the dispatch package, each on its own: the fence every
report passes, the pick of a worker for a job, and the hello check. The same
rules are exercised through the real server in test_worker_stream.py and
test_workers.py; these pin each rule where it lives."""

from __future__ import annotations

import pytest

from jobtrace.domain.dispatch.leases import fence
from jobtrace.domain.dispatch.placement import pick_worker
from jobtrace.domain.dispatch.sessions import Hello, WorkerSession, check_hello
from jobtrace.domain.errors import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    Invalid,
    NotFound,
    PermissionDenied,
    StaleAttempt,
)
from jobtrace.domain.worker_identity import WorkerIdentity
from jobtrace.model import Job, JobSpec, RunState

HOLDER = WorkerIdentity("t1", "sub", "w1").holder


def job(**changes: object) -> Job:
    fields: dict[str, object] = {
        "id": "job_1",
        "tenant": "t1",
        "request_id": "r1",
        "spec": JobSpec(service="svc"),
        "state": RunState.RUNNING,
        "created_us": 1,
        "updated_us": 1,
        "attempt": 2,
        "lease_holder": HOLDER,
    }
    fields.update(changes)
    return Job(**fields)  # type: ignore[arg-type]


def session(
    worker_id: str,
    *,
    slots: int = 2,
    services: frozenset[str] = frozenset({"svc"}),
    affinity_keys: frozenset[str] = frozenset(),
    tenants: frozenset[str] | None = None,
) -> WorkerSession:
    return WorkerSession(
        identity=WorkerIdentity("t1", "sub", worker_id),
        session_id=f"ses_{worker_id}",
        services=services,
        max_concurrency=slots,
        affinity_keys=affinity_keys,
        labels={},
        tenants=tenants,
    )


def test_fence_passes_the_current_lease_holder() -> None:
    current = job()
    assert fence(current, "job_1", HOLDER, 2, "progress") is current


@pytest.mark.parametrize(
    ("stored", "attempt", "tenants", "kind", "error", "reason"),
    [
        (None, 2, None, "progress", NotFound, "UNKNOWN_JOB"),
        (job(), 2, frozenset({"t2"}), "progress", NotFound, "UNKNOWN_JOB"),
        (job(), 1, None, "progress", StaleAttempt, "STALE_ATTEMPT"),
        (job(), 3, None, "progress", FailedPrecondition, "UNKNOWN_ATTEMPT"),
        (job(lease_holder="other"), 2, None, "progress", PermissionDenied, "NOT_LEASE_HOLDER"),
        (job(state=RunState.COMPLETED), 2, None, "complete", AlreadyExists, "DUPLICATE_REPORT"),
        (job(state=RunState.COMPLETED), 2, None, "trace", FailedPrecondition, "JOB_TERMINAL"),
        (job(state=RunState.CANCELLED), 2, None, "fail", FailedPrecondition, "JOB_TERMINAL"),
        (job(state=RunState.QUEUED), 2, None, "progress", FailedPrecondition, "LEASE_LOST"),
    ],
)
def test_fence_refuses_a_report_without_the_current_lease(
    stored: Job | None,
    attempt: int,
    tenants: frozenset[str] | None,
    kind: str,
    error: type[DomainError],
    reason: str,
) -> None:
    with pytest.raises(error) as refused:
        fence(stored, "job_1", HOLDER, attempt, kind, tenants)
    assert refused.value.reason == reason


def test_pick_worker_prefers_affinity_over_free_slots() -> None:
    roomy, warm = (
        session("roomy", slots=8),
        session("warm", slots=1, affinity_keys=frozenset({"k"})),
    )
    wanted = job(spec=JobSpec(service="svc", affinity_keys=("k",)))
    slots = {roomy.session_id: 8, warm.session_id: 1}
    assert (picked := pick_worker(wanted, [roomy, warm], slots)) and picked.session is warm
    # Without affinity in common, the worker with the most free slots wins.
    assert (picked := pick_worker(job(), [warm, roomy], slots)) and picked.session is roomy


def test_pick_worker_skips_workers_that_cannot_take_the_job() -> None:
    other_service = session("a", services=frozenset({"other"}))
    other_tenant = session("b", tenants=frozenset({"t2"}))
    full = session("c")
    closed = session("d")
    closed.close("gone")
    slots = {s.session_id: 2 for s in (other_service, other_tenant, closed)} | {full.session_id: 0}
    assert pick_worker(job(), [other_service, other_tenant, full, closed], slots) is None
    able = session("e")
    slots[able.session_id] = 1
    picked = pick_worker(job(), [other_service, other_tenant, full, closed, able], slots)
    assert picked is not None and picked.session is able and picked.candidates == 1


def test_check_hello_lists_every_violation() -> None:
    hello = Hello(
        identity=WorkerIdentity("t1", "sub", ""),
        services=("bad service",),
        max_concurrency=-1,
        labels={},
        affinity_keys=(),
        running=(("job_1", 0),),
    )
    with pytest.raises(Invalid) as refused:
        check_hello(hello)
    fields = {violation.field for violation in refused.value.violations}
    assert fields == {
        "hello.worker_id",
        "hello.services[0]",
        "hello.max_concurrency",
        "hello.running[0].attempt",
    }
