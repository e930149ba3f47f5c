"""Prometheus metrics: scrape /metrics over HTTP during a job and after it, and see the figures move."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from service.client import PreimageClient
from service.rpc.app import start_server
from service.rpc.config import ServerConfig
from tests._service_models import conv_net


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_during_and_after_a_job(tmp_path) -> None:
    running = start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path, seed_bundled=False, metrics_port=0))
    try:
        assert running.metrics_port
        before = scrape(running.metrics_port)
        assert value(before, "preimage_serving") == 1
        assert value(before, "preimage_store_models") == 0 and value(before, "preimage_batch_steps_total") == 0
        with PreimageClient(f"127.0.0.1:{running.port}", timeout=120) as client:
            model = client.upload(conv_net(seed=3), name="tiny").model
            with pytest.raises(grpc.RpcError):
                client.get("no-such-model")
            steps = 200
            run = client.maximize("tiny", "conv2", [0, 1], steps=steps, refine_steps=0, report_every=1)
            done = threading.Event()
            seen: list[int] = []

            def consume() -> None:
                for event in run:
                    if event.DESCRIPTOR.name == "ProgressEvent":
                        seen.append(event.step)
                done.set()

            thread = threading.Thread(target=consume)
            thread.start()
            deadline = time.monotonic() + 60
            while not seen and time.monotonic() < deadline:
                time.sleep(0.02)
            during = scrape(running.metrics_port)
            time.sleep(0.3)
            later = scrape(running.metrics_port)
            thread.join(timeout=120)
            assert done.is_set() and len(run.results) == 2
            after = scrape(running.metrics_port)
    finally:
        running.stop(grace=None)

    # During the job: two images running in one batch, steps counting up, nothing finished yet.
    assert value(during, "preimage_running_images") == 2 and value(during, "preimage_running_batches") == 1
    assert value(during, "preimage_jobs_total", task="maximize", outcome="completed", model=model.id) == 0
    assert 0 < value(during, "preimage_batch_steps_total") < value(later, "preimage_batch_steps_total")
    assert value(later, "preimage_steps_per_second") > 0
    # After it: the job and its RPC counted once, its time observed, every step's batch size seen.
    # (the model label is the model's id: tests/deploy/test_probes.py checks its bound)
    assert value(after, "preimage_jobs_total", task="maximize", outcome="completed", model=model.id) == 1
    assert value(after, "preimage_rpcs_total", method="Maximize", code="OK") == 1
    assert value(after, "preimage_rpcs_total", method="UploadModel", code="OK") == 1
    assert value(after, "preimage_rpcs_total", method="GetModel", code="NOT_FOUND") == 1
    assert value(after, "preimage_job_seconds_count", task="maximize", model=model.id) == 1
    assert value(after, "preimage_job_seconds_sum", task="maximize", model=model.id) > 0
    assert value(after, "preimage_model_conversions_total") == 1  # converted once for the job
    assert value(after, "preimage_model_conversion_seconds_total") > 0
    assert value(after, "preimage_batch_steps_total") == steps
    assert value(after, "preimage_batch_size_count") == steps
    assert value(after, "preimage_image_steps_total") == 2 * steps  # both images every step
    assert value(after, "preimage_batch_size_bucket", le="2.0") == steps
    assert value(after, "preimage_batch_size_bucket", le="1.0") == 0
    assert value(after, "preimage_running_images") == 0 and value(after, "preimage_queue_jobs") == 0
    assert value(after, "preimage_store_models") == 1
    assert value(after, "preimage_store_bytes") == model.size_bytes
    assert value(after, "preimage_converted_models") == 1
    # A CPU server reports no GPU memory rather than a misleading zero.
    assert not any(name.startswith("preimage_gpu_memory") for name, _ in after)
    assert np.isfinite(list(after.values())).all()


def test_gpu_memory_gauges_on_a_cuda_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU on the test machines: torch.cuda's figures are stubbed; this checks what a CUDA
    replica exports from them (names, the device label, used = total - free)."""

    from service.rpc.metrics import _Sampled

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 3 << 20)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 8 << 20)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60 << 30, 80 << 30))
    families = list(_Sampled._gpu(torch.device("cuda:0")))
    got = {f.name: [(s.labels, s.value) for s in f.samples] for f in families}
    assert got == {
        "preimage_gpu_memory_allocated_bytes": [({"device": "cuda:0"}, 3 << 20)],
        "preimage_gpu_memory_reserved_bytes": [({"device": "cuda:0"}, 8 << 20)],
        "preimage_gpu_memory_used_bytes": [({"device": "cuda:0"}, 20 << 30)],
    }
    assert list(_Sampled._gpu(torch.device("cpu"))) == []
