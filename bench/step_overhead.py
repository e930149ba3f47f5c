"""Per-step overhead of the minimizer over the floor: a bare torch forward+backward of the same
truncated graph at the same batch size.

Prints one ratio, measured in one run with the two interleaved (these machines are noisy):
    service step time / (forward + backward) time
and, less noisy, the time each service step spends outside the network's forward and backward
(timed inside the same step, so the machine's drifts cancel), as step / (step − outside).

    python bench/step_overhead.py [--tap /_blocks.7/Add] [--size 128] [--batch 4] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from converters.bundled import bundled_model_path
from converters.model import load_model
from service.energy import EnergyParams, Minimizer, Objective, Problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tap", default="/_blocks.7/Add")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = load_model(bundled_model_path())
    tap = model.tap(args.tap)
    phi = model.representation(tap).to(device)
    mean = model.preprocessing.mean_rgb255
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(args.batch, 3, args.size, args.size, generator=gen) * 2 - 1).mul(50).to(device)
    with torch.no_grad():
        phi0 = phi(x).cpu()
    mini = Minimizer(phi, height=args.size, width=args.size, stride=tap.stride, mean_rgb255=mean, device=device)
    for i in range(args.batch):
        # The service's default: energy terms recorded on the reporting steps, every 10th.
        mini.add(Problem(Objective.invert(phi0[i]), EnergyParams(steps=10**6), seed=i), record_every=10)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def floor() -> None:
        xi = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(phi(xi).float().sum(), xi)
        sync()

    # Time the network's forward and backward inside the service's steps: the rest of a step is
    # its own overhead, measured within one step instead of as the difference of two noisy runs.
    network: list[float] = []
    timing = [False]
    real_phi, real_grad = mini.phi, torch.autograd.grad

    def timed(fn):  # noqa: ANN001, ANN202
        def call(*a, **k):  # noqa: ANN002, ANN003, ANN202
            if not timing[0]:
                return fn(*a, **k)
            sync()
            start = time.perf_counter()
            result = fn(*a, **k)
            sync()
            network.append(time.perf_counter() - start)
            return result

        return call

    mini.phi, torch.autograd.grad = timed(real_phi), timed(real_grad)

    def step() -> None:
        timing[0] = True
        mini.step()
        sync()
        timing[0] = False

    for fn in (floor, step, floor, step):  # warm-up
        fn()
    times: dict[str, list[float]] = {"floor": [], "step": []}
    for _ in range(args.steps):
        for name, fn in (("floor", floor), ("step", step)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    f, s = statistics.median(times["floor"]), statistics.median(times["step"])
    # Each step is paired with the floor measured just before it: the ratio of a pair cancels
    # the slow drifts of a shared machine, and the spread of the pairs shows how noisy it was.
    pairs = sorted(b / a for a, b in zip(times["floor"], times["step"], strict=True))
    q1, q3 = pairs[len(pairs) // 4], pairs[(3 * len(pairs)) // 4]
    print(
        f"device {device} tap {tap.alias} batch {args.batch} size {args.size}: "
        f"floor {f * 1e3:.1f} ms, step {s * 1e3:.1f} ms, overhead {(s - f) * 1e3:.2f} ms (medians of {args.steps})"
    )
    print(f"per-step overhead ratio (step / floor): {s / f:.3f}")
    # network holds a forward and a backward per step (the warm-up steps' pairs come first).
    net = [a + b for a, b in zip(network[-2 * args.steps :: 2], network[-2 * args.steps + 1 :: 2], strict=True)]
    outside = [t - n for t, n in zip(times["step"], net, strict=True)]
    within = statistics.median(t / (t - u) for t, u in zip(times["step"], outside, strict=True))
    print(
        f"outside the network, within each step: {statistics.median(outside) * 1e3:.2f} ms (median); "
        f"step / (step − outside): {within:.3f}"
    )
    print(f"paired ratios: median {statistics.median(pairs):.3f}, quartiles {q1:.3f}–{q3:.3f}")


if __name__ == "__main__":
    main()
