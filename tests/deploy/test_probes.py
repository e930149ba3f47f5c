"""The metrics port's HTTP probes and the bounded model label of the job metrics.

/healthz (live), /readyz (ready: serving and not draining) and /metrics answer on the metrics port
of a real `preimage serve` process; SIGTERM during a job turns /readyz to 503 within a second while
/healthz and /metrics stay 200 (the latter with preimage_serving 0); other paths are 404.
"""

from __future__ import annotations

import random
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from service.client import PreimageClient
from service.rpc.app import start_server
from service.rpc.config import ServerConfig
from service.rpc.metrics import OTHER_MODELS, TopModels
from tests._service_models import conv_net
from tests.deploy._servers import start

ENDLESS = 50_000_000  # steps: the job outlives any test; the second signal cancels it


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_readyz_turns_503_within_a_second_of_sigterm(tmp_path: Path) -> None:
    settings = tmp_path / "preimage.toml"
    settings.write_text(f"shutdown_grace = 60\n[job_limits]\nmax_steps = {ENDLESS}\n")
    server = start(tmp_path / "store", "--config", str(settings))
    try:
        port = server.metrics_port
        assert port, "no metrics port in the serving line: metrics must be on by default"
        assert get(port, "/healthz")[0] == 200 and get(port, "/readyz")[0] == 200
        code, text = get(port, "/metrics")
        assert code == 200 and "preimage_serving 1.0" in text
        assert get(port, "/")[0] == 200  # what a scraper configured without a path asks
        for path in ("/nope", "/metrics/x", "/readyz/", "/healthzz"):
            assert get(port, path)[0] == 404, path
        with PreimageClient(server.address, timeout=120) as client:
            client.upload(conv_net(seed=7), name="tiny")
            started, outcome = threading.Event(), {}

            def run() -> None:
                job = client.maximize("tiny", "conv2", [0], steps=ENDLESS, refine_steps=0, report_every=1)
                try:
                    for _ in job:
                        started.set()
                except grpc.RpcError as err:
                    outcome["error"] = err
                finally:
                    started.set()

            thread = threading.Thread(target=run)
            thread.start()
            assert started.wait(60)
            signalled = time.monotonic()
            server.terminate()
            ready = 200
            while ready == 200 and time.monotonic() - signalled < 10:
                ready = get(port, "/readyz")[0]
                if ready == 200:
                    time.sleep(0.02)
            turned_after = time.monotonic() - signalled
            assert server.proc.poll() is None, "the server exited instead of draining"
            live = get(port, "/healthz")[0]
            code, draining = get(port, "/metrics")
            missing = get(port, "/nope")[0]
            server.terminate()  # second signal: cancel the endless job now
            rc = server.proc.wait(timeout=60)
            thread.join(timeout=30)
    finally:
        server.close()
    assert ready == 503 and turned_after < 1.0, (ready, turned_after)
    assert live == 200 and missing == 404
    assert code == 200 and "preimage_serving 0.0" in draining
    assert outcome["error"].code() == grpc.StatusCode.UNAVAILABLE
    assert rc == 0, "".join(server.lines[-30:])
    print(f"/readyz 503 {turned_after:.3f} s after SIGTERM")


def test_a_busy_metrics_port_is_a_clear_error_and_no_half_server(tmp_path: Path) -> None:
    first = start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path / "a", seed_bundled=False, metrics_port=0))
    try:
        config = ServerConfig(store_dir=tmp_path / "b", seed_bundled=False, metrics_port=first.metrics_port)
        with pytest.raises(RuntimeError, match=rf"cannot serve metrics on 127.0.0.1:{first.metrics_port}"):
            start_server("127.0.0.1:0", config)
        assert get(first.metrics_port, "/readyz")[0] == 200  # the first server is untouched
    finally:
        first.stop(grace=None)


# -- the model label --------------------------------------------------------------------------------
def test_a_negative_label_count_is_refused_before_anything_listens(tmp_path: Path) -> None:
    config = ServerConfig(store_dir=tmp_path, seed_bundled=False, metrics_port=0, metrics_model_labels=-1)
    with pytest.raises(ValueError, match="metrics_model_labels must be ≥ 0"):
        start_server("127.0.0.1:0", config)


def test_top_models_keeps_the_most_used_and_at_most_n() -> None:
    rng = random.Random(0)
    dropped: list[str] = []
    top = TopModels(3, on_dropped=dropped.append, max_tracked=20)
    names = [f"m{i}" for i in range(30)]
    weights = [1 / (i + 1) for i in range(30)]  # a few popular models, a long tail
    labels_seen = set()
    for _ in range(3000):
        model = rng.choices(names, weights)[0]
        label = top.use(model)
        labels_seen.add(label)
        assert label == (model if model in top.labelled else OTHER_MODELS)
        assert len(top.labelled) <= 3 and len(top.uses) <= 20
        unlabelled = [c for m, c in top.uses.items() if m not in top.labelled]
        # The labelled models are the most used ones tallied (no unlabelled model has more uses).
        assert min(top.uses[m] for m in top.labelled) >= max(unlabelled, default=0)
    assert {"m0", "m1", "m2"} == top.labelled  # the popular head wins in the end
    assert dropped and OTHER_MODELS in labels_seen


def test_job_metrics_carry_at_most_n_model_labels(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    config = ServerConfig(store_dir=tmp_path, seed_bundled=False, metrics_port=0, metrics_model_labels=2)
    running = start_server("127.0.0.1:0", config)
    try:
        with PreimageClient(f"127.0.0.1:{running.port}", timeout=120) as client:
            ids = {name: client.upload(conv_net(seed=i), name=name).model.id for i, name in enumerate("abc")}

            def jobs(name: str, n: int) -> None:
                for _ in range(n):
                    client.maximize(name, "conv2", [0], steps=2, refine_steps=0).wait()

            jobs("a", 3)
            jobs("b", 2)
            jobs("c", 1)  # a third model: counted as other
            first = samples(running.metrics_port)
            jobs("c", 2)  # c's 2nd use ties b (other); its 3rd is more than b's 2: c takes b's label
            second = samples(running.metrics_port)
            conversions = get(running.metrics_port, "/metrics")[1]
    finally:
        running.stop(grace=None)
    a, b, c = ids["a"], ids["b"], ids["c"]
    assert first == {a: 3, b: 2, OTHER_MODELS: 1}, first
    assert second == {a: 3, c: 1, OTHER_MODELS: 2}, second  # b's series is gone, c counts from its label
    assert "preimage_model_conversions_total 3.0" in conversions  # each model converted once here


def samples(port: int) -> dict[str, float]:
    """Completed maximize jobs by model label; also checks the histogram uses the same labels."""
    text = get(port, "/metrics")[1]
    jobs: dict[str, float] = {}
    histogram: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "preimage_jobs_total" and s.labels["outcome"] == "completed":
                jobs[s.labels["model"]] = s.value
            elif s.name == "preimage_job_seconds_count":
                histogram[s.labels["model"]] = s.value
    assert histogram == jobs
    return jobs
