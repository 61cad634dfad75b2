"""Credentials against a real server: the roles rule, and the exposure check on
resolved addresses."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from jobtrace.auth import Authenticator, hash_token
from jobtrace.config import Settings
from jobtrace.pb import common_pb2 as c
from jobtrace.pb import job_service_pb2 as j
from jobtrace.server import check_exposure

from .conftest import Harness
from .test_security import ISSUER, SECRET, bearer, code_of, make_jwt


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


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
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(
        "tokens:\n"
        f"  - sha256: {hash_token('tok-one')}\n"
        "    subject: api\n"
        "    tenant: acme\n"
        f"    roles: {roles}\n"
    )
    with pytest.raises(OSError, match="cannot load tokens") as caught:
        await Harness(sqlite_url, tokens_file=str(tokens)).start()
    assert problem in str(caught.value)


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
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(text)
    with pytest.raises(OSError, match="cannot load tokens") as caught:
        await Harness(sqlite_url, tokens_file=str(tokens)).start()
    assert problem in str(caught.value)


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
    # With authentication on, any address may be used.
    check_exposure(Settings(listen="127.evil.example:1"), Authenticator(jwt=_any_jwt()), names)

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jobtrace",
        "serve",
        "--listen",
        "127.evil.example:0",
        "--db",
        sqlite_url.split("///", 1)[1],
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1 and b"cannot resolve" in err and b"Traceback" not in err


def _real(host: str) -> list[str]:
    from jobtrace.server import resolve

    return resolve(host)


def _any_jwt() -> Any:
    from jobtrace.auth import JwtSettings

    return JwtSettings("HS256", SECRET, ISSUER, "jobtrace")
