"""Attestations and annotations over a real server and worker."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import struct
import sys
import time
import zlib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from jobtrace.client.api import envelope_json
from jobtrace.client.worker import JobContext
from jobtrace.domain.attest import (
    canonical,
    digest_of,
    load_public_key,
    rotate_key_file,
    sanitize,
    verify_offline,
)
from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, execute_sql, expect_error, wait_for
from .workers import RawWorker, runtime_worker

PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + b"\x00" * 3000).decode()
BLOB = base64.b64encode(bytes(range(256)) * 8).decode()
MAX_RESULT = 1024 * 1024  # bytes of a result's Struct


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
    request = a.ListAttestationsRequest(page_size=1000, view=a.ATTESTATION_VIEW_FULL, **filters)
    page = await api.attest.ListAttestations(request)
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


async def cancel_unstarted_workflow(
    api: Stubs, rid: str, service: str
) -> tuple[c.Workflow, a.Attestation]:
    """A one-step workflow no worker serves, cancelled before it starts; its only attestation."""
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id=rid,
                name="w",
                steps=[c.WorkflowStepSpec(name="x", job=c.JobSpec(service=service))],
            )
        )
    ).workflow
    await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=wf.id))
    (cancelled,) = await attestations(api, workflow_id=wf.id)
    return wf, cancelled


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
    wf2, cancelled = await cancel_unstarted_workflow(api, "wf-c", service="no")
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
    envelope = envelope_json(env)  # the form `jobtrace attest export` writes
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


async def test_signatures_cover_what_the_proto_says(harness: Harness) -> None:
    """Checked with `cryptography` alone, as the proto comments tell a
    verifier in another language: Attestation.signature is Ed25519 over the
    raw 32 digest bytes (not the hex text); the envelope's over
    PAE(payload_type, payload) (not the payload)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    api = harness.stubs()
    wf = await run_workflow(harness, api)
    got = await api.attest.GetAttestation(
        a.GetAttestationRequest(key=f"workflow-completion:{wf.id}", include_envelope=True)
    )
    (signing_key,) = (await api.attest.GetSigningKeys(a.GetSigningKeysRequest())).keys
    public = Ed25519PublicKey.from_public_bytes(signing_key.public_key)
    att, env = got.attestation, got.envelope
    assert att.digest.startswith("sha256:") and len(att.signature) == 64
    raw = bytes.fromhex(att.digest.removeprefix("sha256:"))
    assert len(raw) == 32
    public.verify(att.signature, raw)
    with pytest.raises(InvalidSignature):
        public.verify(att.signature, att.digest.removeprefix("sha256:").encode())
    (sig,) = env.signatures
    assert sig.keyid == att.key_id == signing_key.key_id and len(sig.sig) == 64
    kind = env.payload_type.encode()
    pae = b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(env.payload), env.payload)
    public.verify(sig.sig, pae)
    with pytest.raises(InvalidSignature):
        public.verify(sig.sig, env.payload)


async def test_a_workflow_of_near_max_results_keeps_its_evidence_fetchable(
    harness: Harness,
) -> None:
    """Nine steps each return a result of almost 1 MiB (the most a result may
    be): embedded whole, they would make an attestation larger than any
    response. Outputs are taken smallest first within the budget; the largest
    are replaced by markers with the SHA-256 and length of the result's RFC
    8785 encoding, computed before signing, so the attestation is fetchable,
    listable, verifies, and still proves what came back."""
    from jobtrace.domain.evidence import ATTESTATION_DATA_BYTES

    api = harness.stubs()
    sizes = {f"big{i}": MAX_RESULT - 64 - 1000 * i for i in range(9)}
    sizes |= {"tiny": 10, "small": 2000, "forged": 0}
    forged = {"redacted": "oversize", "sha256": "0" * 64, "length": 1}

    async def sized(job: JobContext) -> dict[str, Any]:
        if job.job.step_name == "forged":  # a worker's result shaped as a marker
            return forged
        return {"blob": "x" * sizes[job.job.step_name]}

    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="big-results",
                name="big",
                request_context=ctx(),
                steps=[
                    c.WorkflowStepSpec(name=name, job=spec(), independent=True) for name in sizes
                ],
            )
        )
    ).workflow
    async with runtime_worker(harness.target, {"svc": sized}):

        async def done() -> bool:
            got = await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf.id))
            return got.workflow.state == c.RUN_STATE_COMPLETED

        await wait_for(done, timeout=60)
    key = f"workflow-completion:{wf.id}"
    got = await api.attest.GetAttestation(a.GetAttestationRequest(key=key, include_envelope=True))
    verdict = await verify(api, key)
    assert verdict.valid, verdict.reason
    (signing_key,) = (await api.attest.GetSigningKeys(a.GetSigningKeysRequest())).keys
    offline = verify_offline(
        envelope_json(got.envelope),
        {signing_key.key_id: load_public_key(signing_key.public_key.hex())},
    )
    assert offline.valid, offline.reason
    data = json_format.MessageToDict(got.attestation.data)
    assert got.attestation.data.ByteSize() <= ATTESTATION_DATA_BYTES
    assert len(canonical(data)) <= ATTESTATION_DATA_BYTES
    kept, replaced = [], []
    for step_ in wf.steps:
        result = json_format.MessageToDict(
            (await api.jobs.GetJob(j.GetJobRequest(job_id=step_.job_id))).job.result
        )
        output = data["outputs"][step_.name]
        if step_.name == "forged":  # kept whole, told apart from the server's markers
            assert result == forged
            assert output == {"$redacted": "oversize", "sha256": "0" * 64, "length": 1}
            continue
        if output == result:
            kept.append(step_.name)
            continue
        encoded = canonical(result)
        assert output == {
            "redacted": "oversize",
            "media_type": "application/json",
            "sha256": hashlib.sha256(encoded).hexdigest(),
            "length": len(encoded),
        }
        replaced.append(step_.name)
    assert {"tiny", "small"} <= set(kept) and len(replaced) >= 8
    assert max(sizes[n] for n in kept) < min(sizes[n] for n in replaced), "the largest go"
    # A FULL listing carries it too.
    listed = await attestations(api, workflow_id=wf.id, type=a.ATTESTATION_TYPE_WORKFLOW_COMPLETION)
    assert [x.digest for x in listed] == [got.attestation.digest]


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
        {"approval.disposition": "approved"},
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
        "approval.disposition",
        "review.note",
    ]
    assert await listed(api, wf.id, key_prefix="decision.") == [
        ("decision.confidence", 0.9),
        ("decision.outcome", "approve"),
    ]
    assert [k for k, _ in await listed(api, wf.id, actor_id="bob")] == [
        "approval.disposition",
        "review.note",
    ]
    since = c.Annotation().create_time
    since.FromNanoseconds(t_mid)
    assert [k for k, _ in await listed(api, wf.id, since=since)] == [
        "approval.disposition",
        "review.note",
    ]
    assert [k for k, _ in await listed(api, wf.id, attempt=1)] == ["approval.disposition"]
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
        ({"approval.disposition": "yes"}, {}, "attributes['approval.disposition']"),
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
            job_id=job.id, attempt=1, attributes={"failure.kind": value("network")}
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
    assert note.key == "failure.kind" and note.attempt == 1
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


async def test_annotations_of_an_attempt_whose_stream_was_lost_persist_with_its_failure(
    no_grace: Harness,
) -> None:
    """Acknowledged means stored: annotations sent before the stream was lost are
    not dropped but written with the attempt's failure (lease lost)."""
    api = no_grace.stubs()
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
    assert await listed(api, job.id) == [], "invisible while the attempt runs"
    await raw.close()
    await wait_for(lambda: _state(api, job.id, c.RUN_STATE_FAILED))
    page = await api.attest.ListAnnotations(a.ListAnnotationsRequest(run_id=job.id))
    (note,) = page.annotations
    assert (note.key, note.job_id, note.attempt) == ("decision.outcome", job.id, 1)
    assert note.scope == c.ANNOTATION_SCOPE_ATTEMPT and note.actor.id == "w1"
    failure = await api.attest.GetAttestation(
        a.GetAttestationRequest(key=f"worker-failure:{job.id}:1")
    )
    assert failure.attestation.data["error"]["code"] == "LEASE_EXPIRED"


# --- audit: keys, encoding, sanitising, malformed rows, timestamps -----------------


async def test_envelope_after_rotation_verifies_with_the_attestations_own_key(
    harness: Harness,
) -> None:
    api = harness.stubs()
    wf = await run_workflow(harness, api)
    (old,) = (await api.attest.GetSigningKeys(a.GetSigningKeysRequest())).keys
    await harness.stop()
    rotate_key_file(Path(harness.settings["signing_key_file"]))
    await harness.start()
    api = harness.stubs()
    job = (await api.jobs.SubmitJob(j.SubmitJobRequest(request_id="after", job=spec()))).job
    async with runtime_worker(harness.target, {"svc": echo}):
        await wait_for(lambda: _state(api, job.id, c.RUN_STATE_COMPLETED), timeout=10)
    new = next(
        k for k in (await api.attest.GetSigningKeys(a.GetSigningKeysRequest())).keys if k.active
    )
    for key, signer in [
        (f"workflow-completion:{wf.id}", old),
        (f"worker-completion:{job.id}", new),
    ]:
        got = await api.attest.GetAttestation(
            a.GetAttestationRequest(key=key, include_envelope=True)
        )
        assert got.attestation.key_id == signer.key_id
        assert [s.keyid for s in got.envelope.signatures] == [signer.key_id]
        # A verifier holding only the public key named by the attestation.
        only = {signer.key_id: load_public_key(signer.public_key.hex())}
        offline = verify_offline(envelope_json(got.envelope), only)
        assert offline.valid and offline.signature_valid and offline.digest_valid, offline.reason
        # One attestation alone says nothing about its chain, and says so.
        assert not offline.chain_checked and not offline.chain_valid
        again = await api.attest.GetAttestation(
            a.GetAttestationRequest(key=key, include_envelope=True)
        )
        assert again.envelope == got.envelope  # deterministic: same key, same bytes
    wrong = {new.key_id: load_public_key(new.public_key.hex())}
    got = await api.attest.GetAttestation(
        a.GetAttestationRequest(key=f"workflow-completion:{wf.id}", include_envelope=True)
    )
    refused = verify_offline(envelope_json(got.envelope), wrong)
    assert not refused.valid and old.key_id in refused.reason
    # Without the retired private key (removed, or another replica's key) the
    # envelope is still served, signed by the active key, and names that key.
    await harness.stop()
    key_file = Path(harness.settings["signing_key_file"])
    (retired,) = key_file.parent.glob(key_file.name + ".*.retired")
    retired.unlink()
    await harness.start()
    api = harness.stubs()
    got = await api.attest.GetAttestation(
        a.GetAttestationRequest(key=f"workflow-completion:{wf.id}", include_envelope=True)
    )
    assert [s.keyid for s in got.envelope.signatures] == [new.key_id]
    both = {k.key_id: load_public_key(k.public_key.hex()) for k in (old, new)}
    assert verify_offline(envelope_json(got.envelope), both).valid
    refused = verify_offline(
        envelope_json(got.envelope), {old.key_id: load_public_key(old.public_key.hex())}
    )
    assert not refused.valid and new.key_id in refused.reason and refused.digest_valid


# RFC 8785 appendix B: IEEE 754 bit patterns and their canonical form.
JCS_NUMBERS = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


@pytest.mark.parametrize(("bits", "expected"), JCS_NUMBERS)
def test_canonical_numbers_are_rfc8785(bits: str, expected: str) -> None:
    (x,) = struct.unpack(">d", bytes.fromhex(bits))
    assert canonical(x) == expected.encode()


def test_canonical_encoding_is_rfc8785() -> None:
    # RFC 8785 section 3.2.2 and 3.2.3 examples.
    source = (
        '{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
        ' "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
        ' "literals": [null, true, false]}'
    )
    assert (
        canonical(json.loads(source))
        == (
            '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
            '"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
        ).encode()
    )
    members = json.loads(
        '{"\\u20ac": "Euro Sign", "\\r": "Carriage Return", "\\ufb33": "Hebrew Letter Dalet'
        ' With Dagesh", "1": "One", "\\ud83d\\ude00": "Emoji: Grinning Face", "\\u0080":'
        ' "Control", "\\u00f6": "Latin Small Letter O With Diaeresis"}'
    )
    # Sorted by UTF-16 code units: the emoji's surrogates sort before U+FB33.
    assert list(json.loads(canonical(members)).values()) == [
        "Carriage Return",
        "One",
        "Control",
        "Latin Small Letter O With Diaeresis",
        "Euro Sign",
        "Emoji: Grinning Face",
        "Hebrew Letter Dalet With Dagesh",
    ]
    assert canonical({"b": 1.0, "a": [1e16, 1e21, 1e-7, -0.0, 10**21]}) == (
        b'{"a":[10000000000000000,1e+21,1e-7,0,1e+21],"b":1}'
    )
    # An integer is the double nearest to it, as for a verifier parsing JSON text.
    assert canonical([2**53 + 1, 1712345678901234567]) == b"[9007199254740992,1712345678901234700]"
    assert canonical("\x00\x1f\x7f\u2028/é") == b'"\\u0000\\u001f\x7f\xe2\x80\xa8/\xc3\xa9"'
    digest = hashlib.sha256(b'{"a":1,"b":[true,null,"x"]}').hexdigest()
    assert digest_of({"b": [True, None, "x"], "a": 1.0}) == "sha256:" + digest


@pytest.mark.parametrize(
    "bad", [float("nan"), float("inf"), float("-inf"), 10**400, {1: "x"}, "\ud800", b"x"]
)
def test_canonical_encoding_refuses_what_json_cannot_say(bad: Any) -> None:
    with pytest.raises(ValueError):
        canonical({"x": [bad]})


AWKWARD_NUMBERS = {"ns": 1712345678901234567, "big": 1e21, "tiny": 1e-7, "one": 1.0, "x": 0.1}


async def test_digest_is_reproducible_from_the_message_alone(harness: Harness) -> None:
    api = harness.stubs()
    wf = await run_workflow(harness, api)
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="numbers", job=spec("num", **AWKWARD_NUMBERS))
        )
    ).job

    async def numbers(ctx_: JobContext) -> dict[str, Any]:
        return {**AWKWARD_NUMBERS, "echo": ctx_.payload}

    async with runtime_worker(harness.target, {"num": numbers}):
        await wait_for(lambda: _state(api, job.id, c.RUN_STATE_COMPLETED), timeout=10)
    items = [*await attestations(api, workflow_id=wf.id), *await attestations(api, job_id=job.id)]
    assert len(items) == 5
    result = json_format.MessageToDict(items[-1].data)["result"]
    assert result["ns"] == float(AWKWARD_NUMBERS["ns"]) and result["tiny"] == 1e-7
    for item in items:
        assert (await verify(api, item.key)).valid, item.key
        # Struct numbers come back as doubles (3.0): JCS writes them as stored (3).
        rebuilt = {
            "key": item.key,
            "type": a.AttestationType.Name(item.type).removeprefix("ATTESTATION_TYPE_").lower(),
            "tenant": item.tenant,
            "entity_type": item.entity_type,
            "entity_id": item.entity_id,
            "workflow_id": item.workflow_id,
            "job_id": item.job_id,
            "worker_id": item.worker_id,
            "attempt": item.attempt,
            "state": c.RunState.Name(item.state).removeprefix("RUN_STATE_"),
            "data": json_format.MessageToDict(item.data),
            "chain_id": item.workflow_id or item.job_id,
            "chain_seq": item.chain_sequence,
            "previous_digest": item.previous_digest,
            "key_id": item.key_id,
            "create_time_us": item.create_time.ToMicroseconds(),
            "expire_time_us": item.expire_time.ToMicroseconds(),
        }
        assert "sha256:" + hashlib.sha256(canonical(rebuilt)).hexdigest() == item.digest


def png_bytes(size: int, comment: bytes = b"") -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    rows = b"".join(
        b"\x00" + bytes((x * 7 + y) % 256 for x in range(size * 3)) for y in range(size)
    )
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    text = chunk(b"tEXt", comment) if comment else b""
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + text
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


SMALL_PNG = base64.b64encode(png_bytes(4, b"Comment\x00" + b"x" * 22)).decode()
RANDOM_BLOB = base64.b64encode(bytes((i * 151 + 7) % 256 for i in range(600))).decode()
SVG_URI = (
    'data:image/svg+xml,<svg xmlns="http://www.w3.org/2000/svg">'
    + "".join(f'<circle r="{r}"/>' for r in range(1, 9))
    + "</svg>"
)
GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00"
PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 "


@pytest.mark.parametrize(
    ("name", "value", "kind", "media_type"),
    [
        ("mime wrapped", base64.encodebytes(RANDOM_BLOB.encode()).decode(), "base64", None),
        (
            "mime crlf",
            base64.encodebytes(bytes(range(256))).decode().replace("\n", "\r\n"),
            "base64",
            None,
        ),
        (
            "pem-like 64",
            "\n".join(RANDOM_BLOB[i : i + 64] for i in range(0, 800, 64)),
            "base64",
            None,
        ),
        ("small png", SMALL_PNG, "base64", "image/png"),
        ("url-safe", base64.urlsafe_b64encode(bytes(range(255, 0, -1))).decode(), "base64", None),
        (
            "gif unpadded",
            base64.b64encode(GIF + bytes(120)).decode().rstrip("="),
            "base64",
            "image/gif",
        ),
        (
            "pdf",
            base64.b64encode(PDF + b"1 0 obj << /Type /Catalog >> endobj\n" * 4).decode(),
            "base64",
            "application/pdf",
        ),
        ("webp", base64.b64encode(WEBP + bytes(120)).decode(), "base64", "image/webp"),
        ("svg data uri", SVG_URI, "data_uri", "image/svg+xml"),
        ("plain data uri", "data:,Hello%2C%20World" + "%2C%20again" * 12, "data_uri", "text/plain"),
        (
            "charset data uri",
            "DATA:text/plain;charset=utf-8," + "hi" * 60,
            "data_uri",
            "text/plain",
        ),
        ("base64 data uri", "data:image/png;name=a.png;base64," + SMALL_PNG, "base64", "image/png"),
    ],
)
def test_sanitize_redacts_encoded_content(
    name: str, value: str, kind: str, media_type: str | None
) -> None:
    if name == "small png":
        assert len(value) == 212
    if name == "gif unpadded":
        assert len(value) % 4
    marker = sanitize({"v": value})["v"]
    assert marker["redacted"] == kind, name
    assert marker.get("media_type") == media_type, name
    assert marker["length"] == len(value)
    assert marker["sha256"] == hashlib.sha256(value.encode()).hexdigest()
    # As an object member's name, too.
    (redacted_key,) = sanitize({value: 1})
    assert value not in redacted_key and redacted_key.startswith(f"[redacted {kind} ")
    assert hashlib.sha256(value.encode()).hexdigest() in redacted_key


@pytest.mark.parametrize(
    "value",
    [
        "a" * 300,
        "abcd" * 100,
        "AbCdEfGhIj" * 40,  # letters only: no digits
        hashlib.sha512(b"x").hexdigest(),
        hashlib.sha512(b"x").hexdigest().upper(),
        hashlib.sha256(b"x").hexdigest() * 8,
        base64.b64encode(hashlib.sha256(b"x").digest()).decode(),
        base64.b64encode(hashlib.sha512(b"x").digest()).decode(),
        "The quick brown fox jumps over the lazy dog. " * 20,
        "data: 3 rows, 2 columns",
        "metadata:image/png,1",
        "https://example.com/a/b/c?q=" + "x1Y" * 40,
        # (A JWT, kept by the base64 rules, is a credential: see test_redaction.py.)
        "line one\nline two\nline three",
        "550e8400-e29b-41d4-a716-446655440000",
    ],
)
def test_sanitize_keeps_words_digests_and_text(value: str) -> None:
    assert sanitize({"v": value, value: 1}) == {"v": value, value: 1}


@pytest.mark.parametrize(
    "value",
    [
        base64.b64encode(GIF).decode().rstrip("="),
        base64.b64encode(PDF).decode(),
        base64.b64encode(WEBP).decode(),
        base64.b64encode(b"\x89PNG\r\n\x1a\n").decode(),
        'data:image/svg+xml,<svg xmlns="http://www.w3.org/2000/svg"><circle r="4"/></svg>',
        "data:,Hello%2C%20World",
        "DATA:text/plain;charset=utf-8,hi",
        "data:,",
        "data:;base64,",
        "data:,[redacted",
    ],
)
def test_sanitize_keeps_encoded_content_shorter_than_its_marker(value: str) -> None:
    # Its marker would be larger than the content: kept, as text (escaped).
    want = value.replace("[redacted", "[\\redacted")
    assert sanitize({"v": value, value: 1}) == {"v": want, want: 1}
    assert sanitize({"note": f"see {value} here"}) == {"note": f"see {want} here"}


def _would_be_markers(value: str, kind: str, media_type: str) -> tuple[dict[str, Any], str]:
    """The marker object and the marker string that would replace `value`."""
    marker = {"redacted": kind, "sha256": _sha(value), "length": len(value)}
    text = f"[redacted {kind} {media_type or 'content'} sha256:{_sha(value)} length:{len(value)}]"
    return ({**marker, "media_type": media_type} if media_type else marker), text


@pytest.mark.parametrize(
    ("prefix", "fill", "kind", "media_type"),
    [
        ("data:,", "x", "data_uri", "text/plain"),
        ("data:application/" + "v" * 40 + ";base64,", "A", "base64", "application/" + "v" * 40),
        (base64.b64encode(GIF + bytes(2)).decode(), "AAAA", "base64", "image/gif"),
        ("aB1+", "aB1+", "base64", ""),  # bare: from MIN_BARE_BASE64 characters on
    ],
)
def test_content_is_replaced_exactly_when_its_marker_is_shorter(
    prefix: str, fill: str, kind: str, media_type: str
) -> None:
    replaced = []
    for n in range(0, 240, len(fill)):
        value = prefix + fill * (n // len(fill))
        marker, text_marker = _would_be_markers(value, kind, media_type)
        # A whole value: a marker object where that is shorter (as canonical JSON),
        # else it is read as text.
        out = sanitize({"v": value})["v"]
        if isinstance(out, dict):
            assert out == marker and len(canonical(marker)) < len(value)
            replaced.append(len(value))
        else:
            assert len(canonical(marker)) >= len(value)
            assert out == value or (out == text_marker and len(text_marker) < len(value))
        # A member name, and a data: URI inside text (bare base64 is only ever
        # a whole value or name): a marker string where that is shorter.
        names = [next(iter(sanitize({value: 1})))]
        inside = [sanitize({"v": f"({value})"})["v"][1:-1]] if value.startswith("data:") else []
        for got in names + inside:
            if got == value:
                assert len(text_marker) >= len(value)
            else:
                assert got == text_marker and len(text_marker) < len(value)
    assert replaced, "the lengths tried reach past the marker's"


ENCODED_SVG_URI = (
    "data:image/svg+xml,%3Csvg%20xmlns%3D%27http%3A%2F%2Fwww.w3.org%2F2000%2Fsvg%27%3E"
    + "%3Ccircle%20r%3D%274%27%2F%3E" * 3
    + "%3C%2Fsvg%3E"
)


def test_sanitize_redacts_data_uris_inside_text_and_a_second_pass_only_escapes() -> None:
    text = f"chart: ![c](data:image/png;base64,{SMALL_PNG}) icon: <img src='{ENCODED_SVG_URI}'>"
    out = sanitize({"note": text})["note"]
    png_marker = f"[redacted base64 image/png sha256:{_sha(f'data:image/png;base64,{SMALL_PNG}')}"
    svg_marker = f"[redacted data_uri image/svg+xml sha256:{_sha(ENCODED_SVG_URI)}"
    assert out == (
        f"chart: ![c]({png_marker} length:{len(SMALL_PNG) + 22}]) "
        f"icon: <img src='{svg_marker} length:{len(ENCODED_SVG_URI)}]'>"
    )
    payload = {"image": PNG, "blob": BLOB, SMALL_PNG: [SVG_URI, "keep"], "note": text}
    once = sanitize(payload)
    # Sanitised output fed back in is caller data: its markers come back escaped
    # (a server marker cannot be forged), and nothing else changes.
    twice = sanitize(once)
    assert twice != once and twice["image"]["$redacted"] == "base64"
    unescaped = json.dumps(twice).replace('"$redacted"', '"redacted"')
    assert unescaped.replace("[\\\\redacted", "[redacted") == json.dumps(once)
    assert all(s not in json.dumps(once) for s in (PNG, BLOB, SMALL_PNG, SVG_URI))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def test_malformed_rows_get_a_verdict_or_data_loss_never_unknown(harness: Harness) -> None:
    api = harness.stubs()
    wf = await run_workflow(harness, api)
    items = await attestations(api, workflow_id=wf.id)
    target, successor = items[1], items[2]
    edits: list[tuple[str, Any, str]] = [
        ("type", 99, "type 99"),
        ("type", 0, "type 0"),
        ("state", 77, "state 77"),
        ("signature", "not hex", "signature is not hex"),
        ("data", "{not json", "data is not JSON"),
        ("data", '{"x": NaN}', "data is not JSON"),
        ("data", '{"x": 1e400}', "beyond the range of a double"),
        ("data", '{"x": 1' + "0" * 400 + "}", "beyond the range of a double"),
        ("data", '{"x": "\\ud800"}', "surrogates not allowed"),
        ("data", "[1, 2]", "data is not a JSON object"),
    ]
    if harness.db_url.startswith("sqlite"):
        edits.append(("attempt", "one", "attempt 'one' is not an integer"))  # SQLite only
    for column, bad, words in edits:
        ((before,),) = await execute_sql(
            harness.db_url, f"SELECT {column} FROM attestations WHERE key = :k", k=target.key
        )
        await execute_sql(
            harness.db_url,
            f"UPDATE attestations SET {column} = :v WHERE key = :k",
            v=bad,
            k=target.key,
        )
        verdict = await verify(api, target.key)
        assert not verdict.valid and not verdict.signature_valid and not verdict.digest_valid
        assert verdict.reason.startswith("row is malformed: ") and words in verdict.reason, (
            column,
            verdict.reason,
        )
        _, info, _ = await expect_error(
            api.attest.GetAttestation(a.GetAttestationRequest(key=target.key)),
            grpc.StatusCode.DATA_LOSS,
        )
        assert info is not None and info.reason == "ATTESTATION_MALFORMED"
        assert info.metadata["key"] == target.key and words in info.metadata["problems"]
        _, info, _ = await expect_error(
            api.attest.ListAttestations(
                a.ListAttestationsRequest(workflow_id=wf.id, view=a.ATTESTATION_VIEW_FULL)
            ),
            grpc.StatusCode.DATA_LOSS,
        )
        assert info is not None and info.metadata["key"] == target.key
        # The next link only needs the malformed row's digest, which still reads.
        assert (await verify(api, successor.key)).valid
        await execute_sql(
            harness.db_url,
            f"UPDATE attestations SET {column} = :v WHERE key = :k",
            v=before,
            k=target.key,
        )
        assert (await verify(api, target.key)).valid, column
    # A signing key row edited too.
    await execute_sql(harness.db_url, "UPDATE signing_keys SET public_key = 'zz'")
    verdict = await verify(api, target.key)
    assert not verdict.valid and not verdict.signature_valid and verdict.digest_valid
    assert "signing_keys row" in verdict.reason and "public_key is not hex" in verdict.reason
    await expect_error(
        api.attest.GetSigningKeys(a.GetSigningKeysRequest()), grpc.StatusCode.DATA_LOSS
    )


def _us(iso: str) -> int:
    return (datetime.fromisoformat(iso) - datetime.fromisoformat("1970-01-01T00:00:00Z")) // (
        timedelta(microseconds=1)
    )


async def test_attestations_carry_attempt_and_run_timestamps(harness: Harness) -> None:
    api = harness.stubs()
    wf = await run_workflow(harness, api)
    items = await attestations(api, workflow_id=wf.id)
    stored = (await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf.id))).workflow
    final = json_format.MessageToDict(items[-1].data)
    assert _us(final["completed_at"]) == stored.completed_at.ToMicroseconds()
    assert _us(final["started_at"]) == stored.started_at.ToMicroseconds()
    for item in items[:-1]:
        data = json_format.MessageToDict(item.data)
        assert data["ended_at"] == data["completed_at"] != ""
        assert _us(data["started_at"]) <= _us(data["ended_at"]) <= _us(final["completed_at"])

    # A failed attempt that is retried: it ended, the job did not complete.
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(
                request_id="retry-times",
                job=c.JobSpec(
                    service="svc", backoff=c.BackoffPolicy(initial_interval={"nanos": 1_000_000})
                ),
            )
        )
    ).job
    await raw.expect("assignment")
    await raw.send(
        fail=w.FailReport(
            job_id=job.id, attempt=1, retryable=True, error=c.ErrorDetail(message="flaky")
        )
    )
    await raw.expect("ack")
    await raw.expect("assignment")
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=2))
    await raw.expect("ack")
    failed, done = (
        json_format.MessageToDict(x.data) for x in await attestations(api, job_id=job.id)
    )
    assert failed["completed_at"] == "" and failed["ended_at"] and failed["started_at"]
    assert _us(failed["started_at"]) <= _us(failed["ended_at"]) <= _us(done["started_at"])
    assert done["ended_at"] == done["completed_at"] and done["started_at"] != failed["started_at"]
    await raw.close()

    # A workflow cancelled before it started.
    wf2, cancelled = await cancel_unstarted_workflow(api, "wf-times", service="none")
    data = json_format.MessageToDict(cancelled.data)
    stored = (await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf2.id))).workflow
    assert (
        data["started_at"] == ""
        and _us(data["completed_at"]) == stored.completed_at.ToMicroseconds()
    )


async def test_an_annotation_event_never_follows_the_end_of_its_run(harness: Harness) -> None:
    api = harness.stubs()
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="ended", job=c.JobSpec(service="nobody"))
        )
    ).job

    def attach(key: str, emit: bool) -> a.AttachAnnotationsRequest:
        return a.AttachAnnotationsRequest(
            run_id=job.id,
            actor=actor(),
            attributes={"review.note": value("ok")},
            idempotency_key=key,
            emit_event=emit,
        )

    before = await api.attest.AttachAnnotations(attach("before", True))
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=job.id))
    events_at_end = (
        await api.trace.ListTraceEvents(t.ListTraceEventsRequest(run_id=job.id))
    ).events
    _, info, _ = await expect_error(
        api.attest.AttachAnnotations(attach("after", True)), grpc.StatusCode.FAILED_PRECONDITION
    )
    assert info is not None and info.reason == "RUN_ENDED"
    retried = await api.attest.AttachAnnotations(attach("before", True))
    assert [x.id for x in retried.annotations] == [x.id for x in before.annotations]
    quiet = await api.attest.AttachAnnotations(attach("quiet", False))
    assert len(quiet.annotations) == 1, "annotating an ended run without an event is fine"
    events = (await api.trace.ListTraceEvents(t.ListTraceEventsRequest(run_id=job.id))).events
    assert events == events_at_end
    keys = {
        x.idempotency_key
        for x in (
            await api.attest.ListAnnotations(a.ListAnnotationsRequest(run_id=job.id))
        ).annotations
    }
    assert keys == {"before", "quiet"}, "the refused attach stored nothing"


async def test_a_cancelled_queued_standalone_job_is_attested(harness: Harness) -> None:
    api = harness.stubs()
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="cq", request_context=ctx(), job=spec("nobody"))
        )
    ).job
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=job.id, reason="not needed"))
    (att,) = await attestations(api, job_id=job.id)
    assert att.key == f"worker-cancellation:{job.id}"
    assert att.type == a.ATTESTATION_TYPE_WORKER_CANCELLATION
    assert att.state == c.RUN_STATE_CANCELLED and att.entity_id == job.id
    assert att.chain_sequence == 1 and att.previous_digest == ""
    data = json_format.MessageToDict(att.data)
    assert data["cancellation"] == {"reason": "not needed", "code": "CANCELLED"}
    assert data["cancelled_while"] == "QUEUED" and data["job_payload"] == {"n": 1}
    assert data["request_context"]["user_context"]["user_id"] == "u-7"
    assert "base64," not in json.dumps(data), "sanitised like every attestation"
    verdict = await verify(api, att.key)
    assert verdict.valid and verdict.signature_valid and verdict.chain_valid, verdict.reason
    assert (await attestations(api, type=a.ATTESTATION_TYPE_WORKER_CANCELLATION)) == [att]


async def test_a_cancelled_running_standalone_job_is_attested_on_its_chain(
    harness: Harness,
) -> None:
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(
                request_id="cr",
                request_context=ctx(),
                job=c.JobSpec(
                    service="svc",
                    max_attempts=3,
                    backoff=c.BackoffPolicy(initial_interval={"nanos": 1_000_000}),
                ),
            )
        )
    ).job
    await raw.expect("assignment")
    await raw.send(
        fail=w.FailReport(
            job_id=job.id, attempt=1, retryable=True, error=c.ErrorDetail(message="flaky")
        )
    )
    await raw.expect("ack")
    await raw.expect("assignment")
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=job.id))
    await raw.expect("cancel")
    failure, cancelled = await attestations(api, job_id=job.id)
    assert failure.key == f"worker-failure:{job.id}:1"
    assert cancelled.key == f"worker-cancellation:{job.id}"
    assert cancelled.worker_id == "w1" and cancelled.attempt == 2
    assert cancelled.chain_sequence == 2 and cancelled.previous_digest == failure.digest
    data = json_format.MessageToDict(cancelled.data)
    assert data["cancelled_while"] == "RUNNING"
    assert data["cancellation"]["code"] == "CANCELLED"
    verdict = await verify(api, cancelled.key)
    assert verdict.valid and verdict.signature_valid and verdict.chain_valid, verdict.reason
    # A step's cancellation stays in its workflow's attestation alone.
    wf, only = await cancel_unstarted_workflow(api, "wf-c", service="no")
    assert only.key == f"workflow-cancellation:{wf.id}"
    await raw.close()


@pytest.mark.parametrize("recorded", [True, False], ids=["head-on-row", "row-before-0009"])
async def test_a_standalone_chain_continues_exactly_across_pruning(
    harness: Harness, recorded: bool
) -> None:
    """The job's row keeps its chain's head; a row from before it did (NULL)
    falls back to the attestations and the pruning records. Either way the
    next link follows the pruned one, and the row then records the head."""
    api = harness.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(
                request_id="pruned-chain",
                job=c.JobSpec(
                    service="svc", backoff=c.BackoffPolicy(initial_interval={"nanos": 1_000_000})
                ),
            )
        )
    ).job
    await raw.expect("assignment")
    await raw.send(
        fail=w.FailReport(
            job_id=job.id, attempt=1, retryable=True, error=c.ErrorDetail(message="flaky")
        )
    )
    await raw.expect("ack")
    [failure] = await attestations(api, job_id=job.id)
    rows = await execute_sql(
        harness.db_url, "SELECT chain_seq, chain_digest FROM jobs WHERE id = :id", id=job.id
    )
    assert tuple(rows[0]) == (1, failure.digest)
    if not recorded:
        await execute_sql(
            harness.db_url,
            "UPDATE jobs SET chain_seq = NULL, chain_digest = NULL WHERE id = :id",
            id=job.id,
        )
    await execute_sql(
        harness.db_url, "UPDATE attestations SET expire_us = 1 WHERE key = :k", k=failure.key
    )
    assert harness.server is not None
    assert await harness.server.attestor.sweep_once() == 1
    await raw.expect("assignment")
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=2))
    await raw.expect("ack")
    [completion] = await attestations(api, job_id=job.id)
    assert completion.chain_sequence == 2 and completion.previous_digest == failure.digest
    verdict = await verify(api, completion.key)
    assert verdict.valid and verdict.chain_valid and verdict.previous_pruned
    rows = await execute_sql(
        harness.db_url, "SELECT chain_seq, chain_digest FROM jobs WHERE id = :id", id=job.id
    )
    assert tuple(rows[0]) == (2, completion.digest)
    await raw.close()
