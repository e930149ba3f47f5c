"""Directions w for activation maximization, with the paper's normalization.

The paper scales the one-hot selector of channel k by 1/(ρ² · M_k): ρ is the receptive field
of the layer in pixels (so the loss is per pixel of the region the unit sees, like the
regularizers, which are averages over pixels) and M_k the channel's largest activation on
natural images (so a unit that fires weakly is pushed as hard as one that fires strongly).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def _selector(feature_shape: Sequence[int], channel: int, position: tuple[int, ...] | None) -> torch.Tensor:
    shape = tuple(feature_shape)
    if not 0 <= channel < shape[0]:
        raise ValueError(f"channel {channel} is out of range: this tap has {shape[0]} channels (0–{shape[0] - 1})")
    w = torch.zeros(shape)
    spatial = shape[1:]
    if position is None:  # the centre of the map, as in the paper
        position = tuple(s // 2 for s in spatial)
    if len(position) != len(spatial) or any(not 0 <= p < s for p, s in zip(position, spatial, strict=True)):
        raise ValueError(f"position {tuple(position)} is outside the feature map of size {tuple(spatial)}")
    w[(channel, *position)] = 1.0
    return w


def channel_weights(
    feature_shape: Sequence[int],
    channel: int,
    *,
    receptive_field: int = 1,
    channel_max: float = 1.0,
    position: tuple[int, ...] | None = None,
    spatial: str = "centre",
) -> torch.Tensor:
    """w selecting channel k at the centre of the map (or ``position``), scaled 1/(ρ² M_k); with
    ``spatial="mean"``, the channel's mean over the whole map, scaled 1/M_k (lucid's "channel":
    the unit may fire anywhere, which suits images seen through random views).

    For a 1-D output such as the logits both select the class logit.
    """
    if spatial == "mean" and len(feature_shape) > 1 and position is None:
        w = torch.zeros(tuple(feature_shape))
        if not 0 <= channel < w.shape[0]:
            raise ValueError(
                f"channel {channel} is out of range: this tap has {w.shape[0]} channels (0–{w.shape[0] - 1})"
            )
        w[channel] = 1.0 / math.prod(feature_shape[1:])
        return w / _scale(1, channel_max)
    return _selector(feature_shape, channel, position) / _scale(receptive_field, channel_max)


def neuron_weights(
    feature_shape: Sequence[int],
    channel: int,
    position: tuple[int, ...],
    *,
    receptive_field: int = 1,
    channel_max: float = 1.0,
) -> torch.Tensor:
    """w selecting one neuron (channel, y, x)."""
    return channel_weights(
        feature_shape, channel, receptive_field=receptive_field, channel_max=channel_max, position=position
    )


def direction_weights(
    feature_shape: Sequence[int],
    direction: torch.Tensor,
    *,
    receptive_field: int = 1,
    scale: float = 1.0,
) -> torch.Tensor:
    """w for a direction in channel space (at the centre) or a full feature-shaped tensor.

    The direction is normalized to unit length; ``scale`` plays the part of M_k.
    """
    shape = tuple(feature_shape)
    d = direction.detach().float()
    if tuple(d.shape) == shape:
        w = d.clone()
    elif d.dim() == 1 and d.shape[0] == shape[0]:
        w = torch.zeros(shape)
        centre = tuple(s // 2 for s in shape[1:])
        w[(slice(None), *centre)] = d
    else:
        raise ValueError(
            f"a direction must have {shape[0]} entries or the tap's full shape {shape}, got {tuple(d.shape)}"
        )
    n = w.norm()
    if not torch.isfinite(n) or n == 0:
        raise ValueError("the direction must be finite and non-zero")
    return w / n / _scale(receptive_field, scale)


def _scale(receptive_field: int, channel_max: float) -> float:
    if receptive_field < 1:
        raise ValueError("receptive_field must be ≥ 1")
    if not channel_max > 0:
        raise ValueError(f"the channel statistic M_k must be > 0 (got {channel_max})")
    return float(receptive_field) ** 2 * float(channel_max)


@torch.no_grad()
def channel_statistics(
    phi: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int = 4
) -> torch.Tensor:
    """M_k: the largest activation of each channel over a set of images (energy space, B×3×H×W).

    Channels that never fire positively get the largest positive value of the layer instead,
    so their weight stays finite.
    """
    best: torch.Tensor | None = None
    for start in range(0, images.shape[0], batch):
        out = phi(images[start : start + batch]).float()
        per_channel = out.transpose(0, 1).reshape(out.shape[1], -1).amax(dim=1) if out.dim() > 1 else out
        best = per_channel if best is None else torch.maximum(best, per_channel)
    if best is None:
        raise ValueError("channel statistics need at least one image")
    fallback = best.clamp_min(0).max()
    if not fallback > 0:
        return torch.ones_like(best)
    return torch.where(best > 0, best, fallback)
