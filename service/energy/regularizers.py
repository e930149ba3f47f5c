"""The image priors of the energy: α-norm, TV^β, the bounded range B₊ and jitter.

All of them work on a batch ``x`` of mean-subtracted RGB images (B×3×H×W, 0-255 scale) with a
per-row hyperparameter given as a tensor broadcastable to (B,), so one call serves a batch of
independent problems.
"""

from __future__ import annotations

import torch

# Keeps the gradient of s^(β/2) finite where the image is locally flat (β < 2).
_TV_EPS = 1e-6


def alpha_norm(x: torch.Tensor, alpha: torch.Tensor, b_norm: torch.Tensor) -> torch.Tensor:
    """R_α(x) = 1/(H·W·B^α) Σ_u ‖x(u)‖^α, per row; ‖·‖ is the RGB-vector norm."""
    norm = x.pow(2).sum(dim=1).add(1e-12).sqrt()  # B×H×W
    ratio = norm / b_norm.view(-1, 1, 1)
    return ratio.pow(alpha.view(-1, 1, 1)).mean(dim=(1, 2))


def total_variation(x: torch.Tensor, beta: torch.Tensor, tv_norm: torch.Tensor) -> torch.Tensor:
    """R_V(x) = 1/(H·W·V^β) Σ_u ((x(u+e1)−x(u))² + (x(u+e2)−x(u))²)^(β/2), per row.

    The squared differences are summed over the colour channels inside the power, as in the
    paper's definition on vector-valued images.
    """
    h, w = x.shape[-2:]
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    s = (dx.pow(2) + dy.pow(2)).sum(dim=1) / tv_norm.view(-1, 1, 1).pow(2)
    return (s + _TV_EPS).pow(beta.view(-1, 1, 1) / 2).sum(dim=(1, 2)) / (h * w)


@torch.no_grad()
def project_bounded(x: torch.Tensor, bound: torch.Tensor) -> None:
    """In place: scale every pixel's RGB vector down to norm ≤ bound (the set B₊)."""
    norm = x.pow(2).sum(dim=1, keepdim=True).sqrt()
    x.mul_(torch.clamp(bound.view(-1, 1, 1, 1) / norm.clamp_min(1e-12), max=1.0))


def jitter_crop(x: torch.Tensor, offsets: list[tuple[int, int]], height: int, width: int) -> torch.Tensor:
    """Crop each row of the padded variable at its own (dy, dx) offset: the random shift."""
    if all(o == (0, 0) for o in offsets) and x.shape[-2:] == (height, width):
        return x
    return torch.stack([x[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)])


def jitter_offset(generator: torch.Generator, jitter: int) -> tuple[int, int]:
    """A shift of 0…T−1 pixels in each direction, drawn from the row's own generator."""
    if jitter <= 1:
        return (0, 0)
    dy, dx = torch.randint(0, jitter, (2,), generator=generator).tolist()
    return int(dy), int(dx)
