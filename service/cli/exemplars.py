"""``preimage exemplars``: the images of a folder or glob that excite a tap's channels most, as a
contact sheet (one row per target, best first; with --with-maximize the target's Maximize image
first) and, with --json, one JSON object."""

from __future__ import annotations

import argparse
import glob
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

import service.cli.args as types
from service.cli.args import UsageError
from service.cli.remote import add_server_argument, rpc_error

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def image_set(text: str) -> str:
    """A folder, an image file, or a glob that matches at least one file (checked now, not after a
    server has started)."""
    path = Path(text)
    if path.is_dir() or path.is_file():
        return text
    if glob.has_magic(text):
        if not any(Path(p).is_file() for p in glob.iglob(text)):
            raise argparse.ArgumentTypeError(f"{text!r} matches no file")
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: no such folder or file (give DIR, FILE or a GLOB)")


image_set.domain = "a folder, a file or a glob"  # type: ignore[attr-defined]


def image_paths(spec: str) -> list[Path]:
    """The image files ``spec`` names, sorted (a folder: its files with image suffixes)."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())


def add_exemplars_command(sub: Any, epilog: str, default_model: str) -> None:
    p = sub.add_parser(
        "exemplars",
        help="the images of a set that excite channels of a tap most, with their receptive-field crops",
        description="Rank a folder (or glob) of your images by how much they excite each channel of a tap, "
        "with a forward pass only, and write a contact sheet: one row per channel, its top images' "
        "receptive-field crops, best first.",
        epilog=epilog,
    )
    p.add_argument("--model", default=default_model, type=types.model_ref,
                   help=f"NAME, NAME:N, an id, or an .onnx file (uploaded first; default {default_model})")  # fmt: skip
    p.add_argument("--tap", default=None, help="tap name, alias or module path (default: the model output)")
    p.add_argument("--channel", action="append", type=types.channels, default=[], metavar="SPEC",
                   help="channel(s) or class: 3, 0-15 or 1,4,9 (repeatable)")  # fmt: skip
    p.add_argument("--images", type=image_set, default=None, metavar="DIR|GLOB",
                   help="the image set: a folder, a file or a quoted glob")  # fmt: skip
    p.add_argument("--top", type=types.positive_int, default=9, help="exemplars per channel (default 9, at most 16)")
    p.add_argument("--bottom", type=types.nonneg_int, default=0, help="also the least-exciting images (default 0)")
    p.add_argument("--crop", type=types.nonneg_int, default=0,
                   help="crop side in pixels, 16-128 (default 0: the tap's receptive field)")  # fmt: skip
    p.add_argument(
        "--batch", type=types.positive_int, default=None, help="images per forward pass (default: the server's)"
    )
    p.add_argument("--out", "-o", default="exemplars.png", help="the contact sheet PNG (default exemplars.png)")
    p.add_argument("--heat-maps", default=None, metavar="DIR",
                   help="also write each top exemplar's location map (PNG heat map) into DIR")  # fmt: skip
    p.add_argument("--with-maximize", action="store_true",
                   help="start each row with the channel's Maximize image (natural preset, same server)")  # fmt: skip
    p.add_argument("--maximize-steps", type=types.positive_int, default=None, metavar="N",
                   help="optimization steps of those Maximize images (default: the natural preset's)")  # fmt: skip
    p.add_argument("--timeout", type=types.positive_float, default=None, help="seconds before giving up")
    p.add_argument("--json", action="store_true", help="print one JSON object with the rankings")
    add_server_argument(p)
    p.set_defaults(func=run_exemplars, command="exemplars")


def sheet(rows: list[list[bytes]], gap: int = 2, lead: list[bytes] | None = None) -> np.ndarray:
    """One row per target, its crops left to right, white gaps between them. ``lead``: one image
    per row (the target's Maximize image) placed first, the crops beside it in a block of up to
    three lines (9 crops: 3×3) as high as it is, a wider gap between."""
    from PIL import Image

    decoded = [[np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in row] for row in rows]
    side = max((im.shape[0] for row in decoded for im in row), default=16)
    cols = max((len(row) for row in decoded), default=1)
    # With a lead image the crops stack in a near-square block, so the lead shows several times
    # their side: a synthetic image needs the room more than one crop does.
    lines = max(1, min(3, round(cols**0.5))) if lead else 1
    per_line = -(-cols // lines)
    row_h = lines * side + (lines - 1) * gap
    lead_w = (row_h + 4 * gap) if lead else 0
    width = lead_w + per_line * (side + gap) - gap
    out = np.full((len(rows) * (row_h + gap) - gap, width, 3), 255, np.uint8)
    for r, row in enumerate(decoded):
        top0 = r * (row_h + gap)
        if lead:
            first = Image.open(io.BytesIO(lead[r])).convert("RGB").resize((row_h, row_h), Image.Resampling.LANCZOS)
            out[top0 : top0 + row_h, :row_h] = np.asarray(first)
        for c, im in enumerate(row):
            top = top0 + (c // per_line) * (side + gap)
            left = lead_w + (c % per_line) * (side + gap)
            out[top : top + im.shape[0], left : left + im.shape[1]] = im
    return out


def _progress(event: Any) -> None:
    if sys.stderr.isatty():  # a progress bar for a person, nothing in a log or a pipe
        print(f"\r{event.images_seen} images, {event.images_per_second:.1f}/s", end="", file=sys.stderr, flush=True)


def run_exemplars(args: argparse.Namespace) -> int:
    from PIL import Image

    from service.cli.embedded import connect
    from service.cli.remote import grpc
    from service.cli.resolve import resolve_model, server_address

    channels = [c for spec in args.channel for c in spec]
    if not channels:
        raise UsageError("exemplars needs --channel (e.g. --channel 0-15)")
    if args.images is None:
        raise UsageError("exemplars needs --images DIR|GLOB")
    paths = image_paths(args.images)
    if not paths:
        raise UsageError(f"--images {args.images!r} holds no image files ({', '.join(IMAGE_SUFFIXES)})")

    def images() -> Iterator[tuple[str, Path]]:
        # Lazily, one file at a time: the set may be larger than memory.
        for p in paths:
            yield str(p.name if Path(args.images).is_dir() else p), p

    try:
        with connect(args.server, timeout=args.timeout) as (client, _):
            model = resolve_model(client, args.model, args.json)
            tap = args.tap or model.output_tap
            results = client.exemplars(model.id, tap, images(), channels, top_k=args.top, bottom_k=args.bottom,
                                       crop_size=args.crop, batch_size=args.batch or 0,
                                       heat_maps=args.heat_maps is not None, on_progress=_progress)  # fmt: skip
            maximized: list[bytes] | None = None
            if args.with_maximize:
                steps = {"steps": args.maximize_steps} if args.maximize_steps else {}
                if sys.stderr.isatty():
                    print(f"\nMaximize images of {len(channels)} channel(s), natural preset", file=sys.stderr)
                run = client.maximize(model.id, tap, channels, preset="natural", **steps).wait()
                maximized = [r.png for r in run.results]
    except grpc.RpcError as err:
        return rpc_error(err, server_address(args.server))
    if sys.stderr.isatty():
        print(file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet([[e.crop_png for e in r.top] for r in results], lead=maximized)).save(out)
    heat_dir = Path(args.heat_maps) if args.heat_maps is not None else None
    if heat_dir is not None:
        heat_dir.mkdir(parents=True, exist_ok=True)

    def entry(e: Any, channel: int, rank: int | None) -> dict[str, Any]:
        item = {"id": e.image_id, "activation": e.activation, "fraction_of_max": e.fraction_of_max,
                "y": e.y, "x": e.x, "box": list(e.box)}  # fmt: skip
        if e.top_classes:
            item["top_classes"] = [{"index": c.index, "label": c.label, "score": c.score} for c in e.top_classes]
        if heat_dir is not None and rank is not None and e.heat_map_png:
            path = heat_dir / f"channel{channel}_top{rank}.png"
            path.write_bytes(e.heat_map_png)
            item["heat_map"] = str(path)
        return item

    report = {
        "model": model.id,
        "tap": tap,
        "images": results[0].images if results else 0,
        "output": str(out),
        "with_maximize": maximized is not None,
        "targets": [
            {
                "channel": c,
                "set_max": r.set_max,
                "top": [entry(e, c, rank) for rank, e in enumerate(r.top, 1)],
                "bottom": [entry(e, c, None) for e in r.bottom],
            }
            for c, r in zip(channels, results, strict=True)
        ],
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for t in report["targets"]:
            best = ", ".join(
                f"{e['id']} {e['activation']:.3g}"
                + (f" ({e['top_classes'][0]['label']})" if "top_classes" in e else "")
                for e in t["top"][:3]
            )
            print(f"channel {t['channel']:<5} {best}")
        print(f"sheet → {out}")
    return 0
