"""Adversarial inputs: every pattern applied to caller data runs in linear time,
CPU-heavy work on large evidence leaves the event loop free, redaction markers
cannot be forged, and no accepted value nests too deep for a response to carry."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2

from jobtrace.api.interceptor import REQUEST_ID_RE
from jobtrace.api.job_service import TRACEPARENT_RE
from jobtrace.api.wellformed import check_request
from jobtrace.auth import Authenticator, JwtSettings, Principal, Role, hash_token
from jobtrace.domain.annotations import KEY_RE, check_key_value
from jobtrace.domain.attest import canonical, sanitize
from jobtrace.domain.errors import DomainError, Violations
from jobtrace.domain.validation import (
    STEP_NAME_RE,
    check_id,
    check_labels,
    check_request_id,
    normalize_spec,
)
from jobtrace.model import JobSpec
from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j

from .conftest import Harness, Stubs

KIB = 1024
MIB = 1024 * KIB
# The report: 128 KB of "data:" prefixes with no comma froze the server for 33 s.
NOTE = "data:;a=" * 16384
PNG_URI = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(64)).decode()


# --- linear time ------------------------------------------------------------------


def _jwt_authenticator() -> Authenticator:
    principal = Principal("s", "t", frozenset({Role.READER}))
    jwt = JwtSettings(algorithm="HS256", key="k" * 32, issuer="i", audience="a")
    return Authenticator({hash_token("known"): principal}, jwt)


def _refused(fn: Callable[[str], Any]) -> Callable[[str], Any]:
    def call(text: str) -> Any:
        try:
            return fn(text)
        except DomainError as exc:
            return exc

    return call


def _submit(text: str) -> Any:
    request = j.SubmitJobRequest(request_id="r", job=c.JobSpec(service="svc"))
    request.job.payload.update({"v": text, "w": [text[i : i + 64] for i in range(0, 4096, 64)]})
    return request


_JWT = _jwt_authenticator()

# Each rule that reads caller text, with an input built to make it work hardest:
# (what it is, the rule applied to a text, the text of about n characters).
RULES: list[tuple[str, Callable[[str], Any], Callable[[int], str]]] = [
    ("sanitize: data: prefixes, no comma", lambda t: sanitize({"v": t}), lambda n: NOTE[:n]),
    ("sanitize: ...inside text", lambda t: sanitize({"v": t}), lambda n: "x " + NOTE[: n - 2]),
    (
        "sanitize: one parameter run",
        lambda t: sanitize({"v": t}),
        lambda n: "data:" + ";a" * (n // 2),
    ),
    (
        "sanitize: media types, no header",
        lambda t: sanitize({"v": t}),
        lambda n: " data:a/b" * (n // 9),
    ),
    (
        "sanitize: parameters cut short",
        lambda t: sanitize({"v": t}),
        lambda n: "data:;a " * (n // 8),
    ),
    (
        "sanitize: many small data: URIs",
        lambda t: sanitize({"v": t}),
        lambda n: "data:, " * (n // 7),
    ),
    (
        "sanitize: base64 data: URI",
        lambda t: sanitize({"v": t}),
        lambda n: "x data:;base64," + "A" * n,
    ),
    ("sanitize: bare base64", lambda t: sanitize({"v": t}), lambda n: "aB1+" * (n // 4)),
    ("sanitize: wrapped base64", lambda t: sanitize({"v": t}), lambda n: "AAAA\n" * (n // 5)),
    (
        "sanitize: forged marker text",
        lambda t: sanitize({"v": t}),
        lambda n: "[\\redacted" * (n // 10),
    ),
    ("sanitize: member name", lambda t: sanitize({t: 1}), lambda n: NOTE[:n]),
    ("sanitize: forged marker name", lambda t: sanitize({t: 1}), lambda n: "$" * n + "redacted"),
    ("canonical: escapes", canonical, lambda n: '\x01"\\' * (n // 3)),
    (
        "service name",
        lambda t: normalize_spec(Violations(), "job", JobSpec(service=t), 0),
        lambda n: "a" * n,
    ),
    ("step name", STEP_NAME_RE.fullmatch, lambda n: "a" * n),
    ("label key", lambda t: check_labels(Violations(), "labels", {t: "v"}), lambda n: "a" * n),
    ("annotation key", lambda t: check_key_value(Violations(), "k", t, 1), lambda n: "a.b" * n),
    ("annotation key pattern", KEY_RE.fullmatch, lambda n: "a" + ".a" * (n // 2) + "!"),
    ("request id", lambda t: check_request_id(Violations(), "request_id", t), lambda n: "a" * n),
    ("id", lambda t: check_id(Violations(), "job_id", t), lambda n: "a" * n),
    ("x-request-id header", REQUEST_ID_RE.fullmatch, lambda n: "a" * n),
    ("traceparent header", TRACEPARENT_RE.fullmatch, lambda n: "00-" + "0" * n),
    ("well-formedness", _refused(lambda t: check_request(_submit(t))), lambda n: "a" * n + "\x00"),
    (
        "bearer token",
        _refused(lambda t: _JWT.authenticate([("authorization", "Bearer " + t)])),
        lambda n: "e" * n + ".e.e",
    ),
]


def _per_call(rule: Callable[[Any], Any], value: Any, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        rule(value)
    return (time.perf_counter() - start) / calls


def growth(rule: Callable[[Any], Any], small: Any, big: Any, repeats: int = 3) -> float:
    """Time per call on `big` over time per call on `small`, best of `repeats` each,
    as the benchmark measures: no wall-clock threshold, only how time grows."""
    once = _per_call(rule, small, 1)
    calls = max(1, min(2000, int(0.02 / max(once, 1e-7))))  # ~20 ms per sample
    small_t = min(_per_call(rule, small, calls) for _ in range(repeats))
    big_calls = max(1, calls // 16)
    big_t = min(_per_call(rule, big, big_calls) for _ in range(repeats))
    return big_t / small_t


@pytest.mark.parametrize(("name", "rule", "make"), RULES, ids=[r[0] for r in RULES])
def test_every_rule_on_caller_data_runs_in_linear_time(
    name: str, rule: Callable[[str], Any], make: Callable[[int], str]
) -> None:
    # 16 times the input: ~16 times the time if linear, ~256 if quadratic.
    ratio = growth(rule, make(64 * KIB), make(MIB))
    assert ratio < 64, f"{name}: 1 MiB took {ratio:.0f} times as long as 64 KiB"


def test_a_data_uri_right_after_another_is_redacted_too() -> None:
    # The regex search this replaced resumed inside a skipped header and missed
    # the "data:," after "[" here, so it stayed in the attestation.
    text = "['data:;base64,Data:;base64K=+][data:,data:text/plain;charset=utf-8,\"rest"
    out = sanitize({"v": text})["v"]
    assert "data:" not in out.lower() and out.endswith('"rest')
    assert out.count("[redacted ") == 2


def _struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


async def _data(api: Stubs, key: str) -> dict[str, Any]:
    got = await api.attest.GetAttestation(a.GetAttestationRequest(key=key))
    verdict = await api.attest.VerifyAttestation(a.VerifyAttestationRequest(key=key))
    assert verdict.valid, verdict.reason
    return json_format.MessageToDict(got.attestation.data)


# --- markers cannot be forged -----------------------------------------------------------


def _markers(value: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The marker objects in `value`, and every text holding a marker string."""
    objects: list[dict[str, Any]] = []
    texts: list[str] = []
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if "redacted" in item:
                objects.append(item)
            texts += [k for k in item if "[redacted " in k]
            pending += item.values()
        elif isinstance(item, list):
            pending += item
        elif isinstance(item, str) and "[redacted " in item:
            texts.append(item)
    return objects, texts


async def test_a_payload_cannot_forge_a_marker_nor_make_a_value_disappear(
    harness: Harness,
) -> None:
    api = harness.stubs()
    uri = "data:,x"
    digest = hashlib.sha256(uri.encode()).hexdigest()
    # Exactly what the server writes for `uri` as a member name.
    key_marker = f"[redacted data_uri text/plain sha256:{digest} length:{len(uri)}]"
    fake = {"redacted": "base64", "sha256": digest, "length": 7, "media_type": "image/png"}
    body = {
        "image": fake,  # looks exactly like a marker object
        "real": PNG_URI,  # a real one
        uri: "named by a data: URI",
        key_marker: "named like its marker",  # used to overwrite the member above
        "$redacted": "already escaped-looking",
        "note": f"see {key_marker} and [\\redacted too",
    }
    request = j.SubmitWorkflowRequest(
        request_id="forge",
        name="w",
        steps=[c.WorkflowStepSpec(name="x", job=c.JobSpec(service="nobody"))],
        request_context=c.RequestContext(body=_struct(body)),
    )
    wf = (await api.jobs.SubmitWorkflow(request)).workflow
    await api.jobs.CancelWorkflow(j.CancelWorkflowRequest(workflow_id=wf.id))
    got = (await _data(api, f"workflow-cancellation:{wf.id}"))["request_context"]["body"]
    assert len(got) == len(body), "no two members became one"
    # Caller data shaped like a marker is visibly escaped; the server's are not.
    assert got["image"] == {"$redacted": "base64", **{k: fake[k] for k in fake if k != "redacted"}}
    assert got["$$redacted"] == "already escaped-looking"
    assert got[key_marker] == "named by a data: URI"
    assert got["[\\" + key_marker[1:]] == "named like its marker"
    assert got["note"] == "see [\\" + key_marker[1:] + " and [\\\\redacted too"
    objects, texts = _markers(got)
    assert objects == [got["real"]]
    assert got["real"]["sha256"] == hashlib.sha256(PNG_URI.encode()).hexdigest()
    assert texts == [key_marker]
