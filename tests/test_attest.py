"""Attestations and annotations over a real server and worker."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from jobtrace.client.worker import JobContext
from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, execute_sql, expect_error, wait_for
from .workers import RawWorker, runtime_worker

PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + b"\x00" * 3000).decode()
BLOB = base64.b64encode(bytes(range(256)) * 8).decode()


def ctx(user: str = "u-7") -> c.RequestContext:
    body = struct_pb2.Struct()
    body.update({"prompt": "make thumbnails", "image": PNG})
    return c.RequestContext(
        body=body,
        user_context=c.UserContext(user_id=user),
        metadata=c.RequestMetadata(request_id="http-1"),
    )


def spec(service: str = "svc", **payload: Any) -> c.JobSpec:
    s = c.JobSpec(service=service)
    s.payload.update(payload or {"n": 1})
    return s


async def echo(job: JobContext) -> dict[str, Any]:
    return {"step": job.job.step_name, "n": job.payload.get("n")}


async def attestations(api: Stubs, **filters: Any) -> list[a.Attestation]:
    page = await api.attest.ListAttestations(a.ListAttestationsRequest(page_size=1000, **filters))
    return list(page.attestations)


async def verify(api: Stubs, key: str) -> a.VerifyAttestationResponse:
    return await api.attest.VerifyAttestation(a.VerifyAttestationRequest(key=key))


async def run_workflow(harness: Harness, api: Stubs) -> c.Workflow:
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="wf-1",
                name="thumbs",
                request_context=ctx(),
                steps=[
                    c.WorkflowStepSpec(name="fetch", job=spec(n=1)),
                    c.WorkflowStepSpec(name="resize", job=spec(n=2)),
                    c.WorkflowStepSpec(name="store", job=spec(n=3)),
                ],
            )
        )
    ).workflow

    async def done() -> bool:
        got = await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf.id))
        return got.workflow.state == c.RUN_STATE_COMPLETED

    async with runtime_worker(harness.target, {"svc": echo}, worker_id="wkr"):
        await wait_for(done, timeout=15)
    return wf


async def test_workflow_yields_a_valid_chain_with_the_evidence(harness: Harness) -> None:
    api = harness.stubs()
    wf = await run_workflow(harness, api)
    items = await attestations(api, workflow_id=wf.id)
    assert [x.type for x in items] == [a.ATTESTATION_TYPE_WORKER_COMPLETION] * 3 + [
        a.ATTESTATION_TYPE_WORKFLOW_COMPLETION
    ]
    assert [x.chain_sequence for x in items] == [1, 2, 3, 4]
    assert items[0].previous_digest == ""
    for prev, cur in itertools.pairwise(items):
        assert cur.previous_digest == prev.digest
    for i, item in enumerate(items[:3]):
        assert item.key == f"worker-completion:{item.job_id}"
        assert item.worker_id == "wkr" and item.attempt == 1 and item.entity_type == "job"
        data = json_format.MessageToDict(item.data)
        assert data["request_context"]["user_context"]["user_id"] == "u-7"
        assert data["request_context"]["metadata"]["request_id"] == "http-1"
        assert data["job_payload"] == {"n": i + 1}
        assert data["result"]["n"] == i + 1
    final = json_format.MessageToDict(items[3].data)
    assert items[3].key == f"workflow-completion:{wf.id}"
    assert final["total_steps"] == 3 and final["completed_steps"] == 3
    assert set(final["outputs"]) == {"fetch", "resize", "store"}
    assert final["request_context"]["body"]["prompt"] == "make thumbnails"
    for item in items:
        verdict = await verify(api, item.key)
        assert verdict.valid and verdict.signature_valid and verdict.chain_valid, verdict.reason
        assert item.signature and item.key_id.startswith("ed25519:")
        assert item.expire_time.seconds - item.create_time.seconds == 7 * 86400
    got = await api.attest.GetAttestation(a.GetAttestationRequest(key=items[0].key))
    assert got.attestation == items[0] and not got.HasField("envelope")


async def test_base64_content_never_reaches_an_attestation(harness: Harness) -> None:
    api = harness.stubs()
    wf = await run_workflow(harness, api)
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(
                request_id="img",
                job=spec("img", image=PNG, blob=BLOB, note="keep me"),
                request_context=ctx(),
            )
        )
    ).job

    async def ok(ctx_: JobContext) -> dict[str, Any]:
        return {"thumbnail": PNG}

    async with runtime_worker(harness.target, {"img": ok}):
        key = f"worker-completion:{job.id}"

        async def stored() -> Any:
            try:
                return await api.attest.GetAttestation(a.GetAttestationRequest(key=key))
            except grpc.aio.AioRpcError:
                return None

        got = (await wait_for(stored, timeout=10)).attestation
    text = json.dumps(json_format.MessageToDict(got.data))
    assert PNG not in text and BLOB not in text and "iVBOR" not in text
    data = json_format.MessageToDict(got.data)
    marker = data["job_payload"]["image"]
    assert marker["redacted"] == "base64" and marker["media_type"] == "image/png"
    assert marker["length"] == len(PNG) and len(marker["sha256"]) == 64
    assert data["job_payload"]["blob"]["length"] == len(BLOB)
    assert data["job_payload"]["note"] == "keep me"
    assert data["result"]["thumbnail"]["redacted"] == "base64"
    assert data["request_context"]["body"]["image"]["redacted"] == "base64"
    assert (await verify(api, got.key)).valid
    assert wf.id


async def test_failed_attempt_then_success(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(
                request_id="retry",
                job=c.JobSpec(
                    service="svc", backoff=c.BackoffPolicy(initial_interval={"nanos": 1_000_000})
                ),
                request_context=ctx(),
            )
        )
    ).job
    await raw.expect("assignment")
    await raw.send(
        fail=w.FailReport(
            job_id=job.id,
            attempt=1,
            retryable=True,
            error=c.ErrorDetail(message="disk full", code="ENOSPC"),
        )
    )
    await raw.expect("ack")
    await raw.expect("assignment")
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=2))
    await raw.expect("ack")
    items = await attestations(api, job_id=job.id)
    assert [x.key for x in items] == [f"worker-failure:{job.id}:1", f"worker-completion:{job.id}"]
    failure = json_format.MessageToDict(items[0].data)
    assert failure["error"]["message"] == "disk full" and failure["error"]["code"] == "ENOSPC"
    assert failure["will_retry"] is True and items[0].attempt == 1
    assert failure["request_context"]["user_context"]["user_id"] == "u-7"
    assert items[1].attempt == 2 and items[1].previous_digest == items[0].digest
    only_failures = await attestations(api, type=a.ATTESTATION_TYPE_WORKER_FAILURE)
    assert [x.key for x in only_failures] == [items[0].key]
    for item in items:
        assert (await verify(api, item.key)).valid
    await raw.close()


async def test_terminal_failure_attests_the_workflow_failure(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="wf-f",
                name="w",
                steps=[
                    c.WorkflowStepSpec(name="a", job=c.JobSpec(service="svc")),
                    c.WorkflowStepSpec(name="b", job=c.JobSpec(service="svc")),
                ],
            )
        )
    ).workflow
    first = await raw.expect("assignment")
    await raw.send(
        fail=w.FailReport(
            job_id=first.job.id, attempt=1, retryable=False, error=c.ErrorDetail(message="bad")
        )
    )
    await raw.expect("ack")
    items = await attestations(api, workflow_id=wf.id)
    assert [x.type for x in items] == [
        a.ATTESTATION_TYPE_WORKER_FAILURE,
        a.ATTESTATION_TYPE_WORKFLOW_FAILURE,
    ]
    assert items[1].key == f"workflow-failure:{wf.id}"
    assert json_format.MessageToDict(items[1].data)["completed_steps"] == 0
    wf2 = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="wf-c",
                name="w",
                steps=[c.WorkflowStepSpec(name="x", job=c.JobSpec(service="no"))],
            )
        )
    ).workflow
    await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=wf2.id))
    (cancelled,) = await attestations(api, workflow_id=wf2.id)
    assert cancelled.key == f"workflow-cancellation:{wf2.id}"
    assert cancelled.type == a.ATTESTATION_TYPE_WORKFLOW_CANCELLATION
    await raw.close()


async def test_tampered_row_fails_verification_and_says_why(harness: Harness) -> None:
    api = harness.stubs()
    wf = await run_workflow(harness, api)
    items = await attestations(api, workflow_id=wf.id)
    target = items[1]
    ((raw,),) = await execute_sql(
        harness.db_url, "SELECT data FROM attestations WHERE key = :k", k=target.key
    )
    data = json.loads(raw)
    data["result"]["n"] = 999
    await execute_sql(
        harness.db_url,
        "UPDATE attestations SET data = :d WHERE key = :k",
        d=json.dumps(data),
        k=target.key,
    )
    verdict = await verify(api, target.key)
    assert not verdict.valid and not verdict.digest_valid
    assert "content altered" in verdict.reason
    assert verdict.signature_valid and verdict.chain_valid  # the rest still checks out
    # Deleting a link is caught too: its successor's chain check fails.
    await execute_sql(harness.db_url, "DELETE FROM attestations WHERE key = :k", k=items[2].key)
    verdict = await verify(api, items[3].key)
    assert not verdict.valid and not verdict.chain_valid and not verdict.previous_pruned
    assert "missing and was not pruned" in verdict.reason
    # A forged signature.
    await execute_sql(
        harness.db_url,
        "UPDATE attestations SET signature = :s WHERE key = :k",
        s="00" * 64,
        k=items[0].key,
    )
    verdict = await verify(api, items[0].key)
    assert not verdict.valid and not verdict.signature_valid and "signature" in verdict.reason


async def test_retention_prunes_and_verification_tells_pruned_from_tampered(
    harness: Harness,
) -> None:
    api = harness.stubs()
    wf = await run_workflow(harness, api)
    items = await attestations(api, workflow_id=wf.id)
    await execute_sql(
        harness.db_url,
        "UPDATE attestations SET expire_us = 1 WHERE key IN (:a, :b)",
        a=items[0].key,
        b=items[1].key,
    )
    assert harness.server is not None
    assert await harness.server.attestor.sweep_once() == 2
    await expect_error(
        api.attest.GetAttestation(a.GetAttestationRequest(key=items[0].key)),
        grpc.StatusCode.NOT_FOUND,
    )
    verdict = await verify(api, items[2].key)
    assert verdict.valid and verdict.chain_valid and verdict.previous_pruned


async def test_verification_survives_key_rotation(harness: Harness, tmp_path: Path) -> None:
    api = harness.stubs()
    first = await run_workflow(harness, api)
    old_keys = (await api.attest.GetSigningKeys(a.GetSigningKeysRequest())).keys
    assert len(old_keys) == 1 and old_keys[0].active and len(old_keys[0].public_key) == 32
    assert old_keys[0].algorithm == "ed25519"
    await harness.stop()
    key_file = Path(harness.settings["signing_key_file"])
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jobtrace",
        "keys",
        "rotate",
        "--key-file",
        str(key_file),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and b"new signing key" in out
    await harness.start()
    api = harness.stubs()
    job = (await api.jobs.SubmitJob(j.SubmitJobRequest(request_id="after", job=spec()))).job
    async with runtime_worker(harness.target, {"svc": echo}):
        await wait_for(lambda: _state(api, job.id, c.RUN_STATE_COMPLETED), timeout=10)
    keys = (await api.attest.GetSigningKeys(a.GetSigningKeysRequest())).keys
    assert len(keys) == 2 and [k.active for k in keys] == [True, False]
    new = (
        await api.attest.GetAttestation(a.GetAttestationRequest(key=f"worker-completion:{job.id}"))
    ).attestation
    assert new.key_id == keys[0].key_id != old_keys[0].key_id
    for item in [*await attestations(api, workflow_id=first.id), new]:
        assert (await verify(api, item.key)).valid, item.key


async def _state(api: Stubs, job_id: str, state: int) -> bool:
    return (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id))).job.state == state


async def _offline_verify(envelope: Path, key: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jobtrace",
        "attest",
        "verify",
        str(envelope),
        "--public-key",
        str(key),
        "--json",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_exported_envelope_verifies_offline(harness: Harness, tmp_path: Path) -> None:
    api = harness.stubs()
    wf = await run_workflow(harness, api)
    key = f"workflow-completion:{wf.id}"
    got = await api.attest.GetAttestation(a.GetAttestationRequest(key=key, include_envelope=True))
    env = got.envelope
    assert env.payload_type == "application/vnd.in-toto+json"
    statement = json.loads(env.payload)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["subject"][0]["digest"]["sha256"] == got.attestation.digest[7:]
    envelope = {
        "payloadType": env.payload_type,
        "payload": base64.b64encode(env.payload).decode(),
        "signatures": [
            {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode()} for s in env.signatures
        ],
    }
    (signing_key,) = (await api.attest.GetSigningKeys(a.GetSigningKeysRequest())).keys
    key_file = tmp_path / "key.pub"
    key_file.write_text(signing_key.public_key.hex())
    env_file = tmp_path / "envelope.json"
    env_file.write_text(json.dumps(envelope))
    await harness.stop()  # offline: no server needed
    code, out = await _offline_verify(env_file, key_file)
    assert code == 0 and json.loads(out)["valid"] is True, out
    statement["predicate"]["data"]["completed_steps"] = 99
    forged = dict(envelope, payload=base64.b64encode(json.dumps(statement).encode()).decode())
    env_file.write_text(json.dumps(forged))
    code, out = await _offline_verify(env_file, key_file)
    assert code == 1 and json.loads(out)["valid"] is False


def value(x: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    json_format.ParseDict(x, v)
    return v


def actor(id_: str = "alice", kind: int = c.ACTOR_KIND_USER) -> c.Actor:
    return c.Actor(kind=kind, id=id_, version="1")


async def attach(api: Stubs, run_id: str, attrs: dict[str, Any], **kw: Any) -> list[c.Annotation]:
    response = await api.attest.AttachAnnotations(
        a.AttachAnnotationsRequest(
            run_id=run_id,
            actor=kw.pop("actor", actor()),
            attributes={k: value(v) for k, v in attrs.items()},
            **kw,
        )
    )
    return list(response.annotations)


async def listed(api: Stubs, run_id: str, **filters: Any) -> list[tuple[str, Any]]:
    page = await api.attest.ListAnnotations(
        a.ListAnnotationsRequest(run_id=run_id, page_size=1000, **filters)
    )
    return [(x.key, json_format.MessageToDict(x.value)) for x in page.annotations]


async def test_annotation_filters_and_paging(harness: Harness) -> None:
    api = harness.stubs()
    trigger = c.AnnotationInput(
        actor=actor("svc-a", c.ACTOR_KIND_SERVICE), attributes={"trigger.source": value("api")}
    )
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="wf-a",
                name="w",
                annotations=[trigger],
                steps=[c.WorkflowStepSpec(name="a", job=c.JobSpec(service="svc"))],
            )
        )
    ).workflow
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    step = await raw.expect("assignment")
    await attach(api, wf.id, {"decision.outcome": "approve", "decision.confidence": 0.9})
    t_mid = time.time_ns()
    await asyncio.sleep(0.01)
    await attach(
        api,
        wf.id,
        {"approval.approved": True},
        actor=actor("bob"),
        job_id=step.job.id,
        attempt=1,
        scope=c.ANNOTATION_SCOPE_ATTEMPT,
    )
    await attach(
        api,
        wf.id,
        {"review.note": "looks fine"},
        actor=actor("bob"),
        job_id=step.job.id,
        scope=c.ANNOTATION_SCOPE_STEP,
    )
    everything = await listed(api, wf.id)
    assert [k for k, _ in everything] == [
        "trigger.source",
        "decision.confidence",
        "decision.outcome",
        "approval.approved",
        "review.note",
    ]
    assert await listed(api, wf.id, key_prefix="decision.") == [
        ("decision.confidence", 0.9),
        ("decision.outcome", "approve"),
    ]
    assert [k for k, _ in await listed(api, wf.id, actor_id="bob")] == [
        "approval.approved",
        "review.note",
    ]
    since = c.Annotation().create_time
    since.FromNanoseconds(t_mid)
    assert [k for k, _ in await listed(api, wf.id, since=since)] == [
        "approval.approved",
        "review.note",
    ]
    assert [k for k, _ in await listed(api, wf.id, attempt=1)] == ["approval.approved"]
    steps = await api.attest.ListAnnotations(
        a.ListAnnotationsRequest(run_id=wf.id, scope=c.ANNOTATION_SCOPE_STEP)
    )
    assert [x.scope_id for x in steps.annotations] == ["a"]
    assert [k for k, _ in await listed(api, wf.id, key_prefix="decision_")] == []
    first = await api.attest.ListAnnotations(a.ListAnnotationsRequest(run_id=wf.id, page_size=2))
    second = await api.attest.ListAnnotations(
        a.ListAnnotationsRequest(run_id=wf.id, page_size=2, page_token=first.next_page_token)
    )
    third = await api.attest.ListAnnotations(
        a.ListAnnotationsRequest(run_id=wf.id, page_size=2, page_token=second.next_page_token)
    )
    keys = [x.key for p in (first, second, third) for x in p.annotations]
    assert keys == [k for k, _ in everything] and third.next_page_token == ""
    await raw.close()


async def test_attach_is_idempotent_and_can_emit_a_trace_event(api: Stubs) -> None:
    job = (await api.jobs.SubmitJob(j.SubmitJobRequest(request_id="r", job=spec()))).job
    first = await attach(
        api, job.id, {"decision.outcome": "ok"}, idempotency_key="k1", emit_event=True
    )
    again = await attach(
        api, job.id, {"decision.outcome": "ok"}, idempotency_key="k1", emit_event=True
    )
    assert [x.id for x in again] == [x.id for x in first]
    assert len(await listed(api, job.id)) == 1
    events = (await api.trace.ListTraceEvents(t.ListTraceEventsRequest(run_id=job.id))).events
    assert len(events) == 1 and "decision.outcome" in events[0].message
    without_key = await attach(api, job.id, {"decision.outcome": "ok"})
    assert without_key[0].id != first[0].id


async def test_bad_annotations_are_refused(api: Stubs) -> None:
    job = (await api.jobs.SubmitJob(j.SubmitJobRequest(request_id="r", job=spec()))).job
    cases = [
        ({"decision.confidence": 1.5}, {}, "attributes['decision.confidence']"),
        ({"Bad Key": 1}, {}, "attributes['Bad Key']"),
        ({"approval.approved": "yes"}, {}, "attributes['approval.approved']"),
        ({}, {}, "attributes"),
        ({"x.y": 1}, {"actor": c.Actor(id="a")}, "actor.kind"),
        ({"x.y": 1}, {"attempt": 1}, "attempt"),
    ]
    for attrs, kw, field in cases:
        _, _, violations = await expect_error(
            attach(api, job.id, attrs, **kw), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert field in [f for f, _ in violations], (field, violations)
    await expect_error(attach(api, "job_missing", {"x.y": 1}), grpc.StatusCode.NOT_FOUND)
    other = (await api.jobs.SubmitJob(j.SubmitJobRequest(request_id="o", job=spec()))).job
    await expect_error(attach(api, job.id, {"x.y": 1}, job_id=other.id), grpc.StatusCode.NOT_FOUND)
    assert await listed(api, job.id) == []


async def test_worker_annotations_are_committed_with_the_failure(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(
                request_id="wa",
                job=c.JobSpec(
                    service="svc",
                    max_attempts=2,
                    backoff=c.BackoffPolicy(initial_interval={"nanos": 1_000_000}),
                ),
            )
        )
    ).job
    await raw.expect("assignment")
    await raw.send(
        annotate=w.AnnotationReport(
            job_id=job.id, attempt=1, attributes={"failure.category": value("network")}
        )
    )
    await raw.expect("ack")
    assert await listed(api, job.id) == [], "buffered until the attempt ends"
    await raw.send(
        fail=w.FailReport(
            job_id=job.id, attempt=1, retryable=True, error=c.ErrorDetail(message="timeout")
        )
    )
    await raw.expect("ack")
    page = await api.attest.ListAnnotations(a.ListAnnotationsRequest(run_id=job.id))
    (note,) = page.annotations
    assert note.key == "failure.category" and note.attempt == 1
    assert note.actor.kind == c.ACTOR_KIND_WORKER and note.actor.id == "w1"
    assert note.scope == c.ANNOTATION_SCOPE_ATTEMPT
    await raw.expect("assignment")
    await raw.send(
        annotate=w.AnnotationReport(
            job_id=job.id,
            attempt=2,
            attributes={"decision.outcome": value("retry-ok")},
            actor=c.Actor(kind=c.ACTOR_KIND_MODEL, id="m", version="3"),
        )
    )
    await raw.expect("ack")
    await raw.send(
        annotate=w.AnnotationReport(
            job_id=job.id, attempt=1, attributes={"decision.outcome": value("stale")}
        )
    )
    assert (await raw.expect("error")).reason == "STALE_ATTEMPT"
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=2))
    await raw.expect("ack")
    assert await listed(api, job.id, attempt=2) == [("decision.outcome", "retry-ok")]
    await raw.close()


async def test_annotations_of_an_attempt_that_never_reported_are_dropped(harness: Harness) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="lost", job=c.JobSpec(service="svc", max_attempts=1))
        )
    ).job
    await raw.expect("assignment")
    await raw.send(
        annotate=w.AnnotationReport(
            job_id=job.id, attempt=1, attributes={"decision.outcome": value("x")}
        )
    )
    await raw.expect("ack")
    await raw.close()
    await wait_for(lambda: _state(api, job.id, c.RUN_STATE_FAILED))
    assert await listed(api, job.id) == []
