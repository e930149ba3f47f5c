"""Each converter added in converters/ops.py against onnxruntime on a one-node graph, plus the
supported-ops table being in sync with the registry."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from onnx2torch import convert

from converters import supported_ops
from converters.parity import ort_session
from tests.converters._one_node import against_onnxruntime, graph

torch.set_num_threads(1)
RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 4, 6, 8)).astype(np.float32)


def _ints(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _check(node: onnx.NodeProto, opset: int, inits=(), x: np.ndarray = X, n_out: int = 1,
           rtol: float = 1e-5, same_shape: bool = False) -> None:
    # same_shape: declare the output's shape (= the input's) where onnx's inference leaves it open
    m = graph(node, opset, x.shape, inits, node.output[:n_out], x.shape if same_shape else None)
    if not same_shape:  # onnx's own inference of some function ops (MVN) fails; declared shapes suffice
        m = onnx.shape_inference.infer_shapes(m)
    onnx.checker.check_model(m)
    against_onnxruntime(m, x).assert_close(rtol=rtol, atol=1e-5)


REDUCE = ["ReduceMean", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare",
          "ReduceProd"]


@pytest.mark.parametrize("op", REDUCE)
@pytest.mark.parametrize(("axes", "keepdims"), [([2, 3], 1), ([-1], 0), (None, 1)])
def test_reduce_18_axes_input(op: str, axes, keepdims: int) -> None:
    inputs = ["x", "axes"] if axes is not None else ["x"]
    inits = [_ints("axes", axes)] if axes is not None else []
    x = np.abs(X) + 0.5 if op == "ReduceLogSum" else X
    _check(helper.make_node(op, inputs, ["y"], keepdims=keepdims), 18, inits, x=x)


def test_reduce_noop_with_empty_axes() -> None:
    _check(helper.make_node("ReduceMean", ["x"], ["y"], noop_with_empty_axes=1), 18)


@pytest.mark.parametrize("opset", [18, 19, 21])
@pytest.mark.parametrize(("mode", "pads", "axes"), [
    ("constant", [0, 0, 1, 2, 0, 0, 3, 0], None),
    ("constant", [1, 2, 3, 0], [2, 3]),
    ("reflect", [1, 1, 2, 2], [-2, -1]),
    ("edge", [0, 0, 2, 1, 0, 0, 1, 2], None),
    ("constant", [0, 0, -1, 1, 0, 0, 1, -2], None),
])
def test_pad_18(opset: int, mode: str, pads, axes) -> None:
    inputs = ["x", "pads", "value"] + (["axes"] if axes is not None else [])
    inits = [_ints("pads", pads), numpy_helper.from_array(np.array(0.5, dtype=np.float32), "value")]
    if axes is not None:
        inits.append(_ints("axes", axes))
    _check(helper.make_node("Pad", inputs, ["y"], mode=mode), opset, inits)


def test_pad_wrap_19() -> None:
    _check(helper.make_node("Pad", ["x", "pads"], ["y"], mode="wrap"), 19, [_ints("pads", [0, 0, 1, 2, 0, 0, 2, 1])])


@pytest.mark.parametrize("num_outputs", [2, 3])
def test_split_18_num_outputs(num_outputs: int) -> None:
    outs = [f"y{i}" for i in range(num_outputs)]
    _check(helper.make_node("Split", ["x"], outs, axis=3, num_outputs=num_outputs), 18, n_out=num_outputs)


def test_split_18_sizes() -> None:
    _check(helper.make_node("Split", ["x", "s"], ["a", "b"], axis=1), 18, [_ints("s", [1, 3])], n_out=2)


@pytest.mark.parametrize("opset", [19, 21])
def test_reshape_19_allowzero(opset: int) -> None:
    _check(helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1), opset, [_ints("s", [2, 4, 48])])
    _check(helper.make_node("Reshape", ["x", "s"], ["y"]), opset, [_ints("s", [0, 0, -1])])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_20(approximate: str) -> None:
    _check(helper.make_node("Gelu", ["x"], ["y"], approximate=approximate), 20)


def test_group_norm_21() -> None:
    # (GroupNormalization-18 is deprecated: onnx's checker refuses it, so uploads never reach it.)
    s21 = numpy_helper.from_array(RNG.uniform(0.5, 1.5, 4).astype(np.float32), "s")
    b21 = numpy_helper.from_array(RNG.uniform(-1, 1, 4).astype(np.float32), "b")
    _check(helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2), 21, [s21, b21],
           same_shape=True)


@pytest.mark.parametrize(("op", "attrs", "opset", "positive"), [
    ("GlobalMaxPool", {}, 17, False), ("GlobalLpPool", {"p": 2}, 17, False),
    ("SpaceToDepth", {"blocksize": 2}, 17, False), ("LpNormalization", {"axis": 1, "p": 2}, 17, False),
    ("MeanVarianceNormalization", {}, 17, False), ("Shrink", {"bias": 0.1, "lambd": 0.3}, 17, False),
    ("ThresholdedRelu", {"alpha": 0.2}, 17, False), ("Sinh", {}, 17, False), ("Cosh", {}, 17, False),
    ("Asinh", {}, 17, False), ("Acosh", {}, 17, True), ("Mish", {}, 18, False),
])
def test_new_unary_ops(op: str, attrs: dict, opset: int, positive: bool) -> None:
    x = (np.abs(X) + 1.0).astype(np.float32) if positive else X
    _check(helper.make_node(op, ["x"], ["y"], **attrs), opset, x=x, same_shape=op == "MeanVarianceNormalization")


def test_atanh() -> None:
    _check(helper.make_node("Atanh", ["x"], ["y"]), 17, x=np.tanh(X).astype(np.float32) * 0.9)


def test_new_attribute_is_refused_not_ignored() -> None:
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], dilations=[2, 2])
    m = onnx.shape_inference.infer_shapes(graph(node, 19, X.shape))
    with pytest.raises(NotImplementedError, match="dilations"):
        convert(m)


def test_supported_ops_doc_is_current() -> None:
    assert supported_ops.main(["--check"]) == 0, "run: python -m converters.supported_ops"


@pytest.mark.parametrize(("mode", "pads"),
                         [("constant", [0, 0, 1, 2, 0, 0, 2, 1]), ("reflect", [0, 0, 1, 1, 0, 0, 2, 2])])
def test_constant_pad_and_split_inputs_are_frozen(mode: str, pads) -> None:
    # Pad-13 and Split-13 read pads/sizes from tensors; with constant inputs the converted graph
    # must not read them on the host at every call (GPU sync), and must still match onnxruntime.
    from onnx2torch.node_converters.pad import OnnxPadDynamic
    from onnx2torch.node_converters.split import OnnxSplit13

    from converters.model import load_model

    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode=mode),
             helper.make_node("Split", ["p", "s"], ["a", "b"], axis=1),
             helper.make_node("Conv", ["a", "w"], ["y"])]
    inits = [_ints("pads", pads), _ints("s", [1, 2]),
             numpy_helper.from_array(np.ones((4, 1, 3, 3), dtype=np.float32), "w")]
    m = onnx.shape_inference.infer_shapes(graph(nodes, 13, x.shape, inits, ir_version=8))
    model = load_model(m.SerializeToString())
    assert model.parity.ok
    rep = model.representation(model.output_tap)
    kinds = {type(mod) for mod in rep.modules()}
    assert OnnxPadDynamic not in kinds and OnnxSplit13 not in kinds
    want = ort_session(m).run(None, {"x": x})[0]
    got = rep.graph(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
