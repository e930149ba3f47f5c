"""Model-release checks: parity at every tap, a visual record of chosen layers, drift from a baseline.

A CI job that gates a model release asks two questions, and this module answers both in one run:

1. Does the served torch graph compute what the exported ONNX computes? Parity against onnxruntime
   (``converters.parity``) at every computing tap, or an evenly sampled set on large graphs, on real
   photographs rather than synthetic probes, because a photo exercises the ranges the model sees.
2. What have its units learned, and what changed since the last release? For each chosen layer:
   Maximize images of a fixed sample of channels and inversions of reference photographs, with
   fixed seeds, for the release and for the baseline; and per-layer drift figures (``drift.py``).

Everything is deterministic for a given device: the same seeds, the same batch composition, the same
reference photographs. Identical models therefore give bit-identical images and zero drift, and a
change to one layer leaves every layer before it at exactly zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from converters.parity import ParityReport, check_parity, computing_taps, default_taps
from converters.taps import TapInfo
from service.energy import EnergyParams, Objective, Problem, channel_statistics, channel_weights, minimize
from service.energy.presets import preset_params
from service.jobs.job import unknown_tap_message
from service.jobs.reference import amplitude_spectrum, effective_receptive_field, reference_batch
from service.release.drift import LayerDrift, layer_drift
from service.release.exemplars import ChannelExemplars, exemplar_drift, layer_exemplars, reference_set

Progress = Callable[[str, int, int, str], None]  # (stage, done, total, message)


@dataclass(frozen=True)
class Preset:
    """How much a check renders: a CPU-sized ``small`` and a GPU-sized ``full``."""

    size: int  # image side for dynamic-size models (a fixed-size graph keeps its own)
    layers: int  # layers visualized, spread over the graph, the output last
    channels: int  # channels sampled per layer for Maximize
    photos: tuple[str, ...]  # reference photographs inverted per layer
    steps: int  # first-stage steps of every visualization (the paper's 300 in ``full``)
    parity_taps: int  # taps checked against onnxruntime; 0 = every computing tap
    parity_photos: int  # photographs in the parity batch


PRESETS: dict[str, Preset] = {
    "small": Preset(size=96, layers=3, channels=4, photos=("chelsea",), steps=60, parity_taps=48, parity_photos=2),
    "full": Preset(size=224, layers=6, channels=8, photos=("chelsea", "coffee"), steps=300, parity_taps=0,
                   parity_photos=4),
}


@dataclass(frozen=True)
class Thresholds:
    """Limits that fail the check; ``None`` = reported, not enforced."""

    parity_tolerance: float | None = None  # per-tap max|a-b| / (max|b| + |b|); None: the dtype's default (parity.RTOL)
    max_drift: float | None = None  # visual drift: feature distance of the same visualization, per layer
    max_feature_drift: float | None = None  # feature drift on the reference photographs, per layer
    max_changed_fraction: float | None = None  # fraction of a layer's channels whose responses changed
    channel_correlation: float = 0.9  # a channel "changed" when its responses correlate less than this


@dataclass
class Visual:
    """One rendered visualization of one model."""

    kind: str  # "maximize" | "invert"
    label: str  # "channel 12" | "chelsea"
    seed: int
    image: np.ndarray  # H×W×3 uint8
    objective: float  # ⟨Φ(x*), w⟩ for maximize, normalized feature error for invert


@dataclass
class LayerReport:
    tap: TapInfo
    channels: list[int]
    visuals: list[Visual]
    baseline_visuals: list[Visual] | None = None
    drift: LayerDrift | None = None
    note: str = ""  # why a layer could not be compared, e.g. missing from the baseline
    # The reference photographs' top crops per sampled channel (release, baseline), and one note
    # per channel whose top exemplars moved between them.
    exemplars: list[ChannelExemplars] = field(default_factory=list)
    baseline_exemplars: list[ChannelExemplars] | None = None
    exemplar_notes: list[str] = field(default_factory=list)


@dataclass
class CheckResult:
    model_name: str
    baseline_name: str | None
    preset: str
    size: tuple[int, int]
    device: str
    thresholds: Thresholds
    parity: ParityReport
    baseline_parity: ParityReport | None
    layers: list[LayerReport] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.reasons


class CheckCancelled(Exception):
    """The caller's ``should_stop`` fired (a cancelled RPC)."""


def _no_progress(stage: str, done: int, total: int, message: str) -> None:
    pass


def check_size(model: Any, preset: Preset) -> tuple[int, int]:
    """A fixed-size graph dictates the size; otherwise the preset's square."""
    from service.jobs.job import fixed_input_size

    return fixed_input_size(model) or (preset.size, preset.size)


def evenly_spaced(n: int, k: int) -> list[int]:
    """k indices evenly spaced over 0..n−1, first and last included (all n when k ≥ n)."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def parity_taps(model: Any, limit: int, must: list[TapInfo]) -> list[TapInfo]:
    """Every computing tap, or ``limit`` of them evenly spread (first and output included), plus ``must``."""
    taps = computing_taps(model)
    if limit:
        taps = [taps[i] for i in evenly_spaced(len(taps), limit)]
    chosen = {t.name: t for t in [*taps, *must, model.output_tap]}
    return sorted(chosen.values(), key=lambda t: t.index)


def sample_channels(n_channels: int, k: int) -> list[int]:
    """k channels evenly spaced over 0..C−1: the same choice for a release and its baseline."""
    return evenly_spaced(n_channels, k)


def render_layer(
    model: Any,
    tap: TapInfo,
    channels: list[int],
    preset: Preset,
    size: tuple[int, int],
    device: torch.device,
    references: torch.Tensor,
    seed: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> list[Visual]:
    """Maximize the sampled channels and invert the preset's photos at ``tap``, as one batch.

    ``references``: the reference photographs in this model's energy space, for M_k."""
    h, w = size
    mean = tuple(model.preprocessing.mean_rgb255)
    phi = model.representation(tap).to(device)
    with torch.no_grad():
        stats = channel_statistics(phi, references.to(device)).cpu()
        starts = reference_batch(h, w, mean, preset.photos)
        phi0 = phi(starts.to(device)).float().cpu()
    shape = tuple(phi0.shape[1:])
    rf = effective_receptive_field(tap.receptive_field_yx, h, w)
    # The visual record uses each task's default preset (natural Maximize, paper inversion), so the
    # report shows what a user of the service would see.
    params = EnergyParams(steps=preset.steps, refine_steps=preset.steps // 6)
    natural = preset_params("natural", "maximize", steps=preset.steps)
    problems: list[Problem] = []
    labels: list[tuple[str, str, int]] = []
    for i, c in enumerate(channels):
        weights = channel_weights(shape, c, receptive_field=rf, channel_max=float(stats[c]), spatial=natural.spatial)
        problems.append(Problem(Objective.maximize(weights), natural, seed=seed + i))
        labels.append(("maximize", f"channel {c}", seed + i))
    for j, name in enumerate(preset.photos):
        s = seed + 1000 + j
        problems.append(Problem(Objective.invert(phi0[j]), params, seed=s))
        labels.append(("invert", name, s))
    channels_in = model.preprocessing.channels
    results = minimize(phi, problems, height=h, width=w, stride=tap.stride, mean_rgb255=mean, device=device,
                       should_stop=should_stop, channels=channels_in,
                       magnitude=amplitude_spectrum(*natural.canvas_size(h, w), channels_in))
    if any(r.stopped for r in results):
        raise CheckCancelled()
    return [
        Visual(kind, label, s, r.image_uint8, float(r.feature_error if kind == "invert" else r.objective_value))
        for (kind, label, s), r in zip(labels, results, strict=True)
    ]


def choose_layers(model: Any, preset: Preset, taps: list[str] | None) -> list[TapInfo]:
    if taps:
        from converters.errors import UnknownTap

        try:
            return [model.tap(t) for t in taps]
        except UnknownTap as exc:  # counted and worded as the service words it
            raise ValueError(unknown_tap_message(model, exc)) from exc
    return default_taps(model, preset.layers)


def run_check(
    model: Any,
    baseline: Any | None = None,
    *,
    preset: str = "small",
    taps: list[str] | None = None,
    thresholds: Thresholds | None = None,
    device: str | torch.device = "cpu",
    model_name: str = "model",
    baseline_name: str | None = None,
    seed: int = 0,
    progress: Progress = _no_progress,
    should_stop: Callable[[], bool] | None = None,
) -> CheckResult:
    """Parity, visualizations and (with ``baseline``) drift for ``model`` (ConvertedModels)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    limits = thresholds or Thresholds()
    dev = torch.device(device)
    size = check_size(model, p)
    if baseline is not None and check_size(baseline, p) != size:
        raise ValueError(f"the baseline's input size {check_size(baseline, p)} differs from the release's {size}; "
                         "drift needs both at one size")
    layers = choose_layers(model, p, taps)
    stop = should_stop or (lambda: False)

    def parity_of(m: Any, label: str, must: list[TapInfo]) -> ParityReport:
        chosen = parity_taps(m, p.parity_taps, must)
        progress("parity", 0, len(chosen), f"{label}: {len(chosen)} taps against onnxruntime")
        photos = reference_batch(*size, tuple(m.preprocessing.mean_rgb255),
                                 ("chelsea", "coffee", "astronaut", "rocket")[: p.parity_photos])
        report = check_parity(m, taps=chosen, images=photos, device=dev, rtol=limits.parity_tolerance)
        progress("parity", len(chosen), len(chosen), f"{label}: worst parity error {report.max_rel_error:.2e}")
        return report

    result = CheckResult(model_name, baseline_name, preset, size, str(dev), limits,
                         parity_of(model, model_name, layers), None)
    # The reference photographs in each model's energy space, once per check: M_k and feature drift.
    refs = reference_batch(*size, tuple(model.preprocessing.mean_rgb255))
    base_refs = reference_batch(*size, tuple(baseline.preprocessing.mean_rgb255)) if baseline is not None else None
    ranked = reference_set(*size)  # the exemplars' images, the same for both releases
    base_layers: dict[str, TapInfo] = {}
    if baseline is not None:
        base_layers = {t.name: t for t in baseline.taps}
        matched = [base_layers[t.name] for t in layers if t.name in base_layers]
        result.baseline_parity = parity_of(baseline, baseline_name or "baseline", matched)

    for i, tap in enumerate(layers):
        if stop():
            raise CheckCancelled()
        n_channels = int(tap.shape[0]) if tap.shape and tap.shape[0] else 1
        channels = sample_channels(n_channels, p.channels)
        progress("render", i, len(layers), f"{model_name} {tap.alias}: {len(channels)} channels, "
                 f"{len(p.photos)} inversions")
        layer = LayerReport(tap, channels, render_layer(model, tap, channels, p, size, dev, refs, seed, stop))
        layer.exemplars = layer_exemplars(model, tap, channels, size, dev, ranked)
        old = base_layers.get(tap.name)
        if baseline is not None and old is None:
            layer.note = "not in the baseline (no tap with this ONNX value name)"
        elif baseline is not None and old is not None:
            if tuple(old.shape) != tuple(tap.shape):
                layer.note = f"shape changed from {list(old.shape)} to {list(tap.shape)}: not comparable"
            else:
                progress("render", i, len(layers), f"{baseline_name or 'baseline'} {tap.alias}")
                assert base_refs is not None
                layer.baseline_visuals = render_layer(baseline, old, channels, p, size, dev, base_refs, seed, stop)
                layer.baseline_exemplars = layer_exemplars(baseline, old, channels, size, dev, ranked)
                layer.exemplar_notes = exemplar_drift(layer.exemplars, layer.baseline_exemplars)
                layer.drift = layer_drift(
                    model.representation(tap).to(dev), baseline.representation(old).to(dev),
                    [v.image for v in layer.visuals], [v.image for v in layer.baseline_visuals],
                    refs, base_refs,
                    tuple(baseline.preprocessing.mean_rgb255), limits.channel_correlation, dev,
                )
        result.layers.append(layer)
        progress("render", i + 1, len(layers), f"{tap.alias} done")
    result.reasons = verdict(result)
    return result


def verdict(result: CheckResult) -> list[str]:
    """Why the check fails, one line per broken limit (empty: it passes)."""
    reasons = [f"parity: tap {t.alias!r} ({t.name}) differs from onnxruntime by {t.rel_error:.2e} relative "
               f"(tolerance {result.parity.tolerance:g})" for t in result.parity.taps if not t.ok]
    lim = result.thresholds
    for layer in result.layers:
        d = layer.drift
        if d is None:
            continue
        name = layer.tap.alias
        if lim.max_drift is not None and not d.visual_drift_max <= lim.max_drift:
            reasons.append(f"drift: layer {name!r} visual drift {d.visual_drift_max:.3g} > {lim.max_drift:g}")
        if lim.max_feature_drift is not None and not d.feature_drift <= lim.max_feature_drift:
            reasons.append(f"drift: layer {name!r} feature drift {d.feature_drift:.3g} > {lim.max_feature_drift:g}")
        if lim.max_changed_fraction is not None and not d.changed_fraction <= lim.max_changed_fraction:
            reasons.append(f"drift: layer {name!r} has {d.changed_channels} of {d.n_channels} channels changed "
                           f"({d.changed_fraction:.1%} > {lim.max_changed_fraction:.1%})")
    return reasons


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def summary(result: CheckResult) -> dict[str, Any]:
    """Every figure of the check as plain JSON types (images are in the HTML, not here)."""

    def visuals(vs: list[Visual] | None) -> list[dict] | None:
        if vs is None:
            return None
        return [{"kind": v.kind, "label": v.label, "seed": v.seed, "objective": _finite(v.objective)} for v in vs]

    def exemplars(es: list[ChannelExemplars] | None) -> list[dict] | None:
        if es is None:
            return None
        return [{"channel": e.channel, "top": [{"id": x.image_id, "activation": _finite(x.activation),
                                                "fraction_of_max": _finite(x.fraction_of_max)} for x in e.top]}
                for e in es]  # fmt: skip

    return {
        "ok": result.ok,
        "reasons": result.reasons,
        "model": result.model_name,
        "baseline": result.baseline_name,
        "preset": result.preset,
        "size": list(result.size),
        "device": result.device,
        "thresholds": asdict(result.thresholds),
        "parity": result.parity.as_dict(),
        "baseline_parity": result.baseline_parity.as_dict() if result.baseline_parity else None,
        "layers": [
            {
                "tap": layer.tap.as_dict(),
                "channels": layer.channels,
                "visuals": visuals(layer.visuals),
                "baseline_visuals": visuals(layer.baseline_visuals),
                "drift": layer.drift.as_dict() if layer.drift else None,
                "note": layer.note,
                "exemplars": exemplars(layer.exemplars),
                "baseline_exemplars": exemplars(layer.baseline_exemplars),
                "exemplar_drift": layer.exemplar_notes,
            }
            for layer in result.layers
        ],
    }
