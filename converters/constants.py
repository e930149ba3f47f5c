"""Constant inputs of ONNX nodes, read at conversion time (so forward passes never read them)."""

from __future__ import annotations

import torch
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.utils.common import get_const_value


def const_list(name: str, graph: OnnxGraph) -> list | None:
    """A constant input as a flat Python list, or None when it is absent or computed at run time."""
    if not name:
        return None
    try:
        value = get_const_value(name, graph)
    except KeyError:
        return None
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).tolist()
    return list(value) if isinstance(value, (list, tuple)) else [value]
