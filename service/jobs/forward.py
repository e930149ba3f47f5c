"""Forward-only passes to a tap, for work that reads activations and takes no gradient (exemplars).

On a CPU server the truncated ONNX graph runs in onnxruntime: the same graph the converter checked
parity against, and 6–8× faster there than the converted torch graph on the bundled model's
depthwise convolutions (bench/exemplars.py). On a GPU, and for models without an ONNX graph (HOG,
DSIFT), the torch representation runs on the server's device. Either way the pass runs on the
thread that calls it, which in the server is the compute owner (Scheduler.call).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

# onnxruntime sessions kept per model, least recently used dropped first: each holds the weights
# its truncated graph needs, so a client sweeping taps cannot pile them up.
SESSIONS_PER_MODEL = 4

_sessions: weakref.WeakKeyDictionary[Any, OrderedDict[str, Any]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()

Forward = Callable[[torch.Tensor], torch.Tensor]


def _session(converted: Any, tap_name: str) -> Any:
    from converters.parity import ort_session
    from converters.quantized import QUANTIZED_OPS
    from converters.truncate import extract_subgraph

    with _lock:
        per_model = _sessions.setdefault(converted, OrderedDict())
        session = per_model.get(tap_name)
        if session is not None:
            per_model.move_to_end(tap_name)
            return session
    sub = extract_subgraph(converted.onnx, converted.input_name, [tap_name])
    quantized = any(n.op_type in QUANTIZED_OPS for n in sub.graph.node)
    session = ort_session(sub, as_written=quantized, threads=torch.get_num_threads(), fast=True)
    with _lock:
        per_model[tap_name] = session
        while len(per_model) > SESSIONS_PER_MODEL:
            per_model.popitem(last=False)
    return session


def tap_forward(converted: Any, tap: Any, device: torch.device) -> Forward:
    """Energy-space images (B×C×H×W on ``device``) → the tap's tensor (float32, on the CPU), without
    gradients. Errors are the request's: INVALID_ARGUMENT when the graph cannot run at this size,
    RESOURCE_EXHAUSTED when it runs out of memory."""
    from service.jobs.job import _run_phi

    if device.type == "cpu" and getattr(converted, "onnx", None) is not None:
        try:
            return _onnxruntime_forward(converted, tap, _session(converted, tap.name))
        except Exception:  # a graph onnxruntime will not load here still runs in torch
            pass
    phi = converted.representation(tap.name).to(device)
    return lambda x: _run_phi(phi, x, tap.alias).cpu()


def _onnxruntime_forward(converted: Any, tap: Any, session: Any) -> Forward:
    from service.jobs.job import forward_error

    step = converted.batch  # a fixed-batch graph runs in chunks of its batch size

    def run(x: torch.Tensor) -> torch.Tensor:
        inp = converted.to_model_input(x)
        n = len(inp)
        size = step or n
        if n % size:  # the last chunk is filled with copies of its last image, whose rows are dropped
            inp = np.concatenate([inp, np.repeat(inp[-1:], size - n % size, axis=0)])
        try:
            parts = [
                session.run([tap.name], {converted.input_name: inp[i : i + size]})[0] for i in range(0, len(inp), size)
            ]
        except Exception as exc:  # onnxruntime's errors are plain Exceptions
            raise forward_error(exc, x, tap.alias) from exc
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return torch.from_numpy(out[:n]).float()

    return run
