"""Graph normalization before conversion: the shapes onnx2torch handles best.

1. Local functions inlined (the dynamo exporter can emit them).
2. Constant nodes → initializers (third-party exporters store weights that way; onnx2torch's Conv/Gemm
   converters only look at initializers).
3. Identity nodes folded away (exporters emit Identity chains when they deduplicate equal tensors).
4. Constant folding of shape arithmetic: a node whose inputs are all constants (and small) is evaluated
   with onnx's reference evaluator; a Shape whose input has a fully static inferred shape becomes a
   constant. Outputs are capped (FOLD_MAX_ELEMENTS) so folding can never allocate much.
5. Reshape(allowzero=1) → allowzero=0 where that cannot change the result (see _reshape_allowzero).
6. DequantizeLinear of constant (quantized) weights → float initializers, of any size: a QDQ model's Conv
   and Gemm weights then are initializers, which onnx2torch's converters need (the value is the same
   float32 (w − zero_point)·scale onnxruntime computes).
7. ``auto_pad`` SAME_UPPER/SAME_LOWER with stride 1 → explicit pads (the same at every input size; PaddleOCR's
   exports use it, onnx2torch refuses it). With a larger stride the pads depend on the input size and
   the node is left to the converter, which refuses it with its own message.
8. Dead nodes and unused initializers removed.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from converters.errors import ModelError

FOLD_MAX_ELEMENTS = 1 << 16
# Ops whose output size is bounded by their inputs' (elementwise, indexing, concatenation, layout):
# folding them with small inputs cannot produce a big tensor.
_BOUNDED_OPS = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Neg",
    "Abs",
    "Floor",
    "Ceil",
    "Sqrt",
    "Reciprocal",
    "Pow",
    "Mod",
    "Min",
    "Max",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "Not",
    "And",
    "Or",
    "Where",
    "Cast",
    "Gather",
    "GatherElements",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Slice",
    "Reshape",
    "Transpose",
    "Flatten",
    "ReduceProd",
    "ReduceSum",
    "ReduceMax",
    "ReduceMin",
    "ReduceMean",
    "Size",
    "Sign",
    "Exp",
    "Log",
    "Clip",
    "Identity",
    "Split",
}
# Ops whose output size is given by an input's values: checked before evaluation.
_SIZED_OPS = {"ConstantOfShape", "Expand", "Range", "Tile"}


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    if len(model.functions):
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    return model


def _replace_nodes(g: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    del g.node[:]
    g.node.extend(nodes)


def constants_to_initializers(model: onnx.ModelProto) -> None:
    g = model.graph
    keep = []
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            a = node.attribute[0]
            value = helper.get_attribute_value(a)
            if a.name == "value":
                t = onnx.TensorProto()
                t.CopyFrom(value)
            else:
                dtype = {
                    "value_float": np.float32,
                    "value_floats": np.float32,
                    "value_int": np.int64,
                    "value_ints": np.int64,
                }.get(a.name)
                if dtype is None:  # sparse or string constants: leave to the converter
                    keep.append(node)
                    continue
                t = numpy_helper.from_array(np.asarray(value, dtype=dtype))
            t.name = node.output[0]
            g.initializer.append(t)
        else:
            keep.append(node)
    _replace_nodes(g, keep)


def fold_identities(model: onnx.ModelProto) -> None:
    """Rewire consumers of Identity outputs to the Identity's input. An Identity that produces a graph
    output is kept (the output's name is part of the model's contract)."""
    g = model.graph
    graph_outputs = {o.name for o in g.output}
    alias: dict[str, str] = {}

    def resolve(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    keep = []
    for node in g.node:
        for i, v in enumerate(node.input):
            node.input[i] = resolve(v)
        is_identity = node.op_type == "Identity" and node.domain in ("", "ai.onnx")
        if is_identity and node.output[0] not in graph_outputs:
            alias[node.output[0]] = node.input[0]
        else:
            keep.append(node)
    _replace_nodes(g, keep)


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every large initializer turned into a typed graph input: same shapes for inference
    and the checker, without serializing megabytes of weights on each call."""
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.graph.name = model.graph.name
    m.graph.node.extend(model.graph.node)
    m.graph.input.extend(model.graph.input)
    m.graph.output.extend(model.graph.output)
    m.graph.value_info.extend(model.graph.value_info)
    for t in model.graph.initializer:
        if math.prod(t.dims) <= FOLD_MAX_ELEMENTS:
            m.graph.initializer.append(t)
        else:
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model), data_prop=True)
    except Exception:  # inference problems surface later, with context; folding is best effort
        return {}
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            out[vi.name] = [d.dim_value for d in t.shape.dim]
    return out


def _predicted_size(node: onnx.NodeProto, vals: list[np.ndarray | None]) -> int:
    """Elements the node would produce, computed from its (constant) inputs without running it."""
    op = node.op_type
    if op == "ConstantOfShape":
        return math.prod(int(v) for v in vals[0].reshape(-1))
    if op == "Expand":
        shape = np.broadcast_shapes(vals[0].shape, tuple(int(v) for v in vals[1].reshape(-1)))
        return math.prod(shape)
    if op == "Tile":
        return vals[0].size * math.prod(int(v) for v in vals[1].reshape(-1))
    if op == "Range":
        start, limit, delta = (float(v.reshape(-1)[0]) for v in vals[:3])
        return max(0, math.ceil((limit - start) / delta)) if delta else FOLD_MAX_ELEMENTS + 1
    return sum(v.size for v in vals if v is not None)


def _known_shape(name: str, static: dict, inits: dict, consts: dict) -> list[int] | None:
    if name in consts:
        return list(consts[name].shape)
    if name in inits:
        return list(inits[name].dims)
    return static.get(name)


def fold_constants(model: onnx.ModelProto) -> int:
    """Evaluate shape arithmetic on constants; returns how many nodes were folded."""
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    opsets = {o.domain: o.version for o in model.opset_import}
    consts: dict[str, np.ndarray] = {}
    small = {t.name for t in g.initializer if math.prod(t.dims) <= FOLD_MAX_ELEMENTS}
    init_by_name = {t.name: t for t in g.initializer}
    graph_outputs = {o.name for o in g.output}
    static = _static_shapes(model)

    def value(name: str) -> np.ndarray | None:
        if name in consts:
            return consts[name]
        if name in small:
            consts[name] = numpy_helper.to_array(init_by_name[name])
            return consts[name]
        return None

    keep, folded = [], 0
    for node in g.node:
        if node.domain not in ("", "ai.onnx") or any(o in graph_outputs for o in node.output):
            keep.append(node)
            continue
        known = _known_shape(node.input[0], static, init_by_name, consts) if node.input else None
        if node.op_type == "Shape" and known is not None:
            shape = np.asarray(known, dtype=np.int64)
            start = next((a.i for a in node.attribute if a.name == "start"), 0)
            end = next((a.i for a in node.attribute if a.name == "end"), len(shape))
            consts[node.output[0]] = shape[start:end]
            folded += 1
            continue
        if node.op_type not in _BOUNDED_OPS | _SIZED_OPS:
            keep.append(node)
            continue
        vals = [value(i) if i else None for i in node.input]
        if any(v is None for v, i in zip(vals, node.input, strict=True) if i) or not node.input:
            keep.append(node)
            continue
        try:
            if _predicted_size(node, vals) > FOLD_MAX_ELEMENTS:
                keep.append(node)
                continue
            feeds = {i: v for i, v in zip(node.input, vals, strict=True) if i}
            outs = ReferenceEvaluator(node, opsets=opsets).run(None, feeds)
        except Exception:  # leave anything the reference evaluator cannot do to the converter
            keep.append(node)
            continue
        if any(np.asarray(o).size > FOLD_MAX_ELEMENTS for o in outs):
            keep.append(node)
            continue
        for name, out in zip(node.output, outs, strict=True):
            if name:
                consts[name] = np.asarray(out)
        folded += 1
    _replace_nodes(g, keep)
    existing = {t.name for t in g.initializer}
    used = {v for n in keep for v in n.input}
    for name, arr in consts.items():
        if name not in existing and name in used:
            g.initializer.append(numpy_helper.from_array(arr, name))
    return folded


def reshape_allowzero(model: onnx.ModelProto) -> None:
    """onnx2torch refuses Reshape-14 with allowzero=1 (the dynamo exporter's default). With a constant
    shape that has no 0, allowzero does not matter, so the attribute is dropped. A shape computed at run
    time keeps allowzero=1 and is refused by the converter with its own message."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    for node in g.node:
        if node.op_type != "Reshape":
            continue
        for a in list(node.attribute):
            if a.name == "allowzero" and a.i == 1:
                shape = inits.get(node.input[1])
                if shape is not None and 0 not in numpy_helper.to_array(shape).reshape(-1).tolist():
                    node.attribute.remove(a)


def dequantize_weights(model: onnx.ModelProto) -> int:
    """Fold DequantizeLinear nodes whose inputs are all initializers; returns how many were folded. The
    output has as many elements as the quantized input, which the loader already capped."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    graph_outputs = {o.name for o in g.output}
    keep, folded = [], 0
    for node in g.node:
        ins = [i for i in node.input if i]
        foldable = (node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and ins
                    and all(i in inits for i in ins) and node.output[0] not in graph_outputs
                    and not any(a.name == "block_size" and a.i for a in node.attribute))  # fmt: skip
        if not foldable:
            keep.append(node)
            continue
        x = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zp = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32) if len(ins) > 2 else np.float32(0)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.size > 1:  # per channel: along ``axis``
            shape = [1] * x.ndim
            shape[axis % x.ndim] = scale.size
            scale = scale.reshape(shape)
            zp = np.asarray(zp).reshape(shape) if np.asarray(zp).size > 1 else zp
        value = ((x - zp) * scale).astype(np.float32)
        g.initializer.append(numpy_helper.from_array(value, node.output[0]))
        inits[node.output[0]] = g.initializer[-1]
        folded += 1
    _replace_nodes(g, keep)
    return folded


_AUTO_PAD_OPS = {"Conv", "ConvInteger", "MaxPool", "AveragePool", "LpPool"}


def explicit_same_pads(model: onnx.ModelProto) -> int:
    """Rewrite stride-1 ``auto_pad=SAME_*`` as explicit pads; returns how many nodes were rewritten."""
    inits = {t.name: t for t in model.graph.initializer}
    done = 0
    for node in model.graph.node:
        if node.op_type not in _AUTO_PAD_OPS or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: a for a in node.attribute}
        mode = attrs["auto_pad"].s.decode() if "auto_pad" in attrs else "NOTSET"
        if mode not in ("SAME_UPPER", "SAME_LOWER"):
            continue
        if "kernel_shape" in attrs:
            kernel = list(attrs["kernel_shape"].ints)
        elif len(node.input) > 1 and node.input[1] in inits:
            kernel = list(inits[node.input[1]].dims[2:])
        else:
            continue
        n = len(kernel)
        strides = list(attrs["strides"].ints) if "strides" in attrs else [1] * n
        dilations = list(attrs["dilations"].ints) if "dilations" in attrs else [1] * n
        if any(s != 1 for s in strides):
            continue
        totals = [d * (k - 1) for k, d in zip(kernel, dilations, strict=True)]
        small = [t // 2 for t in totals]
        big = [t - t // 2 for t in totals]
        begin, end = (small, big) if mode == "SAME_UPPER" else (big, small)
        node.attribute.remove(attrs["auto_pad"])
        if "pads" in attrs:
            node.attribute.remove(attrs["pads"])
        node.attribute.append(helper.make_attribute("pads", begin + end))
        done += 1
    return done


def remove_dead(model: onnx.ModelProto) -> None:
    from converters.truncate import needed_nodes

    g = model.graph
    idx = set(needed_nodes(g, [o.name for o in g.output]))
    _replace_nodes(g, [n for i, n in enumerate(g.node) if i in idx])
    used = {v for n in g.node for v in n.input} | {o.name for o in g.output}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    # Initializers listed as graph inputs (IR < 4 style) are constants, not inputs the user feeds.
    init_names = {t.name for t in g.initializer}
    inputs = [vi for vi in g.input if vi.name not in init_names and vi.name in used]
    del g.input[:]
    g.input.extend(inputs)
    names = {v for n in g.node for v in list(n.input) + list(n.output)}
    vis = [vi for vi in g.value_info if vi.name in names]
    del g.value_info[:]
    g.value_info.extend(vis)


def normalize(model: onnx.ModelProto, copy: bool = True) -> onnx.ModelProto:
    """The normalized model. ``copy=False`` rewrites ``model`` in place (load_model owns its proto and
    saves a full copy of the weights that way)."""
    model = inline_functions(model)
    if copy:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    else:
        out = model
    constants_to_initializers(out)
    fold_identities(out)
    # Folding makes more shapes static (a Pad whose pads were computed), which lets more Shape nodes
    # fold: repeat until nothing changes (bounded; each round only removes nodes).
    for _ in range(32):
        if not fold_constants(out):
            break
    reshape_allowzero(out)
    dequantize_weights(out)
    explicit_same_pads(out)
    remove_dead(out)
    try:
        onnx.checker.check_model(skeleton(out))
    except onnx.checker.ValidationError as exc:  # a bug of ours, but say so rather than crash later
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"graph normalization produced an invalid graph: {first}") from exc
    with_inferred_shapes(out)
    return out


def with_inferred_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store shapes (ranks at least) for every value. Some onnx2torch converters read the input's rank
    from value_info and silently misbehave without it (GlobalAveragePool averages over *all* axes when
    the rank is unknown), and plain inference loses ranks after a Reshape whose shape is computed:
    data propagation recovers them. Updates ``model`` in place and returns it."""
    m = skeleton(model)
    del m.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(m, check_type=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ModelError(f"ONNX shape inference fails on the model: {first}") from exc
    # in place: the value_info is small, the weights are not worth a copy
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model
