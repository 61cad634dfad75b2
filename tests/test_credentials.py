"""Credentials over time, against a real server: the roles rule, reloading the
credential files (on change and on SIGHUP), streams that end when their
credentials lapse, and the exposure check on resolved addresses."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from jobtrace.auth import Authenticator, hash_token
from jobtrace.config import Settings
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.pb import trace_service_pb2 as t
from jobtrace.pb import worker_service_pb2 as w
from jobtrace.server import check_exposure

from .conftest import Harness, stubs_for, wait_for
from .procs import drain, jobtrace, serve
from .test_security import ISSUER, SECRET, bearer, code_of, make_jwt, refusal_of_tokens_file
from .workers import terminate


def tokens_doc(*entries: tuple[str, str, str, list[str]]) -> str:
    """A tokens file admitting (token, subject, tenant, roles) for each entry."""
    return yaml.safe_dump(
        {
            "tokens": [
                {"sha256": hash_token(tok), "subject": sub, "tenant": tenant, "roles": roles}
                for tok, sub, tenant, roles in entries
            ]
        }
    )


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def read_until_error(call: Any, timeout: float = 20.0) -> tuple[list[Any], Any]:
    """Every message of a stream until it ends with an error: (messages, error)."""
    messages = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                message = await call.read()
            except grpc.aio.AioRpcError as err:
                return messages, err
            assert message is not grpc.aio.EOF, "the stream ended OK"
            messages.append(message)


# --- the roles rule --------------------------------------------------------------------

BAD_ROLES = [
    {"admin": False, "reader": True},  # an object is not its keys
    5,
    True,
    ["reader", 7],
    ["root"],
    "reader submitter",  # one string is one role name
    [["admin"]],
]


async def test_jwt_roles_that_are_not_role_names_are_unauthenticated(
    db_url: str,
) -> None:
    """A JWT of tenant globex whose `roles` is {"admin": false, "reader": true}
    was read as the roles admin and reader: it listed and cancelled acme's job."""
    async with Harness(db_url, jwt_secret=SECRET, jwt_issuer=ISSUER) as h:
        api = h.stubs()
        acme = bearer(make_jwt(roles=["submitter"]))
        job = (
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="r", job=c.JobSpec(service="s")), metadata=acme
            )
        ).job
        for roles in BAD_ROLES:
            md = bearer(make_jwt(sub="intruder", tenant="globex", roles=roles))
            for call in (
                api.jobs.ListJobs(j.ListJobsRequest(), metadata=md),
                api.jobs.CancelJob(j.CancelJobRequest(job_id=job.id), metadata=md),
            ):
                err = await rpc_error(call)
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (roles, err)
                assert "token claim 'roles'" in (err.details() or ""), err.details()
        unchanged = (await api.jobs.GetJob(j.GetJobRequest(job_id=job.id), metadata=acme)).job
        assert unchanged.state == c.RUN_STATE_QUEUED
        # What is allowed: one role name, a list of them; no roles claim is no role.
        reader = bearer(make_jwt(tenant="globex", roles="reader"))
        assert await code_of(api.jobs.ListJobs(j.ListJobsRequest(), metadata=reader)) == "OK"
        both = bearer(make_jwt(tenant="globex", roles=["reader", "submitter"]))
        assert await code_of(api.jobs.ListJobs(j.ListJobsRequest(), metadata=both)) == "OK"
        none = bearer(make_jwt(tenant="globex", roles=None))
        assert await code_of(api.jobs.ListJobs(j.ListJobsRequest(), metadata=none)) == (
            "PERMISSION_DENIED"
        )


@pytest.mark.parametrize(
    ("roles", "problem"),
    [
        ("{admin: false, reader: true}", "tokens[0].roles: must be a role name or a list"),
        ("5", "tokens[0].roles: must be a role name or a list of role names, got 5"),
        ("[reader, 7]", "tokens[0].roles: must be a role name or a list"),
        ("[root]", "tokens[0].roles: unknown role 'root'"),
        ("'reader submitter'", "tokens[0].roles: unknown role 'reader submitter'"),
    ],
)
async def test_tokens_file_with_malformed_roles_refuses_to_load(
    sqlite_url: str, tmp_path: Path, roles: str, problem: str
) -> None:
    text = (
        "tokens:\n"
        f"  - sha256: {hash_token('tok-one')}\n"
        "    subject: api\n"
        "    tenant: acme\n"
        f"    roles: {roles}\n"
    )
    assert problem in await refusal_of_tokens_file(sqlite_url, tmp_path, text)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "must hold a `tokens:` list"),  # empty or truncated: not "no tokens"
        ("tokens: 5\n", "must hold a `tokens:` list"),
        ("tokens: [5]\n", "tokens[0]: must be a mapping"),
        ("tokens: [{sha256: [x\n", "not valid YAML"),
    ],
)
async def test_malformed_tokens_file_refuses_to_load(
    sqlite_url: str, tmp_path: Path, text: str, problem: str
) -> None:
    assert problem in await refusal_of_tokens_file(sqlite_url, tmp_path, text)


# --- streams end when their credentials lapse -------------------------------------------


async def test_streams_opened_with_a_jwt_end_when_it_expires(db_url: str) -> None:
    async with Harness(
        db_url, jwt_secret=SECRET, jwt_issuer=ISSUER, lease_seconds=30, heartbeat_seconds=1
    ) as h:
        api = h.stubs()
        admin = bearer(make_jwt(roles=["admin"]))
        first = (
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="a", job=c.JobSpec(service="s")), metadata=admin
            )
        ).job
        expires = int(time.time()) + 3
        short = bearer(make_jwt(sub="pool", roles=["worker", "reader"], exp=expires))
        worker = api.workers.Connect(metadata=short)
        await worker.write(
            w.ConnectRequest(hello=w.WorkerHello(worker_id="p1", services=["s"], max_concurrency=4))
        )
        assert (await worker.read()).WhichOneof("kind") == "welcome"
        assert (await worker.read()).assignment.job.id == first.id
        watch = api.jobs.WatchJob(j.WatchJobRequest(job_id=first.id), metadata=short)
        assert (await watch.read()).job.id == first.id
        trace = api.trace.StreamTraceEvents(
            t.StreamTraceEventsRequest(run_id=first.id, follow=True), metadata=short
        )
        runs = api.jobs.WatchRuns(j.WatchRunsRequest(), metadata=short)
        assert (await runs.read()).WhichOneof("kind") == "snapshot_end"

        await wait_for(lambda: time.time() >= expires, timeout=10)
        second = (
            await api.jobs.SubmitJob(
                j.SubmitJobRequest(request_id="b", job=c.JobSpec(service="s")), metadata=admin
            )
        ).job
        messages, error = await read_until_error(worker)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "token expired" in error.details()
        assigned = [m.assignment.job.id for m in messages if m.WhichOneof("kind") == "assignment"]
        assert second.id not in assigned and not assigned, "an assignment after the expiry"
        for stream in (watch, trace, runs):
            _, error = await read_until_error(stream)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "token expired" in error.details()
        # The expired worker's job went back to the queue, as for a lost stream,
        # and a worker with a valid token gets both jobs.
        await wait_for(lambda: _state(api, first.id, admin, c.RUN_STATE_QUEUED), timeout=30)
        fresh = api.workers.Connect(metadata=bearer(make_jwt(sub="pool", roles=["worker"])))
        await fresh.write(
            w.ConnectRequest(hello=w.WorkerHello(worker_id="p1", services=["s"], max_concurrency=4))
        )
        assert (await fresh.read()).WhichOneof("kind") == "welcome"
        got = set()
        async with asyncio.timeout(20):
            while len(got) < 2:
                message = await fresh.read()
                if message.WhichOneof("kind") == "assignment":
                    got.add(message.assignment.job.id)
        assert got == {first.id, second.id}
        fresh.cancel()


# --- the exposure check resolves addresses -------------------------------------------


async def test_exposure_check_resolves_the_host_instead_of_reading_it(
    sqlite_url: str,
) -> None:
    """`127.evil.example` starts with "127." but is no loopback address."""
    h = Harness(sqlite_url)
    with pytest.raises(OSError, match=r"cannot resolve '127\.evil\.example'"):
        await h.start(listen="127.evil.example:0")
    with pytest.raises(OSError, match=r"refusing to serve metrics on 0\.0\.0\.0:0 without auth"):
        await h.start(metrics_port=0, metrics_host="0.0.0.0")
    with pytest.raises(OSError, match=r"cannot resolve '127\.evil\.example' \(to serve metrics"):
        await h.start(metrics_port=0, metrics_host="127.evil.example")
    # Names resolving to loopback addresses are fine.
    server = await h.start(listen="localhost:0", metrics_port=0, metrics_host="localhost")
    assert server.port and server.metrics_port
    await h.stop()

    def resolver(table: dict[str, list[str]]) -> Any:
        return lambda host: table[host]

    names = resolver(
        {
            "127.evil.example": ["203.0.113.7"],
            "split.example": ["127.0.0.1", "192.0.2.1"],
            "local.example": ["127.0.0.2", "::1", "::ffff:127.0.0.1"],
        }
    )
    no_auth = Authenticator()
    for listen, refused in (
        ("127.evil.example:1", "'127.evil.example' resolves to 203.0.113.7"),
        ("split.example:1", "'split.example' resolves to 192.0.2.1"),
        ("[::]:1", "'::' resolves to"),
        (":1", "'' resolves to 0.0.0.0"),
    ):
        with pytest.raises(OSError, match=re.escape(refused)):
            check_exposure(
                Settings(listen=listen), no_auth, names if "example" in listen else _real
            )
    check_exposure(Settings(listen="local.example:1"), no_auth, names)
    # With authentication and TLS on, any address may be used.
    check_exposure(
        Settings(listen="127.evil.example:1", tls_cert="server.pem"),
        Authenticator(jwt=_any_jwt()),
        names,
    )

    code, _, err = await jobtrace(
        "serve", "--listen", "127.evil.example:0", "--db", sqlite_url.split("///", 1)[1], timeout=30
    )
    assert code == 1 and "cannot resolve" in err and "Traceback" not in err


# --- tokens over plaintext --------------------------------------------------------------


async def test_tokens_over_plaintext_off_loopback_are_refused_at_startup(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Auth without TLS on a non-loopback address: refused before binding."""
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(tokens_doc(("tok-admin", "ops", "acme", ["admin"])))
    for auth in ({"tokens_file": str(tokens)}, {"jwt_secret": SECRET, "jwt_issuer": ISSUER}):
        h = Harness(sqlite_url, **auth)
        with pytest.raises(
            OSError, match=r"refusing to accept tokens over plaintext on 0\.0\.0\.0:0"
        ) as caught:
            await h.start(listen="0.0.0.0:0")
        assert "--allow-insecure-auth" in str(caught.value) and h.server is not None
        assert h.server.port == 0
        # On loopback, plaintext is fine.
        await h.start(listen="localhost:0")
        await h.stop()
    code, _, err = await jobtrace(
        "serve", "--listen", "0.0.0.0:0", "--tokens-file", str(tokens),
        "--db", sqlite_url.split("///", 1)[1], timeout=30,
    )  # fmt: skip
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [
        "jobtrace serve: refusing to accept tokens over plaintext on 0.0.0.0:0: '0.0.0.0' "
        "resolves to 0.0.0.0, not a loopback address; configure --tls-cert/--tls-key, "
        "use 127.0.0.1, or pass --allow-insecure-auth"
    ]


async def test_allow_insecure_auth_starts_off_loopback_with_a_warning(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A fake resolver says `localhost` is a LAN address: the server binds only
    loopback for real, and takes the path of a non-loopback one."""
    from jobtrace.server import JobtraceServer

    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(tokens_doc(("tok-admin", "ops", "acme", ["admin"])))
    values = {
        "listen": "localhost:0",
        "db": sqlite_url,
        "tokens_file": str(tokens),
        "signing_key_file": str(tmp_path / "signing.key"),
    }

    def lan(host: str) -> list[str]:
        return {"localhost": ["192.0.2.10"]}[host]

    refused = JobtraceServer(Settings(**values), resolve=lan)
    with pytest.raises(OSError, match=r"'localhost' resolves to 192\.0\.2\.10"):
        await refused.start()
    allowed = JobtraceServer(Settings(**values, allow_insecure_auth=True), resolve=lan)
    with caplog.at_level(logging.WARNING, logger="jobtrace.server"):
        assert await allowed.start()
    try:
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(
            "--allow-insecure-auth: accepting tokens over plaintext on localhost:0" in m
            and "192.0.2.10" in m
            for m in warned
        ), warned
    finally:
        await allowed.stop(0)
    # The setting comes from the environment too (the flag is parsed below).
    assert Settings.load(env={"JOBTRACE_ALLOW_INSECURE_AUTH": "1"}).allow_insecure_auth
    assert not Settings.load(env={}).allow_insecure_auth
    from jobtrace.cli import build_parser

    args = build_parser().parse_args(["serve", "--allow-insecure-auth"])
    assert args.allow_insecure_auth is True


async def test_an_hs256_secret_shorter_than_32_bytes_is_refused(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    short = "s" * 31
    with pytest.raises(OSError, match=r"HS256 JWT secret .* is 31 bytes; it must be at least 32"):
        await Harness(sqlite_url, jwt_secret=short, jwt_issuer=ISSUER).start()
    # Bytes, not characters: 11 three-byte characters are 33 bytes.
    async with Harness(sqlite_url, jwt_secret="\u20ac" * 11, jwt_issuer=ISSUER) as h:
        assert h.server is not None and h.server.port
    monkeypatch.setenv("JOBTRACE_JWT_SECRET", short)
    code, _, err = await jobtrace(
        "serve", "--listen", "127.0.0.1:0", "--jwt-issuer", ISSUER,
        "--db", sqlite_url.split("///", 1)[1], timeout=30,
    )  # fmt: skip
    assert code == 1 and "Traceback" not in err
    assert "is 31 bytes; it must be at least 32" in err and len(err.strip().splitlines()) == 1


def _real(host: str) -> list[str]:
    from jobtrace.server import resolve

    return resolve(host)


def _any_jwt() -> Any:
    from jobtrace.auth import JwtSettings

    return JwtSettings("HS256", SECRET, ISSUER, "jobtrace")


# --- reloading the tokens file -----------------------------------------------------------


@pytest.fixture
async def reloading(sqlite_url: str, tmp_path: Path) -> AsyncIterator[tuple[Harness, Path]]:
    """A server whose tokens file is checked for changes every 50 ms."""
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        tokens_doc(
            ("tok-admin", "ops", "acme", ["admin"]),
            ("tok-old", "old-reader", "acme", ["reader"]),
            ("tok-pool", "pool", "acme", ["worker"]),
        )
    )
    async with Harness(
        sqlite_url, tokens_file=str(tokens), reload_interval_seconds=0.05, heartbeat_seconds=0.5
    ) as h:
        yield h, tokens


async def test_a_changed_tokens_file_is_reloaded_and_ends_the_streams_of_removed_tokens(
    reloading: tuple[Harness, Path], caplog: pytest.LogCaptureFixture
) -> None:
    h, tokens = reloading
    assert h.server is not None
    api = h.stubs()
    admin = bearer("tok-admin")
    job = (
        await api.jobs.SubmitJob(
            j.SubmitJobRequest(request_id="r", job=c.JobSpec(service="s")), metadata=admin
        )
    ).job
    assert await code_of(api.jobs.ListJobs(j.ListJobsRequest(), metadata=bearer("tok-new"))) == (
        "UNAUTHENTICATED"
    )
    # Streams opened with the tokens about to be removed: a watch and a worker
    # holding the job.
    watch = api.jobs.WatchJob(j.WatchJobRequest(job_id=job.id), metadata=bearer("tok-old"))
    assert (await watch.read()).job.id == job.id
    worker = api.workers.Connect(metadata=bearer("tok-pool"))
    await worker.write(w.ConnectRequest(hello=w.WorkerHello(worker_id="p1", services=["s"])))
    assert (await worker.read()).WhichOneof("kind") == "welcome"
    assert (await worker.read()).assignment.job.id == job.id
    # Each stream waits on its credentials; a cancelled one stops waiting.
    await wait_for(lambda: h.server is not None and h.server.auth.watchers == 2)
    cancelled = api.jobs.WatchJob(j.WatchJobRequest(job_id=job.id), metadata=admin)
    assert (await cancelled.read()).job.id == job.id
    await wait_for(lambda: h.server is not None and h.server.auth.watchers == 3)
    cancelled.cancel()
    await wait_for(lambda: h.server is not None and h.server.auth.watchers == 2)

    caplog.set_level(logging.INFO, logger="jobtrace.auth.reload")
    tokens.write_text(
        tokens_doc(
            ("tok-admin", "ops", "acme", ["admin"]),
            ("tok-new", "new-reader", "acme", ["reader"]),
        )
    )
    _, watch_error = await read_until_error(watch)
    assert watch_error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "token revoked" in watch_error.details()
    messages, worker_error = await read_until_error(worker)
    assert worker_error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "token revoked" in worker_error.details()
    assert not [m for m in messages if m.WhichOneof("kind") == "assignment"]
    # The worker's lease was given back like a lost stream's.
    await wait_for(
        lambda: _state(api, job.id, admin, c.RUN_STATE_QUEUED, c.RUN_STATE_FAILED), timeout=30
    )
    # New calls: the removed token is refused, the added one admitted.
    for tok, code in (("tok-old", "UNAUTHENTICATED"), ("tok-new", "OK"), ("tok-admin", "OK")):
        assert await code_of(api.jobs.ListJobs(j.ListJobsRequest(), metadata=bearer(tok))) == code
    (changed,) = [
        r.getMessage() for r in caplog.records if "tokens file reloaded" in r.getMessage()
    ]
    assert "added acme/new-reader" in changed and "removed acme/old-reader, acme/pool" in changed
    assert "tok-" not in caplog.text and hash_token("tok-new") not in caplog.text
    await wait_for(lambda: h.server is not None and h.server.auth.watchers == 0)

    # A half-written or invalid file keeps the tokens in service and logs why.
    for broken in ("tokens:\n  - sha256: ", "", "tokens: [{sha256: x, subject: a}]\n"):
        caplog.clear()
        tokens.write_text(broken)
        await wait_for(lambda: "reloading the tokens file failed" in caplog.text)
        assert [r.levelno for r in caplog.records if r.name == "jobtrace.auth.reload"] == [
            logging.ERROR
        ]
        for tok in ("tok-new", "tok-admin"):
            assert await code_of(api.jobs.ListJobs(j.ListJobsRequest(), metadata=bearer(tok))) == (
                "OK"
            )
    # An emptied list admits nobody (authentication stays on: no anonymous admin).
    tokens.write_text("tokens: []\n")
    await wait_for(
        lambda: _code(api, bearer("tok-admin"), "UNAUTHENTICATED"),
    )
    assert await code_of(api.jobs.ListJobs(j.ListJobsRequest())) == "UNAUTHENTICATED"


async def _state(api: Any, job_id: str, md: Any, *states: int) -> bool:
    job = (await api.jobs.GetJob(j.GetJobRequest(job_id=job_id), metadata=md)).job
    return job.state in states


async def _code(api: Any, md: Any, code: str) -> bool:
    return await code_of(api.jobs.ListJobs(j.ListJobsRequest(), metadata=md)) == code


async def test_sighup_reloads_the_tokens_file_and_the_server_survives(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        tokens_doc(("tok-a", "alpha", "acme", ["submitter"]), ("tok-b", "beta", "acme", ["reader"]))
    )
    proc, port, _ = await serve(
        "--db",
        str(tmp_path / "jobtrace.db"),
        "--tokens-file",
        str(tokens),
        "--log-format",
        "text",
        # SIGHUP only: no poll can be what reloads (--reload-interval-seconds 0).
        env={**os.environ, "JOBTRACE_RELOAD_INTERVAL_SECONDS": "0"},
    )
    log_lines: list[str] = []
    try:
        collector = drain(proc, into=log_lines)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            api = stubs_for(channel)

            async def code(tok: str) -> str:
                return await code_of(api.jobs.ListJobs(j.ListJobsRequest(), metadata=bearer(tok)))

            assert (await code("tok-a"), await code("tok-c")) == ("OK", "UNAUTHENTICATED")
            tokens.write_text(
                tokens_doc(
                    ("tok-b", "beta", "acme", ["reader"]), ("tok-c", "gamma", "acme", ["reader"])
                )
            )
            proc.send_signal(signal.SIGHUP)
            await wait_for(lambda: any("tokens file reloaded" in ln for ln in log_lines), 20)
            assert proc.returncode is None, "SIGHUP ended the server"
            assert await code("tok-a") == "UNAUTHENTICATED"
            assert await code("tok-c") == "OK"
            assert await code("tok-b") == "OK"
            (reloaded,) = [ln for ln in log_lines if "tokens file reloaded" in ln]
            assert "added acme/gamma" in reloaded and "removed acme/alpha" in reloaded
        await terminate(proc)
        assert proc.returncode == 0
        await collector
        assert not any("tok-" in ln for ln in log_lines), "a token was logged"
    finally:
        await terminate(proc)


def _rsa_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_public(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _self_signed(serial: int) -> tuple[bytes, bytes]:
    """A certificate for localhost, its own CA, and its key (PEM)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"server-{serial}")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


async def test_the_jwt_public_key_and_the_tls_certificate_follow_their_files(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import jwt

    signers = [_rsa_key(), _rsa_key()]
    certs = [_self_signed(1), _self_signed(2)]
    public, cert_file, key_file = tmp_path / "jwt.pub", tmp_path / "tls.pem", tmp_path / "tls.key"
    public.write_bytes(_pem_public(signers[0]))
    cert_file.write_bytes(certs[0][0])
    key_file.write_bytes(certs[0][1])
    async with Harness(
        sqlite_url,
        jwt_algorithm="RS256",
        jwt_public_key_file=str(public),
        jwt_issuer=ISSUER,
        tls_cert=str(cert_file),
        tls_key=str(key_file),
        reload_interval_seconds=0.05,
    ) as h:
        assert h.server is not None
        target = f"localhost:{h.server.port}"

        async def code(trusted: int, signer: int) -> str:
            """ListJobs over a new connection trusting certs[trusted] only, with a
            JWT signed by signers[signer]."""
            claims = {"sub": "s", "tenant": "acme", "roles": "reader", "iss": ISSUER}
            claims.update(aud="jobtrace", exp=int(time.time()) + 60)
            token = jwt.encode(claims, signers[signer], algorithm="RS256")
            credentials = grpc.ssl_channel_credentials(certs[trusted][0])
            options = [("grpc.use_local_subchannel_pool", 1)]
            async with grpc.aio.secure_channel(target, credentials, options) as channel:
                api = stubs_for(channel)
                return await code_of(
                    api.jobs.ListJobs(j.ListJobsRequest(), metadata=bearer(token), timeout=5)
                )

        assert (await code(0, 0), await code(1, 0), await code(0, 1)) == (
            "OK",
            "UNAVAILABLE",
            "UNAUTHENTICATED",
        )
        caplog.set_level(logging.INFO, logger="jobtrace.auth.reload")
        public.write_bytes(_pem_public(signers[1]))
        key_file.write_bytes(certs[1][1])
        cert_file.write_bytes(certs[1][0])
        await wait_for(lambda: _is(code(1, 1), "OK"), timeout=20)
        assert (await code(1, 0), await code(0, 1)) == ("UNAUTHENTICATED", "UNAVAILABLE")
        assert "JWT public key reloaded: new key in use" in caplog.text
        # Files that do not load keep what is in service.
        caplog.clear()
        key_file.write_bytes(certs[0][1])  # not the key of certs[1]
        public.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n")
        await wait_for(
            lambda: (
                "reloading the TLS certificate failed" in caplog.text
                and "reloading the JWT public key failed" in caplog.text
            )
        )
        assert "is not the key of the certificate" in caplog.text
        assert await code(1, 1) == "OK"


async def _is(call: Any, expected: str) -> bool:
    return await call == expected
