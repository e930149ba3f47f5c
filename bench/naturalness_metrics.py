"""How natural does an image look, measured without a person: three image statistics.

SPEC.md ("Measuring how natural an image is") names them: the **spectrum slope**, the log-log
slope of the radially averaged power spectrum of the grey image (photographs −2.7…−3.1, white
noise 0), and the **contrast**, the std of the RGB values on the 0–255 scale (photographs 33–80).
A third, the **saturation** (the mean per-pixel RGB max − min), shows washed-out colour, which
the contrast (dominated by luminance) does not.
Visualizations of modern networks made with the paper's pixel-space priors come out flatter
(too much high-frequency energy, slope around −1.2) and greyer (contrast around 25); these two
numbers make that visible in a benchmark table.

Numpy only, so that a benchmark can compute them on any PNG without the service or torch.
"""

from __future__ import annotations

import numpy as np

REFERENCE_SIZE = 224
"""The image size at which the frequency band ``fmin``…``fmax`` is specified (cycles per image)."""

# ITU-R BT.601 luma weights: the usual "grey" of an sRGB image (PIL's convert("L") uses them too).
_LUMA = np.array([0.299, 0.587, 0.114])


def _grey(image_uint8: np.ndarray) -> np.ndarray:
    """H×W float64 luminance of an H×W or H×W×C (C = 3 or 4, alpha ignored) image."""
    arr = np.asarray(image_uint8)
    if arr.ndim == 2:
        return arr.astype(np.float64)
    if arr.ndim == 3 and arr.shape[2] in (1, 3, 4):
        if arr.shape[2] == 1:
            return arr[..., 0].astype(np.float64)
        return arr[..., :3].astype(np.float64) @ _LUMA
    raise ValueError(f"expected an H×W or H×W×3 image, got shape {arr.shape}")


def radial_power_spectrum(image_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(frequencies, mean power) of the windowed grey image over integer radial bins.

    Frequencies are in cycles per image measured on the shorter side (so a non-square image's two
    axes share one scale); bin k averages |F|² over the annulus k−0.5 ≤ f < k+0.5. The image mean
    is subtracted *before* the 2-D Hann window: otherwise the window turns the DC term into a
    strong low-frequency bump. The window itself removes the edge discontinuity of the periodic
    FFT (a cross of spurious power along both axes, whose size depends on what the borders hold);
    on the skimage photographs, leaving it out moves slopes by up to 0.3 in either direction.
    """
    grey = _grey(image_uint8)
    h, w = grey.shape
    if h < 8 or w < 8:
        raise ValueError(f"image too small for a spectrum: {h}×{w}")
    window = np.outer(np.hanning(h), np.hanning(w))
    spectrum = np.fft.fft2((grey - grey.mean()) * window)
    power = np.abs(spectrum) ** 2
    side = min(h, w)
    fy = np.fft.fftfreq(h) * side  # cycles per (shorter-side) image
    fx = np.fft.fftfreq(w) * side
    radius = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    bins = np.rint(radius).astype(np.int64).ravel()
    nbins = side // 2 + 1  # up to Nyquist; the corners beyond it are dropped
    keep = bins < nbins
    total = np.bincount(bins[keep], weights=power.ravel()[keep], minlength=nbins)
    count = np.bincount(bins[keep], minlength=nbins)
    freqs = np.arange(nbins, dtype=np.float64)
    mean = np.divide(total, count, out=np.zeros(nbins), where=count > 0)
    return freqs, mean


def spectrum_slope(image_uint8: np.ndarray, fmin: float = 4, fmax: float = 80) -> float:
    """Least-squares slope of log(power) against log(frequency) over fmin…fmax cycles per image.

    ``fmin``/``fmax`` are given at 224 px and scaled by min(H, W)/224, so the same band of the
    scene is measured at any resolution (a 448 px image uses bins 8…160). The band skips the
    lowest frequencies (dominated by the layout of the scene and the window) and the highest
    (JPEG quantization, resampling filters and aliasing). A scale-invariant scene (amplitude
    ~ 1/f) would give −2; photographs measure steeper, −2.7…−3.1 in SPEC.md (here, centre-cropped
    and bicubic-resized to 224: astronaut −2.72, chelsea −3.02, coffee −3.08, rocket −2.84,
    camera −2.52), partly because optics, JPEG and the downsampling filter all attenuate the top
    of the band. White noise is flat (0); blur makes the slope steeper, a high-frequency texture
    flatter. The value depends on how the image was resampled: compare images prepared alike.

    Returns NaN when the band holds no power (a constant image), since no slope is defined then.
    """
    freqs, power = radial_power_spectrum(image_uint8)
    side = min(np.asarray(image_uint8).shape[:2])
    scale = side / REFERENCE_SIZE
    lo, hi = fmin * scale, fmax * scale
    band = (freqs >= lo) & (freqs <= hi) & (freqs > 0)
    if band.sum() < 3:
        raise ValueError(f"band {lo:.1f}…{hi:.1f} cycles/image holds fewer than 3 bins for a {side} px image")
    if not np.all(power[band] > 0):
        return float("nan")
    slope, _ = np.polyfit(np.log(freqs[band]), np.log(power[band]), 1)
    return float(slope)


def contrast(image_uint8: np.ndarray) -> float:
    """Std of all RGB values on the 0–255 scale (photographs: 33–80; a constant image: 0).

    One std over every pixel and channel together (not a per-channel mean of stds), so colour
    differences count as contrast too, as they do for the eye. Pass the uint8 image, not a
    normalized tensor: the published ranges are on the 0–255 scale.
    """
    arr = np.asarray(image_uint8)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    return float(arr.astype(np.float64).std())


def saturation(image_uint8: np.ndarray) -> float:
    """Mean colourfulness: the per-pixel max − min of R, G and B on the 0–255 scale (0 for a grey
    image; the colour photographs in scikit-image give 41–107)."""
    arr = np.asarray(image_uint8)
    if arr.ndim != 3 or arr.shape[2] < 3:
        return 0.0
    rgb = arr[..., :3].astype(np.float64)
    return float((rgb.max(axis=2) - rgb.min(axis=2)).mean())
