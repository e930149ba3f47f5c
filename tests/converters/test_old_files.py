"""Old files, built here the way Model Zoo-era exporters wrote them: IR 3 (every initializer also listed as a
graph input), opsets 7–9, LRN, Dropout, Sum, BatchNormalization with ``spatial``, Upsample. They are
upgraded (IR, then onnx.version_converter), converted, and judged against onnxruntime on the file as
uploaded."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import converters.model as model_module
from converters.inspect import format_inspection, inspect_model
from converters.model import load_model
from converters.parity import ParityError, probe_images

torch.set_num_threads(1)


def _w(rng: np.random.Generator, name: str, *shape: int, s: float = 0.3, positive: bool = False) -> onnx.TensorProto:
    a = rng.standard_normal(shape) * s
    return numpy_helper.from_array((np.abs(a) + 0.5 if positive else a).astype(np.float32), name)


def zoo_style(opset: int, ir: int = 3) -> onnx.ModelProto:
    """An AlexNet/ResNet-flavoured classifier in the old style: Conv, Relu, LRN, MaxPool, Conv,
    BatchNormalization, Sum (a residual), GlobalAveragePool, Flatten, Dropout, Gemm, Softmax."""
    rng = np.random.default_rng(opset)
    inits = [_w(rng, "w1", 8, 3, 3, 3), _w(rng, "b1", 8), _w(rng, "w2", 8, 8, 3, 3), _w(rng, "b2", 8),
             _w(rng, "scale", 8, positive=True), _w(rng, "bias", 8), _w(rng, "mean", 8),
             _w(rng, "var", 8, positive=True), _w(rng, "wf", 10, 8), _w(rng, "bf", 10)]  # fmt: skip
    bn = {"epsilon": 1e-5, **({"spatial": 1} if opset < 9 else {})}
    nodes = [
        helper.make_node("Conv", ["data", "w1", "b1"], ["conv1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("LRN", ["relu1"], ["norm1"], size=5, alpha=1e-4, beta=0.75, bias=1.0, name="norm1"),
        helper.make_node("MaxPool", ["norm1"], ["pool1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Conv", ["pool1", "w2", "b2"], ["conv2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("BatchNormalization", ["conv2", "scale", "bias", "mean", "var"], ["bn2"], name="bn2", **bn),
        helper.make_node("Sum", ["bn2", "pool1"], ["sum2"], name="sum2"),
        helper.make_node("Relu", ["sum2"], ["relu2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["relu2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("Dropout", ["flat"], ["drop"], name="drop", **({"ratio": 0.5} if opset < 12 else {})),
        helper.make_node("Gemm", ["drop", "wf", "bf"], ["fc"], transB=1, name="fc"),
        helper.make_node("Softmax", ["fc"], ["prob"], name="prob"),
    ]
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 32, 32])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]  # IR < 4 style
    g = helper.make_graph(nodes, "zoo", inputs, [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 10])],
                          inits)  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)


@pytest.mark.parametrize("opset", [7, 8, 9])
def test_zoo_style_file_is_upgraded_converted_and_judged_as_uploaded(opset: int) -> None:
    data = zoo_style(opset).SerializeToString()
    model = load_model(data)
    up = model.upgrade
    assert up.changed and (up.ir_from, up.opset_from) == (3, opset)
    assert up.ir_to >= 4 and up.opset_to > opset and up.initializer_inputs == 10
    assert "Dropout" in up.missing_at_opset  # onnx2torch has no Dropout before opset 10
    # the judge is the file as uploaded, not the upgraded graph
    assert model.reference is not None and model.reference.ir_version == 3
    assert {o.version for o in model.reference.opset_import} == {opset}
    assert model.parity.ok and len(model.parity.taps) == 3, model.parity.summary()
    assert model.output_tap.name == "prob"
    x = probe_images(1, 32, 32).requires_grad_(True)
    model.representation("prob")(x)[0, 3].backward()
    assert x.grad is not None and float(x.grad.abs().max()) > 0


def test_inspect_says_what_was_upgraded() -> None:
    info = inspect_model(zoo_style(9).SerializeToString())
    assert info["ok"], info["error"]
    assert info["upgrade"]["changed"] and info["upgrade"]["opset_from"] == 9
    text = format_inspection(info)
    assert "upgraded: IR 3 → " in text and "opset 9 → 10" in text and "Dropout" in text


def test_current_file_is_left_alone() -> None:
    model = load_model(zoo_style(13, ir=8).SerializeToString())
    assert not model.upgrade.changed
    assert model.reference is not None and model.reference.ir_version == 8  # the judge runs it as it came
    assert model.parity.ok


@pytest.mark.parametrize(("opset", "mode", "scale"), [(7, "nearest", 2.0), (9, "nearest", 3.0), (7, "linear", 2.0),
                                                  (9, "linear", 3.0)])  # fmt: skip
def test_upsample_becomes_resize(opset: int, mode: str, scale: float) -> None:
    """Upsample is converted to Resize at opset 11 or later (Resize-10's linear mode is onnx2torch's,
    which is wrong), with Upsample's coordinates, which onnx.version_converter drops (its Resize-11 comes
    out half_pixel: 0.17 off; the judge, running the uploaded file, catches that)."""
    rng = np.random.default_rng(0)
    inits = [_w(rng, "w", 4, 3, 3, 3)]
    ins, attrs = ["c"], {"mode": mode}
    if opset < 9:
        attrs["scales"] = [1.0, 1.0, scale, scale]
    else:
        inits.append(numpy_helper.from_array(np.array([1, 1, scale, scale], np.float32), "sc"))
        ins.append("sc")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Upsample", ins, ["u"], **attrs), helper.make_node("Relu", ["u"], ["y"])]  # fmt: skip
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    side = int(16 * scale)
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, side, side])
    g = helper.make_graph(nodes, "g", inputs, [out], inits)
    model = load_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=3)
                       .SerializeToString())  # fmt: skip
    assert "Upsample" in model.upgrade.missing_at_opset and model.upgrade.opset_to >= 11
    assert "Resize" in {n.op_type for n in model.onnx.graph.node}
    assert model.parity.ok, model.parity.summary()


def test_a_faulty_upgrade_is_caught_by_the_judge(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parity runs onnxruntime on the uploaded file: an upgrade that changed a weight must not pass."""
    real = model_module.upgrade

    def tampering(m: onnx.ModelProto):
        out, info = real(m)
        w = next(t for t in out.graph.initializer if t.name == "w2")
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, "w2"))
        return out, info

    monkeypatch.setattr(model_module, "upgrade", tampering)
    with pytest.raises(ParityError):
        load_model(zoo_style(9).SerializeToString())
