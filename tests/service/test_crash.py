"""Crash safety: ``preimage serve`` is SIGKILLed at random moments while uploads stream, models are
vetted and committed, and jobs run; after every restart the store must be consistent and hold
every upload the server had acknowledged.

Consistent means: every listed model's metadata parses and its blob exists with exactly the bytes
the id names (sha256) and the recorded size; no blob without metadata; no temp files; no staged
uploads of dead servers; ListModels shows exactly the metadata on disk.

PREIMAGE_CRASH_ROUNDS (default 10) sets the number of kills; PREIMAGE_CRASH_SEED the schedule.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.preimage.v1 import preimage_pb2 as pb
from service.client import PreimageClient
from tests._service_models import conv_net

ROUNDS = int(os.environ.get("PREIMAGE_CRASH_ROUNDS", "10"))
SEED = int(os.environ.get("PREIMAGE_CRASH_SEED", "7"))
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`preimage serve` in its own process group, so SIGKILL takes its conversion children too."""

    def __init__(self, store: Path, log: Path, extra: list[str] | None = None) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREIMAGE_")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        cmd = [sys.executable, "-m", "service.cli", "serve", "--address", self.address, "--store", str(store),
               "--no-bundled", "--device", "cpu", "--metrics-port", "0", *(extra or [])]  # fmt: skip
        self.log = open(log, "ab")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=self.log, start_new_session=True)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"server exited with {self.proc.returncode}"
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return
                except grpc.RpcError:
                    time.sleep(0.1)
        raise TimeoutError("server did not become healthy")

    def kill(self) -> None:
        with_suppress = self.proc.poll() is None
        if with_suppress:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()


def check_store(store: Path, client: PreimageClient | _Listing, acknowledged: dict[str, str]) -> int:
    """Assert the store is consistent and holds every acknowledged upload; return the model count."""
    metas = {p.stem: json.loads(p.read_text()) for p in (store / "meta").glob("*.json")}
    blobs = {p.stem for p in (store / "blobs").glob("*.onnx")}
    for model_id, record in metas.items():
        blob = store / "blobs" / f"{model_id}.onnx"
        assert blob.exists(), f"listed model {model_id[:12]} has no blob"
        data = blob.read_bytes()
        assert hashlib.sha256(data).hexdigest() == model_id, f"blob {model_id[:12]} holds other bytes"
        assert len(data) == record["size_bytes"]
    assert blobs <= set(metas), f"orphan blobs: {sorted(blobs - set(metas))}"
    temps = [p.name for d in ("blobs", "meta") for p in (store / d).glob(".*")]
    assert temps == [], f"temp files left: {temps}"
    listed = {m.id for m in client.models()}
    assert listed == set(metas)
    missing = {name: model_id for name, model_id in acknowledged.items() if model_id not in listed}
    assert not missing, f"acknowledged uploads lost: {missing}"
    return len(metas)


class _Listing:
    """Stands in for a client in the checker's own test: lists what the metadata says."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids

    def models(self) -> list[pb.Model]:
        return [pb.Model(id=i) for i in self.ids]


def test_the_store_checker_catches_each_kind_of_damage(tmp_path: Path) -> None:
    """The crash test is only as good as check_store: break a store each way and expect a failure."""
    data = conv_net(seed=3)
    good = hashlib.sha256(data).hexdigest()

    def fresh() -> Path:
        root = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        (root / "meta").mkdir(parents=True)
        (root / "blobs").mkdir()
        (root / "blobs" / f"{good}.onnx").write_bytes(data)
        (root / "meta" / f"{good}.json").write_text(json.dumps({"id": good, "size_bytes": len(data)}))
        return root

    check_store(fresh(), _Listing([good]), {"m": good})  # intact: passes
    damage = {
        "blob missing": lambda r: (r / "blobs" / f"{good}.onnx").unlink(),
        "partial blob": lambda r: (r / "blobs" / f"{good}.onnx").write_bytes(data[:100]),
        "orphan blob": lambda r: (r / "blobs" / f"{'0' * 64}.onnx").write_bytes(b"x"),
        "temp file": lambda r: (r / "meta" / ".x.json.tmp").write_bytes(b""),
    }
    for name, hurt in damage.items():
        root = fresh()
        hurt(root)
        with pytest.raises(AssertionError):
            check_store(root, _Listing([good]), {"m": good})
            pytest.fail(f"check_store missed: {name}")
    with pytest.raises(AssertionError, match="acknowledged uploads lost"):
        check_store(fresh(), _Listing([good]), {"m": good, "lost": "f" * 64})
    with pytest.raises(AssertionError):  # the server lists something other than what is on disk
        check_store(fresh(), _Listing([]), {})


def staged_dirs(store: Path) -> list[Path]:
    return [p for p in (store / "staging").iterdir() if p.is_dir()] if (store / "staging").exists() else []


def test_sigkill_at_random_points_keeps_the_store_consistent(tmp_path: Path) -> None:
    store, rng = tmp_path / "store", random.Random(SEED)
    acknowledged: dict[str, str] = {}  # name → id, for uploads whose response arrived
    seed_counter = iter(range(1000, 100000))
    kills: list[str] = []
    for round_ in range(ROUNDS):
        server = ServerProcess(store, tmp_path / "server.log")
        try:
            server.wait_ready()
            with PreimageClient(server.address, timeout=60) as client:
                check_store(store, client, acknowledged)
                # Only this server's own staging folder may exist after start-up recovery.
                assert len(staged_dirs(store)) <= 1
                stop = threading.Event()
                threads = [
                    threading.Thread(target=_uploader, args=(client, stop, acknowledged, seed_counter), daemon=True),
                    threading.Thread(target=_slow_uploader, args=(client, stop, next(seed_counter)), daemon=True),
                    threading.Thread(target=_jobs, args=(client, stop, acknowledged), daemon=True),
                ]
                for t in threads:
                    t.start()
                # A random moment: after 0-2 more acknowledged uploads of this round (so uploads pile
                # up across rounds), then 0-1.5 s more: that lands in the slow upload's stream, in
                # the vetting or commit of the next upload, or in a job.
                wait_for, delay = rng.randint(0, 2), rng.uniform(0.0, 1.5)
                target, deadline = len(acknowledged) + wait_for, time.monotonic() + 30
                while len(acknowledged) < target and time.monotonic() < deadline:
                    time.sleep(0.02)
                time.sleep(delay)
                kills.append(f"{round_}: +{wait_for} uploads +{delay:.2f}s")
                server.kill()
                stop.set()
                for t in threads:
                    t.join(30)
        finally:
            server.kill()
    final = ServerProcess(store, tmp_path / "server.log")
    try:
        final.wait_ready()
        with PreimageClient(final.address, timeout=60) as client:
            count = check_store(store, client, acknowledged)
            # The store still works: a new upload and a job after all those kills.
            model = client.upload(conv_net(seed=next(seed_counter)), name="after").model
            assert len(client.maximize(model.id, "relu2", [0], steps=2, refine_steps=0).wait().results) == 1
    finally:
        final.kill()
    summary = f"{ROUNDS} kills, {len(acknowledged)} acknowledged uploads, {count} models"
    print(f"\ncrash test: {summary}; kill points: " + "; ".join(kills))
    assert len(acknowledged) >= 3  # the kills did not all land before anything completed


def _uploader(client: PreimageClient, stop: threading.Event, acked: dict[str, str], seeds: Iterator[int]) -> None:
    while not stop.is_set():
        name = f"m{next(seeds)}"
        try:
            response = client.upload(conv_net(seed=int(name[1:])), name=name, timeout=30)
        except grpc.RpcError:
            return  # the server died mid-call: this upload was never acknowledged
        acked[name] = response.model.id


def _slow_uploader(client: PreimageClient, stop: threading.Event, seed: int) -> None:
    data = conv_net(seed=seed, dense_out=256)  # ~2 MB in 64 KiB chunks with pauses: killed mid-stream

    def chunks() -> Iterator[pb.UploadModelRequest]:
        yield pb.UploadModelRequest(metadata=pb.UploadModelMetadata(name="slow", size_bytes=len(data)))
        for i in range(0, len(data), 1 << 16):
            if stop.is_set():
                return
            time.sleep(0.05)
            yield pb.UploadModelRequest(chunk=data[i : i + (1 << 16)])
        yield pb.UploadModelRequest(finish=pb.UploadModelFinish(sha256=hashlib.sha256(data).hexdigest()))

    try:
        client.stub.UploadModel(chunks(), timeout=60)
    except grpc.RpcError:
        pass


def _jobs(client: PreimageClient, stop: threading.Event, acked: dict[str, str]) -> None:
    while not stop.is_set():
        ids = list(acked.values())
        if not ids:
            time.sleep(0.1)
            continue
        try:
            client.maximize(ids[-1], "relu2", [0, 1], steps=30, refine_steps=0, timeout=30).wait()
        except grpc.RpcError:
            return


@pytest.fixture(autouse=True)
def _needs_posix() -> None:
    if not hasattr(os, "killpg"):
        pytest.skip("needs POSIX process groups")
