"""Client-side input: workflow files and mappings checked with field paths (an
InvalidInput, never protobuf's ParseError), the CLI's one-line errors, and
offline verification of exported attestations."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from jobtrace.client import (
    Client,
    InvalidArgument,
    InvalidInput,
    JobContext,
    JobtraceError,
    OfflineVerdict,
    verify_offline,
)
from jobtrace.client.workflow_file import SCHEMA, load_workflow
from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c

from .conftest import Harness, wait_for
from .procs import jobtrace
from .workers import runtime_worker


@pytest.fixture
async def client(sqlite_harness: Harness) -> AsyncIterator[Client]:
    async with Client(sqlite_harness.target) as jt:
        yield jt


def refusal(exc: pytest.ExceptionInfo[InvalidInput]) -> list[str]:
    return [f"{v.field}: {v.description}" for v in exc.value.violations]


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (
            {"name": "b", "service": "s", "max_attempts": 3},
            "steps[1].max_attempts: unknown field; did you mean steps[1].job.max_attempts?",
        ),
        (
            {"name": "b", "service": "s", "retry": {"max_attempts": 3}},
            "steps[1].retry.max_attempts: unknown field; did you mean steps[1].job.max_attempts?",
        ),
        (
            {"name": "b", "job": {"service": "s", "max_atempts": 3}},
            "steps[1].job.max_atempts: unknown field; did you mean steps[1].job.max_attempts?",
        ),
        (
            {"name": "b", "job": {"service": "s", "max_attempts": "3"}},
            "steps[1].job.max_attempts: must be an integer, got text ('3')",
        ),
        (
            {"name": "b", "job": {"service": "s", "timeout": "soon"}},
            'steps[1].job.timeout: must be a duration: seconds (a number) or text such as "1.5s",'
            " got text ('soon')",
        ),
        (
            {"name": "b", "service": "s", "depends_on": "a"},
            "steps[1].depends_on: must be a list, got text ('a')",
        ),
        (
            {"name": "b", "service": "s", "job": {"service": "t"}},
            "steps[1].service: given twice: here and as steps[1].job.service",
        ),
    ],
)
def test_a_workflow_file_is_checked_with_field_paths(step: dict[str, Any], expected: str) -> None:
    text = json.dumps({"name": "media", "steps": [{"name": "a", "service": "s"}, step]})
    with pytest.raises(InvalidInput) as refused:
        load_workflow(text, source="wf.yaml")
    assert refusal(refused) == [expected]
    assert str(refused.value) == f"wf.yaml: {expected}" and "\n" not in str(refused.value)
    assert isinstance(refused.value, JobtraceError) and isinstance(refused.value, ValueError)


def test_a_workflow_file_reports_every_problem_and_takes_yaml_shorthand() -> None:
    with pytest.raises(InvalidInput) as refused:
        load_workflow("nmae: x\nsteps: []\npriority: high\n")
    assert refusal(refused) == [
        "steps: required: a list of one or more steps",
        "name: required: the workflow's name",
        "nmae: unknown field; did you mean name?",
        "priority: must be an integer, got text ('high')",
    ]
    with pytest.raises(InvalidInput, match=r"not valid YAML/JSON: .* \(line 3, column 1\)$"):
        load_workflow("name: x\nsteps: [\n")
    workflow = load_workflow(
        "name: media\nlabels: {version: 2}\nsteps:\n"
        "  - {name: download, service: download, payload: {url: u}}\n"
        "  - name: transcode\n    job: {service: transcode, max_attempts: 2, timeout: 600}\n"
    )
    assert workflow.labels == {"version": "2"}
    assert workflow.steps[0] == {
        "name": "download",
        "job": {"service": "download", "payload": {"url": "u"}},
    }
    assert workflow.steps[1]["job"]["timeout"] == "600s"


async def test_mappings_given_to_the_client_are_refused_with_field_paths_and_nothing_is_sent(
    client: Client,
) -> None:
    with pytest.raises(InvalidInput) as refused:
        await client.submit_workflow(
            "media",
            [{"name": "a", "job": {"service": "s"}}, {"name": "b", "max_attempts": 2}],
        )
    assert refusal(refused) == [
        "steps[1].max_attempts: unknown field; did you mean steps[1].job.max_attempts?"
    ]
    with pytest.raises(InvalidArgument) as bad_actor:  # InvalidInput is an InvalidArgument
        await client.submit_job(
            "s",
            {},
            request_context={"user_context": {"user_id": 7}},
            annotations=[{"actor": {"kind": "robot"}, "attributes": {"trigger.source": "x"}}],
        )
    assert [str(v) for v in bad_actor.value.violations] == [
        "request_context.user_context.user_id: must be text (quote it), got a number (7)",
        "annotations[0].actor.kind: unknown value 'robot' (one of user, service, worker, "
        "system, plugin, reviewer, model)",
    ]
    with pytest.raises(InvalidInput, match=r"events\[0\]\.levle: unknown field; did you mean"):
        await client.append_trace_events("job_x", [{"message": "m", "levle": "info"}])
    with pytest.raises(InvalidInput, match=r"^attributes\['decision.outcome'\]: .*set"):
        await client.attach_annotations("job_x", {"decision.outcome": {"a", "b"}})
    assert not (await client.list_workflows()).items and not (await client.list_jobs()).items
    # Short enum names, JSON names and durations in seconds are understood.
    workflow = await client.submit_workflow(
        "media",
        [{"name": "a", "job": {"service": "s", "timeout": 5, "maxAttempts": 2}}],
        annotations=[
            {"actor": {"kind": "user", "id": "al"}, "attributes": {"trigger.source": "x"}}
        ],
    )
    job = await client.get_job(workflow.steps[0].job_id)
    assert job.spec.max_attempts == 2 and job.spec.timeout.seconds == 5


async def test_the_cli_prints_one_line_for_a_bad_workflow_file_and_documents_the_schema(
    sqlite_harness: Harness, tmp_path: Path
) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text(
        "name: media\nsteps:\n  - {name: download, service: download}\n"
        "  - name: transcode\n    service: transcode\n    max_attempts: 2\n"
    )
    code, out, err = await jobtrace("submit", "--workflow", str(path), target=sqlite_harness.target)
    assert code == 2 and out == ""
    assert err == (
        f"jobtrace submit: {path}: steps[1].max_attempts: unknown field; "
        "did you mean steps[1].job.max_attempts?\n"
    )
    code, out, _ = await jobtrace("submit", "--help")
    assert code == 0
    assert "A workflow file (YAML or JSON)" in out and "depends_on: [download]" in out


# --- offline verification --------------------------------------------------------


async def completed_job_attestation(client: Client, target: str) -> str:
    async def run(ctx: JobContext) -> dict[str, Any]:
        return {"bytes": 1048576}

    async with runtime_worker(target, {"transcode": run}):
        job = await client.submit_job("transcode", {"codec": "av1"})

        async def done() -> bool:
            return (await client.get_job(job.id)).state == c.RUN_STATE_COMPLETED

        await wait_for(done, timeout=10)
    return f"worker-completion:{job.id}"


def tampered(envelope: dict[str, Any]) -> dict[str, Any]:
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["predicate"]["data"]["job_payload"] = {"codec": "h264"}
    payload = json.dumps(statement).encode()
    return {**envelope, "payload": base64.b64encode(payload).decode()}


async def test_verify_offline_checks_a_real_envelope_and_catches_tampering(
    client: Client, sqlite_harness: Harness, tmp_path: Path
) -> None:
    key = await completed_job_attestation(client, sqlite_harness.target)
    keys = await client.get_signing_keys()
    envelope = await client.export_attestation(key)
    verdict = verify_offline(envelope, keys)
    assert isinstance(verdict, OfflineVerdict)
    assert verdict.valid and verdict.digest_valid and verdict.signature_valid, verdict.reason
    assert not verdict.chain_checked and verdict.key_id == keys[0].key_id
    assert verdict.statement["predicate"]["data"]["job_payload"] == {"codec": "av1"}

    # The envelope as GetAttestation returns it, and keys as PEM or hex text.
    api = sqlite_harness.stubs()
    response = await api.attest.GetAttestation(
        a.GetAttestationRequest(key=key, include_envelope=True)
    )
    assert verify_offline(response.envelope, [keys[0].public_key.hex()]).valid
    assert verify_offline(json.dumps(envelope), {"any": keys[0].public_key}).valid

    forged = verify_offline(tampered(envelope), keys)
    assert not forged.valid and not forged.digest_valid
    assert "no envelope signature verifies" in forged.reason
    assert "content does not hash to the attested digest" in forged.reason
    stranger = verify_offline(envelope, [bytes(32)])
    assert not stranger.valid and f"no public key {keys[0].key_id!r} given" in stranger.reason

    with pytest.raises(InvalidInput, match=r"^envelope\.payload must be a string \(got missing\)$"):
        verify_offline({"payloadType": "x", "signatures": []}, keys)
    with pytest.raises(InvalidInput, match=r"^public_keys\[0\]: not an Ed25519 public key"):
        verify_offline(envelope, ["not a key"])

    # The CLI checks the same envelope the same way (it shares jobtrace.dsse).
    (tmp_path / "env.json").write_text(json.dumps(tampered(envelope)))
    (tmp_path / "key.hex").write_text(keys[0].public_key.hex())
    code, out, _ = await jobtrace(
        "attest", "verify", str(tmp_path / "env.json"), "--public-key", str(tmp_path / "key.hex")
    )
    assert code == 1 and out.startswith("INVALID: no envelope signature verifies")


def test_the_example_workflow_files_pass_the_check() -> None:
    examples = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        workflow = load_workflow(path.read_text(), source=str(path))
        assert workflow.name and workflow.steps


def test_the_schema_in_submit_help_is_itself_a_valid_workflow_file() -> None:
    example = "\n".join(line[2:] for line in SCHEMA.splitlines() if line.startswith("  "))
    workflow = load_workflow(example)
    assert [s["name"] for s in workflow.steps] == [
        "download",
        "transcode",
        "notify",
        "audit",
        "thumbnail",
        "review",
    ]
    assert workflow.steps[1]["job"]["max_attempts"] == 2
    assert workflow.steps[5]["approval"]["approvers"]
    assert workflow.steps[4]["for_each"] == {"step": "download", "path": "frames"}
