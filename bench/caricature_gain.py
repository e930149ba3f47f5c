"""Caricature gain per tap of the bundled model: ⟨Φ(x*), Φ0⁺⟩ / ⟨Φ(x0), Φ0⁺⟩ measured on the PNG,
for `coffee`, with the default settings (C = 100, 300 steps) and a larger C.

    python bench/caricature_gain.py [--size 128] [--steps 300] [--weights 100,1000]
"""

from __future__ import annotations

import argparse

import torch

from converters.bundled import bundled_model_path
from converters.model import load_model
from service.energy import EnergyParams, Objective, Problem, from_uint8, minimize
from service.reference import center_crop_resize, photo

TAPS = ("/_conv_stem/Conv", "/_blocks.2/Add", "/_blocks.4/_project_conv/Conv", "/_blocks.7/Add", "/_blocks.14/Add")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--weights", default="100,1000")
    args = parser.parse_args()
    model = load_model(bundled_model_path())
    mean = model.preprocessing.mean_rgb255
    x0 = from_uint8(center_crop_resize(photo("coffee"), args.size, args.size), torch.tensor(mean))
    weights = [float(c) for c in args.weights.split(",")]
    print("| tap | " + " | ".join(f"gain, C = {c:g}" for c in weights) + " |")
    print("|---|" + "---|" * len(weights))
    for name in TAPS:
        tap = model.tap(name)
        phi = model.representation(tap)
        with torch.no_grad():
            phi0 = phi(x0[None])[0]
        problems = [
            Problem(Objective.caricature(phi0), EnergyParams(steps=args.steps, loss_weight=c), seed=0, start=x0)
            for c in weights
        ]
        results = minimize(phi, problems, height=args.size, width=args.size, stride=tap.stride, mean_rgb255=mean)
        # the objective at the start image is exactly 1 (w = Φ0⁺/‖Φ0⁺‖²)
        print(f"| `{tap.alias}` | " + " | ".join(f"{r.objective_value:.2f}×" for r in results) + " |", flush=True)


if __name__ == "__main__":
    main()
