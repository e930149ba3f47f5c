"""Properties of the shallow torch modules that the reference comparisons do not cover: output
geometry, differentiability (finite gradients, also on flat images), invariances, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converters.shallow import DenseSift, HogDalalTriggs, HogUoctti

MODULES = {
    "hog": lambda: HogUoctti(),
    "hog_texture": lambda: HogUoctti(texture=True),
    "hogb": lambda: HogUoctti(bilinear=True),
    "dalal_triggs": lambda: HogDalalTriggs(),
    "dsift": lambda: DenseSift(bin_size=4, step=3),
}


def _image(h: int, w: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.round(rng.uniform(0, 255, size=(batch, 1, h, w))).astype(np.float32))


@pytest.mark.parametrize("size", [(37, 45), (40, 48), (43, 21)])
def test_output_geometry(size):
    h, w = size
    x = _image(h, w)
    assert HogUoctti()(x).shape == (1, 27, (h + 4) // 8, (w + 4) // 8)
    assert HogUoctti(texture=True, cell_size=6)(x).shape == (1, 31, (h + 3) // 6, (w + 3) // 6)
    assert HogDalalTriggs(block_size=3)(x).shape == (1, 81, h // 8 - 2, w // 8 - 2)
    assert DenseSift(bin_size=4, step=3)(x).shape == (1, 128, (h - 13) // 3 + 1, (w - 13) // 3 + 1)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_gradcheck(name):
    """Analytic gradients agree with finite differences (float64, a generic image where no vote sits
    within the finite-difference step of a bin boundary; gradcheck's fast mode, a random projection)."""
    module = MODULES[name]().double()
    generator = torch.Generator().manual_seed(0)
    x = _image(17, 18, seed=3).double() + torch.rand(1, 1, 17, 18, dtype=torch.float64, generator=generator)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(module, (x,), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_flat_image_is_zero_with_finite_gradient(name):
    module = MODULES[name]()
    x = torch.full((1, 1, 30, 34), 77.0, requires_grad=True)
    out = module(x)
    assert torch.count_nonzero(out) == 0
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", sorted(MODULES))
def test_invariant_to_grey_offset_and_batching(name):
    """Only grey-level differences matter (the exported models' mean offset changes nothing), and a
    batch is the stack of its images."""
    module = MODULES[name]()
    x = _image(33, 41, seed=5, batch=2)
    with torch.no_grad():
        out = module(x)
        assert torch.equal(module(x - 128.0), out)  # integer levels: the differences are exact
        assert torch.equal(module(x[1:]), out[1:])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_finite_gradient_on_diagonal_and_axis_gradients(name):
    """Gradients along ±x, ±y and the diagonals (ties and branch seams of the orientation code) must
    not produce NaN in the backward pass."""
    yy, xx = torch.meshgrid(torch.arange(30.0), torch.arange(34.0), indexing="ij")
    for plane in (xx + yy, xx - yy, -xx + yy, -xx - yy, xx, -xx, yy, -yy):
        x = (3.0 * plane)[None, None].clone().requires_grad_(True)
        MODULES[name]()(x).square().sum().backward()
        assert torch.isfinite(x.grad).all()


def test_hogb_equals_hog_when_gradients_sit_on_bin_centres():
    """A horizontal ramp has every gradient exactly on the 0° direction: bilinear weights are exactly 1."""
    ramp = torch.arange(40, dtype=torch.float32).view(1, 1, 1, 40).expand(1, 1, 30, 40) * 2.0
    with torch.no_grad():
        assert torch.allclose(HogUoctti(bilinear=True)(ramp), HogUoctti()(ramp), rtol=0, atol=1e-7)


def test_hogb_splits_votes_linearly_in_angle():
    """A gradient at 30° + 5° gives its two neighbouring directed bins (20°, 40°) weights 0.25 / 0.75."""
    angle = np.deg2rad(35.0)
    yy, xx = np.mgrid[0:24, 0:24].astype(np.float64)
    plane = torch.from_numpy((np.cos(angle) * xx + np.sin(angle) * yy).astype(np.float32))[None, None]
    module = HogUoctti(bilinear=True)
    gx = plane[:, :, 1:-1, 2:] - plane[:, :, 1:-1, :-2]
    gy = plane[:, :, 2:, 1:-1] - plane[:, :, :-2, 1:-1]
    weights = module._orientation_weights(gx, gy, gx * gx + gy * gy)[0, :, 5, 5]
    expected = torch.zeros(18)
    expected[1], expected[2] = 0.25, 0.75
    assert torch.allclose(weights, expected, atol=1e-5)
