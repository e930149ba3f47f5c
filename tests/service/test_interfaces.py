"""What clients in other languages and tools rely on, over a real server on a loopback port:
reflection under v1 and v1alpha, the last progress event, server metadata, structured errors."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2 as alpha
from PIL import Image

from service.api.preimage.v1 import preimage_pb2 as pb
from service.api.preimage.v1 import preimage_pb2_grpc as pb_grpc
from service.client import ErrorDetails, PreimageClient, Run, error_details
from service.jobs.job import JobLimits
from service.rpc.app import start_server
from service.rpc.config import ServerConfig
from tests._service_models import conv_net, fcn


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
        c.upload(conv_net(seed=2), name="tiny")  # fixed at 32×32
        c.upload(fcn(seed=1), name="fcn")  # any size
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


# -- server metadata and statistics -------------------------------------------------------------------
def test_server_info_describes_the_server(server, client: PreimageClient) -> None:
    from importlib.metadata import version

    info = client.server_info()
    assert info.version == version("preimage") and info.api == "preimage.v1"
    assert info.device.name == str(server.servicer.device) and info.device.memory_bytes > 0
    assert info.device.description
    limits = server.servicer.config.job_limits
    assert (info.limits.max_steps, info.limits.max_pixels, info.limits.max_targets) == (
        limits.max_steps, limits.max_pixels, limits.max_targets)  # fmt: skip
    assert info.limits.max_sent_message_bytes == 4 << 20 < info.limits.max_message_bytes
    assert list(info.presets) == ["paper", "natural"] and "phase" in info.parameterizations
    assert {"Conv", "Relu", "Gemm", "Resize"} <= set(info.ops) and "NoSuchOp" not in info.ops
    assert info.auth == pb.AUTH_MODE_OPEN and not info.tls and info.tenant == ""


def test_statistics_count_jobs_steps_and_failures(client: PreimageClient) -> None:
    model = client.upload(conv_net(seed=8), name="counted").model
    assert client.statistics("counted").models[0].requests == 0
    client.maximize("counted", "relu1", [0, 1], steps=3, channel_max=1.0).wait()
    client.invert("counted", "relu1", [np.full((32, 32, 3), 100, np.uint8)], steps=2, refine_steps=1).wait()
    with pytest.raises(grpc.RpcError):
        client.maximize("counted", "relu1", [999], steps=3).wait()  # no channel 999
    with pytest.raises(grpc.RpcError):
        client.maximize("counted", "no-such-tap", [0], steps=3).wait()
    stats = client.statistics("counted")
    [s] = stats.models
    assert (s.model_id, s.name, s.version) == (model.id, "counted", 1)
    assert (s.requests, s.succeeded) == (4, 2) and dict(s.failures) == {"INVALID_ARGUMENT": 2}
    assert dict(s.by_task) == {"maximize": 3, "invert": 1}
    assert s.steps == 3 + 3 and s.seconds > 0 and stats.uptime_seconds > 0
    assert model.id in {m.model_id for m in client.statistics().models}


# -- structured errors ----------------------------------------------------------------------------------
def _error(call) -> ErrorDetails:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return error_details(caught.value)


def test_errors_carry_reason_field_and_keep_their_message(client: PreimageClient) -> None:
    unknown_tap = _error(lambda: client.maximize("tiny", "relu9", [0]).wait())
    assert unknown_tap.code == grpc.StatusCode.INVALID_ARGUMENT and unknown_tap.reason == "UNKNOWN_TAP"
    assert "unknown tap 'relu9'" in unknown_tap.message and set(unknown_tap.fields) == {"tap"}
    channel = _error(lambda: client.maximize("tiny", "relu2", [3, 999]).wait())
    assert channel.reason == "INVALID_ARGUMENT" and list(channel.fields) == ["targets[1]"]
    beta = _error(lambda: client.maximize("tiny", "relu2", [0], beta=7.0).wait())
    assert list(beta.fields) == ["params.beta"] and "beta" in beta.message
    missing = _error(lambda: client.get("no-such-model"))
    assert (missing.code, missing.reason, list(missing.fields)) == (
        grpc.StatusCode.NOT_FOUND,
        "MODEL_NOT_FOUND",
        ["model"],
    )
    fixed = _error(lambda: client.maximize("tiny", "relu2", [0], height=64).wait())
    assert fixed.code == grpc.StatusCode.INVALID_ARGUMENT and "options.height" in fixed.fields
    big = _error(lambda: client.maximize("fcn", "relu1", [0], height=4096, width=4096).wait())
    assert big.code == grpc.StatusCode.RESOURCE_EXHAUSTED and big.reason == "TOO_LARGE" and big.retry_after is None
    assert "options.height" in big.fields
    assert client.get("tiny").name == "tiny"  # and the server goes on serving


def test_a_full_queue_says_when_to_retry(server, client: PreimageClient) -> None:
    scheduler = server.servicer.scheduler
    saved = scheduler.limits
    scheduler.limits = dataclasses.replace(saved, max_queued=0)  # every new job finds the queue full
    try:
        full = _error(lambda: client.maximize("tiny", "relu2", [0], steps=2, channel_max=1.0).wait())
    finally:
        scheduler.limits = saved
    assert full.code == grpc.StatusCode.RESOURCE_EXHAUSTED and full.reason == "QUEUE_FULL"
    assert full.retry_after and full.retry_after > 0 and "server busy" in full.message
    assert client.maximize("tiny", "relu2", [0], steps=2, channel_max=1.0).wait().results


# -- message sizes --------------------------------------------------------------------------------------
def test_large_results_reach_a_client_with_default_limits(server, client: PreimageClient) -> None:
    """A 640×640 result's tensor is 4.9 MB: sent as chunks, it reaches a client at gRPC's default
    4 MiB receive limit, and the library puts the bytes back where they belong."""
    request = pb.MaximizeRequest(
        model="fcn", tap="relu1", targets=[pb.MaximizeTarget(channel=pb.ChannelTarget(channel=c)) for c in (0, 1)],
        channel_max=1.0, params=pb.EnergyParams(steps=1, preset=pb.PRESET_PAPER),
        options=pb.RunOptions(height=640, width=640, return_tensor=True, report_every=0),
    )  # fmt: skip
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:  # default options: 4 MiB
        events = list(pb_grpc.PreimageServiceStub(channel).Maximize(request, timeout=300))
    assert max(e.ByteSize() for e in events) < 4 << 20
    chunks = [e.chunk for e in events if e.WhichOneof("event") == "chunk"]
    assert {c.field for c in chunks} >= {pb.CHUNK_FIELD_TENSOR}
    joined = Run(iter(events)).wait()
    for r in joined.results:
        assert len(r.tensor.data) == 3 * 640 * 640 * 4 and list(r.tensor.shape) == [3, 640, 640]
        assert Image.open(io.BytesIO(r.png)).size == (640, 640)
    direct = client.maximize("fcn", "relu1", [0, 1], channel_max=1.0, steps=1, preset="paper", height=640,
                             width=640, return_tensor=True, report_every=0).wait()  # fmt: skip
    assert [r.tensor.data for r in direct.results] == [r.tensor.data for r in joined.results]
    assert direct.summary.contact_sheet_png == joined.summary.contact_sheet_png != b""


# -- model versions -------------------------------------------------------------------------------------
def test_a_name_has_versions(client: PreimageClient) -> None:
    v1 = client.upload(conv_net(seed=20), name="mynet").model
    v2 = client.upload(conv_net(seed=21), name="mynet").model
    assert (v1.version, v2.version, v2.latest) == (1, 2, True)
    assert client.get("mynet").id == v2.id and client.get("mynet:latest").id == v2.id
    assert client.get("mynet:1").id == v1.id == client.get("mynet:previous").id
    assert (client.get(v1.id).version, client.get(v1.id).latest) == (1, False)
    assert [(m.name, m.version, m.latest) for m in client.models("mynet")] == [("mynet", 1, False), ("mynet", 2, True)]
    # A fixed version is used as asked, the bare name follows the latest.
    assert client.maximize("mynet:1", "relu2", [0], steps=1, channel_max=1.0).wait().summary.model_id == v1.id
    assert client.maximize("mynet", "relu2", [0], steps=1, channel_max=1.0).wait().summary.model_id == v2.id
    missing = _error(lambda: client.get("mynet:9"))
    assert missing.reason == "MODEL_NOT_FOUND" and "versions: 1, 2" in missing.message


def test_identical_bytes_are_answered_clearly(client: PreimageClient) -> None:
    first = client.upload(conv_net(seed=30), name="original").model
    renamed = client.upload(conv_net(seed=30), name="another-name")
    assert renamed.already_existed and renamed.model.id == first.id and renamed.model.name == "original"
    assert "already stored as original:1" in renamed.note and "'another-name' was not applied" in renamed.note
    again = client.upload(conv_net(seed=30), name="original")
    assert again.already_existed and again.model.version == 1 and "no new version" in again.note
    assert [m.version for m in client.models("original")] == [1]
    fresh = client.upload(conv_net(seed=31), name="fresh")
    assert not fresh.already_existed and fresh.note == ""
    colon = _error(lambda: client.upload(conv_net(seed=32), name="bad:name"))
    assert colon.code == grpc.StatusCode.INVALID_ARGUMENT and list(colon.fields) == ["metadata.name"]


def test_a_bundled_models_name_is_not_taken(tmp_path) -> None:
    from service.models.store import ModelRecord, ModelStore

    store = ModelStore(tmp_path)
    with store.stage() as staged:
        staged.write(conv_net(seed=50))
        sha = staged.finish()
        store.commit(staged.path, ModelRecord(id=sha, name="shipped", size_bytes=staged.size, bundled=True))
    store.close()
    running = start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path, seed_bundled=False))
    try:
        with PreimageClient(f"127.0.0.1:{running.port}", timeout=60) as c:
            taken = _error(lambda: c.upload(conv_net(seed=51), name="shipped"))
            assert taken.code == grpc.StatusCode.INVALID_ARGUMENT and "bundled" in taken.message
            assert [(m.name, m.version, m.latest) for m in c.models()] == [("shipped", 1, True)]
    finally:
        running.stop(grace=None)


def test_check_release_against_name_previous(client: PreimageClient) -> None:
    import json

    client.upload(conv_net(seed=40), name="release")
    client.upload(conv_net(seed=41), name="release")
    run = client.check("release", "release:previous", taps=["relu2"]).wait()
    summary = json.loads(run.report.summary_json)
    assert (summary["model"], summary["baseline"]) == ("release:2", "release:1")
    [layer] = [entry for entry in summary["layers"] if entry["drift"] is not None]
    assert layer["drift"]["feature_drift"] > 0  # two different releases were compared
    lonely = _error(lambda: client.check("fcn", "fcn:previous").wait())
    assert lonely.code == grpc.StatusCode.NOT_FOUND and "no fcn:previous" in lonely.message
