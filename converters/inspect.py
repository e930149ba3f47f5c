"""``preimage inspect MODEL.onnx [--json]``: what the service would make of a model, as plain data.

``inspect_model`` never raises for a bad model: it returns ``{"ok": False, "error": ...}`` so the CLI
can print the reason and exit non-zero. ``format_inspection`` renders the dict for people.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

from converters.errors import ModelError
from converters.loading import LoadLimits
from converters.spec import Preprocessing


def inspect_model(
    path: str | Path | bytes,
    preprocessing: Preprocessing | None = None,
    limits: LoadLimits | None = None,
    size: tuple[int, int] | None = None,
) -> dict:
    """Input spec, preprocessing, ops, taps and the parity report of a model; JSON-serializable."""
    from converters.inputs import detect_input
    from converters.model import NOMINAL_SIZE, load_model
    from converters.parity import ParityError

    source = "<bytes>" if isinstance(path, (bytes, bytearray)) else str(path)
    result: dict = {"model": source, "ok": False, "error": None}
    try:
        model = load_model(path, preprocessing=preprocessing, limits=limits, size=size)
    except ParityError as exc:
        result["error"] = str(exc).splitlines()[0]
        result["parity"] = exc.report.as_dict()
        return result
    except ModelError as exc:
        result["error"] = str(exc)
        return result
    g = model.onnx.graph
    _, spec = detect_input(model.onnx)
    opset = {o.domain or "ai.onnx": o.version for o in model.onnx.opset_import}
    result.update(
        {
            "ok": True,
            "producer": f"{model.onnx.producer_name} {model.onnx.producer_version}".strip(),
            "opset": opset,
            # what was upgraded in the file before conversion (IR, opset); parity judged the file as uploaded
            "upgrade": model.upgrade.as_dict() if model.upgrade is not None else None,
            # height/width: the graph's (None when dynamic); nominal_*: the size taps are described at
            "input": {
                "name": model.input_name,
                "batch": model.batch,
                "layout": spec.layout,
                "height": spec.height,
                "width": spec.width,
                "dtype": spec.dtype,
                "nominal_height": model.preprocessing.height or NOMINAL_SIZE,
                "nominal_width": model.preprocessing.width or NOMINAL_SIZE,
                # graph | declared | metadata | probed | default (see converters.model.load_model)
                "size_source": model.size_source,
            },
            "preprocessing": {
                **dataclasses.asdict(model.preprocessing),
                "mean_rgb255": list(model.preprocessing.mean_rgb255),
                "source": model.preprocessing_source,
            },
            "ops": dict(sorted(collections.Counter(n.op_type for n in g.node).items())),
            "nodes": len(g.node),
            "parameters": int(sum(_numel(t) for t in g.initializer)),
            "taps": [t.as_dict() for t in model.taps],
            "output_tap": model.output_tap.alias,
            "parity": model.parity.as_dict() if model.parity is not None else None,
        }
    )
    return result


def _numel(t) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def format_inspection(info: dict, max_taps: int = 400) -> str:
    """A human-readable rendering of ``inspect_model``'s result."""
    lines = [f"model: {info['model']}"]
    if not info["ok"]:
        lines.append(f"NOT SERVABLE: {info['error']}")
        if info.get("parity"):
            lines += [f"  {t['alias']}: relative error {t['rel_error']:.2e}" for t in info["parity"]["taps"]]
        return "\n".join(lines)
    inp, pre = info["input"], info["preprocessing"]
    size = (
        f"{inp['height']}×{inp['width']}"
        if inp["height"]
        else f"dynamic H×W (nominal {inp['nominal_height']}×{inp['nominal_width']}, {inp.get('size_source', '?')})"
    )
    lines += [
        f"producer: {info['producer'] or '?'}; opset {info['opset']}; {info['nodes']} nodes, "
        f"{info['parameters']:,} parameters",
        *(
            [f"upgraded: {info['upgrade']['description']} (parity judged on the file as uploaded)"]
            if info.get("upgrade") and info["upgrade"]["changed"]
            else []
        ),
        f"input: {inp['name']!r} {inp['layout']} {size} {inp['dtype']}, batch {inp['batch'] or 'any'}",
        f"preprocessing ({pre['source']}): {pre['channel_order']}, ×{pre['scale']:.6g}, mean {pre['mean']}, "
        f"std {pre['std']}",
        "ops: " + ", ".join(f"{k}×{v}" for k, v in info["ops"].items()),
        f"taps ({len(info['taps'])}; stride / receptive field in input pixels, y×x where they differ, "
        "? = unknown, * = global):",
    ]
    for t in info["taps"][:max_taps]:
        mod = f"  [{t['module']}]" if t["module"] else ""
        star = "*" if t["global"] else " "
        lines.append(
            f"  {t['alias']:<48} {t['op_type']:<18} {str(t['shape']):<18} "
            f"s{_per_axis(t.get('stride_yx')):<5} rf{_per_axis(t.get('receptive_field_yx'))}{star}{mod}"
        )
    if len(info["taps"]) > max_taps:
        lines.append(f"  ... {len(info['taps']) - max_taps} more")
    p = info["parity"]
    if p:
        lines.append(
            f"parity vs onnxruntime: {'ok' if p['ok'] else 'FAILED'} ({p['measure']} ≤ {p['tolerance']:g}, "
            f"input {p['input_shape']} {p['images']})"
        )
        lines += [
            f"  {t['alias']}: {t['rel_error']:.2e}"
            + ("" if t["reference"] == "onnxruntime" else f" (against {t['reference']})")
            + (_steps(t) if t.get("step_error") is not None else "")
            for t in p["taps"]
        ]
    return "\n".join(lines)


format_report = format_inspection  # the name service/cli/main.py uses


def _steps(tap: dict) -> str:
    return f"; {tap['step_error']:.2f} quantization steps max, {tap['step_mean']:.3f} mean"


def _per_axis(pair: list[int] | None) -> str:
    """'8' for the same value along y and x, '4×1' (y×x) otherwise, '?' when not known."""
    if not pair:
        return "?"
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}×{pair[1]}"
