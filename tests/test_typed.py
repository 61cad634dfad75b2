"""A typed package: a user's app passes `mypy --strict`, mistakes in one are
reported, and SyncClient keeps Client's signatures and docstrings."""

from __future__ import annotations

import inspect
import pydoc
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from jobtrace.client import Client, JobContext, SyncClient, SyncJobContext, Worker

ROOT = Path(__file__).resolve().parent.parent
TYPING = Path(__file__).resolve().parent / "typing"


def strict_mypy(path: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    """`mypy --strict` as a user's project runs it: its own config (strict and
    nothing else; not this repository's, which knows where src/ is), jobtrace
    found as an installed package."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(TYPING / "mypy.ini"),
            "--cache-dir",
            str(cache),
            "--no-error-summary",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=TYPING,
    )


# The mypy tests share a cache (the second runs warm): one xdist worker runs them both.
MYPY = pytest.mark.xdist_group("mypy")


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mypy-cache")


@MYPY
def test_a_users_app_passes_mypy_strict(mypy_cache: Path) -> None:
    done = strict_mypy(TYPING / "app.py", mypy_cache)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "py.typed" not in done.stdout


@MYPY
def test_mypy_strict_reports_mistakes_in_a_users_app(mypy_cache: Path) -> None:
    source = TYPING / "mistyped.py"
    marked = {
        n for n, line in enumerate(source.read_text().splitlines(), 1) if "  # error:" in line
    }
    done = strict_mypy(source, mypy_cache)
    assert done.returncode == 1, done.stdout + done.stderr
    reported = {int(m) for m in re.findall(r"mistyped\.py:(\d+): error", done.stdout)}
    assert reported == marked, done.stdout


def test_the_package_and_its_generated_stubs_are_marked_typed() -> None:
    assert (ROOT / "src" / "jobtrace" / "py.typed").is_file()
    # scripts/generate.py writes it (make check-generated fails when it is missing).
    assert (ROOT / "generated" / "jobtrace" / "v1" / "py.typed").is_file()
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    assert wheel["targets"]["wheel"]["packages"] == ["src/jobtrace", "generated/jobtrace"]


def client_calls() -> list[str]:
    """Client's public calls: its coroutines and its async iterators."""
    names = []
    for name, member in inspect.getmembers(Client, inspect.isfunction):
        if name.startswith("_") or name == "close":
            continue
        returns = str(inspect.signature(member).return_annotation)
        if inspect.iscoroutinefunction(member) or "AsyncIterator" in returns:
            names.append(name)
    return names


def test_client_calls_are_found() -> None:
    assert {"get_job", "submit_workflow", "watch_job", "iter_jobs"} <= set(client_calls())


@pytest.mark.parametrize("name", client_calls())
def test_sync_client_has_every_client_call_with_its_parameters_and_docstring(name: str) -> None:
    sync = getattr(SyncClient, name, None)
    assert sync is not None, f"SyncClient.{name} is missing"
    asynchronous = inspect.signature(getattr(Client, name))
    blocking = inspect.signature(sync)
    assert list(blocking.parameters.values()) == list(asynchronous.parameters.values())
    expected = str(asynchronous.return_annotation).replace("AsyncIterator[", "Iterator[")
    assert str(blocking.return_annotation) == expected
    assert inspect.getdoc(sync), f"SyncClient.{name} has no docstring"


def test_help_on_a_sync_method_shows_its_real_parameters() -> None:
    text = pydoc.render_doc(SyncClient.get_job, renderer=pydoc.plaintext)
    assert "get_job(self, job_id: 'str') -> 'common_pb2.Job'" in text
    assert "P.args" not in text and "The job now" in text
    text = pydoc.render_doc(SyncClient.__init__, renderer=pydoc.plaintext)
    assert "target: 'str | None' = None" in text and "token" in text


@pytest.mark.parametrize("cls", [Client, SyncClient, Worker, JobContext, SyncJobContext])
def test_every_public_method_of_the_clients_and_the_worker_runtime_has_a_docstring(
    cls: type,
) -> None:
    missing = []
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            member = member.fget
        member = getattr(member, "__func__", member)
        if inspect.isfunction(member) and not member.__doc__:
            missing.append(name)
    assert missing == []
