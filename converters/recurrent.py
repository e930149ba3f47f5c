"""LSTM, GRU and RNN (opsets 7 and 14) as differentiable torch modules, step by step, as ONNX defines them.

Everything the ONNX spec and onnxruntime's CPU kernels support: directions forward, reverse and
bidirectional; initial states (``initial_h``, ``initial_c``); ``sequence_lens`` (steps past a sequence's
length leave its state alone and output zeros, a reverse pass starts at its last valid step); peepholes
``P``; ``clip`` (applied to every gate's pre-activation); LSTM's ``input_forget`` (f = 1 − i); GRU's
``linear_before_reset``; ``layout`` 0 (sequence first) and 1 (batch first, opset 14); and every
activation function of the spec with its ``activation_alpha``/``activation_beta``.

Not torch's ``nn.LSTM``: its gate order, bias handling and missing features (peepholes, clip,
sequence_lens, custom activations) would each need a translation; an explicit loop over time is exact,
differentiable, and the sequences of vision models (a text line's columns) are short.

``activation_alpha`` and ``activation_beta`` are consumed in the order of the activation list by the
functions that take them (Affine, LeakyRelu, ThresholdedRelu, ScaledTanh, HardSigmoid, Elu); a function
without a given value takes the ONNX operator's default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from onnx2torch.node_converters.registry import add_converter
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OnnxToTorchModule, OperationConverterResult
from torch import nn

# activation name (lower case) → (uses alpha, uses beta, default alpha, default beta)
_ACT_PARAMS: dict[str, tuple[bool, bool, float, float]] = {
    "relu": (False, False, 0.0, 0.0),
    "tanh": (False, False, 0.0, 0.0),
    "sigmoid": (False, False, 0.0, 0.0),
    "softsign": (False, False, 0.0, 0.0),
    "softplus": (False, False, 0.0, 0.0),
    "affine": (True, True, 1.0, 0.0),
    "leakyrelu": (True, False, 0.01, 0.0),
    "thresholdedrelu": (True, False, 1.0, 0.0),
    "scaledtanh": (True, True, 1.0, 1.0),
    "hardsigmoid": (True, True, 0.2, 0.5),
    "elu": (True, False, 1.0, 0.0),
}
_DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _activation(name: str, alpha: float, beta: float) -> Callable[[torch.Tensor], torch.Tensor]:
    n = name.lower()
    if n == "relu":
        return torch.relu
    if n == "tanh":
        return torch.tanh
    if n == "sigmoid":
        return torch.sigmoid
    if n == "softsign":
        return F.softsign
    if n == "softplus":
        return F.softplus
    if n == "affine":
        return lambda x: alpha * x + beta
    if n == "leakyrelu":
        return lambda x: F.leaky_relu(x, alpha)
    if n == "thresholdedrelu":
        return lambda x: torch.where(x > alpha, x, torch.zeros_like(x))
    if n == "scaledtanh":
        return lambda x: alpha * torch.tanh(beta * x)
    if n == "hardsigmoid":
        return lambda x: torch.clamp(alpha * x + beta, 0.0, 1.0)
    if n == "elu":
        return lambda x: F.elu(x, alpha)
    raise NotImplementedError(f"recurrent activation {name!r} is not supported")


def activations(kind: str, node: OnnxNode, num_directions: int) -> list[list[tuple[str, float, float]]]:
    """Per direction, the (name, alpha, beta) of each activation function of ``kind``."""
    per = len(_DEFAULT_ACTS[kind])
    names = [a.decode() if isinstance(a, bytes) else str(a) for a in node.attributes.get("activations", [])]
    if not names:
        names = _DEFAULT_ACTS[kind] * num_directions
    elif len(names) == per and num_directions == 2:
        names = names * 2  # one list given for both directions
    if len(names) != per * num_directions:
        raise NotImplementedError(f"{kind} needs {per * num_directions} activations, the node gives {len(names)}")
    alphas = list(node.attributes.get("activation_alpha", []))
    betas = list(node.attributes.get("activation_beta", []))
    out: list[tuple[str, float, float]] = []
    for name in names:
        key = name.lower()
        if key not in _ACT_PARAMS:
            raise NotImplementedError(f"{kind} activation {name!r} is not supported")
        uses_a, uses_b, da, db = _ACT_PARAMS[key]
        a = float(alphas.pop(0)) if uses_a and alphas else da
        b = float(betas.pop(0)) if uses_b and betas else db
        out.append((key, a, b))
    return [out[i * per : (i + 1) * per] for i in range(num_directions)]


class Recurrent(nn.Module, OnnxToTorchModule):
    """One ONNX LSTM/GRU/RNN node. Inputs in ONNX order; outputs (Y, Y_h[, Y_c]) as many as the node has."""

    def __init__(
        self,
        kind: str,
        hidden: int,
        direction: str,
        acts: list[list[tuple[str, float, float]]],
        clip: float | None,
        layout: int,
        n_outputs: int,
        linear_before_reset: bool = False,
        input_forget: bool = False,
    ):
        super().__init__()
        self.kind = kind
        self.hidden = hidden
        self.direction = direction
        self.acts_spec = acts
        self.acts = [[_activation(*a) for a in per_dir] for per_dir in acts]
        self.clip = clip
        self.layout = layout
        self.n_outputs = n_outputs
        self.linear_before_reset = linear_before_reset
        self.input_forget = input_forget

    def extra_repr(self) -> str:
        return f"{self.kind}, hidden={self.hidden}, direction={self.direction}, layout={self.layout}"

    def _pre(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-self.clip, self.clip) if self.clip is not None else x

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        r: torch.Tensor,
        b: torch.Tensor | None = None,
        sequence_lens: torch.Tensor | None = None,
        initial_h: torch.Tensor | None = None,
        initial_c: torch.Tensor | None = None,
        p: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if self.layout == 1:  # batch first: [B, T, I] → [T, B, I]; states [B, D, H] → [D, B, H]
            x = x.transpose(0, 1)
            initial_h = initial_h.transpose(0, 1) if initial_h is not None else None
            initial_c = initial_c.transpose(0, 1) if initial_c is not None else None
        batch = x.shape[1]
        n_dir = 2 if self.direction == "bidirectional" else 1
        if sequence_lens is not None:
            lens = sequence_lens.to(device=x.device, dtype=torch.int64).reshape(batch)
        else:
            lens = None
        ys, hs, cs = [], [], []
        for d in range(n_dir):
            reverse = self.direction == "reverse" or d == 1
            h0 = initial_h[d] if initial_h is not None else x.new_zeros(batch, self.hidden)
            c0 = initial_c[d] if initial_c is not None else x.new_zeros(batch, self.hidden)
            y, h, c = self._direction(x, w[d], r[d], None if b is None else b[d], None if p is None else p[d], h0, c0,
                                      lens, reverse, self.acts[d])  # fmt: skip
            ys.append(y)
            hs.append(h)
            cs.append(c)
        y_all = torch.stack(ys, dim=1)  # [T, D, B, H]
        h_all = torch.stack(hs, dim=0)  # [D, B, H]
        c_all = torch.stack(cs, dim=0)
        if self.layout == 1:
            y_all = y_all.permute(2, 0, 1, 3)  # [B, T, D, H]
            h_all = h_all.transpose(0, 1)
            c_all = c_all.transpose(0, 1)
        outs = (y_all, h_all, c_all)[: self.n_outputs]
        return outs[0] if self.n_outputs == 1 else outs

    def _direction(self, x, w, r, b, p, h, c, lens, reverse, acts):
        hid, g = self.hidden, _GATES[self.kind]
        wb = b[: g * hid] if b is not None else None
        rb = b[g * hid :] if b is not None else None
        xw = x @ w.transpose(0, 1)  # [T, B, g·H], all steps at once
        if wb is not None:
            xw = xw + wb
        order = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
        out: list[torch.Tensor | None] = [None] * x.shape[0]
        for t in order:
            h_new, c_new = self._cell(xw[t], h, c, r, rb, p, acts)
            if lens is not None:
                valid = (t < lens).unsqueeze(1)
                h = torch.where(valid, h_new, h)
                c = torch.where(valid, c_new, c) if c_new is not None else c
                out[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
            else:
                h = h_new
                c = c_new if c_new is not None else c
                out[t] = h_new
        return torch.stack(out, dim=0), h, c

    def _cell(self, xw, h, c, r, rb, p, acts):
        hid = self.hidden
        hr = h @ r.transpose(0, 1)
        if self.kind == "RNN":
            pre = xw + hr + (rb if rb is not None else 0)
            return acts[0](self._pre(pre)), None
        if self.kind == "GRU":
            f, g = acts
            rbz = rb if rb is not None else torch.zeros(3 * hid, dtype=h.dtype, device=h.device)
            z = f(self._pre(xw[:, :hid] + hr[:, :hid] + rbz[:hid]))
            rr = f(self._pre(xw[:, hid : 2 * hid] + hr[:, hid : 2 * hid] + rbz[hid : 2 * hid]))
            if self.linear_before_reset:
                cand = xw[:, 2 * hid :] + rr * (hr[:, 2 * hid :] + rbz[2 * hid :])
            else:
                cand = xw[:, 2 * hid :] + (rr * h) @ r[2 * hid :].transpose(0, 1) + rbz[2 * hid :]
            hh = g(self._pre(cand))
            return (1 - z) * hh + z * h, None
        f, g, hact = acts
        pre = xw + hr + (rb if rb is not None else 0)
        pi, po, pf = (p[:hid], p[hid : 2 * hid], p[2 * hid :]) if p is not None else (None, None, None)
        i_pre = pre[:, :hid] + (pi * c if pi is not None else 0)
        i = f(self._pre(i_pre))
        if self.input_forget:
            fg = 1 - i
        else:
            fg = f(self._pre(pre[:, 2 * hid : 3 * hid] + (pf * c if pf is not None else 0)))
        cc = g(self._pre(pre[:, 3 * hid :]))
        c_new = fg * c + i * cc
        o = f(self._pre(pre[:, hid : 2 * hid] + (po * c_new if po is not None else 0)))
        return o * hact(c_new), c_new


def _converter(kind: str) -> Callable[[OnnxNode, OnnxGraph], OperationConverterResult]:
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        a = node.attributes
        direction = a.get("direction", "forward")
        direction = direction.decode() if isinstance(direction, bytes) else str(direction)
        if direction not in ("forward", "reverse", "bidirectional"):
            raise NotImplementedError(f"{kind} direction {direction!r} is not supported")
        n_dir = 2 if direction == "bidirectional" else 1
        hidden = a.get("hidden_size")
        if hidden is None:
            w = graph.initializers.get(node.input_values[1])
            if w is None:
                raise NotImplementedError(f"{kind} without hidden_size and with a computed W is not supported")
            hidden = int(w.to_torch().shape[1]) // _GATES[kind]
        clip = a.get("clip")
        outputs = list(node.output_values)
        while outputs and not outputs[-1]:
            outputs.pop()
        module = Recurrent(
            kind,
            int(hidden),
            direction,
            activations(kind, node, n_dir),
            float(clip) if clip is not None else None,
            int(a.get("layout", 0)),
            max(len(outputs), 1),
            linear_before_reset=bool(a.get("linear_before_reset", 0)),
            input_forget=bool(a.get("input_forget", 0)),
        )
        mapping = OnnxMapping(inputs=tuple(node.input_values), outputs=tuple(outputs) or tuple(node.output_values[:1]))
        return OperationConverterResult(module, mapping)

    return convert


# 22 only added bfloat16 and float16 types; the semantics are those of 14
VERSIONS = {"LSTM": [7, 14, 22], "GRU": [7, 14, 22], "RNN": [7, 14, 22]}


def register(added: list[tuple[str, int, str]], registered: Callable[[str, int], bool]) -> None:
    """Register the three converters with onnx2torch (skipping any version it has itself)."""
    for kind, versions in VERSIONS.items():
        for v in versions:
            if registered(kind, v):
                continue
            add_converter(operation_type=kind, version=v)(_converter(kind))
            added.append((kind, v, "full spec (converters/recurrent.py)"))
