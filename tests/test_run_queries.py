"""ListJobs, ListWorkflows and ListAttestations across runs: each filter
(labels, user, worker, service, state, creation time), their combinations,
totals, page tokens bound to the filters, tenancy, bad filters and the
indexes behind them, through a real server on both backends."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import create_async_engine

from jobtrace.bench_listing import DAY_US, SPAN_US, TENANT, Rows, store_rows
from jobtrace.client import Client, SyncClient
from jobtrace.model import RunState
from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import worker_service_pb2 as w
from jobtrace.store import attest as attest_store
from jobtrace.store import jobs as job_store
from jobtrace.store.tables import AttestationRow

from .conftest import Harness, Stubs, execute_sql, expect_error
from .procs import jobtrace
from .test_security import bearer, token, write_tokens
from .workers import RawWorker


def ctx(user: str) -> c.RequestContext:
    return (
        c.RequestContext(user_context=c.UserContext(user_id=user)) if user else c.RequestContext()
    )


async def submit(
    api: Stubs, name: str, service: str, labels: dict[str, str], user: str = "", md: Any = None
) -> c.Job:
    request = j.SubmitJobRequest(
        request_id=name,
        job=c.JobSpec(service=service, labels=labels),
        request_context=ctx(user),
    )
    return (await api.jobs.SubmitJob(request, metadata=md)).job


async def job_ids(api: Stubs, md: Any = None, page_size: int = 2, **filters: Any) -> list[str]:
    """Ids of every matching job, newest first, following page tokens; checks
    that include_total (asked on every page) counts them all."""
    out: list[str] = []
    totals: set[int] = set()
    token_ = ""
    while True:
        page = await api.jobs.ListJobs(
            j.ListJobsRequest(
                page_size=page_size, page_token=token_, include_total=True, **filters
            ),
            metadata=md,
        )
        out += [x.id for x in page.jobs]
        totals.add(page.total_size)
        token_ = page.next_page_token
        if not token_:
            assert totals == {len(out)}, (totals, out)
            return out


async def workflow_ids(api: Stubs, md: Any = None, **filters: Any) -> list[str]:
    out: list[str] = []
    totals: set[int] = set()
    token_ = ""
    while True:
        page = await api.jobs.ListWorkflows(
            j.ListWorkflowsRequest(page_size=1, page_token=token_, include_total=True, **filters),
            metadata=md,
        )
        out += [x.id for x in page.workflows]
        totals.add(page.total_size)
        token_ = page.next_page_token
        if not token_:
            assert totals == {len(out)}, (totals, out)
            return out


async def attestation_keys(api: Stubs, md: Any = None, **filters: Any) -> list[str]:
    out: list[str] = []
    token_ = ""
    while True:
        page = await api.attest.ListAttestations(
            a.ListAttestationsRequest(page_size=1, page_token=token_, **filters), metadata=md
        )
        out += [x.key for x in page.attestations]
        token_ = page.next_page_token
        if not token_:
            return out


@dataclass
class Seeded:
    render_alice: c.Job  # render, env=prod team=a, alice; completed by w-1
    render_bob: c.Job  # render, env=staging team=a, bob; failed on w-1
    encode_alice: c.Job  # encode, env=prod team=b, alice; never claimed
    bare: c.Job  # encode, no labels, no user
    workflow: c.Workflow  # env=prod, carol; steps s1 (team=c), s2


async def seed(api: Stubs) -> Seeded:
    render_alice = await submit(api, "r1", "render", {"env": "prod", "team": "a"}, "alice")
    render_bob = await submit(api, "r2", "render", {"env": "staging", "team": "a"}, "bob")
    encode_alice = await submit(api, "e1", "encode", {"env": "prod", "team": "b"}, "alice")
    bare = await submit(api, "e2", "encode", {})
    workflow = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="wf1",
                name="nightly",
                labels={"env": "prod"},
                request_context=ctx("carol"),
                steps=[
                    c.WorkflowStepSpec(
                        name="s1", job=c.JobSpec(service="encode", labels={"team": "c"})
                    ),
                    c.WorkflowStepSpec(
                        name="s2", job=c.JobSpec(service="encode"), depends_on=["s1"]
                    ),
                ],
            )
        )
    ).workflow
    raw = RawWorker(api)
    await raw.hello("w-1", ["render"], max_concurrency=2)
    got = {(await raw.expect("assignment")).job.id for _ in range(2)}
    assert got == {render_alice.id, render_bob.id}
    await raw.send(complete=w.CompleteReport(job_id=render_alice.id, attempt=1))
    await raw.expect("ack")
    await raw.send(
        fail=w.FailReport(
            job_id=render_bob.id, attempt=1, error=c.ErrorDetail(message="boom"), retryable=False
        )
    )
    await raw.expect("ack")
    await raw.close()
    return Seeded(render_alice, render_bob, encode_alice, bare, workflow)


def ids(*jobs: c.Job) -> list[str]:
    return [x.id for x in jobs]


async def test_jobs_are_listed_by_each_filter_and_their_combinations(harness: Harness) -> None:
    api = harness.stubs()
    s = await seed(api)
    steps = [x.job_id for x in s.workflow.steps]
    standalone = ids(s.render_alice, s.render_bob, s.encode_alice, s.bare)
    assert await job_ids(api) == [*reversed(steps), *reversed(standalone)]
    # Labels: every given pair must match; a step has its own spec's labels.
    assert await job_ids(api, labels={"env": "prod"}) == ids(s.encode_alice, s.render_alice)
    assert await job_ids(api, labels={"team": "a"}) == ids(s.render_bob, s.render_alice)
    assert await job_ids(api, labels={"team": "a", "env": "prod"}) == ids(s.render_alice)
    assert await job_ids(api, labels={"team": "c"}) == steps[:1]
    assert await job_ids(api, labels={"team": "a", "env": "dev"}) == []
    assert await job_ids(api, labels={"env": "PROD"}) == []  # values match exactly
    # The user of the request context; a step's is its workflow's.
    assert await job_ids(api, user_id="alice") == ids(s.encode_alice, s.render_alice)
    assert await job_ids(api, user_id="carol") == list(reversed(steps))
    assert await job_ids(api, user_id="nobody") == []
    # The worker of the latest attempt.
    assert await job_ids(api, worker_id="w-1") == ids(s.render_bob, s.render_alice)
    assert await job_ids(api, worker_id="w-2") == []
    # Creation time: [created_after, created_before).
    after, before = s.render_bob.created_at, s.bare.created_at
    assert await job_ids(api, created_after=after, created_before=before) == ids(
        s.encode_alice, s.render_bob
    )
    assert await job_ids(api, created_after=before) == [*reversed(steps), s.bare.id]
    assert await job_ids(api, created_before=after) == ids(s.render_alice)
    assert await job_ids(api, created_after=after, created_before=after) == []
    # Combinations, with the filters of earlier releases too.
    assert await job_ids(api, user_id="alice", labels={"env": "prod"}, service="encode") == ids(
        s.encode_alice
    )
    assert await job_ids(api, worker_id="w-1", state=c.RUN_STATE_FAILED) == ids(s.render_bob)
    assert await job_ids(api, labels={"team": "a"}, created_after=after) == ids(s.render_bob)
    assert (
        await job_ids(api, workflow_id=s.workflow.id, user_id="carol", labels={"team": "c"})
        == steps[:1]
    )
    # Without include_total, total_size stays 0.
    page = await api.jobs.ListJobs(j.ListJobsRequest(user_id="alice"))
    assert len(page.jobs) == 2 and page.total_size == 0
    # Page after page of a label listing (one item per page) continues right
    # after the last item, whatever drives the listing.
    assert await job_ids(api, page_size=1, labels={"env": "prod"}) == ids(
        s.encode_alice, s.render_alice
    )


async def test_workflows_are_listed_by_labels_user_and_time(harness: Harness) -> None:
    api = harness.stubs()
    made = []
    for i, (labels, user) in enumerate(
        [({"env": "prod", "team": "a"}, "alice"), ({"env": "dev"}, "bob"), ({}, "alice")]
    ):
        made.append(
            (
                await api.jobs.SubmitWorkflow(
                    j.SubmitWorkflowRequest(
                        request_id=f"w{i}",
                        name="nightly",
                        labels=labels,
                        request_context=ctx(user),
                        steps=[c.WorkflowStepSpec(name="s", job=c.JobSpec(service="svc"))],
                    )
                )
            ).workflow
        )
    w0, w1, w2 = made
    assert await workflow_ids(api) == [w2.id, w1.id, w0.id]
    assert await workflow_ids(api, labels={"env": "prod"}) == [w0.id]
    assert await workflow_ids(api, labels={"env": "prod", "team": "a"}) == [w0.id]
    assert await workflow_ids(api, labels={"env": "prod", "team": "b"}) == []
    assert await workflow_ids(api, user_id="alice") == [w2.id, w0.id]
    assert await workflow_ids(api, user_id="alice", name="other") == []
    assert await workflow_ids(api, created_after=w1.created_at) == [w2.id, w1.id]
    assert await workflow_ids(api, created_before=w1.created_at) == [w0.id]
    assert await workflow_ids(
        api, user_id="alice", created_after=w0.created_at, created_before=w2.created_at
    ) == [w0.id]
    page = await api.jobs.ListWorkflows(j.ListWorkflowsRequest(user_id="alice"))
    assert len(page.workflows) == 2 and page.total_size == 0


async def test_attestations_are_listed_by_state_service_user_worker_and_time(
    harness: Harness,
) -> None:
    api = harness.stubs()
    s = await seed(api)
    done = f"worker-completion:{s.render_alice.id}"
    failed = f"worker-failure:{s.render_bob.id}:1"
    assert await attestation_keys(api, state=c.RUN_STATE_COMPLETED) == [done]
    assert await attestation_keys(api, state=c.RUN_STATE_FAILED) == [failed]
    assert await attestation_keys(api, service="render") == [done, failed]
    assert await attestation_keys(api, service="encode") == []
    assert await attestation_keys(api, user_id="alice") == [done]
    assert await attestation_keys(api, user_id="bob", service="render") == [failed]
    assert await attestation_keys(api, worker_id="w-1") == [done, failed]
    assert await attestation_keys(api, worker_id="w-2") == []
    first = (await api.attest.GetAttestation(a.GetAttestationRequest(key=done))).attestation
    second = (await api.attest.GetAttestation(a.GetAttestationRequest(key=failed))).attestation
    assert await attestation_keys(api, since=second.create_time) == [failed]
    assert await attestation_keys(api, until=second.create_time) == [done]
    assert await attestation_keys(
        api, since=first.create_time, until=second.create_time, worker_id="w-1"
    ) == [done]
    # A workflow's own attestations carry its user, and no service.
    await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=s.workflow.id))
    carol = await attestation_keys(api, user_id="carol")
    assert f"workflow-cancellation:{s.workflow.id}" in carol
    assert await attestation_keys(api, user_id="carol", service="encode") == []


async def test_page_tokens_are_bound_to_the_new_filters(harness: Harness) -> None:
    api = harness.stubs()
    s = await seed(api)
    cases: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
        ("jobs", {"labels": {"team": "a"}}, {"labels": {"team": "b"}}),
        ("jobs", {"labels": {"team": "a"}}, {}),
        ("jobs", {"user_id": "alice"}, {"user_id": "bob"}),
        ("jobs", {"worker_id": "w-1"}, {"worker_id": "w-2"}),
        ("jobs", {}, {"parent_run_id": "job_x"}),
        ("jobs", {}, {"root_run_id": "job_x"}),
        ("jobs", {"created_after": s.render_alice.created_at}, {}),
        (
            "jobs",
            {"created_before": s.bare.created_at},
            {"created_before": s.encode_alice.created_at},
        ),
        ("attestations", {"worker_id": "w-1"}, {"worker_id": "w-2"}),
        ("attestations", {"service": "render"}, {"service": "encode"}),
        ("attestations", {}, {"state": c.RUN_STATE_COMPLETED}),
        ("attestations", {}, {"user_id": "bob"}),
        ("attestations", {"since": s.render_alice.created_at}, {}),
    ]
    for kind, first, other in cases:
        if kind == "jobs":
            page = await api.jobs.ListJobs(j.ListJobsRequest(page_size=1, **first))
            assert page.next_page_token, first
            reuse = api.jobs.ListJobs(
                j.ListJobsRequest(page_size=1, page_token=page.next_page_token, **other)
            )
        else:
            listed = await api.attest.ListAttestations(
                a.ListAttestationsRequest(page_size=1, **first)
            )
            assert listed.next_page_token, first
            reuse = api.attest.ListAttestations(
                a.ListAttestationsRequest(page_size=1, page_token=listed.next_page_token, **other)
            )
        _, _, violations = await expect_error(reuse, grpc.StatusCode.INVALID_ARGUMENT)
        assert violations == [("page_token", "page token belongs to a query with other filters")], (
            first,
            other,
        )
    page = await api.jobs.ListJobs(j.ListJobsRequest(page_size=1, labels={"team": "a"}))
    await expect_error(
        api.jobs.ListWorkflows(
            j.ListWorkflowsRequest(page_token=page.next_page_token, labels={"team": "a"})
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    # The same filters (labels in another order, include_total or not) go on.
    page = await api.jobs.ListJobs(
        j.ListJobsRequest(page_size=1, labels={"team": "a", "env": "staging"})
    )
    assert not page.next_page_token
    page = await api.jobs.ListJobs(j.ListJobsRequest(page_size=1, labels={"team": "a"}))
    rest = await api.jobs.ListJobs(
        j.ListJobsRequest(
            page_size=5, page_token=page.next_page_token, labels={"team": "a"}, include_total=True
        )
    )
    assert [x.id for x in rest.jobs] == [s.render_alice.id] and rest.total_size == 2


def ts(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


async def test_bad_run_filters_name_the_field(harness: Harness) -> None:
    api = harness.stubs()
    await submit(api, "x", "svc", {"env": "prod"}, "alice")
    too_many = {f"k{i}": "v" for i in range(17)}
    job_cases: list[tuple[dict[str, Any], str]] = [
        ({"labels": {"": "v"}}, "labels['']"),
        ({"labels": {"Env": "v"}}, "labels['Env']"),
        ({"labels": {"env": "x" * 257}}, "labels['env']"),
        ({"labels": too_many}, "labels"),
        ({"user_id": "u" * 257}, "user_id"),
        ({"user_id": "a\nb"}, "user_id"),
        ({"worker_id": "w" * 129}, "worker_id"),
        ({"parent_run_id": "j" * 65}, "parent_run_id"),
        ({"root_run_id": "a\tb"}, "root_run_id"),
        ({"created_after": ts(2000), "created_before": ts(1000)}, "created_before"),
        ({"created_after": ts(0, -1)}, "created_after"),
        ({"created_before": ts(0, 1_000_000_000)}, "created_before"),
        ({"created_after": ts(253_402_300_800)}, "created_after"),
        ({"created_before": ts(-62_135_596_801)}, "created_before"),
        ({"page_token": "garbage", "user_id": "alice"}, "page_token"),
    ]
    for filters, field in job_cases:
        _, _, violations = await expect_error(
            api.jobs.ListJobs(j.ListJobsRequest(**filters)), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert [f for f, _ in violations] == [field], filters
    _, _, violations = await expect_error(
        api.jobs.ListJobs(j.ListJobsRequest(labels={"": "v"}, user_id="u" * 300)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert sorted(f for f, _ in violations) == ["labels['']", "user_id"]
    workflow_cases: list[tuple[dict[str, Any], str]] = [
        ({"labels": {"bad key": "v"}}, "labels['bad key']"),
        ({"labels": too_many}, "labels"),
        ({"created_after": ts(2000), "created_before": ts(1999, 999_999_999)}, "created_before"),
        ({"user_id": "u" * 257}, "user_id"),
        ({"parent_run_id": "w" * 65}, "parent_run_id"),
        ({"root_run_id": "w" * 65}, "root_run_id"),
    ]
    for filters, field in workflow_cases:
        _, _, violations = await expect_error(
            api.jobs.ListWorkflows(j.ListWorkflowsRequest(**filters)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [f for f, _ in violations] == [field], filters
    attestation_cases: list[tuple[dict[str, Any], str]] = [
        ({"state": 99}, "state"),
        ({"service": "s" * 129}, "service"),
        ({"user_id": "u" * 257}, "user_id"),
        ({"worker_id": "w" * 129}, "worker_id"),
        ({"since": ts(2000), "until": ts(1000)}, "until"),
        ({"since": ts(0, 1_000_000_000)}, "since"),
    ]
    for filters, field in attestation_cases:
        _, _, violations = await expect_error(
            api.attest.ListAttestations(a.ListAttestationsRequest(**filters)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [f for f, _ in violations] == [field], filters
    # The message says what is wrong.
    err, _, _ = await expect_error(
        api.jobs.ListJobs(j.ListJobsRequest(labels=too_many)), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "at most 16 label pairs (got 17)" in (err.details() or "")


async def test_listings_across_runs_are_tenant_scoped(db_url: str, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    write_tokens(tokens)
    async with Harness(db_url, tokens_file=str(tokens)) as h:
        api = h.stubs()
        acme, umbrella = bearer(token("submitter", "acme")), bearer(token("submitter", "umbrella"))
        mine = await submit(api, "a", "svc", {"env": "prod"}, "alice", md=acme)
        theirs = [
            await submit(api, f"u{i}", "svc", {"env": "prod"}, "alice", md=umbrella)
            for i in range(3)
        ]
        for tenant, expected in (("acme", [mine.id]), ("umbrella", list(reversed(ids(*theirs))))):
            reader = bearer(token("reader", tenant))
            assert await job_ids(api, reader, labels={"env": "prod"}) == expected
            assert await job_ids(api, reader, user_id="alice") == expected
            assert await job_ids(api, reader, user_id="alice", labels={"env": "prod"}) == expected
            assert (
                await job_ids(api, reader, created_after=mine.created_at, labels={"env": "prod"})
                == expected
            )
        # An admin sees every tenant's, and counts them all.
        admin = bearer(token("admin", "acme"))
        assert len(await job_ids(api, admin, labels={"env": "prod"})) == 4
        assert len(await job_ids(api, admin, user_id="alice")) == 4


async def plan_of(db_url: str, stmt: Any, *, analyze: bool = False) -> str:
    """The database's plan of a statement (or of SQL text with its values
    written in), PostgreSQL without sequential scans, which a small table
    gets otherwise (`analyze`: with statistics, as autovacuum keeps them)."""
    pg = db_url.startswith("postgresql")
    dialect = postgresql.dialect() if pg else sqlite.dialect()  # type: ignore[no-untyped-call]
    sql = (
        stmt
        if isinstance(stmt, str)
        else str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    )
    engine = create_async_engine(db_url)
    try:
        async with engine.begin() as conn:
            if pg:
                if analyze:
                    await conn.exec_driver_sql("ANALYZE jobs")
                await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
                plan = (await conn.exec_driver_sql("EXPLAIN " + sql)).fetchall()
            else:
                plan = (await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)).fetchall()
    finally:
        await engine.dispose()
    return " ".join(str(row) for row in plan)


def primary_key(db_url: str, name: str) -> str:
    """How a plan names a label table's primary key (the index of its
    filter); any other index name as it is."""
    if not name.endswith("_labels"):
        return name
    return f"{name}_pkey" if db_url.startswith("postgresql") else f"sqlite_autoindex_{name}_1"


def first_page(keyset: Any) -> Any:
    """A listing's first read: the newest rows' keys (see store.listing.read_chunk)."""
    return select(keyset.key).where(*keyset.where).order_by(keyset.key.desc()).limit(101)


async def test_each_run_filter_uses_its_index(harness: Harness) -> None:
    """The first read of each filter's listing names the index meant for it,
    on a table of a few thousand rows spread as the benchmark spreads them
    (PostgreSQL with statistics, as autovacuum keeps them; SQLite without,
    as jobtrace runs it)."""
    rows = Rows(3000, int(time.time() * 1e6) - SPAN_US)
    await store_rows(harness.db_url, rows)
    url, t = harness.db_url, TENANT
    lite = url.startswith("sqlite")  # as read_jobs ranks the filters there
    day = (rows.start_us + 10 * DAY_US, rows.start_us + 11 * DAY_US)
    jobs: list[tuple[job_store.RunQuery, str | tuple[str, ...]]] = [
        (job_store.RunQuery(user_id="user-42"), "ix_jobs_tenant_user_seq"),
        (job_store.RunQuery(worker_id="worker-7"), "ix_jobs_tenant_worker_seq"),
        (
            job_store.RunQuery(created_after_us=day[0], created_before_us=day[1]),
            "ix_jobs_tenant_created",
        ),
        (job_store.RunQuery(labels=(("batch", "b-12"),)), "job_labels"),  # its primary key
        (job_store.RunQuery(labels=(("env", "prod"),)), "job_labels"),
        # Combined, the most selective filter's index serves (on SQLite by
        # rank, on PostgreSQL by its statistics).
        (
            job_store.RunQuery(user_id="user-42", state=RunState.COMPLETED),
            "ix_jobs_tenant_user_seq",
        ),
        (
            job_store.RunQuery(user_id="user-42", labels=(("env", "prod"),)),
            "ix_jobs_tenant_user_seq",
        ),
        # A run's reruns (0021): one level, the chain, the chain in a state.
        (job_store.RunQuery(parent_run_id="job_x"), "ix_jobs_tenant_parent_seq"),
        (job_store.RunQuery(root_run_id="job_x"), "ix_jobs_tenant_root_seq"),
        (
            job_store.RunQuery(root_run_id="job_x", state=RunState.FAILED),
            "ix_jobs_tenant_root_seq",
        ),
        (
            job_store.RunQuery(service="svc-3", state=RunState.COMPLETED),
            # PostgreSQL may read an index of the dispatcher (state, service) and sort.
            "ix_jobs_tenant_service_seq"
            if lite
            else ("ix_jobs_tenant_service_seq", "ix_jobs_dispatch", "ix_jobs_waiting"),
        ),
    ]
    for query, index in jobs:
        plan = await plan_of(url, first_page(job_store.job_keyset(t, query, ranked=lite)))
        names = index if isinstance(index, tuple) else (index,)
        assert any(primary_key(url, name) in plan for name in names), (query, plan)
    # A lone lower bound, newest first, walks the tenant's rows in seq order
    # (the newest, which it keeps, come first) rather than read its range whole.
    recent = job_store.RunQuery(created_after_us=day[0])
    plan = await plan_of(url, first_page(job_store.job_keyset(t, recent, ranked=lite)))
    assert "ix_jobs_tenant_created" not in plan and "Sort" not in plan, plan
    assert "TEMP B-TREE" not in plan, plan
    # Two label pairs: the second is a lookup in the same primary key.
    two = job_store.RunQuery(labels=(("batch", "b-12"), ("env", "prod")))
    plan = await plan_of(url, first_page(job_store.job_keyset(t, two, ranked=lite)))
    assert plan.count(primary_key(url, "job_labels")) == 2, plan
    workflows: list[tuple[job_store.RunQuery, str]] = [
        (job_store.RunQuery(name="nightly-3"), "ix_workflows_tenant_name_seq"),
        (job_store.RunQuery(user_id="user-42"), "ix_workflows_tenant_user_seq"),
        (
            job_store.RunQuery(created_after_us=day[0], created_before_us=day[1]),
            "ix_workflows_tenant_created",
        ),
        (job_store.RunQuery(labels=(("batch", "b-1"),)), "workflow_labels"),
        (job_store.RunQuery(parent_run_id="wf_x"), "ix_workflows_tenant_parent_seq"),
        (job_store.RunQuery(root_run_id="wf_x"), "ix_workflows_tenant_root_seq"),
        (
            job_store.RunQuery(root_run_id="wf_x", name="nightly-3"),
            "ix_workflows_tenant_root_seq",
        ),
    ]
    for query, index in workflows:
        plan = await plan_of(url, first_page(job_store.workflow_keyset(t, query, ranked=lite)))
        assert primary_key(url, index) in plan, (query, plan)
    attestations: list[tuple[attest_store.AttestationQuery, str]] = [
        (
            attest_store.AttestationQuery(user_id="user-42", state=int(RunState.COMPLETED)),
            "ix_attestations_tenant_user_seq",
        ),
        (
            # A rare state: a common one (10% of rows) is found as fast on
            # PostgreSQL by walking the primary key, as its planner knows.
            attest_store.AttestationQuery(state=int(RunState.TIMED_OUT)),
            "ix_attestations_tenant_state_seq",
        ),
        (attest_store.AttestationQuery(service="svc-3"), "ix_attestations_tenant_service_seq"),
        (attest_store.AttestationQuery(user_id="user-42"), "ix_attestations_tenant_user_seq"),
        (attest_store.AttestationQuery(worker_id="worker-7"), "ix_attestations_tenant_worker_seq"),
        (
            attest_store.AttestationQuery(since_us=day[0], until_us=day[1]),
            "ix_attestations_tenant_created",
        ),
    ]
    older = attest_store.AttestationQuery(until_us=day[1])  # oldest first: the mirror image
    stmt = (
        select(AttestationRow.seq)
        .where(*attest_store.attestation_where(t, older, ranked=lite))
        .order_by(AttestationRow.seq)
        .limit(101)
    )
    plan = await plan_of(url, stmt)
    assert "ix_attestations_tenant_created" not in plan and "Sort" not in plan, plan
    for aq, index in attestations:
        key = attest_store.attestation_key(aq)
        stmt = (
            select(key)
            .where(*attest_store.attestation_where(t, aq, ranked=lite))
            .order_by(key)
            .limit(101)
        )
        plan = await plan_of(url, stmt)
        assert index in plan, (aq, plan)


async def test_clients_and_cli_list_across_runs(sqlite_harness: Harness) -> None:
    api = sqlite_harness.stubs()
    s = await seed(api)
    async with Client(sqlite_harness.target) as jt:
        page = await jt.list_jobs(labels={"env": "prod"}, include_total=True, page_size=1)
        assert [x.id for x in page.items] == [s.encode_alice.id] and page.total_size == 2
        assert (await jt.list_jobs(user_id="alice")).total_size is None
        by_worker = [x.id async for x in jt.iter_jobs(worker_id="w-1", page_size=1)]
        assert by_worker == ids(s.render_bob, s.render_alice)
        recent = await jt.list_jobs(
            created_after=s.encode_alice.created_at.ToDatetime(tzinfo=UTC), include_total=True
        )
        assert recent.total_size == 4  # encode_alice, bare and the two steps
        flows = await jt.list_workflows(user_id="carol", labels={"env": "prod"}, include_total=True)
        assert [x.id for x in flows.items] == [s.workflow.id] and flows.total_size == 1
        failed = [x.key async for x in jt.iter_attestations(state="failed", worker_id="w-1")]
        assert failed == [f"worker-failure:{s.render_bob.id}:1"]
        by_user = await jt.list_attestations(user_id="alice", service="render")
        assert [x.key for x in by_user.items] == [f"worker-completion:{s.render_alice.id}"]

    def use() -> tuple[list[str], int | None]:
        with SyncClient(sqlite_harness.target) as jt:
            page = jt.list_jobs(labels={"team": "a"}, include_total=True)
            keys = [x.key for x in jt.iter_attestations(service="render", page_size=1)]
            return [x.id for x in page.items] + keys, page.total_size

    listed, total = await asyncio.to_thread(use)
    assert total == 2 and listed == [
        *ids(s.render_bob, s.render_alice),
        f"worker-completion:{s.render_alice.id}",
        f"worker-failure:{s.render_bob.id}:1",
    ]
    t = sqlite_harness.target
    code, out, err = await jobtrace(
        "jobs", "--label", "env=prod", "--user", "alice", "--total", "--json", target=t
    )
    assert code == 0, err
    found = json.loads(out)
    assert [x["id"] for x in found["jobs"]] == ids(s.encode_alice, s.render_alice)
    assert found["total_size"] == 2
    code, out, _ = await jobtrace("jobs", "--worker", "w-1", "--since", "1h", "--total", target=t)
    assert code == 0 and s.render_bob.id in out and "2 shown of 2 matching" in out
    code, out, _ = await jobtrace("jobs", "--created-before", "2000-01-01", "--json", target=t)
    assert code == 0 and json.loads(out) == {"jobs": [], "next_page_token": ""}
    code, out, _ = await jobtrace(
        "workflows", "--label", "env=prod", "--user", "carol", "--total", "--json", target=t
    )
    assert [x["id"] for x in json.loads(out)["workflows"]] == [s.workflow.id]
    assert json.loads(out)["total_size"] == 1
    code, out, _ = await jobtrace(
        "attest", "list", "--state", "failed", "--user", "bob", "--since", "7d", "--json", target=t
    )
    assert [x["key"] for x in json.loads(out)["attestations"]] == [
        f"worker-failure:{s.render_bob.id}:1"
    ]
    code, out, _ = await jobtrace(
        "attest", "list", "--service", "render", "--worker", "w-1", target=t
    )
    assert code == 0 and s.render_alice.id in out and s.render_bob.id in out
    code, _, err = await jobtrace("jobs", "--label", "Bad Key=x", target=t)
    assert code != 0 and "labels" in err and "Traceback" not in err
    code, _, err = await jobtrace("jobs", "--since", "yesterday", target=t)
    assert code != 0 and "not a time" in err and "Traceback" not in err


async def test_runs_stored_before_0018_are_found_by_user_label_and_service(db_url: str) -> None:
    """Jobs, workflows and attestations written before revision 0018 have no
    user_id or service columns and no label rows; the migration fills them."""
    from .test_worker_stream import migrate_down

    async with Harness(db_url) as h:
        s = await seed(h.stubs())
    await migrate_down(db_url, "0017")
    # Rows tampered with (text that is no JSON, labels that are no object) are
    # left without a user or labels; they do not stop the upgrade.
    await execute_sql(
        db_url, "UPDATE jobs SET request_context = 'not json' WHERE id = :id", id=s.bare.id
    )
    await execute_sql(db_url, "UPDATE jobs SET labels = '[1, 2]' WHERE id = :id", id=s.bare.id)
    async with Harness(db_url) as h:
        api = h.stubs()
        steps = [x.job_id for x in s.workflow.steps]
        assert await job_ids(api, user_id="alice") == ids(s.encode_alice, s.render_alice)
        assert await job_ids(api, user_id="carol") == list(reversed(steps))
        assert await job_ids(api, labels={"team": "a", "env": "prod"}) == ids(s.render_alice)
        assert await job_ids(api, labels={"team": "c"}) == steps[:1]
        assert await workflow_ids(api, labels={"env": "prod"}, user_id="carol") == [s.workflow.id]
        assert await attestation_keys(api, user_id="bob", service="render") == [
            f"worker-failure:{s.render_bob.id}:1"
        ]
        # And the trigger files the labels of what comes after.
        later = await submit(api, "later", "svc", {"team": "a"}, "alice")
        assert await job_ids(api, labels={"team": "a"}) == ids(later, s.render_bob, s.render_alice)


async def test_the_listing_benchmark_runs(tmp_path: Path) -> None:
    """`jobtrace bench --listing` at a tiny size (the figures come from 50,000)."""
    from .test_bench import bench

    code, out, err = await bench(
        "--listing", "--listing-jobs", "300", "--listing-rounds", "2", "--json", timeout=120
    )
    assert code == 0, err
    [result] = json.loads(out)["listing"]
    assert result["backend"] == "sqlite" and result["jobs"] == 300
    figures = {f["filter"]: f for f in result["filters"]}
    assert len(figures) == 20
    for f in figures.values():
        assert f["page_p50_ms"] > 0 and f["page_p95_ms"] >= f["page_p50_ms"], f
    # The reader sees its tenant's nine tenths, counted.
    assert figures["jobs: tenant only"]["total_size"] == 270
    assert figures["jobs: user_id"]["total_size"] == figures["jobs: user_id"]["items"]


async def test_the_dispatch_read_neither_sorts_nor_scans_the_queue(harness: Harness) -> None:
    """The dispatcher's read of a deep queue is the dispatch index's first
    rows (no sort of every queued job) and its "next due" a seek in
    ix_jobs_waiting (no scan of them), on both backends (revision 0027)."""
    items = [
        j.SubmitJobRequest(
            request_id=f"plan-{i}",
            job=c.JobSpec(service="plan", priority=i % 3, not_before=_later(i % 4 == 0)),
        )
        for i in range(400)
    ]
    results = (await harness.stubs().jobs.SubmitJobs(j.SubmitJobsRequest(items=items))).results
    assert len(results) == 400 and not any(r.HasField("error") for r in results)
    url = harness.db_url
    pg = url.startswith("postgresql")
    query = job_store._eligible_query(-1).clause("postgresql" if pg else "sqlite").text
    params = {"queued": int(RunState.QUEUED), "service": "'plan'", "now": int(time.time() * 1e6)}
    params["limit"] = 10
    for name, value in params.items():
        query = query.replace(f":{name}", str(value))
    rows = await execute_sql(url, query)
    due = [r[-1] for r in rows if r[-1] is not None]
    assert len(rows) == 11 and len(due) == 1 and due[0] > params["now"], rows
    plan = await plan_of(url, query, analyze=True)
    assert "ix_jobs_dispatch" in plan and "ix_jobs_waiting" in plan, plan
    assert "TEMP B-TREE" not in plan and "Sort" not in plan, plan


def _later(waits: bool) -> timestamp_pb2.Timestamp | None:
    """An hour from now for a job that waits; None for one eligible now."""
    if not waits:
        return None
    at = timestamp_pb2.Timestamp()
    at.FromSeconds(int(time.time()) + 3600)
    return at


async def test_progress_of_many_jobs_looks_each_up_by_its_key(harness: Harness) -> None:
    """The multi-row progress UPDATE (reports merged by the group commit)
    walks its list and finds each job by its id key, never the RUNNING jobs
    once per report, on both backends."""
    url = harness.db_url
    pg = url.startswith("postgresql")
    query = job_store._PROGRESS_MANY.clause("postgresql" if pg else "sqlite").text
    literals = {
        ":now": "1",
        ":running": str(int(RunState.RUNNING)),
        ":items": """'[["job_a", 1, "h", 50.0, "m"], ["job_b", 1, "h", 50.0, "m"]]'""",
        ":ids": "ARRAY['job_a', 'job_b']",
        ":attempts": "ARRAY[1, 1]",
        ":holders": "ARRAY['h', 'h']",
        ":percents": "ARRAY[50.0, 50.0]",
        ":messages": "ARRAY['m', 'm']",
    }
    for name, value in literals.items():
        query = query.replace(name, value)
    plan = await plan_of(url, query)
    key = "jobs_id_key" if pg else "sqlite_autoindex_jobs_1 (id=?)"  # jobs.id is unique
    assert key in plan, plan
    assert "ix_jobs_gate_deadline" not in plan and "ix_jobs_lease" not in plan, plan


async def test_jobs_written_together_are_each_found_by_key(harness: Harness) -> None:
    """The multi-row UPDATE of merged completions (store.jobs_update_many)
    walks its rows and finds each job by its id key, on both backends."""
    url = harness.db_url
    pg = url.startswith("postgresql")
    query = job_store.jobs_update_many_query(("state", "result", "completed_us"))
    text = query.clause("postgresql" if pg else "sqlite").text
    items = (
        """'[{"id": "job_a", "state": 3, "result": "{}", "completed_us": 1}]'"""
        if pg
        else """'[["job_a", 3, "{}", 1], ["job_b", 3, null, 1]]'"""
    )
    text = text.replace(":items", items).replace(":ids", "ARRAY['job_a']")
    plan = await plan_of(url, text, analyze=True)
    key = "jobs_id_key" if pg else "sqlite_autoindex_jobs_1 (id=?)"  # jobs.id is unique
    assert key in plan, plan


async def test_progress_updates_are_heap_only_on_postgresql(harness: Harness) -> None:
    """jobs and trace_runs leave room on their pages (revision 0027), so a
    running job's progress reports (which change no indexed column) are
    heap-only updates on PostgreSQL, not new entries in each of its indexes."""
    if not harness.db_url.startswith("postgresql"):
        pytest.skip("a PostgreSQL storage parameter")
    rows = await execute_sql(
        harness.db_url,
        "SELECT relname, reloptions FROM pg_class WHERE relname IN ('jobs', 'trace_runs')",
    )
    assert {name: list(options or []) for name, options in rows} == {
        "jobs": ["fillfactor=50"],
        "trace_runs": ["fillfactor=50"],
    }
