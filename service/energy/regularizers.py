"""The image priors of the energy: α-norm, TV^β, the bounded range B₊ and jitter.

All of them work on a batch ``x`` of mean-subtracted RGB images (B×3×H×W, 0-255 scale). The
reference formulas (``alpha_norm``, ``total_variation``) take a setting per row; the minimizer's
fast path (``prior_terms_and_grad``) takes one set of settings for a group of rows.
"""

from __future__ import annotations

import torch

from service.energy.params import EnergyParams
from service.energy.workspace import Workspace

# A setting for a batch: one float for every row, or a (B,) tensor (the reference formulas).
Scalar = float | torch.Tensor


def per_row(value: Scalar, dims: int) -> Scalar:
    """A float as is; a (B,) tensor viewed to broadcast over ``dims`` trailing dimensions."""
    return value if isinstance(value, float) else value.view(-1, *(1,) * dims)


# Keeps the gradient of s^(β/2) finite where the image is locally flat (β < 2).
_TV_EPS = 1e-6


def alpha_norm(x: torch.Tensor, alpha: Scalar, b_norm: Scalar) -> torch.Tensor:
    """R_α(x) = 1/(H·W·B^α) Σ_u ‖x(u)‖^α, per row; ‖·‖ is the RGB-vector norm.

    ``alpha`` is a per-row tensor, or one float when every row shares it (a much cheaper power).
    """
    sq = x.pow(2).sum(dim=1).add(1e-12) / per_row(b_norm, 2) ** 2  # (‖x‖/B)², B×H×W
    exponent = per_row(alpha, 2) / 2
    return sq.pow(exponent).mean(dim=(1, 2))


def total_variation(x: torch.Tensor, beta: Scalar, tv_norm: Scalar) -> torch.Tensor:
    """R_V(x) = 1/(H·W·V^β) Σ_u ((x(u+e1)−x(u))² + (x(u+e2)−x(u))²)^(β/2), per row.

    The squared differences are summed over the colour channels inside the power, as in the
    paper's definition on vector-valued images. ``beta`` is per row, or one float shared by all.
    """
    h, w = x.shape[-2:]
    dx = x[..., :-1, 1:] - x[..., :-1, :-1]
    dy = x[..., 1:, :-1] - x[..., :-1, :-1]
    s = (dx.pow(2) + dy.pow(2)).sum(dim=1) / per_row(tv_norm, 2) ** 2
    if isinstance(beta, float):
        powered = s if beta == 2.0 else (s + _TV_EPS).pow(beta / 2)
    else:
        powered = (s + _TV_EPS).pow(beta.view(-1, 1, 1) / 2)
    return powered.sum(dim=(1, 2)) / (h * w)


@torch.no_grad()
def project_bounded(x: torch.Tensor, bound: Scalar, work: Workspace | None = None) -> None:
    """In place: scale every pixel's RGB vector down to norm ≤ bound (the set B₊); one bound, or one per row."""
    n, _, h, w = x.shape
    scale = channel_sum_of_squares(x, (work or Workspace()).get("norm", (n, h, w), x)).clamp_min_(1e-24).rsqrt_()
    x.mul_(scale.mul_(per_row(bound, 2)).clamp_(max=1.0).unsqueeze(1))  # min(1, bound/‖x(u)‖)


def jitter_crop(
    x: torch.Tensor, offsets: list[tuple[int, int]], height: int, width: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Crop each row of the padded variable at its own (dy, dx) offset: the random shift."""
    if all(o == (0, 0) for o in offsets) and x.shape[-2:] == (height, width):
        return x
    crops = [x[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets)]
    return torch.stack(crops) if out is None else torch.stack(crops, out=out)


def jitter_offsets(generator: torch.Generator, jitter: int, count: int) -> list[tuple[int, int]]:
    """``count`` shifts of 0…T−1 pixels in each direction, drawn from the row's own generator.

    The minimizer draws them in chunks (one call per 64 steps instead of one per step: the same
    numbers, in the same order, as drawing them step by step)."""
    if jitter <= 1:
        return [(0, 0)] * count
    return [(int(dy), int(dx)) for dy, dx in torch.randint(0, jitter, (count, 2), generator=generator).tolist()]


@torch.no_grad()
def prior_terms_and_grad(
    x: torch.Tensor, grad: torch.Tensor, params: EnergyParams, work: Workspace | None = None, terms: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """R_α and R_V per row (None, None unless ``terms``); writes λ_α ∂R_α/∂x + λ_V ∂R_V/∂x into
    ``grad`` (same shape as x).

    Every row of ``x`` has the settings ``params`` (resolved): the minimizer calls this once per
    group of rows that agree, so all constants are Python floats and fused ``alpha=``/``value=``
    operations round the same whoever else is in the batch. The gradients are in closed form
    (tests compare them with autograd). Elementwise passes over the image, and their temporaries,
    were most of a step's cost beyond the network's forward+backward (bench/step_overhead.py):
    hence the reused buffers and as few passes as the formulas allow.
    """
    n, _, h, w = x.shape
    area = h * w
    work = work if work is not None else Workspace()
    b2, v2 = params.b_norm**2, float(params.tv_norm) ** 2
    half_alpha, half_beta = params.alpha / 2, params.beta / 2
    # α-norm: q = ‖x‖²/B²;  R_α = mean q^(α/2);  ∂R_α/∂x = α/(HW·B²) · q^(α/2−1) · x
    q = channel_sum_of_squares(x, work.get("q", (n, h, w), x))
    if half_alpha < 1:  # a negative power of q: keep it finite where a pixel is 0
        q.add_(1e-12)
    q.mul_(1 / b2)
    p = torch.pow(q, half_alpha - 1, out=work.get("p", (n, h, w), x))
    r_alpha = row_dot(p, q, work).div_(area) if terms else None
    torch.mul(x, p.mul_(params.lambda_alpha * params.alpha / (area * b2)).unsqueeze(1), out=grad)
    # TV^β: s = Σ_c(dx² + dy²)/V² on the (H−1)×(W−1) grid; R_V = Σ (s+ε)^(β/2) / HW, and
    # ∂R_V/∂dx = β/(HW·V²)·(s+ε)^(β/2−1)·dx, where dx = x[u+e2] − x[u] (likewise dy).
    grid = (n, 3, h - 1, w - 1)
    dx = torch.sub(x[..., :-1, 1:], x[..., :-1, :-1], out=work.get("dx", grid, x))
    dy = torch.sub(x[..., 1:, :-1], x[..., :-1, :-1], out=work.get("dy", grid, x))
    coef = params.lambda_tv * params.beta / (area * v2)
    if half_beta == 1.0:  # β = 2: the weight is the constant coef, and R_V needs no ε
        r_tv = row_norm(dx).square_().add_(row_norm(dy).square_()).div_(v2 * area) if terms else None
        grad[..., :-1, 1:].add_(dx, alpha=coef)
        grad[..., 1:, :-1].add_(dy, alpha=coef)
        grad[..., :-1, :-1].sub_(dx, alpha=coef).sub_(dy, alpha=coef)
        return r_alpha, r_tv
    s = torch.mul(dx, dx).add_(torch.mul(dy, dy)).sum(dim=1).div_(v2).add_(_TV_EPS)
    powered = s.pow(half_beta - 1)
    r_tv = torch.mul(powered, s).sum(dim=(1, 2)).div_(area) if terms else None
    weight = powered.mul_(coef).unsqueeze(1)
    dx.mul_(weight)
    dy.mul_(weight)
    grad[..., :-1, 1:].add_(dx)
    grad[..., 1:, :-1].add_(dy)
    grad[..., :-1, :-1].sub_(dx).sub_(dy)
    return r_alpha, r_tv


def channel_sum_of_squares(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Σ_c x_c² of a B×3×H×W batch into ``out`` (B×H×W), without an image-sized temporary."""
    torch.mul(x[:, 0], x[:, 0], out=out)
    for c in range(1, x.shape[1]):
        out.addcmul_(x[:, c], x[:, c])
    return out


def row_norm(a: torch.Tensor) -> torch.Tensor:
    """‖a‖ per row (B,): one pass, no temporary."""
    return torch.linalg.vector_norm(a.reshape(a.shape[0], -1), dim=1)


def row_dot(a: torch.Tensor, b: torch.Tensor, work: Workspace) -> torch.Tensor:
    """Σ a·b per row (B,), the product in a reused buffer (a batched matmul was 10× slower on CPU)."""
    product = torch.mul(a, b, out=work.get("product", a.shape, a))
    return product.sum(dim=tuple(range(1, a.dim())))
