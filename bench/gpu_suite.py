"""The bench suite's GPU-relevant scripts in one run, with absolute figures: the device's name, seconds
per visualization and images per second (bundled EfficientNet-Lite0).

Runs, each as its own process with its own time limit (a script that runs over is reported, and the
suite goes on):

- ``step_overhead.py`` at batch 1, 8 and 32 (224 px, ``/_blocks.7/Add``): ms per step → seconds of
  one 350-step inversion (SPEC.md's 300 + 50) and images per second when the batch runs together;
- ``batching.py`` (16 Maximize jobs of 300 steps through gRPC, 224 px): seconds per visualization
  one at a time, and images per second with the 16 submitted at once;
- ``steps_to_error.py`` (224 px, three taps; the reference, the default, 150 + 100 steps and Adam):
  seconds per reference inversion, and how many steps each needs to reach the reference's error;
- ``invert_table.py`` (224 px, nine taps from the stem to the logits): seconds per inversion;
- ``batch_invariance.py`` (a conv tap and the classifier's Gemm): which batch sizes change a row's
  arithmetic with deterministic cuDNN, and whether padding to 4 rows (the CPU's fix) makes it exact;
- ``service_step.py`` (224 px, batch 1 and 8, the three RPCs, through a real `preimage serve` on the
  device): per-step time over the bare forward and backward of the same graph.

It prints each script's output as it comes, then a summary (Markdown) that bench/RESULTS.md takes as
is; with ``--out DIR`` (default: $OUT when set) it also writes ``DIR/gpu_suite.log`` and
``DIR/gpu_suite.md``. Budget: about 4 minutes on an H100 by estimate (no GPU has run it yet); the
per-script limits add up to 7.5 minutes.

    bench/gpu_suite.sh                      # on the device machine (installs carried wheels first)
    python bench/gpu_suite.py [--device cuda] [--out DIR] [--smoke]
    python bench/gpu_suite.py --device cpu --smoke   # tiny settings: checks the suite itself runs
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
STEPS_PER_INVERSION = 350  # SPEC.md: 300 + 50
BATCHING = re.compile(
    r"(\d+) Maximize jobs, tap (\S+), (\d+)px, (\d+) steps.*sequential ([\d.]+) s, concurrent ([\d.]+) s"
)
STE_TAP = re.compile(r"\n(\S+) \[.*?\] stride \d+: E_ref = ([\d.]+) after (\d+) steps, ([\d.]+) s per visualization")
STE_SETTING = re.compile(r"\n  (.+?)\s+\[.*?\]: final [\d.]+; ≤ E_ref (at step \d+|not reached in \d+ steps)")


@dataclass
class Bench:
    label: str
    argv: list[str]  # after the script path
    timeout_s: float
    summarize: Callable[[str, list[str]], list[str]]  # (output, argv) → summary lines


def _text(b: bytes | str | None) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _arg(argv: list[str], name: str, default: str) -> str:
    return argv[argv.index(name) + 1] if name in argv else default


def summarize_step_overhead(out: str, argv: list[str]) -> list[str]:
    m = re.search(r"batch (\d+) size (\d+): floor ([\d.]+) ms, step ([\d.]+) ms", out)
    if not m:
        return []
    batch, size, floor_ms, step_ms = int(m[1]), int(m[2]), float(m[3]), float(m[4])
    per_batch = STEPS_PER_INVERSION * step_ms / 1e3
    return [
        f"| step_overhead | `{_arg(argv, '--tap', '/_blocks.7/Add')}`, {size} px, batch {batch} | "
        f"{step_ms:.2f} ms/step (floor {floor_ms:.2f}, ratio {step_ms / floor_ms:.3f}) | "
        f"{per_batch:.2f} s per batch of {batch} ({STEPS_PER_INVERSION} steps) | {batch / per_batch:.2f} |"
    ]


def summarize_batching(out: str, argv: list[str]) -> list[str]:
    m = BATCHING.search(out)
    r = re.search(r"batching ratio \(concurrent / sequential\): ([\d.]+)", out)
    if not (m and r):
        return []
    jobs, tap, size, steps, seq, conc = int(m[1]), m[2], int(m[3]), int(m[4]), float(m[5]), float(m[6])
    return [
        f"| batching (gRPC) | Maximize `{tap}`, {size} px, {steps} steps, {jobs} jobs | ratio {r[1]} "
        f"(sequential {seq:.1f} s, concurrent {conc:.1f} s) | {seq / jobs:.2f} s one at a time | "
        f"{jobs / conc:.2f} (concurrent) vs {jobs / seq:.2f} (one at a time) |"
    ]


def summarize_steps_to_error(out: str, argv: list[str]) -> list[str]:
    lines = []
    size = _arg(argv, "--size", "128")
    for m in STE_TAP.finditer(out):
        tap, e_ref, steps, seconds = m[1], float(m[2]), int(m[3]), float(m[4])
        block = out[m.end() : out.find("\n\n", m.end())]
        hits = "; ".join(f"{h[1].strip()}: {h[2]}" for h in STE_SETTING.finditer(block))
        lines.append(
            f"| steps_to_error | `{tap}`, {size} px, inversion {steps} steps, E_ref {e_ref:.4f} | {hits} | "
            f"{seconds:.2f} s | {1 / seconds:.2f} |"
        )
    return lines


def summarize_invert_table(out: str, argv: list[str]) -> list[str]:
    size = _arg(argv, "--size", "224")
    steps = int(_arg(argv, "--steps", "300")) + 50  # invert_table keeps the 50 refinement steps
    lines = []
    for m in re.finditer(r"^\| `(\S+)` \| \[[\d, ]+\] \| \d+ \| ([\d.]+) \| ([\d.]+) \|$", out, re.M):
        seconds = float(m[3])
        lines.append(
            f"| invert_table | `{m[1]}`, {size} px, {steps} steps | feature error {m[2]} | "
            f"{seconds:.2f} s | {1 / seconds:.2f} |"
        )
    return lines


def summarize_batch_invariance(out: str, argv: list[str]) -> list[str]:
    return [
        f"| batch_invariance | `{m[1]}`, padded to a multiple of {m[2]} | rows differing: {m[3]} | — | — |"
        for m in re.finditer(r"^(\S+): padded to a multiple of (\d+): (.+)$", out, re.M)
    ]


def summarize_service_step(out: str, argv: list[str]) -> list[str]:
    pattern = r"^(\w+)\s+(\d+)px batch (\d+) \((\d+) rows\): step\s+([\d.]+) ms, floor\s+([\d.]+) ms, ratio ([\d.]+)$"
    return [
        f"| service_step | {m[1]}, {m[2]} px, batch {m[3]} ({m[4]} rows) | ratio {m[7]} | {m[5]} ms per step | "
        f"floor {m[6]} ms |"
        for m in re.finditer(pattern, out, re.M)
    ]


def benches(device: str, smoke: bool) -> list[Bench]:
    d = ["--device", device]
    if smoke:  # seconds on a CPU: only checks that every script and parser runs
        return [
            Bench("step_overhead", ["--size", "64", "--batch", "2", "--steps", "3", *d], 120, summarize_step_overhead),
            Bench("batching", ["--jobs", "2", "--size", "64", "--steps", "3", *d], 180, summarize_batching),
            Bench("steps_to_error", [*"--size 64 --steps 6 --refine 2 --every 2 --schedules 4 --adam-lrs 4".split(),
                                     "--taps", "/_blocks.2/Add", *d], 180, summarize_steps_to_error),
            Bench("invert_table", ["--size", "32", "--steps", "1", *d], 300, summarize_invert_table),
            Bench("batch_invariance", ["--size", "32", "--max-batch", "5", "--taps", "/_fc/Gemm", *d], 120,
                  summarize_batch_invariance),
            Bench("service_step", [*"--sizes 64 --batches 1 --tasks maximize --steps 2,4".split(), *d], 240,
                  summarize_service_step),
        ]  # fmt: skip
    return [
        *(
            Bench(f"step_overhead, batch {b}", ["--size", "224", "--batch", str(b), "--steps", "30", *d], 45,
                  summarize_step_overhead)
            for b in (1, 8, 32)
        ),
        Bench("batching", ["--jobs", "16", "--size", "224", "--steps", "300", *d], 120, summarize_batching),
        # the error ratios are the CPU run's business (bench/RESULTS.md); here the seconds, on fewer settings
        Bench("steps_to_error", ["--size", "224", "--schedules", "150+100", "--adam-lrs", "4", *d], 120,
              summarize_steps_to_error),
        Bench("invert_table", ["--size", "224", *d], 75, summarize_invert_table),
        Bench("batch_invariance", ["--size", "96", "--max-batch", "8", *d], 60, summarize_batch_invariance),
        # through a real `preimage serve` on the device: per-step time over the bare floor
        Bench("service_step", [*"--sizes 224 --batches 1,8 --steps 10,40".split(), *d], 150, summarize_service_step),
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny settings (checks the suite runs)")
    parser.add_argument("--out", default=os.environ.get("OUT") or None, help="folder for the log and summary")
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(args.device))
        total = torch.cuda.get_device_properties(torch.device(args.device)).total_memory / 2**30
        device_line = f"{name} ({total:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "unknown CPU")  # fmt: skip
        device_line = f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} (no GPU)"
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"device: {device_line}\ndate: {when}\n", flush=True)
    log: list[str] = [f"device: {device_line}", f"date: {when}"]
    summary: list[str] = []
    failures: list[str] = []
    suite_start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "PYTHONUNBUFFERED": "1"}  # fmt: skip
    if not args.device.startswith("cuda"):
        # one thread per process on a CPU: on a shared 2-core machine torch's default (one per core)
        # made single steps take seconds while other jobs ran (threads waiting on each other)
        env["OMP_NUM_THREADS"] = "1"
    for bench in benches(args.device, args.smoke):
        script = bench.label.split(",")[0]
        cmd = [sys.executable, str(ROOT / "bench" / f"{script}.py"), *bench.argv]
        shown = f"python bench/{script}.py {' '.join(bench.argv)}"
        print(f"$ {shown}", flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=bench.timeout_s)
            out, status = proc.stdout + proc.stderr, f"exit {proc.returncode}"
            ok = proc.returncode == 0
        except subprocess.TimeoutExpired as exc:
            out, status, ok = _text(exc.stdout) + _text(exc.stderr), f"TIMED OUT after {bench.timeout_s:.0f} s", False
        seconds = time.perf_counter() - start
        print(out.rstrip() + f"\n[{bench.label}: {status}, {seconds:.0f} s]\n", flush=True)
        log += [f"$ {shown}", out.rstrip(), f"[{bench.label}: {status}, {seconds:.0f} s]"]
        lines = bench.summarize(out, bench.argv)
        if not ok or not lines:
            failures.append(f"{bench.label}: {status}" + ("" if lines else ", no figures parsed"))
        summary += lines
    table = [
        f"Device: {device_line}; {when}; suite {time.perf_counter() - suite_start:.0f} s"
        + (" (SMOKE settings: not figures)" if args.smoke else ""),
        "",
        "| bench | setting | measured | seconds per visualization | images per second |",
        "|---|---|---|---|---|",
        *summary,
    ] + ([""] + [f"- did not complete: {f}" for f in failures] if failures else [])
    print("\n".join(table))
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gpu_suite.log").write_text("\n".join(log) + "\n")
        (out_dir / "gpu_suite.md").write_text("\n".join(table) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
