"""What one server process has done with each model (GetModelStatistics), and what it is (GetServerInfo).

Statistics are per process and since its start, like Triton's: replicas each count their own, and
Prometheus (service/rpc/metrics.py) is where figures are summed over replicas and kept.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from service.api.preimage.v1 import preimage_pb2 as pb


@dataclass
class _Counts:
    requests: int = 0
    succeeded: int = 0
    steps: int = 0
    seconds: float = 0.0
    failures: Counter = field(default_factory=Counter)
    by_task: Counter = field(default_factory=Counter)


class ModelStatistics:
    """Thread-safe counters per model id."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._counts: dict[str, _Counts] = {}

    def record(self, model_id: str, task: str, code: str, steps: int, seconds: float) -> None:
        with self._lock:
            c = self._counts.setdefault(model_id, _Counts())
            c.requests += 1
            c.by_task[task] += 1
            c.steps += steps
            c.seconds += seconds
            if code == "OK":
                c.succeeded += 1
            else:
                c.failures[code] += 1

    def model_ids(self) -> list[str]:
        with self._lock:
            return list(self._counts)

    def message(self, record: Any) -> pb.ModelStatistics:
        """The statistics of the model ``record`` (a ModelRecord); zeros if it has run nothing."""
        with self._lock:
            c = self._counts.get(record.id, _Counts())
            return pb.ModelStatistics(
                model_id=record.id, name=record.name, version=record.version, requests=c.requests,
                succeeded=c.succeeded, steps=c.steps, seconds=c.seconds, failures=dict(c.failures),
                by_task=dict(c.by_task),
            )  # fmt: skip

    def uptime(self) -> float:
        return time.monotonic() - self.started


def device_info(device: Any) -> pb.DeviceInfo:
    """What the optimizations run on: a GPU's name and memory, or the CPU's model, cores and RAM."""
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return pb.DeviceInfo(name=str(device), description=props.name, memory_bytes=props.total_memory)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return pb.DeviceInfo(name=str(device), description=f"{model}, {os.cpu_count()} cores", memory_bytes=memory)


_ops: list[str] | None = None


def supported_ops() -> list[str]:
    """ONNX operators with a converter at some opset (onnx2torch's and ours), computed once."""
    global _ops
    if _ops is None:
        from converters.supported_ops import support_matrix

        ok = ("onnx2torch", "preimage")
        _ops = sorted(op for op, row in support_matrix().items() if any(cell in ok for cell in row.values()))
    return list(_ops)


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("preimage")
    except PackageNotFoundError:  # a checkout that was never installed
        return "unknown"
