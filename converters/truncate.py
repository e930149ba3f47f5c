"""Truncation: the part of a graph that given values depend on, as a stand-alone ONNX model."""

from __future__ import annotations

import operator

import onnx
import torch
import torch.fx
from onnx import helper


def needed_nodes(graph: onnx.GraphProto, outputs: list[str]) -> list[int]:
    """Indices (in graph order) of the nodes that ``outputs`` depend on."""
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if out:
                producer[out] = i
    keep: set[int] = set()
    stack = [o for o in outputs if o in producer]
    while stack:
        i = producer[stack.pop()]
        if i in keep:
            continue
        keep.add(i)
        stack.extend(v for v in graph.node[i].input if v in producer and producer[v] not in keep)
    return sorted(keep)


def extract_subgraph(model: onnx.ModelProto, input_name: str, outputs: list[str]) -> onnx.ModelProto:
    """The nodes, initializers and input that ``outputs`` need; the graph input keeps its declared type
    (so a dynamic H×W stays dynamic)."""
    g = model.graph
    idx = needed_nodes(g, outputs)
    nodes = [g.node[i] for i in idx]
    used = {v for n in nodes for v in n.input} | set(outputs)
    inits = [t for t in g.initializer if t.name in used]
    infos = {vi.name: vi for vi in list(g.value_info) + list(g.output)}
    out_infos = []
    for name in outputs:
        vi = infos.get(name)
        out_infos.append(vi if vi is not None else helper.make_empty_tensor_value_info(name))
    inputs = [vi for vi in g.input if vi.name == input_name]
    value_info = [vi for vi in g.value_info if vi.name in used and vi.name not in outputs]
    sub = helper.make_graph(nodes, f"{g.name or 'graph'}_to_{len(outputs)}", inputs, out_infos, inits,
                            value_info=value_info)
    out = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.producer_name = model.producer_name
    return out


def truncate_fx(full: torch.fx.GraphModule, value_name: str) -> torch.fx.GraphModule:
    """The part of ``full`` (converted with ``attach_onnx_mapping=True``) that computes ONNX value
    ``value_name``, as a GraphModule whose submodules are *shared* with ``full`` (no weight copies).
    Dead-code elimination drops every node the value does not depend on, so only the prefix runs."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(full.graph, env, return_output_node=False)
    del out
    target = None
    for node in full.graph.nodes:
        if node.op != "call_module":
            continue
        mapping = getattr(full.get_submodule(node.target), "onnx_mapping", None)
        if mapping is None or value_name not in mapping.outputs:
            continue
        target = env[node]
        if len(mapping.outputs) > 1:
            target = graph.call_function(operator.getitem, (target, mapping.outputs.index(value_name)))
        break
    if target is None:
        raise KeyError(f"value {value_name!r} is not computed by the converted graph")
    for node in list(graph.nodes):
        if node.op == "output":
            graph.erase_node(node)
    graph.output(target)
    module = torch.fx.GraphModule(full, graph)
    module.graph.eliminate_dead_code()  # needs the owning module for its purity checks
    module.delete_all_unused_submodules()
    module.graph.lint()
    module.recompile()
    return module
