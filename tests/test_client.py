"""The typed clients (async and sync) and the worker runtime, against a real server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobtrace.client import (
    AlreadyExists,
    AnnotationRefused,
    Client,
    Endpoint,
    FailedPrecondition,
    InvalidArgument,
    JobContext,
    NotFound,
    RetryPolicy,
    SyncClient,
    Unavailable,
)
from jobtrace.domain.attest import key_id_of, load_public_key, verify_offline
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import worker_service_pb2 as w

from .conftest import Harness, wait_for
from .proxy import FaultyProxy
from .workers import RawWorker, runtime_worker

FAST = RetryPolicy(attempts=8, initial_backoff=0.05, max_backoff=0.5)


@pytest.fixture
async def client(sqlite_harness: Harness) -> AsyncIterator[Client]:
    async with Client(sqlite_harness.target, retry=FAST) as jt:
        yield jt


async def test_jobs_submit_get_list_and_cancel(client: Client) -> None:
    submission: dict[str, Any] = {
        "request_id": "c-1",
        "priority": 5,
        "max_attempts": 2,
        "timeout": 30,
        "labels": {"team": "imaging"},
        "request_context": {"user_context": {"user_id": "alice"}, "body": {"from": "test"}},
        "annotations": [
            {
                "actor": {"kind": "ACTOR_KIND_USER", "id": "alice"},
                "attributes": {"trigger.source": "client-test"},
            }
        ],
    }
    job = await client.submit_job("resize", {"image": "cat.png", "width": 640}, **submission)
    assert job.state == c.RUN_STATE_QUEUED and job.spec.payload["width"] == 640
    assert job.spec.timeout.seconds == 30 and job.spec.labels["team"] == "imaging"
    again = await client.submit_job("resize", {"image": "cat.png", "width": 640}, **submission)
    assert again.id == job.id, "the same request id returns the same job"
    with pytest.raises(AlreadyExists) as conflict:
        await client.submit_job("resize", {"other": True}, request_id="c-1")
    assert conflict.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert conflict.value.metadata["existing_id"] == job.id
    assert (await client.get_job(job.id)).id == job.id
    other = await client.submit_job("other")
    page = await client.list_jobs(state="QUEUED", service="resize")
    assert [j.id for j in page.items] == [job.id] and page.next_page_token == ""
    everything = [j.id async for j in client.iter_jobs(page_size=1)]
    assert everything == [other.id, job.id], "newest first, across pages of one"
    cancelled = await client.cancel_job(job.id, "no longer needed")
    assert cancelled.state == c.RUN_STATE_CANCELLED
    with pytest.raises(FailedPrecondition):
        await client.cancel_job(job.id)
    annotations = await client.list_annotations(job.id, key_prefix="trigger.")
    assert [a.key for a in annotations.items] == ["trigger.source"]


async def test_errors_carry_status_reason_and_field_violations(client: Client) -> None:
    with pytest.raises(NotFound) as missing:
        await client.get_job("job_00000000000000000000000000")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND and missing.value.reason
    with pytest.raises(InvalidArgument) as bad:
        await client.submit_workflow("broken", [{"name": "a", "job": {"service": ""}}])
    assert [v.field for v in bad.value.violations] == ["steps[0].job.service"]
    assert "INVALID_ARGUMENT" in str(bad.value) and "steps[0].job.service" in str(bad.value)
    with pytest.raises(InvalidArgument) as unknown:
        await client.submit_workflow(
            "broken", [{"name": "a", "job": {"service": "s"}, "depends_on": ["ghost"]}]
        )
    assert [v.field for v in unknown.value.violations] == ["steps[0].depends_on[0]"]
    with pytest.raises(ValueError, match="unknown run_state"):
        await client.list_jobs(state="SLEEPING")


async def test_workflow_watch_trace_attestations_and_annotations(
    client: Client, sqlite_harness: Harness, tmp_path: Path
) -> None:
    async def step(ctx: JobContext) -> dict[str, Any]:
        await ctx.progress(50, "halfway")
        return {"step": ctx.job.step_name}

    async with runtime_worker(sqlite_harness.target, {"demo": step}, max_concurrency=2):
        workflow = await client.submit_workflow(
            "pipeline",
            [
                {"name": "fetch", "job": {"service": "demo"}},
                {"name": "render", "job": {"service": "demo", "payload": {"n": 1}}},
            ],
            request_context={"user_context": {"user_id": "bob"}},
        )
        states = [u.workflow.state async for u in client.watch_workflow(workflow.id)]
    assert states[-1] == c.RUN_STATE_COMPLETED
    assert (await client.get_workflow(workflow.id)).progress.completed_steps == 2
    listed = await client.list_workflows(name="pipeline")
    assert [w_.id for w_ in listed.items] == [workflow.id]

    page = await client.list_trace_events(workflow.id, type="completed")
    assert {e.node_id for e in page.events} >= {"fetch", "render"}
    streamed = [i async for i in client.stream_trace_events(workflow.id, min_level="info")]
    assert streamed[-1].final_status.state == c.RUN_STATE_COMPLETED
    sequences = [i.event.sequence for i in streamed[:-1]]
    assert sequences == sorted(set(sequences)) and len(sequences) >= 6
    status = await client.get_run_status(workflow.id)
    assert status.progress.completed_actions == 2 and status.history_length == sequences[-1]

    attestations = await client.list_attestations(workflow_id=workflow.id)
    keys = {a.key for a in attestations.items}
    assert f"workflow-completion:{workflow.id}" in keys and len(keys) == 3
    key = f"workflow-completion:{workflow.id}"
    attestation = await client.get_attestation(key)
    assert attestation.data["request_context"]["user_context"]["user_id"] == "bob"
    only_completions = await client.list_attestations(
        workflow_id=workflow.id, type="worker_completion"
    )
    assert len(only_completions.items) == 2
    verdict = await client.verify_attestation(key)
    assert verdict.valid and verdict.signature_valid and verdict.chain_valid
    envelope = await client.export_attestation(key)
    (signing_key,) = await client.get_signing_keys()
    public = load_public_key(signing_key.public_key.hex())
    offline = verify_offline(envelope, {key_id_of(signing_key.public_key): public})
    assert offline.valid, offline.reason

    stored = await client.attach_annotations(
        workflow.id,
        {"decision.outcome": "approve", "decision.confidence": 0.75},
        actor={"kind": "ACTOR_KIND_REVIEWER", "id": "carol"},
        idempotency_key="review-1",
    )
    retried = await client.attach_annotations(
        workflow.id,
        {"decision.outcome": "approve", "decision.confidence": 0.75},
        actor={"kind": "ACTOR_KIND_REVIEWER", "id": "carol"},
        idempotency_key="review-1",
    )
    assert {a.id for a in retried} == {a.id for a in stored}, "idempotent by its key"
    decisions = await client.list_annotations(workflow.id, key_prefix="decision.", actor_id="carol")
    assert sorted(a.key for a in decisions.items) == ["decision.confidence", "decision.outcome"]


async def test_trace_appends_are_idempotent_and_keys_are_generated(client: Client) -> None:
    job = await client.submit_job("svc")
    first = await client.append_trace_events(
        job.id, [{"message": "one", "event_key": "k1"}, {"message": "two"}]
    )
    assert first[1].event_key, "a key is generated, so a retry cannot duplicate"
    again = await client.append_trace_events(job.id, [{"message": "one", "event_key": "k1"}])
    assert again[0].sequence == first[0].sequence


async def test_unary_calls_are_retried_while_the_server_is_unreachable(
    sqlite_harness: Harness,
) -> None:
    proxy = FaultyProxy(sqlite_harness.server.port if sqlite_harness.server else 0)
    port = await proxy.start()
    proxy.refuse_next = 2
    try:
        async with Client(f"127.0.0.1:{port}", retry=FAST) as jt:
            job = await jt.submit_job("svc", {"n": 1}, request_id="through-faults")
            assert (await jt.get_job(job.id)).spec.payload["n"] == 1
        assert proxy.refused == 2 and proxy.accepted >= 1
        proxy.cut()  # gRPC shares connections between channels: none may survive
        async with Client(f"127.0.0.1:{port}", retry=RetryPolicy(attempts=1)) as once:
            proxy.refuse_next = 1_000  # down for good: without retries, the first failure is final
            with pytest.raises(Unavailable):
                await once.get_job(job.id)
            proxy.refuse_next = 0
    finally:
        await proxy.close()


@dataclasses.dataclass(frozen=True)
class CountingRetry(RetryPolicy):
    """A fast policy that counts the retries it grants."""

    granted: list[float] = dataclasses.field(default_factory=list)

    def delays(self) -> Iterator[float]:
        for delay in super().delays():
            self.granted.append(delay)
            yield delay


async def test_cancel_is_not_retried(sqlite_harness: Harness) -> None:
    proxy = FaultyProxy(sqlite_harness.server.port if sqlite_harness.server else 0)
    port = await proxy.start()
    proxy.refuse_next = 1_000  # the server is unreachable for this client
    retry = CountingRetry(attempts=3, initial_backoff=0.01, max_backoff=0.02)
    try:
        async with (
            Client(sqlite_harness.target) as direct,
            Client(f"127.0.0.1:{port}", retry=retry) as jt,
        ):
            job = await direct.submit_job("svc")
            with pytest.raises(Unavailable):
                await jt.cancel_job(job.id)
            assert retry.granted == [], "a cancel is never repeated"
            with pytest.raises(Unavailable):
                await jt.get_job(job.id)
            assert len(retry.granted) == 2, "a read is retried while attempts remain"
            assert (await direct.get_job(job.id)).state == c.RUN_STATE_QUEUED
    finally:
        await proxy.close()


async def test_trace_stream_resumes_from_its_cursor_after_a_network_cut(
    sqlite_harness: Harness,
) -> None:
    api = sqlite_harness.stubs()
    proxy = FaultyProxy(sqlite_harness.server.port if sqlite_harness.server else 0)
    port = await proxy.start()
    try:
        async with (
            Client(sqlite_harness.target) as direct,
            Client(f"127.0.0.1:{port}", retry=FAST) as jt,
        ):
            job = await direct.submit_job("svc")
            raw = RawWorker(api)
            await raw.hello("w", ["svc"])
            await raw.expect("assignment")
            seen: list[int] = []
            final: list[c.RunState.ValueType] = []

            async def follow() -> None:
                async for item in jt.stream_trace_events(job.id):
                    if item.WhichOneof("kind") == "event":
                        seen.append(item.event.sequence)
                    else:
                        final.append(item.final_status.state)

            reader = asyncio.create_task(follow())
            batch = [{"message": f"a{i}"} for i in range(10)]
            stored = await direct.append_trace_events(job.id, batch)
            await wait_for(lambda: stored[-1].sequence in seen, timeout=10)
            assert proxy.cut() >= 1
            more = await direct.append_trace_events(
                job.id, [{"message": f"b{i}"} for i in range(10)]
            )
            await raw.send(complete=w.CompleteReport(job_id=job.id, attempt=1))
            await raw.expect("ack")
            await asyncio.wait_for(reader, 15)
            await raw.close()
    finally:
        await proxy.close()
    assert final == [c.RUN_STATE_COMPLETED]
    assert seen == list(range(1, len(seen) + 1)), "every event once, in order, across the cut"
    assert more[-1].sequence in seen and proxy.accepted >= 2


async def test_sync_client(sqlite_harness: Harness) -> None:
    def use() -> tuple[str, list[int], str]:
        with SyncClient(sqlite_harness.target, retry=FAST) as jt:
            job = jt.submit_job("svc", {"n": 2})
            assert jt.get_job(job.id).spec.payload["n"] == 2
            listed = jt.list_jobs()
            try:
                jt.get_job("job_00000000000000000000000000")
            except NotFound as exc:
                missing = exc.reason
            cancelled = jt.cancel_job(job.id)
            states = [j.state for j in jt.watch_job(job.id)]
            return (
                listed.items[0].id,
                [int(s) for s in states],
                missing + ":" + (c.RunState.Name(cancelled.state)),
            )

    first_id, states, tail = await asyncio.to_thread(use)
    assert first_id.startswith("job_") and states == [c.RUN_STATE_CANCELLED]
    assert tail.endswith(":RUN_STATE_CANCELLED") and tail.split(":")[0]


async def test_sync_stream_stopped_early_ends_the_server_stream(sqlite_harness: Harness) -> None:
    api = sqlite_harness.stubs()
    jt = await asyncio.to_thread(SyncClient, sqlite_harness.target)
    try:
        job = await asyncio.to_thread(jt.submit_job, "svc")
        raw = RawWorker(api)
        await raw.hello("w", ["svc"])
        await raw.expect("assignment")
        assert sqlite_harness.server is not None
        streams = sqlite_harness.server.streams
        before = streams.open_streams()  # the worker's own stream

        def first_event() -> tuple[int, int]:
            for item in jt.stream_trace_events(job.id):
                return item.event.sequence, streams.open_streams()
            return 0, 0

        assert await asyncio.to_thread(first_event) == (1, before + 1)
        await wait_for(lambda: streams.open_streams() == before, timeout=5)
        await raw.close()
    finally:
        await asyncio.to_thread(jt.close)


# --- the worker runtime -------------------------------------------------------------


async def test_handlers_may_take_the_job_and_the_context(
    sqlite_harness: Harness, client: Client
) -> None:
    async def run(job: c.Job, ctx: JobContext) -> dict[str, Any]:
        await ctx.progress(10)
        return {"service": job.spec.service, "attempt": ctx.attempt}

    async with runtime_worker(sqlite_harness.target, {"svc": run}):
        job = await client.submit_job("svc")
        done = [j async for j in client.watch_job(job.id)][-1]
    assert done.state == c.RUN_STATE_COMPLETED
    assert done.result["service"] == "svc" and done.result["attempt"] == 1


async def test_handlers_log_to_the_trace_and_annotate_their_attempt(
    sqlite_harness: Harness, client: Client
) -> None:
    async def run(ctx: JobContext) -> dict[str, Any]:
        await ctx.log("loaded 3 rows", data={"stream": "stdout"}, milestone=True)
        await ctx.log("cache miss", level="debug", category="technical")
        await ctx.annotate({"decision.outcome": "approve", "decision.confidence": 0.8})
        with pytest.raises(AnnotationRefused):
            await ctx.annotate({"decision.confidence": 7})  # outside [0, 1]
        return {}

    async with runtime_worker(sqlite_harness.target, {"svc": run}, worker_id="logger"):
        job = await client.submit_job("svc")
        done = [j async for j in client.watch_job(job.id)][-1]
    assert done.state == c.RUN_STATE_COMPLETED
    logged = (await client.list_trace_events(job.id, type="log", view="full")).events
    assert [(e.message, e.data["stream"] if e.data else "") for e in logged][:1] == [
        ("loaded 3 rows", "stdout")
    ]
    assert logged[0].milestone and logged[0].worker_id == "logger" and logged[0].attempt == 1
    assert [e.level for e in logged] == [c.LEVEL_INFO, c.LEVEL_DEBUG]
    notes = (await client.list_annotations(job.id, key_prefix="decision.")).items
    assert sorted((a.key, a.attempt, a.actor.id) for a in notes) == [
        ("decision.confidence", 1, "logger"),
        ("decision.outcome", 1, "logger"),
    ]


async def test_a_result_too_large_fails_the_job_instead_of_hanging(
    sqlite_harness: Harness, client: Client
) -> None:
    async def huge(ctx: JobContext) -> dict[str, Any]:
        return {"blob": "x" * (2 * 1024 * 1024)}

    async def verbose(ctx: JobContext) -> dict[str, Any]:
        raise RuntimeError("e" * 50_000)

    async with runtime_worker(sqlite_harness.target, {"big": huge, "loud": verbose}):
        big = await client.submit_job("big", max_attempts=3)
        loud = await client.submit_job("loud", max_attempts=1)
        ended_big = [j async for j in client.watch_job(big.id)][-1]
        ended_loud = [j async for j in client.watch_job(loud.id)][-1]
    assert ended_big.state == c.RUN_STATE_FAILED and ended_big.attempt == 1, "not retried"
    assert ended_big.failure.code == "RESULT_TOO_LARGE"
    assert ended_loud.state == c.RUN_STATE_FAILED
    assert len(ended_loud.failure.reason) <= 10_000 and ended_loud.failure.reason.startswith("eee")


async def test_a_worker_rides_out_a_server_restart_without_losing_the_attempt(
    sqlite_harness: Harness,
) -> None:
    release = asyncio.Event()
    reported: list[str] = []

    async def slow(ctx: JobContext) -> dict[str, Any]:
        await ctx.progress(10, "before the restart")
        await release.wait()
        await ctx.progress(90, "after the restart")  # may find the stream down: never fails
        reported.append("done")
        return {"ok": True}

    async with Client(sqlite_harness.target, retry=FAST) as jt:
        job = await jt.submit_job("svc", max_attempts=1)
    port = sqlite_harness.server.port if sqlite_harness.server else 0
    async with runtime_worker(sqlite_harness.target, {"svc": slow}) as worker:
        await wait_for(lambda: worker.running_jobs == [job.id], timeout=10)
        await sqlite_harness.stop()  # drain: the worker keeps its lease
        release.set()
        await wait_for(lambda: reported == ["done"], timeout=10)
        await sqlite_harness.start(listen=f"127.0.0.1:{port}")
        async with Client(sqlite_harness.target, retry=FAST) as jt:
            await wait_for(
                lambda: _state(jt, job.id, c.RUN_STATE_COMPLETED), timeout=20, interval=0.1
            )
            done = await jt.get_job(job.id)
    assert done.attempt == 1 and done.result["ok"] is True


async def _state(jt: Client, job_id: str, state: int) -> bool:
    with contextlib.suppress(Unavailable):
        return (await jt.get_job(job_id)).state == state
    return False


async def test_client_worker_and_cli_over_mutual_tls_with_tokens(
    sqlite_url: str, tmp_path: Path
) -> None:
    from .procs import jobtrace
    from .test_security import _make_ca_and_cert, token, write_tokens

    files = _make_ca_and_cert(tmp_path)
    tokens = tmp_path / "tokens.yaml"
    write_tokens(tokens)
    h = Harness(
        sqlite_url,
        tokens_file=str(tokens),
        tls_cert=str(files["server_cert"]),
        tls_key=str(files["server_key"]),
        tls_client_ca=str(files["ca"]),
    )
    await h.start()
    assert h.server is not None
    target = f"localhost:{h.server.port}"
    tls = {
        "ca_file": str(files["ca"]),
        "client_cert_file": str(files["client_cert"]),
        "client_key_file": str(files["client_key"]),
    }
    try:
        endpoint = Endpoint(target=target, token=token("worker", "acme"), **tls)

        async def run(ctx: JobContext) -> dict[str, Any]:
            return {"secure": True}

        async with (
            Client(target, token=token("submitter", "acme"), **tls) as jt,
            runtime_worker(target, {"svc": run}, endpoint=endpoint),
        ):
            job = await jt.submit_job("svc")
            done = [j async for j in jt.watch_job(job.id)][-1]
            assert done.state == c.RUN_STATE_COMPLETED and done.result["secure"] is True
        tls_flags = [
            "--target", target, "--tls-ca", tls["ca_file"],
            "--client-cert", tls["client_cert_file"], "--client-key", tls["client_key_file"],
        ]  # fmt: skip
        code, out, err = await jobtrace(
            "get", job.id, "--json", "--token", token("reader", "acme"), *tls_flags
        )
        assert code == 0 and json.loads(out)["state"] == "RUN_STATE_COMPLETED", err
        code, _, err = await jobtrace("get", job.id, *tls_flags)
        assert code == 2 and "UNAUTHENTICATED" in err and "--token" in err
        code, _, err = await jobtrace(
            "get", job.id, "--token", token("reader", "umbrella"), *tls_flags
        )
        assert code == 2 and "NOT_FOUND" in err, "another tenant's job does not exist for you"
    finally:
        await h.stop()


async def test_the_runtime_resends_a_report_the_server_could_not_store(
    sqlite_harness: Harness, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import exc as sa_exc

    assert sqlite_harness.server is not None
    scheduler = sqlite_harness.server.scheduler
    real_complete = scheduler.complete
    refusals: list[str] = []

    async def flaky(*args: Any, **kwargs: Any) -> None:
        if not refusals:  # the first try meets a database outage
            refusals.append("down")
            raise sa_exc.OperationalError("UPDATE jobs", {}, ConnectionResetError("reset"))
        await real_complete(*args, **kwargs)

    monkeypatch.setattr(scheduler, "complete", flaky)

    async def run(ctx: JobContext) -> dict[str, Any]:
        return {"n": 1}

    async with runtime_worker(sqlite_harness.target, {"svc": run}):
        job = await client.submit_job("svc", max_attempts=1)
        done = [j async for j in client.watch_job(job.id)][-1]
    assert refusals == ["down"]
    assert done.state == c.RUN_STATE_COMPLETED and done.attempt == 1 and done.result["n"] == 1


@pytest.mark.parametrize(
    ("endpoint", "warns"),
    [
        ({"target": "203.0.113.7:50051", "token": "t"}, True),
        ({"target": "jobtrace.internal:50051", "token": "t"}, True),  # names are not resolved
        ({"target": "dns:///jobtrace.internal:50051", "token": "t"}, True),
        ({"target": "[2001:db8::1]:50051", "token": "t"}, True),
        ({"target": "127.0.0.1:50051", "token": "t"}, False),
        ({"target": "127.0.0.2:50051", "token": "t"}, False),
        ({"target": "localhost:50051", "token": "t"}, False),
        ({"target": "[::1]:50051", "token": "t"}, False),
        ({"target": "unix:/tmp/jobtrace.sock", "token": "t"}, False),
        ({"target": "203.0.113.7:50051", "token": "t", "tls": True}, False),
        ({"target": "203.0.113.7:50051"}, False),  # no token to leak
    ],
)
async def test_a_token_without_tls_to_a_remote_host_warns(
    endpoint: dict[str, Any], warns: bool
) -> None:
    """Building the channel is enough: no call is made, nothing leaves the host."""
    import warnings

    from jobtrace.client import InsecureTokenWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        channel = Endpoint(**endpoint).channel()
    await channel.close()
    mine = [w for w in caught if issubclass(w.category, InsecureTokenWarning)]
    assert bool(mine) is warns, [str(w.message) for w in caught]
    if warns:
        assert "without TLS" in str(mine[0].message)
        assert endpoint["target"] in str(mine[0].message)
