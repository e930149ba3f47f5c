"""Batch-invariant kernels: a job's result must not depend on who else shares its batch.

The scheduler batches jobs, and the energy gives every row its own seed and generators, so the
only thing that can couple rows is the arithmetic itself. On CPU it does: oneDNN chooses its
convolution blocking by batch size, so a row's sums are reassociated differently alone and in a
batch (measured on the bundled model at /_blocks.10/Add: 2.2e-5 max abs difference in the
features, 3 grey levels apart after 20 steps). PyTorch's native CPU convolution works image by
image, which makes every row's arithmetic independent of the batch (measured: identical PNGs),
at a price. Bundled model, /_blocks.10/Add, 96 px, 20 steps, quiet 2-core CPU: alone 0.5 → 1.6 s
(3.2×), batch of 4 0.9 → 4.4 s (4.9×) with two threads; 3.7× both ways with one thread. With one
thread the default kernels also happened to agree alone and batched at these settings: oneDNN's
batch dependence comes with its multi-threaded partitioning, and is not guaranteed either way.

On CUDA, deterministic cuDNN algorithms without autotuning are the analogous setting; whether
they are batch-invariant for every layer has not been measured (no GPU was available).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def use_batch_invariant_kernels(device: torch.device) -> Callable[[], None]:
    """Switch this process to batch-invariant kernels for ``device``; returns a function that restores them."""
    saved = (torch.backends.mkldnn.enabled, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if device.type == "cpu":
        torch.backends.mkldnn.enabled = False
    else:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False

    def restore() -> None:
        torch.backends.mkldnn.enabled, torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved

    return restore
