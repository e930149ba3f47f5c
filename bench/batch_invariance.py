"""Which batch sizes change a row's arithmetic: the measurement behind service/jobs/batch_invariance.py.

For each tap of the bundled model, one image's gradient of ‖Φ(x)‖² is computed inside batches of
N = 1…16 other images, at every position, and compared bit for bit with the same image in a batch
of ``--quantum`` (default 4). Prints, per tap, the (N, position) pairs that differ, first for any N
and then for N padded up to a multiple of the quantum, which is what batch-invariant mode runs.
An empty second list means the padding makes that tap batch-invariant on this device.

    python bench/batch_invariance.py [--taps /_blocks.10/Add,/_fc/Gemm] [--size 64] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch

from converters.bundled import bundled_model_path
from converters.model import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--taps", default="/_blocks.10/Add,/_fc/Gemm")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--quantum", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=12)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    model = load_model(bundled_model_path(), verify=False)
    gen = torch.Generator().manual_seed(0)
    pool = ((torch.rand(args.max_batch + 1, 3, args.size, args.size, generator=gen) * 2 - 1) * 80).to(device)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"{torch.get_num_threads()} threads, {args.size} px, quantum {args.quantum}")  # fmt: skip
    for name in args.taps.split(","):
        phi = model.representation(model.tap(name)).to(device)

        def gradient(batch: torch.Tensor, phi: torch.nn.Module = phi) -> torch.Tensor:
            x = batch.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(phi(x).square().sum(), x)
            return g

        target = pool[0]
        reference = gradient(torch.stack([target, *pool[1 : args.quantum]]))[0]
        differ: dict[str, list[tuple[int, int]]] = {"any N": [], "padded": []}
        for n in range(1, args.max_batch + 1):
            for position in range(n):
                rows = [pool[1 + i % args.max_batch] for i in range(n)]
                rows[position] = target
                for label, total in (("any N", n), ("padded", -(-n // args.quantum) * args.quantum)):
                    batch = torch.stack(rows + [torch.zeros_like(target)] * (total - n))
                    if not torch.equal(gradient(batch)[position], reference):
                        differ[label].append((n, position))
        print(f"{name}: rows differing from the reference, any N: {differ['any N'] or 'none'}")
        print(f"{name}: padded to a multiple of {args.quantum}: {differ['padded'] or 'none (batch-invariant)'}")


if __name__ == "__main__":
    main()
