"""JobService over a real server: submission, idempotency, queries, cancel, restart."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import struct_pb2

from jobtrace.domain.validation import MAX_STEPS
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, expect_error
from .workers import RawWorker

Q = c.RUN_STATE_QUEUED


def job_request(
    request_id: str = "req-1", service: str = "resize", **payload: object
) -> j.SubmitJobRequest:
    body = struct_pb2.Struct()
    body.update(payload or {"image": "cat.png", "width": 640})
    return j.SubmitJobRequest(
        request_id=request_id,
        job=c.JobSpec(service=service, payload=body, priority=5, labels={"team": "media"}),
        request_context=c.RequestContext(
            user_context=c.UserContext(user_id="u-42"),
            metadata=c.RequestMetadata(request_id="http-9", source="frontend"),
        ),
    )


def step(name: str, *depends_on: str, independent: bool = False) -> c.WorkflowStepSpec:
    return c.WorkflowStepSpec(
        name=name, job=c.JobSpec(service="svc"), depends_on=depends_on, independent=independent
    )


async def count_jobs(api: Stubs) -> int:
    return len((await api.jobs.ListJobs(j.ListJobsRequest(page_size=1000))).jobs)


async def test_submit_then_get_returns_the_stored_job(api: Stubs) -> None:
    submitted = (await api.jobs.SubmitJob(job_request())).job
    assert submitted.id.startswith("job_")
    assert submitted.state == Q
    assert submitted.spec.service == "resize"
    assert submitted.spec.payload["image"] == "cat.png"
    assert submitted.spec.priority == 5
    assert submitted.spec.max_attempts == 3
    assert dict(submitted.spec.labels) == {"team": "media"}
    assert submitted.request_id == "req-1"
    assert submitted.HasField("created_at")
    got = (await api.jobs.GetJob(j.GetJobRequest(job_id=submitted.id))).job
    assert got == submitted


async def test_the_submit_reply_is_byte_for_byte_the_stored_job(api: Stubs) -> None:
    """The reply is built without reading the job back: it must still encode
    exactly as the stored job does when read (maps, numbers, nulls, labels)."""
    request = job_request("bytes", zeta=1, alpha={"y": [2.5, None], "b": True}, mid="m")
    request.job.labels.update({"z-last": "1", "a-first": "2"})
    submitted = (await api.jobs.SubmitJob(request)).job
    got = (await api.jobs.GetJob(j.GetJobRequest(job_id=submitted.id))).job
    again = (await api.jobs.SubmitJob(request)).job  # deduplicated: read from storage
    assert submitted.SerializeToString() == got.SerializeToString() == again.SerializeToString()


async def test_same_request_id_and_body_returns_the_same_job(api: Stubs) -> None:
    first = await api.jobs.SubmitJob(job_request("same"))
    again = await api.jobs.SubmitJob(job_request("same"))
    assert again.job.id == first.job.id
    assert not first.deduplicated and again.deduplicated
    assert await count_jobs(api) == 1


async def test_same_request_id_with_other_body_is_already_exists(api: Stubs) -> None:
    first = (await api.jobs.SubmitJob(job_request("dup", width=1))).job
    _, info, _ = await expect_error(
        api.jobs.SubmitJob(job_request("dup", width=2)), grpc.StatusCode.ALREADY_EXISTS
    )
    assert info is not None
    assert info.reason == "IDEMPOTENCY_CONFLICT"
    assert info.metadata["existing_id"] == first.id
    # A workflow cannot reuse a job's request id either.
    wf = j.SubmitWorkflowRequest(request_id="dup", name="w", steps=[step("a")])
    await expect_error(api.jobs.SubmitWorkflow(wf), grpc.StatusCode.ALREADY_EXISTS)
    assert await count_jobs(api) == 1


async def test_concurrent_identical_submissions_create_one_job(api: Stubs) -> None:
    responses = await asyncio.gather(*(api.jobs.SubmitJob(job_request("race")) for _ in range(20)))
    assert len({r.job.id for r in responses}) == 1
    assert sum(not r.deduplicated for r in responses) == 1


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.job.ClearField("service"), "job.service"),
        (lambda r: setattr(r, "request_id", ""), "request_id"),
        (lambda r: r.job.payload.update({"blob": "x" * (1024 * 1024)}), "job.payload"),
        (lambda r: setattr(r.job, "priority", 5000), "job.priority"),
        (lambda r: setattr(r.job, "max_attempts", 1000), "job.max_attempts"),
        (lambda r: r.job.timeout.FromSeconds(-5), "job.timeout"),
        (lambda r: r.job.labels.update({"Bad Key": "x"}), "job.labels['Bad Key']"),
        (lambda r: r.job.backoff.__setattr__("multiplier", 50.0), "job.backoff.multiplier"),
    ],
)
async def test_bad_job_is_invalid_argument_with_field_violation(
    api: Stubs, mutate: object, field: str
) -> None:
    request = job_request("bad")
    mutate(request)  # type: ignore[operator]
    _, _, violations = await expect_error(
        api.jobs.SubmitJob(request), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert field in [f for f, _ in violations], violations
    assert await count_jobs(api) == 0


async def test_all_violations_are_reported_at_once(api: Stubs) -> None:
    request = j.SubmitJobRequest(job=c.JobSpec(priority=9999))
    _, _, violations = await expect_error(
        api.jobs.SubmitJob(request), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert {"request_id", "job.service", "job.priority"} <= {f for f, _ in violations}


async def test_workflow_steps_become_jobs_and_roots_are_queued(api: Stubs) -> None:
    request = j.SubmitWorkflowRequest(
        request_id="wf-1",
        name="ingest",
        steps=[
            step("fetch"),
            step("thumbs"),  # depends on fetch by default
            step("index", "fetch"),
            step("notify", "thumbs", "index"),
            step("audit", independent=True),
        ],
        request_context=c.RequestContext(user_context=c.UserContext(user_id="u-1")),
    )
    wf = (await api.jobs.SubmitWorkflow(request)).workflow
    assert wf.id.startswith("wf_") and wf.state == Q
    steps = {s.name: s for s in wf.steps}
    assert list(steps) == ["fetch", "thumbs", "index", "notify", "audit"]
    assert list(steps["thumbs"].depends_on) == ["fetch"]
    assert list(steps["notify"].depends_on) == ["thumbs", "index"]
    assert steps["fetch"].state == Q and steps["audit"].state == Q
    assert {steps[n].state for n in ("thumbs", "index", "notify")} == {c.RUN_STATE_PENDING}
    assert wf.progress.total_steps == 5 and wf.progress.completed_steps == 0
    got = (await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf.id))).workflow
    assert got == wf
    step_job = (await api.jobs.GetJob(j.GetJobRequest(job_id=steps["index"].job_id))).job
    assert step_job.workflow_id == wf.id and step_job.step_name == "index"
    listed = await api.jobs.ListJobs(j.ListJobsRequest(workflow_id=wf.id))
    assert {x.id for x in listed.jobs} == {s.job_id for s in wf.steps}
    again = await api.jobs.SubmitWorkflow(request)
    assert again.deduplicated and again.workflow.id == wf.id


@pytest.mark.parametrize(
    ("steps", "field"),
    [
        ([step("a"), step("b", "nope")], "steps[1].depends_on[0]"),
        ([step("a", "b"), step("b", "a")], "steps"),
        ([step("a", "a")], "steps[0].depends_on[0]"),
        ([step("a"), step("a")], "steps[1].name"),
        ([], "steps"),
        ([c.WorkflowStepSpec(name="a")], "steps[0].job"),
        ([step("a"), step("b", "a", independent=True)], "steps[1].depends_on"),
    ],
)
async def test_bad_workflow_is_invalid_argument(
    api: Stubs, steps: list[c.WorkflowStepSpec], field: str
) -> None:
    request = j.SubmitWorkflowRequest(request_id="bad-wf", name="w", steps=steps)
    _, _, violations = await expect_error(
        api.jobs.SubmitWorkflow(request), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert field in [f for f, _ in violations], violations
    assert (await api.jobs.ListWorkflows(j.ListWorkflowsRequest())).workflows == []
    assert await count_jobs(api) == 0


async def test_cycle_violation_names_the_steps(api: Stubs) -> None:
    request = j.SubmitWorkflowRequest(
        request_id="cyc",
        name="w",
        steps=[step("a"), step("b", "a", "d"), step("c", "b"), step("d", "c")],
    )
    _, _, violations = await expect_error(
        api.jobs.SubmitWorkflow(request), grpc.StatusCode.INVALID_ARGUMENT
    )
    (description,) = [d for f, d in violations if f == "steps"]
    assert "b, c, d" in description and "a" not in description.split(": ")[1]


async def test_unknown_ids_are_not_found(api: Stubs) -> None:
    _, info, _ = await expect_error(
        api.jobs.GetJob(j.GetJobRequest(job_id="job_missing")), grpc.StatusCode.NOT_FOUND
    )
    assert info is not None and info.reason == "JOB_NOT_FOUND"
    await expect_error(
        api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id="wf_missing")),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_error(
        api.jobs.CancelJob(j.CancelJobRequest(job_id="job_missing")), grpc.StatusCode.NOT_FOUND
    )
    await expect_error(api.jobs.GetJob(j.GetJobRequest()), grpc.StatusCode.INVALID_ARGUMENT)


async def test_list_filters_by_state_service_and_workflow(api: Stubs) -> None:
    a = (await api.jobs.SubmitJob(job_request("a", service="alpha"))).job
    b = (await api.jobs.SubmitJob(job_request("b", service="beta"))).job
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=b.id))
    by_service = await api.jobs.ListJobs(j.ListJobsRequest(service="alpha"))
    assert [x.id for x in by_service.jobs] == [a.id]
    cancelled = await api.jobs.ListJobs(j.ListJobsRequest(state=c.RUN_STATE_CANCELLED))
    assert [x.id for x in cancelled.jobs] == [b.id]
    queued = await api.jobs.ListJobs(j.ListJobsRequest(state=Q))
    assert [x.id for x in queued.jobs] == [a.id]
    none = await api.jobs.ListJobs(j.ListJobsRequest(workflow_id="wf_other"))
    assert list(none.jobs) == [] and none.next_page_token == ""


async def test_pages_cover_every_job_once_and_stay_stable_under_inserts(api: Stubs) -> None:
    ids = [(await api.jobs.SubmitJob(job_request(f"p{i}"))).job.id for i in range(25)]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await api.jobs.ListJobs(j.ListJobsRequest(page_size=10, page_token=token))
        seen += [x.id for x in page.jobs]
        pages += 1
        # Inserts between pages land before the first page, never inside later ones.
        await api.jobs.SubmitJob(job_request(f"late{pages}"))
        token = page.next_page_token
        if not token:
            break
        assert page.jobs, "a page with a next token is never empty"
    assert pages == 3
    assert seen == list(reversed(ids)), "newest first, each exactly once"


async def test_exact_multiple_last_page_has_no_token(api: Stubs) -> None:
    for i in range(4):
        await api.jobs.SubmitJob(job_request(f"e{i}"))
    first = await api.jobs.ListJobs(j.ListJobsRequest(page_size=2))
    second = await api.jobs.ListJobs(
        j.ListJobsRequest(page_size=2, page_token=first.next_page_token)
    )
    assert len(second.jobs) == 2 and second.next_page_token == ""


async def test_bad_page_size_and_tokens_are_invalid(api: Stubs) -> None:
    for size in (-1, 1001):
        _, _, v = await expect_error(
            api.jobs.ListJobs(j.ListJobsRequest(page_size=size)), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert [f for f, _ in v] == ["page_size"]
    for token in ("garbage", "eyJwIjogMX0", "A" * 40):
        _, _, v = await expect_error(
            api.jobs.ListJobs(j.ListJobsRequest(page_token=token)), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert [f for f, _ in v] == ["page_token"]
    for i in range(3):
        await api.jobs.SubmitJob(job_request(f"t{i}"))
    page = await api.jobs.ListJobs(j.ListJobsRequest(page_size=1))
    # A token is bound to its query's filters.
    _, _, v = await expect_error(
        api.jobs.ListJobs(
            j.ListJobsRequest(page_size=1, page_token=page.next_page_token, service="x")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [f for f, _ in v] == ["page_token"]
    await expect_error(
        api.jobs.ListWorkflows(j.ListWorkflowsRequest(page_token=page.next_page_token)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


async def test_list_workflows_pages_and_filters(api: Stubs) -> None:
    for i in range(5):
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id=f"w{i}",
                name="even" if i % 2 == 0 else "odd",
                steps=[step("a"), step("b")],
            )
        )
    full = j.WORKFLOW_VIEW_FULL
    even = await api.jobs.ListWorkflows(j.ListWorkflowsRequest(name="even", page_size=2, view=full))
    assert len(even.workflows) == 2 and even.next_page_token
    rest = await api.jobs.ListWorkflows(
        j.ListWorkflowsRequest(name="even", page_size=2, page_token=even.next_page_token, view=full)
    )
    assert len(rest.workflows) == 1 and rest.next_page_token == ""
    assert all(len(w.steps) == 2 for w in even.workflows)


async def test_cancel_queued_job_then_cancel_again_is_failed_precondition(api: Stubs) -> None:
    job = (await api.jobs.SubmitJob(job_request("c1"))).job
    cancelled = (
        await api.jobs.CancelJob(j.CancelJobRequest(job_id=job.id, reason="not needed"))
    ).job
    assert cancelled.state == c.RUN_STATE_CANCELLED
    assert cancelled.failure.reason == "not needed" and cancelled.failure.code == "CANCELLED"
    assert cancelled.HasField("completed_at")
    _, info, _ = await expect_error(
        api.jobs.CancelJob(j.CancelJobRequest(job_id=job.id)), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert info is not None and info.reason == "JOB_TERMINAL"
    stored = (await api.jobs.GetJob(j.GetJobRequest(job_id=job.id))).job
    assert stored == cancelled


async def test_cancel_workflow_cancels_every_step(api: Stubs) -> None:
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(request_id="cw", name="w", steps=[step("a"), step("b")])
        )
    ).workflow
    done = (await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=wf.id))).workflow
    assert done.state == c.RUN_STATE_CANCELLED
    assert {s.state for s in done.steps} == {c.RUN_STATE_CANCELLED}
    await expect_error(
        api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=wf.id)),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


async def test_cancelling_a_step_cancels_its_workflow(api: Stubs) -> None:
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(request_id="cs", name="w", steps=[step("a"), step("b")])
        )
    ).workflow
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=wf.steps[0].job_id))
    after = (await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf.id))).workflow
    assert after.state == c.RUN_STATE_CANCELLED
    assert {s.state for s in after.steps} == {c.RUN_STATE_CANCELLED}


async def test_a_workflow_of_the_most_steps_goes_through_every_transition(api: Stubs) -> None:
    """Workflows take at most MAX_STEPS steps, and each transition below changes
    every one of them in one transaction (on PostgreSQL, telling the other
    replicas in NOTIFYs of under 8000 bytes each): a submit queueing every
    root, a cancel, a completion releasing every dependant, a failure
    cancelling every other step. Each goes through."""
    wide = [step(f"s{i}", independent=True) for i in range(MAX_STEPS)]
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(request_id="wide", name="wide", steps=wide)
        )
    ).workflow
    assert len(wf.steps) == MAX_STEPS and {s.state for s in wf.steps} == {Q}
    done = (await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=wf.id))).workflow
    assert done.state == c.RUN_STATE_CANCELLED
    assert {s.state for s in done.steps} == {c.RUN_STATE_CANCELLED}

    fan = [step("root"), *(step(f"s{i}", "root") for i in range(MAX_STEPS - 1))]
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(request_id="fan", name="fan", steps=fan)
        )
    ).workflow
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    root = await raw.expect("assignment")
    assert root.job.step_name == "root"
    mid = await raw.send(complete=w.CompleteReport(job_id=root.job.id, attempt=1))
    assert (await raw.expect("ack")).message_id == mid
    released = (await raw.expect("assignment")).job
    assert released.step_name != "root"
    queued = await api.jobs.ListJobs(j.ListJobsRequest(workflow_id=wf.id, state=Q, page_size=1000))
    assert len(queued.jobs) == MAX_STEPS - 2, "the others wait for the worker's only slot"
    mid = await raw.send(
        fail=w.FailReport(job_id=released.id, attempt=1, error=c.ErrorDetail(message="no"))
    )
    assert (await raw.expect("ack")).message_id == mid
    after = (await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf.id))).workflow
    assert after.state == c.RUN_STATE_FAILED
    states = [s.state for s in after.steps]
    assert states.count(c.RUN_STATE_CANCELLED) == MAX_STEPS - 2
    await raw.close()


async def test_data_survives_a_restart(harness: Harness) -> None:
    api = harness.stubs()
    job = (await api.jobs.SubmitJob(job_request("persist"))).job
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(request_id="persist-wf", name="w", steps=[step("a")])
        )
    ).workflow
    await harness.stop()
    await harness.start()
    api = harness.stubs()
    assert (await api.jobs.GetJob(j.GetJobRequest(job_id=job.id))).job == job
    assert (await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf.id))).workflow == wf
    again = await api.jobs.SubmitJob(job_request("persist"))
    assert again.deduplicated and again.job.id == job.id
    # Page tokens outlive the process too.
    await api.jobs.SubmitJob(job_request("persist-2"))
    page = await api.jobs.ListJobs(j.ListJobsRequest(page_size=1, service="resize"))
    await harness.stop()
    await harness.start()
    api = harness.stubs()
    rest = await api.jobs.ListJobs(
        j.ListJobsRequest(page_size=1, service="resize", page_token=page.next_page_token)
    )
    assert [x.id for x in rest.jobs] == [job.id]


async def test_traceparent_metadata_is_stored(api: Stubs) -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    job = (await api.jobs.SubmitJob(job_request("tp"), metadata=(("traceparent", tp),))).job
    assert job.traceparent == tp


async def test_message_size_limit_is_a_server_option(db_url: str) -> None:
    h = Harness(db_url, max_message_bytes=64 * 1024)
    await h.start()
    try:
        api = h.stubs()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.jobs.SubmitJob(job_request("big", blob="x" * 100_000))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await count_jobs(api) == 0
    finally:
        await h.stop()


async def test_watch_ends_unavailable_when_the_server_shuts_down(harness: Harness) -> None:
    """An empty OK would read as "no more changes" although the job goes on."""
    api = harness.stubs()
    job = (await api.jobs.SubmitJob(job_request("watched"))).job
    watch = api.jobs.WatchJob(j.WatchJobRequest(job_id=job.id))
    assert (await watch.read()).job.state == Q
    assert harness.server is not None
    stopping = asyncio.create_task(harness.server.stop(grace=2.0))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        message = await watch.read()
        assert message is not grpc.aio.EOF, "ended with an empty OK"
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    await stopping
    harness.server = None


@pytest.mark.parametrize(
    ("failure", "code", "reason"),
    [
        ("programming", grpc.StatusCode.INTERNAL, "INTERNAL"),
        ("connection", grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE"),
    ],
)
async def test_an_unexpected_failure_is_answered_without_leaking_its_text(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, failure: str, code: grpc.StatusCode,
    reason: str,
) -> None:  # fmt: skip
    from sqlalchemy import exc as sa_exc

    api = harness.stubs()
    assert harness.server is not None

    async def broken(*args: object, **kwargs: object) -> None:
        secret = "SELECT secret_column FROM jobs"
        if failure == "connection":
            raise sa_exc.OperationalError(secret, {}, ConnectionResetError("reset"))
        raise sa_exc.ProgrammingError(secret, {}, RuntimeError("syntax error"))

    monkeypatch.setattr(harness.server.jobs, "get_job", broken)
    err, info, _ = await expect_error(
        api.jobs.GetJob(
            j.GetJobRequest(job_id="job_00000000000000000000000000"),
            metadata=(("x-request-id", "req-42"),),
        ),
        code,
    )
    assert info is not None and info.reason == reason
    assert "secret_column" not in (err.details() or "")
    if code == grpc.StatusCode.INTERNAL:
        assert "req-42" in (err.details() or ""), "the request id leads to the server log"
