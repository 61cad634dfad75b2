"""The annotation conventions: every typed key checked on every path that accepts
annotations, retired keys refused with their replacement, and the client's
jobtrace.conventions in step with the server's table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2

from jobtrace import conventions as cv
from jobtrace.client import Client, InvalidArgument, JobContext, RetryPolicy
from jobtrace.domain import conventions as server_rules
from jobtrace.domain.errors import Violations
from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, expect_error
from .procs import jobtrace
from .workers import RawWorker, runtime_worker

STRING = "must be a non-empty string"
BOOLEAN = "must be a boolean"
RUN_ID = "must be a run id: a non-empty string of at most 256 printable characters"
NO_SPACES = "must be a run id: a string without spaces"
CONFIDENCE = "must be a number in [0, 1]"
ARRAY = "must be an array"
APPROVERS = "must be a non-empty array of non-empty strings"
DISPOSITION = "must be 'approved' or 'rejected'"
TIMESTAMP = "must be an RFC 3339 timestamp with an offset, e.g. '2026-05-01T12:00:00Z'"
NON_NEGATIVE = "must be a non-negative integer"

# key: (values it accepts, [(a value it refuses, the violation's description)])
CASES: dict[str, tuple[list[Any], list[tuple[Any, str]]]] = {
    "trigger.source": (["schedule"], [("", STRING), (3, STRING), (None, STRING)]),
    "trigger.reason": (["nightly rebuild"], [(True, STRING), (["x"], STRING)]),
    "trigger.parent_run_id": (
        ["wf_01JABCDEF", "job_7"],
        [("", RUN_ID), (12, RUN_ID), ("wf 1", NO_SPACES), ("r" * 257, RUN_ID)],
    ),
    "trigger.actor.id": (["alice"], [({"id": "alice"}, STRING)]),
    "decision.outcome": (["approve"], [("", STRING), (None, STRING)]),
    "decision.rationale": (["matches policy 4.2"], [(0.5, STRING)]),
    "decision.confidence": (
        [0, 0.92, 1],
        [(1.5, CONFIDENCE), (-0.1, CONFIDENCE), ("0.9", CONFIDENCE), (True, CONFIDENCE)],
    ),
    "decision.alternatives": (
        [["reject", "escalate"], [], [{"option": "defer", "score": 0.2}]],
        [("reject", ARRAY), ({"a": 1}, ARRAY)],
    ),
    "decision.used_fallback": ([True, False], [("false", BOOLEAN), (0, BOOLEAN)]),
    "approval.approvers": (
        [["alice"], ["alice", "bob"]],
        [
            ([], APPROVERS),
            ("alice", APPROVERS),
            (["alice", ""], APPROVERS + " (item 1 is not)"),
            ([7], APPROVERS + " (item 0 is not)"),
        ],
    ),
    "approval.disposition": (
        ["approved", "rejected"],
        [("yes", DISPOSITION), ("Approved", DISPOSITION), (True, DISPOSITION)],
    ),
    "approval.timestamp": (
        ["2026-05-01T12:00:00Z", "2026-05-01T14:00:00.123+02:00", "2016-12-31t23:59:60z"],
        [
            ("2026-05-01T12:00:00", TIMESTAMP),  # no offset
            ("2026-05-01", TIMESTAMP),
            ("2026-02-30T12:00:00Z", TIMESTAMP),
            ("2026-05-01T24:00:00Z", TIMESTAMP),
            ("2026-05-01T12:00:00+25:00", TIMESTAMP),
            ("yesterday", TIMESTAMP),
            (1714564800, TIMESTAMP),
        ],
    ),
    "approval.policy.version": (["v3"], [(3, STRING)]),
    "revision.number": (
        [0, 7, 2**53],
        [(-1, NON_NEGATIVE), (2.5, NON_NEGATIVE), ("3", NON_NEGATIVE), (True, NON_NEGATIVE)],
    ),
    "revision.parent": (["rev_6"], [("", STRING)]),
    "failure.kind": (["timeout"], [(["timeout"], STRING)]),
    "failure.retryable": ([False], [("yes", BOOLEAN)]),
}

RETIRED = {
    "decision.reason": ("why", "decision.reason was renamed decision.rationale"),
    "approval.approver": ("alice", "approval.approver was replaced by approval.approvers"),
    "approval.approved": (True, "approval.approved was replaced by approval.disposition"),
    "failure.category": ("network", "failure.category was renamed failure.kind"),
    "trigger.type": ("webhook", "trigger.type was replaced by trigger.source"),
}


def value(x: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    json_format.ParseDict(x, v)
    return v


def server_problem(key: str, x: Any) -> str | None:
    v = Violations()
    server_rules.check_key_value(v, "k", key, x)
    assert len(v.items) <= 1
    return v.items[0].description if v.items else None


def actor(id: str = "svc-a") -> c.Actor:
    return c.Actor(kind=c.ACTOR_KIND_SERVICE, id=id)


async def attach(api: Stubs, run_id: str, attrs: dict[str, Any]) -> list[c.Annotation]:
    response = await api.attest.AttachAnnotations(
        a.AttachAnnotationsRequest(
            run_id=run_id, actor=actor(), attributes={k: value(x) for k, x in attrs.items()}
        )
    )
    return list(response.annotations)


async def stored(api: Stubs, run_id: str) -> list[tuple[str, Any]]:
    page = await api.attest.ListAnnotations(a.ListAnnotationsRequest(run_id=run_id, page_size=1000))
    return [(x.key, json_format.MessageToDict(x.value)) for x in page.annotations]


async def new_job(api: Stubs, request_id: str = "r") -> c.Job:
    return (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id=request_id, job=c.JobSpec(service="svc"))
        )
    ).job


# --- one source of truth --------------------------------------------------------


def test_the_client_names_exactly_the_keys_the_server_types() -> None:
    assert set(cv.KEYS) == set(server_rules.WELL_KNOWN)
    assert set(cv.RENAMED) == set(server_rules.RENAMED)
    for old, new in cv.RENAMED.items():
        assert new in cv.KEYS and new in server_rules.RENAMED[old], (old, new)
    assert set(CASES) == set(cv.KEYS), "every key has a case below"
    assert (cv.Decision.confidence, cv.Trigger.actor_id, cv.Approval.policy_version) == (
        "decision.confidence",
        "trigger.actor.id",
        "approval.policy.version",
    )
    assert len(cv.KEYS) == 17


def test_the_client_checks_a_value_as_the_server_does() -> None:
    for key, (good, bad) in CASES.items():
        for x in good:
            assert server_problem(key, x) is None, (key, x)
            assert cv.check(key, x) is None, (key, x)
        for x, description in bad:
            assert server_problem(key, x) == description, (key, x)
            assert cv.check(key, x) == description, (key, x)
    for key in RETIRED:
        assert cv.check(key, "anything") == f"was replaced by {cv.RENAMED[key]}"
    assert cv.check("review.note", {"any": "thing"}) is None


def test_the_builders_refuse_what_the_server_would() -> None:
    assert cv.decision(outcome="approve", confidence=0.9, alternatives=("reject",)) == {
        "decision.outcome": "approve",
        "decision.confidence": 0.9,
        "decision.alternatives": ["reject"],
    }
    when = datetime(2026, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    assert cv.approval(disposition="approved", approvers=["alice"], timestamp=when) == {
        "approval.disposition": "approved",
        "approval.approvers": ["alice"],
        "approval.timestamp": "2026-05-01T14:00:00+02:00",
    }
    refused: list[tuple[Any, str]] = [
        (lambda: cv.decision(confidence=1.2), "decision.confidence"),
        (lambda: cv.decision(alternatives="reject"), "decision.alternatives"),
        (lambda: cv.approval(disposition="approved", approvers="alice"), "approval.approvers"),
        (lambda: cv.approval(disposition="ok", approvers=["a"]), "approval.disposition"),  # type: ignore[arg-type]
        (
            lambda: cv.approval(
                disposition="rejected", approvers=["a"], timestamp=datetime(2026, 5, 1)
            ),
            "approval.timestamp",
        ),
        (lambda: cv.revision(number=-1), "revision.number"),
        (lambda: cv.trigger(parent_run_id="wf 1"), "trigger.parent_run_id"),
        (lambda: cv.failure(kind=""), "failure.kind"),
    ]
    for build, key in refused:
        with pytest.raises(cv.ConventionError) as caught:
            build()
        assert caught.value.key == key
    with pytest.raises(ValueError, match="at least one field"):
        cv.decision()


# --- through the real server ------------------------------------------------------


async def test_each_convention_key_accepts_its_type_and_refuses_others(api: Stubs) -> None:
    job = await new_job(api)
    expected: list[tuple[str, Any]] = []
    for key, (good, bad) in CASES.items():
        for x, description in bad:
            _, _, violations = await expect_error(
                attach(api, job.id, {key: x}), grpc.StatusCode.INVALID_ARGUMENT
            )
            assert violations == [(f"attributes['{key}']", description)], (key, x)
        for x in good:
            (note,) = await attach(api, job.id, {key: x})
            assert (note.key, json_format.MessageToDict(note.value)) == (key, x)
            expected.append((key, x))
    assert await stored(api, job.id) == expected, "each refusal stored nothing"
    # One bad key refuses the whole request, its good keys included.
    _, _, violations = await expect_error(
        attach(api, job.id, {"decision.outcome": "approve", "approval.disposition": "maybe"}),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert violations == [("attributes['approval.disposition']", DISPOSITION)]
    assert await stored(api, job.id) == expected


async def test_retired_keys_are_refused_with_their_replacement_on_every_path(
    harness: Harness,
) -> None:
    api = harness.stubs()
    job = await new_job(api, "first")
    for key, (x, hint) in RETIRED.items():
        err, _, violations = await expect_error(
            attach(api, job.id, {key: x}), grpc.StatusCode.INVALID_ARGUMENT
        )
        ((field, description),) = violations
        assert field == f"attributes['{key}']" and description.startswith(hint)
        assert hint in (err.details() or "")
    assert await stored(api, job.id) == []

    old = c.AnnotationInput(
        actor=actor(), attributes={k: value(x) for k, (x, _) in RETIRED.items()}
    )
    submission = j.SubmitJobRequest(
        request_id="with-old-keys", job=c.JobSpec(service="svc"), annotations=[old]
    )
    _, _, violations = await expect_error(
        api.jobs.SubmitJob(submission), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert sorted(violations) == sorted(
        (f"annotations[0].attributes['{k}']", server_rules.RENAMED[k]) for k in RETIRED
    )
    jobs = await api.jobs.ListJobs(j.ListJobsRequest(page_size=100))
    assert [x.id for x in jobs.jobs] == [job.id], "the refused submission created nothing"

    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    assert (await raw.expect("assignment")).job.id == job.id
    await raw.send(
        annotate=w.AnnotationReport(
            job_id=job.id, attempt=1, attributes={"approval.approved": value(True)}
        )
    )
    refused = await raw.expect("error")
    assert (
        refused.message_kind == "annotate"
        and refused.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    )
    assert "approval.approved was replaced by approval.disposition" in refused.message
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
    await raw.expect("ack")
    assert await stored(api, job.id) == []
    await raw.close()


async def test_submission_and_worker_annotations_are_checked_like_attached_ones(
    harness: Harness,
) -> None:
    api = harness.stubs()

    def submission(attributes: dict[str, Any]) -> j.SubmitJobRequest:
        note = c.AnnotationInput(
            actor=actor(), attributes={k: value(x) for k, x in attributes.items()}
        )
        return j.SubmitJobRequest(request_id="s", job=c.JobSpec(service="svc"), annotations=[note])

    _, _, violations = await expect_error(
        api.jobs.SubmitJob(
            submission({"trigger.source": "webhook", "trigger.parent_run_id": "wf 1"})
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert violations == [("annotations[0].attributes['trigger.parent_run_id']", NO_SPACES)]
    # The same request id, fixed: the refused one left nothing behind to conflict with.
    job = (
        await api.jobs.SubmitJob(
            submission({"trigger.source": "webhook", "trigger.parent_run_id": "wf_1"})
        )
    ).job
    assert await stored(api, job.id) == [
        ("trigger.parent_run_id", "wf_1"),
        ("trigger.source", "webhook"),
    ]

    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    await raw.expect("assignment")
    bad = {"approval.timestamp": "2026-05-01T12:00:00", "revision.number": 1.5}
    await raw.send(
        annotate=w.AnnotationReport(
            job_id=job.id, attempt=1, attributes={k: value(x) for k, x in bad.items()}
        )
    )
    refused = await raw.expect("error")
    assert f"annotate.attributes['approval.timestamp']: {TIMESTAMP}" in refused.message
    assert f"annotate.attributes['revision.number']: {NON_NEGATIVE}" in refused.message
    good = {"approval.timestamp": "2026-05-01T12:00:00Z", "revision.number": 2}
    await raw.send(
        annotate=w.AnnotationReport(
            job_id=job.id, attempt=1, attributes={k: value(x) for k, x in good.items()}
        )
    )
    await raw.expect("ack")
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
    await raw.expect("ack")
    assert await stored(api, job.id) == [
        ("trigger.parent_run_id", "wf_1"),
        ("trigger.source", "webhook"),
        ("approval.timestamp", "2026-05-01T12:00:00Z"),
        ("revision.number", 2),
    ]
    await raw.close()


async def test_the_client_constants_and_builders_work_with_the_real_client(
    sqlite_harness: Harness,
) -> None:
    async def handler(job: JobContext) -> dict[str, Any]:
        await job.annotate(cv.failure(kind="flaky-upstream", retryable=True))
        return {}

    alice = {"kind": "ACTOR_KIND_USER", "id": "alice"}
    async with Client(sqlite_harness.target, retry=RetryPolicy(attempts=3)) as client:
        async with runtime_worker(sqlite_harness.target, {"svc": handler}, worker_id="w1"):
            job = await client.submit_job(
                "svc",
                annotations=[
                    {
                        "actor": alice,
                        "attributes": cv.trigger(source="api", actor_id="alice"),
                    }
                ],
            )
            done = [x async for x in client.watch_job(job.id)][-1]
        assert done.state == c.RUN_STATE_COMPLETED
        when = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
        notes = await client.attach_annotations(
            job.id,
            {
                **cv.decision(outcome="ship", confidence=0.92, used_fallback=False),
                **cv.approval(
                    disposition="approved",
                    approvers=["alice", "bob"],
                    timestamp=when,
                    policy_version="v3",
                ),
                cv.Revision.number: 3,
            },
            actor=alice,
        )
        assert len(notes) == 8
        got = {
            x.key: json_format.MessageToDict(x.value)
            for x in (await client.list_annotations(job.id)).items
        }
        assert got == {
            cv.Trigger.source: "api",
            cv.Trigger.actor_id: "alice",
            cv.Failure.kind: "flaky-upstream",
            cv.Failure.retryable: True,
            cv.Decision.outcome: "ship",
            cv.Decision.confidence: 0.92,
            cv.Decision.used_fallback: False,
            cv.Approval.disposition: "approved",
            cv.Approval.approvers: ["alice", "bob"],
            cv.Approval.timestamp: "2026-05-01T12:00:00+00:00",
            cv.Approval.policy_version: "v3",
            cv.Revision.number: 3,
        }
        with pytest.raises(InvalidArgument) as caught:
            await client.attach_annotations(
                job.id,
                {"decision.reason": "legacy client"},
                actor=alice,
            )
        assert [str(v) for v in caught.value.violations] == [
            "attributes['decision.reason']: decision.reason was renamed decision.rationale"
        ]


async def test_the_cli_annotates_with_convention_keys(sqlite_harness: Harness) -> None:
    api = sqlite_harness.stubs()
    job = await new_job(api)
    target = sqlite_harness.target
    code, _, err = await jobtrace(
        "annotate",
        job.id,
        "approval.policy.version=3",  # typed as text: stays the string "3"
        'approval.approvers=["alice"]',
        "approval.disposition=approved",
        "revision.number=4",
        "--actor",
        "user:alice",
        "--json",
        target=target,
    )
    assert code == 0, err
    assert sorted(await stored(api, job.id)) == [
        ("approval.approvers", ["alice"]),
        ("approval.disposition", "approved"),
        ("approval.policy.version", "3"),
        ("revision.number", 4),
    ]
    code, _, err = await jobtrace(
        "annotate", job.id, "failure.category=network", "--actor", "user:alice", target=target
    )
    assert code != 0 and "failure.category was renamed failure.kind" in err
    assert len(await stored(api, job.id)) == 4
