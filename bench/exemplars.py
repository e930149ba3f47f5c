"""Exemplars throughput and memory: images per second through the Exemplars RPC (a real server on
loopback, bundled EfficientNet-Lite0, one mid-layer tap) against a bare batched onnxruntime forward
of the same truncated graph on the same preprocessed inputs, as one ratio in one run (rounds that
alternate the two, so a shared machine's drift falls on both); and the server process's RSS while
``--images`` images stream (the server runs in this process, so its RSS is ours).

    python bench/exemplars.py [--images 5000] [--rounds 3] [--tap /_blocks.7/Add] [--channels 16] [--batch 16]

Also the converted torch graph's bare forward on the same batches, which splits the gap into
the forward itself and what surrounds it, and the same stream sent as uint8 arrays (the client
sends their pixels: no PNG encode or decode on either side; ``ratio_pixels``). The service's
figure includes what the bare forward leaves out (PNG decode, resize, gRPC, top-k and crops),
which is the point: the ratio is what a user gets over the floor. Target ≥ 0.8, RSS flat over
the run.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def image_pool(n: int, side: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct PNGs: random crops (and mirrors) of scikit-image's colour photographs. The
    stream cycles through them, so thousands of images cost no encoding time in the loop."""
    from service.jobs.reference import AMPLITUDE_PHOTOS, center_crop_resize, photo

    rng = np.random.default_rng(seed)
    photos = [photo(n) for n in AMPLITUDE_PHOTOS]
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        s = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        crop = center_crop_resize(img[top : top + s, left : left + s], side, side)
        if i % 2:
            crop = crop[:, ::-1]
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(crop)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--tap", default="/_blocks.7/Add")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads (the same for both)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of service and bare forward for the ratios")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()

    import onnxruntime as ort

    from converters.bundled import bundled_model_path
    from converters.truncate import extract_subgraph
    from service.client import PreimageClient
    from service.energy import from_uint8
    from service.jobs.job import decode_image, resize
    from service.jobs.limits import JobLimits
    from service.rpc.app import start_server
    from service.rpc.config import ServerConfig

    pool = image_pool(64, 224)
    with tempfile.TemporaryDirectory() as store:
        config = ServerConfig(store_dir=Path(store), seed_bundled=False, device=args.device, torch_threads=args.threads)
        running = start_server("127.0.0.1:0", config)
        try:
            client = PreimageClient(f"127.0.0.1:{running.port}", timeout=3600)
            client.upload(bundled_model_path(), name="effnet")
            channels = list(range(args.channels))
            # Warm-up: conversion, the representation, allocator pools.
            client.exemplars("effnet", args.tap, pool[:32], channels, top_k=9, batch_size=args.batch)
            rss: list[tuple[int, float]] = []

            def stream() -> Iterator[tuple[str, bytes]]:
                for i in range(args.images):
                    if i % 250 == 0:
                        rss.append((i, rss_mib()))
                    yield str(i), pool[i % len(pool)]

            t0 = time.perf_counter()
            results = client.exemplars("effnet", args.tap, stream(), channels, top_k=9, batch_size=args.batch)
            service_s = time.perf_counter() - t0
            rss.append((args.images, rss_mib()))
            assert results[0].images == args.images
            record = running.servicer.store.get("effnet")
            converted = running.servicer.cache.get(record)
            tap = converted.tap(args.tap)
            sub = extract_subgraph(converted.onnx, converted.input_name, [tap.name])
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            opts.log_severity_level = 3
            session = ort.InferenceSession(sub.SerializeToString(), sess_options=opts,
                                           providers=["CPUExecutionProvider"])  # fmt: skip
            import torch

            mean = torch.tensor(converted.preprocessing.mean_rgb255)
            limits = JobLimits()
            inputs = [from_uint8(resize(decode_image(b, 0, limits), 224, 224), mean) for b in pool[: args.batch]]
            feed = {converted.input_name: converted.to_model_input(torch.stack(inputs))}
            session.run(None, feed)  # warm-up
            # The ratios: rounds that alternate the service (PNGs, then the same images as uint8
            # arrays, which the client sends as pixels: neither side encodes or decodes) with the
            # bare forward, so a shared machine's drift falls on both sides of each ratio.
            arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in pool]
            per_round = max(args.batch, (min(args.images, 3000) // args.rounds) // args.batch * args.batch)
            spent = {"png": 0.0, "pixels": 0.0, "onnxruntime": 0.0}
            for _ in range(args.rounds):
                for kind, source in (("png", pool), ("pixels", arrays)):
                    t0 = time.perf_counter()
                    got = client.exemplars(
                        "effnet", args.tap, ((str(i), source[i % len(source)]) for i in range(per_round)), channels,
                        top_k=9, batch_size=args.batch,
                    )  # fmt: skip
                    spent[kind] += time.perf_counter() - t0
                    assert got[0].images == per_round
                t0 = time.perf_counter()
                for _ in range(per_round // args.batch):
                    session.run(None, feed)
                spent["onnxruntime"] += time.perf_counter() - t0
            n_batches = per_round // args.batch
            # The converted graph alone, the service's own floor: splits the gap into the forward
            # pass (torch vs onnxruntime) and everything around it (decode, gRPC, top-k, crops).
            phi = converted.representation(tap.name)
            x = torch.stack(inputs)
            with torch.no_grad():
                phi(x)
                t0 = time.perf_counter()
                for _ in range(max(1, n_batches // 4)):
                    phi(x)
                torch_s = (time.perf_counter() - t0) / max(1, n_batches // 4) * n_batches
        finally:
            running.stop(grace=None)
    service_rate = args.images / service_s
    measured = args.rounds * per_round
    png_rate, pixels_rate, ort_rate = (measured / spent[k] for k in ("png", "pixels", "onnxruntime"))
    figures = {
        "images": args.images,
        "tap": args.tap,
        "channels": args.channels,
        "batch": args.batch,
        "threads": args.threads,
        "service_images_per_s_over_the_rss_run": round(service_rate, 2),
        "rounds": args.rounds,
        "images_per_round": per_round,
        "service_images_per_s": round(png_rate, 2),
        "service_pixels_images_per_s": round(pixels_rate, 2),
        "onnxruntime_images_per_s": round(ort_rate, 2),
        "torch_forward_images_per_s": round(n_batches * args.batch / torch_s, 2),
        "ratio": round(png_rate / ort_rate, 3),
        "ratio_pixels": round(pixels_rate / ort_rate, 3),
        "rss_mib": [(i, round(m, 1)) for i, m in rss],
        "rss_growth_mib": round(rss[-1][1] - rss[0][1], 1),
    }
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
