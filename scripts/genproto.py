"""Generate Python code and typed stubs from ``protos/`` into ``generated/``.

``python -m scripts.genproto generated`` regenerates; ``--check`` fails when the
committed output differs from what the protos produce.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE_MARKERS = ("__init__.py", "py.typed")


def generate(out: Path) -> None:
    """Run protoc for every proto file, writing code, gRPC code and stubs to *out*."""
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for proto in files:
        package_dir = out / Path(proto).parent
        while package_dir != out:
            for marker in PACKAGE_MARKERS:
                (package_dir / marker).touch()
            package_dir = package_dir.parent


def differences(a: Path, b: Path) -> list[str]:
    """List files that differ between two trees (ignoring caches)."""
    found: list[str] = []
    cmp = filecmp.dircmp(a, b, ignore=["__pycache__"])
    found += [str(Path(a, n)) for n in cmp.left_only + cmp.right_only + cmp.diff_files]
    for sub in cmp.common_dirs:
        found += differences(a / sub, b / sub)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--check", action="store_true", help="fail if OUT is stale")
    opts = parser.parse_args()
    out: Path = opts.out.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if opts.check:
            stale = differences(fresh, out) if out.exists() else [str(out)]
            if stale:
                print("generated/ is stale; run `make proto`:", *stale, sep="\n  ", file=sys.stderr)
                raise SystemExit(1)
            print("generated/ matches protos/")
            return
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(fresh, out)
        print(f"generated {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
