"""Resize (converters/resize.py) against onnxruntime over its attributes: every coordinate mode,
nearest rounding, cubic coefficient, exclude_outside, antialias, tf_crop_and_resize extrapolation,
integer and fractional scales, sizes, runtime sizes; gradients flow; the fast path is taken where
torch computes the same thing."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from onnx2torch import convert

from converters.resize import Resize
from tests.converters._one_node import against_onnxruntime, graph

torch.set_num_threads(1)
X = np.random.default_rng(0).standard_normal((1, 2, 9, 11)).astype(np.float32)
CROP_ROIS = ([0, 0, 0.1, 0.2, 1, 1, 0.9, 0.7], [0, 0, -0.2, -0.1, 1, 1, 1.3, 1.2])  # inside; reaching outside


def _model(attrs: dict, opset: int, scales=None, sizes=None, roi=None, shape=X.shape) -> onnx.ModelProto:
    inits, names = [], ["x", "", "", ""]
    for i, (name, values, kind) in enumerate(
        (("roi", roi, np.float32), ("scales", scales, np.float32), ("sizes", sizes, np.int64)), start=1
    ):
        if values is not None:
            inits.append(numpy_helper.from_array(np.asarray(values, dtype=kind), name))
            names[i] = name
    while names[-1] == "":
        names.pop()
    return graph(helper.make_node("Resize", names, ["y"], **attrs), opset, shape, inits)


def _compare(m: onnx.ModelProto, x: np.ndarray = X) -> tuple[float, torch.nn.Module]:
    compared = against_onnxruntime(m, x)
    return compared.rel_error, compared.module


MODES = ["nearest", "linear", "cubic"]
COORDS = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_crop_and_resize",
          "half_pixel_symmetric"]  # fmt: skip
SCALES = [([1, 1, 2.0, 2.0], None), ([1, 1, 0.5, 0.6], None), ([1, 1, 1.7, 0.8], None), (None, [1, 2, 14, 5])]


@pytest.mark.parametrize(("mode", "coords"), list(itertools.product(MODES, COORDS)))
def test_every_mode_and_coordinate_transform_matches_onnxruntime(mode: str, coords: str) -> None:
    extras = [{}, {"cubic_coeff_a": -0.5, "exclude_outside": 1}] if mode == "cubic" else [{}]
    extras += [{"nearest_mode": m} for m in ("round_prefer_ceil", "floor", "ceil")] if mode == "nearest" else []
    extras += [{"antialias": 1}] if mode != "nearest" else []
    rois = CROP_ROIS if coords == "tf_crop_and_resize" else (None,)
    for extra, (scales, sizes), roi in itertools.product(extras, SCALES, rois):
        attrs = {"mode": mode, "coordinate_transformation_mode": coords, **extra}
        if roi is not None:  # a roi reaching outside the image extrapolates with this value
            attrs["extrapolation_value"] = 0.5
        err, _ = _compare(_model(attrs, 19, scales, sizes, roi))
        assert err < 1e-5, (attrs, scales, sizes, roi, err)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_older_opsets_match_onnxruntime(opset: int) -> None:
    for attrs in ({"mode": "cubic", "cubic_coeff_a": -0.5}, {"mode": "nearest"},
                  {"mode": "linear", "coordinate_transformation_mode": "align_corners"}):  # fmt: skip
        roi = [] if opset == 11 else None  # opset 11 requires the roi input
        err, _ = _compare(_model(attrs, opset, [1, 1, 1.5, 0.7], roi=roi))
        assert err < 1e-5, (opset, attrs, err)


def test_what_onnx2torch_got_wrong_is_now_right() -> None:
    """The three cases measured against onnx2torch's own converter (3.7e-2, 7.9e-3, 0.51 relative)."""
    cases = [
        {"mode": "cubic", "cubic_coeff_a": -0.5},  # TensorFlow's bicubic
        {"mode": "cubic", "exclude_outside": 1},
        {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "round_prefer_ceil"},
    ]
    for attrs in cases:
        err, module = _compare(_model(attrs, 13, [1, 1, 2.0, 2.0]))
        assert err < 1e-5, (attrs, err)
        resize = next(m for m in module.modules() if isinstance(m, Resize))
        assert resize.path == "matrix", attrs


def test_torch_native_cases_take_the_interpolate_path() -> None:
    for attrs in ({"mode": "cubic"}, {"mode": "linear"}, {"mode": "linear", "coordinate_transformation_mode":
                  "align_corners"}):  # fmt: skip
        err, module = _compare(_model(attrs, 13, [1, 1, 2.0, 2.0]))
        assert err < 1e-5
        assert next(m for m in module.modules() if isinstance(m, Resize)).path == "interpolate", attrs


@pytest.mark.parametrize(("n", "scales", "sizes"), [(60, None, [1, 2, 4, 2]), (84, None, [1, 2, 12, 3]),
                                                    (9, [1, 1, 41.0, 1.0], None), (3, [1, 1, 47.0, 55.0], None)])
def test_nearest_picks_onnxruntimes_pixels_where_float_rounding_decides(n: int, scales, sizes) -> None:
    """torch's nearest (asymmetric, floor) and onnxruntime's round dst/scale differently: at these
    ratios they pick other source pixels. Nearest always takes the matrix path."""
    x = np.random.default_rng(1).standard_normal((1, 2, n, n)).astype(np.float32)
    attrs = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    err, module = _compare(_model(attrs, 13, scales, sizes, shape=x.shape), x)
    assert err < 1e-6, err
    assert next(m for m in module.modules() if isinstance(m, Resize)).path == "matrix"


def test_sizes_computed_at_run_time() -> None:
    """sizes = the input's own N, C and a constant H, W (a Shape → Slice → Concat chain)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "two"], ["nc"]),
        helper.make_node("Concat", ["nc", "hw"], ["sizes"], axis=0),
        helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="cubic", cubic_coeff_a=-0.5),
    ]
    inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("zero", [0]), ("two", [2]),
                                                                              ("hw", [13, 6]))]  # fmt: skip
    err, _ = _compare(graph(nodes, 13, X.shape, inits))
    assert err < 1e-5


def test_gradients_flow_through_the_matrix_path() -> None:
    module = convert(_model({"mode": "cubic", "cubic_coeff_a": -0.5}, 13, [1, 1, 1.5, 0.7]))
    x = torch.from_numpy(X).requires_grad_(True)
    (grad,) = torch.autograd.grad(module(x).square().sum(), x)
    assert torch.isfinite(grad).all() and float(grad.abs().sum()) > 0
    # The matrix is linear: its gradient of ⟨y, w⟩ is Mᵀw, checked against a finite difference.
    w = torch.randn(module(x).shape, generator=torch.Generator().manual_seed(1))
    (g,) = torch.autograd.grad((module(x) * w).sum(), x)
    d = torch.zeros_like(x)
    d[0, 1, 4, 5] = 1e-2
    fd = float(((module(x + d) - module(x - d)) * w).sum() / 2e-2)
    assert fd == pytest.approx(float(g[0, 1, 4, 5]), rel=1e-3)


def test_resizing_the_channels_is_refused() -> None:
    with pytest.raises(NotImplementedError, match="batch or channel"):
        convert(_model({"mode": "nearest"}, 13, [1, 2, 1, 1]))(torch.from_numpy(X))
