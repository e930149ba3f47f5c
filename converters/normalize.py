"""Graph normalization before conversion: the shapes onnx2torch handles best.

1. Local functions inlined (the dynamo exporter can emit them).
2. Constant nodes → initializers (third-party exporters store weights that way; onnx2torch's Conv/Gemm
   converters only look at initializers).
3. Identity nodes folded away (exporters emit Identity chains when they deduplicate equal tensors).
4. Dead nodes and unused initializers removed.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper


def inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    if len(model.functions):
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    return model


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
            elif a.name == "sparse_value":
                keep.append(node)
                continue
            else:
                import numpy as np

                dtype = {"value_float": np.float32, "value_floats": np.float32,
                         "value_int": np.int64, "value_ints": np.int64}.get(a.name)
                if dtype is None:  # value_string(s): leave to the converter
                    keep.append(node)
                    continue
                t = numpy_helper.from_array(np.asarray(value, dtype=dtype))
            t.name = node.output[0]
            g.initializer.append(t)
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)


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
    del g.node[:]
    g.node.extend(keep)


def remove_dead(model: onnx.ModelProto) -> None:
    from converters.truncate import needed_nodes

    g = model.graph
    idx = set(needed_nodes(g, [o.name for o in g.output]))
    nodes = [n for i, n in enumerate(g.node) if i in idx]
    del g.node[:]
    g.node.extend(nodes)
    used = {v for n in g.node for v in n.input} | {o.name for o in g.output}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    # Initializers listed as graph inputs (IR < 4 style) are constants, not inputs the user feeds.
    init_names = {t.name for t in g.initializer}
    inputs = [vi for vi in g.input if vi.name not in init_names and (vi.name in used)]
    del g.input[:]
    g.input.extend(inputs)
    names = {v for n in g.node for v in list(n.input) + list(n.output)}
    vis = [vi for vi in g.value_info if vi.name in names]
    del g.value_info[:]
    g.value_info.extend(vis)


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    model = inline_functions(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    constants_to_initializers(out)
    fold_identities(out)
    remove_dead(out)
    return out
