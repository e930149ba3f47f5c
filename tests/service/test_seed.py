"""Seeding the store with bundled models at start-up (with stand-in models, no export needed)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from converters.bundled import BundledModel
from service.client import PreimageClient
from service.models import seeding
from service.models.seeding import seed_bundled
from service.models.store import ModelStore
from service.rpc.app import start_server
from service.rpc.config import ServerConfig
from tests._service_models import conv_net


def _bundle(tmp_path: Path, seed: int) -> list[BundledModel]:
    path = tmp_path / f"net-{seed}.onnx"
    path.write_bytes(conv_net(seed=seed))
    return [BundledModel("stand-in", path, "a bundled stand-in")]


def test_seeding_is_idempotent_and_upgrades_replace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(tmp_path / "store")
    monkeypatch.setattr(seeding, "bundled_models", lambda: _bundle(tmp_path, 1))
    (first,) = seed_bundled(store)
    assert first.bundled and first.tap_count == 6 and first.description == "a bundled stand-in"
    assert seed_bundled(store) == [first]  # nothing changes on a second start
    monkeypatch.setattr(seeding, "bundled_models", lambda: _bundle(tmp_path, 2))
    (second,) = seed_bundled(store)
    assert second.id != first.id
    assert [r.id for r in store.list()] == [second.id]  # the old release is gone: the name stays unique


def test_served_bundled_models_cannot_be_deleted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seeding, "bundled_models", lambda: _bundle(tmp_path, 3))
    running = start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path / "store"))
    try:
        with PreimageClient(f"127.0.0.1:{running.port}", timeout=60) as client:
            (model,) = client.models()
            assert model.bundled and model.name == "stand-in"
            with pytest.raises(grpc.RpcError) as err:
                client.delete("stand-in")
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "ships with the server" in err.value.details()
    finally:
        running.stop(grace=None)
