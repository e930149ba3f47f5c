"""Pieces shared by the shallow representations (HOG, dense SIFT).

Everything here is written with plain tensor ops that the legacy ONNX exporter turns into standard
ONNX nodes (Slice, Pad, Conv, Mul, Where, ...) which onnx2torch converts back, so a shallow model can
be served like any uploaded model. Input images are ``B×1×H×W`` grey levels.
"""

from __future__ import annotations

import numpy as np
import torch

# Below this squared gradient norm a pixel counts as flat. Only exact zeros fall below it for images
# on the 0-255 (or even 0-1) scale, so the value never changes a feature; it exists so that the
# backward pass of the magnitude stays finite where the gradient vanishes.
_TINY = 1e-20


def magnitude(g2: torch.Tensor) -> torch.Tensor:
    """sqrt(g2), exactly 0 where g2 == 0, with a finite derivative everywhere.

    ``torch.sqrt`` has an infinite derivative at 0, and 0·inf gives NaN in the backward pass of every
    flat pixel; dividing by the clamped root keeps the forward value and the gradient finite.
    """
    return g2 / torch.sqrt(floor(g2, _TINY))


def cap(x: torch.Tensor, limit: float) -> torch.Tensor:
    """min(x, limit), the clamp of HOG/SIFT normalisation.

    Spelled as an elementwise minimum (ONNX ``Min``) rather than ``clamp(max=)``: a one-sided clamp
    exports as ``Clip`` with an empty optional input, which onnx2torch 1.5.15 cannot convert.
    """
    return torch.minimum(x, torch.tensor(limit, dtype=x.dtype))


def floor(x: torch.Tensor, limit: float) -> torch.Tensor:
    """max(x, limit), exported as ONNX ``Max`` (see ``cap``)."""
    return torch.maximum(x, torch.tensor(limit, dtype=x.dtype))


def triangle_cell_kernel(cell_size: int) -> np.ndarray:
    """1-D bilinear (triangle) weights that spread a pixel over the two nearest cell centres.

    Cell ``j`` is centred at pixel ``(j + 0.5)·c - 0.5``; a pixel at distance ``d`` (pixels) from a
    centre gives it weight ``max(0, 1 - d/c)``. Written as a strided convolution: output ``j`` reads
    the ``2c`` pixels starting at ``j·c - c//2``; tap ``i`` is pixel ``j·c - c//2 + i``.
    """
    c = cell_size
    taps = np.arange(2 * c, dtype=np.float64)
    offset = (taps - c // 2 + 0.5) / c - 0.5  # position relative to the centre, in cells
    return np.maximum(0.0, 1.0 - np.abs(offset)).astype(np.float32)


def bin_cells_bilinear(
    votes: torch.Tensor, cell_size: int, kernel: torch.Tensor, border: int, channels: int
) -> torch.Tensor:
    """Accumulate per-pixel ``votes`` (B×K×h×w) into cells by bilinear spatial interpolation.

    ``votes`` covers the image minus ``border`` pixels on every side (the pixels where a gradient is
    defined). The result has ``(size + c//2) // c`` cells along each axis, the cell grid anchored at
    the image's top-left corner, and votes falling beyond the last cell are dropped, as in vl_hog.
    ``kernel`` is the 2-D (outer product) triangle kernel, shaped K×1×2c×2c, K = ``channels``.
    """
    c = cell_size
    left = c // 2 + border
    right = c + border  # see triangle_cell_kernel: this many zeros make the count (n + c//2) // c
    padded = torch.nn.functional.pad(votes, (left, right, left, right))
    return torch.nn.functional.conv2d(padded, kernel, stride=c, groups=channels)
