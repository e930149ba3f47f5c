"""Small ONNX models built in the tests (no downloads): a conv net, optionally with a big dense layer."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZE = 32  # input height and width


def conv_net(seed: int = 0, dense_out: int = 10, name: str = "tiny", batch: int | str = "N") -> bytes:
    """image(N×3×32×32) → conv1(8, s2) → relu1 → conv2(8) → relu2 → flatten → fc(dense_out) → logits.

    ``dense_out`` sets the size: the fc weight is 2048 × dense_out floats (4096 → 33.5 MB).
    ``batch=1`` makes a fixed-batch graph, as many exporters write.
    """
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int, scale: float = 1.0) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        data = (rng.standard_normal(shape) * scale / np.sqrt(fan_in)).astype(np.float32)
        return numpy_helper.from_array(data, name)

    inits = [
        init("w1", 8, 3, 3, 3, scale=2.0),
        init("b1", 8, scale=0.1),
        init("w2", 8, 8, 3, 3, scale=2.0),
        init("b2", 8, scale=0.1),
        init("wfc", 2048, dense_out),
        init("bfc", dense_out, scale=0.1),
    ]
    nodes = [
        helper.make_node(
            "Conv",
            ["image", "w1", "b1"],
            ["c1"],
            name="conv1",
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "wfc", "bfc"], ["logits"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, dense_out])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="preimage-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def external_data_net(location: str = "../../etc/passwd") -> bytes:
    """conv_net whose first weight claims to live in an external file (uploads must refuse it)."""
    model = onnx.load_from_string(conv_net())
    weight = next(t for t in model.graph.initializer if t.name == "w1")
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "864")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


def fcn(seed: int = 0) -> bytes:
    """A fully convolutional net with a dynamic input size: conv(3→4, k3 s2, no pad) → relu → conv(4→4, k3)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], name="conv1", kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["out"], name="conv2", kernel_shape=[3, 3]),
    ]
    graph = helper.make_graph(
        nodes,
        "fcn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 4, "h", "w"])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="preimage-tests")
    model.ir_version = 8
    return model.SerializeToString()
