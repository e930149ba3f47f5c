"""Graceful shutdown of a real `preimage serve` process: SIGTERM during jobs.

Two jobs run when the signal arrives: a short one, which must finish with its results, and one far
longer than the grace period, which must be cancelled with UNAVAILABLE and a message saying why.
Meanwhile health answers NOT_SERVING and new jobs are refused; the process exits 0 within the
grace period. The server is configured the way a deployment does it: the grace period from a
TOML file, metrics from the environment; /metrics reports the drain too.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import PreimageClient
from tests._deploy_servers import start
from tests._service_models import conv_net

GRACE = 10.0
SHORT_STEPS = 100  # still running at the signal, done a few seconds later even on a busy box


def metrics_port(lines: list[str]) -> int:
    for line in lines:
        if line.startswith("{") and json.loads(line).get("msg") == "serving":
            return int(json.loads(line)["metrics_port"])
    raise AssertionError("no `serving` log line with the metrics port")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_sigterm_drains_then_cancels_and_exits_zero_within_grace(tmp_path: Path) -> None:
    settings = tmp_path / "preimage.toml"
    settings.write_text(f"shutdown_grace = {GRACE}\n")
    server = start(tmp_path / "store", "--config", str(settings), env={"PREIMAGE_METRICS_PORT": "0"})
    try:
        port = metrics_port(server.lines)
        assert "preimage_serving 1.0" in scrape(port)
        with PreimageClient(server.address, timeout=120) as client:
            client.upload(conv_net(seed=5), name="tiny")
            outcomes: dict[str, object] = {}
            progress = {"short": threading.Event(), "long": threading.Event()}
            ended: dict[str, float] = {}

            def run(name: str, steps: int) -> None:
                job = client.maximize("tiny", "conv2", [0], steps=steps, refine_steps=0, report_every=1)
                try:
                    for event in job:
                        if event.DESCRIPTOR.name == "ProgressEvent":
                            progress[name].set()
                    outcomes[name] = job
                    ended[name] = time.monotonic()
                except grpc.RpcError as err:
                    outcomes[name] = err
                finally:
                    progress[name].set()

            # The long job could not finish in many grace periods.
            jobs = (("short", SHORT_STEPS), ("long", 9000))
            threads = [threading.Thread(target=run, args=job) for job in jobs]
            for t in threads:
                t.start()
            for event in progress.values():
                assert event.wait(60)
            signalled = time.monotonic()
            server.terminate()

            health = health_pb2_grpc.HealthStub(client.channel)
            status = None
            while time.monotonic() - signalled < GRACE:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                time.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            not_serving_after = time.monotonic() - signalled
            draining = scrape(port)
            with pytest.raises(grpc.RpcError) as refused:
                client.maximize("tiny", "conv2", [1], steps=5, refine_steps=0).wait()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in refused.value.details()

            rc = server.proc.wait(timeout=GRACE + 30)
            exited_after = time.monotonic() - signalled
            for t in threads:
                t.join(timeout=30)
    finally:
        server.close()

    log = "".join(server.lines)
    short, long = outcomes["short"], outcomes["long"]
    assert not isinstance(short, grpc.RpcError), short
    assert len(short.results) == 1 and short.results[0].steps_run == SHORT_STEPS and short.summary is not None
    assert ended["short"] > signalled  # it finished during the drain, not before it
    assert isinstance(long, grpc.RpcError) and long.code() == grpc.StatusCode.UNAVAILABLE, long
    assert f"cancelled after the {GRACE:g} s grace period" in long.details()
    assert rc == 0, log[-3000:]
    assert exited_after < GRACE, (exited_after, log[-3000:])
    assert not_serving_after < 2.0
    assert "preimage_serving 0.0" in draining
    assert float(re.search(r"^preimage_running_images (\S+)$", draining, re.M).group(1)) >= 1  # the long job
    assert '"msg": "stopped"' in log and '"cancelled_jobs": 1' in log
    print(f"NOT_SERVING {not_serving_after:.2f} s after SIGTERM; exit 0 after {exited_after:.2f} s (grace {GRACE:g} s)")
