"""Per-step time through the service over the floor: what a user of `preimage serve` gets.

    python bench/service_step.py [--sizes 128,224] [--batches 1,8] [--tasks invert,maximize,caricature]
                                 [--steps 4,12] [--preset paper] [--threads N] [--device D] [--json FILE]

One real `preimage serve` process (the bundled EfficientNet-Lite0 uploaded to it) and the gRPC
client. A request's wall time is start-up (conversion, statistics, the first step's allocations)
plus steps × per-step time, so the per-step time is the slope over two step counts: each call is
timed twice per count, alternating, and the faster of each pair is kept (these machines are noisy).
The floor is the lower quartile of 20 timed passes after 5 warm-up passes.

The floor is a bare forward and backward of the same truncated graph with the same network rows
(the targets × the views a step of that preset takes), timed in a fresh process that does all its
torch work on its main thread: one OpenMP team, as the service should have. It is timed before and after
the service's calls (the lower of the two), in one run, and the ratio per row is service step / floor.

Maximize uses the logits (class 1); Invert and Caricature the mid-layer tap below, on chelsea.
``--device`` (default: cuda when there is one) is passed to `preimage serve --device` and the
floor runs there too, synchronized before each clock read.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.client import PreimageClient  # noqa: E402
from tests.deploy._servers import start  # noqa: E402

MID_TAP = "/_blocks.10/Add"
TAPS = {"maximize": "logits", "invert": MID_TAP, "caricature": MID_TAP}

# Timed in a child so that its torch runs on a fresh process's main thread.
FLOOR = r"""
import json, sys, time, torch
from converters.bundled import bundled_model_path
from converters.model import load_model
tap_name, size, rows, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
device = torch.device(sys.argv[5])
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
model = load_model(bundled_model_path())
phi = model.representation(model.tap(tap_name)).to(device)
x = torch.randn(rows, 3, size, size, device=device).mul(50)
def once():
    xi = x.detach().requires_grad_(True)
    torch.autograd.grad(phi(xi).float().sum(), xi)
for _ in range(5):
    once()
times = []
for _ in range(reps):
    sync(); t = time.perf_counter(); once(); sync(); times.append(time.perf_counter() - t)
times.sort()
print(json.dumps({"floor": times[len(times) // 4], "threads": torch.get_num_threads()}))
"""


@functools.cache
def photo_png(size: int) -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).resize((size, size)).save(buf, format="PNG")
    return buf.getvalue()


def floor_seconds(tap: str, size: int, rows: int, threads: int, device: str = "cpu", reps: int = 20) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", FLOOR, tap, str(size), str(rows), str(reps), device],
        capture_output=True, text=True, env=env, cwd=ROOT, check=True,
    )  # fmt: skip
    return float(json.loads(out.stdout.strip().splitlines()[-1])["floor"])


def views_per_target(task: str, preset: str) -> int:
    from service.energy.presets import preset_params

    params = preset_params(preset, task)  # type: ignore[arg-type]
    return 1 if params.parameterization == "pixel" else int(params.copies)


def call_seconds(
    client: PreimageClient, model: str, task: str, size: int, batch: int, steps: int, preset: str
) -> float:
    common = {"height": size, "width": size, "steps": steps, "refine_steps": 0, "report_every": 0, "preset": preset}
    image = photo_png(size) if task != "maximize" else b""
    start_t = time.perf_counter()
    if task == "maximize":
        run = client.maximize(model, TAPS[task], [1] * batch, **common)
    else:
        run = getattr(client, task)(model, TAPS[task], [image] * batch, **common)
    results = run.wait().results
    assert len(results) == batch
    return time.perf_counter() - start_t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128,224")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--tasks", default="invert,maximize,caricature")
    parser.add_argument("--steps", default="5,25", help="the two step counts of the slope")
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    n1, n2 = (int(s) for s in args.steps.split(","))
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        from converters.bundled import bundled_model_path

        server = start(Path(tmp) / "store", "--device", args.device, env={"OMP_NUM_THREADS": str(args.threads)})
        try:
            with PreimageClient(server.address, timeout=3600) as client:
                model = client.upload(bundled_model_path().read_bytes(), name="lite0").model.id
                for task in args.tasks.split(","):
                    for size in (int(s) for s in args.sizes.split(",")):
                        for batch in (int(b) for b in args.batches.split(",")):
                            rows = batch * views_per_target(task, args.preset)
                            floors = [floor_seconds(TAPS[task], size, rows, args.threads, args.device)]
                            call_seconds(client, model, task, size, batch, 1, args.preset)  # warm: caches
                            t = {n1: [], n2: []}
                            for _ in range(2):
                                for n in (n1, n2):
                                    t[n].append(call_seconds(client, model, task, size, batch, n, args.preset))
                            step = (min(t[n2]) - min(t[n1])) / (n2 - n1)
                            floors.append(floor_seconds(TAPS[task], size, rows, args.threads, args.device))
                            floor = min(floors)
                            row = {
                                "task": task, "tap": TAPS[task], "size": size, "batch": batch, "rows": rows,
                                "preset": args.preset, "device": args.device,
                                "step_ms": 1000 * step, "floor_ms": 1000 * floor, "ratio": step / floor,
                                "calls_s": {str(k): v for k, v in t.items()},
                            }  # fmt: skip
                            rows_out.append(row)
                            print(
                                f"{task:10s} {size:4d}px batch {batch} ({rows} rows): step {1000 * step:7.1f} ms, "
                                f"floor {1000 * floor:7.1f} ms, ratio {step / floor:.2f}",
                                flush=True,
                            )
        finally:
            server.close()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"threads": args.threads, "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
