"""Freeze constant arguments of onnx2torch modules that read them on the host in ``forward``.

onnx2torch's Pad-11/13 and Split-13 converters take pads / split sizes as tensor inputs and call
``.tolist()`` on them at every call: a host sync per step on a GPU and a graph break under
``torch.compile``. After normalization those inputs are usually initializers, so the converted graph
feeds them from constant buffers; this pass replaces such modules by static equivalents from
converters/ops.py. (Resize, ScatterND and dynamic-axes Unsqueeze still read on the host: see
docs/converters.md.)
"""

from __future__ import annotations

import torch
from onnx2torch.node_converters.pad import OnnxPadDynamic
from onnx2torch.node_converters.split import OnnxSplit13
from torch import fx

from converters.ops import Pad, SplitSizes


def _constant(gm: fx.GraphModule, arg) -> torch.Tensor | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return gm.get_buffer(arg.target) if "." in arg.target else getattr(gm, arg.target)
    return None


def _static_pad(module: OnnxPadDynamic, node: fx.Node, gm: fx.GraphModule) -> torch.nn.Module | None:
    pads = _constant(gm, node.args[1]) if len(node.args) > 1 else None
    value_arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("constant_value")
    value = 0.0 if value_arg is None else _constant(gm, value_arg)
    if pads is None or value is None or node.kwargs.keys() - {"constant_value"}:
        return None
    onnx_pads = [int(p) for p in pads.tolist()]
    half = len(onnx_pads) // 2
    torch_pads: list[int] = []
    for begin, end in zip(reversed(onnx_pads[:half]), reversed(onnx_pads[half:]), strict=True):
        torch_pads += [begin, end]
    if module.mode != "constant":
        if any(torch_pads[-4:]):  # non-constant modes pad spatial axes only
            return None
        torch_pads = torch_pads[:-4]
    return Pad(torch_pads, module.mode, float(value) if not isinstance(value, float) else value)


def _static_split(module: OnnxSplit13, node: fx.Node, gm: fx.GraphModule) -> torch.nn.Module | None:
    split = _constant(gm, node.args[1]) if len(node.args) > 1 else None
    if split is None or node.kwargs:
        return None
    return SplitSizes(module.axis, [int(s) for s in split.tolist()], module.num_splits)


_HANDLERS = {OnnxPadDynamic: _static_pad, OnnxSplit13: _static_split}


def freeze_constant_args(gm: fx.GraphModule) -> int:
    """Replace host-reading modules whose extra inputs are constant buffers; returns how many."""
    replaced = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        handler = _HANDLERS.get(type(module))
        new = handler(module, node, gm) if handler else None
        if new is None:
            continue
        new.onnx_mapping = getattr(module, "onnx_mapping", None)  # truncation looks values up by it
        setattr(gm, node.target, new)
        node.args, node.kwargs = (node.args[0],), {}
        replaced += 1
    if replaced:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return replaced
