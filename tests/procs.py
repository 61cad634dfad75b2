"""Test helpers that run jobtrace as a real process: a command to its end, or
`jobtrace serve` until it listens."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time

PORT_LINE = re.compile(r"\(port (\d+)\)")
_readers: set[asyncio.Task[None]] = set()


async def jobtrace(
    *args: str, target: str = "", stdin: bytes | None = None, timeout: float = 60
) -> tuple[int, str, str]:
    """Run `jobtrace ARGS` as a process; (exit code, stdout, stderr)."""
    env = {**os.environ, "JOBTRACE_TARGET": target, "NO_COLOR": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "jobtrace",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def serve(
    *flags: str,
    listen: str = "127.0.0.1:0",
    env: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[asyncio.subprocess.Process, int, list[str]]:
    """`jobtrace serve --listen LISTEN FLAGS` as a process, once it listens: the
    process, its port, and the log lines it wrote until then (the last one names
    the port). Its log is the caller's to read on (`drain`); a server that exits
    or hangs during start is killed and fails the test."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jobtrace", "serve", "--listen", listen, *flags,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "server exited during start: " + "".join(lines)
                lines.append(line)
                if m := PORT_LINE.search(line):
                    return proc, int(m.group(1)), lines
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        raise


def drain(proc: asyncio.subprocess.Process, into: list[str] | None = None) -> asyncio.Task[None]:
    """Keep reading a process's log so the pipe never fills, into `into` when given."""
    assert proc.stderr is not None
    stream = proc.stderr

    async def read() -> None:
        while line := await stream.readline():
            if into is not None:
                into.append(line.decode())

    task = asyncio.get_running_loop().create_task(read())
    _readers.add(task)
    task.add_done_callback(_readers.discard)
    return task


def serve_blocking(*flags: str, timeout: float = 30) -> tuple[subprocess.Popen[str], int]:
    """`serve` for tests that drive the server from threads, without an event
    loop: the process (its log a text pipe for the caller to read on) and its port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobtrace", "serve", "--listen", "127.0.0.1:0", *flags],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    try:
        while True:
            line = proc.stderr.readline()
            assert line and time.monotonic() < deadline, "server did not start"
            if m := PORT_LINE.search(line):
                return proc, int(m.group(1))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
