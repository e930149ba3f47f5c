"""Taps: the intermediate tensors of a model that a user may visualize.

A tap is any floating-point value produced by a node that depends on the image input. For each tap
we report its shape (without batch, at the model's nominal input size), its cumulative stride and its
receptive field in input pixels, computed from the graph (not by probing):

* Conv / MaxPool / AveragePool / LpPool: ``rf += (dilation·(k−1)) · stride_in``; ``stride *= s``
  (the larger of the two spatial axes is reported, so rectangular kernels give the bounding square).
* Ops that mix every position — global pooling, Gemm, a Flatten/Reshape to rank ≤ 2, a reduction or
  normalization over a spatial axis (incl. InstanceNormalization), a MatMul of two image-dependent
  tensors (attention), a MatMul over the spatial axis — make the tap *global*: its receptive field
  is the whole input (max(H, W) of the nominal size) and its stride stays the stride of the last
  spatial layer (the grid the features were computed on; the energy's jitter uses it).
* Everything else (elementwise, concat, normalization over channels, transposes, reshapes that keep
  tokens) keeps the largest stride / receptive field among its image-dependent inputs.

Upsampling (Resize, ConvTranspose, DepthToSpace) is not modelled: it keeps its input's geometry.
Spatial axes are tracked through Transpose; after a Reshape to rank ≥ 3 the layout is unknown and the
last axis is taken to be the channel axis (true of transformer tokens B×N×C and of channels-last
ConvNeXt blocks).
"""

from __future__ import annotations

import ast
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


@dataclass(frozen=True)
class TapInfo:
    name: str  # the ONNX value name
    alias: str  # the producing node's name (unique within the model)
    op_type: str
    shape: tuple[int | None, ...]  # without batch; None for a dimension not known statically
    stride: int
    receptive_field: int
    is_global: bool = False  # True once every input pixel can affect every element
    index: int = field(default=0, compare=False)  # position in topological order
    module: str = ""  # the torch module path that produced it ("layer1.0.conv1"), when the exporter kept it

    def as_dict(self) -> dict:
        return {
            "name": self.name, "alias": self.alias, "op_type": self.op_type,
            "shape": list(self.shape), "stride": self.stride,
            "receptive_field": self.receptive_field, "global": self.is_global, "module": self.module,
        }


@dataclass
class _Geo:
    stride: int
    rf: int
    is_global: bool
    spatial_axes: tuple[int, ...] | None  # None: layout unknown, last axis taken as channels
    rank: int | None


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


def compute_taps(
    model: onnx.ModelProto,
    input_name: str,
    input_layout: str,
    input_hw: tuple[int, int],
) -> list[TapInfo]:
    """Taps of ``model`` (normalized, shape-inferred at ``input_hw``) in topological order."""
    graph = model.graph
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    infos: dict[str, onnx.ValueInfoProto] = {}
    for vi in list(graph.value_info) + list(graph.output) + list(graph.input):
        infos[vi.name] = vi
    full = max(input_hw)

    in_shape = _shape_of(infos[input_name]) if input_name in infos else None
    geo: dict[str, _Geo] = {
        input_name: _Geo(1, 1, False, (1, 2) if input_layout == "NHWC" else (2, 3),
                         len(in_shape) if in_shape else 4)
    }
    aliases = node_aliases(graph)
    taps: list[TapInfo] = []
    for node, alias in zip(graph.node, aliases, strict=False):
        ins = [geo[i] for i in node.input if i in geo]
        if not ins:
            continue  # shape arithmetic or constants: does not depend on the image
        g = _propagate(node, ins, [i in geo for i in node.input], infos, consts, full)
        for out in node.output:
            if not out:
                continue
            vi = infos.get(out)
            shape = _shape_of(vi) if vi is not None else None
            g_out = _Geo(g.stride, g.rf, g.is_global, g.spatial_axes, len(shape) if shape else g.rank)
            geo[out] = g_out
            if vi is None or vi.type.tensor_type.elem_type not in FLOAT_TYPES:
                continue
            taps.append(TapInfo(
                name=out, alias=alias if len(node.output) == 1 else f"{alias}:{list(node.output).index(out)}",
                op_type=node.op_type, shape=tuple(shape[1:]) if shape else (),
                stride=g.stride, receptive_field=g.rf,
                is_global=g.is_global, index=len(taps), module=node_module(node),
            ))
    return taps


def _propagate(node, ins: list[_Geo], dep: list[bool], infos, consts, full: int) -> _Geo:
    first = ins[0]
    stride = max(g.stride for g in ins)
    rf = max(g.rf for g in ins)
    is_global = any(g.is_global for g in ins)
    axes = first.spatial_axes
    rank = first.rank
    op = node.op_type
    out_vi = infos.get(node.output[0]) if node.output else None
    out_shape = _shape_of(out_vi) if out_vi is not None else None
    out_rank = len(out_shape) if out_shape else None

    def make_global() -> _Geo:
        return _Geo(stride, full, True, None, out_rank)

    if is_global:
        return make_global()
    if op in _WINDOW_OPS:
        kernel = _attr(node, "kernel_shape")
        if kernel is None and op == "Conv" and len(node.input) > 1 and node.input[1] in consts:
            kernel = list(consts[node.input[1]].shape[2:])
        kernel = list(kernel or [1])
        strides = list(_attr(node, "strides") or [1] * len(kernel))
        dil = list(_attr(node, "dilations") or [1] * len(kernel))
        k_eff = max(d * (k - 1) + 1 for k, d in zip(kernel, dil, strict=False))
        return _Geo(stride * max(strides), rf + (k_eff - 1) * stride, False, (2, 3), out_rank)
    if op in _GLOBAL_OPS:
        return make_global()
    if op == "MatMul":
        if all(dep[:2]) or (rank is not None and rank <= 2):
            return make_global()
        if dep[0] and axes is not None and rank is not None and (rank - 1) in axes:
            return make_global()
        return _Geo(stride, rf, False, axes, out_rank)
    if op in ("Flatten", "Reshape", "Squeeze", "Unsqueeze"):
        if out_rank is not None and out_rank <= 2:
            return make_global()
        return _Geo(stride, rf, False, axes if out_rank == rank else None, out_rank)
    if op == "Transpose":
        perm = _attr(node, "perm")
        if axes is not None and perm is not None:
            axes = tuple(sorted(list(perm).index(a) for a in axes))
        return _Geo(stride, rf, False, axes, out_rank)
    if op in _REDUCE_OPS or op in _AXIS_OPS:
        if op in _AXIS_OPS:
            ax = _attr(node, "axis", -1)
            if op == "LayerNormalization" and rank is not None:
                red = list(range(ax % rank, rank))
            else:
                red = [ax]
        elif op in ("ArgMax", "ArgMin"):
            red = [_attr(node, "axis", 0)]
        else:
            red = _attr(node, "axes")
            if red is None and len(node.input) > 1 and node.input[1]:
                red = _const_ints(node.input[1], consts)
        if not red or rank is None:
            return make_global()  # no axes: reduce everything
        red = sorted({a % rank for a in red})
        spatial = set(axes) if axes is not None else set(range(1, rank - 1))
        if spatial & set(red):
            return make_global()
        keep = _attr(node, "keepdims", 1)
        return _Geo(stride, rf, False, axes if keep else None, out_rank)
    return _Geo(stride, rf, False, axes, out_rank)
