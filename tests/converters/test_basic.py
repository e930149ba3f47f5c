"""Basic contract of converters/: load a legacy-exported resnet18, taps, truncation, parity, gradients."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from converters.errors import UnknownTap
from converters.model import load_model
from converters.representation import Preprocess
from converters.spec import Preprocessing
from converters.truncate import extract_subgraph

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def resnet18_bytes() -> bytes:
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None).eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, (torch.randn(1, 3, 64, 64),), f, dynamo=False, opset_version=17,
                          input_names=["input"], dynamic_axes={"input": {0: "b", 2: "h", 3: "w"}})
    return f.getvalue()


def _ort(model, tap_name: str, inp: np.ndarray) -> np.ndarray:
    sub = extract_subgraph(model.onnx, model.input_name, [tap_name])
    sess = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {model.input_name: inp})[0]


def test_resnet18_taps_and_geometry(resnet18_bytes: bytes) -> None:
    cm = load_model(resnet18_bytes)
    assert cm.preprocessing.height is None and cm.preprocessing.layout == "NCHW"
    first = cm.taps[0]
    assert (first.op_type, first.stride, first.receptive_field) == ("Conv", 2, 7)
    maxpool = cm.tap("/maxpool/MaxPool")
    assert (maxpool.stride, maxpool.receptive_field) == (4, 11)
    last_conv_block = cm.tap("/layer4/layer4.1/relu_1/Relu")
    assert last_conv_block.stride == 32 and not last_conv_block.is_global
    assert cm.output_tap.is_global and cm.output_tap.shape == (1000,)
    with pytest.raises(UnknownTap, match="layer1"):
        cm.tap("layer1/relu")


def test_resnet18_parity_truncation_gradient(resnet18_bytes: bytes) -> None:
    cm = load_model(resnet18_bytes)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64) * 60
    inp = cm.to_model_input(x)
    for alias in ["/layer1/layer1.0/conv1/Conv", "/layer2/layer2.1/relu/Relu", cm.output_tap.alias]:
        rep = cm.representation(alias)
        y = rep(x).detach().numpy()
        ref = _ort(cm, cm.tap(alias).name, inp)
        assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-4
    early = cm.representation("/layer1/layer1.0/conv1/Conv")
    # truncation: the early tap's module holds only the stem's parameters, not the whole net
    n_early = sum(b.numel() for b in early.buffers()) + sum(p.numel() for p in early.parameters())
    n_full = sum(b.numel() for b in cm.representation(cm.output_tap).buffers()) + sum(
        p.numel() for p in cm.representation(cm.output_tap).parameters())
    assert n_early < n_full / 50
    assert all(not p.requires_grad for p in early.parameters())
    assert cm.representation(alias) is cm.representation(alias)  # cached
    xg = x.clone().requires_grad_(True)
    cm.representation(cm.output_tap)(xg).square().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_preprocessing_arithmetic() -> None:
    pre = Preprocessing(mean=(103.94, 116.78, 123.68), std=(1, 1, 1), scale=1.0, channel_order="BGR")
    assert pre.mean_rgb255 == pytest.approx((123.68, 116.78, 103.94))
    assert Preprocessing().mean_rgb255 == pytest.approx((0.485 * 255, 0.456 * 255, 0.406 * 255))


_pos = st.floats(0.05, 3.0)
_mean = st.floats(-1.0, 200.0)


@settings(max_examples=60, deadline=None)
@given(order=st.sampled_from(["RGB", "BGR", "GRAY"]), layout=st.sampled_from(["NCHW", "NHWC"]),
       scale=st.sampled_from([1 / 255, 1.0, 2 / 255]), mean=st.tuples(_mean, _mean, _mean),
       std=st.tuples(_pos, _pos, _pos), seed=st.integers(0, 2**16))
def test_preprocess_matches_the_formula(order, layout, scale, mean, std, seed) -> None:
    n = 1 if order == "GRAY" else 3
    pre = Preprocessing(mean=mean[:n], std=std[:n], scale=scale, channel_order=order, layout=layout)
    pixels = torch.rand(2, 3, 5, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 255
    x = (pixels - torch.tensor(pre.mean_rgb255, dtype=torch.float64).view(1, 3, 1, 1)).float()
    got = Preprocess(pre)(x).double()
    if order == "GRAY":
        chans = (0.299 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2]).unsqueeze(1)
    else:
        chans = pixels.flip(1) if order == "BGR" else pixels
    want = (chans * scale - torch.tensor(mean[:n], dtype=torch.float64).view(1, n, 1, 1)) / torch.tensor(
        std[:n], dtype=torch.float64).view(1, n, 1, 1)
    if layout == "NHWC":
        want = want.permute(0, 2, 3, 1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3 * max(1.0, 255 * scale / min(std)))
    # the mean colour is what the energy subtracts: x = 0 is the model's mean input
    zero = Preprocess(pre)(torch.zeros(1, 3, 2, 2)).double()
    assert zero.abs().max() < 1e-3 * max(1.0, 255 * scale / min(std[:n]))
