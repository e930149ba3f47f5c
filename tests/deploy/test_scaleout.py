"""Scale-out on loopback: two `preimage serve` processes sharing one store directory.

A model uploaded through one replica is listed and served by the other; uploads through both at
once are all kept; a client given both addresses (gRPC round_robin) runs 20 jobs, spread over both
replicas, whose PNGs are byte-identical to the same jobs run on one server.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from service.client import PreimageClient
from service.rpc.messages import MAX_MESSAGE_BYTES
from tests._service_models import SIZE, conv_net
from tests.deploy._servers import ServerProcess, start

JOBS = 20
FAST = {"steps": 8, "refine_steps": 2}


def photo(seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    coarse = (g.random((4, 4, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.Resampling.BICUBIC))


def round_robin(*servers: ServerProcess) -> grpc.Channel:
    target = "ipv4:" + ",".join(s.address for s in servers)
    return grpc.insecure_channel(
        target,
        options=[
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )


def run_jobs(client: PreimageClient) -> list[bytes]:
    return [client.invert("tiny", "relu2", [photo(i)], seed=i, **FAST).wait().results[0].png for i in range(JOBS)]


def served_inverts(server: ServerProcess) -> int:
    """Invert RPCs the server logged as OK (its log line is written just after the status is sent)."""
    count = 0
    for line in list(server.lines):
        if line.startswith("{"):
            record = json.loads(line)
            count += record.get("msg") == "rpc" and record.get("method") == "Invert" and record.get("code") == "OK"
    return count


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory):
    store = tmp_path_factory.mktemp("shared") / "store"
    with ThreadPoolExecutor(2) as pool:  # both start at once, as `docker-compose --scale` does
        servers = list(pool.map(lambda _: start(store), range(2)))
    yield servers
    for s in servers:
        s.terminate()
    for s in servers:
        try:
            assert s.proc.wait(timeout=30) == 0
        finally:
            s.close()


def test_two_replicas_share_one_store(replicas: list[ServerProcess]) -> None:
    a, b = replicas
    with PreimageClient(a.address, timeout=120) as ca, PreimageClient(b.address, timeout=120) as cb:
        model = ca.upload(conv_net(seed=11), name="tiny").model
        assert [m.id for m in cb.models()] == [model.id]  # listed by the other replica
        assert cb.get("tiny").id == model.id
        assert [t.alias for t in cb.taps("tiny").taps][-1] == "fc"  # converted there, from the shared bytes

        # Uploads through both replicas at once: both kept (racing publishes of the same bytes and
        # crash cleanup with live replicas are covered without servers in test_deploy_store.py).
        barrier = threading.Barrier(2)

        def upload(client: PreimageClient, data: bytes, name: str):
            barrier.wait()
            return client.upload(data, name=name)

        with ThreadPoolExecutor(2) as pool:
            both = list(pool.map(upload, [ca, cb], [conv_net(seed=13), conv_net(seed=14)], ["from-a", "from-b"]))
        for client in (ca, cb):
            assert sorted(m.name for m in client.models()) == ["from-a", "from-b", "tiny"]
        for r in both:
            assert cb.get(r.model.id).size_bytes == ca.get(r.model.id).size_bytes == r.model.size_bytes
    store = Path(a.proc.args[a.proc.args.index("--store") + 1])
    blobs = sorted(p.stem for p in (store / "blobs").glob("*.onnx"))
    assert blobs == sorted(p.stem for p in (store / "meta").glob("*.json")) and len(blobs) == 3
    assert not list((store / "meta").glob(".*.tmp")) and not list((store / "blobs").glob(".*.tmp"))


def test_round_robin_jobs_match_a_single_server(replicas: list[ServerProcess]) -> None:
    a, b = replicas
    before = served_inverts(a), served_inverts(b)
    with PreimageClient("both", timeout=120, channel=round_robin(a, b)) as both:
        spread = run_jobs(both)
    deadline = time.monotonic() + 10
    while sum(served_inverts(s) for s in (a, b)) - sum(before) < JOBS and time.monotonic() < deadline:
        time.sleep(0.05)
    on_a = served_inverts(a) - before[0]
    on_b = served_inverts(b) - before[1]
    with PreimageClient(a.address, timeout=120) as single:
        alone = run_jobs(single)
    assert len(spread) == JOBS and on_a + on_b == JOBS
    assert min(on_a, on_b) >= JOBS // 4, (on_a, on_b)  # both replicas did real work
    assert len(set(alone)) == JOBS  # 20 different results, so the comparison below means something
    assert spread == alone
    print(f"round robin: {on_a} jobs on replica A, {on_b} on replica B; all {JOBS} PNGs identical to one server's")
