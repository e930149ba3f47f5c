"""Transformation robustness: random views of an image, each step, seeded by the problem.

An image that excites a unit only at one exact position, scale and angle is an adversarial
pattern, not a picture; asking that the unit fire on randomly shifted, scaled, rotated and cropped
views of the image (and averaging the loss over several views per step) is what makes
parameterized visualizations look like objects (lucid's ``standard_transforms``; MACO's zoomed
crops). Every view is one affine warp (translation, scale, rotation and crop composed into one
matrix, one ``grid_sample``), so the cost does not grow with the number of transformations.
Pixels from outside the image read as 0, the mean colour of energy space (lucid pads with grey).

All random numbers come from the row's own generators, so a problem's views depend only on its
seed, never on which other problems share its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ViewSettings:
    """How a problem's views are drawn (the resolved EnergyParams fields of the same names)."""

    copies: int = 1  # views per step; the loss is their mean
    translate: float = 0.0  # largest shift, pixels, uniform in ±translate
    scale_min: float = 1.0  # zoom factor, uniform in [scale_min, scale_max]
    scale_max: float = 1.0
    rotate: float = 0.0  # largest rotation, degrees, uniform in ±rotate
    crop_start: float = 1.0  # side of the random crop, as a fraction of the image, at the first step
    crop_end: float = 1.0  # … and at the last step (linear in between: MACO's shrinking box)
    crop_spread: float = 0.15  # std of the crop centre around the image centre, fraction of the side
    noise: float = 0.0  # std of additive Gaussian noise (plus uniform noise of the same width), 0–1 units

    @property
    def identity(self) -> bool:
        return (
            self.translate == 0 and self.scale_min == self.scale_max == 1 and self.rotate == 0
            and self.crop_start == self.crop_end == 1 and self.noise == 0
        )  # fmt: skip


def affine_matrices(
    settings: ViewSettings, generator: torch.Generator, height: int, width: int, progress: float
) -> torch.Tensor:
    """``copies`` 2×3 matrices mapping output to input coordinates (``affine_grid``'s convention).

    ``progress`` (0 at the first step, 1 at the last) moves the crop size from crop_start to
    crop_end. Seven numbers per view are drawn from ``generator`` whatever the settings, so a
    change of one setting leaves the draws of the others where they were.
    """
    n = settings.copies
    u = torch.rand((n, 5), generator=generator, dtype=torch.float64)
    z = torch.randn((n, 2), generator=generator, dtype=torch.float64)
    box = crop_side(settings, progress)
    # Crop: the centre stays where the whole box is inside the image.
    room = (1.0 - box) / 2
    cy = (z[:, 0] * settings.crop_spread).clamp(-room, room) * 2  # normalized coordinates, [-1, 1]
    cx = (z[:, 1] * settings.crop_spread).clamp(-room, room) * 2
    scale = settings.scale_min + (settings.scale_max - settings.scale_min) * u[:, 0]
    angle = (u[:, 1] * 2 - 1) * math.radians(settings.rotate)
    ty = (u[:, 2] * 2 - 1) * settings.translate * 2 / height
    tx = (u[:, 3] * 2 - 1) * settings.translate * 2 / width
    k = box / scale  # input extent per unit of output
    cos, sin = torch.cos(angle) * k, torch.sin(angle) * k
    # Rotation in pixel units: correct the off-diagonal terms for a non-square image.
    aspect = width / height
    theta = torch.zeros((n, 2, 3), dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos, -sin / aspect, cx + tx
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin * aspect, cos, cy + ty
    return theta.float()


def crop_side(settings: ViewSettings, progress: float) -> float:
    """The crop's side, as a fraction of the image, at ``progress`` (0 at the first step, 1 at the last)."""
    box = settings.crop_start + (settings.crop_end - settings.crop_start) * min(max(progress, 0.0), 1.0)
    return min(max(box, 0.02), 1.0)


def views(
    x: torch.Tensor,
    settings: ViewSettings,
    generator: torch.Generator,
    noise_generator: torch.Generator | None,
    progress: float,
    out_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``copies`` random views (copies×C×h×w) of one energy-space image x (C×H×W), differentiable.

    ``out_size`` (h, w), default (H, W): a view of a larger image (a canvas) is resampled to it."""
    c, h, w = x.shape
    oh, ow = out_size or (h, w)
    if settings.identity and (oh, ow) == (h, w):
        return x[None].expand(settings.copies, c, h, w)
    theta = affine_matrices(settings, generator, h, w, progress).to(x.device)
    # Bilinear sampling reads 2×2 pixels per output pixel: where a view spans s source pixels per
    # output pixel, it aliases the rest. Sampling a copy averaged over k×k blocks, k the integer
    # nearest s, keeps the span under 1.5 (normalized coordinates make the geometry the same at
    # both sizes), for a fraction of what an antialiased resample of every view costs.
    k = max(1, round(crop_side(settings, progress) * max(h / oh, w / ow) / settings.scale_min))
    source = F.interpolate(x[None], size=(-(-h // k), -(-w // k)), mode="area")[0] if k > 1 else x
    grid = F.affine_grid(theta, [settings.copies, c, oh, ow], align_corners=False)
    out = F.grid_sample(
        source[None].expand(settings.copies, *source.shape), grid, mode="bilinear", padding_mode="zeros",
        align_corners=False,
    )  # fmt: skip
    if settings.noise > 0:
        sigma = settings.noise * 255.0
        gaussian = torch.randn(out.shape, generator=noise_generator, device=out.device, dtype=out.dtype)
        uniform = torch.rand(out.shape, generator=noise_generator, device=out.device, dtype=out.dtype)
        out = out + gaussian * sigma + (uniform - 0.5) * sigma
    return out
