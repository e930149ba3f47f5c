"""Batching through gRPC: wall time of N concurrent Maximize jobs over the same N run one after
another, on one server (bundled EfficientNet-Lite0). One run, one ratio:

    concurrent wall time / sequential wall time      (target ≤ 0.6 on CPU, ≤ 0.2 on a GPU)

    python bench/batching.py [--jobs 8] [--tap /_blocks.7/Add] [--size 128] [--steps 40] [--preset mixed]

``--preset mixed`` (the default) alternates paper and natural jobs: they share batches.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from service.client import PreimageClient
from service.rpc.app import start_server
from service.rpc.config import ServerConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--tap", default="/_blocks.7/Add")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--device", default=None)
    parser.add_argument("--preset", choices=["paper", "natural", "mixed"], default="mixed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as store:
        running = start_server("127.0.0.1:0", ServerConfig(store_dir=Path(store), device=args.device))
        try:
            client = PreimageClient(f"127.0.0.1:{running.port}")
            options = dict(height=args.size, width=args.size, steps=args.steps, report_every=0)

            def job(channel: int) -> None:
                preset = args.preset if args.preset != "mixed" else ("paper", "natural")[channel % 2]
                run = client.maximize(
                    "efficientnet_lite0", args.tap, [channel], seed=channel, preset=preset, **options
                ).wait()
                assert len(run.results) == 1

            job(0)  # warm-up: conversion, channel statistics, first-step allocations
            job(1)
            start = time.perf_counter()
            for channel in range(args.jobs):
                job(channel)
            sequential = time.perf_counter() - start
            threads = [threading.Thread(target=job, args=(c,)) for c in range(args.jobs)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            concurrent = time.perf_counter() - start
            sizes = list(getattr(running.servicer.scheduler, "batch_sizes", []))
            print(
                f"{args.jobs} Maximize jobs ({args.preset}), tap {args.tap}, {args.size}px, {args.steps} steps, device "
                f"{running.servicer.device}: sequential {sequential:.1f} s, concurrent {concurrent:.1f} s"
                + (f", largest batch {max(sizes)}" if sizes else "")
            )
            print(f"batching ratio (concurrent / sequential): {concurrent / sequential:.3f}")
        finally:
            running.stop()


if __name__ == "__main__":
    main()
