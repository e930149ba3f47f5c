"""Per-tenant quotas on a real server: each breach is RESOURCE_EXHAUSTED naming the quota, and one
tenant at its job quota does not hold up another."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from service.api.preimage.v1 import preimage_pb2 as pb
from service.client import PreimageClient
from service.jobs.job import JobLimits
from service.jobs.quotas import Quota
from service.rpc.app import start_server
from service.rpc.auth import AuthConfig, write_config
from service.rpc.config import ServerConfig
from tests._service_models import conv_net

NET = conv_net(seed=21)
ENDLESS = 10**8  # steps: a job that cannot end on any machine; the server's limit is raised to allow it
LONG = {"steps": ENDLESS, "refine_steps": 0, "report_every": 1}
SHORT = {"steps": 2, "refine_steps": 0, "report_every": 0}
TENANTS: dict[str, dict[str, Any]] = {
    "ops": {"tokens": ["ops"], "admin": True},
    "few": {"tokens": ["few"], "quotas": {"max_models": 1}},
    "thin": {"tokens": ["thin"], "quotas": {"max_model_bytes": len(NET) + 1000}},
    "small": {"tokens": ["small"], "quotas": {"max_image_pixels": 32 * 32, "max_steps": 5}},
    "mini": {"tokens": ["mini"], "quotas": {"max_image_pixels": 500}},
    "solo": {"tokens": ["solo"], "quotas": {"max_concurrent_jobs": 1, "max_queued_jobs": 0}},
    "busy": {"tokens": ["busy"], "quotas": {"max_concurrent_jobs": 1, "max_queued_jobs": 1}},
    "free": {"tokens": ["free"]},
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    d = tmp_path_factory.mktemp("quotas")
    write_config(d / "tokens.json", TENANTS, default_quotas={"max_queued_jobs": 8})
    config = ServerConfig(
        store_dir=d / "store", seed_bundled=False, auth=AuthConfig(tokens_file=d / "tokens.json"),
        job_limits=JobLimits(max_steps=ENDLESS),
    )  # fmt: skip
    running = start_server("127.0.0.1:0", config)
    yield running
    running.stop(grace=None)


@pytest.fixture(scope="module")
def clients(server: Any) -> Iterator[dict[str, PreimageClient]]:
    made = {t: PreimageClient(f"127.0.0.1:{server.port}", timeout=60, token=t) for t in TENANTS}
    yield made
    for c in made.values():
        c.close()


@pytest.fixture(scope="module")
def public_net(clients: dict[str, PreimageClient]) -> str:
    return clients["ops"].upload(NET, name="public-net", public=True).model.id


def exhausted(call: Callable[[], Any], *names: str) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
    message = err.value.details() or ""
    for name in names:
        assert name in message, message
    return message


def png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_quota_config_is_validated() -> None:
    assert Quota.from_dict({"max_models": 3}).max_models == 3
    for bad in ({"max_modles": 1}, {"max_models": -1}, {"max_models": True}, {"max_steps": 1.5}):
        with pytest.raises(ValueError):
            Quota.from_dict(bad)


def test_model_count(clients: dict[str, PreimageClient]) -> None:
    few = clients["few"]
    first = few.upload(NET, name="one").model
    assert few.upload(NET, name="one").already_existed  # the same model again is not a new one
    exhausted(lambda: few.upload(conv_net(seed=22), name="two"), "max_models=1", "'few'")
    few.delete(first.id)
    assert few.upload(conv_net(seed=22), name="two").model.name == "two"  # room again


def test_model_bytes(clients: dict[str, PreimageClient]) -> None:
    thin = clients["thin"]
    thin.upload(NET, name="fits")
    # Refused from the declared size, before any byte is sent...
    exhausted(lambda: thin.upload(conv_net(seed=23), name="too much"), "max_model_bytes")

    # ...and while streaming when the size is not declared: it stops at the tenant's whole cap.
    sent: list[int] = []
    # 256 MiB, made lazily: far more than the cap and than any HTTP/2 flow-control window, so the
    # bound below is decided by the server hanging up and not by how fast either side runs (a
    # 5 MiB stream under a CPU-heavy neighbour was 1.9 MiB sent before the refusal arrived).
    piece = (NET * (65536 // len(NET) + 1))[:65536]
    pieces = 4096

    def undeclared() -> Iterator[pb.UploadModelRequest]:
        yield pb.UploadModelRequest(metadata=pb.UploadModelMetadata(name="sneaky"))
        for _ in range(pieces):
            sent.append(len(piece))
            yield pb.UploadModelRequest(chunk=piece)
        yield pb.UploadModelRequest(finish=pb.UploadModelFinish(sha256="0" * 64))

    exhausted(lambda: thin.stub.UploadModel(undeclared(), timeout=60), "max_model_bytes")
    print(f"client sent {sum(sent)} bytes of a {len(piece) * pieces}-byte stream (model {len(NET)} bytes)")
    assert sum(sent) < len(piece) * pieces // 4
    assert thin.upload(NET, name="fits").already_existed  # idempotent even at the quota
    assert [m.name for m in thin.models()] == ["fits"]


def test_image_size_and_steps(clients: dict[str, PreimageClient], public_net: str) -> None:
    small = clients["small"]
    exhausted(lambda: small.invert(public_net, "relu2", [png(64)], **SHORT).wait(), "max_image_pixels=1024")
    # The output image too (this model's is fixed at 32×32 = 1024 pixels).
    mini = clients["mini"]
    exhausted(lambda: mini.maximize(public_net, "relu2", [0], **SHORT).wait(), "max_image_pixels=500")
    exhausted(lambda: small.maximize(public_net, "relu2", [0], steps=6, refine_steps=0).wait(), "max_steps=5")
    assert len(small.invert(public_net, "relu2", [png(32)], **SHORT).wait().results) == 1
    # Another tenant is held only to the server's limits.
    assert len(clients["free"].maximize(public_net, "relu2", [0], steps=6, refine_steps=0).wait().results) == 1


def _start_long(client: PreimageClient, model: str) -> Any:
    run = client.maximize(model, "relu2", [0], **LONG)
    next(iter(run))  # the first progress event: the job is running
    return run


def test_concurrent_jobs_without_a_queue(clients: dict[str, PreimageClient], public_net: str) -> None:
    solo = clients["solo"]
    run = _start_long(solo, public_net)
    try:
        exhausted(lambda: solo.maximize(public_net, "relu2", [0], **SHORT).wait(), "max_queued_jobs=0",
                  "max_concurrent_jobs=1")  # fmt: skip
        # Other tenants are not held up by solo's quota.
        assert len(clients["free"].maximize(public_net, "relu2", [1], **SHORT).wait().results) == 1
    finally:
        run.cancel()
    deadline = time.monotonic() + 10
    while True:  # the cancelled job leaves within a step; then solo may run again
        try:
            assert len(solo.maximize(public_net, "relu2", [0], **SHORT).wait().results) == 1
            break
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_concurrent_jobs_queue_then_refuse(clients: dict[str, PreimageClient], public_net: str) -> None:
    busy = clients["busy"]
    first = _start_long(busy, public_net)
    second = busy.maximize(public_net, "relu2", [1], steps=3, refine_steps=0, report_every=1)
    events: list[Any] = []
    waiter = threading.Thread(target=lambda: events.extend(second), daemon=True)
    try:
        waiter.start()
        time.sleep(1.0)
        assert events == []  # queued behind the first: quota max_concurrent_jobs=1
        exhausted(lambda: busy.maximize(public_net, "relu2", [2], **SHORT).wait(), "max_queued_jobs=1")
    finally:
        first.cancel()
    waiter.join(30)
    assert any(isinstance(e, pb.VisualizationResult) for e in events)  # ran once the first ended
