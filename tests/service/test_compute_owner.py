"""The server's torch work runs on one thread, the scheduler's loop (jobs/scheduler.py says why).

A real server on a loopback port, in this process, so the test can see which thread ran each
piece of work: the conversion, the target's forward pass, the channel statistics, the parity
figure and the exemplars' network passes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

import converters.parity
import service.jobs.exemplars
import service.jobs.job
import service.rpc.servicer
from service.client import PreimageClient
from service.jobs.errors import ServiceError
from service.jobs.scheduler import Scheduler
from service.rpc.app import start_server
from service.rpc.config import ServerConfig
from tests._service_models import SIZE, conv_net

FAST = {"steps": 3, "refine_steps": 0, "report_every": 0}


def test_call_runs_on_the_loop_thread_and_returns_or_raises() -> None:
    scheduler = Scheduler()
    try:
        assert scheduler.call(lambda a, b=0: (threading.current_thread().name, a + b), 2, b=3) == ("scheduler", 5)
        # A call made from inside a call runs at once instead of waiting for itself.
        assert scheduler.call(lambda: scheduler.call(lambda: threading.current_thread().name)) == "scheduler"
        with pytest.raises(ZeroDivisionError):
            scheduler.call(lambda: 1 / 0)
        assert scheduler.call(lambda: "still serving") == "still serving"
    finally:
        scheduler.shutdown()
    with pytest.raises(ServiceError) as err:
        scheduler.call(lambda: None)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def _recording(threads: dict[str, set[str]], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        threads.setdefault(name, set()).add(threading.current_thread().name)
        return fn(*args, **kwargs)

    return wrapper


def test_conversion_targets_statistics_parity_and_exemplars_run_on_the_loop_thread(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: dict[str, set[str]] = {}
    for module, attr, name in (
        (service.rpc.servicer, "_load_converted", "conversion"),
        (service.jobs.job, "_run_phi", "target forward"),
        (service.jobs.job, "channel_max_stats", "channel statistics"),
        (converters.parity, "check_parity", "parity"),
        (service.jobs.exemplars.ExemplarsRun, "activations", "exemplars"),
    ):
        monkeypatch.setattr(module, attr, _recording(threads, name, getattr(module, attr)))
    running = start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path, seed_bundled=False))
    try:
        with PreimageClient(f"127.0.0.1:{running.port}", timeout=120) as client:
            model = client.upload(conv_net(seed=3), name="owner").model.id
            photo = (np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
            client.maximize(model, "conv2", [0], preset="paper", **FAST).wait()
            client.invert(model, "conv2", [photo], **FAST).wait()
            client.exemplars(model, "conv2", [photo, np.ascontiguousarray(photo[::-1])], [0], top_k=1)
    finally:
        running.stop(grace=None)
    assert set(threads) == {"conversion", "target forward", "channel statistics", "parity", "exemplars"}, threads
    assert all(names == {"scheduler"} for names in threads.values()), threads
