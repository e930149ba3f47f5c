"""Channel statistics M_k are kept in the store beside the model: measured once, reused by a
restarted server (and by other replicas on the store), removed with the model, and measured
again when the file is damaged. A real server on a loopback port, twice on one store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import service.jobs.reference as reference
from service.api.preimage.v1 import preimage_pb2 as pb
from service.client import PreimageClient
from service.models.store import ModelStore
from service.rpc.app import start_server
from service.rpc.config import ServerConfig
from tests._service_models import conv_net

FAST = {"steps": 3, "refine_steps": 0}
MEAN = (124.0, 116.0, 104.0)


class _Net(torch.nn.Module):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(0))
        torch.nn.init.zeros_(self.conv.bias)
        self.fail = fail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise AssertionError("the statistics were measured again instead of read")
        return torch.relu(self.conv(x))


def test_statistics_are_read_back_from_the_directory_and_a_damaged_file_is_remeasured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reference, "_stats", {})
    measured = reference.channel_max(_Net(), "m:t", 16, 16, MEAN, cache_dir=tmp_path)
    (path,) = tmp_path.glob("*.npy")
    monkeypatch.setattr(reference, "_stats", {})  # a new process: nothing in memory
    assert torch.equal(reference.channel_max(_Net(fail=True), "m:t", 16, 16, MEAN, cache_dir=tmp_path), measured)
    # Another size is another measurement (and another file).
    monkeypatch.setattr(reference, "_stats", {})
    reference.channel_max(_Net(), "m:t", 20, 20, MEAN, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2
    for damage in (b"not a numpy file", np.full(4, np.nan, np.float32).tobytes()):
        path.write_bytes(damage)
        monkeypatch.setattr(reference, "_stats", {})
        assert torch.equal(reference.channel_max(_Net(), "m:t", 16, 16, MEAN, cache_dir=tmp_path), measured)
        assert np.array_equal(np.load(path, allow_pickle=False), measured.numpy())  # rewritten whole


def test_a_restarted_server_reuses_the_stored_statistics_and_gives_the_same_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = reference.channel_statistics
    monkeypatch.setattr(reference, "channel_statistics", lambda *a, **k: calls.append("measured") or real(*a, **k))
    pngs, stages = [], []
    for _ in range(2):
        monkeypatch.setattr(reference, "_stats", {})  # what a new process starts with
        running = start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path, seed_bundled=False))
        try:
            with PreimageClient(f"127.0.0.1:{running.port}", timeout=120) as client:
                model = client.upload(conv_net(seed=5), name="stats").model.id
                for _call in range(2):
                    run = client.maximize(
                        model, "conv2", [1], preset="paper", seed=3, report_stages=True, report_every=0, **FAST
                    )
                    events = list(run)
                    staged = [e for e in events if isinstance(e, pb.ProgressEvent) and e.stage]
                    stages.append([e.stage for e in staged])
                    # Stage events come before everything else, at step 0, and say what they wait for.
                    assert events[: len(staged)] == staged
                    assert all(e.step == 0 and e.message for e in staged)
                    pngs.append(run.results[0].png)
        finally:
            running.stop(grace=None)
    assert calls == ["measured"]  # the second server read them from the store
    assert len(set(pngs)) == 1
    # First server: the statistics are measured once; the second reads them. A repeated call on a
    # server has nothing to convert or measure.
    assert "statistics" in stages[0] and "statistics" not in stages[2]
    assert stages[1] == stages[3] == []
    assert "converting" in stages[2]  # a new process converts the stored model on its first call


def test_stage_events_are_sent_only_to_clients_that_ask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reference, "_stats", {})
    running = start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path, seed_bundled=False))
    try:
        with PreimageClient(f"127.0.0.1:{running.port}", timeout=120) as client:
            model = client.upload(conv_net(seed=6), name="quiet").model.id
            events = list(client.maximize(model, "conv2", [1], preset="paper", report_every=1, **FAST))
    finally:
        running.stop(grace=None)
    progress = [e for e in events if isinstance(e, pb.ProgressEvent)]
    assert progress and all(e.step >= 1 and not e.stage for e in progress)  # a first call, yet only steps
    store = ModelStore(tmp_path)
    try:
        assert len(list(store.stats_dir(model).glob("*.npy"))) == 1
        store.delete(model)
        assert not store.stats_dir(model).exists()
    finally:
        store.close()
