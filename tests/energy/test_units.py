"""Unit checks of the energy's pieces: gradients, projection, jitter, loss invariances, seeding."""

from __future__ import annotations

import pytest
import torch

from service.energy import EnergyParams, Minimizer, Objective, Problem, minimize
from service.energy.objectives import batched_loss
from service.energy.regularizers import (
    alpha_norm,
    jitter_crop,
    jitter_offsets,
    project_bounded,
    total_variation,
)


def _fd_check(fn, x: torch.Tensor, n: int = 12, eps: float = 1e-4) -> None:
    """Central finite differences at n random coordinates against autograd, in float64."""
    x = x.double().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x).sum(), x)
    gen = torch.Generator().manual_seed(1)
    flat = x.detach().flatten()
    for idx in torch.randint(0, flat.numel(), (n,), generator=gen).tolist():
        plus, minus = flat.clone(), flat.clone()
        plus[idx] += eps
        minus[idx] -= eps
        numeric = (fn(plus.view_as(x)).sum() - fn(minus.view_as(x)).sum()) / (2 * eps)
        analytic = grad.flatten()[idx]
        assert torch.allclose(analytic, numeric, rtol=1e-4, atol=1e-9), (idx, float(analytic), float(numeric))


@pytest.mark.parametrize("alpha", [2.0, 6.0])
def test_alpha_norm_gradient_matches_finite_differences(alpha: float) -> None:
    x = torch.randn(2, 3, 7, 9, generator=torch.Generator().manual_seed(0)) * 60
    a, b = torch.full((2,), alpha, dtype=torch.float64), torch.full((2,), 80.0, dtype=torch.float64)
    _fd_check(lambda v: alpha_norm(v, a, b), x)


@pytest.mark.parametrize("beta", [1.0, 1.5, 2.0])
def test_tv_gradient_matches_finite_differences(beta: float) -> None:
    x = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(0)) * 40
    bt, v = torch.full((2,), beta, dtype=torch.float64), torch.full((2,), 80 / 6.5, dtype=torch.float64)
    _fd_check(lambda z: total_variation(z, bt, v), x)


def test_regularizers_have_the_reference_values() -> None:
    # A constant image of RGB norm B has R_α = 1 and no variation; a unit step in one channel
    # across a vertical edge contributes (1/V)^β per pixel of the edge.
    x = torch.full((1, 3, 4, 4), 80 / 3**0.5, dtype=torch.float64)
    assert float(alpha_norm(x, torch.tensor([6.0]), torch.tensor([80.0]))) == pytest.approx(1.0)
    assert float(total_variation(x, torch.tensor([2.0]), torch.tensor([1.0]))) == pytest.approx(0.0, abs=1e-5)
    step = torch.zeros(1, 3, 4, 4, dtype=torch.float64)
    step[:, 0, :, 2:] = 1.0
    # differences are measured on the 3×3 interior grid: 3 pixels see the edge at column 1→2
    assert float(total_variation(step, torch.tensor([2.0]), torch.tensor([1.0]))) == pytest.approx(3 / 16, rel=1e-4)


def test_projection_bounds_every_pixel_norm() -> None:
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 300
    bound = torch.tensor([160.0, 10.0, 1e6])
    inside = x[2].clone()
    project_bounded(x, bound)
    norms = x.pow(2).sum(dim=1).sqrt()
    assert float(norms[0].max()) <= 160.0 * (1 + 1e-6)
    assert float(norms[1].max()) <= 10.0 * (1 + 1e-6)
    assert torch.equal(x[2], inside)  # a pixel already inside B₊ is not moved


@pytest.mark.parametrize("jitter", [1, 2, 5, 8])
def test_jitter_never_shifts_more_than_t_minus_one(jitter: int) -> None:
    gen = torch.Generator().manual_seed(0)
    seen = set(jitter_offsets(gen, jitter, 400))
    assert all(0 <= dy <= jitter - 1 and 0 <= dx <= jitter - 1 for dy, dx in seen)
    assert len(seen) == jitter * jitter  # and every shift in range is used


def test_minimizer_crops_stay_inside_the_padded_variable() -> None:
    shapes = []

    def phi(x: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return x.mean(dim=(2, 3))

    phi0 = torch.tensor([1.0, -2.0, 3.0])
    problem = Problem(Objective.invert(phi0), EnergyParams(steps=20, refine_steps=0, jitter=4), seed=3)
    minimize(phi, [problem], height=10, width=12, stride=16)
    assert set(shapes) == {(1, 3, 10, 12)}


def test_jitter_crop_takes_each_rows_own_offset() -> None:
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    out = jitter_crop(x, [(0, 0), (2, 1)], 3, 3)
    assert torch.equal(out[0], x[0, :, 0:3, 0:3]) and torch.equal(out[1], x[1, :, 2:5, 1:4])


def test_inversion_loss_is_invariant_to_the_scale_of_the_representation() -> None:
    gen = torch.Generator().manual_seed(0)
    phi, phi0 = torch.randn(1, 4, 3, 3, generator=gen), torch.randn(1, 4, 3, 3, generator=gen)
    ones, zeros, inv = torch.ones_like(phi0), torch.zeros_like(phi0), torch.tensor([True])
    base = batched_loss(phi, phi0, ones, zeros, inv)
    for s in (1e-3, 7.0, 1e4):
        assert torch.allclose(batched_loss(s * phi, s * phi0, ones, zeros, inv), base, rtol=1e-5)


def test_caricature_loss_is_invariant_to_the_scale_of_the_representation() -> None:
    gen = torch.Generator().manual_seed(0)
    phi0 = torch.randn(4, 3, 3, generator=gen)
    phi = phi0 + 0.5 * torch.randn(4, 3, 3, generator=gen)
    zeros, dot = torch.zeros(1, 4, 3, 3), torch.tensor([False])
    base = batched_loss(phi[None], zeros, zeros, Objective.caricature(phi0).weights[None], dot)
    # at the start image ⟨Φ0, Φ0⁺/‖Φ0⁺‖²⟩ = 1 whatever the scale
    start = batched_loss(phi0[None], zeros, zeros, Objective.caricature(phi0).weights[None], dot)
    assert float(start) == pytest.approx(-1.0, rel=1e-6)
    for s in (1e-3, 9.0, 1e3):
        w = Objective.caricature(s * phi0).weights[None]
        assert torch.allclose(batched_loss(s * phi[None], zeros, zeros, w, dot), base, rtol=1e-5)


def test_inversion_mask_ignores_what_is_masked_out() -> None:
    phi0 = torch.ones(1, 2, 2, 2)
    mask = torch.zeros(1, 2, 2, 2)
    mask[..., 0, 0] = 1
    phi = phi0.clone()
    phi[..., 1, 1] = 100.0  # outside the mask: no loss
    loss = batched_loss(phi, phi0, mask, torch.zeros_like(phi0), torch.tensor([True]))
    assert float(loss) == 0.0


MEAN = (120.0, 120.0, 120.0)


def _tiny_phi() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    return net.requires_grad_(False)


def test_same_seed_same_image_and_other_seed_other_image() -> None:
    phi = _tiny_phi()
    target = phi(torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(5)) * 50)[0]
    params = EnergyParams(steps=15, refine_steps=5)

    def run(seed: int) -> torch.Tensor:
        (result,) = minimize(phi, [Problem(Objective.invert(target), params, seed=seed)], height=24, width=24, stride=2)
        return torch.from_numpy(result.image_uint8)

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_optimization_lowers_the_energy_and_the_feature_error() -> None:
    phi = _tiny_phi()
    target = phi(torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(5)) * 50)[0]
    (result,) = minimize(
        phi,
        [Problem(Objective.invert(target), EnergyParams(steps=80), seed=0)],
        height=24,
        width=24,
        stride=2,
        mean_rgb255=MEAN,  # the final figures are measured on the clipped uint8 image
    )
    history = result.history["energy"]
    assert history[-1] < 0.2 * history[0]
    assert result.feature_error is not None and result.feature_error < 0.3
    assert result.steps_run == 80 + 50 and not result.stopped


def test_batch_rows_keep_their_own_settings_and_can_leave_early() -> None:
    phi = _tiny_phi()
    target = phi(torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 50)[0]
    mini = Minimizer(phi, height=16, width=16, stride=2)
    short = mini.add(Problem(Objective.invert(target), EnergyParams(steps=3, refine_steps=0), seed=1))
    long = mini.add(Problem(Objective.invert(target), EnergyParams(steps=10, refine_steps=0, beta=1.0), seed=2))
    finished: dict[int, int] = {}
    for step in range(1, 11):
        for handle, result in mini.step():
            finished[handle] = step
            assert result.steps_run == (3 if handle == short else 10)
    assert finished[short] < finished[long]
    assert len(mini) == 0


def test_cancel_returns_a_partial_result_at_the_next_step() -> None:
    phi = _tiny_phi()
    target = phi(torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 50)[0]
    mini = Minimizer(phi, height=16, width=16, stride=2)
    handle = mini.add(Problem(Objective.invert(target), EnergyParams(steps=100), seed=1))
    mini.step()
    mini.step()
    mini.cancel(handle)
    ((h, result),) = mini.step()
    assert h == handle and result.stopped and result.steps_run == 2


def test_adam_option_runs_and_improves() -> None:
    phi = _tiny_phi()
    target = phi(torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(5)) * 50)[0]
    (result,) = minimize(
        phi,
        [Problem(Objective.invert(target), EnergyParams(steps=60, optimizer="adam"), seed=0)],
        height=24,
        width=24,
        stride=2,
    )
    assert result.history["energy"][-1] < 0.5 * result.history["energy"][0]


@pytest.mark.parametrize(
    "bad",
    [dict(alpha=0.5), dict(beta=3.0), dict(steps=-1), dict(bound=0.0), dict(jitter=0), dict(momentum=1.0),
     dict(loss_weight=float("nan")), dict(optimizer="sgd")],
)  # fmt: skip
def test_bad_settings_are_refused_with_the_setting_named(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        EnergyParams(**bad).validate()


@pytest.mark.parametrize(("alpha", "beta"), [(6.0, 2.0), (2.0, 1.0), (6.0, 1.5), (4.0, 1.25)])
def test_closed_form_prior_gradients_match_autograd(alpha: float, beta: float) -> None:
    """prior_terms_and_grad (the minimizer's fast path) against autograd of λ_α·R_α + λ_V·R_V."""
    from service.energy.regularizers import prior_terms_and_grad

    x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 60
    params = EnergyParams(alpha=alpha, beta=beta, b_norm=70.0, tv_norm=9.0, lambda_alpha=0.5, lambda_tv=2.0)
    grad = torch.empty_like(x)
    r_a, r_t = prior_terms_and_grad(x, grad, params)
    xx = x.clone().requires_grad_(True)
    b, v = torch.full((2,), 70.0, dtype=torch.float64), torch.full((2,), 9.0, dtype=torch.float64)
    ref_a, ref_t = alpha_norm(xx, alpha, b), total_variation(xx, beta, v)
    (ref_grad,) = torch.autograd.grad((0.5 * ref_a + 2.0 * ref_t).sum(), xx)
    assert torch.allclose(r_a, ref_a, rtol=1e-10) and torch.allclose(r_t, ref_t, rtol=1e-10)
    assert torch.allclose(grad, ref_grad, rtol=1e-8, atol=1e-14)
