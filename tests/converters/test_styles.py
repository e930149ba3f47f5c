"""Graph styles of other exporters: all convert with parity (and the preprocessing arithmetic is right)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from converters.errors import ModelError
from converters.model import load_model
from converters.spec import Preprocessing
from tests.converters._converter_zoo import build, export

torch.set_num_threads(1)


def _legacy(model: nn.Module, x: torch.Tensor, opset: int) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), f, dynamo=False, opset_version=opset, input_names=["input"])
    return f.getvalue()


@pytest.fixture(scope="module")
def resnet18_onnx() -> onnx.ModelProto:
    return onnx.load_from_string(export(build("resnet18"), dynamo=False, opset=17))


def _assert_parity(model) -> None:
    assert model.parity is not None and model.parity.ok, model.parity and model.parity.summary()
    assert len(model.parity.taps) == 3


def test_weights_as_constant_nodes(resnet18_onnx: onnx.ModelProto) -> None:
    m = onnx.ModelProto()
    m.CopyFrom(resnet18_onnx)
    constants = [helper.make_node("Constant", [], [t.name], value=t, name=f"const_{i}")
                 for i, t in enumerate(m.graph.initializer)]
    nodes = constants + list(m.graph.node)
    del m.graph.initializer[:]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m)
    model = load_model(m.SerializeToString())
    _assert_parity(model)
    assert not any(n.op_type == "Constant" for n in model.onnx.graph.node)
    assert model.taps[0].op_type == "Conv" and model.taps[0].stride == 2  # Constant weights were read


def test_identity_chains(resnet18_onnx: onnx.ModelProto) -> None:
    m = onnx.ModelProto()
    m.CopyFrom(resnet18_onnx)
    nodes = []
    # Each weight reaches its consumer through two Identity nodes, and every Relu output through one:
    # the styles of deduplicating exporters and of graph surgery tools.
    for t in m.graph.initializer:
        nodes += [helper.make_node("Identity", [t.name], [t.name + "/id1"]),
                  helper.make_node("Identity", [t.name + "/id1"], [t.name + "/id2"])]
    renamed = {t.name: t.name + "/id2" for t in m.graph.initializer}
    for node in m.graph.node:
        for i, v in enumerate(node.input):
            node.input[i] = renamed.get(v, v)
        if node.op_type == "Relu":
            out = node.output[0]
            node.output[0] = out + "/pre_identity"
            nodes += [node, helper.make_node("Identity", [out + "/pre_identity"], [out])]
        else:
            nodes.append(node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m)
    model = load_model(m.SerializeToString())
    _assert_parity(model)
    assert not any(n.op_type == "Identity" for n in model.onnx.graph.node)


@pytest.mark.parametrize("opset", [11, 12])
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_old_opsets(arch: str, opset: int) -> None:
    model = load_model(_legacy(build(arch), torch.randn(1, 3, 64, 64), opset))
    _assert_parity(model)


def test_float16_model() -> None:
    net = build("mobilenet_v3_small").half()
    data = _legacy(net, torch.randn(1, 3, 64, 64).half(), 17)
    model = load_model(data)
    assert model.preprocessing.dtype == "float16"
    _assert_parity(model)
    assert model.parity.tolerance == 1e-2  # float16 arithmetic on both sides (see converters/parity.py)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    y = model.representation(model.output_tap)(x)
    assert y.dtype == torch.float32  # the energy always sees float32
    y.square().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0


class _NHWC(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 3, 1, 2))


def test_nhwc_input_model() -> None:
    data = _legacy(_NHWC(build("resnet18")), torch.randn(1, 64, 64, 3), 17)
    model = load_model(data)
    assert model.preprocessing.layout == "NHWC"
    assert (model.preprocessing.height, model.preprocessing.width) == (64, 64)
    _assert_parity(model)
    x = torch.zeros(1, 3, 64, 64)
    x[0, 0, 5, 7] = 10.0  # one red pixel
    inp = model.to_model_input(x)
    assert inp.shape == (1, 64, 64, 3)
    base = model.to_model_input(torch.zeros(1, 3, 64, 64))
    diff = inp - base
    assert diff[0, 5, 7, 0] == pytest.approx(10.0 / 255 / 0.229, rel=1e-5)
    assert np.count_nonzero(diff) == 1


class _GrayNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_gray_model_uses_bt601_luma() -> None:
    torch.manual_seed(0)
    model = load_model(_legacy(_GrayNet().eval(), torch.randn(1, 1, 32, 32), 17))
    pre = model.preprocessing
    assert pre.channel_order == "GRAY" and pre.channels == 1
    pixels = torch.rand(1, 3, 32, 32) * 255
    x = pixels - torch.tensor(pre.mean_rgb255).view(1, 3, 1, 1)
    luma = 0.299 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2]
    expected = (luma / 255 - pre.mean[0]) / pre.std[0]
    np.testing.assert_allclose(model.to_model_input(x)[:, 0], expected.numpy(), rtol=1e-5, atol=1e-5)
    _assert_parity(model)


def test_bgr_caffe_preprocessing_from_uploader() -> None:
    caffe = Preprocessing(mean=(103.94, 116.78, 123.68), std=(1.0, 1.0, 1.0), scale=1.0, channel_order="BGR")
    model = load_model(_legacy(build("squeezenet1_1"), torch.randn(1, 3, 64, 64), 17), preprocessing=caffe)
    assert model.preprocessing_source == "uploader"
    assert (model.preprocessing.height, model.preprocessing.width) == (64, 64)  # filled from the graph
    pixels = torch.rand(1, 3, 64, 64) * 255
    x = pixels - torch.tensor(model.preprocessing.mean_rgb255).view(1, 3, 1, 1)
    inp = model.to_model_input(x)
    np.testing.assert_allclose(inp[0, 0], (pixels[0, 2] - 103.94).numpy(), atol=1e-3)  # blue first
    np.testing.assert_allclose(inp[0, 2], (pixels[0, 0] - 123.68).numpy(), atol=1e-3)
    _assert_parity(model)


def test_preprocessing_from_metadata_props() -> None:
    m = onnx.load_from_string(_legacy(build("squeezenet1_1"), torch.randn(1, 3, 64, 64), 17))
    for key, value in {"preimage.mean": "0.5, 0.5, 0.5", "preimage.std": "0.25,0.25,0.25",
                       "preimage.channel_order": "rgb"}.items():
        m.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    model = load_model(m.SerializeToString())
    assert model.preprocessing_source == "metadata"
    assert model.preprocessing.mean == (0.5, 0.5, 0.5) and model.preprocessing.std == (0.25, 0.25, 0.25)
    assert model.preprocessing.mean_rgb255 == pytest.approx((127.5, 127.5, 127.5))
    inp = model.to_model_input(torch.zeros(1, 3, 64, 64))  # the mean colour maps to 0
    assert np.abs(inp).max() < 1e-6


def test_fixed_batch_graph_runs_in_chunks() -> None:
    model = load_model(_legacy(build("squeezenet1_1"), torch.randn(1, 3, 64, 64), 17))
    assert model.batch == 1
    rep = model.representation(model.output_tap)
    x = torch.randn(3, 3, 64, 64) * 50
    together = rep(x)
    one_by_one = torch.cat([rep(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, one_by_one)


def test_local_functions_are_inlined(resnet18_onnx: onnx.ModelProto) -> None:
    m = onnx.ModelProto()
    m.CopyFrom(resnet18_onnx)
    # every Relu becomes a call of a model-local function (as some exporters emit for submodules)
    fn = helper.make_function("my.funcs", "MyRelu", ["x"], ["y"], [helper.make_node("Relu", ["x"], ["y"])],
                              [helper.make_opsetid("", 17)])
    m.functions.append(fn)
    m.opset_import.append(helper.make_opsetid("my.funcs", 1))
    for node in m.graph.node:
        if node.op_type == "Relu":
            node.op_type, node.domain = "MyRelu", "my.funcs"
    onnx.checker.check_model(m)
    model = load_model(m.SerializeToString())
    _assert_parity(model)
    assert not any(n.domain == "my.funcs" for n in model.onnx.graph.node)


def test_fully_dynamic_input_dims(resnet18_onnx: onnx.ModelProto) -> None:
    m = onnx.ModelProto()
    m.CopyFrom(resnet18_onnx)
    for i, d in enumerate(m.graph.input[0].type.tensor_type.shape.dim):
        d.Clear()
        d.dim_param = "NCHW"[i]
    model = load_model(m.SerializeToString())
    assert model.preprocessing.layout == "NCHW" and model.preprocessing.channels == 3
    assert model.preprocessing.height is None and model.batch is None
    _assert_parity(model)


@pytest.mark.parametrize("mode", ["SAME_UPPER", "SAME_LOWER"])
def test_same_auto_pad_at_stride_one(mode: str) -> None:
    """PaddleOCR's exports use auto_pad=SAME_* (which onnx2torch refuses) on stride-1 Conv and MaxPool:
    normalization writes the pads out, the same at every input size (dynamic H×W here)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((4, 3, 4, 3)) * 0.3).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"], auto_pad=mode, dilations=[2, 1]),
             helper.make_node("MaxPool", ["c"], ["p"], auto_pad=mode, kernel_shape=[2, 3]),
             helper.make_node("Relu", ["p"], ["out"])]  # fmt: skip
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "h", "w"])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, "h", "w"])], [w])  # fmt: skip
    data = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()
    model = load_model(data)
    assert all(not any(a.name == "auto_pad" for a in n.attribute) for n in model.onnx.graph.node)
    _assert_parity(model)
    odd = load_model(data, size=(17, 23))  # an odd size: the pads do not depend on it at stride 1
    assert odd.parity.ok and list(odd.taps[-1].shape) == [4, 17, 23]


def _rank_lost_at_dynamic_size() -> bytes:
    """PaddleOCR-style shape arithmetic: a Reshape whose target shape is sliced out of Shape(c) with an end
    computed in float, so at a dynamic size shape inference knows neither the shape's length nor the
    Reshape's rank; the BatchNormalization after it needs the rank."""
    rng = np.random.default_rng(0)

    def t(a, name: str):  # noqa: ANN001, ANN202
        return numpy_helper.from_array(np.asarray(a), name)

    inits = [t((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w"), t(np.array([0], np.int64), "zero"),
             t(np.array([1], np.int64), "one"), t(np.array(2.0, np.float32), "two"), t(np.array([-1], np.int64), "m1"),
             t(np.full(4, 1.5, np.float32), "sc"), t(np.full(4, 0.1, np.float32), "bi"),
             t(np.full(4, 0.2, np.float32), "mu"), t(np.full(4, 2.0, np.float32), "va")]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c"], ["s"]),
        helper.make_node("Gather", ["s", "one"], ["ch"]),
        helper.make_node("Cast", ["ch"], ["chf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["chf", "two"], ["half"]),
        helper.make_node("Cast", ["half"], ["end"], to=TensorProto.INT64),
        helper.make_node("Slice", ["s", "zero", "end"], ["lead"]),
        helper.make_node("Concat", ["lead", "m1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["c", "shape"], ["flat"]),
        helper.make_node("BatchNormalization", ["flat", "sc", "bi", "mu", "va"], ["bn"]),
        helper.make_node("ReduceMean", ["bn"], ["out"], axes=[2], keepdims=0),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "h", "w"])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4])], inits)  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


def test_rank_lost_at_a_dynamic_size_is_recovered(monkeypatch: pytest.MonkeyPatch) -> None:
    import converters.model as model_module

    model = load_model(_rank_lost_at_dynamic_size())
    _assert_parity(model)
    monkeypatch.setattr(model_module, "fill_ranks", lambda model, shaped: None)
    with pytest.raises(ModelError, match="spatial rank"):
        load_model(_rank_lost_at_dynamic_size())
