"""Graceful shutdown of a real `preimage serve` process: SIGTERM during jobs.

Two jobs run when the signal arrives: a short one, which must finish with its results, and one that
cannot end (more steps than any machine runs in the grace period: the server's step limit is raised
for it), which must be cancelled with UNAVAILABLE and a message saying why. The short job's length
is chosen from the step rate the server reports for the long one, so it is still running at the
signal and done well inside the grace period on a fast machine and on a loaded one alike.
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
from tests._service_models import conv_net
from tests.deploy._servers import start

GRACE = 10.0
ENDLESS = 50_000_000  # steps; at the tiny net's ~0.5 ms a step, about 7 hours
SHORT_SECONDS = 2.0  # of steps at the measured rate: long enough to outlast the signal, 4x inside the cancel point


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
    settings.write_text(f"shutdown_grace = {GRACE}\n[job_limits]\nmax_steps = {ENDLESS}\n")
    server = start(tmp_path / "store", "--config", str(settings), env={"PREIMAGE_METRICS_PORT": "0"})
    try:
        port = metrics_port(server.lines)
        assert "preimage_serving 1.0" in scrape(port)
        with PreimageClient(server.address, timeout=120) as client:
            client.upload(conv_net(seed=5), name="tiny")
            outcomes: dict[str, object] = {}
            progress = {"short": threading.Event(), "long": threading.Event()}
            steps_seen: dict[str, list[tuple[float, int]]] = {"short": [], "long": []}
            ended: dict[str, float] = {}

            def run(name: str, steps: int) -> None:
                job = client.maximize("tiny", "conv2", [0], steps=steps, refine_steps=0, report_every=1)
                try:
                    for event in job:
                        if event.DESCRIPTOR.name == "ProgressEvent":
                            steps_seen[name].append((time.monotonic(), event.step))
                            progress[name].set()
                    outcomes[name] = job
                    ended[name] = time.monotonic()
                except grpc.RpcError as err:
                    outcomes[name] = err
                finally:
                    progress[name].set()

            threads = [threading.Thread(target=run, args=("long", ENDLESS))]
            threads[0].start()
            assert progress["long"].wait(60)
            time.sleep(1.0)
            (t0, s0), (t1, s1) = steps_seen["long"][0], steps_seen["long"][-1]
            rate = (s1 - s0) / max(t1 - t0, 1e-3)  # steps per second on this machine, now
            short_steps = max(20, int(rate * SHORT_SECONDS))
            threads.append(threading.Thread(target=run, args=("short", short_steps)))
            threads[1].start()
            assert progress["short"].wait(60)
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
    assert len(short.results) == 1 and short.results[0].steps_run == short_steps and short.summary is not None
    # It finished during the drain, not before it: the server's own log says both jobs were running.
    shutting = [json.loads(line) for line in server.lines if line.startswith("{") and '"shutting down"' in line]
    assert shutting and shutting[0]["rows_running"] == 2, log[-3000:]
    assert ended["short"] > signalled
    assert isinstance(long, grpc.RpcError) and long.code() == grpc.StatusCode.UNAVAILABLE, long
    assert f"cancelled after the {GRACE:g} s grace period" in long.details()
    assert rc == 0, log[-3000:]
    assert exited_after < GRACE, (exited_after, log[-3000:])
    assert not_serving_after < 2.0
    assert "preimage_serving 0.0" in draining
    assert float(re.search(r"^preimage_running_images (\S+)$", draining, re.M).group(1)) >= 1  # the long job
    assert '"msg": "stopped"' in log and '"cancelled_jobs": 1' in log
    print(
        f"{rate:.0f} steps/s, short job {short_steps} steps; NOT_SERVING {not_serving_after:.2f} s after SIGTERM; "
        f"exit 0 after {exited_after:.2f} s (grace {GRACE:g} s)"
    )
