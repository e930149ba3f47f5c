"""Input spec: which graph input is the image, its layout/channels/size/dtype, and its preprocessing."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import onnx

from converters.errors import FailsAtSize, ModelError
from converters.spec import Preprocessing

_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}


@dataclass(frozen=True)
class InputSpec:
    name: str
    layout: str  # NCHW | NHWC
    channels: int
    height: int | None
    width: int | None
    dtype: str
    batch: int | None = None  # fixed batch size of the exported graph, None when dynamic


def _dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in vi.type.tensor_type.shape.dim]


def _describe(vi: onnx.ValueInfoProto) -> str:
    t = vi.type.tensor_type
    dims = ["?" if d is None else str(d) for d in _dims(vi)]
    return f"{vi.name!r} ({onnx.TensorProto.DataType.Name(t.elem_type)} [{', '.join(dims)}])"


def _conv_channels(model: onnx.ModelProto, name: str) -> int | None:
    """Input channels of the first Conv reading ``name`` directly (its weight is C_out × C_in/g × k × k)."""
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input and node.input[0] == name and node.input[1] in inits:
            groups = next((a.i for a in node.attribute if a.name == "group"), 1)
            return int(inits[node.input[1]].dims[1]) * groups
    return None


def _as_image(vi: onnx.ValueInfoProto, model: onnx.ModelProto | None = None) -> InputSpec | None:
    if not vi.type.HasField("tensor_type"):
        return None
    dtype = _DTYPES.get(vi.type.tensor_type.elem_type)
    dims = _dims(vi)
    if dtype is None or len(dims) != 4:
        return None
    if dims[1] is None and dims[3] is None and model is not None:
        # Every dimension dynamic (some exporters do this): a Conv reading the input says it is NCHW
        # and how many channels it has.
        channels = _conv_channels(model, vi.name)
        if channels in (1, 3):
            return InputSpec(vi.name, "NCHW", channels, dims[2], dims[3], dtype, dims[0])
    # Channels first wins when both look plausible (a 3×H×3 image is less likely than a 3-channel one).
    if dims[1] in (1, 3):
        return InputSpec(vi.name, "NCHW", dims[1], dims[2], dims[3], dtype, dims[0])
    if dims[3] in (1, 3):
        return InputSpec(vi.name, "NHWC", dims[3], dims[1], dims[2], dtype, dims[0])
    return None


def detect_input(model: onnx.ModelProto) -> tuple[str, InputSpec]:
    g = model.graph
    inits = {t.name for t in g.initializer}
    inputs = [vi for vi in g.input if vi.name not in inits]
    if not inputs:
        raise ModelError("the model has no inputs: nothing to feed an image to")
    images = [(vi, s) for vi in inputs if (s := _as_image(vi, model)) is not None]
    described = ", ".join(_describe(vi) for vi in inputs)
    if not images:
        raise ModelError(
            f"no image-like input: expected one float32/float16 input of rank 4 with 1 or 3 channels "
            f"(N×C×H×W or N×H×W×C); the model's inputs are {described}"
        )
    if len(inputs) > 1:
        raise ModelError(
            f"the model has {len(inputs)} inputs ({described}); only single-input image models can be visualized"
        )
    vi, spec = images[0]
    return vi.name, spec


# metadata_props keys read by resolve_preprocessing (documented in docs/converters.md).
META_MEAN = "preimage.mean"  # comma-separated floats, model channel order, units of pixels_255·scale
META_STD = "preimage.std"
META_SCALE = "preimage.scale"  # float, default 1/255
META_CHANNEL_ORDER = "preimage.channel_order"  # RGB | BGR | GRAY
META_HEIGHT = "preimage.height"  # nominal size of a dynamic-size graph (ignored if the graph fixes it
META_WIDTH = "preimage.width"  # to the same value; an error if it fixes another)


def _floats(key: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(";", ",").split(",") if v.strip())
    except ValueError as exc:
        raise ModelError(f"metadata_props {key!r} must be comma-separated numbers, got {text!r}") from exc


def preprocessing_from_metadata(model: onnx.ModelProto) -> dict:
    meta = {p.key: p.value for p in model.metadata_props}
    found: dict = {}
    if META_MEAN in meta:
        found["mean"] = _floats(META_MEAN, meta[META_MEAN])
    if META_STD in meta:
        found["std"] = _floats(META_STD, meta[META_STD])
    if META_SCALE in meta:
        (found["scale"],) = _floats(META_SCALE, meta[META_SCALE])[:1] or (1 / 255,)
    if META_CHANNEL_ORDER in meta:
        found["channel_order"] = meta[META_CHANNEL_ORDER].strip().upper()
    for key, name in ((META_HEIGHT, "height"), (META_WIDTH, "width")):
        if key in meta:
            try:
                found[name] = int(meta[key])
            except ValueError as exc:
                raise ModelError(f"metadata_props {key!r} must be an integer, got {meta[key]!r}") from exc
    return found


def resolve_preprocessing(
    model: onnx.ModelProto, spec: InputSpec, given: Preprocessing | None
) -> tuple[Preprocessing, str]:
    """The uploader's preprocessing if given, else the model's metadata_props, else ImageNet defaults
    (grey models: mean 0.5, std 0.25 is NOT assumed; they get mean 0, std 1 on the 0–1 scale).
    Layout, size and dtype always come from the graph; a contradiction is an error."""
    structural = {"layout": spec.layout, "height": spec.height, "width": spec.width, "dtype": spec.dtype}
    if given is not None:
        pre, source = given, "uploader"
    else:
        found = preprocessing_from_metadata(model)
        source = "metadata" if found else "default"
        if spec.channels == 1:
            found.setdefault("channel_order", "GRAY")
            found.setdefault("mean", (0.0,))
            found.setdefault("std", (1.0,))
        try:
            pre = Preprocessing(**found)
        except TypeError as exc:
            raise ModelError(f"bad preprocessing in metadata_props: {exc}") from exc
    if pre.channels != spec.channels:
        raise ModelError(
            f"preprocessing says {pre.channel_order} ({pre.channels} channels) but the "
            f"model's input {spec.name!r} has {spec.channels} channels"
        )
    for key in ("height", "width"):
        mine, theirs = getattr(pre, key), structural[key]
        if mine is not None and theirs is not None and mine != theirs:
            raise ModelError(f"preprocessing gives {key} {mine} but the model's input is fixed at {theirs}")
        if theirs is None:
            structural[key] = mine  # a dynamic input: the uploader's nominal size is kept
    return dataclasses.replace(pre, **structural), source


def fixed_shape_copy(
    model: onnx.ModelProto, input_name: str, pre: Preprocessing, hw: tuple[int, int], batch: int | None = None
) -> onnx.ModelProto:
    """A copy with the image input fixed at ``batch`` (default 1) and ``hw``, shape-inferred (for taps and
    checks)."""
    from converters.normalize import skeleton

    m = skeleton(model)
    del m.graph.value_info[:]
    for vi in m.graph.input:
        if vi.name == input_name:
            n = batch or 1
            dims = [n, pre.channels, *hw] if pre.layout == "NCHW" else [n, *hw, pre.channels]
            shape = vi.type.tensor_type.shape
            for d, v in zip(shape.dim, dims, strict=False):
                d.Clear()
                d.dim_value = v
    # Outputs keep symbolic dims from the exporter; clearing lets inference fill them.
    for vi in m.graph.output:
        vi.type.tensor_type.ClearField("shape")
    try:
        return onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise FailsAtSize(
            f"ONNX shape inference fails on the model at input size {hw[0]}×{hw[1]}: {first}", tuple(hw), first
        ) from exc
