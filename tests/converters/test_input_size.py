"""The input size of a dynamic-size graph that runs at one size only (a text recognizer: [N, 3, ?, W] that
works at one height): declared, else from metadata, else found among common sizes, else refused with
the failing op named and the way to declare the size."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from converters.errors import FailsAtSize, ModelError
from converters.inspect import format_inspection, inspect_model
from converters.model import load_model
from converters.parity import check_parity, probe_images
from converters.spec import input_size

torch.set_num_threads(1)
WIDTH = 32


def recognizer(height: int, metadata: dict[str, str] | None = None) -> bytes:
    """Conv over [1, 3, ?, 32], then a Concat along the width with a learned [1, 4, height, 8] block: the
    graph runs only when the input is ``height`` pixels high."""
    rng = np.random.default_rng(height)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((1, 4, height, 8)).astype(np.float32), "side")]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="/conv/Conv"),
        helper.make_node("Concat", ["c", "side"], ["cat"], axis=3, name="/Concat"),
        helper.make_node("Relu", ["cat"], ["r"], name="/Relu"),
        helper.make_node("ReduceMean", ["r"], ["y"], axes=[2, 3], keepdims=0, name="/ReduceMean"),
    ]
    g = helper.make_graph(nodes, "rec", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", WIDTH])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], inits)  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.helper.set_model_props(m, metadata or {})
    return m.SerializeToString()


def test_declared_size_is_used() -> None:
    model = load_model(recognizer(50), size=(50, WIDTH))
    assert model.size_source == "declared"
    assert (model.preprocessing.height, model.preprocessing.width) == (50, WIDTH)
    assert model.parity.ok and model.parity.input_shape[2:] == [50, WIDTH]
    # the declared size changes the size only: the rest of the preprocessing is still the default
    assert model.preprocessing_source == "default"


def test_metadata_size_is_used() -> None:
    model = load_model(recognizer(50, {"preimage.height": "50", "preimage.width": str(WIDTH)}))
    assert model.size_source == "metadata" and model.preprocessing.height == 50


def test_common_size_is_found() -> None:
    model = load_model(recognizer(48))  # fails at the nominal 224; 48 is among the common sizes
    assert model.size_source == "probed" and model.preprocessing.height == 48
    assert model.parity.ok
    x = probe_images(1, 48, WIDTH).requires_grad_(True)
    model.representation(model.output_tap)(x).sum().backward()
    assert float(x.grad.abs().max()) > 0
    info = inspect_model(recognizer(48))
    assert info["input"]["size_source"] == "probed" and info["input"]["nominal_height"] == 48
    assert "nominal 48×32, probed" in format_inspection(info)


def test_no_size_works_names_the_op_and_says_to_declare() -> None:
    with pytest.raises(ModelError) as info:
        load_model(recognizer(50))
    message = str(info.value)
    assert "Concat node '/Concat'" in message and "[N, 3, ?, 32]" in message
    assert "--size HxW" in message
    inspected = inspect_model(recognizer(50))
    assert not inspected["ok"] and "--size HxW" in inspected["error"]
    assert inspect_model(recognizer(50), size=(50, WIDTH))["ok"]


def test_wrong_declared_size_says_so() -> None:
    with pytest.raises(ModelError) as info:
        load_model(recognizer(50), size=(64, WIDTH))
    message = str(info.value)
    assert "declared size 64×32" in message and "Concat" in message and "--size HxW" in message
    with pytest.raises(ModelError, match="fixed at 32"):
        load_model(recognizer(50), size=(50, 40))  # the width is fixed by the graph


def test_onnxruntime_failure_names_the_node() -> None:
    """The judge's own failure (not shape inference) is parsed too: run the parity check at a height the
    graph cannot take."""
    model = load_model(recognizer(48), size=(48, WIDTH), verify=False)
    with pytest.raises(FailsAtSize) as info:
        check_parity(model, images=probe_images(1, 64, WIDTH))
    assert info.value.op == "Concat" and info.value.node == "/Concat" and info.value.size == (64, WIDTH)


def test_size_argument() -> None:
    assert input_size("48x320") == (48, 320) and input_size("48×320") == (48, 320)
    for bad in ("48", "48x", "0x32", "ax3", "1x2x3"):
        with pytest.raises(ValueError):
            input_size(bad)


def test_inspect_command_takes_size(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli.main import main

    path = tmp_path / "rec.onnx"
    path.write_bytes(recognizer(50))
    assert main(["inspect", str(path), "--json"]) == 1
    assert "--size HxW" in capsys.readouterr().out
    assert main(["inspect", str(path), "--size", f"50x{WIDTH}", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["input"]["nominal_height"] == 50 and report["input"]["size_source"] == "declared"
