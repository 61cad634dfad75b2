"""A PostgreSQL cluster of the test's own (initdb in a temporary directory, a free
loopback port), which a test may stop with `-m immediate` and start again
without disturbing the shared server other tests use."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from .conftest import require_pg

BIN = Path(os.environ.get("JOBTRACE_PG_BIN", "/usr/local/bin"))
# PostgreSQL refuses to run as root: its commands run as this OS user.
OS_USER = os.environ.get("JOBTRACE_PG_OS_USER", "postgres")


def _missing() -> str:
    """'' when a cluster can be made here, else why not."""
    absent = [name for name in ("initdb", "pg_ctl", "postgres") if not (BIN / name).exists()]
    if absent:
        return f"PostgreSQL binaries missing in {BIN}: {', '.join(absent)}"
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing (postgres refuses root)"
        try:
            import pwd

            pwd.getpwnam(OS_USER)
        except KeyError:
            return f"running as root and there is no {OS_USER!r} OS user to run postgres as"
    return ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgCluster:
    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.data = root / "data"
        self.logfile = root / "postgres.log"

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    async def _run(self, *args: str, check: bool = True) -> str:
        command = [str(BIN / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", OS_USER, "--", *command]
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=self.root,
        )
        async with asyncio.timeout(60):
            out, _ = await proc.communicate()
        text = out.decode(errors="replace")
        if check and proc.returncode != 0:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{text}\n{log}")
        return text

    async def init(self) -> None:
        await self._run(
            "initdb",
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        )
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\nmax_connections = 60\n"
                "shared_buffers = 16MB\n"
            )

    async def start(self, wait: bool = True) -> None:
        """Start postgres; with wait=False return as soon as it was launched
        (it is then starting up, and refuses connections for a while)."""
        await self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w" if wait else "-W", "start"
        )

    async def stop(self, mode: str = "fast") -> None:
        await self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    async def execute(self, sql: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(self.admin_dsn, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()


@asynccontextmanager
async def pg_cluster() -> AsyncIterator[PgCluster]:
    """A running cluster of this test's own; skipped where it cannot be made
    (a failure instead with JOBTRACE_REQUIRE_PG=1)."""
    problem = _missing()
    if problem:
        if require_pg():
            pytest.fail(f"JOBTRACE_REQUIRE_PG=1 but {problem}")
        pytest.skip(problem)
    # Not pytest's tmp_path: its parents are private to root, and postgres
    # runs as another user.
    root = Path(tempfile.mkdtemp(prefix="jt-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, OS_USER, OS_USER)
    cluster = PgCluster(root, _free_port())
    try:
        await cluster.init()
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
