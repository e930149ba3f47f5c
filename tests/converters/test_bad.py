"""Bad uploads: each gives a ModelError that names the problem, quickly and without allocating much."""

from __future__ import annotations

import io
import time
import tracemalloc
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from converters.errors import ModelError
from converters.loading import LoadLimits
from converters.model import load_model

torch.set_num_threads(1)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tiny() -> bytes:
    torch.manual_seed(0)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Tiny().eval(), (torch.randn(1, 3, 16, 16),), f, dynamo=False, opset_version=17,
                          input_names=["input"])
    return f.getvalue()


def _image_graph(nodes, initializers=(), extra_inputs=(), opset=17, domains=()) -> bytes:
    """A one-input image graph: input [1,3,8,8] → nodes → 'out'."""
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8]), *extra_inputs],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", "c", "h", "w"])], list(initializers))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(g, opset_imports=imports).SerializeToString()


def _refused(data: bytes, *words: str, limits: LoadLimits | None = None) -> str:
    """load_model must raise ModelError mentioning ``words``, in well under a second of work and with a
    small Python/numpy allocation peak (tracemalloc sees numpy buffers too)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ModelError) as info:
            load_model(data, limits=limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), message
    assert peak < 64 * 2**20, f"peak allocation {peak / 2**20:.0f} MiB while refusing"
    assert elapsed < 10, f"took {elapsed:.1f}s to refuse"
    return message


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
def test_truncated_bytes(tiny: bytes, fraction: float) -> None:
    _refused(tiny[: int(len(tiny) * fraction)], "")


def test_garbage_and_empty() -> None:
    _refused(b"", "empty")
    _refused(b"\x00\xffnot an onnx model at all" * 10, "onnx")
    _refused(np.random.default_rng(0).bytes(4096), "")


@pytest.mark.parametrize("location", ["/etc/passwd", "../secret.bin", "subdir/../../etc/shadow", "weights.bin"])
def test_external_data_is_refused(tiny: bytes, location: str) -> None:
    m = onnx.load_from_string(tiny)
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    del t.float_data[:]
    t.data_location = TensorProto.EXTERNAL
    t.external_data.append(onnx.StringStringEntryProto(key="location", value=location))
    t.external_data.append(onnx.StringStringEntryProto(key="length", value="64"))
    message = _refused(m.SerializeToString(), "external data", location)
    assert "self-contained" in message


def test_huge_declared_initializer() -> None:
    big = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[1_000_000, 1_000_000])
    data = _image_graph([helper.make_node("Add", ["input", "w"], ["out"])], [big])
    _refused(data, "1e+12", "'w'")


def test_huge_declared_constant_node() -> None:
    big = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[10**12], raw_data=b"\0" * 16)
    data = _image_graph([helper.make_node("Constant", [], ["c"], value=big),
                         helper.make_node("Add", ["input", "c"], ["out"])])
    _refused(data, "1e+12")


def test_huge_computed_value() -> None:
    shape = numpy_helper.from_array(np.array([1_000_000, 1_000_000], dtype=np.int64), "shape")
    data = _image_graph([helper.make_node("ConstantOfShape", ["shape"], ["big"]),
                         helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
                         helper.make_node("Add", ["input", "s"], ["out"])], [shape])
    _refused(data, "1e+12", "'big'")


def test_sparse_initializer_is_refused() -> None:
    values = numpy_helper.from_array(np.ones(1, dtype=np.float32), "w")
    indices = numpy_helper.from_array(np.zeros((1, 4), dtype=np.int64), "w_idx")
    sparse = helper.make_sparse_tensor(values, indices, [10**6, 10**6, 1, 1])
    g = helper.make_graph([helper.make_node("Add", ["input", "w"], ["out"])], "g",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", "c", "h", "w"])],
                          sparse_initializer=[sparse])
    data = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    _refused(data, "sparse")


def test_external_data_inside_a_local_function(tiny: bytes) -> None:
    t = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    t.external_data.append(onnx.StringStringEntryProto(key="location", value="/etc/passwd"))
    fn = helper.make_function("local", "AddC", ["x"], ["y"],
                              [helper.make_node("Constant", [], ["c"], value=t),
                               helper.make_node("Add", ["x", "c"], ["y"])],
                              [helper.make_opsetid("", 17)])
    data = _image_graph([helper.make_node("AddC", ["input"], ["out"], domain="local")], domains=["local"])
    m = onnx.load_from_string(data)
    m.functions.append(fn)
    _refused(m.SerializeToString(), "external data", "/etc/passwd")


def test_tensor_bytes_disagree_with_dims() -> None:
    t = numpy_helper.from_array(np.ones((1, 3, 8, 8), dtype=np.float32), "w")
    t.dims[:] = [1, 3, 8, 9]
    data = _image_graph([helper.make_node("Add", ["input", "w"], ["out"])], [t])
    _refused(data, "corrupt")


@pytest.mark.parametrize(("domain", "op"), [("com.evil", "Backdoor"), ("com.microsoft", "FusedConv")])
def test_custom_domain_op(domain: str, op: str) -> None:
    data = _image_graph([helper.make_node(op, ["input"], ["out"], domain=domain)], domains=[domain])
    _refused(data, domain, op)


def test_standard_op_without_converter() -> None:
    # StringNormalizer is standard ONNX but no image model needs it; onnx2torch has no converter
    data = _image_graph([helper.make_node("Relu", ["input"], ["out"]),
                         helper.make_node("Hardmax", ["input"], ["unused"])])
    m = onnx.load_from_string(data)
    m.graph.output.append(helper.make_tensor_value_info("unused", TensorProto.FLOAT, ["n", "c", "h", "w"]))
    _refused(m.SerializeToString(), "cannot be converted", "Hardmax")


def test_no_image_like_input() -> None:
    g = helper.make_graph([helper.make_node("Relu", ["features"], ["out"])], "mlp",
                          [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 10])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 10])])
    data = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    _refused(data, "no image-like input", "'features'")


def test_two_inputs() -> None:
    data = _image_graph([helper.make_node("Add", ["input", "bias"], ["out"])],
                        extra_inputs=[helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 3, 8, 8])])
    _refused(data, "2 inputs")


def test_size_cap(tiny: bytes) -> None:
    _refused(tiny, "limit", limits=LoadLimits(max_bytes=len(tiny) - 1))


def test_unsupported_opset() -> None:
    data = _image_graph([helper.make_node("Relu", ["input"], ["out"])], opset=5)
    _refused(data, "opset 5")


def test_checker_rejects_dangling_input() -> None:
    data = _image_graph([helper.make_node("Add", ["input", "nowhere"], ["out"])])
    _refused(data, "checker")


def test_path_input_is_read_only_when_asked(tmp_path, tiny: bytes) -> None:
    # A path is the caller's (trusted) choice; a missing file is still a clean ModelError.
    _refused(str(tmp_path / "missing.onnx"), "cannot read")
    p = tmp_path / "tiny.onnx"
    p.write_bytes(tiny)
    assert load_model(p).taps
