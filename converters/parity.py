"""Parity: the converted torch graph against onnxruntime (the independent judge), tap by tap.

Both sides get the same energy-space images, preprocessed by the same code (``to_model_input``);
onnxruntime runs the normalized ONNX graph with every checked tap as an output, torch runs each tap's
*truncated* representation, so truncation is checked too. The error per tap is relative:
``‖torch − ort‖ / ‖ort‖`` over the whole batch.

Tolerances: 1e-4 for float32 models (onnx2torch's own tests use 1e-5, 1e-4 for conv). A float16 model
computes in float16 on both sides, where one rounding is already ~5e-4 and errors add up through the
layers, so float16 models get 1e-2. On a GPU, TF32 is switched off for the check.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from converters.errors import ModelError
from converters.taps import TapInfo
from converters.truncate import extract_subgraph

RTOL = {"float32": 1e-4, "float16": 1e-2}
PARITY_SIZE = 128  # side used for a model whose input size is dynamic


@dataclass
class TapParity:
    alias: str
    name: str
    shape: list[int]
    rel_error: float
    max_abs_error: float
    ok: bool


@dataclass
class ParityReport:
    tolerance: float
    input_shape: list[int]
    device: str
    taps: list[TapParity] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.taps) and all(t.ok for t in self.taps)

    @property
    def max_rel_error(self) -> float:
        return max((t.rel_error for t in self.taps), default=math.nan)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        d["max_rel_error"] = self.max_rel_error
        return d

    def summary(self) -> str:
        lines = [f"parity vs onnxruntime (relative error, tolerance {self.tolerance:g}, input "
                 f"{self.input_shape}, {self.device}):"]
        for t in self.taps:
            lines.append(f"  {'ok  ' if t.ok else 'FAIL'} {t.alias} {t.shape}: {t.rel_error:.2e}")
        return "\n".join(lines)


class ParityError(ModelError):
    """The converted graph does not match onnxruntime; ``report`` holds the numbers."""

    def __init__(self, report: ParityReport):
        self.report = report
        bad = [t for t in report.taps if not t.ok]
        worst = max(bad, key=lambda t: t.rel_error if math.isfinite(t.rel_error) else math.inf)
        super().__init__(f"the converted model disagrees with onnxruntime at {len(bad)} of {len(report.taps)} "
                         f"checked taps (worst {worst.alias}: relative error {worst.rel_error:.2e} > "
                         f"{report.tolerance:g}); the model cannot be served\n{report.summary()}")


# Ops that only move data around: a parity check there says little, so default taps avoid them.
_PLUMBING = {"Reshape", "Transpose", "Slice", "Gather", "Concat", "Squeeze", "Unsqueeze", "Flatten", "Cast",
             "Identity", "Pad", "Expand", "Split", "Shape", "Tile", "Where", "Equal", "ConstantOfShape"}


def computing_taps(model) -> list[TapInfo]:
    """The taps that compute something (not plumbing), or every tap when none does."""
    return [t for t in model.taps if t.op_type not in _PLUMBING] or list(model.taps)


def default_taps(model, k: int = 3) -> list[TapInfo]:
    """k taps spread over the graph (evenly through the computing taps), the output last."""
    out = model.output_tap
    taps = [t for t in computing_taps(model) if t.name != out.name] or list(model.taps)
    if len(taps) < k:
        return list(dict.fromkeys([*taps, out]))
    used: list[int] = []
    for j in range(1, k):  # at j/k of the way, moved on past a collision on small graphs
        i = round(j * (len(taps) - 1) / k)
        while i in used and i < len(taps) - 1:
            i += 1
        if i not in used:
            used.append(i)
    return list(dict.fromkeys([*(taps[i] for i in used), out]))


def probe_images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Energy-space images: smooth colour blobs plus noise, RGB-vector norms around B = 80."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(height // 16, 2), max(width // 16, 2), generator=g) * 2 - 1
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    noise = torch.rand(n, 3, height, width, generator=g) * 2 - 1
    return (smooth * 80 + noise * 30).float()


@contextlib.contextmanager
def _no_tf32():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def ort_session(onnx_model, providers: list[str] | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # Keep onnxruntime close to the graph as written: its fusions change rounding, not semantics,
    # but the judge should run the model that we converted.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(onnx_model.SerializeToString(), sess_options=opts,
                                providers=providers or ["CPUExecutionProvider"])


def check_parity(model, taps: list[TapInfo | str] | None = None, n_images: int = 2, seed: int = 0,
                 device: str | torch.device = "cpu", rtol: float | None = None,
                 images: torch.Tensor | None = None) -> ParityReport:
    """Compare ``model`` (a ConvertedModel) with onnxruntime at ``taps`` (default: 3 spread taps).

    ``images`` (energy space, N×3×H×W) replaces the synthetic probe images, e.g. with photographs."""
    infos = [model.tap(t) for t in taps] if taps is not None else default_taps(model)
    pre = model.preprocessing
    if images is None:
        x = probe_images(n_images, pre.height or PARITY_SIZE, pre.width or PARITY_SIZE, seed)
    else:
        x = images.detach().float().cpu()
    tol = rtol if rtol is not None else RTOL[pre.dtype]
    report = ParityReport(tolerance=tol, input_shape=list(x.shape), device=str(device))
    sub = extract_subgraph(model.onnx, model.input_name, [t.name for t in infos])
    try:
        session = ort_session(sub)
        inp = model.to_model_input(x)
        step = model.batch or len(x)  # a fixed-batch graph is run in chunks of its batch size
        chunks = [session.run(None, {model.input_name: inp[i:i + step]}) for i in range(0, len(x), step)]
        refs = [np.concatenate(parts, axis=0) for parts in zip(*chunks, strict=True)]
    except Exception as exc:  # the judge itself cannot run the graph: not servable either
        raise ModelError(f"onnxruntime cannot run the model: {str(exc).strip().splitlines()[0]}") from exc
    with _no_tf32(), torch.no_grad():
        for info, ref in zip(infos, refs, strict=True):
            rep = model.representation(info).to(device)
            got = rep(x.to(device)).double().cpu().numpy()
            ref = np.asarray(ref, dtype=np.float64)
            if got.shape != ref.shape:
                rel, mx = math.inf, math.inf
            else:
                diff = got - ref
                denom = np.linalg.norm(ref)
                num = np.linalg.norm(diff)
                rel = float(num / denom) if denom > 0 else float(num)
                mx = float(np.abs(diff).max()) if diff.size else 0.0
                if not np.isfinite(got).all() or not np.isfinite(ref).all():
                    rel = math.inf
            report.taps.append(TapParity(info.alias, info.name, list(ref.shape[1:]), rel, mx,
                                         bool(rel <= tol)))
    return report


def verify(model, **kwargs) -> ParityReport:
    """check_parity, raising ParityError (a ModelError carrying the report) when any tap fails."""
    report = check_parity(model, **kwargs)
    if not report.ok:
        raise ParityError(report)
    return report
