"""Rows of the minimizer whose image is parameterized (``fourier``, ``phase``), seen through views.

The paper's pixel rows have a closed-form step (minimize.py). These rows instead differentiate
through the parameterization and the random views with autograd: each contributes ``copies``
images to the network's batch, its loss is the mean over them, and its optimizer is a torch
optimizer on its own variable. They share the network's one forward and backward with the pixel
rows, so jobs of both kinds batch together.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from service.energy.objectives import batched_loss
from service.energy.parameterizations import from_energy, make_parameterization, to_energy
from service.energy.params import EnergyParams
from service.energy.regularizers import alpha_norm, total_variation
from service.energy.transforms import views


def records_at(step: int, total: int, record_every: int) -> bool:
    """Whether a row records its energy terms at ``step`` (1-based): the first and last steps, and
    every ``record_every``-th (pixel and parameterized rows alike)."""
    return step in (1, total) or (record_every > 0 and step % record_every == 0)


def make_optimizer(params: EnergyParams, variable: torch.Tensor, lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """The row's optimizer: Adam or NAdam with β1 = momentum and β2 = 1 − (1 − decay)/100 (0.999
    at the default), as the pixel Adam."""
    lr = float(params.learning_rate) * lr_scale
    betas = (params.momentum, 1 - (1 - params.decay) / 100)
    if params.optimizer == "nadam":
        return torch.optim.NAdam([variable], lr=lr, betas=betas)
    return torch.optim.Adam([variable], lr=lr, betas=betas)


class NaturalRow:
    """One parameterized problem: its variable, optimizer, generators and objective tensors."""

    def __init__(
        self,
        handle: int,
        problem,  # noqa: ANN001 (a minimize.Problem; imported there, so not here)
        params: EnergyParams,
        *,
        height: int,
        width: int,
        channels: int,
        mean_rgb255: torch.Tensor,
        device: torch.device,
        magnitude: torch.Tensor | None,
        record_every: int,
    ) -> None:
        self.handle, self.problem, self.params = handle, problem, params
        self.height, self.width = height, width
        self.step = 0
        self.total = params.steps + int(params.refine_steps or 0)
        self.cancelled = False
        self.record_every = record_every
        self.history: list[tuple[int, torch.Tensor]] = []
        self.mean = mean_rgb255.to(device)
        seed = int(problem.seed)
        self.generator = torch.Generator().manual_seed(seed)  # init and view geometry
        # The view noise is drawn on the device.
        self.noise_generator = torch.Generator(device=device).manual_seed((seed + 1) % 2**64)
        # The optimized image (the canvas) may be larger than what the network sees.
        self.canvas = params.canvas_size(height, width)
        self.parameterization = make_parameterization(
            params.parameterization, channels=channels, height=self.canvas[0], width=self.canvas[1],
            decay=params.fourier_decay, magnitude=problem.magnitude if problem.magnitude is not None else magnitude,
        )  # fmt: skip
        start01 = None
        if problem.start is not None:
            start = problem.start.detach().float().cpu()
            if tuple(start.shape) != (3, height, width):
                raise ValueError(f"start image must be 3×{height}×{width}, got {tuple(start.shape)}")
            start01 = from_energy(start, mean_rgb255, channels)
            if self.canvas != (height, width):
                start01 = F.interpolate(start01[None], size=self.canvas, mode="bicubic", align_corners=False)[0]
                start01 = start01.clamp(0, 1)
        self.variable = self.parameterization.init(self.generator, start01).to(device).requires_grad_(True)
        self.optimizer = make_optimizer(params, self.variable)
        # The anchor pulls towards the start image as the parameterization renders it (not the
        # photograph itself, which the sigmoid can only approach).
        self.anchor_image = self.image().detach() if problem.start is not None and params.anchor > 0 else None
        obj = problem.objective
        self.target = obj.target.to(device)[None]
        self.mask = obj.mask.to(device)[None]
        self.weights = obj.weights.to(device)[None]
        self.is_inv = torch.tensor(obj.task == "invert", device=device)
        self.view_settings = params.views()

    @property
    def copies(self) -> int:
        return 1 if self.in_refine() else self.view_settings.copies

    def in_refine(self) -> bool:
        return self.step >= self.params.steps

    def records(self, step: int) -> bool:
        return records_at(step, self.total, self.record_every)

    def image(self) -> torch.Tensor:
        """The current canvas in energy space (3×canvas), differentiable in the variable."""
        return to_energy(self.parameterization.image(self.variable), self.mean)

    def output_image(self) -> torch.Tensor:
        """The current image at the output size (3×H×W): the canvas, resampled when larger."""
        return self._to_output(self.image()[None])[0]

    def views(self, x: torch.Tensor) -> torch.Tensor:
        """This step's views of the canvas ``x`` at the network's size (copies×3×H×W); the second
        stage sees the image as it is."""
        if self.in_refine():
            return self._to_output(x[None])
        progress = self.step / max(self.params.steps - 1, 1)
        return views(x, self.view_settings, self.generator, self.noise_generator, progress, (self.height, self.width))

    def _to_output(self, batch: torch.Tensor) -> torch.Tensor:
        if tuple(batch.shape[-2:]) == (self.height, self.width):
            return batch
        # Antialiased, so the network cannot be driven by detail finer than its own pixels (which
        # a plain bilinear resample would alias into it).
        size = (self.height, self.width)
        return F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)

    def step_optimizer(self) -> None:
        """One optimizer step at this step's rate: over the first stage the rate falls linearly
        from η to lr_end_scale·η (the second stage keeps its own constant rate)."""
        if not self.in_refine() and self.params.lr_end_scale != 1:
            progress = self.step / max(self.params.steps - 1, 1)
            scale = 1 - (1 - self.params.lr_end_scale) * progress
            for group in self.optimizer.param_groups:
                group["lr"] = float(self.params.learning_rate) * scale
        self.optimizer.step()

    def start_refine(self) -> None:
        """Second stage: a fresh optimizer at the lower rate, from the first stage's image."""
        self.optimizer = make_optimizer(self.params, self.variable, self.params.refine_lr_scale)

    def loss(self, features: torch.Tensor) -> torch.Tensor:
        """ℓ of each view (copies,), differentiable in ``features``."""
        n = features.shape[0]
        expand = (n, *self.target.shape[1:])
        return batched_loss(
            features, self.target.expand(expand), self.mask.expand(expand), self.weights.expand(expand),
            self.is_inv.expand(n),
        )  # fmt: skip

    def image_terms(self, x: torch.Tensor, record: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """λ_α R_α + λ_V R_V + λ_a ‖x − x0‖²/(H·W·B²) of the energy-space image, differentiable
        (None when every weight is 0), and when ``record`` the detached R_α, R_V and energy part."""
        p = self.params
        weighted = []
        batch = x[None]
        r_alpha = r_tv = None
        if p.lambda_alpha > 0 or record:
            with torch.set_grad_enabled(p.lambda_alpha > 0):
                r_alpha = alpha_norm(batch, float(p.alpha), float(p.b_norm))[0]
            weighted.append(p.lambda_alpha * r_alpha)
        if p.lambda_tv > 0 or record:
            with torch.set_grad_enabled(p.lambda_tv > 0):
                r_tv = total_variation(batch, float(p.beta), float(p.tv_norm))[0]
            weighted.append(p.lambda_tv * r_tv)
        if self.anchor_image is not None:
            anchor = (x - self.anchor_image).pow(2).sum() / (x.shape[-2] * x.shape[-1] * float(p.b_norm) ** 2)
            weighted.append(p.anchor * anchor)
        total = sum(weighted) if weighted else None
        differentiable = total if isinstance(total, torch.Tensor) and total.requires_grad else None
        if not record:
            return differentiable, None
        assert r_alpha is not None and r_tv is not None and total is not None
        return differentiable, torch.stack([total.detach(), r_alpha.detach(), r_tv.detach()])


def gram(features: torch.Tensor) -> torch.Tensor:
    """The channel Gram matrix of each view (copies × C·C), features flattened over space."""
    flat = features.reshape(features.shape[0], features.shape[1], -1)
    return torch.bmm(flat, flat.transpose(1, 2)).reshape(features.shape[0], -1) / flat.shape[-1]


def diversity_penalty(grams: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean cosine similarity between the (view-averaged) Gram matrices of each pair of images of
    one target: 0 when they use their channels differently, 1 when alike (lucid's diversity)."""
    g = torch.nn.functional.normalize(torch.stack([t.mean(dim=0) for t in grams]), dim=1)
    similarity = g @ g.T
    n = similarity.shape[0]
    return (similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1))
