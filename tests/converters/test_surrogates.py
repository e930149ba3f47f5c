"""Gradients through piecewise-constant ops: Round/Floor/Ceil/Sign pass them straight through, and the
served HOG (hard orientation bins) returns its own values with HOGb's gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper, numpy_helper

from converters.model import load_model
from converters.parity import probe_images
from converters.shallow.export import export_all
from tests.converters._one_node import against_onnxruntime, graph

torch.set_num_threads(1)


@pytest.mark.parametrize(("op", "opset"), [("Round", 11), ("Round", 22), ("Floor", 13), ("Ceil", 13), ("Sign", 13)])
def test_straight_through_ops_match_onnxruntime_and_pass_gradients(op: str, opset: int) -> None:
    x = np.array([[-2.5, -1.5, -0.7, -0.2, 0.0, 0.3, 0.5, 1.5, 2.5, 3.7]], np.float32)
    compared = against_onnxruntime(graph(helper.make_node(op, ["x"], ["y"]), opset, x.shape, ir_version=8), x)
    compared.assert_close(rtol=0, atol=0)  # the values are exactly onnxruntime's (half to even for Round)
    xt = torch.from_numpy(x).requires_grad_(True)
    compared.module(xt).sum().backward()
    expected = (np.abs(x) <= 1).astype(np.float32) if op == "Sign" else np.ones_like(x)
    np.testing.assert_array_equal(xt.grad.numpy(), expected)


def test_a_graph_with_floor_is_no_longer_blind() -> None:
    """Conv → Floor → ReduceMean as a whole model: the image gets a gradient (zero before)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Floor", ["c"], ["f"]),
             helper.make_node("ReduceMean", ["f"], ["y"], axes=[1, 2, 3], keepdims=0)]  # fmt: skip
    model = load_model(graph(nodes, 13, [1, 3, 16, 16], [w], output_shape=[1], ir_version=8).SerializeToString())
    assert model.parity.ok
    x = probe_images(1, 16, 16).requires_grad_(True)
    model.representation("y")(x).sum().backward()
    assert float(x.grad.abs().max()) > 0


@pytest.fixture(scope="module")
def shallow(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return export_all(tmp_path_factory.mktemp("shallow-surrogates"))


def test_hog_has_hogb_gradient_and_its_own_values(shallow: dict) -> None:
    hog = load_model(shallow["hog"].read_bytes())
    hogb = load_model(shallow["hogb"].read_bytes())
    plain = load_model(shallow["hog"].read_bytes(), verify=False, surrogates=False)
    assert hog.output_surrogate is not None and hogb.output_surrogate is None
    assert hog.parity.ok
    x = probe_images(2, 48, 48, seed=4)
    phi, phi_b, phi_plain = (m.representation(m.output_tap) for m in (hog, hogb, plain))
    with torch.no_grad():
        torch.testing.assert_close(phi(x), phi_plain(x), rtol=0, atol=0)  # HOG's values, exactly
    v = torch.randn_like(phi_plain(x))
    grads = []
    for rep in (phi, phi_b, phi_plain):
        xg = x.clone().requires_grad_(True)
        y = rep(xg)
        (y * v).sum().backward()
        grads.append(xg.grad)
        if rep is phi:  # with a gradient required the value is still HOG's (up to the last bit)
            torch.testing.assert_close(y.detach(), phi_plain(x).detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)  # HOGb's gradient
    # hard assignment alone sees less: its gradient differs from HOGb's
    assert float((grads[2] - grads[1]).norm() / grads[1].norm()) > 0.1
