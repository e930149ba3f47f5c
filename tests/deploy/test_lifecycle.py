"""RunningServer.stop(drain=True) in-process: an idle server stops at once; a second signal (``hurry``) cancels
running jobs without waiting out the grace period."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from service.client import PreimageClient
from service.jobs.job import JobLimits
from service.rpc.app import cancel_margin, start_server
from service.rpc.config import ServerConfig
from tests._service_models import conv_net


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_cancel_margin() -> None:
    assert cancel_margin(30) == 2.0 and cancel_margin(4) == 1.0 and cancel_margin(0) == 0


def test_idle_server_stops_at_once(tmp_path: Path) -> None:
    running = start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path, seed_bundled=False))
    figures = running.stop(30, drain=True)
    assert figures["cancelled_jobs"] == 0 and figures["seconds"] < 2.0


ENDLESS = 10**8  # steps: a job that cannot end on any machine; the server's limit is raised to allow it


def test_second_signal_cancels_without_waiting_for_the_grace(tmp_path: Path) -> None:
    config = ServerConfig(store_dir=tmp_path, seed_bundled=False, job_limits=JobLimits(max_steps=ENDLESS))
    running = start_server("127.0.0.1:0", config)
    hurry = threading.Event()
    with PreimageClient(f"127.0.0.1:{running.port}", timeout=120) as client:
        client.upload(conv_net(seed=2), name="tiny")
        started, outcome = threading.Event(), {}

        def run() -> None:
            job = client.maximize("tiny", "conv2", [0], steps=ENDLESS, refine_steps=0, report_every=1)
            try:
                for _ in job:
                    started.set()
            except grpc.RpcError as err:
                outcome["error"] = err
            started.set()

        thread = threading.Thread(target=run)
        thread.start()
        assert started.wait(60)
        def stop() -> None:
            outcome["figures"] = running.stop(300, drain=True, hurry=hurry)

        stopper = threading.Thread(target=stop)
        began = time.monotonic()
        stopper.start()
        time.sleep(0.5)  # draining: the job keeps running, the 300 s grace is far away
        assert stopper.is_alive() and "error" not in outcome
        hurry.set()
        stopper.join(30)
        thread.join(30)
    assert not stopper.is_alive() and time.monotonic() - began < 10
    assert outcome["figures"]["cancelled_jobs"] == 1
    assert outcome["error"].code() == grpc.StatusCode.UNAVAILABLE
    assert "cancelled on a second stop signal" in outcome["error"].details()
