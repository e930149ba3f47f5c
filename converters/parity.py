"""Parity: the converted torch graph against onnxruntime (the independent judge), tap by tap.

Both sides get the same energy-space images, preprocessed by the same code (``to_model_input``):
two seeded probes and a photograph. onnxruntime runs the file *as uploaded*, every node kept, with
each checked tap as an output; torch runs each tap's *truncated* representation, so the upgrade, the
normalization (inlined functions, folded constants, rewritten pads) and the truncation are judged
with the conversion. A value the uploaded file has no name for (one made inside an inlined function)
is judged on the normalized graph and labelled so; the default taps are chosen among the file's values.

The measure is elementwise, ``|a − b| ≤ atol + rtol·|b|`` with ``rtol = tol`` and ``atol = tol·max|b|``
(the tensor's own scale), reported as the figure ``max_i |a_i − b_i| / (max|b| + |b_i|)``, which is
≤ tol exactly when every element passes. Tied to the scale, a value near zero in a tensor of large
values is not held to a relative error it cannot have in float32; taken per element, one wrong pixel
is not diluted by a million right ones (a norm over the tensor would be).

Where onnxruntime's own kernel is less accurate than float32 allows (its vectorized Sigmoid, Tanh and
Exp have absolute, not relative, accuracy: sigmoid(−15) comes out 17 % off, sigmoid(−20) as 0), a tap
made by such an op is also judged against the op evaluated in float64 on onnxruntime's own input to
it, and the better of the two figures counts. A wrong conversion upstream still fails: its input
differs, so neither reference agrees.

Tolerances: 1e-4 for float32 models (onnx2torch's own tests use 1e-5, 1e-4 for conv). A float16 model
computes in float16 on both sides, where one rounding is already ~5e-4 and errors add up through the
layers, so float16 models get 1e-2. On a GPU, TF32 is switched off for the check.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch
from onnx import helper

from converters.errors import FailsAtSize, ModelError
from converters.taps import TapInfo
from converters.truncate import extract_subgraph

RTOL = {"float32": 1e-4, "float16": 1e-2}
PARITY_SIZE = 128  # side used for a model whose input size is dynamic
PHOTOS = ("chelsea",)  # scikit-image photographs added to the probes by verify()
MEASURE = "max |a−b| / (max|b| + |b|)"
NORMALIZED = "onnxruntime on the normalized graph"  # a row judged there, not on the file as uploaded
# Quantized models. A QDQ graph is judged as written (no onnxruntime graph optimization, see ort_session):
# fused into onnxruntime's integer kernels it comes out differently (a QDQ resnet18: 39 % of a layer's
# elements 1–3 steps off), while ONNX defines it as the float graph, which we match exactly. Integer ops
# (QLinearConv, QLinearMatMul, ConvInteger, MatMulInteger) only have those kernels, which round
# requantization their own way and, without VNNI, saturate int16 partial sums (measured on a per-channel
# QDQ CNN run fused: 11.7 % of a layer's elements one step off, 1 in 13 824 two). Such a tap (its step
# from converters.quantized.quantization_bounds) passes when every element is within MAX_STEPS and the
# mean within MEAN_STEPS: a zero point or a scale gone wrong is off by many steps, a rounding mode gone
# wrong by half a step on average.
MAX_STEPS = 2.0
MEAN_STEPS = 0.25


@dataclass
class TapParity:
    alias: str
    name: str
    shape: list[int]
    rel_error: float  # the judged figure: max_i |a_i − b_i| / (max|b| + |b_i|)
    max_abs_error: float
    ok: bool
    norm_rel_error: float = math.nan  # ‖a − b‖ / ‖b‖, for information
    reference: str = "onnxruntime"  # what b was: onnxruntime's value, or the op in float64 on its input
    step: float = 0.0  # quantized models: the one-step bound added to atol (0: none)
    step_error: float | None = None  # max |a − b| / step, in quantization steps (None: not quantized)
    step_mean: float | None = None  # mean |a − b| / step


@dataclass
class ParityReport:
    tolerance: float
    input_shape: list[int]
    device: str
    taps: list[TapParity] = field(default_factory=list)
    measure: str = MEASURE
    images: str = "probes"  # "probes", "probes+photographs" or "given"

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
        lines = [
            f"parity vs onnxruntime ({self.measure}, tolerance {self.tolerance:g}, input "
            f"{self.input_shape} {self.images}, {self.device}):"
        ]
        for t in self.taps:
            via = "" if t.reference == "onnxruntime" else f" (against {t.reference})"
            if t.step > 0 and t.step_error is not None:
                via += f" (max {t.step_error:.2f}, mean {t.step_mean:.3f} quantization steps of {t.step:.3g})"
            lines.append(f"  {'ok  ' if t.ok else 'FAIL'} {t.alias} {t.shape}: {t.rel_error:.2e}{via}")
        return "\n".join(lines)


class ParityError(ModelError):
    """The converted graph does not match onnxruntime; ``report`` holds the numbers."""

    def __init__(self, report: ParityReport):
        self.report = report
        bad = [t for t in report.taps if not t.ok]
        worst = max(bad, key=lambda t: t.rel_error if math.isfinite(t.rel_error) else math.inf)
        super().__init__(
            f"the converted model disagrees with onnxruntime at {len(bad)} of {len(report.taps)} "
            f"checked taps (worst {worst.alias}: error {worst.rel_error:.2e} > "
            f"{report.tolerance:g}, measured as {report.measure}); the model cannot be served\n"
            f"{report.summary()}"
        )


# Ops that only move data around: a parity check there says little, so default taps avoid them.
_PLUMBING = {
    "Reshape",
    "Transpose",
    "Slice",
    "Gather",
    "Concat",
    "Squeeze",
    "Unsqueeze",
    "Flatten",
    "Cast",
    "Identity",
    "Pad",
    "Expand",
    "Split",
    "Shape",
    "Tile",
    "Where",
    "Equal",
    "ConstantOfShape",
}


def computing_taps(model) -> list[TapInfo]:
    """The taps that compute something (not plumbing), or every tap when none does."""
    return [t for t in model.taps if t.op_type not in _PLUMBING] or list(model.taps)


def default_taps(model, k: int = 3) -> list[TapInfo]:
    """k taps spread over the graph (evenly through the computing taps), the output last."""
    out = model.output_tap
    taps = [t for t in computing_taps(model) if t.name != out.name] or list(model.taps)
    known = _names_in_reference(model)
    if known is not None:  # the judge runs the uploaded file: only values it computes can be compared
        taps = [t for t in taps if t.name in known] or taps
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


def photo_images(
    height: int, width: int, mean_rgb255: tuple[float, float, float], names: tuple[str, ...] = PHOTOS
) -> torch.Tensor:
    """scikit-image's photographs, centre-cropped to the aspect ratio and resized, in energy space
    (a probe never has a photograph's saturated regions, flat skies and sharp edges)."""
    import skimage.data
    from PIL import Image

    out = []
    for name in names:
        arr = np.asarray(getattr(skimage.data, name)())
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        arr = arr[..., :3]
        h, w = arr.shape[:2]
        if w * height > h * width:  # too wide: crop the sides
            new_w = max(1, round(h * width / height))
            arr = arr[:, (w - new_w) // 2 : (w - new_w) // 2 + new_w]
        else:
            new_h = max(1, round(w * height / width))
            arr = arr[(h - new_h) // 2 : (h - new_h) // 2 + new_h]
        img = Image.fromarray(np.ascontiguousarray(arr)).resize((width, height), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1))
    mean = torch.tensor(mean_rgb255, dtype=torch.float32).view(1, 3, 1, 1)
    return torch.stack(out) - mean


@contextlib.contextmanager
def _no_tf32():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def ort_session(
    onnx_model, providers: list[str] | None = None, as_written: bool = False, threads: int = 1, fast: bool = False
):
    """An onnxruntime session on ``threads`` threads. ``as_written``: no graph optimization at all, for
    quantized graphs, where onnxruntime would fuse DequantizeLinear → Conv → QuantizeLinear into its
    integer kernels, which round differently and, without VNNI, saturate int16 partial sums (measured on
    a QDQ resnet18: 39 % of a layer's elements one to three steps off; as written, none). ``fast``: all
    of onnxruntime's fusions, for passes that only read activations and do not judge the converter."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # Keep onnxruntime close to the graph as written: its fusions change rounding, not semantics,
    # but the judge should run the model that we converted.
    level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fast else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL if as_written else level
    opts.intra_op_num_threads = threads
    if threads > 1:
        # Idle pool threads sleep instead of spinning, so they do not take the cores from torch's
        # threads, which run the steps between two passes.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(
        onnx_model.SerializeToString(), sess_options=opts, providers=providers or ["CPUExecutionProvider"]
    )


def elementwise_error(got: np.ndarray, ref: np.ndarray) -> float:
    """``max_i |a_i − b_i| / (max|b| + |b_i|)``: ≤ tol exactly when ``|a − b| ≤ tol·max|b| + tol·|b|``
    holds for every element. An all-zero reference makes it the largest absolute difference."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        return math.inf
    if not ref.size:
        return 0.0
    if not np.isfinite(got).all() or not np.isfinite(ref).all():
        same = np.array_equal(got, ref, equal_nan=True)  # e.g. both −inf at the same places
        if not same:
            return math.inf
        finite = np.isfinite(ref)
        got, ref = got[finite], ref[finite]
        if not ref.size:
            return 0.0
    diff = np.abs(got - ref)
    scale = float(np.abs(ref).max())
    if scale == 0:
        return float(diff.max())
    return float((diff / (scale + np.abs(ref))).max())


def _sigmoid64(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _softmax64(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _exact_op(node: onnx.NodeProto, opset: int):
    """The op of ``node`` in float64 numpy, for the ops whose onnxruntime kernels are approximate in
    their tails; None for every other op (judged against onnxruntime only)."""
    op = node.op_type
    if op == "Sigmoid":
        return _sigmoid64
    if op == "Tanh":
        return np.tanh
    if op == "Exp":
        return np.exp
    if op == "Softplus":
        return lambda x: np.logaddexp(0.0, x)
    if op == "Softmax" and opset >= 13:  # before 13 the axis flattens the trailing dims
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        return lambda x: _softmax64(x, axis)
    return None


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """``model`` itself, every node kept, with ``names`` as its outputs (edited in place: the caller
    passes a freshly parsed copy of the uploaded file)."""
    del model.graph.output[:]
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return model


def _normalized_only(model, names: list[str]) -> list[str]:
    """Of ``names``, those the uploaded file has no value of (made by the normalization, e.g. inside an
    inlined function): onnxruntime can judge them only on the normalized graph."""
    known = _names_in_reference(model)
    return [] if known is None else [n for n in names if n not in known]


def _reference_runs(model, names: list[str], x: torch.Tensor) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """onnxruntime's values of ``names`` for the energy-space images ``x``, on the file as uploaded, and the
    names judged on the normalized graph instead, each with what its row says about that: the names only
    the normalized graph has (``_normalized_only``), or every name when onnxruntime refuses to run the
    file as uploaded but runs the normalized graph (a stride-1 ``auto_pad=SAME`` Conv with dilations,
    which the normalization writes out as pads; the weaker judgement, said so in every row)."""
    if _names_in_reference(model) is None:
        return _run_onnxruntime(model, None, names, x), dict.fromkeys(names, NORMALIZED)
    inner = dict.fromkeys(_normalized_only(model, names), NORMALIZED)
    outer = [n for n in names if n not in inner]
    values: dict[str, np.ndarray] = {}
    if outer:
        try:
            values = _run_onnxruntime(model, model.reference, outer, x)
        except FailsAtSize as exc:
            # The runtime cannot run the file as uploaded: if it runs the normalized graph, that is judged.
            values = _run_onnxruntime(model, None, outer, x)
            why = exc.detail.strip().splitlines()[0] if exc.detail.strip() else "it fails"
            inner.update(dict.fromkeys(outer, f"{NORMALIZED} (it cannot run the file as uploaded: {why[:200]})"))
    rest = [n for n in names if n in inner and n not in values]
    if rest:
        values.update(_run_onnxruntime(model, None, rest, x))
    return values, inner


def _run_onnxruntime(model, reference: onnx.ModelProto | None, names: list[str], x: torch.Tensor):
    """onnxruntime's values of ``names``: the whole uploaded file ``reference`` with them as outputs, or
    (None) the normalized graph cut to what they need."""
    if reference is not None:
        sub = _with_outputs(reference, names)
    else:
        sub = extract_subgraph(model.onnx, model.input_name, names)
    from converters.quantized import QUANTIZED_OPS

    quantized = any(n.op_type in QUANTIZED_OPS for n in sub.graph.node)
    try:
        session = ort_session(sub, as_written=quantized)
        del sub  # the session holds its own copy of the weights
        inp = model.to_model_input(x)
        step = model.batch or len(x)  # a fixed-batch graph is run in chunks of its batch size
        chunks = [session.run(names, {model.input_name: inp[i : i + step]}) for i in range(0, len(x), step)]
    except Exception as exc:  # the judge itself cannot run the graph: not servable either
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        size = (int(x.shape[-2]), int(x.shape[-1]))
        raise FailsAtSize(
            f"onnxruntime cannot run the model at input size {size[0]}×{size[1]}: {first}", size, str(exc)
        ) from exc
    return {n: np.concatenate(parts, axis=0) for n, parts in zip(names, zip(*chunks, strict=True), strict=True)}


def check_parity(
    model,
    taps: list[TapInfo | str] | None = None,
    n_images: int = 2,
    seed: int = 0,
    device: str | torch.device = "cpu",
    rtol: float | None = None,
    images: torch.Tensor | None = None,
    photos: bool = False,
) -> ParityReport:
    """Compare ``model`` (a ConvertedModel) with onnxruntime at ``taps`` (default: 3 spread taps).

    ``images`` (energy space, N×3×H×W) replaces the synthetic probe images, e.g. with photographs;
    ``photos`` adds scikit-image's photographs (``PHOTOS``) to the probes."""
    infos = [model.tap(t) for t in taps] if taps is not None else default_taps(model)
    pre = model.preprocessing
    kind = "given"
    if images is None:
        h, w = pre.height or PARITY_SIZE, pre.width or PARITY_SIZE
        x = probe_images(n_images, h, w, seed)
        kind = "probes"
        if photos:
            x = torch.cat([x, photo_images(h, w, pre.mean_rgb255)])
            kind = "probes+photographs"
    else:
        x = images.detach().float().cpu()
    tol = rtol if rtol is not None else RTOL[pre.dtype]
    report = ParityReport(tolerance=tol, input_shape=list(x.shape), device=str(device), images=kind)
    opset = next((o.version for o in model.onnx.opset_import if o.domain in ("", "ai.onnx")), 0)
    producers = {o: n for n in model.onnx.graph.node for o in n.output}
    reference_names = _names_in_reference(model)
    from converters.quantized import quantization_bounds

    steps = quantization_bounds(model.onnx)
    exact: dict[str, tuple] = {}  # tap name → (float64 op, name of its input)
    for info in infos:
        node = producers.get(info.name)
        fn = _exact_op(node, opset) if node is not None and len(node.input) == 1 else None
        if fn is not None and (reference_names is None or node.input[0] in reference_names):
            exact[info.name] = (fn, node.input[0])
    names = list(dict.fromkeys([*(t.name for t in infos), *(src for _, src in exact.values())]))
    refs, judged_normalized = _reference_runs(model, [n for n in names if n != model.input_name], x)
    if model.input_name in names:
        refs[model.input_name] = model.to_model_input(x)
    layers = None  # (worst max, worst mean, onnxruntime's values) of the layer-by-layer check, when needed
    with _no_tf32(), torch.no_grad():
        for info in infos:
            rep = model.representation(info).to(device)
            got = rep(x.to(device)).double().cpu().numpy()
            ref = np.asarray(refs[info.name], dtype=np.float64)
            err = elementwise_error(got, ref)
            against = judged_normalized.get(info.name, "onnxruntime")
            if err > tol and info.name in exact:
                fn, src = exact[info.name]
                with np.errstate(over="ignore", under="ignore"):
                    ideal = fn(np.asarray(refs[src], dtype=np.float64))
                err_ideal = elementwise_error(got, ideal)
                if err_ideal < err:
                    err, against = err_ideal, f"float64 {producers[info.name].op_type} of onnxruntime's input"
            ok = err <= tol
            step, step_error, step_mean = steps.get(info.name, 0.0), None, None
            if got.shape != ref.shape:
                norm, mx = math.inf, math.inf
            else:
                diff = got - ref
                denom = float(np.linalg.norm(ref))
                num = float(np.linalg.norm(diff))
                norm = num / denom if denom > 0 else num
                mx = float(np.abs(diff).max()) if diff.size else 0.0
                if step > 0 and np.isfinite(diff).all() and diff.size:
                    # a quantized model: rare flips by a step or two, never a systematic offset
                    step_error, step_mean = mx / step, float(np.abs(diff).mean()) / step
                    within = np.abs(diff) <= tol * (np.abs(ref).max() + np.abs(ref)) + MAX_STEPS * step
                    ok = ok or bool(within.all() and step_mean <= MEAN_STEPS)
                    if not ok:
                        # flips accumulated through a deep network: judge it layer by layer instead
                        if layers is None:
                            layers = _layer_by_layer(model, x)
                        tail = _tail_error(model, info.name, layers[2], ref)
                        if layers[0] <= MAX_STEPS and layers[1] <= MEAN_STEPS and tail <= tol:
                            ok, against = True, (f"onnxruntime layer by layer (worst layer {layers[0]:.0f} steps "
                                                 f"max, {layers[1]:.3f} mean)")  # fmt: skip
            report.taps.append(
                TapParity(info.alias, info.name, list(ref.shape[1:]), err, mx, bool(ok), norm, against, step,
                          step_error, step_mean)
            )  # fmt: skip
    return report


def _layer_by_layer(model, x: torch.Tensor) -> tuple[float, float, dict]:
    """converters.quantized.check_layers on onnxruntime's values for ``x``: (worst max, worst mean, values)."""
    from converters.quantized import check_layers, quantized_values

    names = quantized_values(model.onnx)
    values, _ = _reference_runs(model, names, x)
    values[model.input_name] = model.to_model_input(x)
    worst_max, worst_mean = check_layers(model.onnx, model.input_name, values)
    return worst_max, worst_mean, values


def _tail_error(model, name: str, values: dict, ref: np.ndarray) -> float:
    """The elementwise error of ``name`` recomputed from onnxruntime's quantized values nearest upstream."""
    from converters.quantized import run_window, window_to

    starts, nodes = window_to(model.onnx, model.input_name, name)
    if not nodes or any(s not in values for s in starts):
        return math.inf
    return elementwise_error(run_window(model.onnx, starts, nodes, name, values), ref)


def _names_in_reference(model) -> set[str] | None:
    """Value names the uploaded file computes, when the judge runs it (None: only the normalized graph)."""
    return getattr(model, "reference_names", None)


def verify(model, **kwargs) -> ParityReport:
    """check_parity on probes and a photograph, raising ParityError (a ModelError carrying the report)
    when any tap fails."""
    if "images" not in kwargs:
        kwargs.setdefault("photos", True)
    report = check_parity(model, **kwargs)
    if not report.ok:
        raise ParityError(report)
    return report
