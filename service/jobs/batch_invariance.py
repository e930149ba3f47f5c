"""Batch invariance: a job's result must not depend on who else shares its batch.

The scheduler batches jobs, and the energy gives every row its own seed, generators and settings
(the minimizer steps each group of rows that agree with plain floats), so the only thing that can
couple rows is the network's arithmetic. On CPU it does, and the cause is the batch size N that
the kernels see, not the other rows' content. Measured on the bundled model (torch 2.14.1, oneDNN
3.12, MKL 2024.2, AVX2, 1–4 threads), comparing one image's gradient bit for bit:

- convolutions (oneDNN) at N = 1 differ from N ≥ 2 (one image is split across threads; two or more
  are computed image by image), and agree for every N ≥ 2 and every position in the batch;
- the classifier's Gemm (MKL sgemm) differs at N = 1, 2, 3 from N ≥ 4, and within N ≥ 4 a row in
  a last, partial block of 4 rows differs again (N = 5, position 4; N = 6, positions 4–5; ...);
  every row agrees when N is a multiple of 4.

So batch-invariant mode on CPU runs the network on the batch padded with zero images to a multiple
of ``CPU_ROW_QUANTUM`` rows: every row then sees the same kernels whatever its neighbours. A zero
row costs what a real one does, and only a batch whose size is not already a multiple pays: a lone
job steps at about 2.5× its unpadded time (96 px, 13 → 32 ms), a batch of 4 at 1×. The previous
mode (oneDNN off, native convolutions) cost 3.2–4.9× and did not cover the Gemm at all (its rows
still differed for N ≥ 4). The block of 4 is the measured one for this BLAS on this CPU; another
BLAS or CPU may block differently, which tests/service/test_scheduler.py would show there.

On CUDA, deterministic cuDNN algorithms without autotuning are the analogous setting; whether they
and cuBLAS are batch-invariant for every layer has not been measured (no GPU was available).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CPU_ROW_QUANTUM = 4  # MKL sgemm's row block on AVX2 (see above); a multiple of it covers oneDNN's N ≥ 2


def row_quantum(device: torch.device) -> int:
    """The multiple of rows a batch-invariant minimizer pads its batch to on ``device``."""
    return CPU_ROW_QUANTUM if device.type == "cpu" else 1


def use_batch_invariant_kernels(device: torch.device) -> Callable[[], None]:
    """Switch this process's kernel choices for batch invariance on ``device`` (CUDA: deterministic
    cuDNN without autotuning; CPU: nothing to switch, the padding does it); returns a restorer."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if device.type != "cpu":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

    def restore() -> None:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved

    return restore
