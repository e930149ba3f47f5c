"""The memory a graph takes at a requested size, where its tap shapes cannot say.

A graph that reads its input's shape (Shape, Size) can size later tensors from it: ConstantOfShape,
Expand, Tile, Range, a Reshape's target. Such a graph may take kilobytes at the size it was vetted at
and gigabytes at a larger one, and the estimate from the taps' shapes scaled by the pixel count does
not see it. For these graphs the part up to the tap is run once at the requested size in a child
forked from the vetting fork server, under an address-space cap, and its peak memory is what the
admission check uses. The answer is cached per model, tap and size; graphs without shape reads are
never dry-run (the pixel-count scaling holds for them).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from service.models.worker import VetError, WorkerLimits, dry_run

SHAPE_READS = frozenset({"Shape", "Size"})


class OverBudget(MemoryError):
    """The graph needs more than ``cap`` bytes for one image at the requested size (a MemoryError:
    the admission check reads it as one)."""

    def __init__(self, cap: int):
        super().__init__(f"more than {cap} bytes")
        self.cap = cap


def reads_shapes(onnx_model: Any, tap_name: str) -> bool:
    """Does the part of the graph ``tap_name`` depends on read a value's shape at run time?"""
    from converters.truncate import needed_nodes

    graph = onnx_model.graph
    return any(graph.node[i].op_type in SHAPE_READS for i in needed_nodes(graph, [tap_name]))


class DryRuns:
    """Peak memory of one image's forward up to a tap, measured in a child; cached."""

    def __init__(self, limits: WorkerLimits, capacity: int = 1024, compute: Callable[..., Any] | None = None):
        self.limits = limits
        self.compute = compute or (lambda fn, *args: fn(*args))  # where the feed's torch op runs
        self.capacity = capacity
        self._peaks: OrderedDict[tuple, tuple[int | None, int]] = OrderedDict()  # key → (peak or None, cap)
        self._shaped: dict[tuple[str, str], bool] = {}
        self._lock = threading.Lock()
        self._slot = threading.Semaphore(1)  # one dry-run child at a time: each may take up to its cap

    def peak(self, model_id: str, converted: Any, tap: Any, height: int, width: int, cap: int) -> int | None:
        """Bytes one image's forward up to ``tap`` adds at height × width, or None when the graph does
        not read shapes (or onnxruntime cannot run it at this size: then the torch run says why).
        Raises OverBudget when it needs more than ``cap``."""
        shaped_key = (model_id, tap.name)
        with self._lock:
            shaped = self._shaped.get(shaped_key)
        if shaped is None:
            shaped = reads_shapes(converted.onnx, tap.name)
            with self._lock:
                self._shaped[shaped_key] = shaped
        if not shaped:
            return None
        key = (model_id, tap.name, height, width)
        with self._slot:
            with self._lock:
                known = self._peaks.get(key)
                if known is not None:
                    self._peaks.move_to_end(key)
            # Measured before: reuse it unless it was over a smaller cap than this one.
            if known is None or (known[0] is None and cap > known[1]):
                known = (self._measure(converted, tap, height, width, cap), cap)
                with self._lock:
                    self._peaks[key] = known
                    while len(self._peaks) > self.capacity:
                        self._peaks.popitem(last=False)
        peak = known[0]
        if peak is None or peak > cap:
            raise OverBudget(cap)
        return peak if peak >= 0 else None

    def _measure(self, converted: Any, tap: Any, height: int, width: int, cap: int) -> int | None:
        """The peak in bytes; None when over ``cap``; -1 when onnxruntime cannot run it at this size."""
        from converters.truncate import extract_subgraph

        sub = extract_subgraph(converted.onnx, converted.input_name, [tap.name])
        # The mean colour (0 in the energy's units): an ordinary image, not one a shape trick keys on.
        image = self.compute(lambda: np.asarray(converted.to_model_input(torch.zeros(1, 3, height, width))))
        try:
            return dry_run(sub.SerializeToString(), {converted.input_name: image}, tap.name, cap, self.limits)
        except VetError as exc:
            return None if exc.kind == "resources" else -1
