"""Identity is recorded, not claimed: every write records the authenticated
subject that caused it (submitted_by / recorded_by) beside the actor the caller
names, and only reviewers make a reviewer's statements. Against a real server
with a tokens file and JWTs, on both backends."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import yaml
from google.protobuf import json_format, struct_pb2

from jobtrace.auth import hash_token
from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, wait_for
from .workers import RawWorker

SECRET = "identity-test-secret-of-at-least-32-bytes"
ISSUER = "https://issuer.test"
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]

# subject -> roles; every token is "tok-<subject>", all in tenant acme.
SUBJECTS = {
    "alice": ["submitter"],
    "bob": ["submitter", "reviewer"],
    "root": ["admin"],
    "w-plain": ["worker"],
    "w-reviewer": ["worker", "reviewer"],
}


def md(subject: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer tok-{subject}"),)


def jwt_md(sub: str, roles: list[str]) -> tuple[tuple[str, str], ...]:
    claims = {
        "sub": sub,
        "tenant": "acme",
        "roles": roles,
        "iss": ISSUER,
        "aud": "jobtrace",
        "exp": int(time.time()) + 300,
    }
    return (("authorization", "Bearer " + jwt.encode(claims, SECRET, algorithm="HS256")),)


def write_tokens(path: Path) -> None:
    entries = [
        {"sha256": hash_token(f"tok-{s}"), "subject": s, "tenant": "acme", "roles": roles}
        for s, roles in SUBJECTS.items()
    ]
    path.write_text(yaml.safe_dump({"tokens": entries}))


def secured_harness(db_url: str, tmp_path: Path, **settings: Any) -> Harness:
    tokens = tmp_path / "tokens.yaml"
    write_tokens(tokens)
    return Harness(
        db_url, tokens_file=str(tokens), jwt_secret=SECRET, jwt_issuer=ISSUER, **settings
    )


@pytest.fixture
async def secured(db_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    async with secured_harness(db_url, tmp_path) as h:
        yield h


def value(x: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    json_format.ParseDict(x, v)
    return v


def annotation_input(kind: int, actor_id: str, **attrs: Any) -> c.AnnotationInput:
    return c.AnnotationInput(
        actor=c.Actor(kind=kind, id=actor_id),
        attributes={k: value(v) for k, v in attrs.items()},
    )


async def events(api: Stubs, run_id: str, meta: Any = None) -> list[c.TraceEvent]:
    request = t.ListTraceEventsRequest(run_id=run_id, page_size=1000, view=t.TRACE_EVENT_VIEW_FULL)
    return list((await api.trace.ListTraceEvents(request, metadata=meta)).events)


async def notes(api: Stubs, run_id: str, meta: Any = None) -> list[c.Annotation]:
    request = a.ListAnnotationsRequest(run_id=run_id, page_size=1000)
    return list((await api.attest.ListAnnotations(request, metadata=meta)).annotations)


async def attestation(api: Stubs, key: str, meta: Any = None) -> a.Attestation:
    found = await api.attest.GetAttestation(a.GetAttestationRequest(key=key), metadata=meta)
    verdict = await api.attest.VerifyAttestation(a.VerifyAttestationRequest(key=key), metadata=meta)
    assert verdict.valid, verdict.reason  # the subject is inside what the signature covers
    return found.attestation


async def job_state(api: Stubs, job_id: str, state: int, meta: Any = None) -> c.Job | None:
    job = (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id), metadata=meta)).job
    return job if job.state == state else None


async def denied(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    return caught.value


# --- who is recorded -----------------------------------------------------------


async def test_every_write_records_the_authenticated_subject(secured: Harness) -> None:
    api = secured.stubs()
    alice, bob, root = md("alice"), md("bob"), md("root")
    submitted = await api.jobs.SubmitJob(
        j.SubmitJobRequest(
            request_id="r1",
            job=c.JobSpec(service="svc"),
            annotations=[annotation_input(c.ACTOR_KIND_USER, "carol", **{"trigger.source": "ui"})],
        ),
        metadata=alice,
    )
    job = submitted.job
    assert job.submitted_by == "alice"
    assert (
        await api.jobs.GetJob(j.GetJobRequest(job_id=job.id), metadata=root)
    ).job.submitted_by == ("alice")
    [note] = await notes(api, job.id, alice)
    # The claimed actor stays as claimed, the authenticated subject beside it.
    assert (note.actor.kind, note.actor.id, note.recorded_by) == (
        c.ACTOR_KIND_USER,
        "carol",
        "alice",
    )

    appended = await api.trace.AppendTraceEvents(
        t.AppendTraceEventsRequest(
            run_id=job.id, events=[c.TraceEvent(event_key="k1", message="hello")]
        ),
        metadata=bob,
    )
    assert appended.events[0].recorded_by == "bob"

    worker = RawWorker(api, metadata=md("w-plain"))
    await worker.hello("w1", ["svc"])
    assignment = await worker.expect("assignment")
    assert assignment.job.id == job.id
    await worker.send(
        trace=w.TraceReport(
            job_id=job.id, attempt=1, events=[c.TraceEvent(event_key="wk", message="working")]
        )
    )
    await worker.expect("ack")
    await worker.send(
        annotate=w.AnnotationReport(
            job_id=job.id, attempt=1, attributes={"decision.outcome": value("resized")}
        )
    )
    await worker.expect("ack")
    await worker.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
    await worker.expect("ack")
    await worker.close()

    by_message = {e.message: e for e in await events(api, job.id, alice)}
    assert by_message["hello"].recorded_by == "bob"
    assert by_message["working"].recorded_by == "w-plain"
    started = next(e for e in by_message.values() if e.type == c.TRACE_EVENT_TYPE_STARTED)
    completed = next(e for e in by_message.values() if e.type == c.TRACE_EVENT_TYPE_COMPLETED)
    assert (started.recorded_by, completed.recorded_by) == ("w-plain", "w-plain")
    worker_note = next(n for n in await notes(api, job.id, alice) if n.key == "decision.outcome")
    assert worker_note.recorded_by == "w-plain"
    assert worker_note.actor.kind == c.ACTOR_KIND_WORKER  # the worker's default actor, kept

    done = await attestation(api, f"worker-completion:{job.id}", alice)
    assert done.recorded_by == "w-plain"
    assert done.data["recorded_by"] == "w-plain"

    # A reviewer's annotation with an event: both record the reviewer.
    attached = await api.attest.AttachAnnotations(
        a.AttachAnnotationsRequest(
            run_id=job.id,
            actor=c.Actor(kind=c.ACTOR_KIND_REVIEWER, id="claimed-approver"),
            attributes={"approval.disposition": value("approved")},
            emit_event=False,
        ),
        metadata=bob,
    )
    assert [(x.actor.id, x.recorded_by) for x in attached.annotations] == [
        ("claimed-approver", "bob")
    ]


async def test_workflows_and_cancellations_record_who_caused_them(secured: Harness) -> None:
    api = secured.stubs()
    alice, bob = md("alice"), md("bob")
    submitted = await api.jobs.SubmitWorkflow(
        j.SubmitWorkflowRequest(
            request_id="wf",
            name="flow",
            steps=[c.WorkflowStepSpec(name="one", job=c.JobSpec(service="nobody"))],
            annotations=[annotation_input(c.ACTOR_KIND_SERVICE, "api", **{"trigger.source": "x"})],
        ),
        metadata=alice,
    )
    wf = submitted.workflow
    assert wf.submitted_by == "alice"
    got = (
        await api.jobs.GetWorkflow(j.GetWorkflowRequest(workflow_id=wf.id), metadata=bob)
    ).workflow
    assert got.submitted_by == "alice"
    step = (await api.jobs.GetJob(j.GetJobRequest(job_id=wf.steps[0].job_id), metadata=bob)).job
    assert step.submitted_by == "alice"
    [note] = await notes(api, wf.id, bob)
    assert note.recorded_by == "alice"

    # bob cancels what alice submitted: the cancellation is bob's.
    await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=wf.id), metadata=bob)
    ended = [e for e in await events(api, wf.id, alice) if e.node_id == "workflow"]
    assert ended and all(e.recorded_by == "bob" for e in ended)
    cancelled = await attestation(api, f"workflow-cancellation:{wf.id}", alice)
    assert cancelled.recorded_by == "bob" and cancelled.data["recorded_by"] == "bob"

    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="lone", job=c.JobSpec(service="nobody")), metadata=alice
        )
    ).job
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=job.id), metadata=bob)
    [event] = await events(api, job.id, alice)
    assert event.recorded_by == "bob"
    cancelled = await attestation(api, f"worker-cancellation:{job.id}", alice)
    assert cancelled.recorded_by == "bob" and cancelled.data["recorded_by"] == "bob"


async def test_the_server_s_own_actions_are_recorded_as_system(db_url: str, tmp_path: Path) -> None:
    async with secured_harness(db_url, tmp_path, lease_seconds=1.0, heartbeat_seconds=0.2) as h:
        api = h.stubs()
        alice = md("alice")
        job = (
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="e", job=c.JobSpec(service="svc", max_attempts=2)),
                metadata=alice,
            )
        ).job
        silent = RawWorker(api, metadata=md("w-plain"))
        await silent.hello("w1", ["svc"])
        await silent.expect("assignment")
        # No heartbeat: the lease expires and the server fails the attempt.
        await wait_for(lambda: job_state(api, job.id, c.RUN_STATE_QUEUED, alice), timeout=20)
        failed = [
            e for e in await events(api, job.id, alice) if e.type == c.TRACE_EVENT_TYPE_FAILED
        ]
        assert [e.recorded_by for e in failed] == ["system"]
        attested = await attestation(api, f"worker-failure:{job.id}:1", alice)
        assert attested.recorded_by == "system" and attested.data["recorded_by"] == "system"
        await silent.close()


async def test_without_auth_the_subject_is_anonymous(harness: Harness) -> None:
    api = harness.stubs()
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(
                request_id="a",
                job=c.JobSpec(service="svc"),
                annotations=[
                    annotation_input(c.ACTOR_KIND_USER, "dave", **{"trigger.source": "x"})
                ],
            )
        )
    ).job
    assert job.submitted_by == "anonymous"
    worker = RawWorker(api)
    await worker.hello("w1", ["svc"])
    await worker.expect("assignment")
    await worker.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
    await worker.expect("ack")
    await worker.close()
    [note] = await notes(api, job.id)
    assert (note.actor.id, note.recorded_by) == ("dave", "anonymous")
    assert {e.recorded_by for e in await events(api, job.id)} == {"anonymous"}
    done = await attestation(api, f"worker-completion:{job.id}")
    assert done.recorded_by == "anonymous" and done.data["recorded_by"] == "anonymous"


# --- only reviewers approve ----------------------------------------------------------


async def test_only_reviewers_may_approve_or_act_as_reviewer(secured: Harness) -> None:
    api = secured.stubs()
    alice = md("alice")
    run = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="base", job=c.JobSpec(service="nobody")), metadata=alice
        )
    ).job

    def attach(meta: Any, kind: int = c.ACTOR_KIND_USER, **attrs: Any) -> Any:
        return api.attest.AttachAnnotations(
            a.AttachAnnotationsRequest(
                run_id=run.id,
                actor=c.Actor(kind=kind, id="someone"),
                attributes={k: value(v) for k, v in attrs.items()},
                emit_event=True,
            ),
            metadata=meta,
        )

    err = await denied(attach(alice, **{"approval.x": "yes", "decision.outcome": "ok"}))
    assert "approval.x" in (err.details() or "") and "reviewer" in (err.details() or "")
    err = await denied(attach(alice, c.ACTOR_KIND_REVIEWER, **{"decision.outcome": "ok"}))
    assert "ACTOR_KIND_REVIEWER" in (err.details() or "") and "reviewer" in (err.details() or "")
    await denied(attach(jwt_md("jwt-alice", ["submitter"]), **{"approval.x": "yes"}))
    # Nothing of a refused write is stored: no annotation, no event.
    assert await notes(api, run.id, alice) == []
    assert await events(api, run.id, alice) == []

    # At submission too, and nothing is stored then either.
    await denied(
        api.jobs.SubmitJob(
            j.SubmitJobRequest(
                request_id="sub-denied",
                job=c.JobSpec(service="svc"),
                annotations=[
                    annotation_input(c.ACTOR_KIND_USER, "u", **{"approval.disposition": "approved"})
                ],
            ),
            metadata=alice,
        )
    )
    await denied(
        api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="wf-denied",
                name="flow",
                steps=[c.WorkflowStepSpec(name="one", job=c.JobSpec(service="svc"))],
                annotations=[
                    annotation_input(c.ACTOR_KIND_REVIEWER, "u", **{"decision.outcome": "ok"})
                ],
            ),
            metadata=alice,
        )
    )
    listed = await api.jobs.ListJobs(j.ListJobsRequest(), metadata=alice)
    assert [x.id for x in listed.jobs] == [run.id]
    assert not (await api.jobs.ListWorkflows(j.ListWorkflowsRequest(), metadata=alice)).workflows

    # A reviewer (tokens file or JWT) and an admin may.
    for who, meta in [
        ("bob", md("bob")),
        ("jwt-bob", jwt_md("jwt-bob", ["submitter", "reviewer"])),
        ("root", md("root")),
    ]:
        stored = (
            await attach(
                meta, c.ACTOR_KIND_REVIEWER, **{f"approval.by_{who.replace('-', '_')}": True}
            )
        ).annotations
        assert [x.recorded_by for x in stored] == [who]
    # Their annotation notes (emit_event) record them too.
    assert [e.recorded_by for e in await events(api, run.id, alice)] == ["bob", "jwt-bob", "root"]
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(
                request_id="sub-ok",
                job=c.JobSpec(service="nobody"),
                annotations=[
                    annotation_input(
                        c.ACTOR_KIND_REVIEWER, "u", **{"approval.disposition": "approved"}
                    )
                ],
            ),
            metadata=md("bob"),
        )
    ).job
    assert [(n.key, n.recorded_by) for n in await notes(api, job.id, alice)] == [
        ("approval.disposition", "bob")
    ]


async def test_a_worker_without_the_reviewer_role_may_not_approve(secured: Harness) -> None:
    api = secured.stubs()
    alice = md("alice")
    for worker_subject, allowed in [("w-plain", False), ("w-reviewer", True)]:
        job = (
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id=worker_subject, job=c.JobSpec(service="svc")),
                metadata=alice,
            )
        ).job
        worker = RawWorker(api, metadata=md(worker_subject))
        await worker.hello("w1", ["svc"])
        await worker.expect("assignment")
        for attrs, actor in [
            ({"approval.disposition": value("approved")}, None),
            ({"decision.outcome": value("ok")}, c.Actor(kind=c.ACTOR_KIND_REVIEWER, id="me")),
        ]:
            mid = await worker.send(
                annotate=w.AnnotationReport(job_id=job.id, attempt=1, attributes=attrs, actor=actor)
            )
            if allowed:
                assert (await worker.expect("ack")).message_id == mid
            else:
                error = await worker.expect("error")
                assert (error.message_id, error.code) == (mid, PERMISSION_DENIED)
                assert error.reason == "ROLE_REQUIRED" and not error.fatal
                assert "reviewer" in error.message and error.message_kind == "annotate"
        # The stream goes on: the attempt completes, with only what was allowed.
        await worker.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
        await worker.expect("ack")
        await worker.close()
        stored = [(n.key, n.recorded_by) for n in await notes(api, job.id, alice)]
        if allowed:
            assert sorted(stored) == [
                ("approval.disposition", "w-reviewer"),
                ("decision.outcome", "w-reviewer"),
            ]
        else:
            assert stored == []


async def test_reserved_subjects_cannot_be_claimed_by_a_token(db_url: str, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        yaml.safe_dump(
            {"tokens": [{"sha256": hash_token("t"), "subject": "system", "tenant": "acme"}]}
        )
    )
    with pytest.raises(OSError, match="reserved"):
        await Harness(db_url, tokens_file=str(tokens)).start()
    async with secured_harness(db_url, tmp_path) as h:
        api = h.stubs()
        for sub in ("system", "anonymous"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await api.jobs.ListJobs(j.ListJobsRequest(), metadata=jwt_md(sub, ["reader"]))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_rows_stored_before_the_upgrade_record_nobody(db_url: str) -> None:
    """Revision 0008 adds the columns; what was stored before shows '' (unknown)."""
    from .test_worker_stream import migrate_down

    h = Harness(db_url)
    await h.start()
    api = h.stubs()
    old = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(
                request_id="old",
                job=c.JobSpec(service="nobody"),
                annotations=[annotation_input(c.ACTOR_KIND_USER, "u", **{"trigger.source": "x"})],
            )
        )
    ).job
    await api.jobs.CancelJob(j.CancelJobRequest(job_id=old.id))
    await h.stop()
    await migrate_down(db_url, "0007")
    await h.start()  # migrates up again
    try:
        api = h.stubs()
        job = (await api.jobs.GetJob(j.GetJobRequest(job_id=old.id))).job
        assert job.submitted_by == ""
        assert [n.recorded_by for n in await notes(api, old.id)] == [""]
        assert [e.recorded_by for e in await events(api, old.id)] == [""]
        # Its attestation keeps the data it was signed with (recorded_by in it,
        # as this server wrote it): its own digest and signature still hold and
        # the column is unknown. The annotation it vouches for lost who recorded
        # it with the downgrade, and verification says exactly that.
        key = f"worker-cancellation:{old.id}"
        cancelled = (await api.attest.GetAttestation(a.GetAttestationRequest(key=key))).attestation
        assert cancelled.recorded_by == ""
        assert cancelled.data["recorded_by"] == "anonymous"
        verdict = await api.attest.VerifyAttestation(a.VerifyAttestationRequest(key=key))
        assert verdict.signature_valid and verdict.digest_valid and verdict.chain_valid
        (note,) = await notes(api, old.id)
        assert not verdict.valid and list(verdict.changed_annotation_ids) == [note.id]
        new = (
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="new", job=c.JobSpec(service="nobody"))
            )
        ).job
        assert new.submitted_by == "anonymous"
    finally:
        await h.stop()


# --- the CLI --------------------------------------------------------------------------


async def test_cli_makes_reviewer_tokens_and_shows_who_is_recorded(
    sqlite_url: str, tmp_path: Path
) -> None:
    from .procs import jobtrace

    code, _, err = await jobtrace(
        "token", "new", "--subject", "system", "--tenant", "acme", "--roles", "admin"
    )
    assert code == 2 and "reserved" in err
    code, out, _ = await jobtrace(
        "token", "new", "--subject", "rev", "--tenant", "acme", "--roles", "submitter,reviewer"
    )
    assert code == 0
    tok = out.splitlines()[0].rsplit(" ", 1)[1]
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(out)
    async with Harness(sqlite_url, tokens_file=str(tokens)) as h:
        api = h.stubs()
        meta = (("authorization", f"Bearer {tok}"),)
        job = (
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(
                    request_id="cli",
                    job=c.JobSpec(service="nobody"),
                    annotations=[
                        annotation_input(
                            c.ACTOR_KIND_REVIEWER, "x", **{"approval.disposition": "approved"}
                        )
                    ],
                ),
                metadata=meta,
            )
        ).job
        code, out, _ = await jobtrace("get", job.id, "--token", tok, target=h.target)
        assert code == 0 and any(
            line.split() == ["submitter", "rev"] for line in out.splitlines()
        ), out
        code, out, _ = await jobtrace("annotations", job.id, "--token", tok, target=h.target)
        header, row = out.splitlines()[:2]
        assert "RECORDED BY" in header and "reviewer:x" in row and " rev " in row, out
