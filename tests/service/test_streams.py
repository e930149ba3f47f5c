"""Long streams cannot starve the server: short RPCs answer while uploads stall and jobs run,
each tenant holds a bounded number of streams, and an upload that goes quiet is ended.

Real servers on loopback ports. Every "held" stream is confirmed held from the server's own
count (``servicer.streams``) before anything is measured, so no assertion depends on speed
except the one the service promises: a short RPC answers within a second.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.preimage.v1 import preimage_pb2 as pb
from service.api.preimage.v1 import preimage_pb2_grpc as pb_grpc
from service.client import PreimageClient, error_details
from service.jobs.job import JobLimits
from service.rpc.app import RunningServer, start_server
from service.rpc.auth import AuthConfig, write_config
from service.rpc.config import ServerConfig
from tests._service_models import conv_net

TOKENS = {"alice": "alice-stream-token", "bob": "bob-stream-token", "carol": "carol-stream-token"}
SHORT_RPC_BOUND = 1.0  # seconds: what the service promises a short RPC, whatever the streams do


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _wait_for(predicate: Any, seconds: float = 60.0) -> None:
    end = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < end, "the server never reached the expected state"
        time.sleep(0.02)


class StalledUpload:
    """An UploadModel stream that sends its metadata and one chunk, then nothing until released."""

    def __init__(self, channel: grpc.Channel, token: str | None = None, name: str = "stalled") -> None:
        self.release = threading.Event()
        metadata = (("authorization", f"Bearer {token}"),) if token else None

        def messages() -> Iterator[pb.UploadModelRequest]:
            yield pb.UploadModelRequest(metadata=pb.UploadModelMetadata(name=name))
            yield pb.UploadModelRequest(chunk=b"\0" * 1024)
            self.release.wait()

        self.future = pb_grpc.PreimageServiceStub(channel).UploadModel.future(
            messages(), timeout=120, metadata=metadata
        )

    def close(self) -> None:
        self.future.cancel()
        self.release.set()


def _server(tmp_path: Path, **config: Any) -> RunningServer:
    return start_server(
        "127.0.0.1:0",
        ServerConfig(
            store_dir=tmp_path / "store",
            seed_bundled=False,
            job_limits=JobLimits(max_steps=10**8),  # the long jobs cannot end on their own
            **config,
        ),
    )


def test_short_rpcs_answer_within_a_second_while_streams_hold_every_old_thread(tmp_path: Path) -> None:
    # 16 stalled uploads alone used to fill the 16 RPC threads; here 4 short-RPC threads and
    # 16 stalled uploads + 8 endless jobs: more long streams than short threads, many times over.
    running = _server(tmp_path, rpc_threads=4, stream_threads=32, tenant_streams=32, upload_idle_seconds=600)
    address = f"127.0.0.1:{running.port}"
    uploads: list[StalledUpload] = []
    jobs: list[Any] = []
    try:
        with PreimageClient(address, timeout=120) as client, grpc.insecure_channel(address) as channel:
            model = client.upload(conv_net(seed=3), name="tiny").model
            uploads = [StalledUpload(channel) for _ in range(16)]
            for i in range(8):
                run = client.maximize(model.id, "logits", [i % 10], steps=10**7, report_every=1, seed=i)
                jobs.append(run)
                next(iter(run))  # the job has started: it holds its stream
            held = running.servicer.streams
            _wait_for(lambda: held.open() == 24)
            assert running.servicer.scheduler.running_rows() >= 8

            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.PreimageServiceStub(channel)
            for _ in range(3):
                for name, call in (
                    ("Health", lambda: health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)),
                    ("ListModels", lambda: stub.ListModels(pb.ListModelsRequest(), timeout=10)),
                    ("GetServerInfo", lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)),
                    ("GetModel", lambda: stub.GetModel(pb.GetModelRequest(model=model.id), timeout=10)),
                ):
                    start = time.monotonic()
                    call()
                    took = time.monotonic() - start
                    assert took < SHORT_RPC_BOUND, f"{name} took {took:.2f} s with 24 long streams held"
            assert held.open() == 24, "the long streams must still be held while the short RPCs answer"
            assert all(not u.future.done() for u in uploads)
    finally:
        for u in uploads:
            u.close()
        for run in jobs:
            run.call.cancel()
        running.stop(grace=None)


def test_each_tenant_holds_at_most_its_streams_and_the_server_at_most_its_own(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    write_config(tokens, {name: {"tokens": [tok]} for name, tok in TOKENS.items()})
    running = _server(
        tmp_path, stream_threads=5, tenant_streams=3, upload_idle_seconds=600, auth=AuthConfig(tokens_file=tokens)
    )
    address = f"127.0.0.1:{running.port}"
    held = running.servicer.streams
    uploads: list[StalledUpload] = []
    try:
        with grpc.insecure_channel(address) as channel:
            alice = [StalledUpload(channel, TOKENS["alice"]) for _ in range(3)]
            uploads += alice
            _wait_for(lambda: held.open("alice") == 3)

            over = StalledUpload(channel, TOKENS["alice"])
            uploads.append(over)
            with pytest.raises(grpc.RpcError) as err:
                over.future.result(timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
            assert "tenant_streams=3" in err.value.details()
            assert error_details(err.value).reason == "QUOTA_EXCEEDED"
            assert held.open("alice") == 3

            # Another tenant is not affected by alice's streams
            bob = [StalledUpload(channel, TOKENS["bob"]) for _ in range(2)]
            uploads += bob
            _wait_for(lambda: held.open("bob") == 2)
            # ... until the server's own cap: 5 open streams
            carol = StalledUpload(channel, TOKENS["carol"])
            uploads.append(carol)
            with pytest.raises(grpc.RpcError) as err:
                carol.future.result(timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "stream_threads=5" in err.value.details()
            assert error_details(err.value).reason == "SERVER_BUSY"

            # A stream that ends gives its slot back
            alice[0].close()
            _wait_for(lambda: held.open("alice") == 2)
            again = StalledUpload(channel, TOKENS["alice"])
            uploads.append(again)
            _wait_for(lambda: held.open("alice") == 3)
            assert not again.future.done()

            # A refused or unauthenticated call holds nothing
            stranger = StalledUpload(channel, "not-a-token")
            uploads.append(stranger)
            with pytest.raises(grpc.RpcError) as err:
                stranger.future.result(timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert held.open() == 5
        for u in uploads:
            u.close()
        _wait_for(lambda: held.open() == 0)
    finally:
        for u in uploads:
            u.close()
        running.stop(grace=None)


def test_an_upload_that_goes_quiet_is_ended_and_its_staging_removed(tmp_path: Path) -> None:
    running = _server(tmp_path, upload_idle_seconds=1.0)
    staging = running.servicer.store.staging
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stalled = StalledUpload(channel)
            _wait_for(lambda: any(staging.iterdir()))  # the staged file exists while it streams
            with pytest.raises(grpc.RpcError) as err:
                stalled.future.result(timeout=60)
            stalled.close()
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
            assert "sent nothing for 1 s" in err.value.details()
            assert list(staging.iterdir()) == []
            _wait_for(lambda: running.servicer.streams.open() == 0)
            # The server goes on serving uploads
            with PreimageClient(f"127.0.0.1:{running.port}", timeout=120) as client:
                assert client.upload(conv_net(seed=4), name="after").model.name == "after"
    finally:
        running.stop(grace=None)
