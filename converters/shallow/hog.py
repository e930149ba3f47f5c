"""HOG as differentiable torch modules: the UoCTTI variant of VLFeat's ``vl_hog`` (hard and bilinear
orientation assignment, i.e. the paper's "HOG" and "HOGb") and the Dalal-Triggs variant as
``skimage.feature.hog`` computes it.

Inputs are grey images ``B×1×H×W``. Both variants are invariant to adding a constant to the image and
nearly invariant to scaling it (only the small normalisation constants see the scale); the exported
models take grey levels on the 0-255 scale (see ``converters/shallow/export.py``).

Orientation *choices* (which bin a pixel votes for under hard assignment) are piecewise constant and
carry no gradient; the vote *magnitudes*, the bilinear weights and the normalisation do. This is the
same situation the paper's HOG inversion was in.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from converters.shallow.common import bin_cells_bilinear, cap, magnitude, triangle_cell_kernel


def _channel_table(values: np.ndarray) -> torch.Tensor:
    """Per-channel constants (computed in double, stored as float32 like VLFeat's tables): 1×K×1×1."""
    return torch.tensor(np.asarray(values).astype(np.float32)).view(1, -1, 1, 1)


class HogUoctti(torch.nn.Module):
    """UoCTTI HOG (Felzenszwalb et al., DPM v5) as ``vl_hog`` computes it on a grey image.

    Output ``B×D×h×w`` with ``h = (H + c//2) // c`` (same for ``w``) and, per cell, ``D = 3n`` (``n``
    = ``num_orientations``): ``2n`` directed then ``n`` undirected orientation channels, plus 4 texture
    channels when ``texture`` is true (``D = 3n + 4``), in VLFeat's order.

    Conventions shared with vl_hog (and tested against it):
    - the gradient is the central difference ``I(x+1) - I(x-1)`` (no 1/2); the one-pixel image border
      has no gradient and votes for nothing;
    - orientation ``k`` of ``2n`` points at angle ``k·π/n``, clockwise from +x (y points down);
    - hard assignment picks the directed bin whose unit vector has the largest dot product with the
      gradient, ties going to the earlier axis, computed in float32 exactly as vl_hog does,
      so integer-valued images (where pure vertical gradients sit exactly between two bins) agree;
    - votes are spread bilinearly over the four nearest cell centres;
    - each cell is divided by the L2 norms (+1e-4 inside the root) of the four 2×2 blocks of
      undirected histograms around it, with replicated histograms past the border, clamped at 0.2,
      and the four copies are summed and halved.

    ``bilinear=True`` ("HOGb") splits each vote between the two directed bins whose directions bracket
    the gradient, linearly in angle. vl_hog derives that angle from ``acos`` of a float32 dot product,
    which loses precision near a bin centre; this module measures it with ``atan`` of the sine/cosine
    ratio instead (same value in exact arithmetic, smooth derivative), so HOGb agrees with vl_hog's
    bilinear mode to about 2e-5 (relative) rather than to float rounding.
    """

    def __init__(
        self, cell_size: int = 8, num_orientations: int = 9, bilinear: bool = False, texture: bool = False
    ) -> None:
        super().__init__()
        if cell_size < 1 or num_orientations < 1:
            raise ValueError("cell_size and num_orientations must be positive")
        self.cell_size = int(cell_size)
        self.num_orientations = n = int(num_orientations)
        self.bilinear = bool(bilinear)
        self.texture = bool(texture)
        # vl_hog's direction table: angles k·π/n evaluated in double, stored as float32.
        angles = np.arange(n, dtype=np.float64) * math.pi / n
        self.register_buffer("axis_cos", _channel_table(np.cos(angles)))
        self.register_buffer("axis_sin", _channel_table(np.sin(angles)))
        self.register_buffer("axes", torch.arange(n, dtype=torch.float32).view(1, n, 1, 1))
        k1 = torch.tensor(triangle_cell_kernel(self.cell_size))
        self.register_buffer("cell_kernel", torch.outer(k1, k1).expand(2 * n, 1, -1, -1).contiguous())

    @property
    def dimension(self) -> int:
        return 3 * self.num_orientations + (4 if self.texture else 0)

    def _orientation_weights(self, gx: torch.Tensor, gy: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        """B×2n×h×w weights of each pixel's vote over the directed bins."""
        n = self.num_orientations
        # Work per undirected axis k (n channels, half the work of 2n directions): the gradient's
        # component along the axis picks the direction (bin k if positive, k + n if negative).
        if not self.bilinear:
            # vl_hog scans the axes in order and keeps the first largest |score| (strict ">"). VLFeat
            # 0.9.21 (as compiled in libvl.so) scores the raw gradient, not the unit vector; the two
            # differ in the last float bit, which decides gradients lying on a bin boundary.
            # The scan is unrolled (n elementwise steps on one channel), which is several times faster
            # than torch.argmax across channels on a CPU.
            score = gx.detach() * self.axis_cos + gy.detach() * self.axis_sin  # B×n×h×w
            strength = torch.abs(score)
            best_value = strength[:, 0:1]
            best = torch.zeros_like(best_value)
            for k in range(1, n):
                better = strength[:, k : k + 1] > best_value
                best_value = torch.where(better, strength[:, k : k + 1], best_value)
                best = torch.where(better, torch.full_like(best, float(k)), best)
            onehot = (best == self.axes).to(gx.dtype)
            negative = (score < 0).to(gx.dtype)
            return torch.cat([onehot * (1.0 - negative), onehot * negative], dim=1)
        # Bilinear: the angle between the gradient and axis k's line is atan(|across| / |along|); only the
        # axes closer than π/n get weight, linearly in the angle (the two bracketing directions).
        along = gx * self.axis_cos + gy * self.axis_sin
        across = torch.abs(gy * self.axis_cos - gx * self.axis_sin)
        reach = torch.abs(along)
        nonzero = reach > 0
        safe = torch.where(nonzero, reach, torch.ones_like(reach))  # no 0/0 even in the branch not taken
        weight = torch.relu(1.0 - torch.atan(across / safe) * (n / math.pi))
        weight = torch.where(nonzero, weight, torch.zeros_like(weight))
        forward = torch.where(along > 0, weight, torch.zeros_like(weight))
        return torch.cat([forward, weight - forward], dim=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        n = self.num_orientations
        gx = image[:, :, 1:-1, 2:] - image[:, :, 1:-1, :-2]
        gy = image[:, :, 2:, 1:-1] - image[:, :, :-2, 1:-1]
        g2 = gx * gx + gy * gy
        votes = magnitude(g2) * self._orientation_weights(gx, gy, g2)
        hist = bin_cells_bilinear(votes, self.cell_size, self.cell_kernel, border=1, channels=2 * n)

        undirected = hist[:, :n] + hist[:, n:]
        energy = torch.sum(undirected * undirected, dim=1, keepdim=True)
        # Sums over the 2×2 blocks of cells around every cell corner; blocks that stick out of the
        # grid reuse the border cells (vl_hog clamps indices), hence edge padding.
        padded = F.pad(energy, (1, 1, 1, 1), mode="replicate")
        blocks = padded[:, :, :-1, :-1] + padded[:, :, :-1, 1:] + padded[:, :, 1:, :-1] + padded[:, :, 1:, 1:]
        factors = [1.0 / torch.sqrt(b + 1e-4) for b in self._corners(blocks)]
        directed = 0.5 * sum(cap(f * hist, 0.2) for f in factors)
        clamped_und = [cap(f * undirected, 0.2) for f in factors]
        parts = [directed, 0.5 * sum(clamped_und)]
        if self.texture:
            scale = 1.0 / math.sqrt(18.0)  # vl_hog's constant, whatever the number of orientations
            parts.append(torch.cat([scale * torch.sum(c, dim=1, keepdim=True) for c in clamped_und], dim=1))
        return torch.cat(parts, dim=1)

    @staticmethod
    def _corners(blocks: torch.Tensor) -> list[torch.Tensor]:
        """The four blocks containing each cell: up-left, up-right, down-left, down-right (vl_hog order)."""
        return [blocks[:, :, :-1, :-1], blocks[:, :, :-1, 1:], blocks[:, :, 1:, :-1], blocks[:, :, 1:, 1:]]


class HogDalalTriggs(torch.nn.Module):
    """Dalal-Triggs HOG as ``skimage.feature.hog`` computes it on a grey image (L2-Hys blocks).

    Output ``B×(b·b·n)×rows×cols``: one channel per (block row offset, block column offset,
    orientation), one position per block, i.e. skimage's ``feature_vector=False`` array
    ``(rows, cols, b, b, n)`` moved channels-first. With ``H//c`` cells, ``rows = H//c - b + 1``.

    Conventions shared with skimage (and tested against it), which differ from vl_hog's:
    - gradients are ``I(x+1) - I(x-1)`` along each axis separately and 0 on that axis's first and last
      line, so border pixels still vote with their other component;
    - undirected orientation ``θ = atan2(gy, gx) mod 180°``; bin ``i`` holds ``[i, i+1)·180°/n``;
      hard assignment, decided here by signs of cross products with the bin edges (the same
      comparison, without atan2, which ONNX lacks);
    - each cell sums the magnitudes of its own ``c×c`` pixels (no spatial interpolation); pixels past
      the last whole cell are ignored;
    - blocks of ``b×b`` cells, stride one cell, L2-Hys: ``v/√(‖v‖²+ε²)``, clamp 0.2, again, ε = 1e-5.
    """

    def __init__(self, cell_size: int = 8, num_orientations: int = 9, block_size: int = 2) -> None:
        super().__init__()
        self.cell_size = int(cell_size)
        self.num_orientations = n = int(num_orientations)
        self.block_size = int(block_size)
        # Bin edges i·180/n degrees (skimage compares with float32 edges).
        edges = np.deg2rad(np.float32(180.0 / n) * np.arange(1, n, dtype=np.float32).astype(np.float64))
        self.register_buffer("edge_cos", _channel_table(np.cos(edges)))
        self.register_buffer("edge_sin", _channel_table(np.sin(edges)))
        c = self.cell_size
        self.register_buffer("box", torch.ones(n, 1, c, c))

    @property
    def dimension(self) -> int:
        return self.block_size * self.block_size * self.num_orientations

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        n, b = self.num_orientations, self.block_size
        gy = F.pad(image[:, :, 2:, :] - image[:, :, :-2, :], (0, 0, 1, 1))
        gx = F.pad(image[:, :, :, 2:] - image[:, :, :, :-2], (1, 1, 0, 0))
        mag = magnitude(gx * gx + gy * gy)
        # Fold directed gradients onto [0°, 180°): a gradient pointing up (gy < 0, or along -x) is flipped.
        flip = (gy < 0) | ((gy == 0) & (gx < 0))
        fx = torch.where(flip, -gx, gx).detach()
        fy = torch.where(flip, -gy, gy).detach()
        # θ ≥ edge  ⇔  sin(θ - edge) ≥ 0 for θ, edge in [0°, 180°).
        # (``~(a < 0)`` rather than ``a >= 0``: onnx2torch 1.5.15 lacks GreaterOrEqual-16.)
        past = (~(fy * self.edge_cos - fx * self.edge_sin < 0)).to(image.dtype)  # B×(n-1)×H×W
        ones = torch.ones_like(mag)
        zeros = torch.zeros_like(mag)
        at_least = torch.cat([ones, past], dim=1)
        beyond = torch.cat([past, zeros], dim=1)
        votes = mag * (at_least - beyond)  # one-hot over the n bins
        hist = F.conv2d(votes, self.box, stride=self.cell_size, groups=n)  # B×n×(H//c)×(W//c)

        rows, cols = hist.shape[2], hist.shape[3]
        pieces = []
        for dy in range(b):
            for dx in range(b):
                pieces.append(hist[:, :, dy : rows - (b - 1) + dy, dx : cols - (b - 1) + dx])
        blocks = torch.cat(pieces, dim=1)
        eps2 = 1e-10
        blocks = blocks / torch.sqrt(torch.sum(blocks * blocks, dim=1, keepdim=True) + eps2)
        blocks = cap(blocks, 0.2)
        return blocks / torch.sqrt(torch.sum(blocks * blocks, dim=1, keepdim=True) + eps2)
