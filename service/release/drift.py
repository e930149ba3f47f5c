"""Drift between two releases of a model at one layer.

Three figures, each zero when the layer computes exactly what it did:

- visual drift: the same visualization (same target, seed and settings) rendered by each release,
  compared in the baseline's feature space at that layer, ``‖Φ_old(x_new) − Φ_old(x_old)‖ / ‖Φ_old(x_old)‖``.
  The baseline's Φ is the fixed ruler, so two releases that agree on that layer give 0 even though
  the images are optimizations (they are bit-identical then: same seeds, same arithmetic).
- feature drift: ``‖Φ_new(P) − Φ_old(P)‖ / ‖Φ_old(P)‖`` on reference photographs P, without any
  optimization: the cheapest and most precise localization of a change.
- changed channels: a channel "changed what it responds to" when its responses over the photographs
  (every image and position) correlate with the baseline's less than a threshold. Correlation, not
  distance, so a channel that was only rescaled (e.g. a folded BatchNorm) does not count as changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from service.energy import from_uint8


@dataclass
class LayerDrift:
    visual_drift: list[float]  # one per visualization, in the order rendered
    pixel_rms: list[float]  # RMS difference of the two PNGs, 0-255 scale
    feature_drift: float
    channel_correlation: list[float]  # one per channel
    changed_channels: int
    n_channels: int

    @property
    def visual_drift_max(self) -> float:
        return max(self.visual_drift, default=0.0)

    @property
    def changed_fraction(self) -> float:
        return self.changed_channels / self.n_channels if self.n_channels else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["visual_drift_max"] = self.visual_drift_max
        d["changed_fraction"] = self.changed_fraction
        return d


def relative_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (‖a − b‖ alone when b is zero); exactly 0 for equal tensors."""
    a64, b64 = a.double(), b.double()
    num = float((a64 - b64).norm())
    den = float(b64.norm())
    return num / den if den > 0 else num


def channel_correlations(new: torch.Tensor, old: torch.Tensor) -> np.ndarray:
    """Pearson correlation per channel of two N×C×… response tensors, over images and positions.

    Identical responses give exactly 1; a channel constant in both releases with the same value is
    unchanged (1); a channel constant in one release only has no correlation to speak of (0)."""
    c = new.shape[1]
    a = new.double().transpose(0, 1).reshape(c, -1).cpu().numpy()
    b = old.double().transpose(0, 1).reshape(c, -1).cpu().numpy()
    out = np.empty(c)
    for k in range(c):
        x, y = a[k], b[k]
        if np.array_equal(x, y):
            out[k] = 1.0
            continue
        sx, sy = x.std(), y.std()
        if sx == 0 or sy == 0:
            out[k] = 1.0 if sx == sy and np.allclose(x, y) else 0.0
            continue
        out[k] = float(np.mean((x - x.mean()) * (y - y.mean())) / (sx * sy))
    return out


@torch.no_grad()
def layer_drift(
    phi_new: Callable[[torch.Tensor], torch.Tensor],
    phi_old: Callable[[torch.Tensor], torch.Tensor],
    new_images: Sequence[np.ndarray],
    old_images: Sequence[np.ndarray],
    photos_new: torch.Tensor,
    photos_old: torch.Tensor,
    baseline_mean_rgb255: tuple[float, ...],
    correlation_threshold: float,
    device: torch.device,
) -> LayerDrift:
    """The drift figures of one layer (see the module docstring); images are the PNG-ready uint8 arrays.

    Each model sees images in its own energy space: ``photos_new`` and ``photos_old`` are the same
    photographs minus each release's mean colour, and the visualizations (pixels) are measured by the
    baseline, so they are converted with the baseline's mean. A release that changes its
    preprocessing therefore drifts, and one that folds a new mean into its weights does not."""
    mean = torch.tensor(baseline_mean_rgb255, dtype=torch.float32)
    x_new = torch.stack([from_uint8(i, mean) for i in new_images]).to(device)
    x_old = torch.stack([from_uint8(i, mean) for i in old_images]).to(device)
    f_new, f_old = phi_old(x_new).float(), phi_old(x_old).float()
    visual = [relative_distance(f_new[i], f_old[i]) for i in range(len(new_images))]
    pixel = [float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))
             for a, b in zip(new_images, old_images, strict=True)]
    r_new, r_old = phi_new(photos_new.to(device)).float(), phi_old(photos_old.to(device)).float()
    corr = channel_correlations(r_new, r_old)
    return LayerDrift(
        visual_drift=visual,
        pixel_rms=pixel,
        feature_drift=relative_distance(r_new, r_old),
        channel_correlation=[float(v) for v in corr],
        changed_channels=int((corr < correlation_threshold).sum()),
        n_channels=len(corr),
    )
