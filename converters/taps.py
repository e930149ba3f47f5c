"""Taps: the intermediate tensors of a model that a user may visualize.

A tap is any floating-point value whose elements depend on the image's pixels (values computed only
from the image's *shape*, through Shape/Size, are plumbing, not taps). For each tap we report its shape
(without batch, at the model's nominal input size) and, per image axis (y, x), its cumulative stride
and its receptive field in input pixels, computed from the graph (not by probing).

The two axes are tracked separately because real graphs treat them separately: dense SIFT pools rows
with a (39×1, stride 4×1) convolution and columns with a (1×39, stride 1×4) one, which one scalar turns
into stride 16 instead of 4; HOG builds its gradients and block normalisation from shifted Slices
along one axis at a time. Along each axis a value carries ``(stride, lo, hi)``: its element i reads
input pixels ``i·stride + lo … i·stride + hi`` (receptive field ``hi − lo + 1``). Tracking the offsets
``lo``/``hi``, not only the width, is what lets ``x[1:] − x[:-1]`` widen the field by one pixel.

* Conv / MaxPool / AveragePool / LpPool (2-D, over the tracked y/x axes): the window reads
  ``i·s − pad_begin … i·s − pad_begin + dilation·(k−1)`` of its input, per axis.
* Slice: the start shifts the window, the step multiplies the stride; Pad shifts it back; Concat
  along an image axis places each piece at its offset (the union is taken); SpaceToDepth folds a
  b×b block into channels (stride ×b). Elementwise ops (with broadcasting) take the union of their
  image-dependent inputs, which must then share a stride.
* Ops that mix every position — global pooling, Gemm, a Flatten/Reshape to rank ≤ 2, a reduction or
  normalization over an image axis (incl. InstanceNormalization), a MatMul of two image-dependent
  tensors (attention), a MatMul over an image axis — make the tap *global*: its receptive field is
  the whole input (the nominal H and W) and its stride stays that of the last spatial layer (the grid
  the features were computed on; the energy's jitter uses it).
* The y/x axes are tracked, in that order, through Transpose, Squeeze/Unsqueeze and Reshapes that
  keep them (channel shuffles). A Reshape that only regroups y and x among themselves — merged into
  one token axis (ViT: B×N×C) or split into windows (Swin) — keeps every element one position but
  loses the layout; from then on the last axis is taken to be the channel axis and position-wise ops
  keep the geometry (true of transformer tokens and of channels-last ConvNeXt blocks).
* Geometry is *unknown* (``stride_yx``/``receptive_field_yx`` None, the scalar fields 0) after an
  op that resamples or reorders positions in a way not modelled here: Resize/Upsample, ConvTranspose,
  DepthToSpace, a Reshape folding an image axis into channels, a Gather/Split/… along an image axis,
  a Slice/Pad with computed offsets, a broadcast of a single position over an image axis, inputs on
  different grids, or an op whose output changes the image axes' sizes for reasons not modelled. A
  number we cannot justify is worse than none: the jitter and the maximize scaling then fall back to
  safe values (no jitter; the whole image). A global op after it still gives a global tap.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

_T = onnx.TensorProto
FLOAT_TYPES = {_T.FLOAT, _T.FLOAT16, _T.DOUBLE, _T.BFLOAT16}

_WINDOW_OPS = {"Conv", "MaxPool", "AveragePool", "LpPool"}
_GLOBAL_OPS = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "Gemm", "InstanceNormalization"}
_REDUCE_OPS = {
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin",
}
_AXIS_OPS = {"Softmax", "LogSoftmax", "LayerNormalization"}
# Outputs that depend on the image's size but not on its pixels: never geometry, never taps.
_SHAPE_ONLY_OPS = {"Shape", "Size"}
# Ops that resample or reorder positions in ways not modelled: their output's geometry is unknown.
_RESAMPLE_OPS = {
    "Resize", "Upsample", "ConvTranspose", "DepthToSpace", "Col2Im", "GridSample", "AffineGrid", "RoiAlign",
    "MaxRoiPool", "MaxUnpool", "NonZero", "Compress", "ReverseSequence",
}
# Ops after which the y/x axes are no longer where they were (unless modelled).
_RELAYOUT_OPS = {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Einsum", "Transpose"}
# Ops whose inputs after the first are indices, sizes or axes: an image-dependent one (a data-dependent
# crop or shape) has no geometry we can state.
_DATA_FIRST_OPS = {
    "Slice", "Reshape", "Pad", "Expand", "Tile", "Squeeze", "Unsqueeze", "Split", "TopK", "CumSum",
    "Resize", "Upsample", *_REDUCE_OPS,
}
# Ops that compute each output position from the same position of their inputs (elementwise, with
# numpy broadcasting, or mixing channels only).
_POSITIONWISE_OPS = {
    "Abs", "Acos", "Acosh", "Add", "And", "Asin", "Asinh", "Atan", "Atanh", "BatchNormalization", "BitShift",
    "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Cos",
    "Cosh", "DequantizeLinear", "Div", "Dropout", "Elu", "Equal", "Erf", "Exp", "Floor", "Gelu", "Greater",
    "GreaterOrEqual", "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN", "LRN", "LeakyRelu", "Less",
    "LessOrEqual", "Log", "Max", "Mean", "Min", "Mish", "Mod", "Mul", "Neg", "Not", "Or", "PRelu", "Pow",
    "QuantizeLinear", "Reciprocal", "Relu", "Round", "Selu", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh",
    "Softplus", "Softsign", "Sqrt", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Where", "Xor",
}


@dataclass(frozen=True)
class TapInfo:
    name: str  # the ONNX value name
    alias: str  # the producing node's name (unique within the model)
    op_type: str
    shape: tuple[int | None, ...]  # without batch; None for a dimension not known statically
    # The larger of the two axes' values (what ListTaps and the energy's jitter use); 0 when unknown.
    stride: int
    receptive_field: int
    is_global: bool = False  # True once every input pixel can affect every element
    index: int = field(default=0, compare=False)  # position in topological order
    module: str = ""  # the torch module path that produced it ("layer1.0.conv1"), when the exporter kept it
    stride_yx: tuple[int, int] | None = None  # per image axis (y, x); None: not known
    receptive_field_yx: tuple[int, int] | None = None  # per image axis; (H, W) of the nominal input if global

    @property
    def geometry_known(self) -> bool:
        return self.stride_yx is not None and self.receptive_field_yx is not None

    def as_dict(self) -> dict:
        return {
            "name": self.name, "alias": self.alias, "op_type": self.op_type,
            "shape": list(self.shape), "stride": self.stride,
            "receptive_field": self.receptive_field, "global": self.is_global, "module": self.module,
            "stride_yx": list(self.stride_yx) if self.stride_yx else None,
            "receptive_field_yx": list(self.receptive_field_yx) if self.receptive_field_yx else None,
        }


_Pair = tuple[int, int]


@dataclass(frozen=True)
class _Geo:
    """Where a value's elements look in the input image, per image axis j (0 = y, 1 = x): element i
    along axis j reads pixels ``i·stride[j] + span[j][0] … i·stride[j] + span[j][1]``."""

    stride: _Pair | None  # None: unknown
    span: tuple[_Pair, _Pair] | None  # None: unknown; for a global value ((0, H−1), (0, W−1))
    is_global: bool
    axes: _Pair | None  # tensor positions of the y and x axes, in that order; None: layout unknown
    rank: int | None

    @property
    def known(self) -> bool:
        return self.stride is not None and self.span is not None


def _unknown(rank: int | None, like: _Geo | None = None) -> _Geo:
    """Unknown stride and field. ``like``: an input whose y/x axes the output keeps at the same places
    (a Resize resamples them but leaves them where they were), so a later global op is still seen."""
    axes = like.axes if like is not None and like.rank is not None and like.rank == rank else None
    return _Geo(None, None, False, axes, rank)


def node_aliases(graph: onnx.GraphProto) -> list[str]:
    """A unique, human-recognizable name per node: the exporter's node name, else op_type_index."""
    seen: dict[str, int] = {}
    out = []
    for i, node in enumerate(graph.node):
        base = node.name or f"{node.op_type}_{i}"
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append(base if n == 0 else f"{base}_{n}")
    return out


def node_module(node: onnx.NodeProto) -> str:
    """The torch module path a node came from. The dynamo exporter records it in the node's
    ``pkg.torch.onnx.name_scopes`` metadata (['', 'layer1', 'layer1.0', 'layer1.0.conv1', 'conv2d']);
    the legacy exporter names nodes '/layer1/layer1.0/conv1/Conv' (module path, then the op)."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                break
            if isinstance(scopes, list) and len(scopes) >= 2 and isinstance(scopes[-2], str):
                return scopes[-2]
            return ""
    if node.name.startswith("/"):
        # Scope components are names relative to their parent, except that children of containers
        # come qualified ("layer2" / "layer2.0" / "conv1"): rebuild the dotted path from them.
        path = ""
        for part in node.name.strip("/").split("/")[:-1]:
            path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
        return path
    return ""


def _shape_of(vi: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _const_ints(name: str, consts: dict[str, np.ndarray]) -> list[int] | None:
    if name in consts:
        return [int(v) for v in np.asarray(consts[name]).reshape(-1)]
    return None


class _Graph:
    """Static facts about the shape-inferred graph that propagation looks up."""

    def __init__(self, graph: onnx.GraphProto, input_hw: tuple[int, int]) -> None:
        self.consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        self.infos: dict[str, onnx.ValueInfoProto] = {}
        for vi in list(graph.value_info) + list(graph.output) + list(graph.input):
            self.infos[vi.name] = vi
        self.hw = (int(input_hw[0]), int(input_hw[1]))

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        if name in self.consts:
            return tuple(int(d) for d in self.consts[name].shape)
        vi = self.infos.get(name)
        return _shape_of(vi) if vi is not None else None

    def ints(self, node: onnx.NodeProto, index: int) -> list[int] | None:
        """Constant integer input ``index`` of ``node``; None when absent or computed at run time."""
        if len(node.input) <= index or not node.input[index]:
            return None
        return _const_ints(node.input[index], self.consts)


def compute_taps(
    model: onnx.ModelProto,
    input_name: str,
    input_layout: str,
    input_hw: tuple[int, int],
) -> list[TapInfo]:
    """Taps of ``model`` (normalized, shape-inferred at ``input_hw``) in topological order."""
    graph = model.graph
    g = _Graph(graph, input_hw)
    in_shape = g.shape(input_name)
    geo: dict[str, _Geo] = {
        input_name: _Geo((1, 1), ((0, 0), (0, 0)), False, (1, 2) if input_layout == "NHWC" else (2, 3),
                         len(in_shape) if in_shape else 4)
    }
    aliases = node_aliases(graph)
    taps: list[TapInfo] = []
    for node, alias in zip(graph.node, aliases, strict=False):
        ins = [geo.get(i) if i else None for i in node.input]
        if node.op_type in _SHAPE_ONLY_OPS or all(x is None for x in ins):
            continue  # shape arithmetic or constants: does not depend on the image's pixels
        try:
            out_geo = _propagate(node, ins, g)
        except (ValueError, IndexError, ZeroDivisionError):
            # Malformed attributes in an untrusted graph (checked later by the converter and parity):
            # geometry is then unknown rather than the model refused here.
            shape = g.shape(node.output[0]) if node.output and node.output[0] else None
            out_geo = _unknown(len(shape) if shape is not None else None)
        for out in node.output:
            if not out:
                continue
            shape = g.shape(out)
            geo[out] = _Geo(out_geo.stride, out_geo.span, out_geo.is_global, out_geo.axes,
                            len(shape) if shape is not None else out_geo.rank)
            vi = g.infos.get(out)
            if vi is None or vi.type.tensor_type.elem_type not in FLOAT_TYPES:
                continue
            stride_yx, rf_yx = _public(out_geo, g.hw)
            taps.append(TapInfo(
                name=out, alias=alias if len(node.output) == 1 else f"{alias}:{list(node.output).index(out)}",
                op_type=node.op_type, shape=tuple(shape[1:]) if shape else (),
                stride=max(stride_yx) if stride_yx else 0, receptive_field=max(rf_yx) if rf_yx else 0,
                is_global=out_geo.is_global, index=len(taps), module=node_module(node),
                stride_yx=stride_yx, receptive_field_yx=rf_yx,
            ))
    return taps


def _public(geo: _Geo, hw: tuple[int, int]) -> tuple[_Pair | None, _Pair | None]:
    if geo.is_global:
        return geo.stride, hw
    if not geo.known:
        return None, None
    assert geo.stride is not None and geo.span is not None
    return geo.stride, (geo.span[0][1] - geo.span[0][0] + 1, geo.span[1][1] - geo.span[1][0] + 1)


def _make_global(ins: list[_Geo], hw: tuple[int, int], rank: int | None) -> _Geo:
    """Every position now sees the whole input; the stride stays that of the grid it was computed on."""
    strides = [x.stride for x in ins]
    stride = None
    if strides and all(s is not None for s in strides):
        stride = (max(s[0] for s in strides if s), max(s[1] for s in strides if s))
    return _Geo(stride, ((0, hw[0] - 1), (0, hw[1] - 1)), True, None, rank)


def _propagate(node: onnx.NodeProto, ins: list[_Geo | None], g: _Graph) -> _Geo:
    op = node.op_type
    out_shape = g.shape(node.output[0]) if node.output and node.output[0] else None
    out_rank = len(out_shape) if out_shape is not None else None
    deps = [x for x in ins if x is not None]
    if op in _DATA_FIRST_OPS and (ins[0] is None or any(x is not None for x in ins[1:])):
        return _unknown(out_rank)  # offsets, sizes or axes computed from pixel values
    if any(x.is_global for x in deps):
        return _make_global(deps, g.hw, out_rank)
    if op in _GLOBAL_OPS:
        return _make_global(deps, g.hw, out_rank)
    if op == "MatMul":
        return _matmul(ins, deps, g, out_rank)
    if not all(x.known for x in deps):
        # Unknown stays unknown, unless a later op mixes every position (handled above).
        if op in ("Flatten", "Reshape") and out_rank is not None and out_rank <= 2:
            return _make_global(deps, g.hw, out_rank)
        if op in _REDUCE_OPS or op in _AXIS_OPS:
            return _reduce(node, deps[0], g, out_rank)
        if op == "Transpose":
            return _transpose(node, deps[0], out_rank)
        if op == "Einsum" and len(deps) > 1:
            return _make_global(deps, g.hw, out_rank)
        return _unknown(out_rank, None if op in _RELAYOUT_OPS else deps[0])
    if op in _WINDOW_OPS:
        return _window(node, ins, g, out_rank)
    if op == "SpaceToDepth":
        return _space_to_depth(node, deps[0], out_rank)
    if op in ("Flatten", "Reshape", "Squeeze", "Unsqueeze"):
        return _reshape(node, deps[0], g, out_rank)
    if op == "Transpose":
        return _transpose(node, deps[0], out_rank)
    if op in _REDUCE_OPS or op in _AXIS_OPS:
        return _reduce(node, deps[0], g, out_rank)
    if op == "Slice":
        return _slice(node, deps[0], g, out_rank)
    if op == "Pad":
        return _pad(node, deps[0], g, out_rank)
    if op == "Concat":
        return _concat(node, ins, g, out_rank)
    if op in _RESAMPLE_OPS:
        return _unknown(out_rank, deps[0])
    if op == "Einsum":  # two image-dependent operands: attention-like, mixes everything; else not modelled
        return _make_global(deps, g.hw, out_rank) if len(deps) > 1 else _unknown(out_rank)
    if op in _POSITIONWISE_OPS:
        return _merge(node, ins, g, out_rank)
    return _other(node, deps[0], g, out_rank)


def _transpose(node: onnx.NodeProto, x: _Geo, out_rank: int | None) -> _Geo:
    perm = _attr(node, "perm")
    if perm is None and x.rank is not None:
        perm = list(reversed(range(x.rank)))  # ONNX default: reverse the axes
    axes = None
    if x.axes is not None and perm is not None and all(a in perm for a in x.axes):
        perm = list(perm)
        axes = (perm.index(x.axes[0]), perm.index(x.axes[1]))  # in (y, x) order: a swap is tracked
    return _Geo(x.stride, x.span, False, axes, out_rank)


def _matmul(ins: list[_Geo | None], deps: list[_Geo], g: _Graph, out_rank: int | None) -> _Geo:
    """x·W mixes x's last axis, W·x its second-to-last; x·y (attention) mixes everything."""
    if len(ins) >= 2 and ins[0] is not None and ins[1] is not None:
        return _make_global(deps, g.hw, out_rank)
    x = deps[0]
    if x.rank is None or x.rank <= 2:
        return _make_global(deps, g.hw, out_rank)
    mixed = x.rank - 1 if ins[0] is not None else x.rank - 2
    # Unknown layout: the last axis is taken to be the channels, the ones before it positions (tokens).
    spatial = set(x.axes) if x.axes is not None else set(range(1, x.rank - 1))
    if mixed in spatial:
        return _make_global(deps, g.hw, out_rank)
    if not x.known:
        return _unknown(out_rank)
    return _Geo(x.stride, x.span, False, x.axes, out_rank)


def _window(node: onnx.NodeProto, ins: list[_Geo | None], g: _Graph, out_rank: int | None) -> _Geo:
    x = ins[0]
    if x is None or x.rank != 4 or any(w is not None for w in ins[1:]):
        return _unknown(out_rank)  # 1-D/3-D windows, weights computed from the image: not modelled
    assert x.stride is not None and x.span is not None
    # Conv's axes 2 and 3 are its spatial axes; after a layout-losing reshape we take them to be y, x.
    axes = x.axes if x.axes is not None else (2, 3)
    if set(axes) != {2, 3}:
        return _unknown(out_rank)  # a window over a channel axis: not an image window
    kernel = _attr(node, "kernel_shape")
    if kernel is None and node.op_type == "Conv" and len(node.input) > 1:
        w_shape = g.shape(node.input[1])
        kernel = list(w_shape[2:]) if w_shape is not None and len(w_shape) == 4 else None
    if kernel is None or len(kernel) != 2 or any(k is None or k < 1 for k in kernel):
        return _Geo(None, None, False, axes, out_rank)
    strides = list(_attr(node, "strides") or [1, 1])
    dil = list(_attr(node, "dilations") or [1, 1])
    pads = list(_attr(node, "pads") or [0, 0, 0, 0])
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if len(strides) != 2 or len(dil) != 2 or len(pads) != 4 or min(strides) < 1 or min(dil) < 1:
        return _Geo(None, None, False, axes, out_rank)
    in_shape = g.shape(node.input[0])
    stride, span = list(x.stride), list(x.span)
    for j in (0, 1):  # image axis y, x
        t = axes[j] - 2  # the kernel dimension that slides along it
        k_eff = dil[t] * (kernel[t] - 1) + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            size = in_shape[axes[j]] if in_shape is not None else None
            # Without a static size assume it divides by the stride (the usual case).
            total = max(k_eff - strides[t], 0) if size is None else \
                max((math.ceil(size / strides[t]) - 1) * strides[t] + k_eff - size, 0)
            begin = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        elif auto_pad == "VALID":
            begin = 0
        else:
            begin = pads[t]
        lo, hi = span[j]
        span[j] = (lo - begin * stride[j], hi + (k_eff - 1 - begin) * stride[j])
        stride[j] = stride[j] * strides[t]
    return _Geo((stride[0], stride[1]), (span[0], span[1]), False, axes, out_rank)


def _space_to_depth(node: onnx.NodeProto, x: _Geo, out_rank: int | None) -> _Geo:
    """A b×b block of positions becomes channels: like a b×b window with stride b."""
    b = int(_attr(node, "blocksize", 1))
    axes = x.axes if x.axes is not None else (2, 3)
    if x.rank != 4 or set(axes) != {2, 3} or b < 1:
        return _unknown(out_rank)
    assert x.stride is not None and x.span is not None
    span = tuple((lo, hi + (b - 1) * s) for (lo, hi), s in zip(x.span, x.stride, strict=True))
    return _Geo((x.stride[0] * b, x.stride[1] * b), (span[0], span[1]), False, axes, out_rank)


def _reshape(node: onnx.NodeProto, x: _Geo, g: _Graph, out_rank: int | None) -> _Geo:
    if out_rank is not None and out_rank <= 2:
        return _make_global([x], g.hw, out_rank)  # flattened features: a classifier's input
    if x.axes is None:
        return _Geo(x.stride, x.span, False, None, out_rank)  # token layout: positions kept
    in_shape, out_shape = g.shape(node.input[0]), g.shape(node.output[0])
    if in_shape is None or out_shape is None or None in in_shape or None in out_shape:
        return _unknown(out_rank)
    sizes_in = [int(d) for d in in_shape]
    sizes_out = [int(d) for d in out_shape]
    new = []
    for a in x.axes:
        # An axis survives a row-major reshape iff some output axis has its size and the same number
        # of elements before it (so the same element stride).
        before = math.prod(sizes_in[:a])
        hit = [b for b in range(len(sizes_out)) if sizes_out[b] == sizes_in[a] and math.prod(sizes_out[:b]) == before]
        new.append(hit[0] if hit else None)
    if None not in new and new[0] != new[1]:
        return _Geo(x.stride, x.span, False, (new[0], new[1]), out_rank)
    if _positions_kept(sizes_in, sizes_out, x.axes):
        # y and x merged into a token axis (ViT's patch embedding) or split into windows (Swin): each
        # element is still one position, but the layout is not representable by two axes; from here
        # on the last axis is taken to be the channel axis.
        return _Geo(x.stride, x.span, False, None, out_rank)
    return _unknown(out_rank)  # an image axis folded into channels: positions and channels mixed


def _positions_kept(sizes_in: list[int], sizes_out: list[int], axes: _Pair) -> bool:
    """True when a row-major reshape regroups the image axes only among themselves. The boundaries where
    both shapes have the same number of elements before them cut both into aligned groups of axes; an
    image axis sharing its group with a channel or batch axis (of size > 1) mixes positions into it."""
    if math.prod(sizes_in) != math.prod(sizes_out) or 0 in sizes_in:
        return False
    before_in = [math.prod(sizes_in[:i]) for i in range(len(sizes_in) + 1)]
    common = set(before_in) & {math.prod(sizes_out[:i]) for i in range(len(sizes_out) + 1)}
    for a in axes:
        lo = max(c for c in common if c <= before_in[a])
        hi = min(c for c in common if c >= before_in[a + 1])
        group = [i for i in range(len(sizes_in)) if before_in[i] >= lo and before_in[i + 1] <= hi]
        if any(sizes_in[i] > 1 and i not in axes for i in group):
            return False
    return True


def _reduce(node: onnx.NodeProto, x: _Geo, g: _Graph, out_rank: int | None) -> _Geo:
    op = node.op_type
    rank = x.rank
    if op in _AXIS_OPS:
        ax = _attr(node, "axis", -1)
        red = list(range(ax % rank, rank)) if op == "LayerNormalization" and rank is not None else [ax]
    elif op in ("ArgMax", "ArgMin"):
        red = [_attr(node, "axis", 0)]
    else:
        red = _attr(node, "axes")
        if red is None and len(node.input) > 1 and node.input[1]:
            red = g.ints(node, 1)
            if red is None:
                return _unknown(out_rank)  # axes computed at run time
    if not red or not rank:
        if op not in _AXIS_OPS and not red and _attr(node, "noop_with_empty_axes", 0):
            return x  # ReduceXxx-18 with empty axes and noop_with_empty_axes: identity
        return _make_global([x], g.hw, out_rank)  # no axes: reduce everything
    red = sorted({a % rank for a in red})
    spatial = set(x.axes) if x.axes is not None else set(range(1, rank - 1))
    if spatial & set(red):
        return _make_global([x], g.hw, out_rank)
    if not x.known:
        return _unknown(out_rank)
    axes = x.axes
    if axes is not None and op not in _AXIS_OPS and not _attr(node, "keepdims", 1):
        axes = (axes[0] - sum(a < axes[0] for a in red), axes[1] - sum(a < axes[1] for a in red))
    return _Geo(x.stride, x.span, False, axes, out_rank)


def _shifted(x: _Geo, j: int, offset: int, step: int = 1) -> _Geo:
    """``x`` with element i along image axis j now being element ``offset + i·step`` of before."""
    assert x.stride is not None and x.span is not None
    s = x.stride[j]
    span = list(x.span)
    span[j] = (span[j][0] + offset * s, span[j][1] + offset * s)
    stride = list(x.stride)
    stride[j] = s * step
    return _Geo((stride[0], stride[1]), (span[0], span[1]), False, x.axes, x.rank)


def _slice(node: onnx.NodeProto, x: _Geo, g: _Graph, out_rank: int | None) -> _Geo:
    if x.axes is None or not x.rank:
        return _Geo(x.stride, x.span, False, x.axes, out_rank)  # token layout: positions kept
    if len(node.input) == 1:  # Slice-1: attributes
        starts, axes, steps = _attr(node, "starts"), _attr(node, "axes"), None
    else:
        starts, axes, steps = g.ints(node, 1), g.ints(node, 3), g.ints(node, 4)
        if (len(node.input) > 3 and node.input[3] and axes is None) or \
                (len(node.input) > 4 and node.input[4] and steps is None):
            return _unknown(out_rank, x)
    if axes is None and starts is not None:
        axes = list(range(len(starts)))
    if axes is None:
        return _unknown(out_rank, x)
    axes = [a % x.rank for a in axes]
    steps = list(steps) if steps is not None else [1] * len(axes)
    in_shape = g.shape(node.input[0])
    y = _Geo(x.stride, x.span, False, x.axes, out_rank)
    for k, a in enumerate(axes):
        if a not in x.axes:
            continue  # channels or batch: positions untouched
        if starts is None or k >= len(steps) or steps[k] < 1:
            return _unknown(out_rank, x)  # computed offsets, or a reversed axis
        start = int(starts[k])
        if start < 0:
            size = in_shape[a] if in_shape is not None else None
            if size is None:
                return _unknown(out_rank, x)
            start = max(size + start, 0)
        y = _shifted(y, x.axes.index(a), start, int(steps[k]))
    return y


def _pad(node: onnx.NodeProto, x: _Geo, g: _Graph, out_rank: int | None) -> _Geo:
    if x.axes is None or not x.rank:
        return _Geo(x.stride, x.span, False, x.axes, out_rank)  # token layout: positions kept
    pads = _attr(node, "pads") if len(node.input) < 2 else g.ints(node, 1)
    if pads is None:
        return _unknown(out_rank, x)
    axes = g.ints(node, 3) if len(node.input) > 3 and node.input[3] else list(range(x.rank))
    if axes is None or len(pads) != 2 * len(axes):
        return _unknown(out_rank, x)
    y = _Geo(x.stride, x.span, False, x.axes, out_rank)
    for k, a in enumerate(a % x.rank for a in axes):
        if a in x.axes and pads[k]:
            y = _shifted(y, x.axes.index(a), -int(pads[k]))  # element i is element i − pad_begin of before
    return y


def _concat(node: onnx.NodeProto, ins: list[_Geo | None], g: _Graph, out_rank: int | None) -> _Geo:
    deps = [x for x in ins if x is not None]
    layout = _common_axes(deps, out_rank)
    if layout is False:
        return _unknown(out_rank)
    rank = out_rank if out_rank is not None else deps[0].rank
    axis = _attr(node, "axis", 0)
    if layout is None or not rank or axis % rank not in layout:
        return _merge(node, ins, g, out_rank)  # along channels (or tokens): positions untouched
    # Along an image axis each piece lands at an offset: shift it there and take the union.
    j = layout.index(axis % rank)
    pieces, offset = [], 0
    for name, x in zip(node.input, ins, strict=False):
        shape = g.shape(name)
        size = shape[axis % rank] if shape is not None and len(shape) == rank else None
        if size is None:
            return _Geo(None, None, False, layout, out_rank)
        if x is not None:
            pieces.append(_shifted(x, j, -offset))
        offset += size
    return _union(pieces, layout, out_rank)


def _common_axes(deps: list[_Geo], out_rank: int | None) -> _Pair | None | bool:
    """The image axes' positions in the output of a broadcasting op; None: unknown layout; False:
    inputs disagree."""
    found: set[_Pair] = set()
    for x in deps:
        if x.axes is not None:
            lift = (out_rank - x.rank) if out_rank is not None and x.rank is not None else 0
            found.add((x.axes[0] + lift, x.axes[1] + lift))
    if len(found) > 1:
        return False
    return found.pop() if found else None


def _union(xs: list[_Geo], axes: _Pair | None, out_rank: int | None) -> _Geo:
    if not all(x.known for x in xs) or len({x.stride for x in xs}) != 1:
        return _Geo(None, None, False, axes, out_rank)  # different grids: positions do not correspond
    spans = [x.span for x in xs if x.span is not None]
    span = tuple((min(s[j][0] for s in spans), max(s[j][1] for s in spans)) for j in (0, 1))
    return _Geo(xs[0].stride, (span[0], span[1]), False, axes, out_rank)


def _merge(node: onnx.NodeProto, ins: list[_Geo | None], g: _Graph, out_rank: int | None) -> _Geo:
    """Elementwise with numpy broadcasting: the union of the image-dependent inputs' windows."""
    deps = [x for x in ins if x is not None]
    axes = _common_axes(deps, out_rank)
    if axes is False:
        return _unknown(out_rank)
    out_shape = g.shape(node.output[0])
    if axes is not None and out_shape is not None:
        for name, x in zip(node.input, ins, strict=False):
            shape = g.shape(name)
            if x is None or shape is None:
                continue
            lift = len(out_shape) - len(shape)
            for a in axes:
                if 0 <= a - lift < len(shape) and shape[a - lift] == 1 and (out_shape[a] or 2) > 1:
                    return _Geo(None, None, False, axes, out_rank)  # one position broadcast over an image axis
    return _union(deps, axes, out_rank)


def _other(node: onnx.NodeProto, x: _Geo, g: _Graph, out_rank: int | None) -> _Geo:
    """An op not modelled here (Gather, Split, Tile, …): positions are taken to be kept when its output
    has the same image axes, of the same sizes, as its first input and it works along another axis."""
    if x.axes is None:
        return _Geo(x.stride, x.span, False, None, out_rank)  # token layout: positions kept
    in_shape, out_shape = g.shape(node.input[0]), g.shape(node.output[0])
    axis = _attr(node, "axis")
    if (
        in_shape is None or out_shape is None or len(in_shape) != len(out_shape)
        or any(in_shape[a] is None or in_shape[a] != out_shape[a] for a in x.axes)
        or (axis is not None and x.rank and axis % x.rank in x.axes)
    ):
        return _unknown(out_rank, x)
    return _Geo(x.stride, x.span, False, x.axes, out_rank)
