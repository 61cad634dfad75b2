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


def test_label_requirements_hold_as_documented() -> None:
    from jobtrace.domain.dispatch.matching import holds, label_number
    from jobtrace.model import Comparator as C
    from jobtrace.model import LabelRequirement as R

    labels = {"gpu": "a100", "vram_gb": " 40 ", "big": "1e3", "odd": "nan", "word": "lots"}
    assert holds(R("gpu", "a100"), labels) and not holds(R("gpu", "A100"), labels)
    assert holds(R("gpu", "t4", C.NOT_EQUAL), labels)
    assert holds(R("missing", "x", C.NOT_EQUAL), labels)  # != holds when the label is missing
    assert not holds(R("missing", "x"), labels)
    assert not holds(R("missing", 1.0, C.LESS), labels)
    assert holds(R("vram_gb", 40.0, C.AT_LEAST), labels)
    assert holds(R("vram_gb", 40.0), labels)  # a number value compares numerically
    assert not holds(R("vram_gb", 40.0, C.GREATER), labels)
    assert holds(R("vram_gb", 41.0, C.LESS), labels) and holds(
        R("vram_gb", 40.0, C.AT_MOST), labels
    )
    assert holds(R("big", 999.0, C.GREATER), labels)
    # A label that is not a number fails every numeric comparison but !=.
    for key in ("odd", "word"):
        assert label_number(labels[key]) is None
        assert not holds(R(key, 0.0, C.AT_LEAST), labels)
        assert not holds(R(key, 0.0, C.LESS), labels)
        assert holds(R(key, 0.0, C.NOT_EQUAL), labels)
    assert label_number("1_000") is None and label_number("inf") is None


def test_pick_worker_scores_preferences_and_weighted_affinity() -> None:
    from jobtrace.model import LabelRequirement as R

    eu = session("eu", slots=1)
    eu.labels = {"zone": "eu"}
    warm = session("warm", slots=4, affinity_keys=frozenset({"m"}))
    spec = JobSpec(
        service="svc",
        worker_labels=(R("zone", "eu", weight=3.0),),
        affinity=(("m", 2.0),),
    )
    slots = {eu.session_id: 1, warm.session_id: 4}
    picked = pick_worker(job(spec=spec), [warm, eu], slots)
    assert picked is not None and picked.session is eu
    assert picked.record() == {
        "worker": eu.worker_id,
        "score": 3,
        "matched_labels": ["zone=eu"],
        "matched_keys": [],
        "candidates": 2,
    }
    # A worker to avoid (a retry's last worker) is taken only when no other can.
    retry = job(spec=spec, avoid_holder=eu.holder)
    picked = pick_worker(retry, [warm, eu], slots)
    assert picked is not None and picked.session is warm
    picked = pick_worker(retry, [eu], slots)
    assert picked is not None and picked.session is eu
