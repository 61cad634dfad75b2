"""The released contract (proto/baseline) guards every change: additive passes, a break fails.

`make test` runs `buf breaking --against proto/baseline/jobtrace-v1.binpb` on the
real tree; these tests prove that gate can fail, on copies of proto/.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "proto" / "baseline" / "jobtrace-v1.binpb"
BUF = Path(sys.executable).parent / "buf"


def _buf() -> str:
    if BUF.exists():
        return str(BUF)
    found = shutil.which("buf")
    if found is None:  # pragma: no cover - buf-bin is a pinned dev dependency
        pytest.fail("buf is not installed; `make venv` installs buf-bin")
    return found


def _copy_tree(tmp_path: Path) -> Path:
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copy(ROOT / "buf.yaml", work / "buf.yaml")
    shutil.copytree(ROOT / "proto" / "jobtrace", work / "proto" / "jobtrace")
    return work


def _breaking(work: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_buf(), "breaking", "--against", str(BASELINE)],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _edit(work: Path, old: str, new: str) -> None:
    path = work / "proto" / "jobtrace" / "v1" / "common.proto"
    text = path.read_text()
    assert old in text, f"{old!r} not found in common.proto"
    path.write_text(text.replace(old, new, 1))


def test_baseline_image_is_committed() -> None:
    assert BASELINE.is_file() and BASELINE.stat().st_size > 10_000


def test_current_tree_is_compatible_with_the_baseline(tmp_path: Path) -> None:
    result = _breaking(_copy_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_renumbering_a_released_field_is_refused(tmp_path: Path) -> None:
    work = _copy_tree(tmp_path)
    _edit(work, "string service = 1;", "string service = 99;")
    result = _breaking(work)
    assert result.returncode != 0
    assert "JobSpec" in result.stdout + result.stderr


def test_removing_a_released_field_is_refused(tmp_path: Path) -> None:
    work = _copy_tree(tmp_path)
    _edit(work, "  string step_name = 3;\n", "")
    result = _breaking(work)
    assert result.returncode != 0
    assert "step_name" in result.stdout + result.stderr


def test_adding_a_field_is_accepted(tmp_path: Path) -> None:
    work = _copy_tree(tmp_path)
    added = "  string step_name = 3;\n  string added_later = 9001;\n"
    _edit(work, "  string step_name = 3;\n", added)
    result = _breaking(work)
    assert result.returncode == 0, result.stdout + result.stderr
