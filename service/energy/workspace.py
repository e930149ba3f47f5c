"""Buffers a minimizer reuses from step to step.

On a CPU, every fresh image-sized temporary is a large allocation that glibc maps and unmaps
each time, page faults and all; measured on the bundled model at 128 px, batch 4, that was about
as costly as the arithmetic on it. Keeping one buffer per intermediate avoids it (on a GPU the
caching allocator already does, and the buffers cost nothing extra).
"""

from __future__ import annotations

import torch


class Workspace:
    """Named scratch tensors, reallocated only when the shape, dtype or device changes."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...] | torch.Size, like: torch.Tensor) -> torch.Tensor:
        """An uninitialized tensor of ``shape`` with ``like``'s dtype and device."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._buffers[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buffer
