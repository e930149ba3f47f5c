"""Gradients where the forward function has none: straight-through rounding and soft surrogates.

Round, Floor, Ceil and Sign are piecewise constant: their true derivative is zero almost everywhere, so a
minimizer looking through them is blind. Their converters here (in place of onnx2torch's) compute the
same values and pass the gradient straight through: identity for Round/Floor/Ceil, and for Sign the
derivative of its clipped-linear relaxation (1 on [−1, 1], 0 outside), as binarized networks train.

A hard assignment buried in a graph (HOG's choice of an orientation bin, made of comparisons) cannot be
recognized op by op. A model can name a smooth surrogate of its output instead: the shallow HOG models
of ``converters/shallow`` carry their parameters in ``preimage.shallow``, and HOG with hard orientation
assignment has HOGb (the same features with bilinear orientation weights) as its surrogate. The output's
representation then returns HOG's values with HOGb's gradient, ``s + (y − s).detach()``: every value a
caller sees (targets, feature errors, parity) is HOG's own, the descent direction is HOGb's.
Only a ``preimage.shallow`` entry equal to one of ``SHALLOW_MODELS`` (name, class and parameters) is
honoured, so an upload cannot make us build anything else.
"""

from __future__ import annotations

import json

import onnx
import torch
from onnx2torch.node_converters.registry import _CONVERTER_REGISTRY, OperationDescription
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node
from torch import nn

# shallow model → the model whose gradient stands in for its own
SURROGATE_OF = {"hog": "hogb"}


class StraightThrough(nn.Module, OnnxToTorchModule):
    """A piecewise-constant op whose backward pass is the identity (Sign: clipped identity)."""

    def __init__(self, op_type: str):
        super().__init__()
        self.op_type = op_type
        self.fn = {"Round": torch.round, "Floor": torch.floor, "Ceil": torch.ceil, "Sign": torch.sign}[op_type]

    def extra_repr(self) -> str:
        return self.op_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            return self.fn(x)
        if self.op_type == "Sign":
            soft = x.clamp(-1.0, 1.0)
            return soft + (torch.sign(x) - soft).detach()
        return x + (self.fn(x) - x).detach()


VERSIONS = {"Round": [11, 22], "Floor": [6, 13], "Ceil": [6, 13], "Sign": [9, 13]}


def _convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return OperationConverterResult(StraightThrough(node.operation_type), onnx_mapping_from_node(node=node))


def register(added: list[tuple[str, int, str]]) -> None:
    """Install the straight-through converters in onnx2torch's registry, in place of its own."""
    for op, versions in VERSIONS.items():
        for v in versions:
            _CONVERTER_REGISTRY[OperationDescription(domain=onnx.defs.ONNX_DOMAIN, operation_type=op, version=v)] = (
                _convert
            )
            added.append((op, v, "straight-through gradient (converters/surrogates.py)"))


def output_surrogate(model: onnx.ModelProto) -> nn.Module | None:
    """The torch module whose gradient stands in for the model output's, or None. It maps the model's
    input (after preprocessing) to a tensor of the output's shape."""
    from converters.shallow.export import SHALLOW_MODELS

    meta = {p.key: p.value for p in model.metadata_props}
    try:
        info = json.loads(meta.get("preimage.shallow", "null"))
    except ValueError:
        return None
    if not isinstance(info, dict):
        return None
    spec = SHALLOW_MODELS.get(str(info.get("name")))
    if spec is None or info.get("class") != spec.cls or info.get("params") != spec.params:
        return None
    surrogate = SURROGATE_OF.get(spec.name)
    if surrogate is None:
        return None
    module = SHALLOW_MODELS[surrogate].build()
    module.requires_grad_(False)
    return module


class WithSurrogateGradient(nn.Module):
    """``graph``'s values with ``surrogate``'s gradient: ``s + (y − s).detach()``."""

    def __init__(self, graph: nn.Module, surrogate: nn.Module):
        super().__init__()
        self.graph = graph
        self.surrogate = surrogate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.graph(x)
        if not torch.is_grad_enabled() or not x.requires_grad:
            return y
        s = self.surrogate(x)
        if s.shape != y.shape:
            raise ValueError(f"the gradient surrogate's output {list(s.shape)} differs from {list(y.shape)}")
        return s + (y - s).detach()
