"""How natural are Maximize images? Each preset, and lucent's defaults reproduced with our parts.

For each preset at one size on the bundled EfficientNet-Lite0: class logits of ten ImageNet
classes and eight mid-layer channels. Per image: the optimized model's probability and top-1 on
the re-read PNG, an independent classifier's top-1 (EfficientNet-Lite1 on onnxruntime,
bench/judge.py; never used by the service), the spectrum slope and the contrast
(bench/naturalness_metrics.py). The images of one preset run as one batch; the wall time per image
is measured separately on one image alone (the first class), as a user's single-image job runs.
All presets run in one process, so the time ratio to ``paper`` is a figure from one run. Writes a
contact sheet per preset.

    python -m bench.naturalness [--size 224] [--classes 1,130,...] [--out bench/results/naturalness]
    python -m bench.naturalness --quick     # 4 classes, 2 channels: a smoke run
    python -m bench.naturalness --figure docs/figures/maximize_presets.png --presets paper,natural,lucent
        # only composes the contact sheets already in --out into one labelled figure

Needs the bench extra: pip install -e '.[bench]'.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.judge import Judge
from bench.naturalness_metrics import contrast, saturation, spectrum_slope
from converters.bundled import bundled_model_path
from converters.model import load_model
from service.energy import Objective, Problem, channel_weights, from_uint8, minimize
from service.energy.presets import preset_params
from service.jobs.reference import amplitude_spectrum, channel_max, effective_receptive_field

CLASSES = (1, 130, 285, 323, 417, 88, 949, 954, 963, 980)  # goldfish … volcano
MID_TAP = "/_blocks.10/Add"
MID_CHANNELS = (0, 5, 12, 23, 40, 57, 70, 101)

# lucent's render defaults (SPEC.md): fourier d = 1, decorrelated colour, pad 12 + jitter 8 +
# scale 0.9–1.1 + rotation ±10° + jitter 4 (one view per step), Adam 0.05, 512 steps, channel mean.
LUCENT = {
    "parameterization": "fourier", "optimizer": "adam", "learning_rate": 0.05, "steps": 512, "copies": 1,
    "translate": 12.0, "scale_min": 0.9, "scale_max": 1.1, "rotate": 10.0, "lambda_alpha": 0.0,
    "lambda_tv": 0.0, "spatial": "mean",
}  # fmt: skip


def settings(name: str) -> dict:
    if name == "lucent":
        return {"preset": "paper", **LUCENT}
    return {"preset": name}


def run(model, name: str, tap: str, units: tuple[int, ...], size: int) -> tuple[list[np.ndarray], float]:
    info = model.tap(tap)
    phi = model.representation(tap)
    mean = model.preprocessing.mean_rgb255
    chosen = settings(name)
    params = preset_params(chosen.pop("preset"), "maximize", **chosen)
    shape = tuple(phi(torch.zeros(1, 3, size, size))[0].shape)
    stats = channel_max(phi, f"bench:{tap}", size, size, mean)
    rf = effective_receptive_field(info.receptive_field_yx, size, size)
    problems = [
        Problem(
            Objective.maximize(
                channel_weights(shape, k, receptive_field=rf, channel_max=float(stats[k]), spatial=params.spatial)
            ),
            params,
            seed=i,
        )
        for i, k in enumerate(units)
    ]
    magnitude = amplitude_spectrum(*params.canvas_size(size, size), 3) if params.parameterization == "phase" else None
    start = time.perf_counter()
    results = minimize(phi, problems, height=size, width=size, stride=info.stride, mean_rgb255=mean,
                       magnitude=magnitude, report_every=0)  # fmt: skip
    return [r.image_uint8 for r in results], (time.perf_counter() - start) / len(units)


def sheet(images: list[np.ndarray], tile: int = 160) -> Image.Image:
    tiles = [np.asarray(Image.fromarray(im).resize((tile, tile), Image.Resampling.BICUBIC)) for im in images]
    return Image.fromarray(np.concatenate(tiles, axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", default=",".join(map(str, CLASSES)))
    parser.add_argument("--presets", default="paper,natural,lucent")
    parser.add_argument("--out", default="bench/results/naturalness")
    parser.add_argument("--quick", action="store_true", help="4 classes and 2 channels")
    parser.add_argument("--figure", help="compose the sheets in --out into this PNG and exit")
    args = parser.parse_args()
    if args.figure:
        figure(Path(args.out), args.presets.split(",")).save(args.figure)
        return
    classes = tuple(int(c) for c in args.classes.split(","))
    channels = MID_CHANNELS
    if args.quick:
        classes, channels = classes[:4], channels[:2]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(bundled_model_path(), verify=False)
    logits = model.representation("logits")
    mean = torch.tensor(model.preprocessing.mean_rgb255)
    judge = Judge()
    table: dict[str, dict] = {}
    for name in args.presets.split(","):
        images, seconds = run(model, name, "logits", classes, args.size)
        paths = [_save(im, out / f"{name}-class{k}.png") for im, k in zip(images, classes, strict=True)]
        reread = [np.asarray(Image.open(path)) for path in paths]
        with torch.no_grad():
            probs = logits(torch.stack([from_uint8(im, mean) for im in reread])).softmax(-1)
        top1 = probs.argmax(-1).tolist()
        judged = judge.top1(reread)
        mid, _ = run(model, name, MID_TAP, channels, args.size)
        _, alone = run(model, name, "logits", classes[:1], args.size)
        _, mid_alone = run(model, name, MID_TAP, channels[:1], args.size)
        sheet(reread).save(out / f"{name}-classes.png")
        sheet(mid).save(out / f"{name}-channels.png")
        table[name] = {
            "seconds_per_image": alone,
            "batched_seconds_per_image": seconds,
            "own_top1": sum(t == k for t, k in zip(top1, classes, strict=True)),
            "own_probability": float(np.mean([float(probs[i, k]) for i, k in enumerate(classes)])),
            "judge_top1": sum(j == k for j, k in zip(judged, classes, strict=True)),
            "judge_labels": judged,
            "slope": float(np.mean([spectrum_slope(im) for im in reread])),
            "contrast": float(np.mean([contrast(im) for im in reread])),
            "saturation": float(np.mean([saturation(im) for im in reread])),
            "mid_slope": float(np.mean([spectrum_slope(im) for im in mid])),
            "mid_seconds_per_image": mid_alone,
            "classes": len(classes),
        }
        print(name, json.dumps(table[name]), flush=True)
    if "paper" in table:
        for row in table.values():
            row["time_ratio_to_paper"] = row["seconds_per_image"] / table["paper"]["seconds_per_image"]
            row["mid_time_ratio_to_paper"] = row["mid_seconds_per_image"] / table["paper"]["mid_seconds_per_image"]
    (out / "naturalness.json").write_text(json.dumps(table, indent=1))
    print("| preset | own top-1 | Lite1 top-1 | slope | contrast | saturation | mid-layer slope "
          "| s/image (logits, mid) | × paper |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in table.items():
        print(f"| {name} | {r['own_top1']}/{r['classes']} | {r['judge_top1']}/{r['classes']} | {r['slope']:.2f} | "
              f"{r['contrast']:.1f} | {r['saturation']:.1f} | {r['mid_slope']:.2f} | {r['seconds_per_image']:.1f}, "
              f"{r['mid_seconds_per_image']:.1f} | {r.get('time_ratio_to_paper', float('nan')):.2f}, "
              f"{r.get('mid_time_ratio_to_paper', float('nan')):.2f} |")  # fmt: skip


def figure(out: Path, names: list[str], tile: int = 112, label: int = 150) -> Image.Image:
    """The contact sheets of ``names`` (classes, then channels, per preset) in one labelled PNG."""
    from PIL import ImageDraw

    rows = []
    for name in names:
        for kind in ("classes", "channels"):
            sheet_image = Image.open(out / f"{name}-{kind}.png").convert("RGB")
            count = sheet_image.width // sheet_image.height
            rows.append((f"{name} {kind}", sheet_image.resize((tile * count, tile), Image.Resampling.BICUBIC)))
    width = label + max(r.width for _, r in rows)
    canvas = Image.new("RGB", (width, (tile + 4) * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (text, row) in enumerate(rows):
        canvas.paste(row, (label, i * (tile + 4)))
        draw.text((6, i * (tile + 4) + tile // 2 - 6), text, fill="black")
    return canvas


def _save(image: np.ndarray, path: Path) -> Path:
    Image.fromarray(image).save(path)
    return path


if __name__ == "__main__":
    main()
