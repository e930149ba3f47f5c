"""The public API: stubs match the protos, buf lint passes, every element is documented."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from service.api import generate

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_stubs_match_protos() -> None:
    # Fails when someone edits a .proto without running `python -m service.api.generate`.
    proc = subprocess.run(
        [sys.executable, "-m", "service.api.generate", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_drift_is_detected(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    generate.generate(fresh)
    stale = tmp_path / "stale"
    shutil.copytree(fresh, stale)
    victim = stale / "preimage" / "v1" / "preimage_pb2.py"
    victim.write_text(victim.read_text() + "\n# edited by hand\n")
    assert generate.diff(fresh, stale) == ["preimage/v1/preimage_pb2.py"]


def test_generated_imports_resolve() -> None:
    from service.api.preimage.v1 import preimage_pb2, preimage_pb2_grpc

    # The canonical file name, as other languages and reflection clients see it.
    assert preimage_pb2.DESCRIPTOR.name == "preimage/v1/preimage.proto"
    assert preimage_pb2.DESCRIPTOR.package == "preimage.v1"
    assert hasattr(preimage_pb2_grpc, "PreimageServiceStub")


def _buf() -> str | None:
    local = Path(sys.executable).parent / "buf"
    return str(local) if local.exists() else shutil.which("buf")


def test_buf_lint_standard() -> None:
    buf = _buf()
    if buf is None:
        pytest.skip("buf not installed (pip install buf-bin)")
    proc = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


BASELINE = ROOT / ".ci" / "buf-baseline"


def test_buf_breaking_against_the_frozen_v1() -> None:
    buf = _buf()
    if buf is None:
        pytest.skip("buf not installed (pip install buf-bin)")
    assert (BASELINE / "preimage" / "v1" / "preimage.proto").exists()
    proc = subprocess.run([buf, "breaking", "--against", str(BASELINE)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_buf_breaking_catches_a_renamed_field(tmp_path: Path) -> None:
    # What v1 once did unnoticed (Tap.global → is_global changed the JSON name): now CI says so.
    buf = _buf()
    if buf is None:
        pytest.skip("buf not installed (pip install buf-bin)")
    old = tmp_path / "preimage" / "v1" / "preimage.proto"
    old.parent.mkdir(parents=True)
    text = (BASELINE / "preimage" / "v1" / "preimage.proto").read_text()
    assert "bool is_global = 7;" in text
    old.write_text(text.replace("bool is_global = 7;", "bool global = 7;"))
    proc = subprocess.run([buf, "breaking", "--against", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "json_name" in proc.stdout, proc.stdout + proc.stderr


def _descriptor_with_comments(tmp_path: Path) -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    args = [
        "protoc",
        f"-I{generate.PROTO_ROOT}",
        f"-I{Path(__import__('grpc_tools').__file__).parent / '_proto'}",
        "--include_source_info",
        f"--descriptor_set_out={out}",
        *[str(p.relative_to(generate.PROTO_ROOT)) for p in generate.proto_files()],
    ]
    assert protoc.main(args) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def test_every_element_is_documented(tmp_path: Path) -> None:
    undocumented = []
    for fd in _descriptor_with_comments(tmp_path).file:
        comments = {tuple(loc.path): loc.leading_comments.strip() for loc in fd.source_code_info.location}

        def need(path: tuple[int, ...], what: str, comments: dict = comments, file: str = fd.name) -> None:
            if not comments.get(path):
                undocumented.append(f"{file}: {what}")

        # Field numbers of FileDescriptorProto/DescriptorProto in descriptor.proto.
        for i, msg in enumerate(fd.message_type):
            need((4, i), msg.name)
            for j, field in enumerate(msg.field):
                need((4, i, 2, j), f"{msg.name}.{field.name}")
        for i, enum in enumerate(fd.enum_type):
            need((5, i), enum.name)
            for j, value in enumerate(enum.value):
                need((5, i, 2, j), f"{enum.name}.{value.name}")
        for i, svc in enumerate(fd.service):
            need((6, i), svc.name)
            for j, method in enumerate(svc.method):
                need((6, i, 2, j), f"{svc.name}.{method.name}")
    assert not undocumented, "add a comment to: " + ", ".join(undocumented)
