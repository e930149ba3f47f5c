"""Exemplars through a real server on loopback, on the bundled EfficientNet-Lite0 and scikit-image's
photographs (plus flips and crops): the top image of a class logit is that class's photograph, a
mid-layer channel's reported position matches a brute-force onnxruntime activation map, and bad
inputs get their codes while the server keeps serving. Also the client method over paths, and the
CLI (contact sheet, --json)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from service.api.preimage.v1 import preimage_pb2 as pb
from service.client import PreimageClient
from service.jobs.job import resize
from service.jobs.limits import JobLimits
from service.jobs.reference import photo
from service.rpc.app import start_server
from service.rpc.config import ServerConfig

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")
MODEL = "effnet"


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def photo_set() -> list[tuple[str, bytes]]:
    """Each photograph, its mirror image and a centre crop of half its side, scaled down (the
    model resizes to 224 anyway; small PNGs keep the stream fast)."""
    out = []
    for name in PHOTOS:
        img = resize(photo(name), 160, 160)
        h, w = img.shape[:2]
        out += [
            (name, png(img)),
            (f"{name}-flip", png(img[:, ::-1])),
            (f"{name}-crop", png(img[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2])),
        ]
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from converters.bundled import bundled_model_path

    config = ServerConfig(
        store_dir=tmp_path_factory.mktemp("store"),
        seed_bundled=False,
        torch_threads=1,
        job_limits=JobLimits(max_input_pixels=1024 * 1024, max_image_bytes=2 << 20, max_targets=8),
        upload_idle_seconds=5.0,  # the stalled-client test waits this long
    )
    running = start_server("127.0.0.1:0", config)
    with PreimageClient(f"127.0.0.1:{running.port}", timeout=300) as client:
        client.upload(bundled_model_path(), name=MODEL)
    yield running
    running.stop(grace=None)


@pytest.fixture(scope="module")
def client(server: object) -> Iterator[PreimageClient]:
    with PreimageClient(f"127.0.0.1:{server.port}", timeout=300) as c:  # type: ignore[attr-defined]
        yield c


@pytest.fixture(scope="module")
def images() -> list[tuple[str, bytes]]:
    return photo_set()


def mid_tap(client: PreimageClient) -> pb.Tap:
    """A mid-layer tap: spatial, stride 8, not global."""
    taps = client.taps(MODEL).taps
    return next(t for t in taps if t.stride == 8 and not t.is_global and len(t.shape) == 3 and t.receptive_field > 32)


def test_logit_top_exemplar_is_the_class_photo(client: PreimageClient, images: list[tuple[str, bytes]]) -> None:
    out = client.taps(MODEL).taps[-1]
    results = client.exemplars(MODEL, out.name, images, [285, 967], top_k=3, bottom_k=2)
    assert [r.target_index for r in results] == [0, 1]
    cat, coffee = results
    assert cat.top[0].image_id.startswith("chelsea"), [e.image_id for e in cat.top]
    assert coffee.top[0].image_id.startswith("coffee"), [e.image_id for e in coffee.top]
    for r in results:
        assert r.images == len(images)
        acts = [e.activation for e in r.top]
        assert acts == sorted(acts, reverse=True) and len(r.top) == 3 and len(r.bottom) == 2
        assert r.top[0].fraction_of_max == pytest.approx(1.0) and r.set_max == pytest.approx(acts[0])
        assert r.bottom[0].activation <= r.bottom[1].activation <= acts[-1]
        # A logit is global: the crop is the whole model-input image.
        assert list(r.top[0].box) == [0, 0, 224, 224]
        assert Image.open(io.BytesIO(r.top[0].crop_png)).size[0] >= 16


def test_mid_layer_position_matches_onnxruntime(
    server: object, client: PreimageClient, images: list[tuple[str, bytes]]
) -> None:
    import torch

    from converters.parity import ort_session
    from converters.truncate import extract_subgraph
    from service.energy import from_uint8
    from service.jobs.job import decode_image

    tap = mid_tap(client)
    channels = [0, 5]
    results = client.exemplars(MODEL, tap.name, images, channels, top_k=2, crop_size=48)
    record = server.servicer.store.get(MODEL)  # type: ignore[attr-defined]
    converted = server.servicer.cache.get(record)  # type: ignore[attr-defined]
    sub = extract_subgraph(converted.onnx, converted.input_name, [tap.name])
    session = ort_session(sub)
    by_id = dict(images)
    mean = torch.tensor(converted.preprocessing.mean_rgb255)
    for channel, r in zip(channels, results, strict=True):
        best = r.top[0]
        img = resize(decode_image(by_id[best.image_id], 0, JobLimits()), 224, 224)
        x = from_uint8(img, mean)[None]
        ref = session.run(None, {converted.input_name: converted.to_model_input(x)})[0][0, channel]
        y, xx = np.unravel_index(int(np.argmax(ref)), ref.shape)
        assert (best.y, best.x) == (y, xx)
        assert best.activation == pytest.approx(float(ref.max()), rel=1e-3, abs=1e-3)
        # And no other image of the set beats it under onnxruntime.
        for image_id, data in images:
            other = from_uint8(resize(decode_image(data, 0, JobLimits()), 224, 224), mean)[None]
            value = session.run(None, {converted.input_name: converted.to_model_input(other)})[0][0, channel].max()
            assert value <= float(ref.max()) + 1e-3, image_id
        top, left, h, w = best.box
        assert 0 <= top and top + h <= 224 and 0 <= left and left + w <= 224 and 0 < h <= tap.receptive_field
        # The crop contains the unit's cell centre (effective stride 224 / map side).
        cy, cx = (best.y + 0.5) * 224 / ref.shape[0], (best.x + 0.5) * 224 / ref.shape[1]
        assert top <= cy <= top + h and left <= cx <= left + w
        assert Image.open(io.BytesIO(best.crop_png)).size == (48, 48)


def _stream(header: pb.ExemplarsHeader, blobs: list[bytes]) -> Iterator[pb.ExemplarsRequest]:
    yield pb.ExemplarsRequest(header=header)
    for b in blobs:
        yield pb.ExemplarsRequest(image=pb.ExemplarsImage(data=b))


def _code(client: PreimageClient, header: pb.ExemplarsHeader, blobs: list[bytes]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        list(client.stub.Exemplars(_stream(header, blobs), timeout=120))
    return info.value.code(), info.value.details()


def test_bad_inputs_get_their_codes_and_the_server_keeps_serving(
    client: PreimageClient, images: list[tuple[str, bytes]]
) -> None:
    tap = mid_tap(client)
    ok = pb.ExemplarsHeader(model=MODEL, tap=tap.name, targets=[pb.MaximizeTarget(channel=pb.ChannelTarget(channel=0))])
    good = images[0][1]
    code, details = _code(client, ok, [good, b"this is not an image"])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "images[1]" in details
    huge = png(np.zeros((1100, 1100, 3), np.uint8))  # over max_input_pixels, within max_image_bytes
    code, details = _code(client, ok, [huge])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "images[0]" in details
    many = pb.ExemplarsHeader(model=MODEL, tap=tap.name, targets=[ok.targets[0]] * 9)
    code, details = _code(client, many, [good])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "9 targets" in details
    unknown = pb.ExemplarsHeader(model=MODEL, tap="no-such-tap", targets=ok.targets)
    code, details = _code(client, unknown, [good])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and error_details_reason(code, details)
    code, _ = _code(client, pb.ExemplarsHeader(model=MODEL, tap=tap.name), [good])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # Images before a header.
    with pytest.raises(grpc.RpcError) as info:
        list(client.stub.Exemplars(iter([pb.ExemplarsRequest(image=pb.ExemplarsImage(data=good))]), timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A stream cancelled mid-way, while images flow (four batches sent, more to come): the client
    # sees CANCELLED, and the server's stream slot comes back (checked below by a new call).
    holder: dict[str, grpc.Future] = {}

    def cancelling() -> Iterator[pb.ExemplarsRequest]:
        yield pb.ExemplarsRequest(header=ok)
        for i in range(10_000):
            if i == 64:
                holder["call"].cancel()
            yield pb.ExemplarsRequest(image=pb.ExemplarsImage(data=good))

    call = client.stub.Exemplars(cancelling(), timeout=120)
    holder["call"] = call
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    # Still serving, and the same answer as before the errors.
    results = client.exemplars(MODEL, tap.name, images[:3], [0], top_k=1)
    assert results[0].images == 3 and len(results[0].top) == 1


def _rpc_lines(stream: io.StringIO) -> list[dict]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    return [x for x in lines if x.get("msg") == "rpc" and str(x.get("method", "")).endswith("Exemplars")]


def test_a_stalled_stream_stops_within_one_batch(client: PreimageClient, images: list[tuple[str, bytes]]) -> None:
    """40 images arrive, then nothing: the two full batches of 16 go to the model, the partial
    third never does, and the server's idle limit ends the call (a stalled client holds no stream
    slot). The first batch is ranked when the second is submitted; the second waits, in flight,
    for the third, so the log counts 16 ranked images."""
    import threading
    import time

    from tests.service._logs import captured_server_logs

    tap = mid_tap(client)
    header = pb.ExemplarsHeader(
        model=MODEL, tap=tap.name, targets=[pb.MaximizeTarget(channel=pb.ChannelTarget(channel=0))], batch_size=16
    )
    release = threading.Event()

    def stalling() -> Iterator[pb.ExemplarsRequest]:
        yield pb.ExemplarsRequest(header=header)
        for i in range(40):
            yield pb.ExemplarsRequest(image=pb.ExemplarsImage(data=images[i % len(images)][1], id=str(i)))
        release.wait(120)  # stalls until the test ends the call

    try:
        with captured_server_logs() as stream:
            with pytest.raises(grpc.RpcError) as info:
                list(client.stub.Exemplars(stalling(), timeout=120))
            for _ in range(300):  # the log line follows the status: wait for it, not for a time
                if _rpc_lines(stream):
                    break
                time.sleep(0.1)
    finally:
        release.set()
    # The server's idle limit (5 s here) ended it, well before the client's deadline.
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "sent nothing" in info.value.details()
    (line,) = _rpc_lines(stream)
    assert line["images"] == 16, line
    assert client.exemplars(MODEL, tap.name, images[:2], [0], top_k=1)[0].images == 2


def error_details_reason(code: grpc.StatusCode, details: str) -> bool:
    return "unknown tap" in details and "no-such-tap" in details


def test_arrays_go_as_pixels_and_rank_exactly_as_their_pngs(
    client: PreimageClient, images: list[tuple[str, bytes]]
) -> None:
    from service.client.library import exemplar_image

    arrays = [(name, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))) for name, data in images]
    sent = exemplar_image(arrays[0][1], "x")
    assert sent.HasField("pixels") and not sent.data and sent.pixels.channels == 3
    tap = mid_tap(client)
    as_png = client.exemplars(MODEL, tap.name, images, [0, 5], top_k=4)
    as_pixels = client.exemplars(MODEL, tap.name, arrays, [0, 5], top_k=4)
    for a, b in zip(as_png, as_pixels, strict=True):
        assert [(e.image_id, e.activation, e.y, e.x) for e in a.top] == [
            (e.image_id, e.activation, e.y, e.x) for e in b.top
        ]
        assert [e.crop_png for e in a.top] == [e.crop_png for e in b.top]


def test_client_takes_paths_and_cli_writes_a_sheet(
    server: object, client: PreimageClient, images: list[tuple[str, bytes]], tmp_path: Path, capsys
) -> None:
    from service.cli.main import main as cli_main

    folder = tmp_path / "photos"
    folder.mkdir()
    for image_id, data in images[:6]:
        (folder / f"{image_id}.png").write_bytes(data)
    paths = sorted(folder.glob("*.png"))
    results = client.exemplars(MODEL, client.taps(MODEL).taps[-1].name, paths, [285], top_k=2)
    assert results[0].top[0].image_id.startswith("chelsea") and results[0].top[0].image_id.endswith(".png")
    tap = mid_tap(client)
    out = tmp_path / "sheet.png"
    address = f"127.0.0.1:{server.port}"  # type: ignore[attr-defined]
    argv = ["exemplars", "--model", MODEL, "--server", address, "--tap", tap.name, "--channel", "0-1", "--top", "4"]
    assert cli_main([*argv, "--images", str(folder), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [t["channel"] for t in summary["targets"]] == [0, 1]
    assert all(len(t["top"]) == 4 for t in summary["targets"])
    sheet = Image.open(out)
    assert sheet.size[0] > 4 * 16 and sheet.size[1] > 2 * 16
    # The same with a glob.
    assert cli_main([*argv, "--images", str(folder / "chelsea*.png"), "--out", str(out)]) == 0


def test_the_batch_shrinks_to_the_memory_limit_and_one_image_over_it_is_refused(server: object) -> None:
    from service.jobs.errors import ServiceError
    from service.jobs.exemplars import fit_batch
    from service.jobs.job import activation_bytes

    converted = server.servicer.cache.get(server.servicer.store.get(MODEL))  # type: ignore[attr-defined]
    tap = converted.tap("/_blocks.7/Add")
    # Its activations, its input, and the batch being ranked while the next runs (tap output, pixels).
    ranked = 4 * int(np.prod([d or 1 for d in tap.shape])) + 3 * 224 * 224
    per_image = activation_bytes(converted, tap, 224, 224) + 4 * 3 * 224 * 224 * 2 + ranked
    crops = 2 * 10 * 64 * 64 * 3
    assert fit_batch(16, converted, tap, 224, 224, 2, 10, 64, JobLimits()) == 16
    assert fit_batch(16, converted, tap, 224, 224, 2, 10, 64, JobLimits(max_job_bytes=crops + 3 * per_image)) == 3
    with pytest.raises(ServiceError) as info:
        fit_batch(16, converted, tap, 224, 224, 2, 10, 64, JobLimits(max_job_bytes=per_image // 2))
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "earlier tap" in info.value.message


def _ort_maps(server: object, tap_name: str, images: list[tuple[str, bytes]]) -> tuple[object, dict[str, np.ndarray]]:
    """onnxruntime's output of the graph truncated at ``tap_name`` for every image of the set, by id."""
    import torch

    from converters.parity import ort_session
    from converters.truncate import extract_subgraph
    from service.energy import from_uint8
    from service.jobs.job import decode_image

    converted = server.servicer.cache.get(server.servicer.store.get(MODEL))  # type: ignore[attr-defined]
    session = ort_session(extract_subgraph(converted.onnx, converted.input_name, [tap_name]))
    mean = torch.tensor(converted.preprocessing.mean_rgb255)
    out = {}
    for image_id, data in images:
        x = from_uint8(resize(decode_image(data, 0, JobLimits()), 224, 224), mean)[None]
        out[image_id] = session.run(None, {converted.input_name: converted.to_model_input(x)})[0][0]
    return converted, out


def test_heat_maps_and_fractions_follow_the_onnxruntime_map(
    server: object, client: PreimageClient, images: list[tuple[str, bytes]]
) -> None:
    """Each exemplar's heat map is its channel's whole map against the set's maximum: undoing the
    half-and-half blend with the image recovers onnxruntime's map, upsampled; fractions are the
    activation over the set's maximum, which is onnxruntime's maximum over every image."""
    import torch

    from service.jobs.job import decode_image

    tap = mid_tap(client)
    channel = 5
    (result,) = client.exemplars(MODEL, tap.name, images, [channel], top_k=3, heat_maps=True)
    _, maps = _ort_maps(server, tap.name, images)
    set_max = max(float(m[channel].max()) for m in maps.values())
    assert result.set_max == pytest.approx(set_max, rel=1e-3, abs=1e-3)
    by_id = dict(images)
    for e in result.top:
        assert e.fraction_of_max == pytest.approx(e.activation / result.set_max)
        assert e.fraction_of_max == pytest.approx(float(maps[e.image_id][channel].max()) / set_max, abs=1e-3)
        heat = np.asarray(Image.open(io.BytesIO(e.heat_map_png)).convert("RGB")).astype(np.float64)
        assert heat.shape == (224, 224, 3)
        img = resize(decode_image(by_id[e.image_id], 0, JobLimits()), 224, 224).astype(np.float64)
        # The colour ramp's three channels sum to 3·v (v the map over the set's maximum, 0–1).
        recovered = np.clip(2 * heat - img, 0, 255).sum(-1) / (3 * 255)
        v = torch.from_numpy(np.clip(maps[e.image_id][channel] / set_max, 0, 1).astype(np.float32))[None, None]
        expected = torch.nn.functional.interpolate(v, size=(224, 224), mode="bilinear", align_corners=False)
        assert np.abs(recovered - expected[0, 0].numpy()).mean() < 0.01
        assert np.abs(recovered - expected[0, 0].numpy()).max() < 0.05
    # Off by default, and never for a 1-D output.
    (plain,) = client.exemplars(MODEL, tap.name, images[:3], [channel], top_k=1)
    assert plain.top[0].heat_map_png == b""
    out = client.taps(MODEL).taps[-1]
    (logit,) = client.exemplars(MODEL, out.name, images[:3], [285], top_k=1, heat_maps=True)
    assert logit.top[0].heat_map_png == b"" and not logit.top[0].top_classes  # no labels on this upload


def test_a_labelled_model_names_each_logit_exemplars_top_classes(
    server: object, client: PreimageClient, images: list[tuple[str, bytes]]
) -> None:
    import onnx
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    from converters.bundled import bundled_model_path

    # The store is content-addressed: the same bytes would be the unlabelled model again.
    proto = onnx.load(bundled_model_path())
    proto.doc_string = "the bundled model, uploaded with its labels"
    client.upload(proto.SerializeToString(), name="effnet-labelled", labels=list(_IMAGENET_CATEGORIES))
    out = client.taps("effnet-labelled").taps[-1]
    results = client.exemplars("effnet-labelled", out.name, images, [285, 967], top_k=2)
    _, logits = _ort_maps(server, out.name, images)  # the same weights as MODEL
    for cls, r in zip([285, 967], results, strict=True):
        for e in r.top:
            order = np.argsort(-logits[e.image_id])[:5]
            assert [c.index for c in e.top_classes] == [int(i) for i in order]
            assert [c.label for c in e.top_classes] == [_IMAGENET_CATEGORIES[int(i)] for i in order]
            scores = [c.score for c in e.top_classes]
            assert scores == sorted(scores, reverse=True)
            assert scores[0] == pytest.approx(float(logits[e.image_id].max()), rel=1e-3, abs=1e-3)
        # The class's best photograph has that class among its five highest.
        assert cls in [c.index for c in r.top[0].top_classes], [c.label for c in r.top[0].top_classes]


def test_cli_with_maximize_heat_maps_and_json(
    server: object, client: PreimageClient, images: list[tuple[str, bytes]], tmp_path: Path, capsys
) -> None:
    from service.cli.main import main as cli_main

    folder = tmp_path / "photos"
    folder.mkdir()
    for image_id, data in images:
        (folder / f"{image_id}.png").write_bytes(data)
    tap = mid_tap(client)
    address = f"127.0.0.1:{server.port}"  # type: ignore[attr-defined]
    argv = ["exemplars", "--model", MODEL, "--server", address, "--tap", tap.name, "--channel", "3", "--top", "9",
            "--crop", "48", "--images", str(folder), "--json"]  # fmt: skip
    plain, lead = tmp_path / "plain.png", tmp_path / "lead.png"
    assert cli_main([*argv, "--out", str(plain)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["with_maximize"] is False and "heat_map" not in summary["targets"][0]["top"][0]
    heat_dir = tmp_path / "heat"
    more = ["--out", str(lead), "--with-maximize", "--maximize-steps", "4", "--heat-maps", str(heat_dir)]
    assert cli_main([*argv, *more]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["with_maximize"] is True
    tops = summary["targets"][0]["top"]
    assert len(tops) == 9 and all(Path(e["heat_map"]).is_file() for e in tops)
    assert Image.open(tops[0]["heat_map"]).size == (224, 224)
    # One row of 9 crops at 48 px; with the Maximize image the crops fold into 3×3 beside it, as high.
    assert np.asarray(Image.open(plain)).shape[:2] == (48, 9 * 50 - 2)
    sheet = np.asarray(Image.open(lead).convert("RGB"))
    side = 3 * 48 + 2 * 2
    assert sheet.shape[:2] == (side, side + 8 + 3 * 50 - 2)
    # The crops are the same, moved beside the lead; the lead is an image, not white space.
    plain_rgb = np.asarray(Image.open(plain).convert("RGB"))
    assert np.array_equal(sheet[:48, side + 8 : side + 8 + 48], plain_rgb[:, :48])
    assert np.array_equal(sheet[50:98, side + 8 : side + 8 + 48], plain_rgb[:, 3 * 50 : 3 * 50 + 48])
    assert sheet[:side, :side].astype(np.float64).std() > 5
