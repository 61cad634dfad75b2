"""Attestations vouch for the annotations published with them (data.annotations),
VerifyAttestation names the one that changed; every ended standalone job is attested."""

from __future__ import annotations

import hashlib
from typing import Any

from google.protobuf import json_format, struct_pb2

from jobtrace.client.worker import JobContext
from jobtrace.domain import annotated
from jobtrace.domain.attest import canonical
from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, execute_sql, wait_for
from .workers import RawWorker, runtime_worker

EMPTY_DIGEST = "sha256:" + hashlib.sha256(b"[]").hexdigest()


def value(x: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    json_format.ParseDict(x, v)
    return v


def auditor_form(x: c.Annotation) -> dict[str, Any]:
    """An annotation as ListAnnotations (FULL) returns it, in the canonical form the
    attestation's digest covers: what an auditor computes offline."""
    return {
        "id": x.id,
        "tenant": x.tenant,
        "run_id": x.run_id,
        "job_id": x.job_id,
        "attempt": x.attempt,
        "scope": x.scope,
        "scope_id": x.scope_id,
        "key": x.key,
        "value": json_format.MessageToDict(x.value),
        "actor": {"kind": x.actor.kind, "id": x.actor.id, "version": x.actor.version},
        "recorded_by": x.recorded_by,
        "payload": json_format.MessageToDict(x.payload) if x.HasField("payload") else None,
        "idempotency_key": x.idempotency_key,
        "create_time_us": x.create_time.seconds * 1_000_000 + x.create_time.nanos // 1000,
    }


def sha256(value: Any) -> str:
    return "sha256:" + hashlib.sha256(canonical(value)).hexdigest()


async def annotations_of(api: Stubs, run_id: str) -> list[c.Annotation]:
    page = await api.attest.ListAnnotations(
        a.ListAnnotationsRequest(run_id=run_id, page_size=1000, view=a.ANNOTATION_VIEW_FULL)
    )
    return list(page.annotations)


async def get(api: Stubs, key: str) -> a.Attestation:
    return (await api.attest.GetAttestation(a.GetAttestationRequest(key=key))).attestation


async def verify(api: Stubs, key: str) -> a.VerifyAttestationResponse:
    return await api.attest.VerifyAttestation(a.VerifyAttestationRequest(key=key))


def block_of(att: a.Attestation) -> dict[str, Any]:
    return dict(json_format.MessageToDict(att.data)["annotations"])


async def attach(api: Stubs, run_id: str, attrs: dict[str, Any], **kw: Any) -> list[c.Annotation]:
    response = await api.attest.AttachAnnotations(
        a.AttachAnnotationsRequest(
            run_id=run_id,
            actor=c.Actor(kind=c.ACTOR_KIND_USER, id="alice", version="1"),
            attributes={k: value(v) for k, v in attrs.items()},
            **kw,
        )
    )
    return list(response.annotations)


async def state_is(api: Stubs, job_id: str, state: int) -> bool:
    return (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id))).job.state == state


async def test_completion_vouches_for_its_annotations_and_verify_names_a_changed_one(
    harness: Harness,
) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="ann-1", job=c.JobSpec(service="svc"))
        )
    ).job
    await raw.expect("assignment")
    # A run-level annotation from a reviewer, and two the worker sends for its attempt
    # (pending until the attempt ends, published with the completion).
    (approval,) = await attach(api, job.id, {"approval.disposition": "approved"})
    payload = struct_pb2.Struct()
    payload.update({"why": "cheapest", "scores": [0.5, 1]})
    await raw.send(
        annotate=w.AnnotationReport(
            job_id=job.id,
            attempt=1,
            attributes={"decision.outcome": value("resize"), "decision.confidence": value(0.9)},
            payload=payload,
        )
    )
    await raw.expect("ack")
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
    await raw.expect("ack")
    # Attached after the attestation: not covered, and no reason to fail it.
    await attach(api, job.id, {"revision.number": 2}, job_id=job.id, attempt=1)

    key = f"worker-completion:{job.id}"
    att = await get(api, key)
    block = block_of(att)
    stored = await annotations_of(api, job.id)
    attested = [x for x in stored if x.key != "revision.number"]
    assert [i["id"] for i in block["items"]] == [x.id for x in attested]
    assert {x.key for x in attested} == {
        "approval.disposition",
        "decision.confidence",
        "decision.outcome",
    }
    assert block["run_id"] == job.id and block["job_id"] == ""
    assert block["attempts"] == [0, 1] and block["count"] == 3 and block["listed_all"]
    # An auditor recomputes both hashes from ListAnnotations alone.
    forms = [auditor_form(x) for x in attested]
    assert block["digest"] == sha256(forms)
    assert [i["sha256"] for i in block["items"]] == [sha256(f) for f in forms]
    ok = await verify(api, key)
    assert ok.valid and ok.annotations_valid and ok.annotations_attested, ok.reason
    assert list(ok.changed_annotation_ids) == []

    # The reviewer's approval is rewritten in the database: the attestation says so.
    await execute_sql(
        harness.db_url,
        "UPDATE annotations SET value = :v WHERE id = :id",
        v='"rejected"',
        id=approval.id,
    )
    bad = await verify(api, key)
    assert not bad.valid and not bad.annotations_valid
    assert list(bad.changed_annotation_ids) == [approval.id]
    assert f"annotation {approval.id} (approval.disposition) changed" in bad.reason
    # The attestation itself is intact: digest, signature and chain still check out.
    assert bad.digest_valid and bad.signature_valid and bad.chain_valid
    # A deleted one is named too, in the attestation's order.
    outcome = next(x for x in attested if x.key == "decision.outcome")
    await execute_sql(harness.db_url, "DELETE FROM annotations WHERE id = :id", id=outcome.id)
    worse = await verify(api, key)
    assert set(worse.changed_annotation_ids) == {approval.id, outcome.id}
    assert f"annotation {outcome.id} (decision.outcome) was deleted" in worse.reason
    await raw.close()


async def test_workflow_attestation_covers_run_level_annotations_steps_their_attempts(
    harness: Harness,
) -> None:
    api = harness.stubs()
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="ann-wf",
                name="w",
                steps=[
                    c.WorkflowStepSpec(name="one", job=c.JobSpec(service="svc")),
                    c.WorkflowStepSpec(name="two", job=c.JobSpec(service="svc")),
                ],
            )
        )
    ).workflow
    (trigger,) = await attach(api, wf.id, {"trigger.source": "api"})

    async def step(job: JobContext) -> dict[str, Any]:
        if job.job.step_name == "two":
            await job.annotate({"decision.outcome": "ship"})
        return {}

    async def done() -> bool:
        got = await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf.id))
        return got.workflow.state == c.RUN_STATE_COMPLETED

    async with runtime_worker(harness.target, {"svc": step}, worker_id="wkr"):
        await wait_for(done, timeout=15)
    stored = {x.key: x for x in await annotations_of(api, wf.id)}
    decision = stored["decision.outcome"]
    whole = await get(api, f"workflow-completion:{wf.id}")
    block = block_of(whole)
    assert block["attempts"] == [0] and block["job_id"] == ""
    assert [i["id"] for i in block["items"]] == [trigger.id]
    assert block["digest"] == sha256([auditor_form(trigger)])
    two = await get(api, f"worker-completion:{decision.job_id}")
    step_block = block_of(two)
    assert (step_block["job_id"], step_block["attempts"]) == (decision.job_id, [1])
    assert [i["id"] for i in step_block["items"]] == [decision.id]
    assert step_block["digest"] == sha256([auditor_form(decision)])
    for att in (whole, two):
        assert (await verify(api, att.key)).valid

    await execute_sql(
        harness.db_url,
        "UPDATE annotations SET actor_id = 'someone-else' WHERE id = :id",
        id=trigger.id,
    )
    bad = await verify(api, whole.key)
    assert not bad.valid and list(bad.changed_annotation_ids) == [trigger.id]
    assert "trigger.source" in bad.reason
    assert (await verify(api, two.key)).valid, "a step's attempt annotations are its own"


async def test_an_attestation_without_annotations_covers_the_empty_list(
    harness: Harness,
) -> None:
    api = harness.stubs()

    async def echo(job: JobContext) -> dict[str, Any]:
        return {}

    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="plain", job=c.JobSpec(service="svc"))
        )
    ).job
    async with runtime_worker(harness.target, {"svc": echo}):
        await wait_for(lambda: state_is(api, job.id, c.RUN_STATE_COMPLETED), timeout=10)
    att = await get(api, f"worker-completion:{job.id}")
    block = block_of(att)
    assert block["count"] == 0 and block["items"] == [] and block["digest"] == EMPTY_DIGEST
    verdict = await verify(api, att.key)
    assert verdict.valid and verdict.annotations_valid and verdict.annotations_attested


async def test_data_without_annotations_is_an_older_attestation_not_a_tampered_one() -> None:
    # Older attestations have no data.annotations: nothing to check, nothing wrong.
    verdict = await annotated.verify(None, {"result": {}})  # type: ignore[arg-type]
    assert not verdict.attested and verdict.valid and verdict.changed_ids == []


async def test_a_timed_out_standalone_job_is_attested_with_its_annotations(
    harness: Harness,
) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(
                request_id="slow",
                job=c.JobSpec(service="svc", timeout={"nanos": 300_000_000}, max_attempts=3),
            )
        )
    ).job
    await raw.expect("assignment")
    await raw.send(
        annotate=w.AnnotationReport(
            job_id=job.id, attempt=1, attributes={"decision.outcome": value("wait")}
        )
    )
    await raw.expect("ack")
    # The worker never reports: the supervisor times the job out (for good: a
    # timeout is not retried, whatever max_attempts says).
    await wait_for(lambda: state_is(api, job.id, c.RUN_STATE_TIMED_OUT), timeout=10)
    page = await api.attest.ListAttestations(
        a.ListAttestationsRequest(job_id=job.id, view=a.ATTESTATION_VIEW_FULL)
    )
    (att,) = page.attestations
    assert att.key == f"worker-failure:{job.id}:1"
    assert att.state == c.RUN_STATE_TIMED_OUT
    data = json_format.MessageToDict(att.data)
    assert data["error"]["code"] == "TIMED_OUT" and data["will_retry"] is False
    (note,) = await annotations_of(api, job.id)
    assert [i["id"] for i in data["annotations"]["items"]] == [note.id]
    assert (await verify(api, att.key)).valid
    await raw.close()


async def test_beyond_the_listed_items_the_digest_still_covers_every_annotation(
    harness: Harness, monkeypatch: Any
) -> None:
    monkeypatch.setattr(annotated, "MAX_LISTED", 2)
    api = harness.stubs()
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="many", job=c.JobSpec(service="nobody"))
        )
    ).job
    notes = await attach(api, job.id, {f"decision.n{i}": i for i in range(5)})
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=job.id))
    att = await get(api, f"worker-cancellation:{job.id}")
    block = block_of(att)
    assert block["count"] == 5 and len(block["items"]) == 2 and not block["listed_all"]
    assert block["digest"] == sha256([auditor_form(x) for x in notes])
    assert (await verify(api, att.key)).valid
    # A change past the listed two is caught by the digest, though not named.
    await execute_sql(
        harness.db_url, "UPDATE annotations SET value = '7' WHERE id = :id", id=notes[4].id
    )
    bad = await verify(api, att.key)
    assert not bad.valid and not bad.annotations_valid and not bad.changed_annotation_ids
    assert "no longer hash to data.annotations.digest" in bad.reason
    # One of the listed two is named.
    await execute_sql(
        harness.db_url, "UPDATE annotations SET value = '7' WHERE id = :id", id=notes[0].id
    )
    assert list((await verify(api, att.key)).changed_annotation_ids) == [notes[0].id]


async def test_completions_written_together_vouch_each_for_its_own_annotations(
    harness: Harness,
) -> None:
    """Completions of one batch are written together (their jobs and their
    runs' annotations read at once): each attestation still covers exactly
    its own job's annotations, a worker's pending ones (published by the
    completion) and a run-level one alike, and verifies."""
    from .test_batching import report, take_assignments
    from .test_worker_stream import submit

    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w", ["svc"], max_concurrency=6, accepts_batches=True)
    jobs = [(await submit(api, f"together-{i}")).id for i in range(6)]
    await take_assignments(raw, 6)
    await attach(api, jobs[1], {"review.by": "alice"})
    batch = [
        report(
            1,
            annotate=w.AnnotationReport(
                job_id=jobs[0], attempt=1, attributes={"review.note": value("mine")}
            ),
        ),
        *[
            report(2 + i, complete=w.CompleteReport(job_id=x, attempt=1))
            for i, x in enumerate(jobs)
        ],
    ]
    await raw.send(batch=w.ReportBatch(reports=batch))
    acks = await raw.expect("acks")
    assert len(acks.acks) == 7 and not acks.errors, acks.errors
    for i, job_id in enumerate(jobs):
        key = f"worker-completion:{job_id}"
        block = block_of(await get(api, key))
        want = {0: ["review.note"], 1: ["review.by"]}.get(i, [])
        assert [item["key"] for item in block["items"]] == want, (i, block)
        assert block["run_id"] == job_id and block["count"] == len(want)
        assert (await verify(api, key)).valid
    await raw.close()
