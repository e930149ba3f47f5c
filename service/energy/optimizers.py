"""The two update rules of the minimizer, in place on a group of rows that share their settings.

The settings are Python floats (the minimizer calls these once per group of rows that agree),
so fused operations round the same for a row whoever shares its batch. Only Adam's bias
correction differs per row (each row has its own step count): it is a (B,) tensor in every case.
"""

from __future__ import annotations

import torch

from service.energy.params import EnergyParams
from service.energy.workspace import Workspace


@torch.no_grad()
def paper_update_(
    x: torch.Tensor, mu: torch.Tensor, g2: torch.Tensor, grad: torch.Tensor,
    params: EnergyParams, lr_scale: float, work: Workspace | None = None,
) -> None:  # fmt: skip
    """The paper's rule (its IJCV code): G ← ρG + g²;  μ ← mμ − s·g/(1/η + √G);  x ← x + μ."""
    g2.mul_(params.decay).addcmul_(grad, grad)
    denominator = torch.sqrt(g2, out=(work or Workspace()).get("denominator", x.shape, x))
    denominator.add_(1 / float(params.learning_rate))
    mu.mul_(params.momentum).addcdiv_(grad, denominator, value=-lr_scale)
    x.add_(mu)


@torch.no_grad()
def adam_update_(
    x: torch.Tensor, m: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, t: torch.Tensor,
    params: EnergyParams, lr_scale: float, eps: float = 1e-8,
) -> None:  # fmt: skip
    """Adam with the step in pixel units (β1 = momentum, β2 = 1 − (1 − decay)/100, 0.999 at the
    default): m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;  x ← x − lr·m̂/(√v̂ + ε), where
    m̂ = m/(1−β1^t) and v̂ = v/(1−β2^t) with each row's own step count t (B,)."""
    beta1, beta2 = params.momentum, 1 - (1 - params.decay) / 100
    m.mul_(beta1).add_(grad, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    view = (-1, 1, 1, 1)
    bias1 = torch.full_like(t, beta1).pow_(t).neg_().add_(1).reciprocal_().view(view)
    bias2 = torch.full_like(t, beta2).pow_(t).neg_().add_(1).reciprocal_().view(view)
    denominator = torch.mul(v, bias2).sqrt_().add_(eps)
    x.addcdiv_(torch.mul(m, bias1), denominator, value=-float(params.learning_rate) * lr_scale)
