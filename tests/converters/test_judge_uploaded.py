"""The parity judge runs the file as uploaded, for every model (not only upgraded ones): whatever the
normalization changes (inlined functions, folded constants, rewritten pads) is judged like the
conversion. Two models here behave differently once normalized: one through a fault injected into the
normalization, one through a local function that shadows a standard op (refused at load by its own
check, which is switched off here so the judge alone has to catch it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import converters.loading as loading_module
import converters.model as model_module
from converters.errors import ModelError
from converters.model import load_model
from converters.normalize import normalize
from converters.parity import ParityError, check_parity

torch.set_num_threads(1)


def _net(functions: list[onnx.FunctionProto] | None = None, act: tuple[str, str] = ("", "Relu")) -> bytes:
    """Conv → activation → Conv, with the second Conv's weight a Constant node (the normalization makes it
    an initializer), at a current IR and opset: nothing is upgraded."""
    rng = np.random.default_rng(3)
    w1 = numpy_helper.from_array(rng.normal(0, 0.3, (6, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (4, 6, 3, 3)).astype(np.float32), "w2v")
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(act[1], ["c1"], ["a1"], name="act", domain=act[0]),
        helper.make_node("Constant", [], ["w2"], name="w2", value=w2),
        helper.make_node("Conv", ["a1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 24, 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 24, 24])],
        [w1],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(act[0], 1)] if act[0] else [])
    model = helper.make_model(graph, opset_imports=opsets, functions=functions or [])
    model.ir_version = 8
    return model.SerializeToString()


def _shadowing_relu() -> onnx.FunctionProto:
    return helper.make_function("", "Relu", ["X"], ["Y"], [helper.make_node("Neg", ["X"], ["Y"])],
                                [helper.make_opsetid("", 17)])  # fmt: skip


def test_every_model_keeps_the_file_as_uploaded_for_the_judge(tmp_path: Path) -> None:
    data = _net()
    model = load_model(data)
    assert not model.upgrade.changed
    assert model.reference is not None and model.reference.SerializeToString() == data
    assert model.reference_bytes == len(data)
    # the uploaded file still has its Constant node; the served graph does not
    assert "Constant" in {n.op_type for n in model.reference.graph.node}
    assert "Constant" not in {n.op_type for n in model.onnx.graph.node}
    assert model.parity.ok and all(t.reference == "onnxruntime" for t in model.parity.taps)
    # from a path, the file is read again when judged rather than held
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    from_path = load_model(path)
    assert from_path.reference_bytes == 0 and from_path.reference.SerializeToString() == data


def test_a_fault_in_the_normalization_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def faulty(model: onnx.ModelProto, copy: bool = True) -> onnx.ModelProto:
        out = normalize(model, copy=copy)
        # the folded Constant comes out 2 % off: the normalized graph and its conversion agree with each
        # other, not with the file
        for t in out.graph.initializer:
            if t.name == "w2":
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.02, "w2"))
        return out

    monkeypatch.setattr(model_module, "normalize", faulty)
    with pytest.raises(ParityError) as info:
        load_model(_net())
    bad = [t for t in info.value.report.taps if not t.ok]
    assert [t.name for t in bad] == ["y"], info.value.report.summary()
    assert bad[0].reference == "onnxruntime" and bad[0].rel_error > 1e-3


def test_a_shadowing_function_is_caught_by_the_judge_too(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _net([_shadowing_relu()])
    with pytest.raises(ModelError, match="onnxruntime runs its own operator"):  # the load check, first
        load_model(data)
    # Without that check the service inlines Neg while onnxruntime runs its own Relu: only a judge that
    # runs the uploaded file sees it.
    monkeypatch.setattr(loading_module, "check_functions", lambda model: None)
    with pytest.raises(ParityError) as info:
        load_model(data)
    failed = {t.name for t in info.value.report.taps if not t.ok}
    assert "y" in failed, info.value.report.summary()


def test_a_value_made_inside_an_inlined_function_is_judged_on_the_normalized_graph() -> None:
    # a function of its own domain: onnxruntime runs its body too, so nothing is shadowed
    body = [helper.make_node("Neg", ["X"], ["n"]), helper.make_node("Relu", ["n"], ["Y"])]
    mine = helper.make_function("my.ops", "NegRelu", ["X"], ["Y"], body, [helper.make_opsetid("", 17)])
    model = load_model(_net([mine], act=("my.ops", "NegRelu")))
    assert model.parity.ok, model.parity.summary()
    assert all(t.reference == "onnxruntime" for t in model.parity.taps)  # the default taps are the file's
    inner = [t for t in model.taps if t.name not in model.reference_names]
    assert inner, "the inliner names the body's values anew"
    report = check_parity(model, taps=[inner[0], model.output_tap])
    assert report.ok, report.summary()
    assert report.taps[0].reference == "onnxruntime on the normalized graph"
    assert report.taps[1].reference == "onnxruntime"


def test_a_file_onnxruntime_cannot_run_as_uploaded_is_judged_on_the_normalized_graph_and_says_so() -> None:
    # onnxruntime refuses dilations with auto_pad=SAME; the normalization writes the pads out, which it runs
    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], auto_pad="SAME_UPPER", dilations=[2, 1]),
             helper.make_node("Relu", ["c"], ["y"])]  # fmt: skip
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 20, 20])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 20, 20])], [w])  # fmt: skip
    model = load_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
                       .SerializeToString())  # fmt: skip
    assert model.parity.ok, model.parity.summary()
    assert all(t.reference.startswith("onnxruntime on the normalized graph (it cannot run the file as uploaded")
               for t in model.parity.taps), model.parity.summary()  # fmt: skip
