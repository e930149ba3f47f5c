"""Release checks: drift localized to a changed layer, zero drift for identical models, a
broken node named by parity, the HTML report in headless Chromium, and the CheckRelease RPC.

The models are small CNNs exported from torch in the test (fixed 32×32 input, so the check runs at
32 px and each test takes seconds).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from converters.model import load_model
from converters.spec import IMAGENET_MEAN, IMAGENET_STD
from service.cli import main
from service.client import PreimageClient
from service.release.check import Thresholds, run_check, sample_channels
from service.release.drift import channel_correlations

SIZE = 32
BEFORE = ["/relu1/Relu", "/relu2/Relu", "/Resize"]  # computed before the perturbed conv3
AFTER = ["/conv3/Conv", "/relu3/Relu", "/relu4/Relu", "/fc/Gemm"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Two xdist workers with two torch threads each oversubscribe a 2-core machine, and a loaded
    # machine then turns 20 ms steps into seconds (bench/RESULTS.md): one thread per worker.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


class SmallNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.relu1 = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = torch.nn.ReLU()
        self.conv3 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.relu3 = torch.nn.ReLU()
        self.conv4 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.relu4 = torch.nn.ReLU()
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        x = torch.nn.functional.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False)
        x = self.relu4(self.conv4(self.relu3(self.conv3(x))))
        return self.fc(x.mean((2, 3)))


def export(net: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(net.eval(), torch.zeros(1, 3, SIZE, SIZE), buf, opset_version=17, dynamo=False,
                      input_names=["image"], output_names=["logits"])
    return buf.getvalue()


def release(perturb_conv3: bool = False) -> bytes:
    torch.manual_seed(0)
    net = SmallNet()
    if perturb_conv3:  # a retrained layer: 30% weight noise on conv3 only
        g = torch.Generator().manual_seed(1)
        w = net.conv3.weight.data
        w += 0.3 * w.std() * torch.randn(w.shape, generator=g)
    return export(net)


def opset10_upsampler() -> bytes:
    """A release onnx2torch converts wrongly: Resize-10 (opset 10) in linear mode means asymmetric
    coordinates, which onnx2torch maps onto torch's half-pixel bilinear (0.43 relative error measured
    on a small graph). converters/resize.py handles Resize 11–19; opset 10 is left to onnx2torch, so
    this is a real conversion fault for the gate to catch, not a simulated one."""
    rng = np.random.default_rng(0)

    def weights(name: str, *shape: int) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    h = onnx.helper
    def node(op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:  # named as torch names them
        return h.make_node(op, inputs, [output], name=output, **attrs)

    nodes = [
        node("Conv", ["image", "w1", "b1"], "/conv1/Conv", pads=[1, 1, 1, 1], strides=[2, 2]),
        node("Relu", ["/conv1/Conv"], "/relu1/Relu"),
        node("Resize", ["/relu1/Relu", "scales"], "/Resize", mode="linear"),
        node("Conv", ["/Resize", "w2", "b2"], "/conv2/Conv", pads=[1, 1, 1, 1]),
        node("Relu", ["/conv2/Conv"], "/relu2/Relu"),
        node("GlobalAveragePool", ["/relu2/Relu"], "/pool/GlobalAveragePool"),
        node("Flatten", ["/pool/GlobalAveragePool"], "/Flatten"),
        node("Gemm", ["/Flatten", "wf", "bf"], "logits", transB=1),
    ]
    inits = [weights("w1", 8, 3, 3, 3), weights("b1", 8), weights("w2", 8, 8, 3, 3), weights("b2", 8),
             weights("wf", 10, 8), weights("bf", 10),
             onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]  # fmt: skip
    graph = h.make_graph(nodes, "upsampler", [h.make_tensor_value_info("image", onnx.TensorProto.FLOAT,
                                                                         [1, 3, SIZE, SIZE])],
                         [h.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 10])], inits)  # fmt: skip
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 10)], ir_version=5).SerializeToString()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("releases")
    paths = {"v1": d / "v1.onnx", "v1_copy": d / "v1_copy.onnx", "v2": d / "v2.onnx", "broken": d / "broken.onnx"}
    v1 = release()
    paths["v1"].write_bytes(v1)
    paths["v1_copy"].write_bytes(release())
    paths["v2"].write_bytes(release(perturb_conv3=True))
    paths["broken"].write_bytes(opset10_upsampler())
    return paths


@pytest.fixture(scope="module")
def drift_run(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """v2 (conv3 perturbed) against v1 through the CLI, every layer visualized, a tight drift limit."""
    out = tmp_path_factory.mktemp("report")
    taps = [a for t in BEFORE + AFTER for a in ("--tap", t)]
    code = main(["check", str(files["v2"]), "--baseline", str(files["v1"]), "--out", str(out), *taps,
                 "--max-feature-drift", "1e-6", "--device", "cpu"])
    return code, out


def test_identical_models_have_zero_drift(files: dict[str, Path]) -> None:
    model, baseline = load_model(files["v1"], verify=False), load_model(files["v1_copy"], verify=False)
    limits = Thresholds(max_drift=0.0, max_feature_drift=0.0, max_changed_fraction=0.0)
    result = run_check(model, baseline, taps=BEFORE + AFTER, thresholds=limits)
    assert result.ok, result.reasons
    assert result.parity.ok and len(result.parity.taps) >= 9
    for layer in result.layers:
        assert layer.drift is not None
        assert layer.drift.feature_drift == 0.0 and layer.drift.visual_drift_max == 0.0
        assert layer.drift.changed_channels == 0
        assert layer.baseline_visuals is not None
        assert all(np.array_equal(a.image, b.image) for a, b in zip(layer.visuals, layer.baseline_visuals, strict=True))
        # Exemplars: the same top crops for each sampled channel, so no drift notes.
        assert [e.channel for e in layer.exemplars] == layer.channels
        assert all(len(e.top) == 3 for e in layer.exemplars)
        assert layer.baseline_exemplars is not None
        assert [e.ids for e in layer.exemplars] == [e.ids for e in layer.baseline_exemplars]
        assert layer.exemplar_notes == []


def test_perturbed_layer_drift_is_localized_and_fails_a_tight_limit(drift_run: tuple[int, Path]) -> None:
    code, out = drift_run
    assert code == 1
    data = json.loads((out / "check.json").read_text())
    assert not data["ok"] and data["parity"]["ok"]
    drift = {layer["tap"]["alias"]: layer["drift"] for layer in data["layers"]}
    for tap in BEFORE:  # untouched layers: exactly zero, images bit-identical
        assert drift[tap]["feature_drift"] == 0.0 and drift[tap]["visual_drift_max"] == 0.0, tap
        assert drift[tap]["changed_channels"] == 0
    for tap in AFTER:
        assert drift[tap]["feature_drift"] > 1e-3, tap
        assert drift[tap]["visual_drift_max"] > 1e-3, tap
    # 30% weight noise on conv3 changes what some of its channels respond to.
    assert drift["/conv3/Conv"]["changed_channels"] >= 1
    failed = {r.split("'")[1] for r in data["reasons"]}
    assert failed == set(AFTER), data["reasons"]
    notes = {layer["tap"]["alias"]: layer["exemplar_drift"] for layer in data["layers"]}
    for tap in BEFORE:  # the same activations: the same exemplars
        assert notes[tap] == [], (tap, notes[tap])
    for layer in data["layers"]:
        assert [e["channel"] for e in layer["exemplars"]] == layer["channels"]
        assert all(0 < x["fraction_of_max"] <= 1 for e in layer["exemplars"] for x in e["top"][:1])


def test_exemplars_rank_the_reference_set_as_onnxruntime_does(files: dict[str, Path]) -> None:
    from converters.parity import ort_session
    from converters.truncate import extract_subgraph
    from service.energy import from_uint8
    from service.release.exemplars import layer_exemplars, reference_set

    model = load_model(files["v1"], verify=False)
    tap = model.tap("/relu3/Relu")
    channels = sample_channels(16, 4)
    images = reference_set(SIZE, SIZE)
    assert len(images) == 24 and len({i for i, _ in images}) == 24
    ranked = layer_exemplars(model, tap, channels, (SIZE, SIZE), torch.device("cpu"), images)
    session = ort_session(extract_subgraph(model.onnx, model.input_name, [tap.name]))
    mean = torch.tensor(model.preprocessing.mean_rgb255)
    maps = {i: session.run(None, {model.input_name: model.to_model_input(from_uint8(img, mean)[None])})[0][0]
            for i, img in images}  # fmt: skip
    for ex in ranked:
        best = {i: float(m[ex.channel].max()) for i, m in maps.items()}
        expected = sorted(best, key=lambda i: -best[i])[:3]
        assert ex.ids == expected, (ex.channel, ex.ids, expected)
        top = max(best.values())
        for e in ex.top:
            assert e.activation == pytest.approx(best[e.image_id], rel=1e-4, abs=1e-5)
            assert e.fraction_of_max == pytest.approx(best[e.image_id] / top, rel=1e-4)
            assert e.crop.dtype == np.uint8 and e.crop.shape[2] == 3 and e.crop.shape[0] >= 16


def test_a_channel_whose_exemplars_change_gets_a_drift_note(files: dict[str, Path], tmp_path: Path) -> None:
    """conv3's channel 5 negated: what excites it most is now what excited it least, so its top
    exemplars change; the other sampled channels (0, 10, 15) and the layer before rank as before."""
    torch.manual_seed(0)
    net = SmallNet()
    net.conv3.weight.data[5] *= -1
    net.conv3.bias.data[5] *= -1
    path = tmp_path / "negated.onnx"
    path.write_bytes(export(net))
    result = run_check(load_model(path, verify=False), load_model(files["v1"], verify=False),
                       taps=["/relu2/Relu", "/conv3/Conv"])  # fmt: skip
    before, conv3 = result.layers
    assert before.exemplar_notes == []
    assert conv3.channels == [0, 5, 10, 15]
    assert len(conv3.exemplar_notes) == 1 and conv3.exemplar_notes[0].startswith("channel 5:"), conv3.exemplar_notes
    from service.release.report import render_html

    page = render_html(result)
    assert "channel 5: top 3 exemplars changed" in page or "channel 5: the same top 3 reordered" in page
    assert "top crops of the reference photographs" in page


def test_broken_parity_exits_nonzero_naming_the_tap(files: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    code = main(["check", str(files["broken"]), "--out", str(tmp_path), "--device", "cpu"])
    assert code == 1
    err = capsys.readouterr().err
    assert "parity: tap '/Resize'" in err
    data = json.loads((tmp_path / "check.json").read_text())
    bad = [t["alias"] for t in data["parity"]["taps"] if not t["ok"]]
    assert bad[0] == "/Resize"  # the first failing tap in graph order is the faulty node, the rest follow it
    ok = {t["alias"]: t["ok"] for t in data["parity"]["taps"]}
    before = ("/conv1/Conv", "/relu1/Relu")  # upstream of the broken node
    assert set(before) <= set(ok), sorted(ok)
    assert all(ok[alias] for alias in before), ok


def with_mean(model_bytes: bytes, mean: tuple[float, float, float]) -> bytes:
    """The same graph declaring another preprocessing mean (metadata_props, 0–1 units)."""
    m = onnx.load_from_string(model_bytes)
    entry = m.metadata_props.add()
    entry.key, entry.value = "preimage.mean", ",".join(str(v) for v in mean)
    return m.SerializeToString()


class MeanFoldedNet(SmallNet):
    """SmallNet for inputs normalized with mean 0: it subtracts ImageNet's mean/std itself first."""

    def __init__(self) -> None:
        super().__init__()
        shift = torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)
        self.register_buffer("shift", shift.view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x - self.shift)


def test_drift_sees_each_release_through_its_own_preprocessing(tmp_path: Path) -> None:
    """Same weights, another declared mean: the same photographs reach the network differently, so
    every layer drifts. Another mean folded into the graph instead: nothing drifts."""
    v1 = release()
    torch.manual_seed(0)
    folded = MeanFoldedNet()
    paths = {"v1": tmp_path / "v1.onnx", "mean": tmp_path / "mean.onnx", "folded": tmp_path / "folded.onnx"}
    paths["v1"].write_bytes(v1)
    paths["mean"].write_bytes(with_mean(v1, (0.4, 0.4, 0.4)))
    paths["folded"].write_bytes(with_mean(export(folded), (0.0, 0.0, 0.0)))
    baseline = load_model(paths["v1"], verify=False)
    taps = ["/relu1/Relu", "/fc/Gemm"]
    for name, drifts in (("mean", True), ("folded", False)):
        result = run_check(load_model(paths[name], verify=False), baseline, taps=taps)
        figures = {layer.tap.alias: layer.drift.feature_drift for layer in result.layers if layer.drift}
        assert set(figures) == set(taps), name
        for tap, drift in figures.items():
            if drifts:
                assert drift > 1e-3, (name, tap, drift)
            else:  # the folded mean rounds differently than normalizing first: float32 noise only
                assert drift < 1e-5, (name, tap, drift)


def test_check_without_limits_passes_and_reports(files: dict[str, Path], tmp_path: Path) -> None:
    code = main(["check", str(files["v2"]), "--baseline", str(files["v1"]), "--out", str(tmp_path), "--json"])
    assert code == 0  # drift is reported, not enforced, without limits
    assert (tmp_path / "report.html").stat().st_size > 10_000


def test_bad_input_exits_2(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["check", str(files["v1"]), "--out", str(tmp_path), "--tap", "no_such_tap"]) == 2
    assert "no_such_tap" in capsys.readouterr().err
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    assert main(["check", str(junk), "--out", str(tmp_path)]) == 2


def test_channel_correlation_ignores_rescaling() -> None:
    g = torch.Generator().manual_seed(0)
    old = torch.randn(4, 3, 5, 5, generator=g)
    new = old.clone()
    new[:, 0] *= 3.0  # rescaled: responds to the same things
    new[:, 1] = torch.randn(4, 5, 5, generator=g)  # responds to something else
    corr = channel_correlations(new, old)
    assert corr[0] == pytest.approx(1.0) and corr[2] == 1.0 and abs(corr[1]) < 0.5
    assert sample_channels(10, 4) == [0, 3, 6, 9] and sample_channels(3, 8) == [0, 1, 2]


# -- the report in a browser ----------------------------------------------------------------------
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (apt install chromium; .ci/run does)")
def test_report_opens_in_headless_chromium_and_shows_the_images(drift_run: tuple[int, Path], tmp_path: Path) -> None:
    _, out = drift_run
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
         "--v=0", "--window-size=1000,1400", f"--screenshot={shot}", (out / "report.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Page errors (scripts, failed loads) would be logged as console messages or network errors.
    bad = [line for line in proc.stderr.splitlines() if "CONSOLE" in line or "net::ERR" in line]
    assert not bad, bad
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int32)
    # Not blank: the page is white with dark text; the visualizations are coloured. Measured on the
    # bundled model's report: 1.8% saturated pixels and 29k distinct colours with the images, 0.16%
    # and 423 colours (anti-aliased text, green/red verdicts) with every image missing.
    spread = pixels.max(axis=2) - pixels.min(axis=2)
    coloured = float((spread > 40).mean())
    assert coloured > 0.005, f"only {coloured:.2%} of the screenshot is coloured: images missing?"
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert colours > 2000, f"{colours} distinct colours: images missing?"


# -- the RPC ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from service.rpc.app import start_server
    from service.rpc.config import ServerConfig

    running = start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path_factory.mktemp("store"),
                                                       seed_bundled=False))
    yield running
    running.stop(grace=None)


def test_check_release_rpc(server, files: dict[str, Path]) -> None:
    with PreimageClient(f"127.0.0.1:{server.port}", timeout=300) as client:
        v1 = client.upload(files["v1"], name="v1").model
        v2 = client.upload(files["v2"], name="v2").model
        events = []
        run = client.check(v2.id, v1.id, taps=["/relu2/Relu", "/relu3/Relu"], max_feature_drift=1e-6,
                           on_progress=events.append).wait()
        assert run.report is not None and not run.report.ok
        assert run.html.startswith(b"<!DOCTYPE html>") and len(run.html) == run.report.html_bytes
        data = json.loads(run.report.summary_json)
        drift = {layer["tap"]["alias"]: layer["drift"]["feature_drift"] for layer in data["layers"]}
        assert drift["/relu2/Relu"] == 0.0 and drift["/relu3/Relu"] > 1e-3
        assert [r.split("'")[1] for r in run.report.reasons] == ["/relu3/Relu"]
        assert {e.stage for e in events} == {"parity", "render"}

        for kwargs, code in [
            ({"model": v2.id, "preset": "huge"}, grpc.StatusCode.INVALID_ARGUMENT),
            ({"model": v2.id, "taps": ["nope"]}, grpc.StatusCode.INVALID_ARGUMENT),
            ({"model": v2.id, "baseline": "no-such-model"}, grpc.StatusCode.NOT_FOUND),
            ({"model": v2.id, "max_drift": float("nan")}, grpc.StatusCode.INVALID_ARGUMENT),
            ({"model": ""}, grpc.StatusCode.INVALID_ARGUMENT),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                client.check(**kwargs).wait()
            assert err.value.code() == code, (kwargs, err.value.details())
        # Through a server, a release whose parity is broken is refused at upload, before any check.
        with pytest.raises(grpc.RpcError) as err:
            client.upload(files["broken"], name="broken")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "disagrees with onnxruntime" in err.value.details()
        assert client.get(v1.id).id == v1.id  # still serving
