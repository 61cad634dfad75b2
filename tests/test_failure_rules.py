"""Failure rules: failures classified by the operator's rules file, retried (or
not) as the rules say, counted, summarised, and the file reloaded safely."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from jobtrace.domain.dispatch.placement import pick_worker
from jobtrace.domain.failure_rules import RulesError, parse_rules
from jobtrace.model import RunState
from jobtrace.pb import attestation_service_pb2 as a
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, Stubs, expect_error, wait_for
from .procs import jobtrace
from .test_dispatch_rules import job, session
from .test_observability import scrape
from .test_security import bearer, token, write_tokens
from .workers import RawWorker

RULES = """
rules:
  - match: {service: "gpu-*", code: [OOM, CUDA_OOM]}
    kind: oom
    avoid_same_worker: true
    backoff: {delay: 0s}
  - match: {message: "(?i)out of memory"}
    kind: oom
    avoid_same_worker: true
    backoff: {delay: 0s}
  - match: {message: "^invalid input"}
    kind: bad_input
    retryable: false
  - match: {code: TRANSIENT}
    kind: transient
    retryable: true
  - match: {code: SLOW}
    kind: throttled
    backoff: {initial: 1h, multiplier: 1, maximum: 2h}
  - match: {code: LEASE_EXPIRED}
    kind: worker_lost
  - match: {code: TIMED_OUT}
    kind: timeout
"""


def write(path: Path, text: str) -> Path:
    """Replace the file whole (a rename), as an editor or a config tool does."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


async def submit(api: Stubs, rid: str, service: str, **fields: Any) -> c.Job:
    spec = c.JobSpec(service=service, **fields)
    return (await api.jobs.SubmitJob(j.SubmitJobRequest(request_id=rid, job=spec))).job


async def get(api: Stubs, job_id: str) -> c.Job:
    return (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id))).job


async def fail(
    raw: RawWorker, job_id: str, attempt: int, message: str, code: str = "", retryable: bool = True
) -> None:
    error = c.ErrorDetail(message=message, code=code)
    await raw.send(
        fail=w.FailReport(job_id=job_id, attempt=attempt, error=error, retryable=retryable)
    )
    await raw.expect("ack")


async def ended(api: Stubs, job_id: str) -> c.Job:
    async def check() -> c.Job | None:
        job = await get(api, job_id)
        return job if job.state in (c.RUN_STATE_FAILED, c.RUN_STATE_COMPLETED) else None

    found: c.Job = await wait_for(check, timeout=10)
    return found


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    return write(tmp_path / "rules.yaml", RULES)


@pytest.fixture
async def ruled(db_url: str, rules_file: Path) -> Any:
    async with Harness(
        db_url,
        failure_rules=str(rules_file),
        metrics_port=0,
        reload_interval_seconds=0.05,
        reconnect_grace_seconds=0.0,
    ) as h:
        yield h


# --- the file -------------------------------------------------------------------------


def test_rules_file_problems_name_the_file_the_rule_and_the_field() -> None:
    text = """
rules:
  - match: {service: "gpu-*", code: OOM}
    kind: oom
  - match: {message: "out of (memory"}
    kind: oom
  - match: {codes: X}
    kind: Bad Kind
    retry: true
  - kind: no_match
  - match: {code: X}
    kind: slow
    backoff: {delay: 1s, initial: 2s}
  - match: {message: "(a+)+$"}
    kind: redos
"""
    with pytest.raises(RulesError) as caught:
        parse_rules(text, "rules.yaml")
    problems = str(caught.value).split("; ")
    assert problems[0].startswith(
        "rules.yaml: rules[1].match.message: bad regular expression 'out of (memory'"
    )
    assert "rules.yaml: rules[2].retry: unknown field" in problems[1]
    assert problems[2].startswith("rules.yaml: rules[2].kind: required: a short identifier")
    assert problems[3].startswith("rules.yaml: rules[2].match.codes: unknown field")
    assert problems[4].startswith("rules.yaml: rules[3].match: required")
    assert problems[5].startswith("rules.yaml: rules[4].backoff.delay: a fixed delay stands alone")
    assert problems[6].startswith("rules.yaml: rules[5].match.message: regular expression")
    assert "not safe" in problems[6] and len(problems) == 7
    with pytest.raises(RulesError, match=r"^rules.yaml: rules\[0\]: must be a mapping"):
        parse_rules("rules: [oom]", "rules.yaml")
    numeric = parse_rules("rules:\n  - {match: {code: [137, E1]}, kind: killed}", "r")
    assert numeric.rules[0].codes == frozenset({"137", "E1"})
    with pytest.raises(RulesError, match=r"^rules.yaml: unknown fields \['rule'\]"):
        parse_rules("rule: []", "rules.yaml")
    with pytest.raises(RulesError, match=r"^rules.yaml: not valid YAML"):
        parse_rules("rules: [", "rules.yaml")
    rules = parse_rules(RULES, "rules.yaml")
    kinds = [r.kind for r in rules.rules]
    assert kinds == ["oom", "oom", "bad_input", "transient", "throttled", "worker_lost", "timeout"]


async def test_a_bad_rules_file_refuses_to_start_with_a_precise_message(
    sqlite_url: str, tmp_path: Path
) -> None:
    bad = write(tmp_path / "bad.yaml", 'rules:\n  - match: {message: "(oops"}\n    kind: x\n')
    h = Harness(sqlite_url, failure_rules=str(bad))
    with pytest.raises(OSError, match=r"cannot load the failure rules: .*bad\.yaml: rules\[0\]"):
        await h.start()
    code, _, err = await jobtrace(
        "serve", "--listen", "127.0.0.1:0", "--db", sqlite_url, "--failure-rules", str(bad)
    )
    assert code == 1
    assert "cannot load the failure rules" in err
    assert "bad.yaml: rules[0].match.message: bad regular expression '(oops'" in err


def test_placement_avoids_the_failed_worker_only_while_another_can_take_the_job() -> None:
    failed, other = session("failed", slots=8), session("other", slots=1)
    retry = job(state=RunState.QUEUED, avoid_holder=failed.holder)
    slots = {failed.session_id: 8, other.session_id: 1}

    def picked(j: Any) -> Any:
        chosen = pick_worker(j, [failed, other], slots)
        return chosen.session if chosen is not None else None

    assert picked(job(state=RunState.QUEUED)) is failed
    assert picked(retry) is other
    slots[other.session_id] = 0  # the other one is busy: no waiting for it
    assert picked(retry) is failed


# --- failures as the rules say ----------------------------------------------------------


async def test_an_oom_is_retried_on_another_worker_and_classified(ruled: Harness) -> None:
    api = ruled.stubs()
    first = RawWorker(api)
    await first.hello("gpu-a", ["gpu-train"])
    job = await submit(api, "oom", "gpu-train", max_attempts=3)
    assert (await first.expect("assignment")).attempt == 1
    second = RawWorker(api)
    await second.hello("gpu-b", ["gpu-train"])
    # Both have a free slot when the retry is placed; the rule says not the first.
    await fail(first, job.id, 1, "CUDA error: out of memory", code="OOM")
    retry = await second.expect("assignment")
    assert retry.job.id == job.id and retry.attempt == 2
    running = await get(api, job.id)
    assert running.worker_id == "gpu-b"
    assert running.failure.kind == "oom" and running.failure.code == "OOM"
    # The message rule too: a generic code whose message says out of memory.
    await fail(second, job.id, 2, "Killed: Out of memory", code="E137")
    third = await first.expect("assignment")
    assert third.attempt == 3
    await first.send(complete=w.CompleteReport(job_id=job.id, attempt=3))
    await first.expect("ack")
    assert (await ended(api, job.id)).state == c.RUN_STATE_COMPLETED
    listed = await api.attest.ListAnnotations(
        a.ListAnnotationsRequest(run_id=job.id, key="failure.kind")
    )
    kinds = [(x.value.string_value, x.attempt, x.recorded_by) for x in listed.annotations]
    assert kinds == [("oom", 1, "system"), ("oom", 2, "system")]
    assert all(x.actor.kind == c.ACTOR_KIND_SYSTEM for x in listed.annotations)
    metrics = await scrape(ruled.server)
    assert metrics.value("jobtrace_job_failures_total", service="gpu-train", kind="oom") == 2
    await first.close()
    await second.close()


async def test_a_lone_worker_still_gets_the_retry_it_should_avoid(ruled: Harness) -> None:
    api = ruled.stubs()
    raw = RawWorker(api)
    await raw.hello("gpu-a", ["gpu-train"])
    job = await submit(api, "alone", "gpu-train", max_attempts=2)
    await raw.expect("assignment")
    await fail(raw, job.id, 1, "oom", code="OOM")
    assert (await raw.expect("assignment")).attempt == 2  # no other worker: never waits
    await raw.close()


async def test_a_bad_input_failure_is_not_retried_though_the_worker_said_retryable(
    ruled: Harness,
) -> None:
    api = ruled.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["parse"])
    job = await submit(api, "bad", "parse", max_attempts=3)
    await raw.expect("assignment")
    await fail(raw, job.id, 1, "invalid input: no such column 'x'", retryable=True)
    done = await ended(api, job.id)
    assert done.state == c.RUN_STATE_FAILED and done.attempt == 1
    assert done.failure.kind == "bad_input" and not done.failure.retryable
    listed = await api.attest.ListAnnotations(
        a.ListAnnotationsRequest(run_id=job.id, key="failure.kind")
    )
    assert [x.value.string_value for x in listed.annotations] == ["bad_input"]
    attestation = (
        await api.attest.GetAttestation(a.GetAttestationRequest(key=f"worker-failure:{job.id}:1"))
    ).attestation
    assert attestation.data["error"]["kind"] == "bad_input"
    await raw.close()


async def test_the_workers_not_retryable_wins_over_a_rule_saying_retryable(
    ruled: Harness,
) -> None:
    api = ruled.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    job = await submit(api, "final", "svc", max_attempts=3)
    await raw.expect("assignment")
    await fail(raw, job.id, 1, "upstream gone", code="TRANSIENT", retryable=False)
    done = await ended(api, job.id)
    assert done.state == c.RUN_STATE_FAILED and done.attempt == 1
    assert done.failure.kind == "transient" and not done.failure.retryable
    await raw.close()


async def test_a_rules_backoff_sets_when_the_retry_is_due(ruled: Harness) -> None:
    api = ruled.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    # The job's own backoff would retry after 1 ms; the rule says 1 hour.
    job = await submit(
        api, "slow", "svc", backoff=c.BackoffPolicy(initial_interval={"nanos": 1_000_000})
    )
    await raw.expect("assignment")
    await fail(raw, job.id, 1, "rate limited", code="SLOW")
    queued = await get(api, job.id)
    assert queued.state == c.RUN_STATE_QUEUED and queued.failure.kind == "throttled"
    wait = queued.next_attempt_at.ToMicroseconds() - queued.updated_at.ToMicroseconds()
    assert wait == 3600 * 1_000_000
    # An unclassified failure keeps the job's own policy and no kind.
    other = await submit(
        api, "plain", "svc", backoff=c.BackoffPolicy(initial_interval={"seconds": 7})
    )
    await raw.expect("assignment")
    await fail(raw, other.id, 1, "something else", code="E1")
    plain = await get(api, other.id)
    assert plain.failure.kind == ""
    assert plain.next_attempt_at.ToMicroseconds() - plain.updated_at.ToMicroseconds() == 7e6
    await raw.close()


async def test_a_lost_lease_is_classified_by_its_code(ruled: Harness) -> None:
    api = ruled.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    job = await submit(api, "lost", "svc", max_attempts=3)
    await raw.expect("assignment")
    await raw.close()  # no reconnect grace here: the lease is given back at once

    async def requeued() -> c.Job | None:
        found = await get(api, job.id)
        return found if found.state == c.RUN_STATE_QUEUED else None

    queued: c.Job = await wait_for(requeued, timeout=10)
    assert queued.failure.code == "LEASE_EXPIRED" and queued.failure.kind == "worker_lost"


async def test_a_timed_out_attempt_is_classified_and_summarised(ruled: Harness) -> None:
    api = ruled.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    job = await submit(api, "slow-job", "svc", timeout={"nanos": 300_000_000})
    await raw.expect("assignment")

    async def timed_out() -> c.Job | None:
        found = await get(api, job.id)
        return found if found.state == c.RUN_STATE_TIMED_OUT else None

    done: c.Job = await wait_for(timed_out, timeout=10)
    assert done.failure.code == "TIMED_OUT" and done.failure.kind == "timeout"
    since = timestamp_pb2.Timestamp()
    since.FromSeconds(0)
    reply = await api.jobs.SummarizeFailures(j.SummarizeFailuresRequest(since=since))
    assert [(g.kind, g.count, g.last.job_id) for g in reply.groups] == [("timeout", 1, job.id)]
    await raw.close()


# --- reloads ----------------------------------------------------------------------------


async def test_a_changed_rules_file_is_reloaded_and_a_broken_one_keeps_the_rules(
    ruled: Harness, rules_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jobtrace.auth.reload")
    server = ruled.server
    assert server is not None
    write(rules_file, "rules:\n  - match: {code: E42}\n    kind: reloaded\n    retryable: false\n")
    await wait_for(lambda: [r.kind for r in server.lifecycle.failure_rules.rules] == ["reloaded"])
    await wait_for(lambda: "failure rules reloaded: 1 rules in service" in caplog.text)
    write(rules_file, "rules:\n  - match: {message: '(('}\n    kind: broken\n")
    await wait_for(lambda: "reloading the failure rules failed" in caplog.text)
    assert "rules[0].match.message: bad regular expression" in caplog.text
    api = ruled.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["svc"])
    job = await submit(api, "after", "svc", max_attempts=3)
    await raw.expect("assignment")
    await fail(raw, job.id, 1, "boom", code="E42")
    done = await ended(api, job.id)
    assert done.failure.kind == "reloaded" and done.state == c.RUN_STATE_FAILED
    await raw.close()


async def test_sighup_reloads_the_rules_file(sqlite_url: str, rules_file: Path) -> None:
    async with Harness(sqlite_url, failure_rules=str(rules_file), reload_interval_seconds=0) as h:
        server = h.server
        assert server is not None
        write(rules_file, "rules:\n  - {match: {code: X}, kind: after_hup}\n")
        server.reload_credentials()  # what SIGHUP calls (jobtrace serve)
        await wait_for(
            lambda: [r.kind for r in server.lifecycle.failure_rules.rules] == ["after_hup"]
        )


# --- the summary ------------------------------------------------------------------------


async def test_failures_are_summarised_by_kind_and_service(ruled: Harness) -> None:
    api = ruled.stubs()
    raw = RawWorker(api)
    await raw.hello("w1", ["parse", "gpu-train"])
    for i, (service, message, code) in enumerate(
        [
            ("parse", "invalid input: 1", ""),
            ("parse", "invalid input: 2", ""),
            ("gpu-train", "no memory", "OOM"),
            ("parse", "disk on fire", "E9"),
        ]
    ):
        job = await submit(api, f"s{i}", service, max_attempts=1)
        await raw.expect("assignment")
        await fail(raw, job.id, 1, message, code=code)
        last = job
    since = timestamp_pb2.Timestamp()
    since.FromSeconds(0)
    groups = (await api.jobs.SummarizeFailures(j.SummarizeFailuresRequest(since=since))).groups
    summary = [(g.kind, g.service, g.count) for g in groups]
    assert summary == [("bad_input", "parse", 2), ("", "parse", 1), ("oom", "gpu-train", 1)]
    assert groups[1].last.job_id == last.id and groups[1].last.message == "disk on fire"
    assert groups[0].last.message == "invalid input: 2" and groups[0].last.code == ""
    only = await api.jobs.SummarizeFailures(
        j.SummarizeFailuresRequest(since=since, service="gpu-train")
    )
    assert [(g.kind, g.count) for g in only.groups] == [("oom", 1)]
    later = timestamp_pb2.Timestamp()
    later.GetCurrentTime()
    later.seconds += 60
    empty = await api.jobs.SummarizeFailures(j.SummarizeFailuresRequest(since=later))
    assert list(empty.groups) == []
    _, _, violations = await expect_error(
        api.jobs.SummarizeFailures(j.SummarizeFailuresRequest()), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert violations == [("since", "required: failures at or after this time")]
    code, out, _ = await jobtrace("failures", "--since", "1d", "--json", target=ruled.target)
    assert code == 0
    printed = json.loads(out)["groups"]
    assert [(g["kind"], g["service"], g["count"]) for g in printed] == summary
    code, out, _ = await jobtrace("failures", "--service", "parse", target=ruled.target)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["KIND", "SERVICE", "COUNT"]
    assert lines[1].split()[:3] == ["bad_input", "parse", "2"]
    assert lines[2].split()[:3] == ["unclassified", "parse", "1"] and "disk on fire" in lines[2]
    await raw.close()


async def test_failure_records_expire_with_the_trace_retention(sqlite_url: str) -> None:
    async with Harness(sqlite_url, trace_retention_days=1e-9, retention_sweep_seconds=0.05) as h:
        api = h.stubs()
        raw = RawWorker(api)
        await raw.hello("w1", ["svc"])
        first = await submit(api, "old", "svc", max_attempts=1)
        await raw.expect("assignment")
        await fail(raw, first.id, 1, "boom")
        since = timestamp_pb2.Timestamp()
        since.FromSeconds(0)

        async def summarized() -> bool:
            reply = await api.jobs.SummarizeFailures(j.SummarizeFailuresRequest(since=since))
            return not reply.groups

        await wait_for(summarized, timeout=10)
        await raw.close()


async def test_the_failures_summary_is_tenant_scoped(
    sqlite_url: str, tmp_path: Path, rules_file: Path
) -> None:
    tokens = tmp_path / "tokens.yaml"
    write_tokens(tokens)
    async with Harness(sqlite_url, tokens_file=str(tokens), failure_rules=str(rules_file)) as h:
        api = h.stubs()
        for tenant, message in (("acme", "invalid input"), ("umbrella", "boom")):
            raw = RawWorker(api, metadata=bearer(token("worker", tenant)))
            await raw.hello(f"w-{tenant}", ["svc"])
            spec = c.JobSpec(service="svc", max_attempts=1)
            submitted = await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id=tenant, job=spec),
                metadata=bearer(token("submitter", tenant)),
            )
            await raw.expect("assignment")
            await fail(raw, submitted.job.id, 1, message)
            await raw.close()
        since = timestamp_pb2.Timestamp()
        since.FromSeconds(0)

        async def summary(who: str, tenant: str) -> list[tuple[str, int]]:
            reply = await api.jobs.SummarizeFailures(
                j.SummarizeFailuresRequest(since=since), metadata=bearer(token(who, tenant))
            )
            return [(g.kind, g.count) for g in reply.groups]

        assert await summary("reader", "acme") == [("bad_input", 1)]
        assert await summary("reader", "umbrella") == [("", 1)]
        assert await summary("admin", "acme") == [("", 1), ("bad_input", 1)]


async def test_failure_metrics_keep_to_the_service_label_bound(
    sqlite_url: str, rules_file: Path
) -> None:
    async with Harness(
        sqlite_url, failure_rules=str(rules_file), metrics_port=0, metrics_max_services=0
    ) as h:
        api = h.stubs()
        raw = RawWorker(api)
        await raw.hello("w1", ["gpu-x"])
        job = await submit(api, "m", "gpu-x", max_attempts=1)
        await raw.expect("assignment")
        await fail(raw, job.id, 1, "oom", code="OOM")
        metrics = await scrape(h.server)
        assert metrics.value("jobtrace_job_failures_total", service="(other)", kind="oom") == 1
        assert not metrics.matching("jobtrace_job_failures_total", service="gpu-x")
        await raw.close()
