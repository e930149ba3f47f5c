"""Quantized graphs as float torch: QuantizeLinear/DequantizeLinear (per tensor and per channel),
QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger and DynamicQuantizeLinear.

An integer tensor is carried as a float tensor holding the integer values, so the whole graph stays
differentiable. Quantizing rounds half to even and saturates to the integer type's range, as ONNX says;
both pass the gradient straight through (the derivative of rounding and of clipping is taken to be 1),
so the minimizer sees the float function the quantized one approximates instead of a zero gradient.

Integer arithmetic is reproduced in float32 (products of integers summed exactly up to 2^24). onnxruntime's
integer kernels round requantization their own way and may saturate int16 partial sums, so parity allows
taps of quantized models a couple of quantization steps at a few elements (converters.parity,
``quantization_bounds`` below); a wrong conversion (zero point, axis, scale) is off at most elements by
many steps.

Integer types: uint8, int8, uint16, int16, int32 and the 4-bit ones. float8 quantization and block
quantization (``block_size``) are refused with a message.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import torch
import torch.nn.functional as F
from onnx2torch.node_converters.registry import add_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult
from torch import nn

_T = onnx.TensorProto
RANGES: dict[int, tuple[int, int]] = {
    _T.UINT8: (0, 255),
    _T.INT8: (-128, 127),
    _T.UINT16: (0, 65535),
    _T.INT16: (-32768, 32767),
    _T.INT32: (-(2**31), 2**31 - 1),
}
if hasattr(_T, "INT4"):
    RANGES[_T.INT4] = (-8, 7)
    RANGES[_T.UINT4] = (0, 15)
QUANTIZED_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
     "DynamicQuantizeLinear"}
)  # fmt: skip


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """Round half to even; the gradient passes straight through."""
    return v + (torch.round(v) - v).detach()


def clamp_ste(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Saturate to [lo, hi]; the gradient passes straight through."""
    return v + (v.clamp(lo, hi) - v).detach()


def _elem_type(name: str, graph: OnnxGraph) -> int | None:
    if not name:
        return None
    init = graph.initializers.get(name)
    if init is not None:
        return int(init.proto.data_type)
    vi = graph.value_info.get(name)
    if vi is not None and vi.type.tensor_type.elem_type:
        return int(vi.type.tensor_type.elem_type)
    return None


def _range(node: OnnxNode, graph: OnnxGraph, zp_index: int, what: str) -> tuple[int, int]:
    """The integer range of a quantized value: from its zero point's type, else ``output_dtype``, else uint8."""
    t = _elem_type(node.input_values[zp_index], graph) if len(node.input_values) > zp_index else None
    if t is None:
        t = int(node.attributes.get("output_dtype", 0)) or _T.UINT8
    if t not in RANGES:
        raise NotImplementedError(f"{node.operation_type} to {_T.DataType.Name(t)} ({what}) is not supported")
    return RANGES[t]


def _per_axis(v: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    """A 1-D per-channel parameter shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    if v.dim() == 0 or v.numel() == 1:
        return v.reshape(())
    shape = [1] * rank
    shape[axis % rank] = v.numel()
    return v.reshape(shape)


def _float(v: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if v is None:
        return torch.zeros((), dtype=like.dtype if like.is_floating_point() else torch.float32, device=like.device)
    return v.to(torch.float32)


def _check_block(node: OnnxNode) -> None:
    if int(node.attributes.get("block_size", 0)):
        raise NotImplementedError(f"{node.operation_type} with block_size (blocked quantization) is not supported")


class Quantize(nn.Module, OnnxToTorchModule):
    def __init__(self, axis: int, lo: int, hi: int):
        super().__init__()
        self.axis, self.lo, self.hi = axis, lo, hi

    def forward(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(torch.float32)
        s = _per_axis(scale.to(torch.float32), self.axis, x.dim())
        zp = _per_axis(_float(zero_point, x), self.axis, x.dim())
        return clamp_ste(round_ste(x / s) + zp, self.lo, self.hi)


class Dequantize(nn.Module, OnnxToTorchModule):
    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(torch.float32)
        s = _per_axis(scale.to(torch.float32), self.axis, x.dim())
        zp = _per_axis(_float(zero_point, x), self.axis, x.dim())
        return (x - zp) * s


class DynamicQuantize(nn.Module, OnnxToTorchModule):
    """uint8, with scale and zero point from the tensor's range (which always includes 0)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.to(torch.float32)
        lo = torch.clamp(x.min(), max=0.0)
        hi = torch.clamp(x.max(), min=0.0)
        scale = (hi - lo) / 255.0
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zp = clamp_ste(round_ste(-lo / scale), 0, 255)
        y = clamp_ste(round_ste(x / scale) + zp, 0, 255)
        return y, scale, zp


def _conv_args(node: OnnxNode, rank: int) -> dict:
    a = node.attributes
    n = rank - 2
    pads = list(a.get("pads", [0] * (2 * n)))
    auto_pad = a.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    return {
        "strides": list(a.get("strides", [1] * n)),
        "dilations": list(a.get("dilations", [1] * n)),
        "group": int(a.get("group", 1)),
        "pads": pads,
        "auto_pad": auto_pad,
    }


def _conv(x: torch.Tensor, w: torch.Tensor, args: dict) -> torch.Tensor:
    """ONNX Conv on float tensors (explicit pads, or SAME_UPPER/SAME_LOWER/VALID)."""
    n = w.dim() - 2
    pads = list(args["pads"])
    if args["auto_pad"] in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * n)
        for i in range(n):
            size = x.shape[2 + i]
            k = (w.shape[2 + i] - 1) * args["dilations"][i] + 1
            out = -(-size // args["strides"][i])
            total = max((out - 1) * args["strides"][i] + k - size, 0)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + n] = (small, big) if args["auto_pad"] == "SAME_UPPER" else (big, small)
    elif args["auto_pad"] == "VALID":
        pads = [0] * (2 * n)
    torch_pad: list[int] = []
    for i in reversed(range(n)):
        torch_pad += [pads[i], pads[i + n]]
    if any(torch_pad):
        x = F.pad(x, torch_pad)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    return fn(x, w, stride=args["strides"], dilation=args["dilations"], groups=args["group"])


class QLinearConv(nn.Module, OnnxToTorchModule):
    def __init__(self, args: dict, lo: int, hi: int):
        super().__init__()
        self.args, self.lo, self.hi = args, lo, hi

    def forward(self, x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp, bias=None):  # noqa: ANN001
        xf = x.to(torch.float32) - x_zp.to(torch.float32)
        wf = w.to(torch.float32) - _per_axis(w_zp.to(torch.float32), 0, w.dim())
        acc = _conv(xf, wf, self.args)
        if bias is not None:
            acc = acc + bias.to(torch.float32).reshape(1, -1, *([1] * (acc.dim() - 2)))
        multiplier = x_scale.to(torch.float32) * _per_axis(w_scale.to(torch.float32), 1, acc.dim())
        y = acc * (multiplier / y_scale.to(torch.float32))
        return clamp_ste(round_ste(y) + y_zp.to(torch.float32), self.lo, self.hi)


class ConvInteger(nn.Module, OnnxToTorchModule):
    def __init__(self, args: dict):
        super().__init__()
        self.args = args

    def forward(self, x, w, x_zp=None, w_zp=None):  # noqa: ANN001
        xf = x.to(torch.float32) - _float(x_zp, x)
        wf = w.to(torch.float32) - (_per_axis(w_zp.to(torch.float32), 0, w.dim()) if w_zp is not None else 0.0)
        return _conv(xf, wf, self.args)


def _matmul_zp(zp: torch.Tensor | None, like: torch.Tensor, is_b: bool) -> torch.Tensor | float:
    """A zero point of MatMulInteger/QLinearMatMul: scalar, per row of A (1-D [M]) or per column of B ([N])."""
    if zp is None:
        return 0.0
    z = zp.to(torch.float32)
    if z.numel() == 1:
        return z.reshape(())
    return z.reshape(*z.shape[:-1], 1, z.shape[-1]) if is_b else z.unsqueeze(-1)


class MatMulInteger(nn.Module, OnnxToTorchModule):
    def forward(self, a, b, a_zp=None, b_zp=None):  # noqa: ANN001
        af = a.to(torch.float32) - _matmul_zp(a_zp, a, False)
        bf = b.to(torch.float32) - _matmul_zp(b_zp, b, True)
        return af @ bf


class QLinearMatMul(nn.Module, OnnxToTorchModule):
    def __init__(self, lo: int, hi: int):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp):  # noqa: ANN001
        af = a.to(torch.float32) - _matmul_zp(a_zp, a, False)
        bf = b.to(torch.float32) - _matmul_zp(b_zp, b, True)
        acc = af @ bf
        a_s = a_scale.to(torch.float32)
        a_s = a_s.reshape(()) if a_s.numel() == 1 else a_s.unsqueeze(-1)
        b_s = b_scale.to(torch.float32)
        b_s = b_s.reshape(()) if b_s.numel() == 1 else b_s.reshape(*b_s.shape[:-1], 1, b_s.shape[-1])
        y_s = y_scale.to(torch.float32)
        y_s = y_s.reshape(()) if y_s.numel() == 1 else y_s
        y = acc * (a_s * b_s / y_s)
        return clamp_ste(round_ste(y) + y_zp.to(torch.float32).reshape(-1)[0], self.lo, self.hi)


def _mapping(node: OnnxNode) -> OnnxMapping:
    return OnnxMapping(inputs=tuple(node.input_values), outputs=tuple(node.output_values))


def _quantize(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    _check_block(node)
    if int(node.attributes.get("saturate", 1)) != 1:
        raise NotImplementedError("QuantizeLinear with saturate=0 (float8) is not supported")
    lo, hi = _range(node, graph, 2, "output")
    return OperationConverterResult(Quantize(int(node.attributes.get("axis", 1)), lo, hi), _mapping(node))


def _dequantize(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    _check_block(node)
    t = _elem_type(node.input_values[0], graph)
    if t is not None and t not in RANGES:
        raise NotImplementedError(f"DequantizeLinear of {_T.DataType.Name(t)} is not supported")
    return OperationConverterResult(Dequantize(int(node.attributes.get("axis", 1))), _mapping(node))


def _qlinear_conv(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    lo, hi = _range(node, graph, 7, "output")
    w = graph.initializers.get(node.input_values[3])
    rank = len(w.proto.dims) if w is not None else 4
    return OperationConverterResult(QLinearConv(_conv_args(node, rank), lo, hi), _mapping(node))


def _conv_integer(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    w = graph.initializers.get(node.input_values[1])
    rank = len(w.proto.dims) if w is not None else 4
    return OperationConverterResult(ConvInteger(_conv_args(node, rank)), _mapping(node))


def _qlinear_matmul(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    lo, hi = _range(node, graph, 7, "output")
    return OperationConverterResult(QLinearMatMul(lo, hi), _mapping(node))


def _matmul_integer(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return OperationConverterResult(MatMulInteger(), _mapping(node))


def _dynamic_quantize(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return OperationConverterResult(DynamicQuantize(), _mapping(node))


CONVERTERS: dict[str, tuple[list[int], Callable]] = {
    "QuantizeLinear": ([10, 13, 19, 21, 23, 24, 25], _quantize),
    "DequantizeLinear": ([10, 13, 19, 21, 23, 24, 25], _dequantize),
    "QLinearConv": ([10], _qlinear_conv),
    "QLinearMatMul": ([10, 21], _qlinear_matmul),
    "ConvInteger": ([10], _conv_integer),
    "MatMulInteger": ([10], _matmul_integer),
    "DynamicQuantizeLinear": ([11], _dynamic_quantize),
}


def register(added: list[tuple[str, int, str]], registered: Callable[[str, int], bool]) -> None:
    """Register the quantized-op converters with onnx2torch (skipping versions it has itself)."""
    for op, (versions, fn) in CONVERTERS.items():
        for v in versions:
            if registered(op, v):
                continue
            add_converter(operation_type=op, version=v)(fn)
            added.append((op, v, "float, straight-through rounding (converters/quantized.py)"))


# Ops that pass an input error through with gain at most 1 (max-norm): moves, selections, pools, means,
# monotone 1-Lipschitz activations.
_GAIN_ONE = frozenset(
    {"Relu", "LeakyRelu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean",
     "ReduceMax", "ReduceMin", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Slice",
     "Gather", "Split", "Pad", "Identity", "Sigmoid", "Tanh", "Softmax", "Resize", "Expand", "Tile", "Cast",
     "DepthToSpace", "SpaceToDepth", "HardSigmoid", "HardSwish", "Dropout"}
)  # fmt: skip


def quantization_bounds(model: onnx.ModelProto) -> dict[str, float]:
    """For each float value of a quantized model, how far it may lie from onnxruntime's when every
    quantized value upstream is off by one step (onnxruntime's integer kernels round their requantization
    differently from float arithmetic, at a few per cent of the elements): a DequantizeLinear output by
    its scale, a value computed from such values by the error's propagation (gain 1 through moves, pools,
    means and 1-Lipschitz activations; the largest L1 norm of a weight row through Conv, Gemm and MatMul
    with constant weights; the sum of the inputs' bounds through Add, Sub, Sum; a constant factor through
    Mul and Div). Values without such a bound are absent. Empty for a model without quantized ops."""
    from onnx import numpy_helper

    nodes = list(model.graph.node)
    if not any(n.op_type in QUANTIZED_OPS for n in nodes):
        return {}
    inits = {t.name: t for t in model.graph.initializer}
    cache: dict[str, object] = {}

    def const(name: str):  # noqa: ANN202
        if name not in inits:
            return None
        if name not in cache:
            cache[name] = numpy_helper.to_array(inits[name])
        return cache[name]

    bounds: dict[str, float] = {}
    for node in nodes:
        op, ins = node.op_type, [i for i in node.input if i]
        known = [bounds[i] for i in ins if i in bounds]
        bound: float | None = None
        if op == "DequantizeLinear":
            scale = const(node.input[1])
            bound = float(abs(scale).max()) if scale is not None else None
        elif op in _GAIN_ONE and known:
            bound = max(known)
        elif op in ("Add", "Sub", "Sum", "Max", "Min", "Mean") and known:
            bound = sum(known) if op in ("Add", "Sub", "Sum") else max(known)
        elif op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and ins and ins[0] in bounds:
            w = const(ins[1]) if len(ins) > 1 else None
            if w is not None:
                w = abs(w.astype("float64"))
                if op in ("Conv", "ConvTranspose"):
                    gain = float(w.reshape(w.shape[0], -1).sum(axis=1).max())
                elif op == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
                    gain = float(w.sum(axis=1).max())
                else:
                    gain = float(w.sum(axis=0).max()) if w.ndim == 2 else float(w.sum(axis=-2).max())
                bound = bounds[ins[0]] * gain
        elif op in ("Mul", "Div") and len(known) == 1 and len(ins) == 2:
            other = ins[1] if ins[0] in bounds else ins[0]
            c = const(other)
            if c is not None and c.size:
                factor = float(abs(c).max()) if op == "Mul" else float(1 / abs(c).min()) if abs(c).min() > 0 else None
                bound = known[0] * factor if factor is not None else None
        if bound is not None:
            for o in node.output:
                if o:
                    bounds[o] = bound
    return bounds


_QUANTIZERS = frozenset({"QuantizeLinear", "QLinearConv", "QLinearMatMul"})


def quantized_values(model: onnx.ModelProto) -> list[str]:
    """The integer values quantizing nodes produce, in graph order."""
    return [n.output[0] for n in model.graph.node if n.op_type in _QUANTIZERS]


def window_to(model: onnx.ModelProto, input_name: str, end: str) -> tuple[list[str], list[onnx.NodeProto]]:
    """The nodes that compute ``end`` from the nearest quantized values (or the image input) upstream, and
    those starting values."""
    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    inits = {t.name for t in model.graph.initializer}
    quantized = set(quantized_values(model))
    seen: set[int] = set()
    starts: list[str] = []
    stack = [end]
    first = True
    while stack:
        v = stack.pop()
        if v in inits:
            continue
        if (not first and v in quantized) or v == input_name or v not in producer:
            if v not in starts:
                starts.append(v)
            continue
        first = False
        j = producer[v]
        if j not in seen:
            seen.add(j)
            stack.extend(x for x in nodes[j].input if x)
    return starts, [nodes[j] for j in sorted(seen)]


def run_window(model: onnx.ModelProto, starts: list[str], nodes: list[onnx.NodeProto], end: str,
               values: dict[str, object]):  # fmt: skip
    """Our conversion of one window, run on onnxruntime's values of its starting values; float64 numpy."""
    import numpy as np
    from onnx import helper
    from onnx2torch import convert

    inits = {t.name: t for t in model.graph.initializer}
    arrays = {v: np.ascontiguousarray(values[v]) for v in starts}
    used = sorted({v for n in nodes for v in n.input if v in inits})
    inputs = [helper.make_tensor_value_info(v, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
              for v, a in arrays.items()]  # fmt: skip
    g = helper.make_graph(nodes, "window", inputs, [helper.make_empty_tensor_value_info(end)],
                          [inits[u] for u in used])  # fmt: skip
    module = convert(helper.make_model(g, opset_imports=list(model.opset_import), ir_version=model.ir_version))
    with torch.no_grad():
        out = module(*(torch.from_numpy(arrays[v]) for v in starts))
    return (out[0] if isinstance(out, (tuple, list)) else out).double().numpy()


def check_layers(model: onnx.ModelProto, input_name: str, values: dict[str, object]) -> tuple[float, float]:
    """Every quantized value recomputed by our conversion from onnxruntime's own values of the quantized
    values (or image) it is computed from, against onnxruntime's: the worst (max, mean) difference, in
    quantization steps. Each layer is checked without the flips that accumulate on the way through a deep
    network. ``values``: onnxruntime's value of the image input and of every ``quantized_values``."""
    import numpy as np

    worst_max, worst_mean = 0.0, 0.0
    for end in quantized_values(model):
        starts, nodes = window_to(model, input_name, end)
        diff = np.abs(run_window(model, starts, nodes, end, values) - np.asarray(values[end], dtype=np.float64))
        if diff.size:
            worst_max = max(worst_max, float(diff.max()))
            worst_mean = max(worst_mean, float(diff.mean()))
    return worst_max, worst_mean
