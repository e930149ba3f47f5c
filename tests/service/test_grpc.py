"""Integration tests: a real server on a loopback port, driven through the client library and raw stubs.

Everything is small (a 32×32 conv net, tens of steps) so the file runs in about a minute on 2 cores.
The server runs in this process so the tests can read what it measured (steps run after a cancel);
the conversion of uploads still happens in the server's resource-limited child processes.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from service.api.preimage.v1 import preimage_pb2 as pb
from service.client import PreimageClient
from service.jobs.job import JobLimits
from service.rpc.app import start_server
from service.rpc.config import ServerConfig
from tests._service_models import SIZE, conv_net, external_data_net, fcn
from tests.service._logs import captured_server_logs

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
FAST = {"steps": 12, "refine_steps": 3}


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    config = ServerConfig(
        store_dir=tmp_path_factory.mktemp("store"),
        seed_bundled=False,
        job_limits=JobLimits(max_input_pixels=256 * 256, max_pixels=128 * 128, max_steps=100_000),
    )
    running = start_server("127.0.0.1:0", config)
    yield running
    running.stop(grace=None)


@pytest.fixture(scope="module")
def client(server) -> PreimageClient:
    with PreimageClient(f"127.0.0.1:{server.port}", timeout=120) as c:
        yield c


TINY = conv_net(seed=1)


@pytest.fixture(scope="module")
def tiny(client: PreimageClient) -> pb.Model:
    return client.upload(TINY, name="tiny", labels=[f"class {i}" for i in range(10)]).model


def photo(seed: int = 0) -> np.ndarray:
    """A smooth, photo-like 32×32 RGB image (noise alone makes a poor inversion target)."""
    g = np.random.default_rng(seed)
    coarse = g.random((4, 4, 3)) * 255
    img = Image.fromarray(coarse.astype(np.uint8)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    return np.asarray(img)


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def features(model_bytes: bytes, tap: str, pixels: np.ndarray) -> np.ndarray:
    """The tap's tensor computed by onnxruntime (the independent judge) for an RGB uint8 image."""
    model = onnx.load_from_string(model_bytes)
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tap))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = ((pixels.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)[None]
    return session.run([tap], {"image": x})[0][0]


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- model management -----------------------------------------------------------------------------
def test_upload_large_model_in_chunks_then_get_list_delete(client: PreimageClient, tmp_path: Path) -> None:
    big = conv_net(seed=7, dense_out=4096)
    assert len(big) > 30_000_000  # far above gRPC's 4 MiB default message size
    path = tmp_path / "big.onnx"
    path.write_bytes(big)
    sent: list[int] = []
    # From a path: streamed from disk and hashed on the way.
    response = client.upload(path, name="big", chunk_bytes=1 << 20, on_chunk=lambda done, total: sent.append(done))
    assert len(sent) == -(-len(big) // (1 << 20)) and sent[-1] == len(big)
    model = response.model
    assert not response.already_existed and model.size_bytes == len(big) and model.tap_count == 6
    assert model.output_tap == "logits" and model.preprocessing.height == SIZE

    assert client.upload(big, name="big again").already_existed
    assert client.get("big").id == model.id == client.get(model.id[:10]).id
    assert "big" in [m.name for m in client.models()]
    assert [m.name for m in client.models(name_prefix="bi")] == ["big"]
    assert client.delete("big").id == model.id
    with pytest.raises(grpc.RpcError) as err:
        client.get(model.id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_taps(client: PreimageClient, tiny: pb.Model) -> None:
    taps = client.taps("tiny")
    assert taps.model_id == tiny.id and (taps.nominal_height, taps.nominal_width) == (SIZE, SIZE)
    by_alias = {t.alias: t for t in taps.taps}
    assert list(by_alias) == ["conv1", "relu1", "conv2", "relu2", "flatten", "fc"]
    assert list(by_alias["relu2"].shape) == [8, 16, 16]
    assert (by_alias["conv1"].stride, by_alias["conv1"].receptive_field) == (2, 3)
    assert (by_alias["conv2"].stride, by_alias["conv2"].receptive_field) == (2, 7)
    assert by_alias["fc"].is_global and list(by_alias["fc"].shape) == [10]


# -- the three visualizations: results checked against onnxruntime -----------------------------------
def test_invert_feature_error_matches_onnxruntime(client: PreimageClient, tiny: pb.Model) -> None:
    images = [photo(0), photo(1)]
    run = client.invert("tiny", "relu2", images, seed=3, return_tensor=True, **FAST).wait()
    assert [r.target_index for r in run.results] == [0, 1]
    for image, result in zip(images, run.results, strict=True):
        pixels = decode(result.png)
        assert pixels.shape == (SIZE, SIZE, 3)
        ours = rel_error(features(TINY, "r2", pixels), features(TINY, "r2", image))
        assert result.HasField("feature_error")
        assert ours == pytest.approx(result.feature_error, rel=1e-3, abs=1e-5)
        assert result.tap_parity < 1e-4
        assert result.steps_run == 15 and not result.stopped
        assert result.resolved.params.loss_weight == 300 and result.resolved.params.alpha == 6
        assert list(result.tensor.shape) == [3, SIZE, SIZE]
        assert set(result.terms) >= {"energy", "loss", "alpha_norm", "tv"}
    sheet = decode(run.summary.contact_sheet_png)
    assert sheet.shape == (SIZE, 2 * SIZE + 2, 3)


def test_caricature_feature_error_matches_onnxruntime(client: PreimageClient, tiny: pb.Model) -> None:
    image = photo(2)
    (result,) = client.caricature("tiny", "conv1", [image], **FAST).wait().results
    ours = rel_error(features(TINY, "c1", decode(result.png)), features(TINY, "c1", image))
    assert ours == pytest.approx(result.feature_error, rel=1e-3, abs=1e-5)


def test_maximize_objective_matches_onnxruntime(client: PreimageClient, tiny: pb.Model) -> None:
    # Maximization has no Φ0, so the figure to check is the objective ⟨Φ(x*), w⟩ with
    # w = one-hot at the centre / (ρ² M_k) (ρ = 7 for conv2; M_k given as 1 instead of measured).
    run = client.maximize("tiny", "conv2", [3, (5, 2, 9)], channel_max=1.0, preset="paper", **FAST).wait()
    assert [r.description for r in run.results] == ["channel 3", "neuron 5 at (2, 9)"]
    for (c, y, x), result in zip([(3, 8, 8), (5, 2, 9)], run.results, strict=True):
        phi = features(TINY, "c2", decode(result.png))
        assert phi[c, y, x] / 49 == pytest.approx(result.objective_value, rel=1e-3, abs=1e-6)
        assert not result.HasField("feature_error")
    # The natural preset reads a channel's mean over the map, scaled 1/M_k.
    (mean,) = client.maximize("tiny", "conv2", [3], channel_max=1.0, **FAST).wait().results
    assert mean.resolved.params.spatial == pb.SPATIAL_MEAN
    phi = features(TINY, "c2", decode(mean.png))
    assert float(phi[3].mean()) == pytest.approx(mean.objective_value, rel=1e-3, abs=1e-6)
    # A class logit of the global output works the same way.
    (logit,) = client.maximize("tiny", "fc", [4], **FAST).wait().results
    assert logit.objective_value > 0


def test_dynamic_size_model(client: PreimageClient) -> None:
    client.upload(fcn(), name="fcn", preprocessing={"height": 64, "width": 64})
    assert client.taps("fcn").nominal_height == 64
    image = np.asarray(Image.fromarray(photo(4)).resize((48, 40)))
    (result,) = client.invert("fcn", "conv2", [image], **FAST).wait().results
    assert decode(result.png).shape == (64, 64, 3)  # the model's nominal size by default
    (result,) = client.invert("fcn", "conv2", [image], height=40, width=48, **FAST).wait().results
    assert decode(result.png).shape == (40, 48, 3) and (result.resolved.height, result.resolved.width) == (40, 48)
    (result,) = client.invert("fcn", "conv2", [image], height=32, **FAST).wait().results
    assert decode(result.png).shape == (32, 32, 3)  # one side given: the nominal aspect ratio
    run = client.maximize("fcn", "relu1", [0, 1], height=24, width=32, seed=2**64 - 1, **FAST).wait()
    assert [r.resolved.seed for r in run.results] == [2**64 - 1, 0]  # wraps like a 64-bit generator seed
    assert decode(run.results[0].png).shape == (24, 32, 3)
    with pytest.raises(grpc.RpcError) as err:
        client.maximize("fcn", "conv2", [0], height=4, width=4).wait()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot run at 4×4" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.maximize("fcn", "conv2", [0], height=200, width=200).wait()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "16384 pixels" in err.value.details()


def test_fixed_batch_model_runs_batched_requests(client: PreimageClient) -> None:
    client.upload(conv_net(seed=9, batch=1), name="batch1")
    run = client.maximize("batch1", "relu2", [0, 1, 2], channel_max=1.0, **FAST).wait()
    assert [r.description for r in run.results] == ["channel 0", "channel 1", "channel 2"]


def test_same_seed_same_image(client: PreimageClient, tiny: pb.Model) -> None:
    first = client.maximize("tiny", "relu1", [1], seed=5, **FAST).wait().results[0].png
    again = client.maximize("tiny", "relu1", [1], seed=5, **FAST).wait().results[0].png
    other = client.maximize("tiny", "relu1", [1], seed=6, **FAST).wait().results[0].png
    assert first == again and first != other


def test_progress_events_arrive_in_order(client: PreimageClient, tiny: pb.Model) -> None:
    run = client.invert("tiny", "conv2", [photo(0), photo(1)], report_every=4, preview_every=8, **FAST)
    kinds, steps = [], {0: [], 1: []}
    for event in run:
        kinds.append(type(event).__name__)
        if isinstance(event, pb.ProgressEvent):
            steps[event.target_index].append(event.step)
            assert event.total_steps == 15 and set(event.terms) >= {"energy", "loss"}
            if event.step % 8 == 0:
                assert decode(event.preview_png).shape == (SIZE, SIZE, 3)
            else:
                assert not event.preview_png
    # Every 4th step, then the last one (15) just before that target's result.
    assert steps == {0: [4, 8, 12, 15], 1: [4, 8, 12, 15]}
    assert kinds[-5:] == ["ProgressEvent", "VisualizationResult", "ProgressEvent", "VisualizationResult", "RunSummary"]
    assert kinds[:-5] == ["ProgressEvent"] * 6


# -- cancellation and deadlines -------------------------------------------------------------------
def _wait_for_job(server, before: int, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.servicer.jobs_finished > before:
            return server.servicer.recent_jobs[-1]
        time.sleep(0.01)
    raise AssertionError("the server's job did not end")


def test_cancel_stops_within_one_step(client: PreimageClient, server, tiny: pb.Model) -> None:
    before = server.servicer.jobs_finished
    run = client.maximize("tiny", "relu2", list(range(8)), steps=50_000, report_every=5)
    first_steps = []
    for event in run:
        first_steps.append(event.step)
        if len(first_steps) >= 16:  # two reports per target: the loop is well under way
            break
    run.cancel()
    job = _wait_for_job(server, before)
    stats = job.stats
    step_time = stats.seconds / max(stats.steps, 1)
    print(
        f"\ncancel: {stats.steps_after_cancel} step(s) after cancel, "
        f"latency {stats.cancel_latency * 1e3:.1f} ms, step {step_time * 1e3:.1f} ms"
    )
    assert stats.cancelled and stats.steps < 1000
    assert stats.steps_after_cancel <= 1
    assert stats.cancel_latency < 2 * step_time + 0.05


def test_deadline_gives_deadline_exceeded_and_stops_the_job(client: PreimageClient, server, tiny) -> None:
    before = server.servicer.jobs_finished
    run = client.maximize("tiny", "relu2", [0], steps=50_000, timeout=1.5, report_every=0)
    with pytest.raises(grpc.RpcError) as err:
        run.wait()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    job = _wait_for_job(server, before)
    assert job.stats.cancelled and job.stats.steps_after_cancel <= 1


# -- bad requests ---------------------------------------------------------------------------------
BAD_REQUESTS = [
    (
        "unknown model",
        lambda c: c.taps("no-such-model"),
        grpc.StatusCode.NOT_FOUND,
        "no model 'no-such-model'",
    ),
    (
        "unknown model in a job",
        lambda c: c.maximize("nope", "relu2", [0]).wait(),
        grpc.StatusCode.NOT_FOUND,
        "nope",
    ),
    (
        "unknown tap",
        lambda c: c.maximize("tiny", "relu3", [0]).wait(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "relu2",
    ),
    (
        "channel out of range",
        lambda c: c.maximize("tiny", "relu2", [99]).wait(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "out of range",
    ),
    (
        "neuron outside the map",
        lambda c: c.maximize("tiny", "relu2", [(0, 40, 0)]).wait(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "outside the feature map",
    ),
    (
        "not an image",
        lambda c: c.invert("tiny", "relu2", [b"GIF89a not really"]).wait(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not an image",
    ),
    (
        "no images",
        lambda c: c.invert("tiny", "relu2", []).wait(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "at least one",
    ),
    (
        "too-large image",
        lambda c: c.invert("tiny", "relu2", [np.zeros((300, 300, 3), np.uint8)]).wait(),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "at most 65536 pixels",
    ),
    (
        "wrong size for a fixed model",
        lambda c: c.maximize("tiny", "relu2", [0], height=64, width=64).wait(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "fixed at 32×32",
    ),
    (
        "negative steps",
        lambda c: c.maximize("tiny", "relu2", [0], steps=-5).wait(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "steps",
    ),
    (
        "beta out of range",
        lambda c: c.maximize("tiny", "relu2", [0], beta=3.0).wait(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "beta",
    ),
    (
        "NaN loss weight",
        lambda c: c.maximize("tiny", "relu2", [0], loss_weight=float("nan")).wait(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "finite",
    ),
    (
        "too many steps",
        lambda c: c.maximize("tiny", "relu2", [0], steps=200_000).wait(),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "limit",
    ),
    (
        "mask on a global tap",
        lambda c: c.invert("tiny", "fc", [photo()], mask_center=2).wait(),
        grpc.StatusCode.INVALID_ARGUMENT,
        "spatial tap",
    ),
    (
        "not an ONNX model",
        lambda c: c.upload(b"\x00garbage" * 100, name="junk"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model refused",
    ),
    (
        "bad model name",
        lambda c: c.upload(TINY, name="line\nbreak"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "name",
    ),
    (
        "external data",
        lambda c: c.upload(external_data_net(), name="ext"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "external data",
    ),
    (
        "NaN preprocessing",
        lambda c: c.upload(TINY, name="nan", preprocessing={"mean": [float("nan")] * 3}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "finite",
    ),
    ("delete unknown", lambda c: c.delete("0" * 64), grpc.StatusCode.NOT_FOUND, "no model"),
]


@pytest.mark.parametrize(("case", "call", "code", "hint"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_status(client: PreimageClient, tiny: pb.Model, case, call, code, hint) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call(client)
    assert err.value.code() == code, err.value.details()
    assert hint in err.value.details()


def _raw_upload(server, messages: list[pb.UploadModelRequest]) -> grpc.RpcError:
    from service.api.preimage.v1 import preimage_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.PreimageServiceStub(channel).UploadModel(iter(messages), timeout=30)
    return err.value


def test_bad_upload_streams(server) -> None:
    meta = pb.UploadModelRequest(metadata=pb.UploadModelMetadata(name="x"))
    chunk = pb.UploadModelRequest(chunk=TINY)
    finish = pb.UploadModelRequest(finish=pb.UploadModelFinish(sha256="0" * 64))
    cases = {
        "must be `metadata`": [chunk],
        "checksum mismatch": [meta, chunk, finish],
        "without a `finish`": [meta, chunk],
        "metadata comes only first": [meta, meta],
    }
    huge = pb.UploadModelRequest(metadata=pb.UploadModelMetadata(name="huge", size_bytes=1 << 40))
    err = _raw_upload(server, [huge, chunk])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "up to" in err.details()
    for hint, messages in cases.items():
        err = _raw_upload(server, messages)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and hint in err.details()
    assert not list(server.servicer.store.staging.iterdir())  # nothing half-written stays behind


def test_upload_cancelled_midway_leaves_nothing(server) -> None:
    from service.api.preimage.v1 import preimage_pb2_grpc as pb_grpc

    sent = []

    def slow_upload():
        yield pb.UploadModelRequest(metadata=pb.UploadModelMetadata(name="half"))
        for _ in range(50):
            sent.append(1)
            yield pb.UploadModelRequest(chunk=b"\0" * 65536)
            time.sleep(0.02)

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        future = pb_grpc.PreimageServiceStub(channel).UploadModel.future(slow_upload(), timeout=30)
        while len(sent) < 5:
            time.sleep(0.01)
        future.cancel()
    deadline = time.monotonic() + 5
    while list(server.servicer.store.staging.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(server.servicer.store.staging.iterdir())
    assert "half" not in [r.name for r in server.servicer.store.list()]


def test_server_still_serves_after_errors(server, client: PreimageClient, tiny) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "preimage.v1.PreimageService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert client.maximize("tiny", "relu1", [0], **FAST).wait().results[0].png


def test_other_calls_stay_responsive_during_a_job(server, client: PreimageClient, tiny) -> None:
    run = client.maximize("tiny", "relu2", [0], steps=50_000, report_every=5)
    events = iter(run)
    next(events)  # the optimization is running
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        start = time.monotonic()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        models = client.models()
        taps = client.taps("tiny")
        elapsed = time.monotonic() - start
    run.cancel()
    assert health.status == health_pb2.HealthCheckResponse.SERVING and models and taps.taps
    assert elapsed < 2.0, f"management calls took {elapsed:.2f} s while a job ran"


def test_structured_logs(client: PreimageClient, tiny) -> None:
    import json

    with captured_server_logs() as stream:
        client.get("tiny")
        with pytest.raises(grpc.RpcError):
            client.get("missing")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    rpcs = [line for line in lines if line["msg"] == "rpc" and line["method"] == "GetModel"]
    assert [(r["model"], r["code"]) for r in rpcs] == [("tiny", "OK"), ("missing", "NOT_FOUND")]
    assert all(r["seconds"] >= 0 and r["peer"] and r["level"] == "info" for r in rpcs)


def test_a_second_server_on_the_same_port_fails_loudly(server, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="cannot listen"):
        start_server(f"127.0.0.1:{server.port}", ServerConfig(store_dir=tmp_path, seed_bundled=False))


def test_reflection_is_enough_to_call_the_service(server, tiny) -> None:
    # What a client in another language (or grpcurl) does: no generated code, only reflection.
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert "preimage.v1.PreimageService" in db.get_services()
        pool = descriptor_pool.DescriptorPool(db)
        method = pool.FindServiceByName("preimage.v1.PreimageService").FindMethodByName("ListModels")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            "/preimage.v1.PreimageService/ListModels",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        reply = call(request_cls(), timeout=10)
        assert "tiny" in [m.name for m in reply.models]


# -- persistence ------------------------------------------------------------------------------------
def test_restart_keeps_uploaded_models(tmp_path: Path) -> None:
    config = ServerConfig(store_dir=tmp_path, seed_bundled=False, job_limits=JobLimits(max_steps=10**8))
    first = start_server("127.0.0.1:0", config)
    try:
        with PreimageClient(f"127.0.0.1:{first.port}", timeout=120) as c:
            ids = {c.upload(conv_net(seed=s), name=f"m{s}").model.id for s in (11, 12)}
            # A job still running when the server stops is cancelled, not left spinning.
            run = c.maximize("m11", "relu2", [0], steps=10**8, report_every=5, channel_max=1.0)  # cannot end
            next(iter(run))
    finally:
        first.stop(grace=None)
    with pytest.raises(grpc.RpcError):
        run.wait()
    deadline = time.monotonic() + 10
    while first.servicer.jobs_finished == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert first.servicer.recent_jobs[-1].stats.cancelled
    second = start_server("127.0.0.1:0", config)
    try:
        with PreimageClient(f"127.0.0.1:{second.port}", timeout=120) as c:
            assert {m.id for m in c.models()} == ids
            assert len(c.taps("m11").taps) == 6
            assert c.get("m12").labels == []
    finally:
        second.stop(grace=None)
