"""Fixtures: a real jobtrace server on an ephemeral loopback port with a real database."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from jobtrace.config import Settings
from jobtrace.pb import (
    attestation_service_pb2_grpc,
    job_service_pb2_grpc,
    trace_service_pb2_grpc,
    worker_service_pb2_grpc,
)
from jobtrace.server import JobtraceServer


async def wait_for(
    predicate: Callable[[], Any | Awaitable[Any]], timeout: float = 5.0, interval: float = 0.01
) -> Any:
    """Poll a condition until it holds or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@dataclass
class Stubs:
    channel: grpc.aio.Channel
    jobs: job_service_pb2_grpc.JobServiceStub
    workers: worker_service_pb2_grpc.WorkerServiceStub
    trace: trace_service_pb2_grpc.TraceServiceStub
    attest: attestation_service_pb2_grpc.AttestationServiceStub


def stubs_for(channel: grpc.aio.Channel) -> Stubs:
    return Stubs(
        channel=channel,
        jobs=job_service_pb2_grpc.JobServiceStub(channel),
        workers=worker_service_pb2_grpc.WorkerServiceStub(channel),
        trace=trace_service_pb2_grpc.TraceServiceStub(channel),
        attest=attestation_service_pb2_grpc.AttestationServiceStub(channel),
    )


class Harness:
    """Starts and restarts servers on one database, and hands out channels."""

    def __init__(self, db_url: str, **settings: Any) -> None:
        self.db_url = db_url
        settings.setdefault(
            "signing_key_file", str(Path(tempfile.mkdtemp(prefix="jt-key-")) / "signing.key")
        )
        self.settings = settings
        self.server: JobtraceServer | None = None
        self._channels: list[grpc.aio.Channel] = []

    async def start(self, **overrides: Any) -> JobtraceServer:
        values = {"listen": "127.0.0.1:0", "db": self.db_url, **self.settings, **overrides}
        self.server = JobtraceServer(Settings(**values))
        await self.server.start()
        return self.server

    async def __aenter__(self) -> Harness:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    async def stop(self, grace: float = 1.0) -> None:
        for channel in self._channels:
            await _bounded(channel.close(), "channel close")
        self._channels.clear()
        if self.server is not None:
            await _bounded(self.server.stop(grace), "server stop")
            self.server = None

    @property
    def target(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.port}"

    @property
    def http_url(self) -> str:
        """The HTTP listener's base URL (start the server with http_listen="127.0.0.1:0")."""
        assert self.server is not None and self.server.http_port is not None
        return f"http://127.0.0.1:{self.server.http_port}"

    def stubs(self) -> Stubs:
        channel = grpc.aio.insecure_channel(self.target)
        self._channels.append(channel)
        return stubs_for(channel)


async def _bounded(step: Awaitable[Any], what: str, timeout: float = 20.0) -> None:
    """Fail loudly (with every task's stack) instead of hanging a teardown."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        import io

        out = io.StringIO()
        for t in asyncio.all_tasks():
            print("task", t.get_name(), file=out)
            for frame in t.get_stack(limit=8):
                code = frame.f_code
                print(f"  {code.co_filename}:{frame.f_lineno} {code.co_name}", file=out)
        raise AssertionError(f"{what} did not finish within {timeout}s\n{out.getvalue()}")
    task.result()


PG_ADMIN_URL = os.environ.get("JOBTRACE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


async def pg_problem() -> str:
    """'' when PostgreSQL answers, else why not (probed once per run)."""
    global _PG_PROBLEM
    if _PG_PROBLEM is None:
        try:
            import asyncpg

            conn = await asyncpg.connect(PG_ADMIN_URL, timeout=3)
            await conn.close()
            _PG_PROBLEM = ""
        except Exception as exc:
            _PG_PROBLEM = f"PostgreSQL at {PG_ADMIN_URL} is not reachable: {exc}"
    return _PG_PROBLEM


_PG_PROBLEM: str | None = None


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _pg_base() -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")


async def _fresh_pg(template: str | None = None) -> AsyncIterator[str]:
    problem = await pg_problem()
    if problem:
        if require_pg():
            pytest.fail(f"JOBTRACE_REQUIRE_PG=1 but {problem}")
        pytest.skip(problem)
    import uuid

    name = f"jt_{uuid.uuid4().hex[:12]}"
    await _pg_admin(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    try:
        yield f"{_pg_base()}/{name}"
    finally:
        await _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for one test (so runs never collide):
    the server that starts on it runs every migration."""
    async for url in _fresh_pg():
        yield url


# This session's (this xdist worker's) migrated template database, made on first use.
_PG_TEMPLATE: str | None = None


async def _pg_template() -> str:
    """A database that every migration has run on, once per session: a copy of it
    (CREATE DATABASE ... TEMPLATE, a file copy) is what a server would make of an
    empty database, without running the migrations again in every test."""
    global _PG_TEMPLATE
    if _PG_TEMPLATE is None:
        import uuid

        from sqlalchemy.ext.asyncio import create_async_engine

        from jobtrace.store.db import _upgrade

        name = f"jt_template_{uuid.uuid4().hex[:12]}"
        await _pg_admin(f"CREATE DATABASE {name}")
        engine = create_async_engine(f"{_pg_base()}/{name}")
        try:
            async with engine.begin() as conn:
                await conn.run_sync(_upgrade)
        except BaseException:
            await engine.dispose()
            await _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            raise
        await engine.dispose()  # a template may have no connections while copied
        _PG_TEMPLATE = name
    return _PG_TEMPLATE


@pytest.fixture(scope="session", autouse=True)
def _drop_pg_template() -> Iterator[None]:
    yield
    if _PG_TEMPLATE is not None:
        asyncio.run(_pg_admin(f"DROP DATABASE IF EXISTS {_PG_TEMPLATE} WITH (FORCE)"))


@pytest.fixture
async def pg_migrated_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for one test with the schema at head: a copy
    of the session's template (the server's start finds nothing to migrate)."""
    problem = await pg_problem()
    template = "" if problem else await _pg_template()
    async for url in _fresh_pg(template or None):
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'jobtrace.db'}"


# This session's SQLite database that every migration has run on, made on first use.
_SQLITE_TEMPLATE: Path | None = None


def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The SQLite file a server makes of a new database (every migration run,
    through the server's own engine), once per session, for db_url to copy."""
    global _SQLITE_TEMPLATE
    if _SQLITE_TEMPLATE is None:
        from jobtrace.store.db import _sqlite_engine, _upgrade

        path = tmp_path_factory.mktemp("sqlite-template") / "jobtrace.db"

        async def migrate() -> None:
            engine = _sqlite_engine(f"sqlite+aiosqlite:///{path}", write=True)
            try:
                async with engine.begin() as conn:
                    await conn.run_sync(_upgrade)
            finally:
                await engine.dispose()

        # In a thread of its own: asyncio.run must not touch the test's event loop.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, migrate()).result()
        _SQLITE_TEMPLATE = path
    return _SQLITE_TEMPLATE


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(
    request: pytest.FixtureRequest, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """Every test that takes a database runs on both backends, each on a new
    database with the schema at head (a copy of the session's migrated
    template; `sqlite_url` and `pg_url` are empty, for what the migrations do)."""
    if request.param == "sqlite":
        template = _sqlite_template(tmp_path_factory)
        for suffix in ("", "-wal", "-shm"):
            if (source := Path(f"{template}{suffix}")).exists():
                shutil.copyfile(source, tmp_path / f"jobtrace.db{suffix}")
        return f"sqlite+aiosqlite:///{tmp_path / 'jobtrace.db'}"
    return str(request.getfixturevalue("pg_migrated_url"))


@pytest.fixture
async def harness(db_url: str) -> AsyncIterator[Harness]:
    async with Harness(db_url) as h:
        yield h


@pytest.fixture
async def fast(db_url: str) -> AsyncIterator[Harness]:
    """A server with short leases and heartbeats, so that expiry happens within a test."""
    async with Harness(db_url, lease_seconds=1.0, heartbeat_seconds=0.2) as h:
        yield h


@pytest.fixture
async def no_grace(db_url: str) -> AsyncIterator[Harness]:
    """A server that gives a lost worker stream's leases back at once (no
    reconnect grace): for what happens when a worker does not come back."""
    async with Harness(db_url, reconnect_grace_seconds=0.0) as h:
        yield h


@pytest.fixture
async def sqlite_harness(sqlite_url: str) -> AsyncIterator[Harness]:
    """A server on SQLite only, for what does not depend on the backend (the
    clients and the CLI speak to the server through its API alone)."""
    async with Harness(sqlite_url) as h:
        yield h


@pytest.fixture
async def api(harness: Harness) -> Stubs:
    return harness.stubs()


def error_details(
    err: grpc.aio.AioRpcError,
) -> tuple[error_details_pb2.ErrorInfo | None, list[tuple[str, str]]]:
    """The ErrorInfo and BadRequest field violations carried by a failed call."""
    status = rpc_status.from_call(err)
    info = None
    violations: list[tuple[str, str]] = []
    if status is None:
        return info, violations
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
    return info, violations


async def expect_error(
    call: Awaitable[Any], code: grpc.StatusCode
) -> tuple[grpc.aio.AioRpcError, error_details_pb2.ErrorInfo | None, list[tuple[str, str]]]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    err = caught.value
    assert err.code() == code, f"expected {code}, got {err.code()}: {err.details()}"
    info, violations = error_details(err)
    assert info is not None and info.domain == "jobtrace", "every error carries an ErrorInfo"
    return err, info, violations


def require_pg() -> bool:
    return os.environ.get("JOBTRACE_REQUIRE_PG") == "1"


async def execute_sql(db_url: str, sql: str, **params: Any) -> list[Any]:
    """Run SQL directly against a test database (to tamper with it, as an attacker would)."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(db_url)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(text(sql), params)
            return list(result.fetchall()) if result.returns_rows else []
    finally:
        await engine.dispose()
