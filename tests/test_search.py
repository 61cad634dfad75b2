"""SearchTraceEvents through a real server on both backends: hits with
snippets, misses, the query syntax and its errors, filters, paging across
runs, tenancy, retention, worker events, redaction, and the index behind it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from jobtrace.client import Client, SyncClient
from jobtrace.domain.errors import Violations
from jobtrace.domain.search import parse_query, snippet
from jobtrace.model import TraceEvent
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w
from jobtrace.store.search import fts5_match, pg_tsquery

from .conftest import Harness, Stubs, expect_error
from .procs import jobtrace
from .test_security import bearer, token, write_tokens
from .workers import RawWorker


async def new_run(api: Stubs, rid: str, md: Any = None, service: str = "svc") -> str:
    request = j.SubmitJobRequest(request_id=rid, job=c.JobSpec(service=service))
    return str((await api.jobs.SubmitJob(request, metadata=md)).job.id)


async def append(api: Stubs, run_id: str, *events: c.TraceEvent, md: Any = None) -> None:
    await api.trace.AppendTraceEvents(
        t.AppendTraceEventsRequest(run_id=run_id, events=events), metadata=md
    )


def ev(key: str, message: str, **fields: Any) -> c.TraceEvent:
    return c.TraceEvent(event_key=key, message=message, **fields)


async def search(api: Stubs, query: str, md: Any = None, **filters: Any) -> list[t.TraceEventHit]:
    """Every hit, following page tokens."""
    hits: list[t.TraceEventHit] = []
    page_token = ""
    while True:
        page = await api.trace.SearchTraceEvents(
            t.SearchTraceEventsRequest(query=query, page_token=page_token, **filters), metadata=md
        )
        hits += page.hits
        page_token = page.next_page_token
        if not page_token:
            return hits


async def messages(api: Stubs, query: str, md: Any = None, **filters: Any) -> list[str]:
    return [h.event.message for h in await search(api, query, md, **filters)]


async def test_a_search_finds_the_event_with_a_snippet_and_misses_what_is_not_there(
    harness: Harness,
) -> None:
    api = harness.stubs()
    run = await new_run(api, "r")
    await append(
        api,
        run,
        ev("a", "step 3: CUDA error: out of memory (CUDA OOM) while allocating 2 GiB"),
        ev("b", "loaded 12 shards", user_message="Your model is ready"),
        ev("c", "memory is out, of course"),
    )
    (hit,) = await search(api, "cuda oom")
    assert hit.run_id == run and hit.event.run_id == run and hit.event.sequence == 1
    assert hit.event.id == f"{run}:1"
    assert hit.snippet == (
        "step 3: «CUDA» error: out of memory («CUDA» «OOM») while allocating 2 GiB"
    )
    assert await messages(api, "CUDA OOM nvidia") == []  # every word must match
    assert await messages(api, "segfault") == []
    # A phrase: the words next to each other, in order; words: anywhere.
    assert await messages(api, '"out of memory"') == [
        "step 3: CUDA error: out of memory (CUDA OOM) while allocating 2 GiB"
    ]
    assert len(await messages(api, "out of memory")) == 2
    assert await messages(api, "out-of-memory") == await messages(api, '"out of memory"')
    # The user message is searched too, and its snippet shown when only it matched.
    (ready,) = await search(api, "ready")
    assert ready.event.message == "loaded 12 shards" and ready.snippet == "Your model is «ready»"
    # OR, negation, prefix.
    assert len(await messages(api, "shards OR oom")) == 2
    assert await messages(api, "memory -course") == [
        "step 3: CUDA error: out of memory (CUDA OOM) while allocating 2 GiB"
    ]
    assert await messages(api, "shard*") == ["loaded 12 shards"]
    assert await messages(api, "shard") == []  # words match whole, never stemmed


BAD_QUERIES = [
    ("", "required"),
    ("   ", "required"),
    ('cuda "out of memory', "unbalanced quote: the phrase opened at character 6 is never closed"),
    ("OR cuda", "OR at character 1 needs a term on each side"),
    ("cuda OR", "OR at character 6 needs a term on each side"),
    ("cuda OR OR oom", "OR at character 9 needs a term on each side"),
    ("-cuda", "needs a term that is not negated"),
    ('-cuda -"out of memory"', "needs a term that is not negated"),
    ("cuda OR -oom", "a negated term cannot be part of OR"),
    ("-cuda OR oom", "a negated term cannot be part of OR"),
    ("c*", "prefix 'c*' at character 1 is too short"),
    ("x" * 257, "must be at most 256 characters (got 257)"),
    (" ".join(f"w{i}" for i in range(17)), "at most 16 terms (got 17)"),
    ("!!! -- ...", "has no words to search for"),
]


async def test_a_bad_query_is_invalid_argument_naming_the_problem(harness: Harness) -> None:
    api = harness.stubs()
    await append(api, await new_run(api, "r"), ev("a", "cuda oom"))
    for query, problem in BAD_QUERIES:
        err, _, violations = await expect_error(
            api.trace.SearchTraceEvents(t.SearchTraceEventsRequest(query=query)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [field for field, _ in violations] == ["query"], query
        assert problem in violations[0][1], (query, violations)
        assert problem in (err.details() or ""), query


# Engine syntax of both backends, as a user might type it: each is searched
# for its words, never read as syntax.
HOSTILE = [
    "NEAR(cuda oom)",
    "(CUDA OOM)",
    "cuda AND oom",
    "cuda NOT oom",
    "message:cuda",
    "'cuda' & 'oom' | !x <-> yy:*",
    "cuda^ {oom} [x] (y) \\z %",
    'cu"da" "" oom',
    "AND",
    "NOT",
    "*",
    "cuda:*",
    "- * OR-x",
    "café naïve 日本語",
    "e11000 0x7f 1.2.3 example.com /var/log",
]


async def test_engine_syntax_in_a_query_is_only_words(harness: Harness) -> None:
    api = harness.stubs()
    run = await new_run(api, "r")
    await append(
        api,
        run,
        ev("a", "CUDA OOM at example.com: E11000 in /var/log (v1.2.3)"),
        ev("b", "café naïve 日本語"),
    )
    found: dict[str, int] = {}
    for query in HOSTILE:
        try:
            found[query] = len(await search(api, query))
        except grpc.aio.AioRpcError as err:  # no word at all: refused, never INTERNAL
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (query, err.details())
            found[query] = -1
    assert found["*"] == -1 and found["- * OR-x"] == 0  # "OR-x" is the words or, x
    assert found["NEAR(cuda oom)"] == 0  # the phrase "near cuda", and oom
    assert found["(CUDA OOM)"] == 1
    assert found["cuda AND oom"] == 0  # "and" is a word too
    assert found["message:cuda"] == 0
    assert found["e11000 0x7f 1.2.3 example.com /var/log"] == 0  # no 0x7f
    assert await messages(api, "e11000 v1.2.3 example.com /var/log") == [
        "CUDA OOM at example.com: E11000 in /var/log (v1.2.3)"
    ]
    assert found["café naïve 日本語"] == 1
    assert found["cuda:*"] == 1  # a prefix of cuda: cuda itself


async def test_bad_filters_and_page_tokens_name_the_field(harness: Harness) -> None:
    api = harness.stubs()
    run = await new_run(api, "r")
    await append(api, run, ev("a", "disk full"), ev("b", "disk slow"))
    page = await api.trace.SearchTraceEvents(t.SearchTraceEventsRequest(query="disk", page_size=1))
    assert page.next_page_token
    early, late = c.TraceEvent().timestamp, c.TraceEvent().timestamp
    early.FromSeconds(1000)
    late.FromSeconds(2000)
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"page_size": -1}, "page_size", ""),
        ({"page_size": 1001}, "page_size", ""),
        ({"min_level": 99}, "min_level", "unknown value 99"),
        ({"category": 7}, "category", "unknown value 7"),
        ({"type": 42}, "type", "unknown value 42"),
        ({"since": late, "until": early}, "until", "must be after since"),
        ({"view": 9}, "view", ""),
        ({"service": "s" * 129}, "service", "at most 128"),
        ({"page_token": "garbage"}, "page_token", "malformed page token"),
        (
            {"page_token": page.next_page_token, "query": "full"},
            "page_token",
            "page token belongs to a query with other filters",
        ),
        (
            {"page_token": page.next_page_token, "min_level": c.LEVEL_WARN},
            "page_token",
            "page token belongs to a query with other filters",
        ),
    ]
    for fields, field, problem in cases:
        request = t.SearchTraceEventsRequest(query="disk")
        for name, value in fields.items():
            if isinstance(value, type(early)):
                getattr(request, name).CopyFrom(value)
            else:
                setattr(request, name, value)
        _, _, violations = await expect_error(
            api.trace.SearchTraceEvents(request), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert [f for f, _ in violations] == [field], fields
        assert problem in violations[0][1], (fields, violations)
    await expect_error(
        api.trace.SearchTraceEvents(t.SearchTraceEventsRequest(query="disk", run_id="job_nope")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_filters_narrow_the_hits(harness: Harness) -> None:
    api = harness.stubs()
    gpu = await new_run(api, "gpu", service="gpu")
    cpu = await new_run(api, "cpu", service="cpu")

    def at(seconds: int) -> Any:
        stamp = c.TraceEvent().timestamp
        stamp.FromSeconds(seconds)
        return stamp

    await append(
        api,
        gpu,
        ev("a", "disk full", category=c.CATEGORY_BUSINESS, timestamp=at(1_000)),
        ev("b", "disk slow", level=c.LEVEL_WARN, timestamp=at(2_000)),
        ev("c", "disk gone", level=c.LEVEL_ERROR, timestamp=at(3_000)),
    )
    await append(api, cpu, ev("d", "disk fine", level=c.LEVEL_DEBUG, timestamp=at(2_500)))
    assert await messages(api, "disk") == ["disk fine", "disk gone", "disk slow", "disk full"]
    assert await messages(api, "disk", min_level=c.LEVEL_WARN) == ["disk gone", "disk slow"]
    assert await messages(api, "disk", category=c.CATEGORY_BUSINESS) == ["disk full"]
    assert len(await messages(api, "disk", type=c.TRACE_EVENT_TYPE_LOG)) == 4
    assert await messages(api, "disk", type=c.TRACE_EVENT_TYPE_PROGRESS) == []
    assert await messages(api, "disk", service="cpu") == ["disk fine"]
    assert len(await messages(api, "disk", service="gpu")) == 3
    assert await messages(api, "disk", service="tpu") == []
    assert await messages(api, "disk", since=at(2_000), until=at(3_000)) == [
        "disk fine",
        "disk slow",
    ]
    assert await messages(api, "disk", run_id=cpu) == ["disk fine"]
    assert await messages(api, "disk", run_id=gpu, min_level=c.LEVEL_ERROR) == ["disk gone"]


async def test_a_workflow_steps_events_are_found_by_their_service(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["render"])
    wf = await api.jobs.SubmitWorkflow(
        j.SubmitWorkflowRequest(
            request_id="wf",
            name="nightly",
            steps=[c.WorkflowStepSpec(name="frames", job=c.JobSpec(service="render"))],
        )
    )
    assignment = await raw.expect("assignment")
    job = assignment.job
    await raw.send(
        trace=w.TraceReport(
            job_id=job.id, attempt=1, events=[c.TraceEvent(message="frame 7 rendered")]
        )
    )
    await raw.expect("ack")
    await append(api, wf.workflow.id, ev("note", "frame budget noted by the caller"))
    hits = await search(api, "frame", service="render")
    assert [(h.run_id, h.event.job_id, h.event.message) for h in hits] == [
        (wf.workflow.id, job.id, "frame 7 rendered")
    ]
    assert len(await search(api, "frame")) == 2
    await raw.close()


async def test_hits_come_newest_first_across_runs_a_page_at_a_time(harness: Harness) -> None:
    api = harness.stubs()
    runs = [await new_run(api, f"r{i}") for i in range(3)]
    stored: list[str] = []
    for i in range(5):
        for n, run in enumerate(runs):
            await append(api, run, ev(f"k{i}", f"tick {i} of run {n}"), ev(f"o{i}", "other"))
            stored.append(f"tick {i} of run {n}")
    seen: list[str] = []
    page_token = ""
    pages = 0
    while True:
        page = await api.trace.SearchTraceEvents(
            t.SearchTraceEventsRequest(query="tick", page_size=4, page_token=page_token)
        )
        pages += 1
        assert len(page.hits) == (4 if page.next_page_token else 3)
        seen += [h.event.message for h in page.hits]
        if pages == 1:
            # Stored after the first page: newer than all, so not on later pages.
            await append(api, runs[0], ev("late", "tick late"))
        page_token = page.next_page_token
        if not page_token:
            break
    assert pages == 4 and seen == list(reversed(stored))
    assert (await messages(api, "tick"))[0] == "tick late"
    one = await api.trace.SearchTraceEvents(t.SearchTraceEventsRequest(query="tick", page_size=16))
    assert len(one.hits) == 16 and one.next_page_token == ""


async def test_another_tenants_events_are_never_found(db_url: str, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    write_tokens(tokens)
    async with Harness(db_url, tokens_file=str(tokens)) as h:
        api = h.stubs()
        acme, umbrella = bearer(token("submitter", "acme")), bearer(token("submitter", "umbrella"))
        r_acme = await new_run(api, "a", acme)
        r_umb = await new_run(api, "u", umbrella)
        await append(api, r_acme, ev("a", "CUDA OOM at acme"), md=acme)
        await append(api, r_umb, ev("u", "CUDA OOM at umbrella"), md=umbrella)
        reader = bearer(token("reader", "acme"))
        assert await messages(api, "cuda oom", reader) == ["CUDA OOM at acme"]
        assert await messages(api, "umbrella", reader) == []
        assert await messages(api, "cuda", bearer(token("reader", "umbrella"))) == [
            "CUDA OOM at umbrella"
        ]
        await expect_error(
            api.trace.SearchTraceEvents(
                t.SearchTraceEventsRequest(query="cuda", run_id=r_umb), metadata=reader
            ),
            grpc.StatusCode.NOT_FOUND,
        )
        # A page token is bound to its tenant too.
        page = await api.trace.SearchTraceEvents(
            t.SearchTraceEventsRequest(query="cuda", page_size=1),
            metadata=bearer(token("admin", "acme")),
        )
        assert page.next_page_token
        await expect_error(
            api.trace.SearchTraceEvents(
                t.SearchTraceEventsRequest(
                    query="cuda", page_size=1, page_token=page.next_page_token
                ),
                metadata=reader,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        admin = await messages(api, "cuda", bearer(token("admin", "acme")))
        assert sorted(admin) == ["CUDA OOM at acme", "CUDA OOM at umbrella"]


async def test_events_the_retention_sweep_removed_are_no_longer_found(
    harness: Harness,
) -> None:
    api = harness.stubs()
    old = await new_run(api, "old")
    await append(api, old, *(ev(f"k{i}", f"CUDA OOM number {i}") for i in range(30)))
    assert len(await messages(api, "cuda oom")) == 30
    assert harness.server is not None
    trace = harness.server.trace
    trace.retention_s = -1.0  # everything is older than "now + 1 s"
    assert await trace.sweep_once(batch=7) == 30
    assert await messages(api, "cuda oom") == []
    assert await messages(api, "number", run_id=old) == []
    # The index goes on: what is stored after the sweep is found, alone.
    trace.retention_s = 3600.0
    fresh = await new_run(api, "fresh")
    await append(api, fresh, ev("new", "CUDA OOM again"))
    hits = await search(api, "cuda oom")
    assert [(h.run_id, h.event.message) for h in hits] == [(fresh, "CUDA OOM again")]
    # The words of removed events are gone from the index too (SQLite numbers
    # new rows from 1 again once the table is empty: a stale entry would
    # match the new event).
    assert await messages(api, "number") == []
    if harness.db_url.startswith("sqlite"):
        from .conftest import execute_sql

        # FTS5 checks its index against trace_events (raises if they differ).
        await execute_sql(
            harness.db_url,
            "INSERT INTO trace_events_search(trace_events_search, rank)"
            " VALUES ('integrity-check', 1)",
        )


async def test_events_of_workers_and_of_the_server_are_found(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    job = await api.jobs.SubmitJob(
        j.SubmitJobRequest(
            request_id="r",
            job=c.JobSpec(
                service="svc",
                max_attempts=2,
                backoff=c.BackoffPolicy(initial_interval={"nanos": 1000000}),
            ),
        )
    )
    run = job.job.id
    await raw.expect("assignment")
    await raw.send(
        trace=w.TraceReport(
            job_id=run,
            attempt=1,
            events=[c.TraceEvent(message="worker log: CUDA OOM on device 0")],
        )
    )
    await raw.expect("ack")
    await raw.send(progress=w.ProgressReport(job_id=run, attempt=1, percent=40, message="epoch 3"))
    await raw.expect("ack")
    await raw.send(
        fail=w.FailReport(
            job_id=run, attempt=1, retryable=True, error=c.ErrorDetail(message="NCCL timeout")
        )
    )
    await raw.expect("ack")
    await append(api, run, ev("caller", "caller note about the OOM"))
    (log,) = await search(api, "cuda oom")
    assert log.event.type == c.TRACE_EVENT_TYPE_LOG and log.event.worker_id == "w1"
    assert log.event.recorded_by and log.event.job_id == run
    (progress,) = await search(api, "epoch", type=c.TRACE_EVENT_TYPE_PROGRESS)
    assert progress.event.percent == 40 and progress.snippet == "«epoch» 3"
    (failed,) = await search(api, '"nccl timeout"')
    assert failed.event.type == c.TRACE_EVENT_TYPE_FAILED
    assert f"{run} attempt 1 failed: «NCCL timeout»; retrying" in failed.snippet
    (started,) = await search(api, '"started attempt 1"')
    assert started.event.type == c.TRACE_EVENT_TYPE_STARTED
    assert [h.event.message for h in await search(api, "oom")] == [
        "caller note about the OOM",
        "worker log: CUDA OOM on device 0",
    ]
    await raw.close()


async def test_only_redacted_text_is_stored_searched_and_shown(harness: Harness) -> None:
    api = harness.stubs()
    run = await new_run(api, "r")
    secret = "abcdef123456"
    await append(
        api,
        run,
        ev(
            "a",
            f"calling upstream with Bearer {secret}",
            user_message=f"retry with Bearer {secret}",
        ),
    )
    assert await search(api, secret) == []
    (hit,) = await search(api, "upstream", view=t.TRACE_EVENT_VIEW_FULL)
    assert secret not in hit.snippet and secret not in hit.event.message
    assert secret not in hit.event.user_message
    assert hit.snippet.startswith("calling «upstream» with ")


async def test_snippets_mark_matches_unambiguously(harness: Harness) -> None:
    api = harness.stubs()
    run = await new_run(api, "r")
    long_head = " ".join(f"pad{i}" for i in range(40))
    await append(
        api,
        run,
        ev("a", "«quoted» text with\n\nnewlines and the MATCH here"),
        ev("b", f"{long_head} the needle sits far along {long_head}"),
    )
    (marked,) = await search(api, "match")
    # A guillemet in the text shows as a single one: every « » pair is a match.
    single = "\N{SINGLE LEFT-POINTING ANGLE QUOTATION MARK}quoted"
    single += "\N{SINGLE RIGHT-POINTING ANGLE QUOTATION MARK}"
    assert marked.snippet == f"{single} text with newlines and the «MATCH» here"
    (far,) = await search(api, "needle")
    assert far.snippet.startswith("…") and far.snippet.endswith("…")
    assert "the «needle» sits far along" in far.snippet
    assert len(far.snippet) <= 220


async def test_events_stored_before_0014_are_found(db_url: str) -> None:
    """Migration 0014 indexes the events already stored."""
    from .test_worker_stream import migrate_down

    async with Harness(db_url) as h:
        api = h.stubs()
        run = await new_run(api, "old")
        await append(api, run, ev("a", "CUDA OOM before the upgrade"))
    await migrate_down(db_url, "0013")
    async with Harness(db_url) as h:
        api = h.stubs()
        assert await messages(api, "cuda oom") == ["CUDA OOM before the upgrade"]
        await append(api, run, ev("b", "CUDA OOM after the upgrade"))
        assert len(await messages(api, "cuda oom")) == 2


# --- the query syntax, without a server ----------------------------------------------


def parsed(text: str) -> Any:
    v = Violations()
    q = parse_query(v, text)
    return q if q is not None else [x.description for x in v.items]


def test_queries_render_for_both_engines() -> None:
    q = parsed('CUDA "out of memory" timeout OR oom -retry job-42* ')
    assert fts5_match(q) == (
        '((("cuda") AND ("out of memory") AND ("timeout" OR "oom") AND ("job 42"*)) NOT ("retry"))'
    )
    assert pg_tsquery(q) == (
        "('cuda') & ('out' <-> 'of' <-> 'memory') & ('timeout' | 'oom') & !('retry')"
        " & ('job' <-> '42':*)"
    )


def test_a_snippet_highlights_phrases_whole_and_prefixes() -> None:
    q = parsed('"out of memory" gpu*')
    e = TraceEvent(run_id="r", message="GPU0: out of memory; of memory out; gpus busy")
    assert snippet(e, q) == "«GPU0»: «out of memory»; of memory out; «gpus» busy"
    # Punctuation separates words, as the engines read it: still a phrase.
    e = TraceEvent(run_id="r", message="out, of memory")
    assert snippet(e, q) == "«out, of memory»"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab cd\"-*OR():^'\\!&|<>é日_.\t"), max_size=40))
def test_any_query_is_either_refused_with_a_reason_or_runs_on_fts5(text: str) -> None:
    """Whatever a user types, FTS5 never sees a syntax error: the parser
    refuses it with a violation on `query`, or its rendering runs."""
    import sqlite3

    v = Violations()
    q = parse_query(v, text)
    if q is None:
        assert [x.field for x in v.items] == ["query"] and v.items[0].description
        return
    assert not v.items
    db = sqlite3.connect(":memory:")
    db.execute(
        "CREATE VIRTUAL TABLE s USING fts5(message, tokenize='unicode61 remove_diacritics 0')"
    )
    db.execute("INSERT INTO s VALUES ('ab cd é 日 or')")
    db.execute("SELECT rowid FROM s WHERE s MATCH ?", (fts5_match(q),)).fetchall()
    words = [w for clause in q.clauses for term in clause.terms for w in term.words]
    assert words and all(w.isalnum() for w in words)


# --- the clients and the command line ------------------------------------------------


async def test_clients_search_trace_events(sqlite_harness: Harness) -> None:
    async with Client(sqlite_harness.target) as jt:
        runs = []
        for i in range(3):
            job = await jt.submit_job("svc")
            await jt.append_trace_events(
                job.id, [{"message": f"CUDA OOM in run {i}", "level": "LEVEL_ERROR"}]
            )
            runs.append(job.id)
        page = await jt.search_trace_events("cuda oom", page_size=2, min_level="error")
        assert [h.run_id for h in page.items] == [runs[2], runs[1]] and page.next_page_token
        assert "«CUDA» «OOM» in run 2" == page.items[0].snippet
        every = [h.run_id async for h in jt.iter_search_trace_events("oom", page_size=1)]
        assert every == list(reversed(runs))
        one = await jt.search_trace_events("oom", run_id=runs[0], view="full")
        assert [h.event.message for h in one.items] == ["CUDA OOM in run 0"]

    def use() -> list[str]:
        with SyncClient(sqlite_harness.target) as jt:
            assert jt.search_trace_events("nothing here").items == []
            return [h.run_id for h in jt.iter_search_trace_events("cuda", page_size=2)]

    assert await asyncio.to_thread(use) == list(reversed(runs))


async def test_cli_trace_search(sqlite_harness: Harness) -> None:
    target = sqlite_harness.target
    async with Client(target) as jt:
        gpu = await jt.submit_job("gpu")
        cpu = await jt.submit_job("cpu")
        await jt.append_trace_events(gpu.id, [{"message": "CUDA OOM on device 0"}])
        await jt.append_trace_events(cpu.id, [{"message": "no CUDA here", "level": "LEVEL_WARN"}])
    code, out, _ = await jobtrace("trace", "search", "CUDA OOM", "--json", target=target)
    assert code == 0
    found = json.loads(out)
    assert [(h["run_id"], h["snippet"]) for h in found["hits"]] == [
        (gpu.id, "«CUDA» «OOM» on device 0")
    ]
    assert found["hits"][0]["event"]["message"] == "CUDA OOM on device 0"
    code, out, _ = await jobtrace("trace", "search", "cuda", "--service", "cpu", target=target)
    assert code == 0 and f"{cpu.id}:1" in out and "no «CUDA» here" in out and gpu.id not in out
    code, out, _ = await jobtrace(
        "trace", "search", "cuda", "--level", "warn", "--json", target=target
    )
    assert [h["run_id"] for h in json.loads(out)["hits"]] == [cpu.id]
    code, out, _ = await jobtrace(
        "trace", "search", "--limit", "1", "--json", "--", "-oom cuda", target=target
    )
    assert [h["run_id"] for h in json.loads(out)["hits"]] == [cpu.id]
    code, _, err = await jobtrace("trace", "search", '"cuda', target=target)
    assert code == 2 and "unbalanced quote" in err and "INTERNAL" not in err


async def test_a_search_reads_the_full_text_index(harness: Harness) -> None:
    """The database's plan of a search's read names the index (EXPLAIN), so a
    lost index or trigger fails here rather than turning into a table scan."""
    from sqlalchemy.dialects import postgresql, sqlite
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from jobtrace.auth import DEFAULT_TENANT
    from jobtrace.store.search import SearchFilter, match_statement

    api = harness.stubs()
    run = await new_run(api, "r")
    await append(api, run, *(ev(f"k{i}", f"line {i} of the log") for i in range(50)))
    pg = harness.db_url.startswith("postgresql")
    engine = create_async_engine(harness.db_url)
    try:
        async with AsyncSession(engine) as session:
            stmt = match_statement(
                session, parsed("cuda oom"), SearchFilter(tenant=DEFAULT_TENANT), None, 10
            )
        dialect = postgresql.dialect() if pg else sqlite.dialect()
        text = str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
        async with engine.begin() as conn:
            if pg:  # a small table is read whole otherwise
                await conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
                plan = (await conn.exec_driver_sql("EXPLAIN " + text)).fetchall()
            else:
                plan = (await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + text)).fetchall()
    finally:
        await engine.dispose()
    shown = " ".join(str(row) for row in plan)
    if pg:
        assert "ix_trace_events_search" in shown, shown
    else:
        assert "VIRTUAL TABLE INDEX" in shown and "trace_events_search" in shown, shown
        assert "USE TEMP B-TREE" not in shown, shown  # the index gives the order


async def test_no_query_reaches_an_engine_as_a_syntax_error(harness: Harness) -> None:
    """Queries drawn from the characters both engines' syntaxes are made of:
    each is answered, or refused as INVALID_ARGUMENT; never another status."""
    import random

    api = harness.stubs()
    await append(api, await new_run(api, "r"), ev("a", "ab cd é 日 or and not near"))
    draw = random.Random(17)
    alphabet = [*"ab cd\"-*OR():^'\\!&|<>é日_.,{}[]+~%@#", "OR", "AND", "NOT", "NEAR"]
    answered = refused = 0
    for _ in range(300):
        query = "".join(draw.choice(alphabet) for _ in range(draw.randint(1, 24)))
        try:
            await api.trace.SearchTraceEvents(t.SearchTraceEventsRequest(query=query))
            answered += 1
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (query, err.details())
            refused += 1
    assert answered > 100 and refused > 10
