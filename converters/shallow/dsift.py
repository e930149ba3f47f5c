"""Dense SIFT as a differentiable torch module, as VLFeat's ``vl_dsift_process`` computes it."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from converters.shallow.common import cap, magnitude

_EPS_F = float(np.finfo(np.float32).eps)  # VL_EPSILON_F, added to each descriptor norm
_TWO_PI_F = float(np.float32(2 * math.pi))


def vl_fast_atan2(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """VLFeat's cubic approximation of ``atan2(y, x)`` (error up to ~1e-3 rad), which vl_dsift uses.

    Reproduced rather than replaced by the exact function because the error is a sizeable fraction of
    an orientation bin (π/4), i.e. part of what vl_dsift computes. Smooth except on the ``x = 0`` and
    ``y = 0`` seams, where it stays continuous.
    """
    abs_y = torch.abs(y) + _EPS_F
    right = ~(x < 0)  # x >= 0, spelled without GreaterOrEqual-16 (missing in onnx2torch 1.5.15)
    # VLFeat's two branches, (x - |y|)/(x + |y|) for x >= 0 and (x + |y|)/(|y| - x) otherwise, share the
    # denominator |x| + |y| > 0. One division keeps the branch not taken from dividing by zero, whose
    # inf would turn into NaN in the backward pass of torch.where.
    r = (x - torch.where(right, abs_y, -abs_y)) / (torch.abs(x) + abs_y)
    base = torch.where(right, torch.full_like(x, math.pi / 4), torch.full_like(x, 3 * math.pi / 4))
    angle = base + (0.1821 * r * r - 0.9675) * r
    return torch.where(y < 0, -angle, angle)


def _bin_kernel(bin_size: int, num_bins: int, index: int, window_size: float) -> np.ndarray:
    """Weights of spatial bin ``index`` over offsets ``u = -(s-1)..(s-1)`` from its centre: the bilinear
    triangle times the Gaussian window centred on the descriptor (σ = window_size · bin_size)."""
    s = bin_size
    u = np.arange(-s + 1, s, dtype=np.float32)
    delta = np.float32(s * (index - 0.5 * (num_bins - 1)))
    sigma = np.float32(s) * np.float32(window_size)
    z = (u - delta) / sigma
    return ((1 - np.abs(u) / np.float32(s)) * np.exp(np.float32(-0.5) * z * z)).astype(np.float32)


class DenseSift(torch.nn.Module):
    """Dense SIFT descriptors on a regular grid (``vl_dsift`` with a Gaussian window).

    Output ``B×(T·N·N)×fy×fx`` (``T`` = 8 orientations, ``N`` = 4 spatial bins), one descriptor per frame,
    element ``(by·N + bx)·T + t`` as in vl_dsift. Frames have their top-left bin centre at
    ``(step·i, step·j)`` and span ``s·(N-1)+1`` pixels, so ``fx = (W - s·(N-1) - 1) // step + 1``.

    As in vl_dsift:
    - gradient = half the central difference, one-sided on the image's first/last row and column;
    - angle from VLFeat's fast atan2 approximation, split linearly between the two nearest of ``T``
      directions (k·2π/T, clockwise from +x since y points down);
    - each spatial bin weighs the magnitude by a triangle of half-width ``s`` around its centre and a
      Gaussian of σ = ``window_size·s`` around the descriptor centre; the image is extended by
      replicating its border for these sums;
    - descriptors are L2-normalised (+1.19e-7 on the norm), clamped at 0.2 and normalised again.
    vl_dsift takes the square roots with a Newton approximation (relative error ~5e-6); this module
    uses the exact root.
    """

    def __init__(
        self, bin_size: int = 8, step: int = 4, num_bins: int = 4, num_orientations: int = 8, window_size: float = 2.0
    ) -> None:
        super().__init__()
        if bin_size < 1 or step < 1:
            raise ValueError("bin_size and step must be positive")
        self.bin_size, self.step = int(bin_size), int(step)
        self.num_bins, self.num_orientations = int(num_bins), int(num_orientations)
        self.window_size = float(window_size)
        s, nb, t = self.bin_size, self.num_bins, self.num_orientations
        self.register_buffer("directions", torch.arange(t, dtype=torch.float32).view(1, t, 1, 1))
        # A frame reads pixels from (first bin centre - (s-1)) to (last bin centre + (s-1)): `span` taps.
        pad = s - 1
        span = s * (nb - 1) + 2 * pad + 1
        taps = np.zeros((nb, span), dtype=np.float32)
        for i in range(nb):
            # Tap r is pixel (frame start - pad + r); bin i's centre is pixel (frame start + i·s), so the
            # kernel offset is u = centre - pixel (vl_imconvcol convolves, it does not correlate).
            ker = _bin_kernel(s, nb, i, self.window_size)
            for r in range(span):
                u = i * s + pad - r
                if -pad <= u <= pad:
                    taps[i, r] = ker[u + pad]
        column = torch.tensor(taps)
        # Separable pooling: rows first (T groups → T·N channels (t, by)), then columns (→ (t, by, bx)).
        self.register_buffer("rows_kernel", column.repeat(t, 1).view(t * nb, 1, span, 1))
        self.register_buffer("cols_kernel", column.repeat(t * nb, 1).view(t * nb * nb, 1, 1, span))
        order = [(tt * nb + by) * nb + bx for by in range(nb) for bx in range(nb) for tt in range(t)]
        self.register_buffer("order", torch.tensor(order, dtype=torch.int64))
        self.pad = pad

    @property
    def dimension(self) -> int:
        return self.num_orientations * self.num_bins * self.num_bins

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        t, nb = self.num_orientations, self.num_bins
        gx = torch.cat(
            [
                image[:, :, :, 1:2] - image[:, :, :, 0:1],
                0.5 * (image[:, :, :, 2:] - image[:, :, :, :-2]),
                image[:, :, :, -1:] - image[:, :, :, -2:-1],
            ],
            dim=3,
        )
        gy = torch.cat(
            [
                image[:, :, 1:2, :] - image[:, :, 0:1, :],
                0.5 * (image[:, :, 2:, :] - image[:, :, :-2, :]),
                image[:, :, -1:, :] - image[:, :, -2:-1, :],
            ],
            dim=2,
        )
        g2 = gx * gx + gy * gy
        # vl_fast_sqrt_f returns 0 below 1e-8.
        mod = torch.where(g2 < 1e-8, torch.zeros_like(g2), magnitude(g2))
        angle = vl_fast_atan2(gy, gx)
        angle = torch.where(angle < 0, angle + _TWO_PI_F, angle)
        position = angle * (t / (2 * math.pi))  # in [0, T]: orientation in units of bins
        offset = position - self.directions  # B×T×H×W
        weight = torch.relu(1 - torch.abs(offset)) + torch.relu(1 - torch.abs(offset - t))
        votes = mod * weight
        votes = F.pad(votes, (self.pad, self.pad, self.pad, self.pad), mode="replicate")
        pooled = F.conv2d(votes, self.rows_kernel, stride=(self.step, 1), groups=t)
        pooled = F.conv2d(pooled, self.cols_kernel, stride=(1, self.step), groups=t * nb)
        descr = torch.index_select(pooled, 1, self.order)
        descr = descr / (_vl_sqrt(torch.sum(descr * descr, dim=1, keepdim=True)) + _EPS_F)
        descr = cap(descr, 0.2)
        return descr / (_vl_sqrt(torch.sum(descr * descr, dim=1, keepdim=True)) + _EPS_F)


def _vl_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with vl_fast_sqrt_f's cut-off: 0 below 1e-8 (an all-flat descriptor stays 0)."""
    return torch.where(x < 1e-8, torch.zeros_like(x), magnitude(x))
