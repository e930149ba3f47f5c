"""Converters that onnx2torch 1.5.15 lacks for opsets 13–21, registered through its own registry
(``onnx2torch.node_converters.add_converter``); importing this module registers them once.

Two kinds:

* New semantics: Reduce*-18 (axes became an input), Pad-18/19/21 (``axes`` input, ``wrap`` mode),
  Split-18 (``num_outputs``), Reshape-19/21 (with ``allowzero``), Gelu-20, GroupNormalization-18/21.
* Version bumps that only added element types (float8, int4, bfloat16) or attributes whose default
  keeps the old meaning: delegated to onnx2torch's converter for the previous version, after checking
  that the node does not use the new attribute (refused with a clear message if it does).

Constant inputs (axes, pads, split sizes) are read at conversion time, so ``forward`` never calls
``.tolist()`` on them: no host sync per step on a GPU, no graph break under ``torch.compile``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from onnx2torch.node_converters.registry import add_converter, get_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult
from torch import nn

from converters import quantized as _quantized
from converters import recurrent as _recurrent
from converters import resize as _resize
from converters import surrogates as _surrogates
from converters.constants import const_list as _const_list

# onnx2torch 1.5.15's Slice and ScatterND index with a list of slices, which torch deprecates with a
# warning on every forward pass: thousands of identical lines per visualization. The indexing is
# still correct in torch 2.14 (the coverage tests check parity); silence only that message there.
warnings.filterwarnings(
    "ignore", message="Using a non-tuple sequence for multidimensional indexing", module="onnx2torch"
)

ADDED: list[tuple[str, int, str]] = []  # (op_type, since_version, how) — for the supported-ops table


def _registered(op_type: str, version: int) -> bool:
    try:
        get_converter(operation_type=op_type, version=version)
    except NotImplementedError:
        return False
    return True


def _register(op_type: str, versions: list[int], how: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        for v in versions:
            if _registered(op_type, v):
                continue  # a newer onnx2torch has its own: keep it
            add_converter(operation_type=op_type, version=v)(fn)
            ADDED.append((op_type, v, how))
        return fn

    return deco


def _rank(name: str, graph: OnnxGraph) -> int | None:
    vi = graph.value_info.get(name)
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return None
    return len(vi.type.tensor_type.shape.dim)


def _mapping(node: OnnxNode, n_inputs: int) -> OnnxMapping:
    return OnnxMapping(inputs=node.input_values[:n_inputs], outputs=node.output_values)


# --------------------------------------------------------------------------------------------- Reduce
def _l1(x, dim, keepdim):
    return x.abs().sum(dim=dim, keepdim=keepdim)


def _l2(x, dim, keepdim):
    return x.square().sum(dim=dim, keepdim=keepdim).sqrt()


def _log_sum(x, dim, keepdim):
    return x.sum(dim=dim, keepdim=keepdim).log()


def _sum_square(x, dim, keepdim):
    return x.square().sum(dim=dim, keepdim=keepdim)


def _prod(x, dim, keepdim):
    for d in sorted(dim, reverse=True):
        x = x.prod(dim=d, keepdim=keepdim)
    return x


_REDUCE: dict[str, Callable] = {
    "ReduceMean": torch.mean,
    "ReduceSum": torch.sum,
    "ReduceMax": torch.amax,
    "ReduceMin": torch.amin,
    "ReduceProd": _prod,
    "ReduceL1": _l1,
    "ReduceL2": _l2,
    "ReduceLogSum": _log_sum,
    "ReduceLogSumExp": torch.logsumexp,
    "ReduceSumSquare": _sum_square,
}


class Reduce(nn.Module, OnnxToTorchModule):
    """ReduceX with axes known at conversion time (None: all axes, unless noop_with_empty_axes)."""

    def __init__(self, op_type: str, axes: list[int] | None, keepdims: bool, noop: bool):
        super().__init__()
        self.op_type = op_type
        self.fn = _REDUCE[op_type]
        self.axes = axes
        self.keepdims = keepdims
        self.noop = noop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.axes:
            if self.noop:
                return x
            dims = list(range(x.dim()))
        else:
            dims = [a % x.dim() for a in self.axes]
        return self.fn(x, dim=dims, keepdim=self.keepdims)


class ReduceDynamicAxes(Reduce):
    """Axes computed at run time: read on the host (a sync per call; exporters rarely emit this)."""

    def forward(self, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        self.axes = None if axes is None else [int(a) for a in axes.tolist()]
        return super().forward(x)


@_register("ReduceMean", [18], "axes input")
@_register("ReduceMax", [18, 20], "axes input")
@_register("ReduceMin", [18, 20], "axes input")
@_register("ReduceProd", [18], "axes input")
@_register("ReduceL1", [18], "axes input")
@_register("ReduceL2", [18], "axes input")
@_register("ReduceLogSum", [18], "axes input")
@_register("ReduceLogSumExp", [18], "axes input")
@_register("ReduceSumSquare", [18], "axes input")
def _reduce18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    keepdims = bool(node.attributes.get("keepdims", 1))
    noop = bool(node.attributes.get("noop_with_empty_axes", 0))
    axes_name = node.input_values[1] if len(node.input_values) > 1 else ""
    if not axes_name:
        return OperationConverterResult(Reduce(node.operation_type, None, keepdims, noop), _mapping(node, 1))
    axes = _const_list(axes_name, graph)
    if axes is not None:
        module = Reduce(node.operation_type, [int(a) for a in axes], keepdims, noop)
        return OperationConverterResult(module, _mapping(node, 1))
    module = ReduceDynamicAxes(node.operation_type, None, keepdims, noop)
    return OperationConverterResult(module, _mapping(node, 2))


# ---------------------------------------------------------------------------------------------- Pad
_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


class Pad(nn.Module, OnnxToTorchModule):
    def __init__(self, pads: list[int], mode: str, value: float):
        super().__init__()
        self.pads = pads  # torch order: last axis first, (begin, end) pairs
        self.mode = mode
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "constant":
            return F.pad(x, self.pads, mode="constant", value=self.value)
        return F.pad(x, self.pads, mode=self.mode)


@_register("Pad", [18, 19, 21], "axes input, wrap mode")
def _pad18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    mode = node.attributes.get("mode", "constant")
    if mode not in _PAD_MODES:
        raise NotImplementedError(f"Pad mode {mode!r} is not supported")
    inputs = list(node.input_values) + [""] * (4 - len(node.input_values))
    pads = _const_list(inputs[1], graph)
    value = _const_list(inputs[2], graph) if inputs[2] else [0.0]
    axes = _const_list(inputs[3], graph) if inputs[3] else None
    if pads is None or value is None or (inputs[3] and axes is None):
        raise NotImplementedError("Pad with pads/axes/value computed at run time is not supported")
    rank = _rank(inputs[0], graph)
    if axes is None:
        axes = list(range(len(pads) // 2))
        rank = rank or len(axes)
    elif rank is None:
        raise NotImplementedError("Pad with an axes input needs the input's rank (shape inference failed)")
    n = len(axes)
    begin = dict(zip([a % rank for a in axes], pads[:n], strict=True))
    end = dict(zip([a % rank for a in axes], pads[n:], strict=True))
    torch_pads: list[int] = []
    last = max([a for a in begin if begin[a] or end[a]], default=rank - 1)
    first_padded = min([a for a in begin if begin[a] or end[a]], default=rank - 1)
    if _PAD_MODES[mode] != "constant" and first_padded < rank - 3:
        raise NotImplementedError(f"Pad mode {mode!r} over more than the last 3 axes is not supported")
    for a in range(rank - 1, min(first_padded, last) - 1, -1):
        torch_pads += [int(begin.get(a, 0)), int(end.get(a, 0))]
    return OperationConverterResult(Pad(torch_pads, _PAD_MODES[mode], float(value[0])), _mapping(node, 1))


# -------------------------------------------------------------------------------------------- Split
class SplitSizes(nn.Module, OnnxToTorchModule):
    def __init__(self, axis: int, sizes: list[int] | None, num_outputs: int):
        super().__init__()
        self.axis = axis
        self.sizes = sizes
        self.num_outputs = num_outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.sizes is not None:
            return torch.split(x, self.sizes, dim=self.axis)
        # ONNX-18: equal chunks of ceil(n / num_outputs), the last one smaller
        return torch.split(x, math.ceil(x.shape[self.axis] / self.num_outputs), dim=self.axis)


@_register("Split", [18], "num_outputs attribute")
def _split18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    axis = node.attributes.get("axis", 0)
    split_name = node.input_values[1] if len(node.input_values) > 1 else ""
    sizes = _const_list(split_name, graph) if split_name else None
    if split_name and sizes is None:
        raise NotImplementedError("Split with sizes computed at run time is not supported")
    module = SplitSizes(axis, [int(s) for s in sizes] if sizes else None, len(node.output_values))
    return OperationConverterResult(module, _mapping(node, 1))


# ------------------------------------------------------------------------------------------ Reshape
class Reshape(nn.Module, OnnxToTorchModule):
    def __init__(self, shape: list[int] | None, allowzero: bool):
        super().__init__()
        self.shape = shape
        self.allowzero = allowzero

    def _target(self, x: torch.Tensor, shape: list[int]) -> list[int]:
        if self.allowzero:
            return shape
        return [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]

    def forward(self, x: torch.Tensor, shape: torch.Tensor | None = None) -> torch.Tensor:
        target = self.shape if shape is None else [int(s) for s in shape.tolist()]
        return torch.reshape(x, self._target(x, target))


def reshape_converter(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    allowzero = bool(node.attributes.get("allowzero", 0))
    shape = _const_list(node.input_values[1], graph)
    if shape is not None:
        return OperationConverterResult(Reshape([int(s) for s in shape], allowzero), _mapping(node, 1))
    return OperationConverterResult(Reshape(None, allowzero), _mapping(node, 2))


_register("Reshape", [19, 21], "allowzero; constant shape read at conversion")(reshape_converter)


# ------------------------------------------------------------------------------- new activation ops
class Gelu(nn.Module, OnnxToTorchModule):
    def __init__(self, approximate: str):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)


@_register("Gelu", [20], "new op")
def _gelu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return OperationConverterResult(Gelu(node.attributes.get("approximate", "none")), _mapping(node, 1))


class Mish(nn.Module, OnnxToTorchModule):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.mish(x)


@_register("Mish", [18], "new op")
def _mish(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return OperationConverterResult(Mish(), _mapping(node, 1))


class GroupNorm(nn.Module, OnnxToTorchModule):
    """GroupNormalization. Opset 18 has per-group scale/bias, opset 21 per-channel ones."""

    def __init__(self, num_groups: int, eps: float, per_channel: bool):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.per_channel = per_channel

    def forward(self, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y = F.group_norm(x, self.num_groups, eps=self.eps)
        if not self.per_channel:  # per group: repeat each group's value over its channels
            rep = x.shape[1] // self.num_groups
            scale, bias = scale.repeat_interleave(rep), bias.repeat_interleave(rep)
        view = [1, -1] + [1] * (x.dim() - 2)
        return y * scale.view(view) + bias.view(view)


@_register("GroupNormalization", [18], "new op (per-group scale/bias)")
def _group_norm18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    module = GroupNorm(int(node.attributes["num_groups"]), float(node.attributes.get("epsilon", 1e-5)), False)
    return OperationConverterResult(module, _mapping(node, 3))


@_register("GroupNormalization", [21], "new op (per-channel scale/bias)")
def _group_norm21(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    module = GroupNorm(int(node.attributes["num_groups"]), float(node.attributes.get("epsilon", 1e-5)), True)
    return OperationConverterResult(module, _mapping(node, 3))


# ------------------------------------------------------------- type-only bumps: delegate to previous
def _delegate(op_type: str, previous: int, unsupported: dict[str, object] | None = None) -> Callable:
    """A converter for a new version of ``op_type`` whose semantics equal ``previous`` as long as the
    node leaves the attributes in ``unsupported`` at their defaults."""

    def converter(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        for attr, default in (unsupported or {}).items():
            value = node.attributes.get(attr, default)
            if isinstance(default, list) and value is not default:
                value = list(value)
            if value != default and not (attr == "dilations" and set(value) == {1}):
                raise NotImplementedError(f"{op_type} with {attr}={value!r} is not supported")
        return get_converter(operation_type=op_type, version=previous)(node, graph)

    return converter


_BUMPS: list[tuple[str, list[int], int, dict | None]] = [
    ("Cast", [19, 21], 13, {"saturate": 1}),
    ("Constant", [19, 21], 13, None),
    ("ConstantOfShape", [20, 21], 9, None),
    ("Equal", [19], 13, None),
    ("Flatten", [21], 13, None),
    ("Identity", [19, 21], 16, None),
    ("IsInf", [20], 10, None),
    ("IsNaN", [20], 13, None),
    ("GreaterOrEqual", [16], 12, None),
    ("LessOrEqual", [16], 12, None),
    ("Shape", [19, 21], 15, None),
    ("Transpose", [21], 13, None),
    ("Unsqueeze", [21], 13, None),
    ("Squeeze", [21], 13, None),
    ("AveragePool", [19], 11, {"dilations": []}),
    ("ScatterND", [18], 16, {"reduction": "none"}),
]
for _op, _versions, _prev, _unsupported in _BUMPS:
    _register(_op, _versions, f"as version {_prev}")(_delegate(_op, _prev, _unsupported))


# ------------------------------------------------------------ standard ops onnx2torch does not have
class _Fn(nn.Module, OnnxToTorchModule):
    """A stateless op given as a function of the input tensor(s)."""

    def __init__(self, fn: Callable, name: str):
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.fn(*xs)

    def extra_repr(self) -> str:
        return self.name


def _simple(op_type: str, versions: list[int], make: Callable[[OnnxNode], Callable], n_inputs: int = 1) -> None:
    def converter(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        return OperationConverterResult(_Fn(make(node), op_type), _mapping(node, n_inputs))

    _register(op_type, versions, "new converter")(converter)


def _spatial(x: torch.Tensor) -> list[int]:
    return list(range(2, x.dim()))


def _space_to_depth(node: OnnxNode) -> Callable:
    b = int(node.attributes["blocksize"])

    def fn(x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(n, c * b * b, h // b, w // b)

    return fn


def _lp_norm(node: OnnxNode) -> Callable:
    axis, p = int(node.attributes.get("axis", -1)), int(node.attributes.get("p", 2))
    return lambda x: x / torch.linalg.vector_norm(x, ord=p, dim=axis, keepdim=True)


def _mvn(node: OnnxNode) -> Callable:
    axes = list(node.attributes.get("axes", [0, 2, 3]))

    def fn(x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=axes, keepdim=True)
        return (x - mean) / ((x - mean).square().mean(dim=axes, keepdim=True).sqrt() + 1e-9)

    return fn


def _global_lp(node: OnnxNode) -> Callable:
    p = float(node.attributes.get("p", 2))
    return lambda x: x.abs().pow(p).sum(dim=_spatial(x), keepdim=True).pow(1.0 / p)


def _shrink(node: OnnxNode) -> Callable:
    bias, lambd = float(node.attributes.get("bias", 0.0)), float(node.attributes.get("lambd", 0.5))
    return lambda x: torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))


def _thresholded_relu(node: OnnxNode) -> Callable:
    alpha = float(node.attributes.get("alpha", 1.0))
    return lambda x: torch.where(x > alpha, x, torch.zeros_like(x))


def _trilu(node: OnnxNode) -> Callable:
    upper = bool(node.attributes.get("upper", 1))

    def fn(x: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        kk = 0 if k is None else int(k)
        return torch.triu(x, kk) if upper else torch.tril(x, kk)

    return fn


_simple("GlobalMaxPool", [1], lambda node: lambda x: x.amax(dim=_spatial(x), keepdim=True))
_simple("GlobalLpPool", [2], _global_lp)
_simple("SpaceToDepth", [1, 13], _space_to_depth)
_simple("LpNormalization", [1], _lp_norm)
_simple("MeanVarianceNormalization", [9, 13], _mvn)
_simple("Shrink", [9], _shrink)
_simple("ThresholdedRelu", [10], _thresholded_relu)
_simple("Sinh", [9], lambda node: torch.sinh)
_simple("Cosh", [9], lambda node: torch.cosh)
_simple("Asinh", [9], lambda node: torch.asinh)
_simple("Acosh", [9], lambda node: torch.acosh)
_simple("Atanh", [9], lambda node: torch.atanh)
_simple("CastLike", [15, 19, 21], lambda node: lambda x, like: x.to(like.dtype), n_inputs=2)
_simple("Size", [1, 13, 19, 21], lambda node: lambda x: torch.tensor(x.numel(), dtype=torch.int64))
_simple("Trilu", [14], _trilu, n_inputs=2)


# ------------------------------------------------------- Resize: every attribute, in place of onnx2torch's
_resize.register()
ADDED.extend(("Resize", v, "full spec (converters/resize.py)") for v in _resize.VERSIONS)


# ------------------------------------------------------------------- LSTM, GRU, RNN (converters/recurrent.py)
_recurrent.register(ADDED, _registered)


# ------------------------------------------------------- quantized graphs as float (converters/quantized.py)
_quantized.register(ADDED, _registered)


# ------------------------------------------- Round, Floor, Ceil, Sign: straight through (converters/surrogates.py)
_surrogates.register(ADDED)
