"""Secrets never enter evidence: attestations, trace events and annotations are
redacted before they are stored, signed or shown; credential headers are dropped
at submission; the worker still gets the payload as submitted."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobtrace.domain.attest import redact, redact_text, sanitize
from jobtrace.domain.redact import DEFAULT, Redaction, UnsafePattern
from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness
from .workers import RawWorker

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEifQ.c2lnbmF0dXJlLWJ5dGVz"
SK = "sk-live-4f9a8b7c6d5e4f3a2b1c0d9e"
GHP = "ghp_0123456789abcdefABCDEF0123456789ab"
AWS = "AKIAIOSFODNN7EXAMPLE"
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7x\n-----END RSA PRIVATE KEY-----"
COOKIE = "sid=c00kie-v4lue-31337"
HUNTER = "hunter2-password-value"
SESSION = "sess-tok-7d1e0c"
SECRETS = [JWT, SK, GHP, AWS, "MIIEowIBAAKCAQEA7x", COOKIE, HUNTER, SESSION, "abcdef123456"]
KEPT = ["https://img.example/cat.png", "sha256:9f86d081884c7d659a2feaa0c55ad015", "token usage"]


def _struct(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


def _value(x: Any) -> struct_pb2.Value:
    v = struct_pb2.Value()
    json_format.ParseDict(x, v)
    return v


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


# --- the rules -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["session_token", "client_secret", "apiKey", "X-Api-Key", "APIKey", "private-key",
             "access.key", "password", "DB_PASSWD", "credentials", "sessionToken", "Cookie",
             "proxy-authorization", "Set-Cookie", "x-auth-token"]
)  # fmt: skip
def test_a_secret_member_name_is_redacted_in_any_spelling(name: str) -> None:
    out = sanitize({name: "v4lue", "n": {name: ["x"]}})
    assert out[name]["redacted"] == "secret"
    assert out["n"][name]["redacted"] == "secret"
    assert "v4lue" not in json.dumps(out)


@pytest.mark.parametrize(
    "name", ["max_tokens", "token_count", "key", "monkey", "tokenizer", "secret_sauce", "keys"]
)
def test_an_ordinary_member_name_is_kept(name: str) -> None:
    assert sanitize({name: 5}) == {name: 5}
    assert redact({name: "v"}) == {name: "v"}


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        (JWT, "jwt"),
        (SK, "key_prefix"),
        (GHP, "key_prefix"),
        (AWS, "key_prefix"),
        ("xoxb-1234567890-abcdef", "key_prefix"),
        ("sk_live_51HxYzAbCdEfGhIjKl", "key_prefix"),
        (PEM, "private_key"),
        ("Bearer abcdef123456", "bearer"),
    ],
)
def test_a_credential_value_is_redacted_whole_or_in_text(text: str, rule: str) -> None:
    assert sanitize({"v": text}) == {"v": {"redacted": "secret", "reason": rule}}
    said = f"called with {text} then"
    assert sanitize({"v": said}) == {"v": f"called with [redacted secret {rule}] then"}
    assert redact_text(said) == f"called with [redacted secret {rule}] then"


def test_prose_digests_and_urls_survive() -> None:
    value = {
        "prompt": "count every token; the bearer of this note may skip",
        "image": "https://img.example/cat.png",
        "digest": "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "tool": "sk-learn",
        "max_tokens": 512,
    }
    assert sanitize(value) == value
    assert redact(value) == value


def test_markers_cannot_be_forged() -> None:
    forged = {"redacted": "secret", "reason": "key"}
    assert sanitize({"v": forged}) == {"v": {"$redacted": "secret", "reason": "key"}}
    assert redact({"v": forged}) == {"v": {"$redacted": "secret", "reason": "key"}}
    assert redact_text("[redacted secret bearer]") == "[\\redacted secret bearer]"


def test_without_default_rules_nothing_is_redacted_but_operator_rules_apply() -> None:
    none = Redaction(defaults=False)
    assert sanitize({"api_key": SK, "authorization": JWT}, none) == {
        "api_key": SK,
        "authorization": JWT,
    }
    custom = Redaction.configure(defaults=False, headers=["X-Tenant-Pass"], keys=["^internal_"])
    out = sanitize({"internal_sig": "a", "x-tenant-pass": "b", "api_key": "c"}, custom)
    assert out == {
        "internal_sig": {"redacted": "secret", "reason": "custom_key"},
        "x-tenant-pass": {"redacted": "secret", "reason": "header"},
        "api_key": "c",
    }


@pytest.mark.parametrize("rule", ["(", "(a+)+$", "x*", r"(\w)\1"])
def test_an_unsafe_operator_rule_is_refused(rule: str) -> None:
    with pytest.raises(UnsafePattern):
        Redaction.configure(keys=[rule])


# --- property: at any depth, under any spelling ---------------------------------------

_SECRET_NAMES = st.sampled_from(
    ["api_key", "apiKey", "API_KEY", "X-Api-Key", "client_secret", "clientSecret", "password",
     "user.passwd", "session_token", "sessionToken", "credentials", "privateKey", "access-key",
     "Authorization", "COOKIE", "set-cookie", "x-auth-token"]
)  # fmt: skip
_CREDENTIALS = st.sampled_from([JWT, SK, GHP, AWS, PEM, "Bearer abcdef123456"])
_PLAIN_NAMES = st.sampled_from(["name", "max_tokens", "token_count", "image", "digest", "notes"])
_PLAIN = st.sampled_from([*KEPT, "hello", "data: 3 rows", ""]) | st.integers() | st.booleans()


@st.composite
def _with_secrets(draw: st.DrawFn) -> tuple[Any, list[str]]:
    """A nested value holding secrets at random depths; and the secrets."""
    secrets: list[str] = []

    def node(depth: int) -> Any:
        kind = draw(st.integers(0, 5 if depth < 4 else 2))
        if kind == 0:
            return draw(_PLAIN)
        if kind == 1:
            cred = draw(_CREDENTIALS)
            secrets.append(cred)
            return cred if draw(st.booleans()) else f"see {cred} here"
        if kind == 2:
            secret = f"v{draw(st.integers(10**6, 10**7))}-secret-value"
            secrets.append(secret)
            return {draw(_SECRET_NAMES): secret}
        if kind == 3:
            return [node(depth + 1) for _ in range(draw(st.integers(0, 3)))]
        names = draw(st.lists(_PLAIN_NAMES | _SECRET_NAMES, max_size=3, unique=True))
        out = {}
        for n in names:
            if DEFAULT.secret_member(n):
                secret = f"s{draw(st.integers(10**6, 10**7))}-hidden"
                secrets.append(secret)
                out[n] = {"deeper": [secret]}
            else:
                out[n] = node(depth + 1)
        return out

    return node(0), secrets


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_with_secrets())
def test_no_credential_survives_at_any_depth_under_any_spelling(drawn: Any) -> None:
    value, secrets = drawn
    for out in (sanitize(value), redact(value)):
        text = json.dumps(out)
        # PEM bodies carry "\n", escaped in JSON: compare their content lines.
        left = [s for s in secrets if s.split("\n")[1 if "\n" in s else 0] in text]
        assert not left, (left, out)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        _PLAIN_NAMES, st.sampled_from(KEPT) | st.lists(st.sampled_from(KEPT)), max_size=5
    )
)
def test_ordinary_values_survive(value: dict[str, Any]) -> None:
    assert sanitize(value) == value
    assert redact(value) == value


# --- through the server ---------------------------------------------------------------


async def test_credentials_never_reach_evidence_nor_the_worker_but_the_payload_does(
    harness: Harness,
) -> None:
    api = harness.stubs()
    payload = {
        "api_key": SK,
        "prompt": "count the token usage",
        "image": "https://img.example/cat.png",
        "max_tokens": 512,
        "nested": [{"clientSecret": HUNTER, "digest": "sha256:9f86d081884c7d659a2feaa0c55ad015"}],
    }
    context = c.RequestContext(
        body=_struct({"session_token": SESSION, "text": f"login with {GHP}"}),
        metadata=c.RequestMetadata(
            headers={
                "Authorization": f"Bearer {JWT}",
                "cookie": COOKIE,
                "X-Api-Key": AWS,
                "x-trace-tag": "blue",
            }
        ),
    )
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(
                request_id="secrets",
                job=c.JobSpec(service="svc", payload=_struct(payload)),
                request_context=context,
            ),
            timeout=30,
        )
    ).job
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    assignment = await raw.expect("assignment", timeout=30)
    # The payload is the job's input: it reaches the worker as submitted.
    assert json_format.MessageToDict(assignment.job.spec.payload) == payload
    # Credential headers were dropped at submission: the worker never gets them.
    assert dict(assignment.request_context.metadata.headers) == {"x-trace-tag": "blue"}

    await api.trace.AppendTraceEvents(
        t.AppendTraceEventsRequest(
            run_id=job.id,
            events=[
                c.TraceEvent(
                    event_key="e1",
                    message="calling upstream with Bearer abcdef123456",
                    error=c.ErrorDetail(message=f"401 for {SK}", stack=f"at {GHP}"),
                    output_summary=_struct({"token_count": 3, "password": HUNTER}),
                    data=_struct({"stream": "stdout", "headers": {"Cookie": COOKIE}}),
                )
            ],
        ),
        timeout=30,
    )
    await api.attest.AttachAnnotations(
        a.AttachAnnotationsRequest(
            run_id=job.id,
            actor=c.Actor(kind=c.ACTOR_KIND_USER, id="alice", version="1"),
            attributes={"decision.note": _value(f"used {JWT}"), "trigger.token": _value(SESSION)},
            payload=_struct({"auth": {"apiKey": AWS}, "image": "https://img.example/cat.png"}),
        ),
        timeout=30,
    )
    result = _struct({"access_token": SESSION, "ok": True, "echo": f"Bearer {JWT}"})
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1, result=result))
    assert (await raw.expect("ack", timeout=30)).job_id == job.id
    await raw.close()

    got = await api.attest.GetAttestation(
        a.GetAttestationRequest(key=f"worker-completion:{job.id}", include_envelope=True),
        timeout=30,
    )
    data = json_format.MessageToDict(got.attestation.data)
    envelope = got.envelope.payload.decode()
    assert envelope
    for shown in (json.dumps(data), envelope):
        assert _leaks(shown) == []
    assert "Authorization" not in data["request_context"]["metadata"]["headers"]
    assert data["request_context"]["metadata"]["headers"]["x-trace-tag"] == "blue"
    assert data["job_payload"]["api_key"] == {"redacted": "secret", "reason": "key"}
    assert data["job_payload"]["max_tokens"] == 512
    assert data["job_payload"]["image"] == "https://img.example/cat.png"
    assert data["job_payload"]["prompt"] == "count the token usage"
    verdict = await api.attest.VerifyAttestation(
        a.VerifyAttestationRequest(key=f"worker-completion:{job.id}"), timeout=30
    )
    assert verdict.valid, verdict.reason

    events = await api.trace.ListTraceEvents(
        t.ListTraceEventsRequest(run_id=job.id, page_size=1000, view=t.TRACE_EVENT_VIEW_FULL),
        timeout=30,
    )
    shown_events = [json_format.MessageToJson(e) for e in events.events]
    assert any("[redacted secret bearer]" in e for e in shown_events)
    assert all(_leaks(e) == [] for e in shown_events)
    (mine,) = [e for e in events.events if e.event_key == "e1"]
    assert json_format.MessageToDict(mine.output_summary)["token_count"] == 3

    notes = await api.attest.ListAnnotations(
        a.ListAnnotationsRequest(run_id=job.id, page_size=100, view=a.ANNOTATION_VIEW_FULL),
        timeout=30,
    )
    shown_notes = [json_format.MessageToJson(n) for n in notes.annotations]
    assert shown_notes and all(_leaks(n) == [] for n in shown_notes)
    assert any("https://img.example/cat.png" in n for n in shown_notes)


async def test_an_unsafe_redaction_rule_stops_startup(harness: Harness) -> None:
    await harness.stop()
    with pytest.raises(OSError, match="redact-key"):
        await harness.start(redact_keys=("(a+)+$",))


async def test_operator_rules_apply_and_turning_defaults_off_is_logged(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    await harness.stop()
    with caplog.at_level(logging.WARNING):
        await harness.start(
            no_default_redaction=True, redact_headers=("X-Tenant-Pass",), redact_keys=("^mine_",)
        )
    assert any("default redaction is off" in r.getMessage() for r in caplog.records)
    api = harness.stubs()
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(
                request_id="raw",
                job=c.JobSpec(service="svc", payload=_struct({"api_key": SK, "mine_x": "m"})),
                request_context=c.RequestContext(
                    metadata=c.RequestMetadata(headers={"x-tenant-pass": "p", "cookie": COOKIE})
                ),
            ),
            timeout=30,
        )
    ).job
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    assignment = await raw.expect("assignment", timeout=30)
    assert dict(assignment.request_context.metadata.headers) == {"cookie": COOKIE}
    await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1, result=_struct({})))
    assert (await raw.expect("ack", timeout=30)).job_id == job.id
    await raw.close()
    got = await api.attest.GetAttestation(
        a.GetAttestationRequest(key=f"worker-completion:{job.id}"), timeout=30
    )
    data = json_format.MessageToDict(got.attestation.data)
    assert data["job_payload"] == {
        "api_key": SK,
        "mine_x": {"redacted": "secret", "reason": "custom_key"},
    }
