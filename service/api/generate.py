"""Regenerate the Python stubs in service/api/ from protos/ (one command, reproducible).

    python -m service.api.generate          # write the stubs
    python -m service.api.generate --check  # exit 1 if the checked-in stubs differ from the protos

protoc is run with ``-I protos`` so descriptors keep their canonical file names
(``preimage/v1/preimage.proto``: what reflection serves and what other languages compile). protoc's
Python plugin writes absolute imports for that layout (``from preimage.v1 import ...``), which would
only resolve with service/api on sys.path; we rewrite them to ``service.api.preimage.v1`` so the
package imports like any other. The rewrite is deterministic, so --check compares bytes.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "service" / "api"
PACKAGE_PREFIX = "service.api."
GENERATED_DIR = "preimage"  # the top proto package; everything under it is generated
INIT_TEXT = '"""Generated package (python -m service.api.generate); do not edit."""\n'


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def _rewrite_imports(text: str, packages: set[str]) -> str:
    for pkg in sorted(packages):
        text = re.sub(rf"^(from|import) {re.escape(pkg)}(\.| )", rf"\1 {PACKAGE_PREFIX}{pkg}\2", text, flags=re.M)
    return text


def generate(out_root: Path) -> list[Path]:
    """Write the stubs for every proto under ``out_root/preimage/...``; return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    protos = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    # protoc-gen-mypy lives next to the interpreter in a venv; make sure protoc finds it.
    env_path = os.environ.get("PATH", "")
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env_path.split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + env_path
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    packages = {".".join(Path(p).parent.parts) for p in protos}
    written = []
    for path in sorted((out_root / GENERATED_DIR).rglob("*")):
        if path.suffix in (".py", ".pyi"):
            path.write_text(_rewrite_imports(path.read_text(), packages))
            written.append(path)
    for directory in [
        out_root / GENERATED_DIR,
        *sorted(p for p in (out_root / GENERATED_DIR).rglob("*") if p.is_dir()),
    ]:
        init = directory / "__init__.py"
        init.write_text(INIT_TEXT)
        written.append(init)
    return written


def diff(expected_root: Path, actual_root: Path) -> list[str]:
    """Relative paths that differ between two generated trees (missing, extra or changed)."""

    def files(root: Path) -> set[str]:
        base = root / GENERATED_DIR
        if not base.exists():
            return set()
        return {str(p.relative_to(root)) for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts}

    want, have = files(expected_root), files(actual_root)
    out = sorted(want ^ have)
    out += sorted(f for f in want & have if not filecmp.cmp(expected_root / f, actual_root / f, shallow=False))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the checked-in stubs are current")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        changed = diff(fresh, OUT_ROOT)
        if args.check:
            if changed:
                print("stubs out of date (run: python -m service.api.generate):", *changed, sep="\n  ")
                return 1
            print("stubs up to date")
            return 0
        shutil.rmtree(OUT_ROOT / GENERATED_DIR, ignore_errors=True)
        shutil.copytree(fresh / GENERATED_DIR, OUT_ROOT / GENERATED_DIR)
        written = len(list((OUT_ROOT / GENERATED_DIR).rglob("*.py*")))
        print(f"wrote {written} files under {OUT_ROOT / GENERATED_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
