"""The energy minimizer: B independent pre-image problems in one forward/backward per step.

    E(x) = C · ℓ(Φ(x)) + λ_α R_α(x) + λ_V R_V(x),   x ∈ B₊, with jitter      (SPEC.md)

A ``Minimizer`` holds a batch of rows that share Φ (one converted graph truncated at one tap)
and one image size; each row has its own objective, hyperparameters, schedule, optimizer state
and random generators. Rows can join between steps and leave when finished or cancelled, which
is what the service's scheduler needs for continuous batching; ``minimize`` is the simple
"run these problems to the end" wrapper.

Why rows carry their own CPU generators: the noise start and the jitter shifts of a problem
depend only on its seed, never on which other problems share its batch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from service.energy.natural import NaturalRow, diversity_penalty, gram, records_at
from service.energy.objectives import Objective, batched_loss, feature_error
from service.energy.optimizers import adam_update_, paper_update_
from service.energy.params import EnergyParams
from service.energy.regularizers import (
    Scalar,
    alpha_norm,
    jitter_crop,
    jitter_offsets,
    prior_terms_and_grad,
    project_bounded,
    total_variation,
)
from service.energy.workspace import Workspace

TERMS = ("energy", "loss", "alpha_norm", "tv")


@dataclass
class Problem:
    """One visualization: an objective, its settings, a seed and (for caricature) a start image."""

    objective: Objective
    params: EnergyParams = field(default_factory=EnergyParams)
    seed: int = 0
    start: torch.Tensor | None = None  # 3×H×W energy-space image; None starts from noise
    # Rows of one group (the images a request asks of one target) are kept apart by the
    # diversity term (EnergyParams.diversity); None: no group.
    group: int | None = None
    # The phase parameterization's amplitude spectrum for this problem alone (C×H×W//2+1), over
    # the Minimizer's: problems whose amplitudes come from different photographs share a batch.
    # None: the Minimizer's; ignored by the other parameterizations.
    magnitude: torch.Tensor | None = None


@dataclass
class Result:
    """What a finished (or stopped) problem gives back."""

    image_uint8: np.ndarray  # H×W×3, ready for PNG
    image: torch.Tensor  # 3×H×W float, mean-subtracted 0-255 (before quantization)
    terms: dict[str, float]  # final C·ℓ, ℓ, R_α, R_V and E, measured on the PNG image
    history: dict[str, list[float]]  # "step" and the energy terms at each recorded step (during optimization)
    feature_error: float | None  # ‖Φ(x*) − Φ0‖/‖Φ0‖ on the PNG image (inversion, caricature)
    objective_value: float  # ⟨Φ(x*), w⟩ for maximization/caricature, ℓ for inversion
    steps_run: int
    stopped: bool  # True when cancelled before its last step
    params: EnergyParams  # the settings with every default resolved


@dataclass
class StepEvent:
    """Progress of the rows that reported at this step (only built every ``report_every`` steps)."""

    step: int  # the step each row has just completed (1-based)
    total: int
    handle: int
    terms: dict[str, float]


def noise_start(generator: torch.Generator, height: int, width: int, b_norm: float) -> torch.Tensor:
    """Uniform noise whose 95th percentile of |value| is B/√3 (SPEC.md), seeded."""
    # For U(−a, a) the 95th percentile of |u| is 0.95·a.
    a = b_norm / math.sqrt(3) / 0.95
    return (torch.rand(3, height, width, generator=generator) * 2 - 1) * a


def to_uint8(x: torch.Tensor, mean_rgb255: torch.Tensor) -> np.ndarray:
    """Energy-space 3×H×W → H×W×3 uint8 (add the mean colour back, clip, round)."""
    img = (x.detach().float().cpu() + mean_rgb255.view(3, 1, 1).cpu()).clamp(0, 255).round()
    return img.to(torch.uint8).permute(1, 2, 0).numpy()


def from_uint8(image: np.ndarray, mean_rgb255: torch.Tensor) -> torch.Tensor:
    """H×W×3 uint8 (or H×W grey) → energy-space 3×H×W float."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    t = torch.from_numpy(np.array(arr[..., :3], dtype=np.float32)).float().permute(2, 0, 1)
    return t - mean_rgb255.view(3, 1, 1).float()


class _Row:
    """Per-problem state that is not a batched tensor."""

    def __init__(
        self, handle: int, problem: Problem, params: EnergyParams, generator: torch.Generator, record_every: int
    ) -> None:
        self.handle = handle
        self.problem = problem
        self.params = params
        self.step = 0
        self.total = params.steps + int(params.refine_steps or 0)
        self.cancelled = False
        self.masked = problem.objective.task == "invert" and not bool((problem.objective.mask == 1).all())
        self.generator = generator
        self._shifts: list[tuple[int, int]] = []
        self.record_every = record_every
        # (step, terms) of the recorded steps; the terms stay on the device until the row ends (no syncs)
        self.history: list[tuple[int, torch.Tensor]] = []

    def in_refine(self) -> bool:
        return self.step >= self.params.steps

    def next_shift(self) -> tuple[int, int]:
        """The next random shift of the first stage, drawn from the row's own generator in chunks
        (one call per 64 steps instead of one per step)."""
        if not self._shifts:
            count = min(64, self.params.steps - self.step)
            self._shifts = jitter_offsets(self.generator, int(self.params.jitter or 1), count)[::-1]
        return self._shifts.pop()

    def records(self, step: int) -> bool:
        """Whether the energy terms are recorded at ``step`` (1-based): the first and last steps,
        and every ``record_every``-th."""
        return records_at(step, self.total, self.record_every)


@dataclass
class _Group:
    """Rows that agree on every image-space setting (priors, optimizer, bound, stage).

    A group's priors and update run with Python floats: a row's arithmetic is then the same
    whoever shares its batch, which keeps a job's result identical alone and batched.
    """

    params: EnergyParams  # a member's resolved settings (the members agree on all that is used)
    lr_scale: float  # 1, or refine_lr_scale in the second stage
    members: list[int]
    index: torch.Tensor | None  # the members on the device; None when the group is the batch


def _group_key(row: _Row) -> tuple:
    p = row.params
    lr_scale = p.refine_lr_scale if row.in_refine() else 1.0
    return (p.alpha, p.beta, p.b_norm, p.tv_norm, p.lambda_alpha, p.lambda_tv, p.bound,
            p.optimizer, p.learning_rate, p.momentum, p.decay, lr_scale)  # fmt: skip


@dataclass
class _Plan:
    """What a step needs from the rows' settings, resolved on the host once per change of rows.

    Rebuilt only when rows join, leave or enter their second stage, so the steps in between copy
    nothing to the device.
    """

    has_inversion: bool
    has_dot: bool
    masked: bool
    loss_weight: Scalar  # C, λ_α and λ_V per row, for the reported energy
    lambda_alpha: Scalar
    lambda_tv: Scalar
    groups: list[_Group]


class Minimizer:
    """A batch of pre-image problems on one representation Φ and one image size."""

    def __init__(
        self,
        phi: Callable[[torch.Tensor], torch.Tensor],
        *,
        height: int,
        width: int,
        stride: int = 1,
        mean_rgb255: Sequence[float] | torch.Tensor = (0.0, 0.0, 0.0),
        device: str | torch.device = "cpu",
        max_jitter: int | None = None,
        row_quantum: int = 1,
        channels: int = 3,
        magnitude: torch.Tensor | None = None,
    ) -> None:
        """``channels``: the model's input channels (1 for grey models), the channels a
        parameterized image has; ``magnitude``: the amplitude spectrum of the phase
        parameterization (``mean_amplitude`` of photographs at this size), when rows use it and
        have no ``Problem.magnitude`` of their own."""
        self.phi = phi
        self.channels = int(channels)
        self.magnitude = magnitude
        # The network runs on the batch padded with zero images to a multiple of this many rows:
        # batch-invariant mode (service/batch_invariance.py), where kernels depend on the batch size.
        self.row_quantum = max(int(row_quantum), 1)
        self.height, self.width, self.stride = int(height), int(width), int(stride)
        self.device = torch.device(device)
        self.mean_rgb255 = torch.as_tensor(mean_rgb255, dtype=torch.float32)
        # The variable is padded by T−1 so every shift crops a full H×W image from it.
        self.pad = (max_jitter if max_jitter is not None else max(round(stride / 4), 1)) - 1
        self._rows: list[_Row] = []  # the pixel rows, in the order of the batched state
        self._natural: list[NaturalRow] = []  # parameterized rows (natural.py)
        self._handles = itertools.count()
        self._state: dict[str, torch.Tensor] = {}
        self._plan: _Plan | None = None
        self._work = Workspace()  # ∂E/∂x and the intermediates of a step, reused from step to step

    # -- joining and leaving -------------------------------------------------------------------
    def add(self, problem: Problem, record_every: int = 1) -> int:
        """Add a problem; it starts stepping with the next ``step()``. Returns its handle.

        ``record_every``: record the energy terms every that many steps (and at the first and
        last); 0 records only those two. A step that no row records skips computing them, which
        saves a few passes over the image (see ``progress``)."""
        params = problem.params.resolved(problem.objective.task, self.height, self.width, self.stride)
        params.validate()
        if params.parameterization != "pixel":
            row = NaturalRow(
                next(self._handles), problem, params, height=self.height, width=self.width, channels=self.channels,
                mean_rgb255=self.mean_rgb255, device=self.device, magnitude=self.magnitude, record_every=record_every,
            )  # fmt: skip
            self._natural.append(row)
            return row.handle
        if int(params.jitter or 1) - 1 > self.pad:
            raise ValueError(f"jitter T={params.jitter} exceeds this batch's padding (T ≤ {self.pad + 1})")
        generator = torch.Generator().manual_seed(int(problem.seed))
        hp, wp = self.height + self.pad, self.width + self.pad
        if problem.start is None:
            x0 = noise_start(generator, hp, wp, float(params.b_norm))
        else:
            start = problem.start.detach().float().cpu()
            if tuple(start.shape) != (3, self.height, self.width):
                raise ValueError(f"start image must be 3×{self.height}×{self.width}, got {tuple(start.shape)}")
            lo = self.pad // 2
            x0 = torch.nn.functional.pad(start[None], (lo, self.pad - lo, lo, self.pad - lo), mode="replicate")[0]
        project_bounded(x0[None], float(params.bound))
        obj = problem.objective
        c = float(params.loss_weight)
        # The loss's constants, computed for this row alone (so they do not depend on its batch):
        # ∂(C·ℓ)/∂Φ is 2C·m²⊙(Φ−Φ0)/‖Φ0⊙m‖² for inversion and −C·w for the dot products.
        inverse_norm = torch.zeros(())
        if obj.task == "invert":
            inverse_norm = (obj.target * obj.mask).pow(2).sum().clamp_min(1e-30).reciprocal()
        row_tensors = {
            "x": x0,
            "target": obj.target,
            "mask": obj.mask,
            "weights": obj.weights,
            "is_inv": torch.tensor(obj.task == "invert"),
            "inverse_norm": inverse_norm,
            "inversion_coef": inverse_norm * (2 * c),
            "dot_grad": obj.weights * -c,
            "t": torch.tensor(0.0),  # optimizer steps in this stage (Adam's bias correction)
            "mu": torch.zeros_like(x0),  # momentum / Adam first moment
            "G": torch.zeros_like(x0),  # running squared gradient / Adam second moment
        }
        for name, value in row_tensors.items():
            value = value.to(self.device)[None]
            if name in self._state and self._state[name].shape[1:] != value.shape[1:]:
                raise ValueError(
                    f"{name} has shape {tuple(value.shape[1:])} "
                    f"but this batch uses {tuple(self._state[name].shape[1:])}"
                )
            self._state[name] = value if name not in self._state else torch.cat([self._state[name], value])
        handle = next(self._handles)
        self._rows.append(_Row(handle, problem, params, generator, record_every))
        self._plan = None
        return handle

    def cancel(self, handle: int) -> None:
        """Mark a row to leave at the next step; its partial result is returned then."""
        for row in self.rows:
            if row.handle == handle:
                row.cancelled = True

    @property
    def rows(self) -> list[_Row | NaturalRow]:
        """Every active row: pixel rows, then parameterized ones."""
        return [*self._rows, *self._natural]

    def __len__(self) -> int:
        return len(self._rows) + len(self._natural)

    def network_rows(self) -> int:
        """Images the network runs per step (a parameterized row runs its views), before padding."""
        return len(self._rows) + sum(row.copies for row in self._natural)

    # -- the plan: settings resolved on the host -------------------------------------------------
    def _scalar(self, value: Callable[[EnergyParams], float]) -> Scalar:
        """One float when the rows agree, else a (B,) tensor on the device."""
        values = [float(value(row.params)) for row in self._rows]
        if all(v == values[0] for v in values):
            return values[0]
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def _build_plan(self) -> _Plan:
        by_key: dict[tuple, list[int]] = {}
        for i, row in enumerate(self._rows):
            by_key.setdefault(_group_key(row), []).append(i)
        groups = []
        for key, members in by_key.items():
            index = None if len(by_key) == 1 else torch.tensor(members, device=self.device)
            groups.append(_Group(self._rows[members[0]].params, key[-1], members, index))
        inversion = [row.problem.objective.task == "invert" for row in self._rows]
        return _Plan(
            has_inversion=any(inversion),
            has_dot=not all(inversion),
            masked=any(row.masked for row in self._rows),
            loss_weight=self._scalar(lambda p: float(p.loss_weight)),
            lambda_alpha=self._scalar(lambda p: p.lambda_alpha),
            lambda_tv=self._scalar(lambda p: p.lambda_tv),
            groups=groups,
        )

    # -- one step -------------------------------------------------------------------------------
    def _crop_offsets(self) -> list[tuple[int, int]]:
        centre = self.pad // 2
        return [
            (centre, centre) if row.in_refine() or int(row.params.jitter or 1) <= 1 else row.next_shift()
            for row in self._rows
        ]

    @torch.no_grad()
    def _loss_and_grad(self, phi: torch.Tensor, plan: _Plan, record: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """ℓ per row (only when ``record``) and ∂(C·ℓ)/∂Φ in closed form, for the loss forms in use."""
        s = self._state
        dims = tuple(range(1, phi.dim()))
        view = (-1,) + (1,) * (phi.dim() - 1)
        inversion = dot = None
        if plan.has_inversion:
            diff = phi - s["target"]
            if plan.masked:
                diff.mul_(s["mask"])
            if record:
                inversion = torch.mul(diff, diff).sum(dim=dims).mul_(s["inverse_norm"])
            if plan.masked:
                diff.mul_(s["mask"])
            inversion_grad = diff.mul_(s["inversion_coef"].view(view))
            if not plan.has_dot:
                return inversion, inversion_grad
        if record:
            dot = torch.mul(phi, s["weights"]).sum(dim=dims).neg_()
        if not plan.has_inversion:
            return dot, s["dot_grad"]
        is_inv = s["is_inv"]
        loss = torch.where(is_inv, inversion, dot) if record else None
        return loss, torch.where(is_inv.view(view), inversion_grad, s["dot_grad"])

    def step(self) -> list[tuple[int, Result]]:
        """Advance every active row by one step; return the rows that finished or were cancelled."""
        done = self._collect(lambda row: row.cancelled or row.step >= row.total)
        if not self._rows and not self._natural:
            return done
        s = self._state
        for row_index, row in enumerate(self._rows):
            if row.step == row.params.steps and row.step > 0:
                # Second stage: restart the optimizer from the first stage's image at a lower rate.
                s["mu"][row_index].zero_()
                s["G"][row_index].zero_()
                s["t"][row_index] = 0
                self._plan = None
        for natural in self._natural:
            if natural.step == natural.params.steps and natural.step > 0:
                natural.start_refine()
        if self._rows and self._plan is None:
            self._plan = self._build_plan()
        plan = self._plan
        offsets = self._crop_offsets()
        record = any(row.records(row.step + 1) for row in self._rows)
        if not self._natural:
            loss, grad_image = self._network_gradient(offsets, plan, record)
        else:
            loss, grad_image = self._joint_gradient(offsets, plan, record)
        if self._rows:
            with torch.no_grad():
                r_alpha, r_tv = self._image_steps(grad_image, offsets, plan, record)
                if record:
                    energy = loss * plan.loss_weight + r_alpha * plan.lambda_alpha + r_tv * plan.lambda_tv
                    stacked = torch.stack([energy, loss, r_alpha, r_tv], dim=1)  # the order of TERMS
            for row_index, row in enumerate(self._rows):
                row.step += 1
                if row.records(row.step):
                    row.history.append((row.step, stacked[row_index]))
        return done + self._collect(lambda row: row.step >= row.total)

    def _joint_gradient(
        self, offsets: list[tuple[int, int]], plan: _Plan | None, record: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One forward and backward for the pixel rows' crops and the parameterized rows' views.

        The pixel rows get ℓ and ∂(C·ℓ)/∂(crop) as in ``_network_gradient``; each parameterized
        row gets the gradient of C·mean(ℓ over its views) + its image terms (+ the diversity of
        its group) in its variable's ``.grad``, then its optimizer steps and it records."""
        n_pixel = len(self._rows)
        images = [row.image() for row in self._natural]
        seen = [row.views(x) for row, x in zip(self._natural, images, strict=True)]
        counts = [v.shape[0] for v in seen]
        parts: list[torch.Tensor] = []
        pixel_input = None
        if n_pixel:
            x = self._state["x"]
            crop = self._work.get("crop", (n_pixel, 3, self.height, self.width), x)
            pixel_input = jitter_crop(x, offsets, self.height, self.width, out=crop).detach().requires_grad_(True)
            parts.append(pixel_input)
        parts.extend(seen)
        total = n_pixel + sum(counts)
        padded = padded_rows(total, self.row_quantum)
        if padded != total:
            parts.append(parts[-1].new_zeros((padded - total, 3, self.height, self.width)))
        out = self.phi(torch.cat(parts))
        grads: list[torch.Tensor] = []
        loss = None
        if n_pixel:
            assert plan is not None
            loss, grad_pixel = self._loss_and_grad(out[:n_pixel].detach().float(), plan, record)
            grads.append(grad_pixel)
        features = out[n_pixel:total].detach().float().requires_grad_(True)
        with torch.enable_grad():
            per_row = list(torch.split(features, counts))
            losses = [row.loss(f) for row, f in zip(self._natural, per_row, strict=True)]
            objective = sum(
                float(row.params.loss_weight) * l.mean() for row, l in zip(self._natural, losses, strict=True)
            )
            objective = objective + self._diversity(per_row)
        grads.append(torch.autograd.grad(objective, features)[0])
        if padded != total:
            grads.append(grads[-1].new_zeros((padded - total, *grads[-1].shape[1:])))
        grad_out = torch.cat(grads).to(out.dtype)
        # The image-level terms (priors, anchor) of the parameterized rows, in the same backward.
        records = [row.records(row.step + 1) for row in self._natural]
        terms = [row.image_terms(x, r) for row, x, r in zip(self._natural, images, records, strict=True)]
        inputs = ([pixel_input] if pixel_input is not None else []) + [row.variable for row in self._natural]
        outputs, grad_outputs = [out], [grad_out]
        for differentiable, _ in terms:
            if differentiable is not None:
                outputs.append(differentiable)
                grad_outputs.append(torch.ones_like(differentiable))
        gradients = torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs)
        grad_image = gradients[0] if pixel_input is not None else None
        for row, gradient, view_loss, (_, recorded) in zip(
            self._natural, gradients[len(inputs) - len(self._natural) :], losses, terms, strict=True
        ):
            row.variable.grad = gradient
            row.step_optimizer()
            row.step += 1
            if recorded is not None:  # [image energy, R_α, R_V]
                ell = view_loss.detach().mean()
                energy = float(row.params.loss_weight) * ell + recorded[0]
                row.history.append((row.step, torch.stack([energy, ell, recorded[1], recorded[2]])))
        return loss, grad_image

    def _diversity(self, features: list[torch.Tensor]) -> torch.Tensor | float:
        """λ·(mean Gram similarity) summed over the groups of parameterized rows (0 without any)."""
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(self._natural):
            if row.problem.group is not None and row.params.diversity > 0:
                groups.setdefault(row.problem.group, []).append(i)
        penalty: torch.Tensor | float = 0.0
        for members in groups.values():
            if len(members) > 1:
                weight = max(self._natural[i].params.diversity for i in members)
                penalty = penalty + weight * diversity_penalty([gram(features[i]) for i in members])
        return penalty

    def _network_gradient(
        self, offsets: list[tuple[int, int]], plan: _Plan, record: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """ℓ per row (when ``record``) and ∂(C·ℓ)/∂(each row's crop): the one forward and backward.

        The network sees each row's shifted crop, padded with zero images to a multiple of
        ``row_quantum`` rows; ℓ's gradient with respect to Φ is in closed form, so autograd runs
        through Φ only."""
        x = self._state["x"]
        n = len(offsets)
        padded = padded_rows(n, self.row_quantum)
        crop = self._work.get("crop", (padded, 3, self.height, self.width), x)
        image = jitter_crop(x, offsets, self.height, self.width, out=crop[:n])
        if padded != n:
            if image is x:  # no shift and no padding: x came back as is
                crop[:n].copy_(x)
            crop[n:].zero_()
            image = crop
        image = image.detach().requires_grad_(True)
        out = self.phi(image)
        loss, grad_phi = self._loss_and_grad(out[:n].detach().float(), plan, record)
        if padded != n:  # the zero rows contribute nothing
            grad_phi = torch.cat([grad_phi, grad_phi.new_zeros((padded - n, *grad_phi.shape[1:]))])
        (grad_image,) = torch.autograd.grad(out, image, grad_outputs=grad_phi.to(out.dtype))
        return loss, grad_image[:n]

    def _image_steps(
        self, grad_image: torch.Tensor, offsets: list[tuple[int, int]], plan: _Plan, record: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Every group's priors, update and projection; R_α and R_V per row when ``record``."""
        s = self._state
        if len(plan.groups) == 1:
            return self._image_step(s, grad_image, offsets, plan.groups[0], record, self._work)
        r_alpha = torch.empty(len(self._rows), device=self.device) if record else None
        r_tv = torch.empty(len(self._rows), device=self.device) if record else None
        for group in plan.groups:
            # A copy of the group's rows (copies are exact), stepped, then written back.
            rows = {k: s[k].index_select(0, group.index) for k in ("x", "mu", "G", "t")}
            part = self._image_step(
                rows, grad_image.index_select(0, group.index), [offsets[i] for i in group.members], group, record
            )
            for name, value in rows.items():
                s[name].index_copy_(0, group.index, value)
            if r_alpha is not None and r_tv is not None:
                r_alpha.index_copy_(0, group.index, part[0])
                r_tv.index_copy_(0, group.index, part[1])
        return r_alpha, r_tv

    def _image_step(
        self,
        rows: dict[str, torch.Tensor],
        grad_image: torch.Tensor,
        offsets: list[tuple[int, int]],
        group: _Group,
        record: bool,
        work: Workspace | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """∂E/∂x of a group's rows, then their update and projection, in place; R_α and R_V before
        it when ``record``."""
        x, params = rows["x"], group.params
        work = work or Workspace()
        grad = work.get("grad", x.shape, x)
        r_alpha, r_tv = prior_terms_and_grad(x, grad, params, work, terms=record)
        if grad_image.shape == grad.shape:
            grad.add_(grad_image)
        else:
            for i, (dy, dx) in enumerate(offsets):
                grad[i, :, dy : dy + self.height, dx : dx + self.width].add_(grad_image[i])
        rows["t"] += 1
        if params.optimizer == "paper":
            paper_update_(x, rows["mu"], rows["G"], grad, params, group.lr_scale, work)
        else:
            adam_update_(x, rows["mu"], rows["G"], grad, rows["t"], params, group.lr_scale)
        project_bounded(x, float(params.bound), work)
        return r_alpha, r_tv

    # -- results --------------------------------------------------------------------------------
    def _collect(self, finished: Callable[[_Row | NaturalRow], bool]) -> list[tuple[int, Result]]:
        results = [(row.handle, self._natural_result(row)) for row in self._natural if finished(row)]
        if results:
            self._natural = [row for row in self._natural if not finished(row)]
        keep = [i for i, row in enumerate(self._rows) if not finished(row)]
        if len(keep) == len(self._rows):
            return results
        gone = [i for i in range(len(self._rows)) if i not in keep]
        results = [(self._rows[i].handle, self._result(i)) for i in gone] + results
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._state = {k: v.index_select(0, index) for k, v in self._state.items()}
        self._rows = [self._rows[i] for i in keep]
        self._plan = None
        return results

    def _result(self, i: int) -> Result:
        row = self._rows[i]
        s = self._state
        lo = self.pad // 2
        x = s["x"][i, :, lo : lo + self.height, lo : lo + self.width].detach()
        single = {k: v[i : i + 1] for k, v in s.items()}
        return self._measure(row, x, single["target"], single["mask"], single["weights"], single["is_inv"])

    def _natural_result(self, row: NaturalRow) -> Result:
        with torch.no_grad():
            x = row.output_image().detach()
        return self._measure(row, x, row.target, row.mask, row.weights, row.is_inv)

    def _measure(
        self, row: _Row | NaturalRow, x: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
        weights: torch.Tensor, is_inv: torch.Tensor,
    ) -> Result:  # fmt: skip
        """The row's Result, every figure measured on the quantized image a client gets as PNG."""
        image_uint8 = to_uint8(x, self.mean_rgb255)
        xq = from_uint8(image_uint8, self.mean_rgb255).to(self.device)[None]
        with torch.no_grad():
            phi = self.phi(xq).float()
            loss = batched_loss(phi, target, mask, weights, is_inv)
            r_alpha = alpha_norm(xq, float(row.params.alpha), float(row.params.b_norm))
            r_tv = total_variation(xq, float(row.params.beta), float(row.params.tv_norm))
        c = float(row.params.loss_weight or 0.0)
        terms = {
            "loss": float(loss),
            "weighted_loss": c * float(loss),
            "alpha_norm": float(r_alpha),
            "tv": float(r_tv),
        }
        terms["energy"] = (
            terms["weighted_loss"] + row.params.lambda_alpha * terms["alpha_norm"] + row.params.lambda_tv * terms["tv"]
        )
        obj = row.problem.objective
        reference = obj.reference.to(self.device) if obj.reference is not None else None
        error = feature_error(phi[0], reference) if reference is not None else None
        objective_value = float(loss) if obj.task == "invert" else float((phi[0] * obj.weights.to(self.device)).sum())
        hist = torch.stack([t for _, t in row.history]).cpu().numpy() if row.history else np.zeros((0, len(TERMS)))
        history = {"step": [step for step, _ in row.history]}
        history.update({name: hist[:, k].tolist() for k, name in enumerate(TERMS)})
        return Result(
            image_uint8=image_uint8,
            image=x.cpu(),
            terms=terms,
            history=history,
            feature_error=error,
            objective_value=objective_value,
            steps_run=row.step,
            stopped=row.step < row.total,
            params=row.params,
        )

    def current_image(self, handle: int) -> np.ndarray:
        """The row's current image as H×W×3 uint8 (for previews; a host sync)."""
        for natural in self._natural:
            if natural.handle == handle:
                with torch.no_grad():
                    return to_uint8(natural.output_image(), self.mean_rgb255)
        index = next(i for i, row in enumerate(self._rows) if row.handle == handle)
        lo = self.pad // 2
        return to_uint8(self._state["x"][index, :, lo : lo + self.height, lo : lo + self.width], self.mean_rgb255)

    def progress(self, handle: int) -> StepEvent:
        """The row's terms as of its latest recorded step (a host sync: call it only when reporting,
        on the steps the row records)."""
        for row in self.rows:
            if row.handle == handle:
                last = row.history[-1][1].tolist() if row.history else [math.nan] * len(TERMS)
                return StepEvent(row.step, row.total, handle, dict(zip(TERMS, last, strict=True)))
        raise KeyError(handle)


def padded_rows(rows: int, quantum: int) -> int:
    """How many images the network runs for ``rows`` rows: the next multiple of ``quantum``."""
    return -(-rows // quantum) * quantum


def required_jitter(problems: Sequence[Problem], height: int, width: int, stride: int) -> int:
    """The largest T among ``problems`` (defaults resolved): a batch holding them pads by T − 1."""
    # Parameterized problems shift their views by their own transforms and need no padding: they
    # count as the default T, so they batch with the paper's default problems.
    default = max(round(stride / 4), 1)
    return max(
        (
            int(p.params.resolved(p.objective.task, height, width, stride).jitter or 1)
            if p.params.parameterization == "pixel"
            else default
            for p in problems
        ),
        default=1,
    )


def batch_signature(problems: Sequence[Problem], height: int, width: int, stride: int) -> tuple[int, int, int]:
    """What a Minimizer must share with ``problems`` to take them into its batch: the image size
    and the padding of the pixel variable (T − 1). Presets, parameterizations and every other
    setting may differ within a batch."""
    return (int(height), int(width), required_jitter(problems, height, width, stride) - 1)


def network_rows(problems: Sequence[Problem]) -> int:
    """Images the network runs per step for ``problems``: one per pixel problem, ``copies`` per
    parameterized one (what a batch's activation memory grows with)."""
    return sum(1 if p.params.parameterization == "pixel" else int(p.params.copies) for p in problems)


def minimize(
    phi: Callable[[torch.Tensor], torch.Tensor],
    problems: Sequence[Problem],
    *,
    height: int,
    width: int,
    stride: int = 1,
    mean_rgb255: Sequence[float] | torch.Tensor = (0.0, 0.0, 0.0),
    device: str | torch.device = "cpu",
    on_step: Callable[[StepEvent], None] | None = None,
    report_every: int = 10,
    should_stop: Callable[[], bool] | None = None,
    row_quantum: int = 1,
    channels: int = 3,
    magnitude: torch.Tensor | None = None,
) -> list[Result]:
    """Run ``problems`` as one batch to the end (or until ``should_stop()``), in input order."""
    mini = Minimizer(
        phi,
        height=height,
        width=width,
        stride=stride,
        mean_rgb255=mean_rgb255,
        device=device,
        max_jitter=required_jitter(problems, height, width, stride),
        row_quantum=row_quantum,
        channels=channels,
        magnitude=magnitude,
    )
    handles = [mini.add(p, record_every=report_every) for p in problems]
    results: dict[int, Result] = {}
    while mini.rows:
        if should_stop is not None and should_stop():
            for handle in handles:
                mini.cancel(handle)
        for handle, result in mini.step():
            results[handle] = result
        if on_step is not None:
            for row in mini.rows:
                if row.step % report_every == 0 or row.step == row.total:
                    on_step(mini.progress(row.handle))
    return [results[h] for h in handles]
