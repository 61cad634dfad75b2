"""List pages bounded in bytes as well as in items, and list views, over a real
server on both backends: a listing of large stored items comes in pages that
each fit a response (and continue exactly), and the default (BASIC) view
leaves the heavy fields out, so it stays small."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from sqlalchemy import event
from sqlalchemy.engine import Engine

from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, expect_error, stubs_for
from .workers import RawWorker

# What a gRPC client accepts by default: every page must fit it.
CLIENT_MAX = 4 * 1024 * 1024
# The server's largest message by default (8 MiB): each listing below stores
# more than that, so one page holding everything could not be sent.
SERVER_MAX = 8 * 1024 * 1024
# Characters of a large payload or result: under the 1 MiB limit.
BIG = 900_000
LARGE_JOBS = 12  # 12 x 900 KB = 10.8 MB
# Characters of each large part of a trace event (data, output_summary,
# error.details, error.stack: 64 KB at most each).
EVENT_PART = 60_000
LARGE_EVENTS = 40  # 40 x 240 KB = 9.6 MB


def struct(**fields: Any) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(fields)
    return s


async def submit_large_jobs(
    api: Stubs, count: int = LARGE_JOBS, service: str = "bulk"
) -> list[c.Job]:
    jobs = []
    for i in range(count):
        payload = struct(i=i, blob=chr(ord("a") + i) * BIG)
        request = j.SubmitJobRequest(
            request_id=f"{service}-{i}", job=c.JobSpec(service=service, payload=payload)
        )
        jobs.append((await api.jobs.SubmitJob(request)).job)
    return jobs


async def every_page(
    call: Callable[[str], Awaitable[Any]], token_of: Callable[[Any], str], bound: int
) -> list[Any]:
    """Every page of a listing, following its tokens (at most `bound` pages)."""
    pages = [await call("")]
    while token_of(pages[-1]):
        assert len(pages) < bound, "the listing does not end"
        pages.append(await call(token_of(pages[-1])))
    return pages


def assert_fit(pages: list[Any], items: str) -> None:
    """More than one page, none empty, each within what a default client takes."""
    assert len(pages) > 1, "a listing larger than a message must come in several pages"
    assert all(len(getattr(p, items)) >= 1 for p in pages)
    assert all(p.ByteSize() < CLIENT_MAX for p in pages)


async def test_a_full_job_listing_comes_in_pages_bounded_by_bytes(api: Stubs) -> None:
    submitted = await submit_large_jobs(api)

    async def page(token: str) -> j.ListJobsResponse:
        request = j.ListJobsRequest(page_size=1000, page_token=token, view=j.JOB_VIEW_FULL)
        return await api.jobs.ListJobs(request)

    pages = await every_page(page, lambda p: p.next_page_token, bound=LARGE_JOBS + 1)
    assert_fit(pages, "jobs")
    listed = [job for p in pages for job in p.jobs]
    newest_first = list(reversed(submitted))
    assert [x.id for x in listed] == [x.id for x in newest_first], "each job once, in order"
    assert [x.spec.payload for x in listed] == [x.spec.payload for x in newest_first]


async def test_a_default_job_listing_leaves_heavy_fields_out_and_fits_one_page(
    api: Stubs,
) -> None:
    submitted = await submit_large_jobs(api, service="worked", count=2)
    submitted += await submit_large_jobs(api)
    worker = RawWorker(api)
    try:
        await worker.hello("w1", ["worked"], max_concurrency=2)
        done, failed = await worker.expect("assignment"), await worker.expect("assignment")
        await worker.send(
            complete=w.CompleteReport(job_id=done.job.id, attempt=1, result=struct(out="r" * BIG))
        )
        await worker.expect("ack")
        await worker.send(
            fail=w.FailReport(
                job_id=failed.job.id,
                attempt=1,
                error=c.ErrorDetail(message="broke", details="d" * 60_000),
                retryable=False,
            )
        )
        await worker.expect("ack")
    finally:
        await worker.close()

    page = await api.jobs.ListJobs(j.ListJobsRequest(page_size=1000))
    assert [x.id for x in page.jobs] == [x.id for x in reversed(submitted)]
    assert page.next_page_token == ""
    assert page.ByteSize() < 64 * 1024
    assert not any(x.spec.HasField("payload") or x.HasField("result") for x in page.jobs)
    by_id = {x.id: x for x in page.jobs}
    assert by_id[done.job.id].state == c.RUN_STATE_COMPLETED
    assert by_id[failed.job.id].failure.reason == "broke"
    assert by_id[failed.job.id].failure.details == ""
    assert page == await api.jobs.ListJobs(j.ListJobsRequest(page_size=1000, view=j.JOB_VIEW_BASIC))
    # GetJob (and FULL) still return everything.
    got = (await api.jobs.GetJob(j.GetJobRequest(job_id=done.job.id))).job
    assert got.spec.payload == done.job.spec.payload
    assert got.result == struct(out="r" * BIG)
    got = (await api.jobs.GetJob(j.GetJobRequest(job_id=failed.job.id))).job
    assert got.failure.details == "d" * 60_000


async def append_large_events(
    api: Stubs, run_id: str = "", keys: str = "e"
) -> tuple[str, list[c.TraceEvent]]:
    """40 events of ~240 KB each (9.6 MB), on a new job's run unless given one."""
    if not run_id:
        submit = j.SubmitJobRequest(request_id="traced", job=c.JobSpec(service="traced"))
        run_id = (await api.jobs.SubmitJob(submit)).job.id
    stored: list[c.TraceEvent] = []
    for batch in range(4):  # the reply echoes the events: 10 at a time fit a client
        events = [
            c.TraceEvent(
                event_key=f"{keys}{batch}-{i}",
                message=f"event {batch}-{i}",
                error=c.ErrorDetail(
                    message="boom", details="d" * EVENT_PART, stack="s" * EVENT_PART
                ),
                output_summary=struct(summary="o" * EVENT_PART),
                data=struct(blob=chr(ord("a") + i % 26) * EVENT_PART),
            )
            for i in range(LARGE_EVENTS // 4)
        ]
        request = t.AppendTraceEventsRequest(run_id=run_id, events=events)
        stored += (await api.trace.AppendTraceEvents(request)).events
    return run_id, stored


async def test_a_full_trace_listing_comes_in_pages_bounded_by_bytes(api: Stubs) -> None:
    run_id, stored = await append_large_events(api)

    async def page(cursor: str) -> t.ListTraceEventsResponse:
        request = t.ListTraceEventsRequest(
            run_id=run_id, cursor=cursor, page_size=1000, view=t.TRACE_EVENT_VIEW_FULL
        )
        return await api.trace.ListTraceEvents(request)

    pages = await every_page(
        page, lambda p: p.next_cursor if p.more else "", bound=LARGE_EVENTS + 1
    )
    assert_fit(pages, "events")
    listed = [e for p in pages for e in p.events if e.event_key]
    assert [e.sequence for e in listed] == [e.sequence for e in stored], "each once, in order"
    assert [e.data for e in listed] == [e.data for e in stored]
    assert all(e.error.stack == "s" * EVENT_PART for e in listed)
    sequences = [e.sequence for p in pages for e in p.events]
    assert sequences == sorted(set(sequences)), "no gap is skipped, nothing comes twice"


async def test_a_default_trace_listing_leaves_heavy_fields_out_and_fits_one_page(
    api: Stubs,
) -> None:
    run_id, stored = await append_large_events(api)
    page = await api.trace.ListTraceEvents(t.ListTraceEventsRequest(run_id=run_id, page_size=1000))
    assert not page.more
    listed = [e for e in page.events if e.event_key]
    assert [e.sequence for e in listed] == [e.sequence for e in stored]
    assert page.ByteSize() < 64 * 1024
    for e in listed:
        assert not e.HasField("data") and not e.HasField("output_summary")
        assert (e.error.message, e.error.details, e.error.stack) == ("boom", "", "")
        assert e.message.startswith("event ")
    assert page == await api.trace.ListTraceEvents(
        t.ListTraceEventsRequest(run_id=run_id, page_size=1000, view=t.TRACE_EVENT_VIEW_BASIC)
    )


async def test_annotation_listings_are_bounded_by_bytes_and_basic_leaves_payload_out(
    api: Stubs,
) -> None:
    run_id = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="annotated", job=c.JobSpec(service="svc"))
        )
    ).job.id
    payload = struct(blob="p" * 60_000)
    for round_ in range(3):  # 3 x 64 annotations of 60 KB each: 11.5 MB
        await api.attest.AttachAnnotations(
            a.AttachAnnotationsRequest(
                run_id=run_id,
                actor=c.Actor(kind=c.ACTOR_KIND_USER, id="alice"),
                attributes={f"note.k{round_}_{i:02d}": struct_pb2.Value(number_value=i)
                            for i in range(64)},
                payload=payload,
                idempotency_key=f"round-{round_}",
            )
        )  # fmt: skip

    async def page(token: str) -> a.ListAnnotationsResponse:
        request = a.ListAnnotationsRequest(
            run_id=run_id, page_size=1000, page_token=token, view=a.ANNOTATION_VIEW_FULL
        )
        return await api.attest.ListAnnotations(request)

    pages = await every_page(page, lambda p: p.next_page_token, bound=200)
    assert_fit(pages, "annotations")
    full = [x for p in pages for x in p.annotations]
    assert len(full) == len({x.id for x in full}) == 192
    assert all(x.payload == payload for x in full)

    basic = await api.attest.ListAnnotations(
        a.ListAnnotationsRequest(run_id=run_id, page_size=1000)
    )
    assert basic.next_page_token == ""
    assert [x.id for x in basic.annotations] == [x.id for x in full]
    assert not any(x.HasField("payload") for x in basic.annotations)
    assert [x.value for x in basic.annotations] == [x.value for x in full]


async def test_attestation_listings_are_bounded_by_bytes_and_basic_leaves_data_out(
    api: Stubs,
) -> None:
    count = 6  # each attests a ~800 KB payload and a ~800 KB result: 9.6 MB
    for i in range(count):
        payload = struct(i=i, blob=chr(ord("a") + i) * 800_000)
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(
                request_id=f"att-{i}", job=c.JobSpec(service="bulk", payload=payload)
            )
        )
    worker = RawWorker(api)
    try:
        await worker.hello("w1", ["bulk"], max_concurrency=count)
        for _ in range(count):
            job = (await worker.expect("assignment")).job
            result = struct(out=chr(ord("A") + int(job.spec.payload["i"])) * 800_000)
            await worker.send(complete=w.CompleteReport(job_id=job.id, attempt=1, result=result))
            await worker.expect("ack")
    finally:
        await worker.close()

    async def page(token: str) -> a.ListAttestationsResponse:
        request = a.ListAttestationsRequest(
            page_size=1000, page_token=token, view=a.ATTESTATION_VIEW_FULL
        )
        return await api.attest.ListAttestations(request)

    pages = await every_page(page, lambda p: p.next_page_token, bound=count + 1)
    assert_fit(pages, "attestations")
    full = [x for p in pages for x in p.attestations]
    assert len(full) == len({x.key for x in full}) == count
    assert all(len(x.data["job_payload"]["blob"]) == 800_000 for x in full)

    basic = await api.attest.ListAttestations(a.ListAttestationsRequest(page_size=1000))
    assert basic.next_page_token == ""
    assert [x.key for x in basic.attestations] == [x.key for x in full]
    assert not any(x.HasField("data") for x in basic.attestations)
    assert [x.digest for x in basic.attestations] == [x.digest for x in full]
    assert [x.signature for x in basic.attestations] == [x.signature for x in full]


@pytest.fixture
async def small(db_url: str) -> AsyncIterator[Harness]:
    """A server whose largest message is 256 KiB: its page budget is 128 KiB."""
    async with Harness(db_url, max_message_bytes=256 * 1024) as h:
        yield h


async def test_a_full_workflow_listing_is_bounded_by_bytes_and_basic_leaves_steps_out(
    small: Harness,
) -> None:
    api = small.stubs()
    steps = 20  # each waits for the ten before it: ~30 KB of steps per workflow
    names = [f"{n:02d}-" + "s" * 120 for n in range(steps)]
    submitted = []
    for i in range(10):  # ~300 KB in all: more than the largest message
        request = j.SubmitWorkflowRequest(
            request_id=f"wf-{i}",
            name="wide",
            steps=[
                c.WorkflowStepSpec(
                    name=name,
                    job=c.JobSpec(service="svc"),
                    depends_on=names[max(0, n - 10) : n],
                    independent=n == 0,
                )
                for n, name in enumerate(names)
            ],
        )
        submitted.append((await api.jobs.SubmitWorkflow(request)).workflow)

    async def page(token: str) -> j.ListWorkflowsResponse:
        request = j.ListWorkflowsRequest(
            page_size=1000, page_token=token, view=j.WORKFLOW_VIEW_FULL
        )
        return await api.jobs.ListWorkflows(request)

    pages = await every_page(page, lambda p: p.next_page_token, bound=11)
    assert_fit(pages, "workflows")
    assert all(p.ByteSize() < 256 * 1024 for p in pages)
    full = [x for p in pages for x in p.workflows]
    assert [x.id for x in full] == [x.id for x in reversed(submitted)]
    assert all(x.steps == s.steps for x, s in zip(full, reversed(submitted), strict=True))

    basic = await api.jobs.ListWorkflows(j.ListWorkflowsRequest(page_size=1000))
    assert basic.next_page_token == ""
    assert [x.id for x in basic.workflows] == [x.id for x in full]
    assert all(len(x.steps) == 0 for x in basic.workflows)
    assert all(x.progress.total_steps == steps for x in basic.workflows)
    # GetWorkflow still returns the steps.
    got = await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=submitted[0].id))
    assert got.workflow.steps == submitted[0].steps


async def test_an_item_larger_than_the_page_budget_comes_alone_and_one_too_large_is_refused(
    small: Harness,
) -> None:
    api = small.stubs()
    first, middle, last = [
        (await api.jobs.SubmitJob(j.SubmitJobRequest(request_id=name, job=spec))).job
        for name, spec in (
            ("first", c.JobSpec(service="bulk", payload=struct(blob="a" * 150_000))),
            ("middle", c.JobSpec(service="small")),
            ("last", c.JobSpec(service="bulk", payload=struct(blob="c" * 150_000))),
        )
    ]

    async def page(token: str) -> j.ListJobsResponse:
        request = j.ListJobsRequest(page_size=1000, page_token=token, view=j.JOB_VIEW_FULL)
        return await api.jobs.ListJobs(request)

    pages = await every_page(page, lambda p: p.next_page_token, bound=4)
    # 150 KB is past the 128 KiB budget: each large job comes alone.
    assert [[x.id for x in p.jobs] for p in pages] == [[last.id], [middle.id], [first.id]]

    # With its result the first job is more than a response may carry at all.
    worker = RawWorker(api)
    try:
        await worker.hello("w1", ["bulk"])
        assert (await worker.expect("assignment")).job.id == first.id
        await worker.send(
            complete=w.CompleteReport(job_id=first.id, attempt=1, result=struct(out="r" * 150_000))
        )
        await worker.expect("ack")
    finally:
        await worker.close()
    second = await page(pages[0].next_page_token)
    assert [x.id for x in second.jobs] == [middle.id]
    _, info, _ = await expect_error(
        page(second.next_page_token), grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert info is not None and info.reason == "ITEM_TOO_LARGE"
    assert info.metadata["item"] == f"job {first.id}"
    basic = await api.jobs.ListJobs(j.ListJobsRequest(page_size=1000))
    assert [x.id for x in basic.jobs] == [last.id, middle.id, first.id]


async def test_an_unknown_view_is_invalid_argument(api: Stubs) -> None:
    run_id = (
        await api.jobs.SubmitJob(j.SubmitJobRequest(request_id="v", job=c.JobSpec(service="svc")))
    ).job.id
    calls = [
        api.jobs.ListJobs(j.ListJobsRequest(view=7)),
        api.jobs.ListWorkflows(j.ListWorkflowsRequest(view=7)),
        api.trace.ListTraceEvents(t.ListTraceEventsRequest(run_id=run_id, view=7)),
        api.attest.ListAttestations(a.ListAttestationsRequest(view=7)),
        api.attest.ListAnnotations(a.ListAnnotationsRequest(run_id=run_id, view=7)),
    ]
    for call in calls:
        _, _, violations = await expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert [field for field, _ in violations] == ["view"]


# The server's own periodic passes (supervision, dispatch, sweeps, probes): they
# run on their timers whatever the test calls, and on a busy machine one may land
# between a test's calls.
PERIODIC_TASKS = frozenset(
    {
        "jobtrace-supervise",
        "jobtrace-dispatch",
        "jobtrace-retention",
        "jobtrace-storage-probe",
        "jobtrace-fleet",
        "trace-sweep",
    }
)


@pytest.fixture
def statements() -> Any:
    """The SQL every engine of this process runs while the test does, but for
    the server's periodic passes (the calls' own statements and their writes)."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # not on the event loop's thread
            task = None
        if task is None or task.get_name() not in PERIODIC_TASKS:
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    yield seen
    event.remove(Engine, "before_cursor_execute", record)


async def test_a_basic_listing_never_reads_the_heavy_columns(
    api: Stubs, statements: list[str]
) -> None:
    await submit_large_jobs(api, count=2)
    run_id, _ = await append_large_events(api)
    statements.clear()
    await api.jobs.ListJobs(j.ListJobsRequest(page_size=1000))
    await api.trace.ListTraceEvents(t.ListTraceEventsRequest(run_id=run_id, page_size=1000))
    await api.attest.ListAnnotations(a.ListAnnotationsRequest(run_id=run_id, page_size=1000))
    await api.attest.ListAttestations(a.ListAttestationsRequest(page_size=1000))
    reads = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert any("FROM jobs" in s for s in reads) and any("FROM trace_events" in s for s in reads)
    heavy = (
        "jobs.payload",
        "jobs.result",
        "jobs.request_context",
        "trace_events.data",
        "trace_events.output_summary",
        "annotations.payload",
        "attestations.data",
    )
    for s in reads:
        assert not any(column in s for column in heavy), s


async def peak_memory(call: Callable[[], Awaitable[Any]]) -> int:
    """The most memory Python held (client and server: one process) during a
    call; the least of three runs, as a benchmark takes it."""
    peaks = []
    for _ in range(3):
        tracemalloc.start()
        try:
            await call()
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    return min(peaks)


async def test_the_memory_of_a_listing_does_not_grow_with_what_is_stored(
    harness: Harness,
) -> None:
    # A client that takes what the server may send, so that a page holding
    # every job (before pages were bounded in bytes) would arrive too.
    channel = grpc.aio.insecure_channel(
        harness.target, options=[("grpc.max_receive_message_length", 2 * SERVER_MAX)]
    )
    try:
        api = stubs_for(channel)
        full = j.ListJobsRequest(page_size=1000, view=j.JOB_VIEW_FULL)
        await submit_large_jobs(api, count=4)  # 3.6 MB: more than one page holds
        few = await peak_memory(lambda: api.jobs.ListJobs(full))
        await submit_large_jobs(api, count=4, service="more")  # twice as much stored
        many = await peak_memory(lambda: api.jobs.ListJobs(full))
        assert many < 1.25 * few, (few, many)
        basic = await peak_memory(lambda: api.jobs.ListJobs(j.ListJobsRequest(page_size=1000)))
        assert basic < BIG, "a BASIC listing never holds even one payload"
    finally:
        await channel.close()


async def test_the_memory_of_a_trace_replay_does_not_grow_with_the_trace(api: Stubs) -> None:
    run_id, _ = await append_large_events(api)

    async def replay() -> None:
        request = t.StreamTraceEventsRequest(run_id=run_id, follow=False)
        assert len([m async for m in api.trace.StreamTraceEvents(request)]) > 0

    few = await peak_memory(replay)
    await append_large_events(api, run_id, keys="more")  # twice as long a trace
    many = await peak_memory(replay)
    assert many < 1.25 * few, (few, many)
