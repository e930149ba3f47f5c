"""Parity of the shallow torch modules with their references: VLFeat 0.9.21 (``vl_hog``, ``vl_dsift``
through ctypes) and ``skimage.feature.hog``.

Eight ``skimage.data`` photographs at two sizes that are not multiples of the 8-pixel cell: 75×99 with
integer grey levels (as 8-bit images are: many exact ties between orientation bins) and 130×170 with
real-valued grey levels. Agreement is required within 1e-3 relative (‖ours − ref‖ / ‖ref‖ per image, and
every element within 1e-3 of the reference's largest value). Measured at the time of writing: HOG UoCTTI
≤ 1e-7, HOGb ≤ 2e-5, Dalal-Triggs ≤ 1e-7, DSIFT ≤ 5e-6.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converters.shallow import DenseSift, HogDalalTriggs, HogUoctti, vlfeat

skimage_data = pytest.importorskip("skimage.data")
from skimage.color import rgb2gray  # noqa: E402
from skimage.feature import hog as skimage_hog  # noqa: E402
from skimage.transform import resize  # noqa: E402

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "moon", "hubble_deep_field")
SIZES = ((75, 99), (130, 170))
TOLERANCE = 1e-3


def _vlfeat_or_skip() -> None:
    try:
        vlfeat.library()
    except vlfeat.VLFeatUnavailable as exc:
        pytest.skip(f"VLFeat reference unavailable: {exc}")


def grey_photo(name: str, size: tuple[int, int]) -> np.ndarray:
    """The photograph resized to ``size`` as grey levels 0-255 (float32); integer levels at 75×99."""
    image = getattr(skimage_data, name)()
    if image.ndim == 3:
        image = rgb2gray(image)
    else:
        image = image / 255.0
    grey = resize(image, size, anti_aliasing=True) * 255.0
    if size == SIZES[0]:
        grey = np.round(grey)
    return grey.astype(np.float32)


@pytest.fixture(scope="module")
def photos() -> dict[tuple[str, tuple[int, int]], np.ndarray]:
    return {(name, size): grey_photo(name, size) for name in PHOTOS for size in SIZES}


def run(module: torch.nn.Module, grey: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(grey)[None, None])[0].numpy()


def assert_parity(ours: np.ndarray, ref: np.ndarray, what: str) -> tuple[float, float]:
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs reference {ref.shape}"
    rel = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    worst = float(np.abs(ours - ref).max() / np.abs(ref).max())
    assert rel < TOLERANCE and worst < TOLERANCE, f"{what}: relative error {rel:.2e}, worst {worst:.2e}"
    return rel, worst


def report(what: str, errors: list[tuple[float, float]]) -> None:
    rel, worst = np.max(np.array(errors), axis=0)
    print(f"{what}: max relative error {rel:.2e}, max worst-element error {worst:.2e} ({len(errors)} images)")


@pytest.mark.parametrize("bilinear", [False, True], ids=["hog", "hogb"])
def test_uoctti_matches_vl_hog(photos, bilinear):
    _vlfeat_or_skip()
    full = HogUoctti(bilinear=bilinear, texture=True)
    paper = HogUoctti(bilinear=bilinear)  # the 27 dims the paper (and the exported model) keeps
    errors = []
    for (name, size), grey in photos.items():
        ref = vlfeat.vl_hog(grey, cell_size=8, num_orientations=9, variant=vlfeat.VL_HOG_UOCTTI, bilinear=bilinear)
        assert ref.shape == (31, (size[0] + 4) // 8, (size[1] + 4) // 8)
        errors.append(assert_parity(run(full, grey), ref, f"{name} {size}"))
        assert_parity(run(paper, grey), ref[:27], f"{name} {size} (27 dims)")
    report(f"UoCTTI bilinear={bilinear}", errors)


def test_dsift_matches_vl_dsift(photos):
    _vlfeat_or_skip()
    errors = []
    for bin_size, step in ((8, 4), (5, 3)):
        module = DenseSift(bin_size=bin_size, step=step)
        for (name, size), grey in photos.items():
            ref = vlfeat.vl_dsift(grey, bin_size=bin_size, step=step)
            errors.append(assert_parity(run(module, grey), ref, f"{name} {size} bin {bin_size} step {step}"))
    report("DSIFT", errors)


@pytest.mark.parametrize("block", [2, 3])
def test_dalal_triggs_matches_skimage(photos, block):
    module = HogDalalTriggs(cell_size=8, num_orientations=9, block_size=block)
    errors = []
    for (name, size), grey in photos.items():
        ref = skimage_hog(
            grey,
            orientations=9,
            pixels_per_cell=(8, 8),
            cells_per_block=(block, block),
            block_norm="L2-Hys",
            feature_vector=False,
        )
        ref = ref.reshape(ref.shape[0], ref.shape[1], -1).transpose(2, 0, 1)  # (b, b, n) → channels first
        errors.append(assert_parity(run(module, grey), ref, f"{name} {size}"))
    report(f"Dalal-Triggs block {block}", errors)


def test_vl_hog_tie_break_on_vertical_gradients():
    """A pure vertical gradient is exactly halfway between the 80° and 100° bins; vl_hog keeps the one it
    scans first. Our hard assignment must pick the same bin, not merely a close one."""
    _vlfeat_or_skip()
    ramp = np.repeat(np.arange(40, dtype=np.float32)[:, None] * 3.0, 36, axis=1)  # grows downwards
    for image in (ramp, ramp[::-1].copy()):
        ref = vlfeat.vl_hog(image, variant=vlfeat.VL_HOG_UOCTTI)
        ours = run(HogUoctti(texture=True), image)
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
        directed = ours[:18].sum(axis=(1, 2))
        assert np.count_nonzero(directed) == 1  # one bin takes every vote


def test_vl_hog_bin_boundary_uses_raw_gradient_scores():
    """A gradient at 110° (between the 100° and 120° bins) whose float32 scores differ in the last bit.
    The libvl build scores the raw gradient (not the unit vector), which picks 100° here; scoring the
    unit vector would pick 120°. Found on ``astronaut`` at 130×170."""
    _vlfeat_or_skip()
    image = np.zeros((12, 12), dtype=np.float32)
    image[5, 6], image[6, 5] = -32.89965, 90.39099  # gradient (gx, gy) at pixel (5, 5)
    ref = vlfeat.vl_hog(image, variant=vlfeat.VL_HOG_UOCTTI)
    ours = run(HogUoctti(texture=True), image)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)
    assert ref[5].sum() > 0 and ref[6].sum() == 0


def _corner_bump() -> tuple[np.ndarray, np.ndarray]:
    base = np.random.default_rng(0).uniform(0, 255, size=(35, 43)).astype(np.float32)
    bumped = base.copy()
    bumped[0, 0] += 100.0
    return base, bumped


def test_border_conventions():
    """The references disagree about the image border, and each module follows its own reference:
    vl_hog gives the outermost pixels no gradient (a change confined to a corner pixel is invisible);
    skimage's Dalal-Triggs differentiates along the border line (the corner's neighbours see it);
    vl_dsift uses one-sided differences at the border (the corner itself sees it)."""
    base, bumped = _corner_bump()
    uoctti = HogUoctti(texture=True)
    assert np.array_equal(run(uoctti, base), run(uoctti, bumped))
    dalal = HogDalalTriggs()
    assert not np.allclose(run(dalal, base), run(dalal, bumped))
    sift = DenseSift(bin_size=5, step=3)
    assert not np.allclose(run(sift, base), run(sift, bumped))
    ref_dalal = [skimage_hog(im, 9, (8, 8), (2, 2), block_norm="L2-Hys", feature_vector=False) for im in (base, bumped)]
    assert not np.allclose(*ref_dalal)


def test_border_conventions_of_vlfeat():
    """The VLFeat half of test_border_conventions: the references behave as the modules do."""
    _vlfeat_or_skip()
    base, bumped = _corner_bump()
    assert np.array_equal(vlfeat.vl_hog(base), vlfeat.vl_hog(bumped))
    assert not np.allclose(vlfeat.vl_dsift(base, 5, 3), vlfeat.vl_dsift(bumped, 5, 3))
