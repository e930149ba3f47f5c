"""Vet an uploaded model in a separate, resource-limited process before the server trusts it.

DESIGN.md: onnx's checker, shape inference and onnx2torch's conversion are not hardened against
denial of service, so parsing, checking, converting and building the onnxruntime session of an
upload happen in a child process with caps on address space, CPU time and wall-clock time. A
model that crashes, hangs or balloons there costs the child, never the server.

The child is forked from a ``forkserver`` that has already imported torch/onnx/onnxruntime (a
fresh interpreter would spend several seconds importing them per upload) and that, unlike the
server, runs no gRPC threads. The answer comes back as JSON bytes over a pipe: nothing the child
produced is ever unpickled by the server.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import multiprocessing.connection
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PRELOAD = ["torch", "onnx", "onnxruntime", "onnx2torch", "converters.model", "converters.parity"]
MAX_ANSWER_BYTES = 1 << 20


@dataclass(frozen=True)
class WorkerLimits:
    """Caps for vetting one upload."""

    extra_address_space: int = 6 << 30  # bytes above what the preloaded interpreter already maps
    cpu_seconds: int = 300
    wall_seconds: float = 600.0


class VetError(Exception):
    """The upload was refused. ``kind`` is "invalid" (the model's fault) or "resources" (a cap)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _vm_size(field: str = "VmSize") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _near_cap(limit: int, extra: int) -> bool:
    """Did this process come close to its address-space cap? A failed allocation surfaces as many
    exception types (MemoryError, protobuf's EncodeError, RuntimeError from C++), so we judge by
    the peak mapping, not the type: within max(64 MiB, 10% of the budget) of the cap."""
    return _vm_size("VmPeak") >= limit - max(64 << 20, extra // 10)


# How C++ allocation failures read once libraries turn them into Python exceptions (protobuf's
# "Arena alloc failed", std::bad_alloc, errno ENOMEM), even when wrapped in a ModelError.
_ALLOC_FAILURES = ("alloc failed", "bad_alloc", "cannot allocate memory", "out of memory")


def _limit_child(address_space: int, cpu_seconds: int) -> None:
    """Caps for a child that runs a client's graph: address space, CPU time, no core dump."""
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _out_of_memory(exc: BaseException, limit: int, extra: int) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or any(s in text for s in _ALLOC_FAILURES) or _near_cap(limit, extra)


def _child(
    conn: multiprocessing.connection.Connection, path: str, preprocessing: dict | None, limits: WorkerLimits
) -> None:
    # Limits first, before touching the untrusted bytes.
    address_space = _vm_size() + limits.extra_address_space
    _limit_child(address_space, limits.cpu_seconds)
    try:
        import torch

        torch.set_num_threads(1)
        answer = _vet(path, preprocessing)
    except Exception as exc:  # every failure becomes an answer
        from converters.errors import ModelError

        if _out_of_memory(exc, address_space, limits.extra_address_space):
            gib = limits.extra_address_space / 2**30
            error = f"converting the model needs more than this server's {gib:.2g} GiB memory cap"
            answer = {"ok": False, "kind": "resources", "error": error}
        else:
            # The converter's own exceptions are still this model's problem: INVALID_ARGUMENT.
            message = str(exc) if isinstance(exc, ModelError) else f"cannot convert: {type(exc).__name__}: {exc}"
            answer = {"ok": False, "kind": "invalid", "error": message[:2000]}
    conn.send_bytes(json.dumps(answer).encode())
    conn.close()


def load_requested(path: str | Path, requested: dict[str, Any] | None, verify: bool = True) -> Any:
    """load_model with the uploader's preprocessing (the server and the vetting child share this).

    ``requested`` holds Preprocessing fields. A size alone (the nominal size of a dynamic-size model)
    keeps everything else from the model's own metadata/defaults: height and width together are passed
    as ``size=``; one of them alone takes two loads. ``verify`` runs converters' parity check against
    onnxruntime; the server skips it for vetted models.
    """
    from converters.model import load_model
    from converters.spec import Preprocessing

    if not requested:
        return load_model(path, verify=verify)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in requested.items()}
    if set(fields) == {"height", "width"}:
        # One load, at the declared size: a first load without it would refuse a model that runs at
        # none of the common sizes before the size is ever tried.
        return load_model(path, verify=verify, size=(fields["height"], fields["width"]))
    if set(fields) <= {"height", "width"}:
        own = load_model(path, verify=False).preprocessing
        return load_model(path, dataclasses.replace(own, **fields), verify=verify)
    return load_model(path, Preprocessing(**fields), verify=verify)


def _vet(path: str, preprocessing: dict | None) -> dict[str, Any]:
    # load_model checks parity against onnxruntime (converters.parity): building the torch graph
    # and the onnxruntime session is the part that can blow up, so it happens here, under limits.
    converted = load_requested(path, preprocessing, verify=True)
    report = converted.parity
    return {
        "ok": True,
        "preprocessing": dataclasses.asdict(converted.preprocessing),
        "preprocessing_source": converted.preprocessing_source,
        "tap_count": len(converted.taps),
        "output_tap": converted.output_tap.name,
        "parity": report.max_rel_error if report is not None else None,
    }


_context_lock = threading.Lock()
_context: Any = None


def _get_context() -> Any:
    global _context
    with _context_lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            _context = ctx
        return _context


def warm_up() -> None:
    """Start the fork server now (it imports torch once), so the first upload does not wait for it."""
    from multiprocessing import forkserver

    _get_context()
    forkserver.ensure_running()


def _run_child(target: Any, args: tuple, wall_seconds: float, doing: str, process: str) -> dict[str, Any]:
    """Run ``target(sender, *args)`` in a child forked from the fork server and return the JSON answer
    it sends. Raises VetError("resources") when it takes longer than ``wall_seconds`` or dies."""
    ctx = _get_context()
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(sender, *args), daemon=True)
    start = time.monotonic()
    proc.start()
    sender.close()
    try:
        if not receiver.poll(wall_seconds):
            raise VetError("resources", f"{doing} took longer than {wall_seconds:.0f} s")
        try:
            raw = receiver.recv_bytes(MAX_ANSWER_BYTES)
        except EOFError:
            proc.join(5)
            raise VetError(
                "resources",
                f"the {process} process died (exit code {proc.exitcode}) after "
                f"{time.monotonic() - start:.1f} s: the model needs more memory or CPU time than "
                "this server allows, or it crashed the converter",
            ) from None
    finally:
        receiver.close()
        if proc.is_alive():
            proc.kill()
        proc.join(5)
    return json.loads(raw)


def vet_model(path: str, preprocessing: dict | None, limits: WorkerLimits | None = None) -> dict[str, Any]:
    """Parse, check and convert the model at ``path`` in a limited child; return what it learned.

    Raises VetError when the model is refused or a limit was hit.
    """
    limits = limits or WorkerLimits()
    answer = _run_child(
        _child, (path, preprocessing, limits), limits.wall_seconds, "converting the model", "conversion"
    )
    if not answer.get("ok"):
        raise VetError(answer.get("kind", "invalid"), answer.get("error", "the model was refused"))
    return answer


# What an onnxruntime session and its thread add to the child's address space before the graph runs.
DRY_RUN_HEADROOM = 768 << 20


def _dry_child(
    conn: multiprocessing.connection.Connection,
    model_bytes: bytes,
    feeds: dict[str, Any],
    output: str,
    cap: int,
    limits: WorkerLimits,
) -> None:
    address_space = _vm_size() + cap + DRY_RUN_HEADROOM
    _limit_child(address_space, limits.cpu_seconds)
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        # No arena and no planned buffers: what the graph asks for is what is mapped, and freed.
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        options.log_severity_level = 3
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        before = _vm_size("VmRSS")
        try:  # the peak from here on (Linux ≥ 4.0); without it the peak so far, which is only larger
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        session.run([output], feeds)
        answer: dict[str, Any] = {"ok": True, "peak": max(0, _vm_size("VmHWM") - before)}
    except Exception as exc:
        if _out_of_memory(exc, address_space, cap):
            answer = {"ok": False, "kind": "resources", "error": "over the cap"}
        else:
            answer = {"ok": False, "kind": "invalid", "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
    conn.send_bytes(json.dumps(answer).encode())
    conn.close()


def dry_run(
    model_bytes: bytes, feeds: dict[str, Any], output: str, cap: int, limits: WorkerLimits | None = None
) -> int:
    """Run the ONNX graph ``model_bytes`` once on ``feeds`` (numpy arrays) up to ``output`` in a child
    whose address space may grow by ``cap`` bytes (plus a session's headroom), and return the peak
    resident memory the run added. Raises VetError("resources") when the run needs more than ``cap``
    and VetError("invalid") when onnxruntime cannot run the graph on these inputs."""
    limits = limits or WorkerLimits()
    wall = min(limits.wall_seconds, 120.0)
    answer = _run_child(
        _dry_child, (model_bytes, feeds, output, cap, limits), wall, "a dry run of the model", "dry-run"
    )
    if not answer.get("ok"):
        raise VetError(answer.get("kind", "invalid"), answer.get("error", "the dry run failed"))
    return int(answer["peak"])
