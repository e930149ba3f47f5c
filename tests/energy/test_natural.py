"""Parameterized images (fourier, phase), random views, presets, diversity, and the paper preset's
bytes: small nets and sizes, a few steps."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from service.energy import EnergyParams, Minimizer, Objective, Problem, channel_weights, minimize
from service.energy.minimize import batch_signature, network_rows
from service.energy.natural import diversity_penalty, gram
from service.energy.parameterizations import (
    FourierImage,
    PhaseImage,
    from_energy,
    mean_amplitude,
    resample_amplitude,
    to_energy,
)
from service.energy.presets import preset_params
from service.energy.transforms import ViewSettings, views
from service.jobs.reference import REFERENCE_PHOTOS, amplitude_spectrum, center_crop_resize, photo

MEAN = torch.tensor([120.0, 110.0, 100.0])


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 3, stride=2), torch.nn.ReLU()
    )
    return net.requires_grad_(False)


# sha256 (first 16 hex digits) of the four images below, made with the code before presets and
# parameterizations existed (commit 3c5834d), one torch thread: the paper preset must give the same bytes.
PAPER_BYTES = ("42ed1992b128f53c", "c525f6234d144ad4", "753bf242323193e2", "6d09159fce99bfaf")


def test_paper_preset_gives_the_same_bytes_as_before_presets() -> None:
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = _net()
        img = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(3)) * 40
        phi0 = net(img[None])[0]
        w = channel_weights(phi0.shape, 2, receptive_field=7, channel_max=3.0)
        paper = {task: preset_params("paper", task) for task in ("invert", "maximize", "caricature")}
        assert all(p == EnergyParams() for p in paper.values())
        problems = [
            Problem(Objective.invert(phi0), preset_params("paper", "invert", steps=20, refine_steps=5), seed=1),
            Problem(Objective.maximize(w), preset_params("paper", "maximize", steps=25), seed=2),
            Problem(Objective.caricature(phi0), preset_params("paper", "caricature", steps=15, optimizer="adam"),
                    seed=3, start=img),
            Problem(Objective.invert(phi0), preset_params("paper", "invert", steps=12, beta=1.5, jitter=2), seed=4),
        ]  # fmt: skip
        results = minimize(net, problems, height=32, width=32, stride=4, mean_rgb255=MEAN, report_every=3)
    finally:
        torch.set_num_threads(saved)
    digests = tuple(hashlib.sha256(r.image_uint8.tobytes()).hexdigest()[:16] for r in results)
    assert digests == PAPER_BYTES


@pytest.mark.parametrize(("channels", "height", "width"), [(3, 24, 24), (1, 20, 28), (5, 17, 16)])
def test_fourier_reproduces_its_start_image(channels: int, height: int, width: int) -> None:
    fourier = FourierImage(channels, height, width)
    start = torch.rand((channels, height, width), generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
    image = fourier.image(fourier.init(torch.Generator().manual_seed(0), start))
    assert image.shape == (channels, height, width)
    assert float((image - start).abs().max()) < 1e-3
    noise = fourier.image(fourier.init(torch.Generator().manual_seed(0)))
    assert float(noise.min()) > 0 and float(noise.max()) < 1  # bounded by the sigmoid, near grey at the start


@pytest.mark.parametrize(("channels", "height", "width"), [(3, 32, 32), (1, 24, 40)])
def test_phase_keeps_the_amplitude_of_photographs(channels: int, height: int, width: int) -> None:
    photos = torch.stack([
        torch.from_numpy(center_crop_resize(photo(n), height, width)).permute(2, 0, 1).float() / 255
        for n in REFERENCE_PHOTOS[:4]
    ])  # fmt: skip
    magnitude = mean_amplitude(photos, channels)
    assert magnitude.shape == (channels, height, width // 2 + 1)
    phase = PhaseImage(magnitude, height, width)
    variable = phase.init(torch.Generator().manual_seed(0))
    image = phase.image(variable)
    assert image.shape == (channels, height, width) and 0 < float(image.min()) and float(image.max()) < 1
    with pytest.raises(ValueError, match="amplitude spectrum"):
        PhaseImage(magnitude[:, :-1], height, width)


def test_energy_space_round_trip_for_grey_and_colour() -> None:
    rgb = torch.rand(3, 8, 9)
    assert torch.allclose(from_energy(to_energy(rgb, MEAN), MEAN, 3), rgb, atol=1e-5)
    grey = torch.rand(1, 8, 9)
    x = to_energy(grey, MEAN)
    assert x.shape == (3, 8, 9)  # the three energy channels carry the same grey
    assert torch.allclose(from_energy(x, MEAN, 1), grey, atol=1e-5)


def test_views_are_seeded_and_the_identity_is_free() -> None:
    x = torch.randn(3, 16, 16)
    assert torch.equal(views(x, ViewSettings(copies=2), torch.Generator(), None, 0.0)[1], x)
    settings = ViewSettings(copies=3, translate=2, rotate=10, scale_min=0.9, scale_max=1.1, crop_start=0.8, noise=0.1)
    a = views(x, settings, torch.Generator().manual_seed(5), torch.Generator().manual_seed(6), 0.3)
    b = views(x, settings, torch.Generator().manual_seed(5), torch.Generator().manual_seed(6), 0.3)
    c = views(x, settings, torch.Generator().manual_seed(7), torch.Generator().manual_seed(6), 0.3)
    assert a.shape == (3, 3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)


def test_a_crop_of_half_the_side_zooms_in_twice() -> None:
    # A horizontal ramp: the central half, stretched over the whole view, spans half the values.
    x = torch.linspace(-1, 1, 64).expand(3, 64, 64).contiguous()
    out = views(x, ViewSettings(copies=1, crop_start=0.5, crop_end=0.5, crop_spread=0.0), torch.Generator(), None, 0)
    span = float(out[0, 0, 32, -1] - out[0, 0, 32, 0])
    assert span == pytest.approx(1.0, abs=0.05)


def test_a_view_of_half_a_canvas_twice_the_output_is_the_canvas_at_its_own_scale() -> None:
    x = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0))
    settings = ViewSettings(copies=2, crop_start=0.5, crop_end=0.5, crop_spread=0.0)
    out = views(x, settings, torch.Generator(), None, 0, out_size=(32, 32))
    assert out.shape == (2, 3, 32, 32)
    assert torch.allclose(out[0], x[:, 16:48, 16:48], atol=1e-5)  # pixel for pixel, no resampling


def test_a_view_that_shrinks_a_canvas_averages_its_pixels_rather_than_aliasing_them() -> None:
    # White noise seen whole at a quarter of its side: bilinear sampling alone would read 2 of each
    # 4×4 block (std ≈ 0.7); averaging the blocks leaves std ≈ 1/4.
    x = torch.randn(3, 128, 128, generator=torch.Generator().manual_seed(0))
    out = views(x, ViewSettings(copies=1, crop_start=1.0, crop_end=1.0, crop_spread=0.0), torch.Generator(), None, 0,
                out_size=(32, 32))  # fmt: skip
    assert out.shape == (1, 3, 32, 32) and float(out.std()) < 0.35


def test_a_canvas_is_optimized_at_its_size_and_returned_at_the_output_size() -> None:
    net = _net()
    shape = net(torch.zeros(1, 3, 32, 32))[0].shape
    w = channel_weights(shape, 1, spatial="mean")
    photos = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    params = preset_params("natural", "maximize", steps=20, canvas=2.0)
    canvas = Problem(Objective.maximize(w), params, seed=0)
    paper = Problem(Objective.maximize(w), preset_params("paper", "maximize", steps=20), seed=1)
    # A canvas changes nothing the network sees, so its jobs batch with every other.
    assert batch_signature([canvas], 32, 32, 4) == batch_signature([paper], 32, 32, 4)
    # The spectrum given at the output size is carried to the canvas.
    mini = Minimizer(net, height=32, width=32, stride=4, mean_rgb255=MEAN, magnitude=mean_amplitude(photos))
    handles = [mini.add(canvas), mini.add(paper)]
    row = next(r for r in mini.rows if r.handle == handles[0])
    assert row.canvas == (64, 64) and row.parameterization.height == 64
    finished = {}
    while mini.rows:
        finished.update(dict(mini.step()))
    result = finished[handles[0]]
    assert result.image_uint8.shape == (32, 32, 3) and finished[handles[1]].image_uint8.shape == (32, 32, 3)
    assert result.history["loss"][-1] < result.history["loss"][0]


def test_a_spectrum_carried_to_another_size_matches_the_one_measured_there() -> None:
    measured, carried = amplitude_spectrum(96, 96, 3), resample_amplitude(amplitude_spectrum(48, 48, 3), 96, 96)
    assert carried.shape == measured.shape
    band = slice(1, None)  # the zero frequency is removed in both
    a, b = measured[:, band].log().flatten(), carried[:, band].log().flatten()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.9


@pytest.mark.parametrize("parameterization", ["fourier", "phase"])
def test_natural_maximization_raises_the_unit(parameterization: str) -> None:
    net = _net()
    shape = net(torch.zeros(1, 3, 32, 32))[0].shape
    w = channel_weights(shape, 1, spatial="mean")
    photos = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    params = preset_params("natural", "maximize", parameterization=parameterization, steps=30,
                           optimizer="nadam" if parameterization == "phase" else "adam")  # fmt: skip
    [result] = minimize(net, [Problem(Objective.maximize(w), params, seed=0)], height=32, width=32, stride=4,
                        mean_rgb255=MEAN, magnitude=mean_amplitude(photos), report_every=5)  # fmt: skip
    history = result.history["loss"]
    assert result.steps_run == 30 and history[-1] < history[0]  # −⟨Φ, w⟩ went down
    assert result.image_uint8.shape == (32, 32, 3)


def test_pixel_and_natural_rows_share_one_batch() -> None:
    net = _net()
    shape = net(torch.zeros(1, 3, 32, 32))[0].shape
    w = channel_weights(shape, 1)
    settings = preset_params("natural", "maximize", steps=6, parameterization="fourier", optimizer="adam")
    natural = Problem(Objective.maximize(w), settings, seed=1)
    paper = Problem(Objective.maximize(w), preset_params("paper", "maximize", steps=6), seed=2)
    assert batch_signature([natural], 32, 32, 4) == batch_signature([paper], 32, 32, 4)
    assert network_rows([natural, paper]) == natural.params.copies + 1
    mini = Minimizer(net, height=32, width=32, stride=4, mean_rgb255=MEAN)
    handles = [mini.add(natural), mini.add(paper)]
    assert len(mini) == 2 and mini.network_rows() == natural.params.copies + 1
    finished = {}
    while mini.rows:
        finished.update(dict(mini.step()))
    assert set(finished) == set(handles) and all(r.steps_run == 6 for r in finished.values())
    # The paper row's image is its own: the same as alone to within the kernels' batch dependence.
    [alone] = minimize(net, [paper], height=32, width=32, stride=4, mean_rgb255=MEAN)
    diff = torch.from_numpy(alone.image_uint8).int() - torch.from_numpy(finished[handles[1]].image_uint8).int()
    assert int(diff.abs().max()) <= 1


def test_diversity_pushes_repeats_of_one_target_apart() -> None:
    net = _net()
    shape = net(torch.zeros(1, 3, 32, 32))[0].shape
    w = channel_weights(shape, 1, spatial="mean")

    def similarity(weight: float) -> float:
        params = preset_params("natural", "maximize", parameterization="fourier", optimizer="adam", steps=40,
                               copies=1, rotate=0, translate=0, crop_start=1, crop_end=1, noise=0,
                               diversity=weight)  # fmt: skip
        problems = [Problem(Objective.maximize(w), params, seed=s, group=0) for s in (0, 1, 2)]
        results = minimize(net, problems, height=32, width=32, stride=4, mean_rgb255=MEAN)
        with torch.no_grad():
            feats = [net(r.image[None]) for r in results]
        return float(diversity_penalty([gram(f) for f in feats]))

    assert similarity(20.0) < similarity(0.0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"parameterization": "phase", "optimizer": "paper"}, "pixels only"),
        ({"optimizer": "nadam"}, "nadam"),
        ({"copies": 3}, "views"),
        ({"parameterization": "fourier", "optimizer": "adam", "copies": 65}, "copies"),
        ({"parameterization": "cubist"}, "parameterization"),
        ({"spatial": "corner"}, "spatial"),
        ({"lr_end_scale": 0.5}, "lr_end_scale needs"),
        ({"parameterization": "phase", "optimizer": "nadam", "canvas": 0.9}, "canvas must"),
        ({"canvas": 2.0}, "canvas needs"),
        ({"parameterization": "phase", "optimizer": "nadam", "lr_end_scale": 0.0}, "lr_end_scale must"),
        ({"parameterization": "phase", "optimizer": "nadam", "lr_end_scale": 1.5}, "lr_end_scale must"),
    ],
)
def test_bad_settings_say_what_to_change(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EnergyParams(**settings).validate()
    with pytest.raises(ValueError, match="unknown preset"):
        preset_params("lucent", "maximize")


@pytest.mark.parametrize(("channels", "height", "width"), [(3, 48, 48), (1, 40, 56)])
def test_the_service_amplitude_falls_like_photographs_and_gives_their_contrast(
    channels: int, height: int, width: int
) -> None:
    magnitude = amplitude_spectrum(height, width, channels)
    assert magnitude.shape == (channels, height, width // 2 + 1)
    # Natural scenes: amplitude ∝ 1/f^a with a ≈ 1 (power slope ≈ −2). Fit over the band between
    # the lowest frequencies and Nyquist, on the luminance (first decorrelated) channel.
    fy = torch.fft.fftfreq(height)[:, None] * min(height, width)
    fx = torch.fft.rfftfreq(width)[None, :] * min(height, width)
    radius = torch.sqrt(fy**2 + fx**2)
    band = (radius >= 2) & (radius <= min(height, width) / 2)
    slope = np.polyfit(np.log(radius[band].numpy()), np.log(magnitude[0][band].numpy()), 1)[0]
    assert -1.6 < slope < -0.6
    # The phase image at its start has the contrast of photographs (std 33–80 on 0–255).
    image = PhaseImage(magnitude, height, width).image(
        PhaseImage(magnitude, height, width).init(torch.Generator().manual_seed(3))
    )
    assert 33 < float(image.std()) * 255 < 80
    # ...and their colourfulness (per-pixel RGB max − min: 41–107 for the colour photographs in
    # scikit-image; 34 when chroma had the luminance's gain).
    if channels == 3:
        colourfulness = float((image.max(dim=0).values - image.min(dim=0).values).mean()) * 255
        assert 41 < colourfulness < 107


def test_the_rate_falls_to_lr_end_scale_over_the_first_stage() -> None:
    net = _net()
    shape = net(torch.zeros(1, 3, 32, 32))[0].shape
    w = channel_weights(shape, 1, spatial="mean")
    photos = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mini = Minimizer(net, height=32, width=32, stride=4, mean_rgb255=MEAN, magnitude=mean_amplitude(photos))
    params = preset_params("natural", "maximize", steps=11, lr_end_scale=0.1, copies=1)
    handle = mini.add(Problem(Objective.maximize(w), params, seed=0))
    [row] = [r for r in mini.rows if r.handle == handle]
    rates = []
    for _ in range(11):
        mini.step()
        rates.append(row.optimizer.param_groups[0]["lr"])
    lr = float(row.params.learning_rate)
    assert rates[0] == pytest.approx(lr) and rates[-1] == pytest.approx(0.1 * lr)
    assert rates[5] == pytest.approx(0.55 * lr)  # linear in between
