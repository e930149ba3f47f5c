"""Inverting HOG, HOGb and DSIFT with the natural pre-image energy, next to the paper's figures.

Each shallow representation is exported to ONNX and loaded through ``converters.model.load_model``,
exactly as an uploaded model would be, then inverted from noise with ``service.energy.minimize``
(paper defaults: C = 100 for HOG/DSIFT, 300 + 50 steps). The ``hog`` row is HOG as served: its
values, descended through HOGb's gradient (``converters.surrogates``); ``hog_hard`` loads it with
``surrogates=False``, HOG's own gradient through its hard orientation bins. For every photograph the
script reports ‖Φ(x*) − Φ0‖ / ‖Φ0‖ (measured on the PNG image the service would return) and prints
mean ± std per representation next to the paper's numbers (SPEC.md; CVPR 2015 Table 1, mean ± std in %).

Writes ``<out>/shallow_inversion.json``, ``<out>/shallow_inversion.md`` (the table) and
``<out>/shallow_inversion.png`` (per photo: original, HOG glyphs, the inversions shown as the grey
image the representations see).

    python bench/shallow_inversion.py                # 8 photos at 256×256, full schedule
    python bench/shallow_inversion.py --steps 30 --refine 5 --images 2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters.model import load_model  # noqa: E402
from converters.shallow import HogUoctti  # noqa: E402
from converters.shallow.export import SHALLOW_MODELS, export_all  # noqa: E402
from service.energy import EnergyParams, Objective, Problem, feature_error, from_uint8, minimize  # noqa: E402

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "coins", "moon", "hubble_deep_field")
# The paper's Table 1 (CVPR 2015), as recalled in SPEC.md: mean, std of the normalized error in %.
PAPER = {"hog": (28.10, 7.9), "hogb": (10.67, 5.1), "dsift": (10.89, 7.5)}
HOGGLE = (66.20, 13.7)
LABELS = {
    "hog": "HOG (served: HOGb's surrogate gradient)",
    "hog_hard": "HOG, its own gradient (hard bins)",
    "hogb": "HOGb",
    "dsift": "DSIFT",
    "hog_dalaltriggs": "HOG (Dalal-Triggs)",
    "hog_via_hogb": "HOG, minimized through HOGb",
}
# Rows that invert one representation's Φ0 while descending through another: (Φ, Φ used for the descent).
SURROGATES = {"hog_via_hogb": ("hog", "hogb")}
PAPER["hog_via_hogb"] = PAPER["hog"]
# Rows that load a representation without its surrogate gradient (load_model(surrogates=False)).
OWN_GRADIENT = {"hog_hard": "hog"}
PAPER["hog_hard"] = PAPER["hog"]


def load_photo(name: str, size: int) -> np.ndarray:
    """A skimage.data photograph, centre-cropped to a square and resized: size×size×3 uint8 RGB."""
    import skimage.data
    from skimage.transform import resize

    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top : top + side, left : left + side, :3]
    image = resize(image, (size, size), anti_aliasing=True, preserve_range=True)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def representation_stride(name: str) -> int:
    """Cumulative stride of the representation, for the jitter T = max(round(stride/4), 1)."""
    params = SHALLOW_MODELS[name].params
    return int(params.get("cell_size") or params.get("step") or 1)


def hog_glyphs(grey: np.ndarray, glyph: int = 16) -> np.ndarray:
    """HOG glyph picture (uint8): per cell, bars perpendicular to each gradient orientation, as bright
    as the cell's undirected + directed energy there (the usual way of looking at HOG)."""
    module = HogUoctti()
    with torch.no_grad():
        hog = module(torch.from_numpy(grey.astype(np.float32))[None, None])[0].numpy()
    n = module.num_orientations
    weights = hog[:n] + hog[n : 2 * n] + hog[2 * n : 3 * n]  # n×h×w, per undirected orientation
    yy, xx = np.mgrid[0:glyph, 0:glyph].astype(np.float64) - (glyph - 1) / 2
    bars = []
    for o in range(n):
        edge = o * math.pi / n + math.pi / 2  # an edge runs across its gradient
        dist = np.abs(-np.sin(edge) * xx + np.cos(edge) * yy)
        along = np.abs(np.cos(edge) * xx + np.sin(edge) * yy)
        bars.append(((dist <= 0.6) & (along <= glyph / 2 - 1)).astype(np.float64))
    bars = np.stack(bars)
    rows, cols = weights.shape[1:]
    canvas = np.zeros((rows * glyph, cols * glyph))
    for r in range(rows):
        for c in range(cols):
            cell_max = weights[:, r, c].max()
            cell = np.tensordot(weights[:, r, c], bars, axes=1)  # overlapping bars add up; cap them
            canvas[r * glyph : (r + 1) * glyph, c * glyph : (c + 1) * glyph] = np.minimum(cell, cell_max)
    canvas /= max(canvas.max(), 1e-12)
    return np.round(canvas * 255).astype(np.uint8)


def _representation(name: str, model_dir: Path, surrogates: bool = True):
    converted = load_model(export_all(model_dir)[name].read_bytes(), surrogates=surrogates)
    return converted.representation(converted.output_tap), converted.preprocessing.mean_rgb255


def invert_all(row: str, photos: dict[str, np.ndarray], model_dir: Path, args: argparse.Namespace) -> dict:
    """Invert Φ0 = Φ(photo) for every photo. ``row`` names Φ; for ``hog_via_hogb`` the target is HOG's
    Φ0 but the energy is minimized through HOGb (the same features with bilinear orientation weights,
    a smooth surrogate for HOG's piecewise-constant bin choice); for ``hog_hard`` through HOG itself,
    without the surrogate gradient the served ``hog`` carries. The error is always measured with Φ (a
    surrogate changes gradients only, never values)."""
    name = OWN_GRADIENT.get(row, row)
    name, optimize_with = SURROGATES.get(row, (name, name))
    phi, mean = _representation(name, model_dir, surrogates=row not in OWN_GRADIENT)
    phi_opt = phi if optimize_with == name else _representation(optimize_with, model_dir)[0]
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    problems, targets = [], []
    with torch.no_grad():
        for i, image in enumerate(photos.values()):
            targets.append(phi(from_uint8(image, mean_t)[None])[0])
            problems.append(
                Problem(
                    Objective.invert(targets[-1]),
                    EnergyParams(loss_weight=args.loss_weight, steps=args.steps, refine_steps=args.refine),
                    seed=args.seed + i,
                )
            )
    size = args.size
    start = time.perf_counter()
    results = minimize(
        phi_opt,
        problems,
        height=size,
        width=size,
        stride=representation_stride(name),
        mean_rgb255=mean,
        report_every=max(args.steps // 4, 1),
        on_step=lambda e: (
            print(f"  {row} step {e.step}/{e.total} E={e.terms['energy']:.4g}", flush=True) if e.handle == 0 else None
        ),
    )
    seconds = time.perf_counter() - start
    errors = []
    with torch.no_grad():
        for result, target in zip(results, targets, strict=True):
            # Measured on the PNG image, with the representation being inverted.
            features = phi(from_uint8(result.image_uint8, mean_t)[None])[0]
            errors.append(100.0 * feature_error(features, target))
    return {
        "errors_percent": dict(zip(photos, errors, strict=True)),
        "mean": float(np.mean(errors)),
        "std": float(np.std(errors)),
        "seconds": seconds,
        "images": {p: r.image_uint8 for p, r in zip(photos, results, strict=True)},
    }


def _grey_rgb(image: np.ndarray) -> np.ndarray:
    from converters.spec import GRAY_WEIGHTS

    grey = np.clip(np.round(image.astype(np.float64) @ np.array(GRAY_WEIGHTS)), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def save_grid(path: Path, photos: dict[str, np.ndarray], runs: dict[str, dict]) -> None:
    from PIL import Image

    size = next(iter(photos.values())).shape[0]
    pad = 4
    columns = ["original", "HOG glyphs"] + [LABELS[n] for n in runs]
    grid = np.full((len(photos) * (size + pad) + pad, len(columns) * (size + pad) + pad, 3), 255, np.uint8)
    for r, (photo, image) in enumerate(photos.items()):
        grey = _grey_rgb(image)[:, :, 0].astype(np.float64)
        glyph = np.asarray(Image.fromarray(hog_glyphs(grey)).resize((size, size), Image.BILINEAR))
        # The representations see grey levels only (the model's GRAY preprocessing); the colour of x* is
        # left to the regularizers, so the figure shows the grey image Φ actually sees.
        inverted = [_grey_rgb(runs[n]["images"][photo]) for n in runs]
        tiles = [image, np.repeat(glyph[:, :, None], 3, axis=2)] + inverted
        for c, tile in enumerate(tiles):
            y, x = pad + r * (size + pad), pad + c * (size + pad)
            grid[y : y + size, x : x + size] = tile
    Image.fromarray(grid).save(path)


def table(runs: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        f"Inversion error ‖Φ(x*)−Φ0‖/‖Φ0‖ (%), {args.images} skimage.data photos at {args.size}×{args.size}, "
        f"C={args.loss_weight}, {args.steps}+{args.refine} steps, CPU",
        "",
        "| representation | ours (mean ± std) | paper (mean ± std) | below paper? | time (s) |",
        "|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        paper = PAPER.get(name)
        paper_text = f"{paper[0]:.2f} ± {paper[1]:.1f}" if paper else "—"
        below = ("yes" if run["mean"] < paper[0] else "no") if paper else "—"
        lines.append(
            f"| {LABELS[name]} | {run['mean']:.2f} ± {run['std']:.2f} | {paper_text} | {below} | {run['seconds']:.0f} |"
        )
    lines.append(f"| HOGgle (Vondrick et al., HOG) | — | {HOGGLE[0]:.2f} ± {HOGGLE[1]:.1f} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--refine", type=int, default=50)
    parser.add_argument("--loss-weight", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--representations", default="hog,hog_hard,hog_via_hogb,hogb,dsift")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--model-dir", type=Path, default=None, help="where to export the ONNX models")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir or args.out / "models"
    photos = {name: load_photo(name, args.size) for name in PHOTOS[: args.images]}
    runs = {}
    for name in args.representations.split(","):
        print(f"{LABELS[name]}: inverting {len(photos)} photos", flush=True)
        runs[name] = invert_all(name, photos, model_dir, args)
        print(
            f"{LABELS[name]}: {runs[name]['mean']:.2f} ± {runs[name]['std']:.2f} % ({runs[name]['seconds']:.0f} s)",
            flush=True,
        )
    text = table(runs, args)
    print(text)
    (args.out / "shallow_inversion.md").write_text(text + "\n")
    summary = {name: {k: v for k, v in run.items() if k != "images"} for name, run in runs.items()}
    summary["settings"] = {k: str(v) for k, v in vars(args).items()}
    (args.out / "shallow_inversion.json").write_text(json.dumps(summary, indent=2) + "\n")
    save_grid(args.out / "shallow_inversion.png", photos, runs)
    print(f"wrote {args.out / 'shallow_inversion.png'}")


if __name__ == "__main__":
    main()
