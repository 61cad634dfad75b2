"""Hostile files given to the command line: `jobtrace attest verify` on malformed
envelopes answers one line on stderr and a non-zero exit code, never a traceback."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from jobtrace.cli import main
from jobtrace.client.api import envelope_json
from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j

from .conftest import Harness
from .procs import jobtrace


def b64(raw: bytes | str) -> str:
    return base64.b64encode(raw.encode() if isinstance(raw, str) else raw).decode()


def malformed_envelopes(envelope: dict[str, Any]) -> list[tuple[str, bytes]]:
    """(what, file content): every one is not the shape `jobtrace attest export` writes."""
    statement = json.loads(base64.b64decode(envelope["payload"]))

    def with_envelope(**changes: Any) -> bytes:
        changed = dict(envelope, **changes)
        return json.dumps({k: v for k, v in changed.items() if v is not ...}).encode()

    def with_statement(change: Any) -> bytes:
        doc = copy.deepcopy(statement)
        change(doc)
        return with_envelope(payload=b64(json.dumps(doc)))

    sig = envelope["signatures"][0]
    return [
        ("not JSON", b"{not json"),
        ("an empty file", b""),
        ("not UTF-8", b"\xff\xfe\x00garbage"),
        ("a JSON list", json.dumps([envelope]).encode()),
        ("a JSON number", b"42"),
        ("a JSON string", b'"envelope"'),
        ("JSON null", b"null"),
        ("nested too deeply", b"[" * 100_000),
        ("no payload", with_envelope(payload=...)),
        ("a payload that is a number", with_envelope(payload=5)),
        ("a payload that is not base64", with_envelope(payload="!!not base64!!")),
        ("a payload that is base64 of a list", with_envelope(payload=b64(json.dumps([statement])))),
        ("a payload that is base64 of a number", with_envelope(payload=b64("42"))),
        ("a payload that is base64 of a string", with_envelope(payload=b64('"statement"'))),
        ("a payload that is base64 of null", with_envelope(payload=b64("null"))),
        ("a payload that is base64 of binary", with_envelope(payload=b64(b"\xff\x00\xfe"))),
        ("a payload nested too deeply", with_envelope(payload=b64("[" * 100_000))),
        ("no payloadType", with_envelope(payloadType=...)),
        ("a payloadType that is a list", with_envelope(payloadType=["x"])),
        ("no signatures", with_envelope(signatures=...)),
        ("signatures that are a string", with_envelope(signatures="sig")),
        ("signatures that are an object", with_envelope(signatures={"keyid": "k"})),
        ("a signature that is a number", with_envelope(signatures=[7])),
        ("a signature without sig", with_envelope(signatures=[{"keyid": sig["keyid"]}])),
        ("a sig that is not base64", with_envelope(signatures=[dict(sig, sig="%%%")])),
        ("a keyid that is a number", with_envelope(signatures=[dict(sig, keyid=3)])),
        ("a predicate that is a list", with_statement(lambda d: d.update(predicate=[1]))),
        ("no predicate", with_statement(lambda d: d.pop("predicate"))),
        ("a digest that is a number", with_statement(lambda d: d["predicate"].update(digest=1))),
        ("no key_id", with_statement(lambda d: d["predicate"].pop("key_id"))),
        (
            "a signature hex that is a list",
            with_statement(lambda d: d["predicate"].update(signature=[])),
        ),
        ("an empty subject", with_statement(lambda d: d.update(subject=[]))),
        ("a subject that is a string", with_statement(lambda d: d.update(subject="s"))),
        ("a subject of numbers", with_statement(lambda d: d.update(subject=[1]))),
        (
            "a subject digest that is a string",
            with_statement(lambda d: d["subject"][0].update(digest="x")),
        ),
        (
            "a subject sha256 that is a number",
            with_statement(lambda d: d["subject"][0]["digest"].update(sha256=2)),
        ),
    ]


async def exported_envelope(harness: Harness, tmp_path: Path) -> tuple[dict[str, Any], Path]:
    """A real attestation's envelope, as `jobtrace attest export` writes it, and
    the server's public key in a file."""
    api = harness.stubs()
    wf = (
        await api.jobs.SubmitWorkflow(
            j.SubmitWorkflowRequest(
                request_id="w",
                name="w",
                steps=[c.WorkflowStepSpec(name="x", job=c.JobSpec(service="nobody"))],
            )
        )
    ).workflow
    await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=wf.id))
    got = await api.attest.GetAttestation(
        a.GetAttestationRequest(key=f"workflow-cancellation:{wf.id}", include_envelope=True)
    )
    (signing_key,) = (await api.attest.GetSigningKeys(a.GetSigningKeysRequest())).keys
    key_file = tmp_path / "key.pub"
    key_file.write_text(signing_key.public_key.hex())
    return envelope_json(got.envelope), key_file


def verify_in_process(
    envelope_file: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as ended:
        main(["attest", "verify", str(envelope_file), "--public-key", str(key_file)])
    out, err = capsys.readouterr()
    code = ended.value.code
    return code if isinstance(code, int) else -1, out, err


async def test_attest_verify_answers_every_malformed_envelope_in_one_line(
    sqlite_harness: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    envelope, key_file = await exported_envelope(sqlite_harness, tmp_path)
    env_file = tmp_path / "envelope.json"
    # The genuine envelope verifies: the cases below differ from it by their flaw.
    env_file.write_text(json.dumps(envelope))
    code, out, err = verify_in_process(env_file, key_file, capsys)
    assert (code, err) == (0, "") and out.startswith("valid"), (code, out, err)
    wrong: list[tuple[str, int, str]] = []
    for what, content in malformed_envelopes(envelope):
        env_file.write_bytes(content)
        code, out, err = verify_in_process(env_file, key_file, capsys)
        lines = err.splitlines()
        if not (
            code == 2
            and len(lines) == 1
            and lines[0].startswith("jobtrace attest verify: cannot read envelope: ")
            and "Traceback" not in err + out
        ):
            wrong.append((what, code, err))
    assert wrong == []


async def test_attest_verify_process_on_a_list_payload_prints_one_line(
    sqlite_harness: Harness, tmp_path: Path
) -> None:
    """The case reported: an envelope whose payload is a JSON list, through the
    real `jobtrace` process."""
    envelope, key_file = await exported_envelope(sqlite_harness, tmp_path)
    env_file = tmp_path / "envelope.json"
    env_file.write_text(json.dumps(dict(envelope, payload=b64("[1, 2, 3]"))))
    code, out, err = await jobtrace(
        "attest", "verify", str(env_file), "--public-key", str(key_file)
    )
    assert code == 2, (out, err)
    assert err.splitlines() == [
        "jobtrace attest verify: cannot read envelope: statement must be a JSON object (got a list)"
    ]
    assert out == ""
