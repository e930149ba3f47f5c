"""Quantized models made by onnxruntime's own quantizer from a CNN exported here: QDQ (per tensor and per
channel), QOperator (QLinearConv, QLinearMatMul) and dynamic (DynamicQuantizeLinear, ConvInteger,
MatMulInteger). Each converts to a float torch graph that matches onnxruntime within one quantization
step, and passes a gradient to the image through the rounding. A conversion that ignores zero points is
refused; a dynamically quantized LSTM (a contrib op) is refused naming the op."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import converters.quantized as quantized
from converters.errors import ModelError
from converters.model import load_model
from converters.parity import MAX_STEPS, MEAN_STEPS, ParityError, probe_images

torch.set_num_threads(1)
SIZE = 24
ort_quant = pytest.importorskip("onnxruntime.quantization")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.w = nn.Parameter(torch.randn(16, 10) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c2(torch.relu(self.c1(x))))
        return torch.matmul(y.mean(dim=(2, 3)), self.w)  # MatMul: QLinearMatMul/MatMulInteger, not QGemm


def _export(net: nn.Module, example: torch.Tensor) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (example,), f, dynamo=False, opset_version=17, input_names=["input"])
    return f.getvalue()


class _Reader(ort_quant.CalibrationDataReader):
    def __init__(self, fp32: bytes):
        model = load_model(fp32, verify=False)
        x = probe_images(6, SIZE, SIZE, seed=7)
        self.feeds = iter([{"input": model.to_model_input(x[i : i + 1])} for i in range(len(x))])

    def get_next(self) -> dict | None:
        return next(self.feeds, None)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("quantized")
    fp32 = _export(_Net(), torch.randn(1, 3, SIZE, SIZE))
    (d / "fp32.onnx").write_bytes(fp32)
    q = ort_quant
    static = {
        "qdq_tensor": {"quant_format": q.QuantFormat.QDQ, "per_channel": False},
        "qdq_channel": {"quant_format": q.QuantFormat.QDQ, "per_channel": True},
        "qoperator": {
            "quant_format": q.QuantFormat.QOperator,
            "per_channel": True,
            "op_types_to_quantize": ["Conv", "MatMul"],
        },  # fmt: skip
    }
    out = {"fp32": d / "fp32.onnx"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, kw in static.items():
            out[name] = d / f"{name}.onnx"
            q.quantize_static(out["fp32"], out[name], _Reader(fp32), activation_type=q.QuantType.QUInt8,
                              weight_type=q.QuantType.QInt8, **kw)  # fmt: skip
        out["dynamic"] = d / "dynamic.onnx"
        q.quantize_dynamic(out["fp32"], out["dynamic"], weight_type=q.QuantType.QUInt8,
                           op_types_to_quantize=["Conv", "MatMul"])  # fmt: skip
    return out


EXPECTED_OPS = {
    "qdq_tensor": {"QuantizeLinear", "DequantizeLinear"},
    "qdq_channel": {"QuantizeLinear", "DequantizeLinear"},
    "qoperator": {"QLinearConv", "QLinearMatMul", "QuantizeLinear", "DequantizeLinear"},
    "dynamic": {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"},
}


@pytest.mark.parametrize("name", list(EXPECTED_OPS))
def test_quantized_model_converts_within_one_step(files: dict[str, Path], name: str) -> None:
    uploaded = onnx.load(files[name])
    assert EXPECTED_OPS[name] <= {n.op_type for n in uploaded.graph.node}
    if name == "qdq_channel":  # per-channel weights: a scale per output channel
        scales = [t for t in uploaded.graph.initializer if t.name.endswith("_scale") and len(t.dims) == 1]
        assert any(t.dims[0] > 1 for t in scales)
    model = load_model(files[name])
    report = model.parity
    assert report.ok and len(report.taps) == 3, report.summary()
    for tap in report.taps:
        # within float tolerance, or rare flips by at most two quantization steps (propagated)
        within_steps = tap.step > 0 and tap.step_error <= MAX_STEPS + 1e-4 and tap.step_mean <= MEAN_STEPS
        assert tap.rel_error <= report.tolerance or within_steps, report.summary()
    x = probe_images(1, SIZE, SIZE, seed=2).requires_grad_(True)
    model.representation(model.output_tap)(x)[0, 3].backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and float(x.grad.abs().max()) > 0


def test_rounding_passes_the_gradient_straight_through() -> None:
    v = torch.tensor([0.2, 0.5, 1.5, 3.7, 300.0], requires_grad=True)
    y = quantized.clamp_ste(quantized.round_ste(v), 0, 255)
    assert y.tolist() == [0.0, 0.0, 2.0, 4.0, 255.0]  # half to even, saturated
    y.sum().backward()
    assert v.grad.tolist() == [1.0] * 5


def test_a_conversion_that_ignores_zero_points_is_refused(files: dict[str, Path], monkeypatch) -> None:
    def no_zero_point(self, x, scale, zero_point=None):  # noqa: ANN001, ANN202
        return x.to(torch.float32) * quantized._per_axis(scale.to(torch.float32), self.axis, x.dim())

    monkeypatch.setattr(quantized.Dequantize, "forward", no_zero_point)
    with pytest.raises(ParityError) as info:
        load_model(files["qdq_tensor"])
    assert any(t.step > 0 and t.step_error > 1.0 for t in info.value.report.taps)


def test_a_conversion_that_rounds_down_is_refused(files: dict[str, Path], monkeypatch) -> None:
    monkeypatch.setattr(quantized, "round_ste", lambda v: v + (torch.floor(v) - v).detach())
    with pytest.raises(ParityError) as info:
        load_model(files["qdq_channel"])
    assert any(t.step > 0 and t.step_mean > MEAN_STEPS for t in info.value.report.taps)


class _Recognizer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.rnn = nn.LSTM(4 * 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.conv(x))  # [N, 4, 8, W]
        y, _ = self.rnn(f.flatten(1, 2).permute(2, 0, 1))
        return y


def test_dynamically_quantized_lstm_is_refused_naming_the_contrib_op(tmp_path: Path) -> None:
    torch.manual_seed(0)
    fp32 = tmp_path / "rec.onnx"
    fp32.write_bytes(_export(_Recognizer(), torch.randn(1, 1, 8, 16)))
    assert load_model(fp32).parity.ok  # the float model is served (LSTM converts)
    quant = tmp_path / "rec_q.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ort_quant.quantize_dynamic(fp32, quant, weight_type=ort_quant.QuantType.QInt8)
    assert "DynamicQuantizeLSTM" in {n.op_type for n in onnx.load(quant).graph.node}
    with pytest.raises(ModelError) as info:
        load_model(quant)
    assert "com.microsoft" in str(info.value) and "DynamicQuantizeLSTM" in str(info.value)


def test_quantization_bounds_follow_the_graph(files: dict[str, Path]) -> None:
    model = load_model(files["qdq_tensor"], verify=False)
    bounds = quantized.quantization_bounds(model.onnx)
    dq = [n for n in model.onnx.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(bounds[n.output[0]] > 0 for n in dq)
    assert quantized.quantization_bounds(load_model(files["fp32"], verify=False).onnx) == {}
    assert np.isfinite(list(bounds.values())).all()


@pytest.fixture(scope="module")
def deep_qdq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """resnet18 (64 px) quantized per channel in QDQ format: deep enough that one-step flips at rounding
    boundaries (float sums in another order than onnxruntime's) accumulate through the layers."""
    from tests.converters._converter_zoo import build, export

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("deep_qdq")
    fp32 = export(build("resnet18", "random"), False, 17, 64)
    (d / "fp32.onnx").write_bytes(fp32)
    probe = load_model(fp32, verify=False)

    class Reader(ort_quant.CalibrationDataReader):
        def __init__(self) -> None:
            x = probe_images(4, 64, 64, seed=7)
            self.feeds = iter([{probe.input_name: probe.to_model_input(x[i : i + 1])} for i in range(4)])

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ort_quant.quantize_static(d / "fp32.onnx", d / "q.onnx", Reader(), quant_format=ort_quant.QuantFormat.QDQ,
                                  per_channel=True, activation_type=ort_quant.QuantType.QUInt8,
                                  weight_type=ort_quant.QuantType.QInt8)  # fmt: skip
    return d / "q.onnx"


def test_deep_per_channel_qdq_is_judged_layer_by_layer(deep_qdq: Path) -> None:
    from converters.parity import _layer_by_layer

    model = load_model(deep_qdq)  # refused before: 7 steps max, 0.96 mean at the output, accumulated
    assert model.parity.ok, model.parity.summary()
    worst_max, worst_mean, _ = _layer_by_layer(model, probe_images(2, 64, 64))
    assert worst_max <= MAX_STEPS and worst_mean <= MEAN_STEPS  # every layer on onnxruntime's own inputs


def test_layer_by_layer_still_catches_a_wrong_rounding(deep_qdq: Path, monkeypatch) -> None:
    monkeypatch.setattr(quantized, "round_ste", lambda v: v + (torch.floor(v) - v).detach())
    with pytest.raises(ParityError) as info:
        load_model(deep_qdq)
    assert not any(t.reference.startswith("onnxruntime layer by layer") for t in info.value.report.taps)
