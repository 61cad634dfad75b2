"""ListAnnotations across runs: filters, value ranges, order, paging, tenancy,
bad filters and the indexes behind them, through a real server on both backends."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import create_async_engine

from jobtrace.auth import DEFAULT_TENANT
from jobtrace.client import Client, SyncClient
from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import worker_service_pb2 as w
from jobtrace.store.jobs import AnnotationQuery, annotation_where
from jobtrace.store.tables import AnnotationRow

from .conftest import Harness, Stubs, expect_error
from .test_security import bearer, token, write_tokens
from .workers import RawWorker


def value(x: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    json_format.ParseDict(x, v)
    return v


async def new_run(api: Stubs, name: str, md: Any = None) -> str:
    request = j.SubmitJobRequest(request_id=name, job=c.JobSpec(service="svc"))
    return str((await api.jobs.SubmitJob(request, metadata=md)).job.id)


async def attach(
    api: Stubs,
    run_id: str,
    attrs: dict[str, Any],
    who: str = "triage",
    kind: int = c.ACTOR_KIND_SERVICE,
    md: Any = None,
    **kw: Any,
) -> None:
    await api.attest.AttachAnnotations(
        a.AttachAnnotationsRequest(
            run_id=run_id,
            actor=c.Actor(kind=kind, id=who),
            attributes={k: value(v) for k, v in attrs.items()},
            **kw,
        ),
        metadata=md,
    )


async def across(api: Stubs, md: Any = None, **filters: Any) -> list[tuple[str, str, Any]]:
    """(run, key, value) of every match, following page tokens."""
    out: list[tuple[str, str, Any]] = []
    token_ = ""
    while True:
        page = await api.attest.ListAnnotations(
            a.ListAnnotationsRequest(page_size=1000, page_token=token_, **filters), metadata=md
        )
        out += [(x.run_id, x.key, json_format.MessageToDict(x.value)) for x in page.annotations]
        token_ = page.next_page_token
        if not token_:
            return out


async def test_annotations_are_queried_across_runs(harness: Harness) -> None:
    api = harness.stubs()
    r1, r2, r3 = [await new_run(api, f"r{i}") for i in (1, 2, 3)]
    await attach(api, r1, {"decision.confidence": 0.9, "decision.outcome": "approve"})
    t_mid = time.time_ns()
    await attach(api, r2, {"decision.confidence": 0.3, "decision.outcome": "reject"}, job_id=r2)
    await attach(
        api,
        r3,
        {"decision.confidence": 0, "decision.flagged": True},
        who="bob",
        kind=c.ACTOR_KIND_USER,
    )
    await attach(api, r1, {"review.note": "late"}, who="bob", kind=c.ACTOR_KIND_USER)

    # Every decision with confidence under 0.5, newest first, 0 included.
    assert await across(api, key="decision.confidence", value_max=0.49) == [
        (r3, "decision.confidence", 0.0),
        (r2, "decision.confidence", 0.3),
    ]
    assert await across(api, key="decision.confidence", value_min=0.0, value_max=0.0) == [
        (r3, "decision.confidence", 0.0)
    ]
    assert await across(api, value_min=0.5) == [(r1, "decision.confidence", 0.9)]
    assert await across(api, value_equals=value("reject")) == [(r2, "decision.outcome", "reject")]
    assert await across(api, value_equals=value(0.3)) == [(r2, "decision.confidence", 0.3)]
    assert await across(api, value_equals=value(True)) == [(r3, "decision.flagged", True)]
    # Strings are not numbers: "0.3" matches nothing.
    assert await across(api, value_equals=value("0.3")) == []
    assert [(r, k) for r, k, _ in await across(api, actor_id="bob")] == [
        (r1, "review.note"),
        (r3, "decision.flagged"),
        (r3, "decision.confidence"),
    ]
    assert [k for _, k, _ in await across(api, actor_kind=c.ACTOR_KIND_USER)] == [
        "review.note",
        "decision.flagged",
        "decision.confidence",
    ]
    assert [r for r, _, _ in await across(api, job_id=r2)] == [r2, r2]
    mid = c.Annotation().create_time
    mid.FromNanoseconds(t_mid)
    assert [r for r, _, _ in await across(api, until=mid)] == [r1, r1]
    assert {r for r, _, _ in await across(api, since=mid)} == {r1, r2, r3}
    assert len(await across(api, since=mid)) == 5
    assert [r for r, _, _ in await across(api, key_prefix="decision.o")] == [r2, r1]

    # Paging across runs: newest first, with tokens bound to the filters.
    everything = await across(api)
    assert len(everything) == 7 and everything[0] == (r1, "review.note", "late")
    paged: list[tuple[str, str, Any]] = []
    token_ = ""
    while True:
        page = await api.attest.ListAnnotations(
            a.ListAnnotationsRequest(page_size=2, page_token=token_)
        )
        assert len(page.annotations) <= 2
        paged += [(x.run_id, x.key, json_format.MessageToDict(x.value)) for x in page.annotations]
        token_ = page.next_page_token
        if not token_:
            break
        last_token = token_
    assert paged == everything
    _, _, violations = await expect_error(
        api.attest.ListAnnotations(
            a.ListAnnotationsRequest(key="review.note", page_token=last_token)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [f for f, _ in violations] == ["page_token"]

    # Within one run: oldest first, as before, and the new filters apply.
    one = await api.attest.ListAnnotations(a.ListAnnotationsRequest(run_id=r1))
    assert [x.key for x in one.annotations] == [
        "decision.confidence",
        "decision.outcome",
        "review.note",
    ]
    assert await across(api, run_id=r1, value_min=0.0) == [(r1, "decision.confidence", 0.9)]


async def test_bad_annotation_filters_name_the_field(harness: Harness) -> None:
    api = harness.stubs()
    early, late = c.Annotation().create_time, c.Annotation().create_time
    early.FromSeconds(1000)
    late.FromSeconds(2000)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"value_min": 1.0, "value_max": 0.5}, "value_min"),
        ({"actor_kind": 99}, "actor_kind"),
        ({"key": "Not A Key"}, "key"),
        ({"value_equals": value([1, 2])}, "value_equals"),
        ({"value_equals": struct_pb2.Value(null_value=0)}, "value_equals"),
        ({"since": late, "until": early}, "until"),
        ({"value_max": float("nan")}, "value_max"),
    ]
    for filters, field in cases:
        _, _, violations = await expect_error(
            api.attest.ListAnnotations(a.ListAnnotationsRequest(**filters)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [f for f, _ in violations] == [field], filters


async def test_annotations_across_runs_are_tenant_scoped(db_url: str, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    write_tokens(tokens)
    async with Harness(db_url, tokens_file=str(tokens)) as h:
        api = h.stubs()
        acme, umbrella = bearer(token("submitter", "acme")), bearer(token("submitter", "umbrella"))
        r_acme = await new_run(api, "a", acme)
        r_umb = await new_run(api, "u", umbrella)
        await attach(api, r_acme, {"decision.confidence": 0.1}, md=acme)
        await attach(api, r_umb, {"decision.confidence": 0.2}, md=umbrella)
        low = {"key": "decision.confidence", "value_max": 0.5}
        reader = bearer(token("reader", "acme"))
        assert await across(api, reader, **low) == [(r_acme, "decision.confidence", 0.1)]
        assert await across(api, bearer(token("reader", "umbrella")), **low) == [
            (r_umb, "decision.confidence", 0.2)
        ]
        admin = bearer(token("admin", "acme"))
        assert {r for r, _, _ in await across(api, admin, **low)} == {r_acme, r_umb}
        assert await across(api, admin, recorded_by="submitter-umbrella") == [
            (r_umb, "decision.confidence", 0.2)
        ]
        assert await across(api, reader, recorded_by="submitter-umbrella") == []


async def plan_of(db_url: str, query: AnnotationQuery) -> str:
    """The database's plan of a cross-run listing's first read (newest first)."""
    where = annotation_where(DEFAULT_TENANT, query)
    stmt = select(AnnotationRow.seq).where(*where).order_by(AnnotationRow.seq.desc()).limit(10)
    pg = db_url.startswith("postgresql")
    dialect = postgresql.dialect() if pg else sqlite.dialect()
    sql = str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    engine = create_async_engine(db_url)
    try:
        async with engine.begin() as conn:
            if pg:  # a small table is read whole otherwise
                await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
                plan = (await conn.exec_driver_sql("EXPLAIN " + sql)).fetchall()
            else:
                plan = (await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)).fetchall()
    finally:
        await engine.dispose()
    return " ".join(str(row) for row in plan)


async def test_cross_run_filters_use_an_index(harness: Harness) -> None:
    api = harness.stubs()
    for i in range(20):
        run = await new_run(api, f"p{i}")
        await attach(api, run, {"decision.confidence": i / 20, f"other.k{i}": "x"}, who=f"a{i}")
    url = harness.db_url
    plan = await plan_of(url, AnnotationQuery(key="decision.confidence"))
    assert "ix_annotations_tenant_key" in plan, plan
    plan = await plan_of(url, AnnotationQuery(key="decision.confidence", value_max=0.5))
    assert "ix_annotations_tenant_key" in plan, plan
    plan = await plan_of(url, AnnotationQuery(recorded_by="someone"))
    assert "ix_annotations_tenant_recorded_by_seq" in plan, plan
    plan = await plan_of(url, AnnotationQuery(actor_id="a3"))
    assert "ix_annotations_tenant_actor_seq" in plan, plan
    plan = await plan_of(url, AnnotationQuery(job_id="job_x"))
    assert "ix_annotations_job_seq" in plan, plan


async def test_numbers_stored_before_0012_are_backfilled(db_url: str) -> None:
    """Annotations written before revision 0012 have no value_num; the
    migration fills it, so range filters see them."""
    from .test_worker_stream import migrate_down

    async with Harness(db_url) as h:
        api = h.stubs()
        run = await new_run(api, "old")
        await attach(api, run, {"decision.confidence": 0.25, "decision.outcome": "7", "x.n": -3e-5})
        await attach(api, run, {"decision.flagged": False, "x.big": 12})
    await migrate_down(db_url, "0011")
    async with Harness(db_url) as h:
        api = h.stubs()
        assert await across(api, value_max=0.5) == [
            (run, "x.n", -3e-5),
            (run, "decision.confidence", 0.25),
        ]
        assert await across(api, value_min=10) == [(run, "x.big", 12.0)]
        assert await across(api, value_equals=value(False)) == [(run, "decision.flagged", False)]


async def test_clients_list_annotations_across_runs(sqlite_harness: Harness) -> None:
    api = sqlite_harness.stubs()
    runs = [await new_run(api, f"c{i}") for i in range(3)]
    for i, run in enumerate(runs):
        await attach(api, run, {"decision.confidence": i / 4, "decision.outcome": f"o{i}"})
    async with Client(sqlite_harness.target) as jt:
        low = [
            (x.run_id, x.value.number_value)
            async for x in jt.iter_annotations(
                key="decision.confidence", value_max=0.3, actor_kind="service", page_size=1
            )
        ]
        assert low == [(runs[1], 0.25), (runs[0], 0.0)]
        page = await jt.list_annotations(value_equals="o2")
        assert [x.run_id for x in page.items] == [runs[2]]
        one = await jt.list_annotations(runs[0])
        assert [x.key for x in one.items] == ["decision.confidence", "decision.outcome"]

    def use() -> list[str]:
        with SyncClient(sqlite_harness.target) as jt:
            return [x.run_id for x in jt.iter_annotations(value_min=0.0, page_size=2)]

    assert await asyncio.to_thread(use) == list(reversed(runs))


async def test_worker_annotations_are_found_by_value_once_published(harness: Harness) -> None:
    """A worker's annotations wait in pending_annotations until the attempt
    ends; moved into annotations, they keep their numeric value for the filters."""
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    run = await new_run(api, "worked")
    await raw.expect("assignment")
    await raw.send(
        annotate=w.AnnotationReport(
            job_id=run, attempt=1, attributes={"decision.confidence": value(0.2)}
        )
    )
    await raw.expect("ack")
    assert await across(api, value_max=0.5) == []  # not yet published
    await raw.send(complete=w.CompleteReport(job_id=run, attempt=1))
    await raw.expect("ack")
    assert await across(api, value_max=0.5, actor_kind=c.ACTOR_KIND_WORKER) == [
        (run, "decision.confidence", 0.2)
    ]
    assert await across(api, job_id=run, attempt=1) == [(run, "decision.confidence", 0.2)]
    await raw.close()


def test_page_tokens_of_earlier_releases_stay_bound_to_the_same_filters() -> None:
    """A listing of one run with the filters of earlier releases binds its
    token to what they bound it to, so a token survives the upgrade; each new
    filter (value_equals by type too) makes another query."""
    from jobtrace.domain.annotations import AnnotationFilter, token_filters

    old = {
        "run_id": "r",
        "key_prefix": "decision.",
        "actor_id": "bob",
        "since": 5,
        "attempt": 1,
        "scope": 2,
        "tenant": "t",
    }
    f = AnnotationFilter(
        run_id="r", key_prefix="decision.", actor_id="bob", since_us=5, attempt=1, scope=2
    )
    assert token_filters(f, "t") == old
    variants = [
        AnnotationFilter(value_equals=True),
        AnnotationFilter(value_equals=1.0),
        AnnotationFilter(value_equals="true"),
        AnnotationFilter(value_min=0.0),
        AnnotationFilter(value_max=0.0),
        AnnotationFilter(key="a.b"),
        AnnotationFilter(recorded_by="x"),
        AnnotationFilter(),
    ]
    assert len({json.dumps(token_filters(x, "t"), sort_keys=True) for x in variants}) == len(
        variants
    )
