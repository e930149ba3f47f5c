"""Hyperparameters of the natural pre-image energy, with the reference values of SPEC.md."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Literal

from service.energy.transforms import ViewSettings

# Typical RGB-vector norm of a mean-subtracted image on the 0-255 scale (SPEC.md "Units").
B_NORM = 80.0

Task = Literal["invert", "maximize", "caricature"]
OptimizerName = Literal["paper", "adam", "nadam"]
ParameterizationName = Literal["pixel", "fourier", "phase"]
Spatial = Literal["centre", "mean"]
PARAMETERIZATIONS = ("pixel", "fourier", "phase")
OPTIMIZERS = ("paper", "adam", "nadam")
SPATIAL = ("centre", "mean")

# Step sizes of the parameterized images, in units of their variable: lucid's Adam rate for the
# Fourier spectrum, MACO's NAdam rate for the phase (phases live on a scale of radians).
DEFAULT_VARIABLE_LR: dict[str, float] = {"fourier": 0.05, "phase": 1.0}

# C, the loss weight, by task. Inversion: the paper tries 1, 20, 100, 300 for CNNs (larger is
# closer to Φ0 and less regularized) and 100 for HOG/DSIFT; we default to 300 because an
# inversion service is asked "what does the layer keep". Maximization: the loss −⟨Φ, w⟩ carries
# the paper's 1/(ρ²·M_k) scaling, so it is ~1/ρ² where the regularizers are O(1); C = 3·10⁴ was
# measured on the bundled model (docs/energy.md) to reach the target unit while keeping the image
# smooth. Caricature: the loss is −1 at the start image; C = 100 as for the shallow inversions.
DEFAULT_LOSS_WEIGHT: dict[str, float] = {"invert": 300.0, "maximize": 3.0e4, "caricature": 100.0}


@dataclass(frozen=True)
class EnergyParams:
    """One problem's settings. ``None`` means "the paper's default for this task/size"."""

    loss_weight: float | None = None  # C
    alpha: float = 6.0  # α of the α-norm
    lambda_alpha: float = 1.0  # λ_α (after normalization by B)
    beta: float = 2.0  # β of TV^β (1, 1.5 or 2 in the paper)
    lambda_tv: float = 1.0  # λ_V (after normalization by V)
    b_norm: float = B_NORM  # B
    tv_norm: float | None = None  # V, default B / 6.5
    bound: float | None = None  # radius of the bounded range B₊, default 2B
    jitter: int | None = None  # T; default max(round(stride / 4), 1)
    steps: int = 300  # first-stage steps
    refine_steps: int | None = None  # second stage without jitter; default 50 for inversion
    refine_lr_scale: float = 0.1  # learning-rate factor of the second stage
    lr_end_scale: float = 1.0  # factor the rate falls to, linearly, by the first stage's last step (fourier/phase)
    optimizer: OptimizerName = "paper"
    learning_rate: float | None = None  # η; default H·W·0.05·B²/α (paper), 4.0 px for Adam
    momentum: float = 0.9
    decay: float = 0.9  # of the running squared gradient G
    # -- what is optimized and how it is seen (SPEC.md "Beyond the paper"); the defaults are the paper's
    parameterization: ParameterizationName = "pixel"
    fourier_decay: float = 1.0  # d of the 1/f^d spectrum scale (fourier)
    copies: int = 1  # transformed views of the image per step (fourier/phase); the loss is their mean
    translate: float = 0.0  # largest random shift of a view, pixels
    scale_min: float = 1.0  # random zoom of a view, uniform in [scale_min, scale_max]
    scale_max: float = 1.0
    rotate: float = 0.0  # largest random rotation of a view, degrees
    crop_start: float = 1.0  # random crop side (fraction of the image) at the first step …
    crop_end: float = 1.0  # … and at the last (MACO's shrinking box)
    crop_spread: float = 0.15  # std of the crop centre, fraction of the image side
    # Side of the optimized image as a multiple of the network's input (fourier/phase). Views are
    # cut from it (crop fractions are of the canvas) and resampled to the input size, and the result
    # is the canvas resampled back to it: at 2 a view at crop 0.5 sees the canvas at its own scale.
    canvas: float = 1.0
    noise: float = 0.0  # std of additive noise on each view, 0–1 units
    anchor: float = 0.0  # weight of ‖x − x0‖²/(H·W·B²), the pull back to the start image (caricature)
    diversity: float = 0.0  # weight of the Gram-similarity penalty among the images of one target
    spatial: Spatial = "centre"  # maximize a channel at the map's centre (the paper) or its mean (lucid)

    def resolved(self, task: Task, height: int, width: int, stride: int) -> EnergyParams:
        """The same settings with every default filled in for this task and image size."""
        b = self.b_norm
        lr = self.learning_rate
        natural = self.parameterization != "pixel"
        if lr is None and natural:
            lr = DEFAULT_VARIABLE_LR[self.parameterization]
        elif lr is None:
            lr = height * width * 0.05 * b * b / self.alpha if self.optimizer == "paper" else 4.0
        # A parameterized image has no other prior by default, so C only weighs the loss against
        # the anchor and the diversity term; the paper's C balances it against R_α and R_V.
        loss_weight = self.loss_weight
        if loss_weight is None:
            loss_weight = 1.0 if natural else DEFAULT_LOSS_WEIGHT[task]
        return replace(
            self,
            loss_weight=loss_weight,
            tv_norm=b / 6.5 if self.tv_norm is None else self.tv_norm,
            bound=2 * b if self.bound is None else self.bound,
            jitter=max(round(stride / 4), 1) if self.jitter is None else self.jitter,
            refine_steps=(50 if task == "invert" else 0) if self.refine_steps is None else self.refine_steps,
            learning_rate=lr,
        )

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work."""
        finite = {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), float)}
        for name, value in finite.items():
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.alpha < 1:
            raise ValueError(f"alpha must be ≥ 1 (got {self.alpha}); the paper uses 6")
        if not 1 <= self.beta <= 2:
            raise ValueError(f"beta must be in [1, 2] (got {self.beta}); the paper uses 1, 1.5 or 2")
        if self.steps < 0 or (self.refine_steps is not None and self.refine_steps < 0):
            raise ValueError("steps and refine_steps must be ≥ 0")
        if self.b_norm <= 0 or (self.tv_norm is not None and self.tv_norm <= 0):
            raise ValueError("b_norm and tv_norm must be > 0")
        if self.bound is not None and self.bound <= 0:
            raise ValueError("bound must be > 0")
        if self.jitter is not None and self.jitter < 1:
            raise ValueError("jitter (T) must be ≥ 1; T = 1 means no jitter")
        if self.loss_weight is not None and self.loss_weight < 0:
            raise ValueError("loss_weight (C) must be ≥ 0")
        if self.lambda_alpha < 0 or self.lambda_tv < 0:
            raise ValueError("lambda_alpha and lambda_tv must be ≥ 0")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError("learning_rate must be > 0")
        if not (0 <= self.momentum < 1 and 0 <= self.decay < 1):
            raise ValueError("momentum and decay must be in [0, 1)")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.parameterization not in PARAMETERIZATIONS:
            raise ValueError(
                f"parameterization must be one of {', '.join(PARAMETERIZATIONS)}, got {self.parameterization!r}"
            )
        if self.spatial not in SPATIAL:
            raise ValueError(f"spatial must be 'centre' or 'mean', got {self.spatial!r}")
        natural = self.parameterization != "pixel"
        if natural and self.optimizer == "paper":
            raise ValueError(
                f"the paper's optimizer works on pixels only; use adam or nadam with the {self.parameterization} "
                "parameterization"
            )
        if not natural and self.optimizer == "nadam":
            raise ValueError("nadam works with the fourier and phase parameterizations; pixels take paper or adam")
        if natural and self.learning_rate is not None and self.learning_rate > 1e3:
            raise ValueError(
                f"learning_rate {self.learning_rate:g} is too large for the {self.parameterization} parameterization "
                f"(its variable is O(1); the default is {DEFAULT_VARIABLE_LR[self.parameterization]:g}); use ≤ 1000"
            )
        if not 1 <= self.copies <= 64:
            raise ValueError(f"copies must be in 1…64 (got {self.copies})")
        if not 0 <= self.translate <= 1024:
            raise ValueError(f"translate must be in 0…1024 pixels (got {self.translate})")
        if not 0.05 <= self.scale_min <= self.scale_max <= 4:
            raise ValueError(f"need 0.05 ≤ scale_min ≤ scale_max ≤ 4 (got {self.scale_min}, {self.scale_max})")
        if not 0 <= self.rotate <= 180:
            raise ValueError(f"rotate must be in 0…180 degrees (got {self.rotate})")
        if not (0.02 <= self.crop_start <= 1 and 0.02 <= self.crop_end <= 1):
            raise ValueError(f"crop_start and crop_end must be in [0.02, 1] (got {self.crop_start}, {self.crop_end})")
        if not 0 <= self.crop_spread <= 1:
            raise ValueError(f"crop_spread must be in [0, 1] (got {self.crop_spread})")
        if not 1 <= self.canvas <= 4:
            raise ValueError(f"canvas must be in [1, 4] (got {self.canvas}); 1 optimizes the image at the output size")
        if not 0 <= self.noise <= 1:
            raise ValueError(f"noise must be in [0, 1] (got {self.noise})")
        if not 0 <= self.fourier_decay <= 4:
            raise ValueError(f"fourier_decay must be in [0, 4] (got {self.fourier_decay})")
        if not 0 < self.lr_end_scale <= 1:
            raise ValueError(f"lr_end_scale must be in (0, 1] (got {self.lr_end_scale}); 1 keeps the rate constant")
        if not natural and self.lr_end_scale != 1:
            raise ValueError("lr_end_scale needs the fourier or phase parameterization")
        if self.anchor < 0 or self.diversity < 0:
            raise ValueError("anchor and diversity must be ≥ 0")
        if not natural and (self.anchor > 0 or self.diversity > 0):
            raise ValueError("anchor and diversity need the fourier or phase parameterization")
        if not natural and self.canvas != 1:
            raise ValueError("canvas needs the fourier or phase parameterization")
        if not natural and (self.copies > 1 or not self.views().identity):
            raise ValueError(
                "views (copies, translate, scale, rotate, crop, noise) need the fourier or phase "
                "parameterization; pixels are shifted by jitter (T)"
            )

    def canvas_size(self, height: int, width: int) -> tuple[int, int]:
        """The optimized image's height and width for an output of ``height`` × ``width``."""
        return max(round(height * self.canvas), height), max(round(width * self.canvas), width)

    def views(self) -> ViewSettings:
        """The view settings of a parameterized image."""
        return ViewSettings(
            copies=self.copies, translate=self.translate, scale_min=self.scale_min, scale_max=self.scale_max,
            rotate=self.rotate, crop_start=self.crop_start, crop_end=self.crop_end, crop_spread=self.crop_spread,
            noise=self.noise,
        )  # fmt: skip
