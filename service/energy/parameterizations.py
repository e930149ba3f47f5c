"""Image parameterizations: the image the network sees as a function of the optimized variable.

The paper optimizes pixels directly (``pixel``, handled by the minimizer's closed-form fast path).
On networks with ReLU6/SiLU, depthwise convolutions or attention that gives grey high-frequency
textures; later work changed *what is optimized* (SPEC.md "Beyond the paper"):

- ``fourier``: the image is the inverse real FFT of a learned spectrum whose frequencies are
  scaled by 1/max(f, 1/max(H, W))^d, so low frequencies dominate from the start; colour lives in
  a decorrelated space and is mapped back through the square root of ImageNet's colour
  covariance; a sigmoid bounds the result.
- ``phase`` (MACO): the amplitude spectrum is fixed to the mean amplitude of natural images and
  only the phase is optimized; phase and image are standardized before the colour map and the
  sigmoid (chroma at twice the luminance's gain, the sigmoid centred on photographs' mean
  colour). The image's power spectrum is then that of photographs by construction.

Each works for 1, 3 or N channels (colour decorrelation only applies to 3) and any size. Images
come out in [0, 1]; ``to_energy`` maps them to the mean-subtracted 0–255 space the rest of the
project uses (a 1-channel image is repeated over the three energy channels, which grey models
average back).
"""

from __future__ import annotations

import math

import torch

from service.energy.params import ParameterizationName

# Square root of ImageNet's colour covariance (lucid's ``color_correlation_svd_sqrt``), columns
# scaled so the largest has unit norm: a unit step in decorrelated space is at most one unit of
# colour.
_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOR_CORRELATION = _COLOR_SQRT / _COLOR_SQRT.norm(dim=0).max()

# The std of a phase uniform in [−π, π).
_UNIFORM_PHASE_STD = math.pi / math.sqrt(3)

# The phase image is standardized (std 1 in decorrelated colour) before the colour map and the
# sigmoid; at std 1 the sigmoid leaves a contrast of about 38 on the 0–255 scale, at the low end
# of photographs (33–80), and images look hazy. 1.6 gives about 50, their middle (bench/naturalness.py).
PHASE_CONTRAST = 1.6

# Colour images split that gain: the two chroma channels of the decorrelated space get 2×
# the luminance's. With one gain for all three the images were washed out (mean saturation, the
# RGB max − min per pixel, 33 on the bundled model against 41–107 for the colour photographs in
# scikit-image), and classes that a colour carries (goldfish orange, flamingo pink, strawberry red)
# had none; at 1.28 / 2.56 it is about 55 and the contrast stays near 46 (docs/energy.md).
PHASE_COLOUR_GAIN = (1.28, 2.56, 2.56)

# The mean colour of photographs (ImageNet's, 0–255). A phase-only image has no DC term, so
# without it every image averages to mid-grey, which is bluer than photographs' average.
PHOTO_MEAN_RGB = (124.0, 116.0, 104.0)

# Keeps the inverse sigmoid finite for saturated pixels of a start image.
_LOGIT_EPS = 1e-3


def _recorrelate(z: torch.Tensor) -> torch.Tensor:
    """Decorrelated colour → RGB for a C×H×W tensor; identity unless C = 3."""
    if z.shape[0] != 3:
        return z
    return torch.einsum("ij,jhw->ihw", COLOR_CORRELATION.to(z.device, z.dtype), z)


def _decorrelate(rgb: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_recorrelate``."""
    if rgb.shape[0] != 3:
        return rgb
    inverse = torch.linalg.inv(COLOR_CORRELATION).to(rgb.device, rgb.dtype)
    return torch.einsum("ij,jhw->ihw", inverse, rgb)


def frequency_scale(height: int, width: int, decay: float) -> torch.Tensor:
    """1/max(f, 1/max(H, W))^d per rfft2 bin (H × W//2+1), f in cycles per pixel."""
    fy = torch.fft.fftfreq(height)[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    f = torch.sqrt(fx * fx + fy * fy)
    return 1.0 / torch.clamp(f, min=1.0 / max(height, width)) ** decay


def _standardize(t: torch.Tensor) -> torch.Tensor:
    return (t - t.mean()) / (t.std() + 1e-4)


class FourierImage:
    """A spectrum variable (C × H × W//2+1 × 2, real and imaginary parts) → C×H×W in [0, 1]."""

    def __init__(self, channels: int, height: int, width: int, decay: float = 1.0) -> None:
        self.channels, self.height, self.width = channels, height, width
        # √(HW) undoes irfft2's 1/(HW) normalization so the init scale does not depend on size;
        # the /4 keeps the sigmoid's input in its linear range at the start (lucid's constants).
        self.scale = frequency_scale(height, width, decay) * math.sqrt(height * width) / 4.0

    def init(self, generator: torch.Generator, start: torch.Tensor | None = None) -> torch.Tensor:
        """The variable: N(0, 0.01²) noise, or the spectrum that reproduces ``start`` (C×H×W, [0, 1])."""
        shape = (self.channels, self.height, self.width // 2 + 1, 2)
        if start is None:
            return torch.randn(shape, generator=generator) * 0.01
        p = start.float().clamp(0, 1)
        logit = torch.log((p + _LOGIT_EPS) / (1 - p + _LOGIT_EPS))
        spectrum = torch.fft.rfft2(_decorrelate(logit)) / self.scale
        return torch.view_as_real(spectrum).contiguous()

    def image(self, variable: torch.Tensor) -> torch.Tensor:
        spectrum = torch.view_as_complex(variable) * self.scale.to(variable.device)
        z = torch.fft.irfft2(spectrum, s=(self.height, self.width))
        return torch.sigmoid(_recorrelate(z))


class PhaseImage:
    """MACO: a phase variable (C × H × W//2+1) with a fixed amplitude → C×H×W in [0, 1]."""

    def __init__(self, magnitude: torch.Tensor, height: int, width: int) -> None:
        if magnitude.dim() != 3 or tuple(magnitude.shape[1:]) != (height, width // 2 + 1):
            raise ValueError(
                f"the amplitude spectrum must be C×{height}×{width // 2 + 1}, got {tuple(magnitude.shape)}"
            )
        self.magnitude = magnitude.float()
        self.channels, self.height, self.width = magnitude.shape[0], height, width
        mean = torch.tensor(PHOTO_MEAN_RGB).view(3, 1, 1) / 255.0
        self.colour_gain = torch.tensor(PHASE_COLOUR_GAIN).view(3, 1, 1)
        self.colour_centre = torch.log(mean / (1 - mean))  # the sigmoid's input at the mean colour

    def init(self, generator: torch.Generator, start: torch.Tensor | None = None) -> torch.Tensor:
        """The variable: phases uniform in [−π, π), or the phase of ``start`` (C×H×W, [0, 1])."""
        if start is None:
            uniform = torch.rand((self.channels, self.height, self.width // 2 + 1), generator=generator)
            return (uniform * 2 - 1) * math.pi
        return torch.angle(torch.fft.rfft2(_decorrelate(start.float())))

    def image(self, variable: torch.Tensor) -> torch.Tensor:
        # Standardized as in MACO, but to the spread of a uniform phase (std π/√3) rather than 1:
        # phases of std 1 rad are mostly near 0, so every frequency peaks at the origin and the
        # image gets a bright corner and lines along the axes through it.
        phase = _standardize(variable) * _UNIFORM_PHASE_STD
        magnitude = self.magnitude.to(variable.device)
        spectrum = torch.polar(magnitude, phase)
        z = _standardize(torch.fft.irfft2(spectrum, s=(self.height, self.width)))
        if z.shape[0] != 3:
            return torch.sigmoid(PHASE_CONTRAST * z)
        gain, centre = self.colour_gain.to(z.device, z.dtype), self.colour_centre.to(z.device, z.dtype)
        return torch.sigmoid(_recorrelate(gain * z) + centre)


def mean_amplitude(images: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """The mean |rfft2| of natural images (N×3×H×W in [0, 1]) in the decorrelated colour space
    the phase parameterization works in (C × H × W//2+1); grey for ``channels`` = 1."""
    if images.dim() != 4 or images.shape[0] < 1:
        raise ValueError("the amplitude spectrum needs at least one N×C×H×W image")
    if channels == 1:
        planes = images.float().mean(dim=1, keepdim=True)
    elif images.shape[1] == 3 and channels == 3:
        # Grey photographs carry no colour: averaged in, they would thin the colour channels'
        # amplitude and wash every image out. They count for colour models only when all are grey.
        colour = [im for im in images.float() if float((im - im.mean(dim=0, keepdim=True)).abs().max()) > 1e-3]
        planes = torch.stack([_decorrelate(im) for im in (colour or list(images.float()))])
    else:
        raise ValueError(f"amplitude spectra are computed for 1 or 3 channels, not {channels}")
    planes = planes - planes.mean(dim=(2, 3), keepdim=True)
    # A photograph is not periodic: its FFT puts the jump between opposite borders into a bright
    # cross on the frequency axes, which a fixed amplitude would paint into every image as a grid
    # of lines. The Hann window removes the jump (the periodic image gets the photos' texture).
    h, w = planes.shape[-2:]
    window = torch.hann_window(h, periodic=False)[:, None] * torch.hann_window(w, periodic=False)[None, :]
    amplitude = torch.fft.rfft2(planes * window).abs().mean(dim=0)
    # Half-way (in log amplitude) to the orientation average: a few photographs carry a few strong
    # orientations (a rocket's edges, a brick wall's rows) that a fixed amplitude stamps into every
    # image as streaks, while the fully isotropic amplitude gives objects that read as fur (measured
    # on the bundled model: docs/energy.md).
    return torch.sqrt(amplitude * _radial_mean(amplitude, w))


def resample_amplitude(magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An amplitude spectrum (C × h × w//2+1) carried to an image of ``height`` × ``width``, read at
    the same frequencies in cycles per pixel. The phase image standardizes what it renders, so only
    the spectrum's shape matters, and photographs' spectra are nearly scale-invariant: this stands in
    for the spectrum measured at that size when a caller has only the output's."""
    if tuple(magnitude.shape[1:]) == (height, width // 2 + 1):
        return magnitude
    centred = torch.fft.fftshift(magnitude.float(), dim=1)[None]
    out = torch.nn.functional.interpolate(centred, size=(height, width // 2 + 1), mode="bilinear", align_corners=True)
    return torch.fft.ifftshift(out[0], dim=1).clamp_min(0)


def _radial_mean(amplitude: torch.Tensor, width: int) -> torch.Tensor:
    """Each rfft2 bin (C × H × width//2+1) replaced by the mean over the bins at the same radial
    frequency, per channel."""
    height = amplitude.shape[1]
    fy = torch.fft.fftfreq(height)[:, None]
    fx = torch.fft.rfftfreq(width)[None, :]
    # Radius in cycles per image of the shorter side, so non-square images bin consistently.
    side = min(height, width)
    bins = torch.sqrt((fy * side) ** 2 + (fx * side) ** 2).round().long().flatten()
    count = torch.bincount(bins).clamp_min(1).float()
    flat = amplitude.reshape(amplitude.shape[0], -1)
    sums = torch.zeros(amplitude.shape[0], count.numel()).index_add_(1, bins, flat)
    return (sums / count)[:, bins].reshape(amplitude.shape)


def to_energy(image01: torch.Tensor, mean_rgb255: torch.Tensor) -> torch.Tensor:
    """C×H×W (or B×C×H×W) in [0, 1] → mean-subtracted 0–255 RGB (3 channels)."""
    batched = image01 if image01.dim() == 4 else image01[None]
    if batched.shape[1] == 1:
        batched = batched.expand(-1, 3, -1, -1)
    elif batched.shape[1] != 3:
        batched = batched[:, :3]
    out = batched * 255.0 - mean_rgb255.to(batched.device, batched.dtype).view(1, 3, 1, 1)
    return out if image01.dim() == 4 else out[0]


def from_energy(x: torch.Tensor, mean_rgb255: torch.Tensor, channels: int) -> torch.Tensor:
    """3×H×W energy space → C×H×W in [0, 1] (grey: the channel mean)."""
    rgb = ((x.float() + mean_rgb255.view(3, 1, 1).to(x.device)) / 255.0).clamp(0, 1)
    return rgb.mean(dim=0, keepdim=True) if channels == 1 else rgb


def make_parameterization(
    name: ParameterizationName,
    *,
    channels: int,
    height: int,
    width: int,
    decay: float = 1.0,
    magnitude: torch.Tensor | None = None,
) -> FourierImage | PhaseImage:
    """The parameterization ``name`` (not ``pixel``, which the minimizer handles itself)."""
    if name == "fourier":
        return FourierImage(channels, height, width, decay)
    if name == "phase":
        if magnitude is None:
            raise ValueError("the phase parameterization needs an amplitude spectrum (mean_amplitude of photographs)")
        if magnitude.shape[0] != channels:
            raise ValueError(f"the amplitude spectrum has {magnitude.shape[0]} channels, the image {channels}")
        if magnitude.dim() == 3:
            magnitude = resample_amplitude(magnitude, height, width)
        return PhaseImage(magnitude, height, width)
    raise ValueError(f"unknown parameterization {name!r}; choose from pixel, fourier, phase")
