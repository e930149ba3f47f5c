"""Vetting uploads in the limited child process: answers, refusals, and the caps themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.models.worker import VetError, WorkerLimits, vet_model
from tests._service_models import conv_net


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vet") / "net.onnx"
    path.write_bytes(conv_net(seed=2, dense_out=512))
    return path


def test_vet_reports_what_the_record_needs(model_path: Path) -> None:
    answer = vet_model(str(model_path), {"mean": [0.5], "std": [0.5], "scale": 1 / 255})
    assert answer["tap_count"] == 6 and answer["output_tap"] == "logits"
    assert answer["preprocessing_source"] == "uploader" and answer["preprocessing"]["mean"] == [0.5] * 3
    assert answer["parity"] < 1e-4


def test_bad_bytes_are_invalid(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07" + b"\xff" * 64)
    with pytest.raises(VetError) as err:
        vet_model(str(bad), None)
    assert err.value.kind == "invalid"


def test_bad_preprocessing_is_invalid(model_path: Path) -> None:
    with pytest.raises(VetError, match="GRAY") as err:
        vet_model(str(model_path), {"channel_order": "GRAY"})
    assert err.value.kind == "invalid"


def test_memory_cap_kills_the_child_not_the_server(tmp_path: Path) -> None:
    # A 33 MB model is read, parsed and converted (several copies of its weights) within a
    # 16 MiB budget above the preloaded interpreter: impossible, whatever the allocator reuses.
    big = tmp_path / "big.onnx"
    big.write_bytes(conv_net(seed=4, dense_out=4096))
    with pytest.raises(VetError) as err:
        vet_model(str(big), None, WorkerLimits(extra_address_space=16 << 20))
    assert err.value.kind == "resources", str(err.value)


def test_wall_clock_cap(model_path: Path) -> None:
    with pytest.raises(VetError, match="longer than") as err:
        vet_model(str(model_path), None, WorkerLimits(wall_seconds=0.001))
    assert err.value.kind == "resources"
