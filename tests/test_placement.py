"""Placement you can steer and read, through the real server on both backends:
required worker labels (string and numeric comparators), weighted preferences
and affinity, ties to the most free slots, jobs that wait for a matching
worker (GetJob says why) and are taken when one connects or changes its
labels on a heartbeat, no head-of-line blocking behind such jobs, and the
placement recorded in the STARTED trace event. Every placement is proved
with the worker id the server recorded, never with timing."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2

from jobtrace.client import Client, JobContext, label_requirement, parse_requirement
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, expect_error, wait_for
from .procs import jobtrace
from .workers import RawWorker, runtime_worker

EQ, NE = c.COMPARATOR_EQUAL, c.COMPARATOR_NOT_EQUAL
GT, GE, LT, LE = (
    c.COMPARATOR_GREATER,
    c.COMPARATOR_AT_LEAST,
    c.COMPARATOR_LESS,
    c.COMPARATOR_AT_MOST,
)


def req(
    key: str, value: Any, comparator: int = EQ, *, required: bool = True, weight: float = 0.0
) -> c.LabelRequirement:
    v = (
        struct_pb2.Value(string_value=value)
        if isinstance(value, str)
        else struct_pb2.Value(number_value=value)
    )
    return c.LabelRequirement(
        key=key, value=v, comparator=comparator, required=required, weight=weight
    )  # type: ignore[arg-type]


async def submit(api: Stubs, rid: str, service: str = "svc", **fields: Any) -> c.Job:
    spec = c.JobSpec(service=service, **fields)
    return (await api.jobs.SubmitJob(j.SubmitJobRequest(request_id=rid, job=spec))).job


async def get(api: Stubs, job_id: str) -> c.Job:
    return (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id))).job


async def running_on(api: Stubs, job_id: str) -> str:
    """The worker the server recorded for the job, once it is RUNNING."""

    async def started() -> c.Job | None:
        job = await get(api, job_id)
        return job if job.state == c.RUN_STATE_RUNNING else None

    job = await wait_for(started, timeout=10)
    return str(job.worker_id)


async def placement_of(api: Stubs, job_id: str) -> dict[str, Any]:
    page = await api.trace.ListTraceEvents(
        t.ListTraceEventsRequest(
            run_id=job_id,
            page_size=100,
            view=t.TRACE_EVENT_VIEW_FULL,
            type=c.TRACE_EVENT_TYPE_STARTED,
        )
    )
    assert len(page.events) == 1, page.events
    data = json_format.MessageToDict(page.events[0].data)
    placement: dict[str, Any] = data["placement"]
    return placement


async def workers(api: Stubs, *hellos: tuple[str, int, dict[str, str]]) -> list[RawWorker]:
    """Connected raw workers of "svc": (worker id, max concurrency, labels)."""
    out = []
    for worker_id, slots, labels in hellos:
        raw = RawWorker(api)
        await raw.hello(worker_id, ["svc"], max_concurrency=slots, labels=labels)
        out.append(raw)
    return out


async def close(*raws: RawWorker) -> None:
    for raw in raws:
        await raw.close()


async def test_required_labels_string_and_numeric_comparators(harness: Harness) -> None:
    api = harness.stubs()
    raws = await workers(
        api,
        ("a100", 8, {"gpu": "a100", "vram_gb": "80"}),
        ("t4", 8, {"gpu": "t4", "vram_gb": "16"}),
        ("cpu", 8, {"vram_gb": "lots"}),
    )
    cases = [
        ("eq", [req("gpu", "a100")], "a100"),
        ("ge", [req("vram_gb", 40, GE)], "a100"),
        ("ge-edge", [req("vram_gb", 80, GE)], "a100"),
        ("gt", [req("vram_gb", 16, GT)], "a100"),
        ("lt", [req("vram_gb", 40, LT)], "t4"),
        ("le", [req("vram_gb", 16, LE)], "t4"),
        # Missing on cpu, "a100" on the other: only t4 is "not a100 but a gpu".
        ("ne", [req("gpu", "a100", NE), req("gpu", "t4")], "t4"),
        # A label that is not a number fails a numeric requirement: "lots" >= 1 is no.
        ("nan-label", [req("vram_gb", 1, GE), req("gpu", "a100", NE)], "t4"),
        # != with no such label holds: only cpu lacks a gpu of either kind.
        ("ne-missing", [req("gpu", "a100", NE), req("gpu", "t4", NE)], "cpu"),
    ]
    for name, labels, expected in cases:
        job = await submit(api, name, worker_labels=labels)
        assert await running_on(api, job.id) == expected, name
        placement = await placement_of(api, job.id)
        assert placement["worker"] == expected
        assert placement["candidates"] == 1, (name, placement)
    await close(*raws)


async def test_weighted_preference_picks_the_higher_scoring_worker(harness: Harness) -> None:
    api = harness.stubs()
    # The roomier worker would win a tie: the preference must beat it.
    raws = await workers(
        api,
        ("roomy", 8, {"zone": "eu", "disk": "hdd"}),
        ("fast", 1, {"zone": "us", "disk": "ssd"}),
    )
    job = await submit(
        api,
        "pref",
        worker_labels=[
            req("zone", "eu", required=False, weight=2),
            req("disk", "ssd", required=False, weight=5),
        ],
    )
    assert await running_on(api, job.id) == "fast"
    placement = await placement_of(api, job.id)
    assert placement == {
        "worker": "fast",
        "score": 5,
        "matched_labels": ["disk=ssd"],
        "matched_keys": [],
        "candidates": 2,
    }
    await close(*raws)


async def test_weighted_affinity_picks_the_worker_with_the_valued_key(harness: Harness) -> None:
    api = harness.stubs()
    shared, own = RawWorker(api), RawWorker(api)
    # "shared" holds two keys each worth less than the one "own" holds, and
    # more free slots: weights decide, not counts or slots.
    await shared.hello("shared", ["svc"], max_concurrency=8, affinity_keys=["base", "extra"])
    await own.hello("own", ["svc"], max_concurrency=1, affinity_keys=["user-model"])
    job = await submit(
        api,
        "aff",
        affinity=[
            c.AffinityWeight(key="user-model", weight=10),
            c.AffinityWeight(key="base", weight=4),
            c.AffinityWeight(key="extra", weight=5),
        ],
    )
    assert await running_on(api, job.id) == "own"
    placement = await placement_of(api, job.id)
    assert placement["score"] == 10 and placement["matched_keys"] == ["user-model"]
    # Today's affinity_keys weigh 1 each: two keys beat one.
    plain = await submit(api, "plain", affinity_keys=["base", "extra", "user-model"])
    assert await running_on(api, plain.id) == "shared"
    assert (await placement_of(api, plain.id))["score"] == 2
    await close(shared, own)


async def test_ties_go_to_the_worker_with_most_free_slots(harness: Harness) -> None:
    api = harness.stubs()
    raws = await workers(
        api, ("small", 1, {"gpu": "a100"}), ("big", 4, {"gpu": "a100"}), ("other", 8, {})
    )
    job = await submit(api, "tie", worker_labels=[req("gpu", "a100")])
    assert await running_on(api, job.id) == "big"
    placement = await placement_of(api, job.id)
    assert placement["candidates"] == 2 and placement["matched_labels"] == ["gpu=a100"]
    await close(*raws)


async def test_job_waits_for_a_matching_worker_and_is_taken_when_one_connects(
    harness: Harness,
) -> None:
    api = harness.stubs()
    none = await submit(api, "early", worker_labels=[req("gpu", "a100")])
    assert (await get(api, none.id)).waiting_reason == c.WAITING_REASON_NO_WORKER_FOR_SERVICE
    (cpu,) = await workers(api, ("cpu", 4, {"gpu": "none"}))
    job = await get(api, none.id)
    assert job.state == c.RUN_STATE_QUEUED
    assert job.waiting_reason == c.WAITING_REASON_NO_WORKER_MEETS_LABELS
    # The cpu worker takes other work meanwhile: the job is no reason to wait.
    other = await submit(api, "other")
    assert await running_on(api, other.id) == "cpu"
    assert (await get(api, none.id)).state == c.RUN_STATE_QUEUED
    (gpu,) = await workers(api, ("gpu", 1, {"gpu": "a100"}))
    assert await running_on(api, none.id) == "gpu"
    assert (await get(api, none.id)).waiting_reason == c.WAITING_REASON_UNSPECIFIED
    # The gpu worker is full: a second such job waits for it, and says so.
    second = await submit(api, "second", worker_labels=[req("gpu", "a100")])
    await wait_for(lambda: _reason_is(api, second.id, c.WAITING_REASON_ALL_BUSY), timeout=10)
    await close(cpu, gpu)


async def _reason_is(api: Stubs, job_id: str, reason: int) -> bool:
    job = await get(api, job_id)
    return job.state == c.RUN_STATE_QUEUED and job.waiting_reason == reason


async def test_job_is_taken_when_a_worker_changes_its_labels_on_a_heartbeat(
    harness: Harness,
) -> None:
    api = harness.stubs()
    (raw,) = await workers(api, ("loader", 2, {"model": "none"}))
    job = await submit(api, "needs-model", worker_labels=[req("model", "llama")])
    assert (await get(api, job.id)).waiting_reason == c.WAITING_REASON_NO_WORKER_MEETS_LABELS
    # A heartbeat without labels changes nothing.
    await raw.send(heartbeat=w.WorkerHeartbeat())
    await raw.expect("heartbeat_ack")
    assert (await get(api, job.id)).state == c.RUN_STATE_QUEUED
    await raw.send(heartbeat=w.WorkerHeartbeat(labels=w.WorkerLabels(labels={"model": "llama"})))
    assignment = await raw.expect("assignment", timeout=10)
    assert assignment.job.id == job.id
    assert await running_on(api, job.id) == "loader"
    assert (await placement_of(api, job.id))["matched_labels"] == ["model=llama"]
    # Labels are replaced, not merged: the worker no longer has model=llama.
    await raw.send(heartbeat=w.WorkerHeartbeat(labels=w.WorkerLabels(labels={"gpu": "a100"})))
    await raw.expect("heartbeat_ack")
    again = await submit(api, "needs-model-again", worker_labels=[req("model", "llama")])
    assert (await get(api, again.id)).waiting_reason == c.WAITING_REASON_NO_WORKER_MEETS_LABELS
    await close(raw)


async def test_the_worker_runtime_changes_its_labels(harness: Harness) -> None:
    api = harness.stubs()
    seen: list[str] = []

    async def handler(ctx: JobContext) -> dict[str, Any]:
        seen.append(ctx.job.id)
        return {}

    async with Client(harness.target) as client:
        job = await client.submit_job("svc", {}, worker_labels=["vram_free_gb>=20"])
        async with runtime_worker(
            harness.target, {"svc": handler}, worker_id="rt", labels={"vram_free_gb": "4"}
        ) as worker:
            await wait_for(
                lambda: _reason_is(api, job.id, c.WAITING_REASON_NO_WORKER_MEETS_LABELS),
                timeout=10,
            )
            worker.set_labels({"vram_free_gb": "24"})
            await wait_for(lambda: seen == [job.id], timeout=10)
        assert (await get(api, job.id)).worker_id == "rt"


async def test_no_head_of_line_blocking_behind_jobs_no_worker_can_take(
    harness: Harness,
) -> None:
    api = harness.stubs()
    # Many jobs no connected worker can take, at a higher priority and older
    # than the one it can: the dispatch read must not stop at them.
    blocked = [
        (await submit(api, f"gpu{i}", priority=10, worker_labels=[req("gpu", "a100")])).id
        for i in range(6)
    ]
    blocked += [
        (await submit(api, f"big{i}", priority=9, worker_labels=[req("ram_gb", 512, GE)])).id
        for i in range(6)
    ]
    (cpu,) = await workers(api, ("cpu", 2, {"ram_gb": "64"}))
    plain = [(await submit(api, f"plain{i}")).id for i in range(2)]
    got = {(await cpu.expect("assignment", timeout=10)).job.id for _ in plain}
    assert got == set(plain)
    for job_id in blocked:
        job = await get(api, job_id)
        assert job.state == c.RUN_STATE_QUEUED
        assert job.waiting_reason == c.WAITING_REASON_NO_WORKER_MEETS_LABELS
    await close(cpu)


async def test_bad_placement_inputs_are_refused_precisely(harness: Harness) -> None:
    api = harness.stubs()
    bad: list[tuple[dict[str, Any], str]] = [
        ({"worker_labels": [req("", "x")]}, "job.worker_labels[0].key"),
        ({"worker_labels": [req("k" * 129, "x")]}, "job.worker_labels[0].key"),
        ({"worker_labels": [req("vram", "lots", GE)]}, "job.worker_labels[0].value"),
        ({"worker_labels": [req("vram", math.nan, GE)]}, "job.worker_labels[0].value"),
        ({"worker_labels": [req("vram", math.inf)]}, "job.worker_labels[0].value"),
        ({"worker_labels": [c.LabelRequirement(key="gpu")]}, "job.worker_labels[0].value"),
        (
            {
                "worker_labels": [
                    c.LabelRequirement(key="gpu", value=struct_pb2.Value(bool_value=True))
                ]
            },
            "job.worker_labels[0].value",
        ),
        ({"worker_labels": [req("gpu", "x" * 257)]}, "job.worker_labels[0].value"),
        (
            {"worker_labels": [req("gpu", "a", required=False, weight=math.nan)]},
            "job.worker_labels[0].weight",
        ),
        (
            {"worker_labels": [req("gpu", "a", required=False, weight=1001)]},
            "job.worker_labels[0].weight",
        ),
        (
            {
                "worker_labels": [
                    c.LabelRequirement(
                        key="g", value=struct_pb2.Value(string_value="a"), comparator=99
                    )
                ]
            },  # type: ignore[arg-type]
            "job.worker_labels[0].comparator",
        ),
        ({"worker_labels": [req(f"k{i}", "v") for i in range(17)]}, "job.worker_labels"),
        ({"affinity": [c.AffinityWeight(key="", weight=1)]}, "job.affinity[0].key"),
        (
            {"affinity": [c.AffinityWeight(key="m", weight=1), c.AffinityWeight(key="m")]},
            "job.affinity[1].key",
        ),
        ({"affinity": [c.AffinityWeight(key="m", weight=math.inf)]}, "job.affinity[0].weight"),
        ({"affinity": [c.AffinityWeight(key=f"m{i}") for i in range(33)]}, "job.affinity"),
    ]
    for i, (fields, field) in enumerate(bad):
        _, _, violations = await expect_error(
            submit(api, f"bad{i}", **fields), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert [f for f, _ in violations] == [field], (fields, violations)
    listed = await api.jobs.ListJobs(j.ListJobsRequest())
    assert not listed.jobs, "nothing stored"
    # A heartbeat with bad labels is refused, and changes nothing.
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], labels={"gpu": "none"})
    job = await submit(api, "ok", worker_labels=[req("gpu", "a100")])
    await raw.send(
        heartbeat=w.WorkerHeartbeat(labels=w.WorkerLabels(labels={"gpu": "a100", "": "x"}))
    )
    error = await raw.expect("error")
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], error
    assert error.message_kind == "heartbeat" and "heartbeat.labels.labels" in error.message
    assert (await get(api, job.id)).waiting_reason == c.WAITING_REASON_NO_WORKER_MEETS_LABELS
    await raw.close()


async def test_spec_round_trips_and_client_helpers(harness: Harness) -> None:
    async with Client(harness.target) as client:
        job = await client.submit_job(
            "svc",
            {},
            worker_labels=[
                "gpu=a100",
                "vram_gb>=40",
                label_requirement("zone", "eu", required=False, weight=3),
                c.LabelRequirement(key="k", value=struct_pb2.Value(string_value="v")),
            ],
            affinity={"my-model": 10, "shared": 5},
        )
        got = (await client.get_job(job.id)).spec
    assert [(r.key, r.comparator, r.required, r.weight) for r in got.worker_labels] == [
        ("gpu", EQ, True, 0.0),
        ("vram_gb", GE, True, 0.0),
        ("zone", EQ, False, 3.0),
        ("k", EQ, False, 1.0),  # UNSPECIFIED is EQUAL, a preference's weight 0 is 1
    ]
    assert got.worker_labels[1].value.number_value == 40
    assert [(a.key, a.weight) for a in got.affinity] == [("my-model", 10), ("shared", 5)]
    with pytest.raises(ValueError, match="compares numbers"):
        parse_requirement("vram_gb>=lots")
    assert parse_requirement("gpu!=t4").comparator == NE


async def test_cli_submit_requires_prefers_and_weights(sqlite_harness: Harness) -> None:
    t = sqlite_harness.target
    code, out, err = await jobtrace(
        "submit",
        "svc",
        "--require",
        "gpu=a100",
        "--require",
        "vram_gb>=40",
        "--prefer",
        "zone=eu:5",
        "--affinity-weight",
        "org/model:v2:10",
        "--json",
        target=t,
    )
    assert code == 0, err
    spec = json.loads(out)["spec"]
    assert spec["worker_labels"] == [
        {"key": "gpu", "value": "a100", "comparator": "COMPARATOR_EQUAL", "required": True},
        {"key": "vram_gb", "value": 40.0, "comparator": "COMPARATOR_AT_LEAST", "required": True},
        {"key": "zone", "value": "eu", "comparator": "COMPARATOR_EQUAL", "weight": 5.0},
    ]
    assert spec["affinity"] == [{"key": "org/model:v2", "weight": 10.0}]
    code, out, err = await jobtrace("get", json.loads(out)["id"], target=t)
    assert code == 0, err
    assert "waiting  no worker for service" in out
    assert "requires  gpu=a100, vram_gb>=40, zone=eu (prefer 5)" in out
    assert "affinity  org/model:v2:10" in out
    code, _, err = await jobtrace("submit", "svc", "--require", "vram_gb>=lots", target=t)
    assert code == 2 and "compares numbers" in err and "Traceback" not in err
    code, _, err = await jobtrace("submit", "svc", "--affinity-weight", "m", target=t)
    assert code == 2 and "KEY:WEIGHT" in err


async def test_waiting_reason_says_not_before_and_dependencies(harness: Harness) -> None:
    api = harness.stubs()
    (raw,) = await workers(api, ("w", 1, {}))
    later = await submit(
        api, "later", not_before=timestamp_pb2.Timestamp(seconds=int(time.time()) + 3600)
    )
    assert (await get(api, later.id)).waiting_reason == c.WAITING_REASON_NOT_BEFORE
    flow = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="wf",
                name="wf",
                steps=[
                    c.WorkflowStepSpec(
                        name="a", job=c.JobSpec(service="svc", worker_labels=[req("gpu", "x")])
                    ),
                    c.WorkflowStepSpec(name="b", job=c.JobSpec(service="svc"), depends_on=["a"]),
                ],
            )
        )
    ).workflow
    steps = {s.name: s.job_id for s in flow.steps}
    assert (await get(api, steps["a"])).waiting_reason == c.WAITING_REASON_NO_WORKER_MEETS_LABELS
    b = await get(api, steps["b"])
    assert b.state == c.RUN_STATE_PENDING
    assert b.waiting_reason == c.WAITING_REASON_DEPENDENCIES
    # A running job waits for nothing.
    plain = await submit(api, "plain")
    assert await running_on(api, plain.id) == "w"
    assert (await get(api, plain.id)).waiting_reason == c.WAITING_REASON_UNSPECIFIED
    await close(raw)
