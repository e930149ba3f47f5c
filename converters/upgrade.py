"""Old files: IR versions before 4 and opsets whose ops have no converter, upgraded before normalization.

Two steps, each only when needed:

1. IR: before IR 4 every initializer also had to be listed among the graph inputs. Such an "input"
   is a constant, not something a user feeds, and normalization (which drops dead initializers) would
   leave the graph invalid for the old IR. The listed initializers are removed from the inputs and
   the IR version is raised to the lowest one the opset allows (at least 4).
2. Opset: ``onnx.version_converter`` to the lowest opset, from the file's own upwards, at which every
   op of the converted graph has a converter (onnx2torch's or ours). A file that converts at its own
   opset keeps it: version conversion rewrites nodes, and there is nothing to gain.

The judge stays the file as uploaded: parity runs onnxruntime on the original bytes (see
``ConvertedModel.reference``), so a faulty upgrade is caught like a faulty conversion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import onnx
from onnx import helper

from converters.errors import ModelError

MIN_IR = 4  # the first IR that lets initializers stay out of the graph inputs


@dataclass(frozen=True)
class Upgrade:
    """What was changed in an uploaded file before conversion (``ir_to == ir_from`` and
    ``opset_to == opset_from`` when nothing was)."""

    ir_from: int
    ir_to: int
    opset_from: int
    opset_to: int
    initializer_inputs: int = 0  # initializers that were listed as graph inputs
    missing_at_opset: list[str] = field(default_factory=list)  # ops without a converter at opset_from

    @property
    def changed(self) -> bool:
        return self.ir_to != self.ir_from or self.opset_to != self.opset_from

    def describe(self) -> str:
        parts = []
        if self.ir_to != self.ir_from:
            parts.append(
                f"IR {self.ir_from} → {self.ir_to} ({self.initializer_inputs} initializers no longer "
                "listed as graph inputs)"
            )
        if self.opset_to != self.opset_from:
            why = f"; no converter at opset {self.opset_from} for {', '.join(self.missing_at_opset)}"
            parts.append(f"opset {self.opset_from} → {self.opset_to} (onnx.version_converter{why})")
        return "; ".join(parts) or "nothing"

    def as_dict(self) -> dict:
        return {**asdict(self), "changed": self.changed, "description": self.describe()}


def standard_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def missing_converters(model: onnx.ModelProto, opset: int | None = None, skip_deprecated: bool = False) -> list[str]:
    """Op types of the main graph without a converter at ``opset`` (default: the model's own).
    ``skip_deprecated``: leave out ops deprecated at ``opset`` (Upsample), which version conversion
    replaces by others."""
    from onnx2torch.node_converters import get_converter

    from converters import ops as _ops  # noqa: F401  (registers our converters)

    version = opset if opset is not None else standard_opset(model)
    missing: set[str] = set()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if skip_deprecated and _deprecated(node.op_type, version):
            continue
        try:
            get_converter(operation_type=node.op_type, version=version)
        except NotImplementedError:
            missing.add(node.op_type)
    return sorted(missing)


def _deprecated(op_type: str, opset: int) -> bool:
    try:
        return bool(onnx.defs.get_schema(op_type, max_inclusive_version=opset, domain="").deprecated)
    except onnx.defs.SchemaError:
        return False


def _drop_initializer_inputs(model: onnx.ModelProto) -> int:
    g = model.graph
    inits = {t.name for t in g.initializer}
    keep = [vi for vi in g.input if vi.name not in inits]
    dropped = len(g.input) - len(keep)
    del g.input[:]
    g.input.extend(keep)
    return dropped


def _ir_for(model: onnx.ModelProto) -> int:
    return max(MIN_IR, helper.find_min_ir_version_for(list(model.opset_import)))


def upgrade(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Upgrade]:
    """The model at an IR and opset the converters take, and what was done. Returns ``model`` itself
    (unchanged) when nothing had to change, a new ModelProto otherwise."""
    ir, opset = model.ir_version, standard_opset(model)
    missing = missing_converters(model, opset)
    if ir >= MIN_IR and not missing:
        return model, Upgrade(ir, ir, opset, opset)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    dropped = 0
    if ir < MIN_IR:
        dropped = _drop_initializer_inputs(out)
        out.ir_version = _ir_for(out)
    if missing:
        out = _convert_opset(out, opset, missing)
    return out, Upgrade(ir, out.ir_version, opset, standard_opset(out), dropped, missing)


def _keep_resize10_coordinates(model: onnx.ModelProto) -> None:
    """Upsample and Resize-10 map output pixel x to input x / scale (asymmetric, nearest by floor).
    onnx.version_converter's 10 → 11 adapter leaves Resize-11's defaults (half_pixel,
    round_prefer_floor), which move every pixel: measured 0.17 off on a linear Upsample. Every Resize of a
    file converted from before 11 came from one of them, so each gets its old coordinates back."""
    for node in model.graph.node:
        if node.op_type != "Resize":
            continue
        names = {a.name for a in node.attribute}
        if "coordinate_transformation_mode" not in names:
            node.attribute.append(helper.make_attribute("coordinate_transformation_mode", "asymmetric"))
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
        if mode == "nearest" and "nearest_mode" not in names:
            node.attribute.append(helper.make_attribute("nearest_mode", "floor"))


def _convert_opset(model: onnx.ModelProto, opset: int, missing: list[str]) -> onnx.ModelProto:
    from onnx import version_converter

    newest = onnx.defs.onnx_opset_version()
    failures: list[str] = []
    first = opset + 1
    if any(n.op_type in ("Upsample", "Resize") for n in model.graph.node):
        # Resize-10 is onnx2torch's, whose linear mode is wrong (docs/converters.md); ours start at 11. A
        # file that is converted anyway goes at least that far.
        first = max(first, 11)
    for target in range(first, newest + 1):
        if missing_converters(model, target, skip_deprecated=True):
            continue  # some op still has no converter there: no point converting
        try:
            converted = version_converter.convert_version(model, target)
        except Exception as exc:  # the converter raises RuntimeError/ValueError/... per adapter
            failures.append(f"{target}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
            continue
        if missing_converters(converted):  # an adapter introduced an op we cannot convert
            continue
        if opset < 11 <= target:
            _keep_resize10_coordinates(converted)
        converted.ir_version = max(converted.ir_version, _ir_for(converted))
        return converted
    tried = f" (onnx.version_converter failed: {'; '.join(failures[:3])})" if failures else ""
    raise ModelError(
        f"the model uses ONNX ops that cannot be converted to torch at opset {opset}: "
        f"{', '.join(missing)}, and no newer opset converts them{tried}; re-export at opset 13 "
        "or later (see docs/supported_ops.md)"
    )
