"""The loss ℓ of each visualization, as a target the minimizer can batch.

Every objective reduces to one of two forms over the representation Φ(x):
- inversion:  ‖(Φ(x) − Φ0) ⊙ m‖² / ‖Φ0 ⊙ m‖²   (normalized, so the scale of Φ0 does not matter)
- a dot product: −⟨Φ(x), w⟩, where w is a (scaled) one-hot/direction for maximization and
  Φ0⁺/‖Φ0⁺‖² for caricature.
so a batch of mixed problems is evaluated with the same few tensor operations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from service.energy.params import Task


@dataclass(frozen=True)
class Objective:
    """What one problem asks of Φ. Build it with the class methods."""

    task: Task
    target: torch.Tensor  # Φ0 for inversion, zeros otherwise (feature shape, no batch)
    mask: torch.Tensor  # m for inversion, zeros otherwise
    weights: torch.Tensor  # w for the dot-product losses, zeros for inversion
    reference: torch.Tensor | None = None  # Φ0 for the reported feature error

    @classmethod
    def invert(cls, phi0: torch.Tensor, mask: torch.Tensor | None = None) -> Objective:
        """Reconstruct an image whose representation is Φ0 (optionally only where mask > 0)."""
        phi0 = phi0.detach().float()
        m = torch.ones_like(phi0) if mask is None else torch.broadcast_to(mask.float(), phi0.shape).clone()
        if float((phi0 * m).pow(2).sum()) == 0.0:
            raise ValueError("cannot invert an all-zero representation (‖Φ0 ⊙ m‖ = 0): pick another tap or image")
        return cls("invert", phi0, m, torch.zeros_like(phi0), reference=phi0)

    @classmethod
    def maximize(cls, weights: torch.Tensor) -> Objective:
        """Excite ⟨Φ(x), w⟩; w comes from service.energy.targets (already scaled)."""
        w = weights.detach().float()
        if float(w.abs().sum()) == 0.0:
            raise ValueError("the maximization direction is all zeros")
        zeros = torch.zeros_like(w)
        return cls("maximize", zeros, zeros, w)

    @classmethod
    def caricature(cls, phi0: torch.Tensor) -> Objective:
        """Exaggerate what the layer detects in the start image: w = Φ0⁺ / ‖Φ0⁺‖²."""
        phi0 = phi0.detach().float()
        positive = phi0.clamp_min(0)
        energy = float(positive.pow(2).sum())
        if energy == 0.0:
            raise ValueError("the representation has no positive part to exaggerate at this tap")
        zeros = torch.zeros_like(phi0)
        return cls("caricature", zeros, zeros, positive / energy, reference=phi0)


def batched_loss(
    phi: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, is_inversion: torch.Tensor
) -> torch.Tensor:
    """ℓ per row for a batch mixing inversion and dot-product rows (B,)."""
    dims = tuple(range(1, phi.dim()))
    diff = (phi - target) * mask
    denominator = (target * mask).pow(2).sum(dim=dims).clamp_min(1e-30)
    inversion = diff.pow(2).sum(dim=dims) / denominator
    dot = -(phi * weights).sum(dim=dims)
    return torch.where(is_inversion, inversion, dot)


def feature_error(phi: torch.Tensor, reference: torch.Tensor) -> float:
    """‖Φ(x*) − Φ0‖ / ‖Φ0‖, the paper's normalized reconstruction error."""
    return float((phi - reference).norm() / reference.norm().clamp_min(1e-30))
