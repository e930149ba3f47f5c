"""What clients in other languages and tools rely on, over a real server on a loopback port:
reflection under v1 and v1alpha, the last progress event, server metadata, structured errors."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2 as alpha

from service.client import PreimageClient
from service.jobs.job import JobLimits
from service.rpc.app import start_server
from service.rpc.config import ServerConfig
from tests._service_models import conv_net


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    torch.set_num_threads(1)
    config = ServerConfig(
        store_dir=tmp_path_factory.mktemp("store"), seed_bundled=False, job_limits=JobLimits(max_steps=10**8)
    )
    running = start_server("127.0.0.1:0", config)
    yield running
    running.stop(grace=None)


@pytest.fixture(scope="module")
def client(server) -> Iterator[PreimageClient]:
    with PreimageClient(f"127.0.0.1:{server.port}", timeout=120) as c:
        c.upload(conv_net(seed=2), name="tiny")
        yield c


def _reflect(server, method: str, request: alpha.ServerReflectionRequest) -> alpha.ServerReflectionResponse:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.stream_stream(
            method,
            request_serializer=alpha.ServerReflectionRequest.SerializeToString,
            response_deserializer=alpha.ServerReflectionResponse.FromString,
        )
        return next(iter(call(iter([request]), timeout=10)))


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_answers_under_v1_and_v1alpha(server, version: str) -> None:
    method = f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    listed = _reflect(server, method, alpha.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {"preimage.v1.PreimageService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names  # fmt: skip
    for symbol in ("preimage.v1.PreimageService", f"grpc.reflection.{version}.ServerReflection"):
        found = _reflect(server, method, alpha.ServerReflectionRequest(file_containing_symbol=symbol))
        assert not found.HasField("error_response"), found.error_response
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(b)
            for b in found.file_descriptor_response.file_descriptor_proto
        ]
        assert symbol.rsplit(".", 1)[0] in {f.package for f in files}


def test_the_last_progress_event_is_the_last_step(client: PreimageClient) -> None:
    events = []
    run = client.maximize("tiny", "relu2", [0, 1], steps=7, report_every=5, channel_max=1.0, on_progress=events.append)
    run.wait()
    for target in (0, 1):
        steps = [(e.step, e.total_steps) for e in events if e.target_index == target]
        assert steps[0] == (5, 7) and steps[-1] == (7, 7), steps
        assert [s for s, _ in steps] == sorted(set(s for s, _ in steps))  # no step twice
    assert all(r.steps_run == 7 for r in run.results)
