"""Forward+backward time of the converted graph over the native torch module, and of a truncated
representation (early tap) over the full graph. One run, ratios only (these machines are noisy: the
calls are interleaved so that drifts in machine load hit every side alike, and each side's best
repetition is used).

    python bench/converter_speed.py [--size 224] [--reps 30] [--threads 1] [--device cpu]

Models: torchvision resnet18 (random weights) and, when converters/bundled.py is present, the bundled
EfficientNet-Lite0 (its native module from converters.bundled.load_pretrained).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torchvision  # noqa: E402

from converters.model import load_model  # noqa: E402


def fwd_bwd(fn, x: torch.Tensor) -> None:
    x = x.detach().requires_grad_(True)
    fn(x).float().square().mean().backward()


def timed(calls: list[tuple], reps: int, device: str) -> list[float]:
    """Best-of-``reps`` seconds of each (fn, x), the calls interleaved round-robin after a warm-up.
    The minimum, not the median: on a shared machine other jobs only ever add time, so the fastest
    repetition is the best estimate of each graph's own cost."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        for fn, x in calls:
            fwd_bwd(fn, x)
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(reps):
        for (fn, x), acc in zip(calls, times, strict=True):
            sync()
            t0 = time.perf_counter()
            fwd_bwd(fn, x)
            sync()
            acc.append(time.perf_counter() - t0)
    return [min(t) for t in times]


def _export(module: torch.nn.Module, size: int) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(1, 3, size, size),), f, dynamo=False, opset_version=17,
                          input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    return f.getvalue()


def bench_model(name: str, native: torch.nn.Module, data: bytes | Path, size: int, reps: int, device: str,
                early: str | None = None) -> None:
    native = native.eval().to(device).requires_grad_(False)
    model = load_model(data, verify=False)
    full = model.representation(model.output_tap).to(device)
    x = (torch.rand(1, 3, size, size) * 160 - 80).to(device)  # energy space
    model_in = full.preprocess(x).detach()
    tap = model.tap(early) if early else model.taps[len(model.taps) // 8]
    part = model.representation(tap).to(device)
    t_native, t_graph, t_rep, t_part = timed(
        [(native, model_in), (full.graph, model_in), (full, x), (part, x)], reps, device)
    print(f"{name}: converted graph / native module, forward+backward, 1×3×{size}×{size}: "
          f"{t_graph / t_native:.3f}  (native {t_native * 1e3:.1f} ms, converted {t_graph * 1e3:.1f} ms)")
    print(f"{name}: representation incl. preprocessing / native module: {t_rep / t_native:.3f}")
    print(f"{name}: truncated at {tap.alias} (tap {tap.index + 1}/{len(model.taps)}, stride {tap.stride}) / "
          f"full representation: {t_part / t_rep:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} thread(s)")
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval()
    bench_model("resnet18", resnet, _export(resnet, args.size), args.size, args.reps, args.device,
                early="layer1.0")
    try:
        from converters.bundled import bundled_model_path, load_pretrained
    except ImportError:
        print("converters.bundled not available: bundled model skipped")
        return 0
    bench_model("efficientnet_lite0 (bundled)", load_pretrained(), bundled_model_path(), args.size, args.reps,
                args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
