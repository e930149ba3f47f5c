"""LSTM, GRU and RNN against onnxruntime: every direction, both layouts, initial states, sequence_lens,
peepholes, clip, input_forget, linear_before_reset and custom activations; gradients; and a CRNN text
recognizer exported from torch (conv + bidirectional LSTM + Linear) served end to end."""

from __future__ import annotations

import io
import itertools
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from onnx2torch import convert
from torch import nn

from converters.model import load_model
from converters.parity import probe_images
from tests.converters._one_node import against_onnxruntime, graph

torch.set_num_threads(1)
T, B, I, H = 5, 3, 4, 6
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_model(kind: str, direction: str = "forward", layout: int = 0, states: bool = False,
                    lens: list[int] | None = None, peepholes: bool = False, opset: int = 14,
                    **attrs: object) -> tuple[onnx.ModelProto, np.ndarray]:  # fmt: skip
    """One ``kind`` node over x, with every optional input the flags ask for, and its outputs."""
    rng = np.random.default_rng(abs(hash((kind, direction, layout, states, str(lens), peepholes))) % 2**32)
    d = 2 if direction == "bidirectional" else 1
    g = GATES[kind]

    def init(name: str, *shape: int, s: float = 0.5) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name)

    inits = [init("W", d, g * H, I), init("R", d, g * H, H), init("B", d, 2 * g * H)]
    inputs = ["x", "W", "R", "B"]
    if lens is not None:
        inits.append(numpy_helper.from_array(np.array(lens, np.int32), "lens"))
    inputs.append("lens" if lens is not None else "")
    state_shape = (B, d, H) if layout == 1 else (d, B, H)
    if states:
        inits.append(init("h0", *state_shape))
        inputs.append("h0")
        if kind == "LSTM":
            inits.append(init("c0", *state_shape))
            inputs.append("c0")
    elif kind == "LSTM" and peepholes:
        inputs += ["", ""]
    if peepholes:
        inits.append(init("P", d, 3 * H))
        inputs.append("P")
    while inputs and not inputs[-1]:
        inputs.pop()
    outs = ["y", "y_h", "y_c"] if kind == "LSTM" else ["y", "y_h"]
    if layout:
        attrs["layout"] = 1
    node = helper.make_node(kind, inputs, outs, hidden_size=H, direction=direction, **attrs)
    x_shape = (B, T, I) if layout == 1 else (T, B, I)
    model = graph(node, opset, x_shape, inits, outputs=outs, ir_version=8)
    return model, rng.standard_normal(x_shape).astype(np.float32)


# onnxruntime refuses layout 1 ("Batchwise recurrent operations (layout == 1) are not supported"): those
# are checked against onnx's reference implementation below.
CASES = list(itertools.product(["LSTM", "GRU", "RNN"], ["forward", "reverse", "bidirectional"], [0]))


@pytest.mark.parametrize(("kind", "direction", "layout"), CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_directions_layouts_states_and_lengths(kind: str, direction: str, layout: int) -> None:
    for states, lens in ((False, None), (True, [T, 2, 4])):
        model, x = recurrent_model(kind, direction, layout, states=states, lens=lens)
        compared = against_onnxruntime(model, x)
        compared.assert_close(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "direction"), list(itertools.product(["LSTM", "GRU", "RNN"], ["reverse", "bidirectional"]))
)
def test_batch_first_layout_against_onnx_reference(kind: str, direction: str) -> None:
    from onnx.reference import ReferenceEvaluator

    model, x = recurrent_model(kind, direction, layout=1, states=True)
    want = ReferenceEvaluator(model).run(None, {"x": x})
    out = convert(model)(torch.from_numpy(x))
    for got, ref in zip(out, want, strict=True):
        np.testing.assert_allclose(got.detach().numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "attrs"),
    [
        ("LSTM", {"clip": 0.7}),
        ("LSTM", {"input_forget": 1}),
        (
            "LSTM",
            {
                "activations": ["HardSigmoid", "LeakyRelu", "ScaledTanh"],
                "activation_alpha": [0.3, 0.2, 0.8],
                "activation_beta": [0.4, 1.5],
            },
        ),  # fmt: skip
        ("GRU", {"linear_before_reset": 1}),
        ("GRU", {"clip": 0.5, "linear_before_reset": 1}),
        (
            "GRU",
            {
                "activations": ["Sigmoid", "Softsign", "HardSigmoid", "Elu"],
                "activation_alpha": [0.25, 0.6],
                "activation_beta": [0.45],
            },
        ),  # fmt: skip
        ("RNN", {"activations": ["Relu"]}),
        (
            "RNN",
            {"activations": ["Affine", "ThresholdedRelu"], "activation_alpha": [0.7, 0.1], "activation_beta": [0.2]},
        ),  # fmt: skip
        ("RNN", {"activations": ["Softplus"], "clip": 1.5}),
    ],
)
def test_attributes_and_activations(kind: str, attrs: dict) -> None:
    per_direction = {"LSTM": 3, "GRU": 2, "RNN": 1}[kind]  # a list twice as long covers both directions
    direction = "bidirectional" if len(attrs.get("activations", [])) == 2 * per_direction else "forward"
    model, x = recurrent_model(kind, direction, states=True, lens=[T, 3, 1], **attrs)
    against_onnxruntime(model, x).assert_close(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_lstm_peepholes(direction: str) -> None:
    model, x = recurrent_model("LSTM", direction, states=True, lens=[4, T, 2], peepholes=True)
    against_onnxruntime(model, x).assert_close(rtol=1e-5, atol=1e-5)
    model, x = recurrent_model("LSTM", direction, peepholes=True)  # peepholes without states
    against_onnxruntime(model, x).assert_close(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kind", "opset"), list(itertools.product(["LSTM", "GRU", "RNN"], [7, 22])))
def test_other_opsets(kind: str, opset: int) -> None:
    model, x = recurrent_model(kind, "bidirectional", states=True, lens=[T, 2, 3], opset=opset)
    against_onnxruntime(model, x).assert_close(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_gradient_matches_finite_differences(kind: str) -> None:
    model, x = recurrent_model(kind, "bidirectional", states=True, lens=[T, 2, 4])
    module = against_onnxruntime(model, x).module.double()
    xt = torch.from_numpy(x).double().requires_grad_(True)

    def loss(inp: torch.Tensor) -> torch.Tensor:
        out = module(inp)
        return sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)).sum() for o in out)

    assert torch.autograd.gradcheck(loss, (xt,), eps=1e-6, atol=1e-6)
    loss(xt).backward()
    # a padded step (past its sequence's length) does not influence anything
    assert float(xt.grad[3:, 1].abs().max()) == 0.0 and float(xt.grad[:, 0].abs().max()) > 0


class _CRNN(nn.Module):
    """Grey text line → conv features → columns as a sequence → bidirectional LSTM → per-column logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d((4, 1)))  # fmt: skip
        self.rnn = nn.LSTM(16 * 2, 12, bidirectional=True)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x)  # [N, 16, 2, W/2]
        seq = f.flatten(1, 2).permute(2, 0, 1)  # [W/2, N, 32]
        y, _ = self.rnn(seq)
        return self.fc(y)


def test_crnn_recognizer_is_served() -> None:
    torch.manual_seed(0)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_CRNN().eval(), (torch.randn(1, 1, 16, 32),), f, dynamo=False, opset_version=17,
                          input_names=["image"])  # fmt: skip
    model = load_model(f.getvalue())
    assert "LSTM" in {n.op_type for n in model.onnx.graph.node}
    assert model.parity.ok, model.parity.summary()
    x = probe_images(1, 16, 32).requires_grad_(True)
    model.representation(model.output_tap)(x)[5, 0, 3].backward()
    assert float(x.grad.abs().max()) > 0
