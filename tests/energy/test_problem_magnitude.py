"""A problem's own amplitude spectrum (Problem.magnitude) for the phase parameterization: it wins
over the Minimizer's, and problems with different amplitudes share one batch unchanged."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from service.energy import Objective, Problem, channel_weights, minimize
from service.energy.parameterizations import mean_amplitude
from service.energy.presets import preset_params

MEAN = torch.tensor([120.0, 110.0, 100.0])
SIZE = 32


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # One thread: the network's kernels then do not depend on the batch size (service/jobs/batch_invariance.py).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 3, stride=2), torch.nn.ReLU()
    )
    return net.requires_grad_(False)


def _amplitude(seed: int, smooth: bool) -> torch.Tensor:
    """Two clearly different spectra: of smooth blobs (steep fall-off) and of white noise (flat)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(3, 3, 4 if smooth else SIZE, 4 if smooth else SIZE, generator=g)
    if smooth:
        images = torch.nn.functional.interpolate(images, size=(SIZE, SIZE), mode="bicubic").clamp(0, 1)
    return mean_amplitude(images)


def test_a_problems_own_amplitude_wins_and_batches_with_others() -> None:
    net = _net()
    w = channel_weights(net(torch.zeros(1, 3, SIZE, SIZE))[0].shape, 1, spatial="mean")
    params = preset_params("natural", "maximize", steps=6)
    assert params.parameterization == "phase"
    smooth, flat = _amplitude(1, smooth=True), _amplitude(2, smooth=False)

    def run(problems: list[Problem], magnitude: torch.Tensor | None) -> list[np.ndarray]:
        results = minimize(net, problems, height=SIZE, width=SIZE, stride=4, mean_rgb255=MEAN, magnitude=magnitude)
        return [r.image_uint8 for r in results]

    def problem(seed: int, magnitude: torch.Tensor | None = None) -> Problem:
        return Problem(Objective.maximize(w), params, seed=seed, magnitude=magnitude)

    # References: each amplitude as the Minimizer's, one problem per run.
    [smooth_alone] = run([problem(1)], smooth)
    [flat_alone] = run([problem(2)], flat)
    [flat_as_smooth] = run([problem(2)], smooth)
    assert not np.array_equal(flat_alone, flat_as_smooth)  # the amplitude does change the image
    # The problem's own amplitude over the Minimizer's, in one batch with a problem that uses the default.
    mixed = run([problem(1), problem(2, magnitude=flat)], smooth)
    assert np.array_equal(mixed[0], smooth_alone)
    assert np.array_equal(mixed[1], flat_alone)
    # Problems that all bring their own need no Minimizer default.
    both = run([problem(2, magnitude=flat), problem(1, magnitude=smooth)], None)
    assert np.array_equal(both[0], flat_alone) and np.array_equal(both[1], smooth_alone)


def test_without_any_amplitude_the_phase_parameterization_says_so() -> None:
    net = _net()
    w = channel_weights(net(torch.zeros(1, 3, SIZE, SIZE))[0].shape, 1, spatial="mean")
    problem = Problem(Objective.maximize(w), preset_params("natural", "maximize", steps=2), seed=0)
    with pytest.raises(ValueError, match="amplitude spectrum"):
        minimize(net, [problem], height=SIZE, width=SIZE, stride=4, mean_rgb255=MEAN)
