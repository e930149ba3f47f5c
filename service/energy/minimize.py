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

from service.energy.objectives import Objective, batched_loss, feature_error
from service.energy.params import EnergyParams
from service.energy.regularizers import (
    alpha_norm,
    jitter_crop,
    jitter_offset,
    project_bounded,
    regularizer_terms_and_grads,
    total_variation,
)

TERMS = ("energy", "loss", "alpha_norm", "tv")


@dataclass
class Problem:
    """One visualization: an objective, its settings, a seed and (for caricature) a start image."""

    objective: Objective
    params: EnergyParams = field(default_factory=EnergyParams)
    seed: int = 0
    start: torch.Tensor | None = None  # 3×H×W energy-space image; None starts from noise


@dataclass
class Result:
    """What a finished (or stopped) problem gives back."""

    image_uint8: np.ndarray  # H×W×3, ready for PNG
    image: torch.Tensor  # 3×H×W float, mean-subtracted 0-255 (before quantization)
    terms: dict[str, float]  # final C·ℓ, ℓ, R_α, R_V and E, measured on the PNG image
    history: dict[str, list[float]]  # per-step energy terms (during optimization)
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

    def __init__(self, handle: int, problem: Problem, params: EnergyParams, generator: torch.Generator) -> None:
        self.handle = handle
        self.problem = problem
        self.params = params
        self.generator = generator
        self.step = 0
        self.total = params.steps + int(params.refine_steps or 0)
        self.cancelled = False
        self.history: list[torch.Tensor] = []  # stays on the device until the row ends: no syncs

    def in_refine(self) -> bool:
        return self.step >= self.params.steps


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
    ) -> None:
        self.phi = phi
        self.height, self.width, self.stride = int(height), int(width), int(stride)
        self.device = torch.device(device)
        self.mean_rgb255 = torch.as_tensor(mean_rgb255, dtype=torch.float32)
        # The variable is padded by T−1 so every shift crops a full H×W image from it.
        self.pad = (max_jitter if max_jitter is not None else max(round(stride / 4), 1)) - 1
        self.rows: list[_Row] = []
        self._handles = itertools.count()
        self._x: torch.Tensor | None = None
        self._state: dict[str, torch.Tensor] = {}

    # -- joining and leaving -------------------------------------------------------------------
    def add(self, problem: Problem) -> int:
        """Add a problem; it starts stepping with the next ``step()``. Returns its handle."""
        params = problem.params.resolved(problem.objective.task, self.height, self.width, self.stride)
        params.validate()
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
        obj = problem.objective
        row_tensors = {
            "x": x0,
            "target": obj.target,
            "mask": obj.mask,
            "weights": obj.weights,
            "is_inv": torch.tensor(obj.task == "invert"),
            "C": torch.tensor(float(params.loss_weight)),
            "alpha": torch.tensor(params.alpha),
            "lambda_alpha": torch.tensor(params.lambda_alpha),
            "beta": torch.tensor(params.beta),
            "lambda_tv": torch.tensor(params.lambda_tv),
            "b_norm": torch.tensor(params.b_norm),
            "tv_norm": torch.tensor(float(params.tv_norm)),
            "bound": torch.tensor(float(params.bound)),
            "lr": torch.tensor(float(params.learning_rate)),
            "lr_scale": torch.tensor(1.0),
            "momentum": torch.tensor(params.momentum),
            "decay": torch.tensor(params.decay),
            "is_adam": torch.tensor(params.optimizer == "adam"),
            "t": torch.tensor(0.0),  # optimizer step count (Adam bias correction)
            "mu": torch.zeros_like(x0),  # momentum / Adam first moment
            "G": torch.zeros_like(x0),  # running squared gradient / Adam second moment
        }
        project_bounded(row_tensors["x"][None], row_tensors["bound"][None])
        for name, value in row_tensors.items():
            value = value.to(self.device)[None]
            if name in self._state and self._state[name].shape[1:] != value.shape[1:]:
                raise ValueError(
                    f"{name} has shape {tuple(value.shape[1:])} "
                    f"but this batch uses {tuple(self._state[name].shape[1:])}"
                )
            self._state[name] = value if name not in self._state else torch.cat([self._state[name], value])
        handle = next(self._handles)
        self.rows.append(_Row(handle, problem, params, generator))
        return handle

    def cancel(self, handle: int) -> None:
        """Mark a row to leave at the next step; its partial result is returned then."""
        for row in self.rows:
            if row.handle == handle:
                row.cancelled = True

    def __len__(self) -> int:
        return len(self.rows)

    # -- one step -------------------------------------------------------------------------------
    def _crop_offsets(self) -> list[tuple[int, int]]:
        offsets = []
        centre = self.pad // 2
        for row in self.rows:
            if row.in_refine() or int(row.params.jitter or 1) <= 1:
                offsets.append((centre, centre))
            else:
                offsets.append(jitter_offset(row.generator, int(row.params.jitter or 1)))
        return offsets

    def _energy_and_grad(self, offsets: list[tuple[int, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """E's terms per row and ∂E/∂x: autograd through Φ for the loss, closed form for the priors."""
        s = self._state
        # The network sees each row's shifted crop; its gradient lands back on the crop's window of
        # the padded variable (one zero buffer, no autograd through the slicing).
        image = jitter_crop(s["x"], offsets, self.height, self.width).detach().requires_grad_(True)
        phi = self.phi(image).float()
        loss = batched_loss(phi, s["target"], s["mask"], s["weights"], s["is_inv"])
        (grad_image,) = torch.autograd.grad((s["C"] * loss).sum(), image)
        with torch.no_grad():
            if grad_image.shape == s["x"].shape:
                grad = grad_image
            else:
                grad = torch.zeros_like(s["x"])
                for i, (dy, dx) in enumerate(offsets):
                    grad[i, :, dy : dy + self.height, dx : dx + self.width] = grad_image[i]
            r_alpha, r_tv, grad_alpha, grad_tv = regularizer_terms_and_grads(
                s["x"],
                self._shared("alpha", lambda p: p.alpha),
                s["b_norm"],
                self._shared("beta", lambda p: p.beta),
                s["tv_norm"],
            )
            view = (-1, 1, 1, 1)
            grad.add_(s["lambda_alpha"].view(view) * grad_alpha).add_(s["lambda_tv"].view(view) * grad_tv)
            energy = s["C"] * loss.detach() + s["lambda_alpha"] * r_alpha + s["lambda_tv"] * r_tv
        return {"energy": energy, "loss": loss.detach(), "alpha_norm": r_alpha, "tv": r_tv}, grad

    def _shared(self, name: str, value: Callable[[EnergyParams], float]) -> torch.Tensor | float:
        """One float when every row has the same setting (known on the host), else the per-row tensor."""
        values = {value(row.params) for row in self.rows}
        return float(values.pop()) if len(values) == 1 else self._state[name]

    def step(self) -> list[tuple[int, Result]]:
        """Advance every active row by one step; return the rows that finished or were cancelled."""
        done = self._collect(lambda row: row.cancelled or row.step >= row.total)
        if not self.rows:
            return done
        s = self._state
        for row_index, row in enumerate(self.rows):
            if row.step == row.params.steps and row.step > 0:
                # Second stage: restart the optimizer from the first stage's image at a lower rate.
                s["mu"][row_index].zero_()
                s["G"][row_index].zero_()
                s["t"][row_index] = 0
                s["lr_scale"][row_index] = row.params.refine_lr_scale
        terms, grad = self._energy_and_grad(self._crop_offsets())
        self._update(grad)
        stacked = torch.stack([terms[k].detach() for k in TERMS], dim=1)
        for row_index, row in enumerate(self.rows):
            row.history.append(stacked[row_index])
            row.step += 1
        return done + self._collect(lambda row: row.step >= row.total)

    @torch.no_grad()
    def _update(self, grad: torch.Tensor) -> None:
        s = self._state
        view = (-1, 1, 1, 1)
        s["t"] += 1
        momentum, decay = s["momentum"].view(view), s["decay"].view(view)
        lr, lr_scale = s["lr"].view(view), s["lr_scale"].view(view)
        # Which rows use which rule is known on the host: compute only the rules in use (no sync).
        kinds = {row.params.optimizer for row in self.rows}
        if kinds == {"paper"}:
            # Paper (IJCV code): G ← ρG + g²; μ ← mμ − s·g/(1/η + √G); in place, no temporaries kept.
            s["G"].mul_(decay).addcmul_(grad, grad)
            s["mu"].mul_(momentum).sub_(lr_scale * grad / (s["G"].sqrt() + 1.0 / lr))
            s["x"].add_(s["mu"])
        else:
            g_sq = s["G"] * decay + grad * grad
            paper_mu = s["mu"] * momentum - lr_scale * grad / (1.0 / lr + g_sq.sqrt())
            # Adam (β1 = momentum, β2 = 1 − (1 − decay)/100, i.e. 0.999), step in pixel units.
            t = s["t"].view(view)
            m = s["mu"] * momentum + (1 - momentum) * grad
            beta2 = 1 - (1 - decay) / 100
            v = s["G"] * beta2 + (1 - beta2) * grad * grad
            m_hat = m / (1 - momentum.pow(t))
            v_hat = v / (1 - beta2.pow(t))
            adam_step = -lr * lr_scale * m_hat / (v_hat.sqrt() + 1e-8)
            is_adam = s["is_adam"].view(view)
            s["mu"] = torch.where(is_adam, m, paper_mu)
            s["G"] = torch.where(is_adam, v, g_sq)
            s["x"] = s["x"] + torch.where(is_adam, adam_step, paper_mu)
        project_bounded(s["x"], s["bound"])

    # -- results --------------------------------------------------------------------------------
    def _collect(self, finished: Callable[[_Row], bool]) -> list[tuple[int, Result]]:
        keep = [i for i, row in enumerate(self.rows) if not finished(row)]
        if len(keep) == len(self.rows):
            return []
        gone = [i for i in range(len(self.rows)) if i not in keep]
        results = [(self.rows[i].handle, self._result(i)) for i in gone]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._state = {k: v.index_select(0, index) for k, v in self._state.items()}
        self.rows = [self.rows[i] for i in keep]
        return results

    def _result(self, i: int) -> Result:
        row = self.rows[i]
        s = self._state
        lo = self.pad // 2
        x = s["x"][i, :, lo : lo + self.height, lo : lo + self.width].detach()
        image_uint8 = to_uint8(x, self.mean_rgb255)
        # Every final figure is measured on the quantized image a client gets as PNG.
        xq = from_uint8(image_uint8, self.mean_rgb255).to(self.device)[None]
        with torch.no_grad():
            single = {k: v[i : i + 1] for k, v in s.items()}
            phi = self.phi(xq).float()
            loss = batched_loss(phi, single["target"], single["mask"], single["weights"], single["is_inv"])
            r_alpha = alpha_norm(xq, single["alpha"], single["b_norm"])
            r_tv = total_variation(xq, single["beta"], single["tv_norm"])
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
        hist = torch.stack(row.history).cpu().numpy() if row.history else np.zeros((0, len(TERMS)))
        history = {name: hist[:, k].tolist() for k, name in enumerate(TERMS)}
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
        index = next(i for i, row in enumerate(self.rows) if row.handle == handle)
        lo = self.pad // 2
        return to_uint8(self._state["x"][index, :, lo : lo + self.height, lo : lo + self.width], self.mean_rgb255)

    def progress(self, handle: int) -> StepEvent:
        """The latest step's terms for one row (a host sync: call it only when reporting)."""
        for row in self.rows:
            if row.handle == handle:
                last = row.history[-1].tolist() if row.history else [math.nan] * len(TERMS)
                return StepEvent(row.step, row.total, handle, dict(zip(TERMS, last, strict=True)))
        raise KeyError(handle)


def required_jitter(problems: Sequence[Problem], height: int, width: int, stride: int) -> int:
    """The largest T among ``problems`` (defaults resolved): a batch holding them pads by T − 1."""
    return max(
        (int(p.params.resolved(p.objective.task, height, width, stride).jitter or 1) for p in problems), default=1
    )


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
    )
    handles = [mini.add(p) for p in problems]
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
