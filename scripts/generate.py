"""Generate (or check) the Python stubs in generated/ from proto/ with grpcio-tools:
messages, gRPC stubs, their type stubs, and the Connect services (connect-python)."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PACKAGE = Path("jobtrace") / "v1"
INIT = '"""Generated gRPC stubs of jobtrace.v1; do not edit (make generate)."""\n'


def generate(out: Path) -> None:
    import grpc_tools

    bin_dir = Path(sys.executable).parent
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--plugin=protoc-gen-connect-python={bin_dir / 'protoc-gen-connect-python'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        f"--connect-python_out={out}",
        *protos,
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_ROOT)
    (out / PACKAGE / "__init__.py").write_text(INIT)
    # PEP 561: the stubs' types (the .pyi files) are for users' type checkers too.
    (out / PACKAGE / "py.typed").write_text("")


def differences(a: Path, b: Path) -> list[str]:
    cmp = filecmp.dircmp(a, b)
    out = [f"only in {a}: {n}" for n in cmp.left_only if n != "__pycache__"]
    out += [f"only in committed: {n}" for n in cmp.right_only if n != "__pycache__"]
    out += [f"differs: {n}" for n in cmp.diff_files]
    # dircmp compares shallowly by stat; confirm byte-for-byte.
    for name in cmp.same_files:
        if (a / name).read_bytes() != (b / name).read_bytes():
            out.append(f"differs: {name}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", type=Path)
    parser.add_argument("--check", action="store_true", help="fail if target is stale")
    args = parser.parse_args()
    target: Path = args.target.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if args.check:
            diff = differences(fresh / PACKAGE, target / PACKAGE)
            if diff:
                print("generated/ is stale; run `make generate`:", *diff, sep="\n  ")
                return 1
            print("generated/ is up to date")
            return 0
        shutil.rmtree(target / PACKAGE, ignore_errors=True)
        shutil.copytree(fresh / PACKAGE, target / PACKAGE)
    print(f"wrote {target / PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
