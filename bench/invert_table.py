"""Inversion of `chelsea` through the bundled EfficientNet-Lite0, from the stem to the logits.

Prints a Markdown table of the normalized feature error ‖Φ(x*) − Φ0‖/‖Φ0‖ (measured on the PNG)
per tap for each preset asked for (paper: SPEC.md, C = 300, α = 6, TV², 300 + 50 steps; natural:
presets.py), and the seconds each took on this machine (a CPU figure: compare only within one run).
The column pair per preset is what decides which preset Invert uses by default.

    python bench/invert_table.py [--size 224] [--presets paper,natural] [--out docs/figures/invert] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from PIL import Image

from converters.bundled import bundled_model_path
from converters.model import load_model
from service.energy import Objective, Problem, from_uint8, minimize
from service.energy.presets import preset_params
from service.jobs.reference import center_crop_resize, photo

TAPS = (
    "/act/Clip",
    "/_blocks.0/_project_conv/Conv",
    "/_blocks.2/Add",
    "/_blocks.4/Add",
    "/_blocks.7/Add",
    "/_blocks.10/Add",
    "/_blocks.14/Add",
    "/act_1/Clip",
    "logits",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=None, help="first-stage steps (default: the preset's)")
    parser.add_argument("--presets", default="paper", help="comma-separated: one error column each (paper,natural)")
    parser.add_argument("--image", default="chelsea")
    parser.add_argument("--out", default=None, help="folder for the reconstructions (PNG)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = load_model(bundled_model_path())
    mean = model.preprocessing.mean_rgb255
    x0 = from_uint8(center_crop_resize(photo(args.image), args.size, args.size), torch.tensor(mean)).to(device)
    presets = args.presets.split(",")
    overrides = {"steps": args.steps} if args.steps else {}
    heads = " | ".join(f"{p} error | {p} s" for p in presets)
    print(f"| tap | shape | stride | {heads} |\n|---|---|---|{'---|---|' * len(presets)}")
    for name in TAPS:
        tap = model.tap(name)
        phi = model.representation(tap).to(device)
        with torch.no_grad():
            phi0 = phi(x0[None])[0]
        cells = []
        for preset in presets:
            start = time.perf_counter()
            (result,) = minimize(
                phi,
                [Problem(Objective.invert(phi0), preset_params(preset, "invert", **overrides), seed=0)],
                height=args.size,
                width=args.size,
                stride=tap.stride,
                mean_rgb255=mean,
                device=device,
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            cells.append(f"{result.feature_error:.3f} | {time.perf_counter() - start:.1f}")
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                Image.fromarray(result.image_uint8).save(Path(args.out) / f"{tap.index:03d}-{preset}.png")
        print(f"| `{tap.alias}` | {list(tap.shape)} | {tap.stride} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
