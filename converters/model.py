"""load_model: untrusted ONNX bytes in, a verified-ready differentiable torch representation out."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx2torch import convert

from converters import ops as _ops  # noqa: F401  (registers our extra onnx2torch converters)
from converters.errors import FailsAtSize, ModelError, UnknownTap
from converters.freeze import freeze_constant_args
from converters.inputs import detect_input, fixed_shape_copy, resolve_preprocessing
from converters.loading import LoadLimits, load_untrusted, parse
from converters.normalize import normalize
from converters.representation import Preprocess, Representation
from converters.spec import Preprocessing
from converters.surrogates import WithSurrogateGradient, output_surrogate
from converters.taps import TapInfo, compute_taps
from converters.truncate import truncate_fx
from converters.upgrade import Upgrade, upgrade

# When the input's height/width are dynamic, taps (shapes, strides) are described at this size.
NOMINAL_SIZE = 224


class ConvertedModel:
    """A normalized ONNX model plus the torch representations of its taps (built lazily, cached)."""

    def __init__(
        self,
        onnx_model: onnx.ModelProto,
        preprocessing: Preprocessing,
        input_name: str,
        taps: list[TapInfo],
        preprocessing_source: str,
        batch: int | None = None,
    ):
        self.onnx = onnx_model
        self.preprocessing = preprocessing
        self.preprocessing_source = preprocessing_source  # "uploader" | "metadata" | "default"
        self.input_name = input_name
        self.batch = batch  # the graph's fixed batch size (None: any); representations handle it
        self.taps = taps
        self._by_name = {t.name: t for t in taps}
        self._by_alias = {t.alias: t for t in taps}
        # A module path names the last tap computed inside it (its output): "layer1.0" → the block's
        # output, "layer1" → the stage's output. Taps are in topological order, so later ones win.
        self._by_module: dict[str, TapInfo] = {}
        for t in taps:
            parts = t.module.split(".") if t.module else []
            for i in range(1, len(parts) + 1):
                self._by_module[".".join(parts[:i])] = t
        self._cache: dict[str, Representation] = {}
        self._lock = threading.RLock()
        self.parity = None  # converters.parity.ParityReport once verified
        self._full: torch.fx.GraphModule | None = None
        # What was upgraded in the uploaded file (IR, opset).
        self.upgrade: Upgrade | None = None
        # The file as uploaded (its bytes, or the caller's path): the parity judge runs it, so whatever
        # the upgrade or the normalization changed is judged like the conversion. Kept serialized and
        # parsed only when judged, so a served model does not hold a second parsed copy of its weights.
        self._uploaded: bytes | Path | None = None
        self._uploaded_names: set[str] | None = None
        # where the nominal input size came from: "graph" (fixed), "declared" (by the caller), "metadata",
        # "probed" (the first common size the graph runs at) or "default" (dynamic: NOMINAL_SIZE)
        self.size_source = "graph"
        # a module whose gradient stands in for the output's (converters.surrogates), or None
        self.output_surrogate: torch.nn.Module | None = None

    @property
    def reference(self) -> onnx.ModelProto | None:
        """The file as uploaded, parsed afresh on each call (the caller may edit it), which the parity
        judge runs; None for a model built without one."""
        if self._uploaded is None:
            return None
        raw = self._uploaded if isinstance(self._uploaded, bytes) else self._uploaded.read_bytes()
        return parse(raw)

    @property
    def reference_names(self) -> set[str] | None:
        """The value names the uploaded file computes or takes as inputs (None without a reference)."""
        if self._uploaded_names is None:
            ref = self.reference
            if ref is None:
                return None
            self._uploaded_names = {o for n in ref.graph.node for o in n.output if o}
            self._uploaded_names |= {i.name for i in ref.graph.input}
        return self._uploaded_names

    @property
    def reference_bytes(self) -> int:
        """Bytes this model holds for its reference (the uploaded file kept in memory; 0 for a path)."""
        return len(self._uploaded) if isinstance(self._uploaded, bytes) else 0

    @property
    def output_tap(self) -> TapInfo:
        """The tap of the model's first output (the last layer)."""
        out = self.onnx.graph.output[0].name
        return self._by_name.get(out, self.taps[-1])

    def tap(self, name_or_alias: str | TapInfo) -> TapInfo:
        """A tap by ONNX value name, node alias, or torch module path (the module's output)."""
        if isinstance(name_or_alias, TapInfo):
            return self._by_name[name_or_alias.name]
        tap = (
            self._by_name.get(name_or_alias) or self._by_alias.get(name_or_alias) or self._by_module.get(name_or_alias)
        )
        if tap is None:
            known = [*self._by_module, *(t.alias for t in self.taps), *(t.name for t in self.taps)]
            raise UnknownTap(name_or_alias, known)
        return tap

    def _full_graph(self) -> torch.fx.GraphModule:
        """The whole model converted once; truncated representations share its modules."""
        if self._full is None:
            try:
                self._full = convert(self.onnx, attach_onnx_mapping=True)
            except Exception as exc:  # onnx2torch raises NotImplementedError, KeyError, ...
                raise ModelError(f"cannot convert the model to torch: {type(exc).__name__}: {exc}") from exc
            freeze_constant_args(self._full)
            self._full.requires_grad_(False)
            self._full.eval()
        return self._full

    def representation(self, tap: str | TapInfo) -> Representation:
        """Energy-space x → the tap's tensor; runs only the subgraph the tap depends on.

        Representations of one model share their weights (one converted graph, truncated per tap), so
        moving one to a device moves the shared modules: call ``.to(device)`` on each you use."""
        info = self.tap(tap)
        with self._lock:
            rep = self._cache.get(info.name)
            if rep is None:
                graph = truncate_fx(self._full_graph(), info.name)
                if self.output_surrogate is not None and info.name == self.output_tap.name:
                    graph = WithSurrogateGradient(graph, self.output_surrogate)
                rep = Representation(self.preprocessing, graph, info.name, self.batch)
                rep.eval()
                self._cache[info.name] = rep
            return rep

    @torch.no_grad()
    def to_model_input(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """What onnxruntime gets for the energy-space image ``x`` (same arithmetic as the representation)."""
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().float().cpu()
        return Preprocess(self.preprocessing)(x).numpy()


def check_value_sizes(shaped: onnx.ModelProto, limits: LoadLimits, hw: tuple[int, int]) -> None:
    """Refuse a graph whose intermediate values (at the nominal input size) would be absurdly large,
    e.g. a ConstantOfShape asked for 10^12 elements: it would only fail once torch tried to allocate."""
    for vi in list(shaped.graph.value_info) + list(shaped.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if not dims or not all(d.HasField("dim_value") for d in dims):
            continue
        n = 1
        for d in dims:
            n *= d.dim_value
        if n > limits.max_value_elements:
            raise ModelError(
                f"value {vi.name!r} would hold {n:.3g} elements ({[d.dim_value for d in dims]}) "
                f"for one {hw[0]}×{hw[1]} image; the limit is {limits.max_value_elements:.3g}"
            )


def fill_ranks(model: onnx.ModelProto, shaped: onnx.ModelProto) -> None:
    """Give every value whose rank is unknown at a dynamic size the rank it has at the nominal one (its
    dimensions left symbolic). onnx2torch's converters read ranks from value_info (BatchNormalization
    refuses "spatial rank == -2" without one), and inference at a dynamic size loses them after a
    Reshape whose shape is computed (text recognizers)."""
    known = {vi.name for vi in model.graph.value_info if vi.type.tensor_type.HasField("shape")}
    known |= {vi.name for vi in list(model.graph.input) + list(model.graph.output)}
    keep = [vi for vi in model.graph.value_info if vi.name in known]
    produced = {o for n in model.graph.node for o in n.output if o}
    infos = [vi for vi in shaped.graph.value_info if vi.type.tensor_type.HasField("shape")]
    if produced - known - {vi.name for vi in infos}:
        # Still unknown at the fixed size: the shape arithmetic is computed at run time. Folded at this
        # size it becomes constant, and inference sees through the Reshapes (on a copy: the served graph
        # stays dynamic).
        infos = _shapes_when_folded(shaped) or infos
    added = []
    for vi in infos:
        t = vi.type.tensor_type
        if vi.name in known or vi.name not in produced:
            continue
        dims = [f"{vi.name}_d{i}" for i in range(len(t.shape.dim))]
        added.append(onnx.helper.make_tensor_value_info(vi.name, t.elem_type, dims))
    if added:
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep + added)


def _shapes_when_folded(shaped: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Value infos (with shapes) of a fixed-size skeleton after its shape arithmetic is folded."""
    from converters.normalize import fold_constants

    m = onnx.ModelProto()
    m.CopyFrom(shaped)
    for _ in range(32):
        if not fold_constants(m):
            break
    del m.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # best effort: the caller keeps what it had
        return []
    return [vi for vi in inferred.graph.value_info if vi.type.tensor_type.HasField("shape")]


def check_supported_ops(model: onnx.ModelProto) -> None:
    """Every op must have a converter (onnx2torch's or ours): say which ones do not, up front."""
    from onnx2torch.node_converters import get_converter

    opset = {o.domain: o.version for o in model.opset_import}
    missing: set[str] = set()
    for node in model.graph.node:
        try:
            get_converter(operation_type=node.op_type, version=opset.get(node.domain, 1), domain=node.domain)
        except NotImplementedError:
            missing.add(node.op_type)
    if missing:
        raise ModelError(
            f"the model uses ONNX ops that cannot be converted to torch at opset "
            f"{opset.get('', '?')}: {', '.join(sorted(missing))} (see docs/supported_ops.md)"
        )


# Sizes tried, in this order, for a dynamic-size graph that runs neither at the nominal size nor at the
# parity size and declares no size: classifiers' and detectors' sizes first, then text lines' heights.
COMMON_SIZES = (224, 256, 192, 160, 128, 96, 320, 384, 448, 512, 640, 64, 48, 32)
SIZE_HELP = (
    "declare the size it runs at: `preimage upload/inspect/check --size HxW`, Preprocessing height/width "
    "(Python client: upload(..., size=(H, W))), or metadata_props preimage.height/preimage.width"
)


def load_model(
    data: bytes | str | Path,
    preprocessing: Preprocessing | None = None,
    limits: LoadLimits | None = None,
    verify: bool = True,
    size: tuple[int, int] | None = None,
    surrogates: bool = True,
) -> ConvertedModel:
    """Load untrusted ONNX (bytes, or a path on disk that the caller trusts), normalize it, find its image
    input and preprocessing, and list its taps. Raises ModelError with an actionable message.

    ``size`` (height, width) declares the size a dynamic-size graph runs at; it overrides only the size of
    the preprocessing (the rest still comes from ``preprocessing``, the metadata or the defaults). Without a
    declared size: the metadata's, else the nominal size; a dynamic graph that does not run there is tried
    at ``COMMON_SIZES``, and refused with the failing op named when none works.

    ``surrogates`` (default on): an output with a smooth surrogate (HOG's is HOGb, see
    ``converters.surrogates``) returns its own values with the surrogate's gradient.

    With ``verify`` (the default) the model is also checked against onnxruntime at three taps
    (``converters.parity``); a mismatch raises ParityError (a ModelError) carrying the report, which
    is kept as ``model.parity`` otherwise. Pass ``verify=False`` only for models already verified."""
    limits = limits or LoadLimits()
    model = load_untrusted(data, limits)
    # what the judge runs: the bytes as given (bytes() of bytes is the same object, no copy) or the path
    uploaded = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else Path(data)
    model, upgraded = upgrade(model)
    model = normalize(model, copy=False)
    input_name, spec = detect_input(model)
    pre, source = resolve_preprocessing(model, spec, preprocessing)
    fixed = spec.height is not None and spec.width is not None
    if size is not None:
        pre = _declare_size(pre, spec, size)
        size_source = "declared"
    elif fixed:
        size_source = "graph"
    elif (spec.height is None and pre.height is not None) or (spec.width is None and pre.width is not None):
        size_source = "declared" if source == "uploader" else "metadata"
    else:
        size_source = "default"
    check_supported_ops(model)

    def build(p: Preprocessing) -> ConvertedModel:
        converted = _build(model, p, input_name, spec, source, limits, verify, upgraded, uploaded, surrogates)
        converted.size_source = size_source
        return converted

    try:
        return build(pre)
    except FailsAtSize as exc:
        if size_source == "graph":
            raise
        if size_source != "default":
            raise ModelError(
                f"{exc}; the model does not run at its {size_source} size "
                f"{exc.size[0]}×{exc.size[1]} {exc.where()}: {SIZE_HELP}"
            ) from exc
        first = exc
    found = _runs_at_common_size(model, input_name, pre, spec)
    if found is None:
        dims = _dims_text(spec)
        tried = ", ".join(str(s) for s in COMMON_SIZES)
        blamed = f"{first.op} node {first.node!r} fails" if first.op else "it fails"
        raise ModelError(
            f"the model's input {input_name!r} has a dynamic size ({dims}) and it runs at none of the "
            f"sizes tried ({tried} px): at {first.size[0]}×{first.size[1]} {blamed}: "
            f"{first.detail.strip().splitlines()[0]}; {SIZE_HELP}"
        ) from first
    size_source = "probed"
    return build(dataclasses.replace(pre, height=found[0], width=found[1]))


def _declare_size(pre: Preprocessing, spec, size: tuple[int, int]) -> Preprocessing:
    h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise ModelError(f"a declared input size must be positive, got {h}×{w}")
    for name, mine, theirs in (("height", h, spec.height), ("width", w, spec.width)):
        if theirs is not None and mine != theirs:
            raise ModelError(f"the declared {name} {mine} differs from the model's input, fixed at {theirs}")
    return dataclasses.replace(pre, height=h, width=w)


def _dims_text(spec) -> str:
    hw = ["?" if v is None else str(v) for v in (spec.height, spec.width)]
    dims = ["N", str(spec.channels), *hw] if spec.layout == "NCHW" else ["N", *hw, str(spec.channels)]
    return "[" + ", ".join(dims) + "]"


def _runs_at_common_size(model: onnx.ModelProto, input_name: str, pre: Preprocessing, spec) -> tuple[int, int] | None:
    """The first of COMMON_SIZES (along the dynamic axes) at which shape inference passes and onnxruntime runs
    a probe image through the whole graph; None when none does."""
    from converters.parity import ort_session, probe_images

    try:
        session = ort_session(model)
    except Exception:  # the runtime cannot even load it: no size will help, the caller reports why
        return None
    for side in COMMON_SIZES:
        hw = (spec.height or side, spec.width or side)
        candidate = dataclasses.replace(pre, height=hw[0], width=hw[1])
        try:
            fixed_shape_copy(model, input_name, candidate, hw, spec.batch)
            x = Preprocess(candidate)(probe_images(1, *hw)).numpy()
            if spec.batch and spec.batch > 1:
                x = np.repeat(x, spec.batch, axis=0)
            session.run(None, {input_name: x})
        except Exception:  # this size does not work; the next may
            continue
        return hw
    return None


def _build(
    model: onnx.ModelProto,
    pre: Preprocessing,
    input_name: str,
    spec,
    source: str,
    limits: LoadLimits,
    verify: bool,
    upgraded: Upgrade,
    uploaded: bytes | Path,
    surrogates: bool = True,
) -> ConvertedModel:
    hw = (pre.height or NOMINAL_SIZE, pre.width or NOMINAL_SIZE)
    shaped = fixed_shape_copy(model, input_name, pre, hw, spec.batch)
    check_value_sizes(shaped, limits, hw)
    fill_ranks(model, shaped)
    taps = compute_taps(shaped, input_name, pre.layout, hw)
    if not taps:
        raise ModelError("the model has no floating-point tensors that depend on its image input")
    converted = ConvertedModel(model, pre, input_name, taps, source, spec.batch)
    converted.output_surrogate = output_surrogate(model) if surrogates else None
    converted.upgrade = upgraded
    converted._uploaded = uploaded
    if verify:
        from converters.parity import verify as verify_parity

        converted.parity = verify_parity(converted)
    return converted
