"""Results you can wait for, data between workflow steps, workflow outputs,
exact numbers and step progress: through the real server on both backends."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from jobtrace.client import Client, DeadlineExceeded, RunFailed, SyncClient
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, expect_error
from .workers import RawWorker

# What the Python client and worker runtime send: answers carry exact JSON
# (the *_json fields) instead of Structs.
EXACT = (("jobtrace-json", "exact"),)


def struct(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


async def submit(
    api: Stubs, rid: str, service: str = "svc", metadata: Any = None, **fields: Any
) -> c.Job:
    request = j.SubmitJobRequest(request_id=rid, job=c.JobSpec(service=service, **fields))
    return (await api.jobs.SubmitJob(request, metadata=metadata)).job


def step(name: str, service: str, *depends_on: str, **fields: Any) -> c.WorkflowStepSpec:
    return c.WorkflowStepSpec(
        name=name, job=c.JobSpec(service=service, **fields), depends_on=list(depends_on)
    )


async def complete(raw: RawWorker, job_id: str, attempt: int = 1, **result: Any) -> None:
    await raw.send(complete=w.CompleteReport(job_id=job_id, attempt=attempt, **result))
    ack = await raw.expect("ack")
    assert ack.job_id == job_id


# --- AwaitJob / AwaitWorkflow ------------------------------------------------------


async def test_await_job_answers_when_the_worker_completes_it(api: Stubs) -> None:
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    job = await submit(api, "r1")
    waiting = asyncio.ensure_future(api.jobs.AwaitJob(j.AwaitJobRequest(job_id=job.id)))
    assignment = await raw.expect("assignment")
    await asyncio.sleep(0)  # let the call reach the server
    assert not waiting.done(), "it waits for the end"
    await complete(raw, assignment.job.id, result=struct({"size": 3}))
    answer = await asyncio.wait_for(waiting, 5)
    assert answer.job.state == c.RUN_STATE_COMPLETED
    assert json_format.MessageToDict(answer.job.result) == {"size": 3}
    # A job that has already ended is answered at once, even with a zero wait.
    again = await api.jobs.AwaitJob(j.AwaitJobRequest(job_id=job.id, timeout={"nanos": 1}))
    assert again.job.id == job.id and again.job.state == c.RUN_STATE_COMPLETED
    await raw.close()


async def test_await_job_past_its_timeout_is_deadline_exceeded_with_the_state(
    api: Stubs,
) -> None:
    job = await submit(api, "r1", service="nobody")
    _, info, _ = await expect_error(
        api.jobs.AwaitJob(j.AwaitJobRequest(job_id=job.id, timeout={"nanos": 200_000_000})),
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )
    assert info is not None and info.reason == "AWAIT_TIMEOUT"
    assert dict(info.metadata) == {"job_id": job.id, "state": "QUEUED"}
    # The call's own deadline bounds the wait the same way.
    _, info, _ = await expect_error(
        api.jobs.AwaitJob(j.AwaitJobRequest(job_id=job.id), timeout=0.5),
        grpc.StatusCode.DEADLINE_EXCEEDED,
    )
    assert info is not None and info.reason == "AWAIT_TIMEOUT"


async def test_await_bad_requests_are_refused(api: Stubs) -> None:
    job = await submit(api, "r1", service="nobody")
    _, _, violations = await expect_error(
        api.jobs.AwaitJob(j.AwaitJobRequest(job_id=job.id, timeout={"seconds": 7200})),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v[0] for v in violations] == ["timeout"]
    await expect_error(
        api.jobs.AwaitJob(j.AwaitJobRequest(job_id="job_missing")), grpc.StatusCode.NOT_FOUND
    )
    await expect_error(
        api.jobs.AwaitWorkflow(j.AwaitWorkflowRequest(workflow_id="wf_missing")),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_await_workflow_answers_a_failed_workflow_with_its_failure(api: Stubs) -> None:
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="wf", name="two", steps=[step("a", "svc"), step("b", "svc", "a")]
            )
        )
    ).workflow
    waiting = asyncio.ensure_future(
        api.jobs.AwaitWorkflow(j.AwaitWorkflowRequest(workflow_id=wf.id))
    )
    a = await raw.expect("assignment")
    await raw.send(
        fail=w.FailReport(job_id=a.job.id, attempt=1, error=c.ErrorDetail(message="boom"))
    )
    answer = (await asyncio.wait_for(waiting, 5)).workflow
    assert answer.state == c.RUN_STATE_FAILED and "boom" in answer.failure.reason
    await raw.close()


async def test_await_on_one_replica_sees_the_end_committed_on_another(pg_url: str) -> None:
    async with Harness(pg_url) as one:
        async with Harness(pg_url, signing_key_file=one.settings["signing_key_file"]) as two:
            on_one, on_two = one.stubs(), two.stubs()
            job = await submit(on_two, "r1", service="nobody")
            waiting = asyncio.ensure_future(
                on_one.jobs.AwaitJob(j.AwaitJobRequest(job_id=job.id, timeout={"seconds": 30}))
            )
            await asyncio.sleep(0.1)
            assert not waiting.done()
            await on_two.jobs.CancelJob(j.CancelJobRequest(job_id=job.id))
            answer = await asyncio.wait_for(waiting, 5)
            assert answer.job.state == c.RUN_STATE_CANCELLED


async def test_client_result_waits_and_raises_for_a_run_that_failed(
    sqlite_harness: Harness,
) -> None:
    api = sqlite_harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    async with Client(sqlite_harness.target) as jt:
        job = await jt.submit_job("svc", {"n": 1})
        waiting = asyncio.ensure_future(jt.result(job.id, timeout=30))
        a = await raw.expect("assignment")
        await complete(raw, a.job.id, result=struct({"bytes": 1048576}))
        assert await asyncio.wait_for(waiting, 5) == {"bytes": 1048576}
        with pytest.raises(DeadlineExceeded) as late:
            await jt.await_job((await jt.submit_job("nobody")).id, timeout=0.2)
        assert late.value.reason == "AWAIT_TIMEOUT"
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(DeadlineExceeded):
            await jt.await_job((await jt.submit_job("nobody")).id, timeout=0)
        assert asyncio.get_running_loop().time() - t0 < 2, "a zero timeout does not wait"
        failing = await jt.submit_job("svc", max_attempts=1)
        a = await raw.expect("assignment")
        await raw.send(
            fail=w.FailReport(job_id=a.job.id, attempt=1, error=c.ErrorDetail(message="nope"))
        )
        with pytest.raises(RunFailed) as failed:
            await jt.result(failing.id, timeout=30)
        assert failed.value.state == "FAILED" and failed.value.failure.reason == "nope"
    await raw.close()

    def blocking() -> Any:
        with SyncClient(sqlite_harness.target) as sync:
            assert sync.await_job(job.id).state == c.RUN_STATE_COMPLETED
            return sync.result(job.id, timeout=5)

    assert await asyncio.to_thread(blocking) == {"bytes": 1048576}


# --- upstream results in the assignment ----------------------------------------------


def fan_in(rid: str = "wf", **fields: Any) -> j.SubmitWorkflowRequest:
    return j.SubmitWorkflowRequest(
        request_id=rid,
        name="fan-in",
        steps=[
            c.WorkflowStepSpec(name="a", job=c.JobSpec(service="svc"), independent=True),
            c.WorkflowStepSpec(name="b", job=c.JobSpec(service="svc"), independent=True),
            step("c", "svc", "a", "b"),
        ],
        **fields,
    )


async def run_roots(raw: RawWorker, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Complete the two root steps with these results; their assignments."""
    seen = {}
    for _ in results:
        assignment = await raw.expect("assignment")
        assert not assignment.upstream_json and not assignment.upstream_refs, "a root has none"
        seen[assignment.job.step_name] = assignment
        await complete(raw, assignment.job.id, result=struct(results[assignment.job.step_name]))
    return seen


async def test_a_dependent_step_receives_its_upstream_results(api: Stubs) -> None:
    raw = RawWorker(api, metadata=EXACT)
    await raw.hello("w", ["svc"], max_concurrency=2)
    await api.jobs.SubmitWorkflow(fan_in())
    await run_roots(raw, {"a": {"bytes": 1048576, "path": "/tmp/x"}, "b": {"ok": True}})
    c_step = await raw.expect("assignment")
    assert c_step.job.step_name == "c"
    assert json.loads(c_step.upstream_json) == {
        "a": {"bytes": 1048576, "path": "/tmp/x"},
        "b": {"ok": True},
    }
    assert not c_step.HasField("upstream"), "one form only"
    assert not c_step.upstream_refs
    await raw.close()


async def test_large_upstream_results_travel_by_reference(api: Stubs) -> None:
    big = {"blob": "x" * 300_000}
    raw = RawWorker(api, metadata=EXACT)
    await raw.hello("w", ["svc"], max_concurrency=2)
    await api.jobs.SubmitWorkflow(fan_in())
    roots = await run_roots(raw, {"a": big, "b": {"small": 1}})
    c_step = await raw.expect("assignment")
    assert json.loads(c_step.upstream_json) == {"b": {"small": 1}}, "what fits stays inline"
    [ref] = c_step.upstream_refs
    assert ref.step_name == "a" and ref.job_id == roots["a"].job.id
    assert ref.size_bytes > 256 * 1024
    ask = w.GetStepResultRequest(job_id=c_step.job.id, attempt=1, worker_id="w", step_name="a")
    got = await api.workers.GetStepResult(ask, metadata=EXACT)
    assert json.loads(got.result_json) == big and not got.HasField("result")
    got = await api.workers.GetStepResult(ask)
    assert json_format.MessageToDict(got.result) == big and not got.result_json
    # Only the holder of the job's current attempt may read, and only its workflow's steps.
    for bad, code in [
        (dict(worker_id="other"), grpc.StatusCode.PERMISSION_DENIED),
        (dict(attempt=2), grpc.StatusCode.FAILED_PRECONDITION),
        (dict(step_name="nope"), grpc.StatusCode.NOT_FOUND),
        (dict(job_id="job_missing"), grpc.StatusCode.NOT_FOUND),
        (dict(step_name="bad name!"), grpc.StatusCode.INVALID_ARGUMENT),
    ]:
        request = w.GetStepResultRequest()
        request.CopyFrom(ask)
        for k, v in bad.items():
            setattr(request, k, v)
        await expect_error(api.workers.GetStepResult(request), code)
    await complete(raw, c_step.job.id)
    _, info, _ = await expect_error(
        api.workers.GetStepResult(ask), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert info is not None and info.reason == "JOB_TERMINAL"
    await raw.close()


async def test_a_step_not_completed_is_refused(api: Stubs) -> None:
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=2)
    await api.jobs.SubmitWorkflow(
        j.SubmitWorkflowRequest(
            request_id="wf",
            name="pair",
            steps=[
                c.WorkflowStepSpec(name="a", job=c.JobSpec(service="svc"), independent=True),
                c.WorkflowStepSpec(name="b", job=c.JobSpec(service="svc"), independent=True),
            ],
        )
    )
    first = await raw.expect("assignment")
    other = "b" if first.job.step_name == "a" else "a"
    await raw.expect("assignment")
    _, info, _ = await expect_error(
        api.workers.GetStepResult(
            w.GetStepResultRequest(job_id=first.job.id, attempt=1, worker_id="w", step_name=other)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert info is not None and info.reason == "STEP_NOT_COMPLETED"
    await raw.close()


async def test_the_worker_runtime_exposes_upstream_results_on_ctx(harness: Harness) -> None:
    from .workers import runtime_worker

    api = harness.stubs()
    seen: dict[str, Any] = {}

    async def run(ctx: Any) -> dict[str, Any]:
        if ctx.job.step_name == "a":
            return {"blob": "y" * 300_000}
        if ctx.job.step_name == "b":
            return {"count": 7}
        seen.update(ctx.upstream)
        return {"sum": len(ctx.upstream["a"]["blob"]) + ctx.upstream["b"]["count"]}

    async with runtime_worker(harness.target, {"svc": run}, max_concurrency=2):
        wf = (await api.jobs.SubmitWorkflow(fan_in())).workflow
        done = await api.jobs.AwaitWorkflow(
            j.AwaitWorkflowRequest(workflow_id=wf.id, timeout={"seconds": 30})
        )
    assert done.workflow.state == c.RUN_STATE_COMPLETED
    assert seen["a"] == {"blob": "y" * 300_000}, "fetched by reference, transparently"
    assert seen["b"] == {"count": 7} and type(seen["b"]["count"]) is int


# --- workflow outputs ----------------------------------------------------------------


async def test_a_completed_workflow_has_the_results_of_its_last_steps_as_outputs(
    harness: Harness,
) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=2)
    request = j.SubmitWorkflowRequest(
        request_id="wf",
        name="chain",
        steps=[step("a", "svc"), step("b", "svc", "a"), step("c", "svc", "a")],
    )
    wf = (await api.jobs.SubmitWorkflow(request)).workflow
    assert not wf.outputs_json and not wf.HasField("outputs"), "none before it completes"
    waiting = asyncio.ensure_future(
        api.jobs.AwaitWorkflow(j.AwaitWorkflowRequest(workflow_id=wf.id), metadata=EXACT)
    )
    results = {"a": {"n": 1}, "b": {"n": 2}, "c": {"big": "z" * 300_000}}
    for _ in range(3):
        assignment = await raw.expect("assignment")
        await complete(
            raw,
            assignment.job.id,
            result_json=json.dumps(results[assignment.job.step_name]).encode(),
        )
    done = (await asyncio.wait_for(waiting, 5)).workflow
    assert done.state == c.RUN_STATE_COMPLETED
    # b and c end the workflow (nothing depends on them); c is too large to travel inline.
    assert json.loads(done.outputs_json) == {"b": {"n": 2}}
    assert not done.HasField("outputs"), "one form only"
    assert [(r.step_name, r.size_bytes > 256 * 1024) for r in done.output_refs] == [("c", True)]
    got = (
        await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf.id), metadata=EXACT)
    ).workflow
    assert got == done
    as_struct = (await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf.id))).workflow
    assert json_format.MessageToDict(as_struct.outputs) == {"b": {"n": 2}}
    assert not as_struct.outputs_json
    basic = (await api.jobs.ListWorkflows(j.ListWorkflowsRequest(), metadata=EXACT)).workflows[0]
    assert not basic.outputs_json and not basic.output_refs, "a BASIC listing leaves them out"
    full = (
        await api.jobs.ListWorkflows(
            j.ListWorkflowsRequest(view=j.WORKFLOW_VIEW_FULL), metadata=EXACT
        )
    ).workflows[0]
    assert full.outputs_json == done.outputs_json
    await raw.close()
    async with Client(harness.target) as jt:
        outputs = await jt.outputs(wf.id, timeout=5)
    assert outputs == {"b": {"n": 2}, "c": results["c"]}, "references are read by the client"
    assert type(outputs["b"]["n"]) is int


async def test_named_outputs_and_bad_names(api: Stubs) -> None:
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    steps = [step("a", "svc"), step("b", "svc", "a")]
    _, _, violations = await expect_error(
        api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="bad", name="x", steps=steps, outputs=["a", "zz", "a"]
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v[0] for v in violations] == ["outputs[1]", "outputs[2]"]
    assert not (await api.jobs.ListWorkflows(j.ListWorkflowsRequest())).workflows
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(request_id="ok", name="x", steps=steps, outputs=["a"])
        )
    ).workflow
    for name in ("a", "b"):
        assignment = await raw.expect("assignment")
        assert assignment.job.step_name == name
        await complete(raw, assignment.job.id, result=struct({"step": name}))
    done = await api.jobs.AwaitWorkflow(
        j.AwaitWorkflowRequest(workflow_id=wf.id, timeout={"seconds": 5}), metadata=EXACT
    )
    assert json.loads(done.workflow.outputs_json) == {"a": {"step": "a"}}
    await raw.close()


# --- numbers keep their type -------------------------------------------------------------


async def test_numbers_keep_their_type_in_payloads_results_and_attestations(
    harness: Harness,
) -> None:
    api = harness.stubs()
    raw = RawWorker(api, metadata=EXACT)
    await raw.hello("w", ["svc"])
    exact = b'{"bytes":1048576,"ratio":2.5,"float":2.0,"nested":[1,{"k":-3}]}'
    job = await submit(api, "exact", payload_json=exact, metadata=EXACT)
    assert json.loads(job.spec.payload_json) == json.loads(exact)
    assert type(json.loads(job.spec.payload_json)["float"]) is float, "2.0 stays a float"
    assignment = await raw.expect("assignment")
    assert assignment.job.spec.payload_json == job.spec.payload_json
    assert not assignment.job.spec.HasField("payload"), "one form only"
    # A caller that does not ask for exact JSON gets the Struct alone, as before.
    as_struct = (await api.jobs.GetJob(j.GetJobRequest(job_id=job.id))).job
    assert json_format.MessageToDict(as_struct.spec.payload)["bytes"] == 1048576
    assert not as_struct.spec.payload_json
    await complete(raw, job.id, result_json=b'{"bytes":1048576,"parts":[1,2]}')
    done = (await api.jobs.GetJob(j.GetJobRequest(job_id=job.id), metadata=EXACT)).job
    result = json.loads(done.result_json)
    assert result == {"bytes": 1048576, "parts": [1, 2]} and type(result["bytes"]) is int
    # A Struct cannot tell 1048576 from 1048576.0: integral numbers read as integers.
    via_struct = await submit(
        api, "struct", payload=struct({"n": 1048576, "half": 0.5}), metadata=EXACT
    )
    assert via_struct.spec.payload_json == b'{"half":0.5,"n":1048576}'
    # Attestations encode them canonically (RFC 8785): 1048576, never 1048576.0.
    async with Client(harness.target) as jt:
        envelope = await jt.export_attestation(f"worker-completion:{job.id}")
        assert await jt.result(job.id) == {"bytes": 1048576, "parts": [1, 2]}
        plain = await jt.submit_job("nobody", {"size": 1048576})
        assert type(json.loads(plain.spec.payload_json)["size"]) is int
    import base64

    statement = base64.b64decode(envelope["payload"]).decode()
    assert '"bytes":1048576,' in statement and "1048576.0" not in statement
    await raw.close()


async def test_exact_json_that_is_not_one_object_is_refused(api: Stubs) -> None:
    cases = {
        b"[1,2]": "must be one JSON object",
        b"{": "not valid UTF-8 JSON",
        b'{"x": NaN}': "not valid UTF-8 JSON",
        b"\xff": "not valid UTF-8 JSON",
    }
    for body, why in cases.items():
        _, _, violations = await expect_error(
            api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="x", job=c.JobSpec(service="svc", payload_json=body))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert violations[0][0] == "job.payload_json" and why in violations[0][1], violations
    _, _, violations = await expect_error(
        api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="y",
                name="w",
                steps=[step("a", "svc", payload=struct({"a": 1}), payload_json=b'{"a":1}')],
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert [v[0] for v in violations] == ["steps[0].job.payload_json"]
    assert not (await api.jobs.ListJobs(j.ListJobsRequest())).jobs, "nothing stored"
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    job = await submit(api, "z")
    await raw.expect("assignment")
    await raw.send(
        complete=w.CompleteReport(
            job_id=job.id, attempt=1, result=struct({"a": 1}), result_json=b'{"a":1}'
        )
    )
    error = await raw.expect("error")
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert (await api.jobs.GetJob(j.GetJobRequest(job_id=job.id))).job.state == (
        c.RUN_STATE_RUNNING
    )
    await raw.close()


def test_canonical_encoding_writes_integral_doubles_as_integers() -> None:
    from jobtrace.domain import jcs

    assert (
        jcs.dumps({"a": 1048576.0, "b": 1048576, "c": 0.5}) == b'{"a":1048576,"b":1048576,"c":0.5}'
    )


# --- step progress in WatchWorkflow ------------------------------------------------------


async def test_watch_workflow_sends_step_progress_throttled_with_the_last_value(
    api: Stubs,
) -> None:
    raw = RawWorker(api)
    await raw.hello("w", ["svc"])
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(request_id="wf", name="one", steps=[step("a", "svc")])
        )
    ).workflow
    assignment = await raw.expect("assignment")
    watch = api.jobs.WatchWorkflow(j.WatchWorkflowRequest(workflow_id=wf.id))
    await watch.read()  # the snapshot
    loop = asyncio.get_running_loop()
    started = loop.time()
    for percent in range(1, 21):  # a chatty worker: 20 reports in a burst
        await raw.send(
            progress=w.ProgressReport(
                job_id=assignment.job.id, attempt=1, percent=percent, message=f"at {percent}"
            )
        )
        await raw.expect("ack")
    seen: list[tuple[float, float]] = []
    while not seen or seen[-1][1] < 20:
        message = await asyncio.wait_for(watch.read(), 5)
        progress = message.workflow.steps[0].progress
        seen.append((loop.time(), progress.percent))
    elapsed = seen[-1][0] - started
    # Throttled: far fewer messages than reports, at most one per 250 ms (plus the
    # first), and the last value (20, with its message) always arrives.
    assert len(seen) <= 2 + elapsed / 0.25, (len(seen), elapsed)
    assert len(seen) < 20
    assert message.workflow.steps[0].progress.message == "at 20"
    # A state change is not held back.
    await complete(raw, assignment.job.id)
    t0 = loop.time()
    while True:
        message = await asyncio.wait_for(watch.read(), 5)
        if message.workflow.state == c.RUN_STATE_COMPLETED:
            break
    assert loop.time() - t0 < 1.0
    assert message.workflow.steps[0].progress.percent == 100
    await raw.close()


# --- the newcomer's scenario -------------------------------------------------------------


async def test_download_transcode_notify_passes_data_and_awaits_outputs(
    harness: Harness,
) -> None:
    """download -> transcode (fails once, retried) -> notify: transcode reads
    ctx.upstream["download"], notify reads both; the client awaits the
    workflow and gets its outputs with integers as ints."""
    from .workers import runtime_worker

    attempts: dict[str, int] = {}
    seen: dict[str, Any] = {}

    async def download(ctx: Any) -> dict[str, Any]:
        return {"path": f"/tmp/{ctx.payload['url'].rsplit('/', 1)[1]}", "bytes": 1048576}

    async def transcode(ctx: Any) -> dict[str, Any]:
        attempts["transcode"] = attempts.get("transcode", 0) + 1
        source = ctx.upstream["download"]
        seen["transcode"] = source
        await ctx.progress(50, "half way")
        if attempts["transcode"] == 1:
            raise RuntimeError("encoder crashed")  # retryable: tried again
        return {"path": source["path"] + ".mp4", "bytes": source["bytes"] // 2, "ratio": 0.5}

    async def notify(ctx: Any) -> dict[str, Any]:
        seen["notify"] = dict(ctx.upstream)
        return {"sent_to": ctx.payload["email"], "bytes": ctx.upstream["transcode"]["bytes"]}

    quick = {"initialInterval": "0.01s"}
    async with (
        runtime_worker(
            harness.target,
            {"download": download, "transcode": transcode, "notify": notify},
            max_concurrency=4,
        ),
        Client(harness.target) as jt,
    ):
        wf = await jt.submit_workflow(
            "media",
            [
                {
                    "name": "download",
                    "job": {"service": "download", "payload": {"url": "https://x/cat.mov"}},
                },
                {"name": "transcode", "job": {"service": "transcode", "backoff": quick}},
                {
                    "name": "notify",
                    "job": {"service": "notify", "payload": {"email": "a@example.com"}},
                    "depends_on": ["download", "transcode"],
                },
            ],
        )
        outputs = await jt.outputs(wf.id, timeout=30)
        done = await jt.await_workflow(wf.id, timeout=5)
    assert attempts["transcode"] == 2, "the first attempt failed and was retried"
    assert seen["transcode"] == {"path": "/tmp/cat.mov", "bytes": 1048576}
    assert type(seen["transcode"]["bytes"]) is int
    assert seen["notify"] == {
        "download": {"path": "/tmp/cat.mov", "bytes": 1048576},
        "transcode": {"path": "/tmp/cat.mov.mp4", "bytes": 524288, "ratio": 0.5},
    }
    assert outputs == {"notify": {"sent_to": "a@example.com", "bytes": 524288}}
    assert type(outputs["notify"]["bytes"]) is int
    assert done.state == c.RUN_STATE_COMPLETED
    assert [(s.name, s.attempt) for s in done.steps] == [
        ("download", 1),
        ("transcode", 2),
        ("notify", 1),
    ]


async def test_upstream_costs_one_query_for_a_dependent_step_and_none_otherwise(
    api: Stubs,
) -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    raw = RawWorker(api, metadata=EXACT)
    await raw.hello("w", ["svc"])
    event.listen(Engine, "before_cursor_execute", record)
    try:
        alone = await submit(api, "alone")
        assert (await raw.expect("assignment")).job.id == alone.id
        standalone = [s for s in seen if "step_name IN" in s]
        await complete(raw, alone.id)
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="wf", name="two", steps=[step("a", "svc"), step("b", "svc", "a")]
            )
        )
        a = await raw.expect("assignment")
        seen.clear()
        await complete(raw, a.job.id, result=struct({"n": 1}))
        b = await raw.expect("assignment")
        dependent = [s for s in seen if "step_name IN" in s]
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    assert json.loads(b.upstream_json) == {"a": {"n": 1}}
    assert standalone == [] and len(dependent) == 1, (standalone, dependent)
    await raw.close()
