"""The shallow models as ONNX: onnxruntime agrees with the torch modules, and the files load through
``converters.model.load_model`` like any upload (grey input, metadata-driven preprocessing)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from converters.model import load_model
from converters.shallow.export import GREY_MEAN_255, INPUT_NAME, SHALLOW_MODELS, export_all

SIZES = ((75, 99), (130, 170))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("shallow")
    return export_all(directory)


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", sorted(SHALLOW_MODELS))
def test_onnxruntime_matches_torch(exported, name):
    session = _session(exported[name])
    module = SHALLOW_MODELS[name].build()
    rng = np.random.default_rng(1)
    for size in SIZES:
        grey = (rng.uniform(0, 255, size=(2, 1, *size)) - GREY_MEAN_255).astype(np.float32)
        ours = session.run(None, {INPUT_NAME: grey})[0]
        with torch.no_grad():
            ref = module(torch.from_numpy(grey)).numpy()
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("name", sorted(SHALLOW_MODELS))
def test_metadata_and_standard_ops(exported, name):
    model = onnx.load(str(exported[name]))
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["preimage.channel_order"] == "GRAY"
    shallow = json.loads(meta["preimage.shallow"])
    assert shallow["name"] == name and shallow["params"] == SHALLOW_MODELS[name].params
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[1].dim_value == 1 and all(d.dim_param for d in (dims[0], dims[2], dims[3]))


@pytest.mark.parametrize("name", sorted(SHALLOW_MODELS))
def test_served_like_an_upload(exported, name):
    """load_model reads the grey preprocessing from metadata; its differentiable representation of the
    output agrees with onnxruntime on the same energy-space image, and has finite gradients."""
    converted = load_model(exported[name].read_bytes())
    pre = converted.preprocessing
    assert pre.channel_order == "GRAY" and pre.scale == 1.0 and pre.mean == (GREY_MEAN_255,)
    assert converted.preprocessing_source == "metadata"
    representation = converted.representation(converted.output_tap)
    session = _session(exported[name])
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.uniform(-100, 100, size=(1, 3, *SIZES[0])).astype(np.float32))
    expected = session.run(None, {INPUT_NAME: converted.to_model_input(x)})[0]
    x.requires_grad_(True)
    features = representation(x)
    np.testing.assert_allclose(features.detach().numpy(), expected, rtol=0, atol=1e-5)
    target = torch.from_numpy(rng.uniform(0, 0.2, size=features.shape).astype(np.float32))
    (features - target).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0


def test_export_is_cached(exported):
    """A second export_all over the same directory reuses the files (keyed by parameters and versions)."""
    stamps = {name: path.stat().st_mtime_ns for name, path in exported.items()}
    again = export_all(next(iter(exported.values())).parent)
    assert again == exported
    assert {name: path.stat().st_mtime_ns for name, path in again.items()} == stamps
