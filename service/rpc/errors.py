"""Exceptions → gRPC status codes (DESIGN.md "Conventions"), and the per-RPC wrapper that applies them.

ServiceError (service/jobs/errors.py) carries a code decided where it is raised. Every handler
of the server runs inside ``rpc_handler``: whatever it raises becomes a status with a message
a person can act on, the RPC is logged as one JSON line, and the server keeps serving.
Unexpected exceptions become INTERNAL with a reference to the log line instead of a traceback.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from service.jobs.errors import ServiceError, is_allocation_failure
from service.models.store import AmbiguousModel, ModelNotFound, ModelProtected, UploadTooLarge
from service.models.worker import VetError

log = logging.getLogger("preimage.server")
MAX_STATUS_MESSAGE = 4000  # characters
MAX_LOGGED_FIELD = 300  # characters of one string field of an rpc log line


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status for an exception we know how to explain; None for a bug (→ INTERNAL)."""
    from converters.errors import ModelError  # converters import torch: keep errors.py light to import

    if isinstance(exc, ServiceError):
        return exc.code, exc.message
    if isinstance(exc, ModelNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, ModelProtected):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, UploadTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, VetError):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if exc.kind == "resources" else grpc.StatusCode.INVALID_ARGUMENT
        return code, f"model refused: {exc}"
    if isinstance(exc, (ModelError, AmbiguousModel)):  # includes UnknownTap (lists close names)
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if is_allocation_failure(exc):
        detail = f" ({str(exc)[:300]})" if isinstance(exc, MemoryError) and str(exc) else ""
        return (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"out of memory{detail}: try a smaller image, fewer targets or an earlier tap",
        )
    if isinstance(exc, ValueError):  # the energy's own validation (hyperparameters, targets)
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return None


DOMAIN = "preimage.v1"  # ErrorInfo.domain of every error this server raises
MAX_DETAIL_TEXT = 1000  # characters of a FieldViolation's description (the message says the rest)


@dataclass(frozen=True)
class Details:
    """What a client reads instead of the message: ErrorInfo's reason, BadRequest's field, RetryInfo."""

    reason: str
    field: str | None = None
    retry_after: float | None = None
    metadata: dict[str, str] | None = None


def details_for(exc: BaseException, code: grpc.StatusCode) -> Details:
    """The google.rpc details of an error whose status ``status_for`` decided."""
    from converters.errors import ModelError, UnknownTap

    if isinstance(exc, ServiceError):
        return Details(exc.reason or code.name, exc.field, exc.retry_after)
    if isinstance(exc, ModelNotFound):
        return Details("MODEL_NOT_FOUND", "model")
    if isinstance(exc, AmbiguousModel):
        return Details("MODEL_AMBIGUOUS", "model")
    if isinstance(exc, ModelProtected):
        return Details("MODEL_READ_ONLY", "model")
    if isinstance(exc, UploadTooLarge):
        return Details("TOO_LARGE", "chunk", metadata={"limit": str(exc.limit)})
    if isinstance(exc, VetError):
        return Details("TOO_LARGE" if exc.kind == "resources" else "MODEL_REFUSED")
    if isinstance(exc, UnknownTap):
        return Details("UNKNOWN_TAP", "tap", metadata={"tap": exc.name})
    if isinstance(exc, ModelError):
        return Details("MODEL_REFUSED")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # out of memory
        return Details("OUT_OF_MEMORY", retry_after=5.0)
    return Details(code.name if code != grpc.StatusCode.INTERNAL else "INTERNAL")


def rich_status(code: grpc.StatusCode, message: str, details: Details) -> Any:
    """A grpc.Status whose trailer carries google.rpc.Status with ErrorInfo, BadRequest, RetryInfo."""
    from google.protobuf import duration_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    status = status_pb2.Status(code=code.value[0], message=message)
    # Metadata echoes client text too (an unknown tap's name): bounded like a log field.
    metadata = {k: v[:MAX_LOGGED_FIELD] for k, v in (details.metadata or {}).items()}
    info = error_details_pb2.ErrorInfo(reason=details.reason, domain=DOMAIN, metadata=metadata)
    status.details.add().Pack(info)
    if details.field:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=details.field, description=message[:MAX_DETAIL_TEXT]
        )
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    if details.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(details.retry_after * 1000))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status)


def _fail(context: grpc.ServicerContext, exc: BaseException, fields: dict[str, Any]) -> None:
    if not context.is_active():  # the client cancelled or the deadline passed: nobody to tell
        fields.setdefault("code", "CANCELLED")
        return
    known = status_for(exc)
    if known is None:
        ref = uuid.uuid4().hex[:12]
        log.exception("internal error", extra={"fields": {**fields, "error_ref": ref}})
        code, message = grpc.StatusCode.INTERNAL, f"internal error (reference {ref} in the server log)"
        details = Details("INTERNAL", metadata={"error_ref": ref})
    else:
        code, message = known
        details = details_for(exc, code)
    # Messages echo what the client sent (names, taps); a status message beyond gRPC's 16 KiB
    # metadata cap would reach the client as a bare "Stream removed" instead of this code.
    # Cut before scrubbing too, so the patterns never scan more than a status can carry.
    message = scrub(message[: 2 * MAX_STATUS_MESSAGE])
    if len(message) > MAX_STATUS_MESSAGE:
        message = message[:MAX_STATUS_MESSAGE] + "… (truncated)"
    status, message = bounded_status(code, message, details)
    fields.update(code=code.name, message=message, reason=details.reason)
    context.abort_with_status(status)


# Bytes that the status message (grpc-message) and its rich copy (grpc-status-details-bin) may
# take in the trailer. gRPC clients refuse trailers over their soft limit (8 KiB by default) at
# random and over the hard one always, as "Stream removed" with RESOURCE_EXHAUSTED instead of our
# code; the message is carried twice (plain, and in the details with a field's description), so
# 4000 characters alone could pass 8 KiB.
TRAILER_BUDGET = 6000


def trailer_bytes(status: Any) -> int:
    """What ``status`` (a grpc.Status) puts on the wire in its trailer, less gRPC's own headers:
    the percent-encoded message and the base64 of each binary metadata value."""
    message = sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in status.details.encode("utf-8"))
    binary = sum(4 * -(-len(v) // 3) for k, v in status.trailing_metadata if k.endswith("-bin"))
    return message + binary


def bounded_status(code: grpc.StatusCode, message: str, details: Details) -> tuple[Any, str]:
    """``rich_status`` with the message cut until the trailer fits ``TRAILER_BUDGET``; the status
    and the message it carries."""
    status, full, keep = rich_status(code, message, details), message, len(message)
    while trailer_bytes(status) > TRAILER_BUDGET and keep > 100:
        keep = keep * 2 // 3
        message = full[:keep] + "… (truncated)"
        status = rich_status(code, message, details)
    return status, message


# Directories whose paths are the server's own business (the store): registered at start.
_PRIVATE_DIRS: list[str] = []
# Library internals that reach exception texts: onnxruntime's prefix and C++ source locations and
# signatures, Python file locations of installed packages.
_INTERNALS = [
    (re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : "), ""),
    (re.compile(r"\[enforce fail at [^\]]*\]\s*"), ""),
    # Bounded repeats: the messages echo client text (a 100k-character tap name), and an unbounded
    # [\w.-]+ before a literal would rescan the rest of such a word from every position (quadratic).
    (re.compile(r"(?:[\w.-]{0,255}/){0,32}[\w.-]{1,255}\.(?:cc|cpp|cxx|h|hpp|cu|cuh):\d+\s*"), ""),
    (
        re.compile(
            r"(?:\b\w{1,255}\s+)?\b(?:onnxruntime|onnx|std|c10|at)::"
            r"[\w:<>,\s*&]{0,1000}\([^()]{0,1000}\)\s*(?:const\s*)?"
        ),
        "",
    ),
    (re.compile(r"/[^\s'\"]*/(?:site-packages|dist-packages|lib/python3[\d.]*)/[^\s'\",:)]*"), "<library file>"),
]


def register_private_dir(path: str | Path) -> None:
    """Keep ``path`` (and what lies under it) out of every message clients get."""
    for p in {str(path), os.path.realpath(path)}:
        if p not in _PRIVATE_DIRS:
            _PRIVATE_DIRS.append(p)
    _PRIVATE_DIRS.sort(key=len, reverse=True)


def scrub(message: str) -> str:
    """``message`` without the server's paths and library internals."""
    for d in _PRIVATE_DIRS:
        if d in message:
            message = re.sub(re.escape(d) + r"[^\s'\",:)]*", "<server file>", message)
    for pattern, replacement in _INTERNALS:
        message = pattern.sub(replacement, message)
    return message


def rpc_handler(method: Callable) -> Callable:
    """Wrap a servicer method (unary or server-streaming) with error mapping and a JSON log line."""
    name = method.__name__

    def log_end(context: grpc.ServicerContext, start: float, fields: dict[str, Any]) -> None:
        fields.setdefault("code", "OK" if context.is_active() else "CANCELLED")
        fields["seconds"] = round(time.monotonic() - start, 4)
        for key, value in fields.items():  # names and taps are the client's: keep log lines bounded
            if isinstance(value, str) and len(value) > MAX_LOGGED_FIELD:
                fields[key] = value[:MAX_LOGGED_FIELD] + "…"
        log.info("rpc", extra={"fields": {"method": name, "peer": context.peer(), **fields}})

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start, fields = time.monotonic(), {}
            try:
                yield from method(self, request, context, fields)
            except Exception as exc:
                _fail(context, exc, fields)
            finally:
                log_end(context, start, fields)

        return stream

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        start, fields = time.monotonic(), {}
        try:
            return method(self, request, context, fields)
        except Exception as exc:
            _fail(context, exc, fields)
        finally:
            log_end(context, start, fields)

    return unary


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: int = logging.INFO) -> None:
    """Send the service's logs to stderr as JSON lines (idempotent)."""
    root = logging.getLogger("preimage")
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    root.setLevel(level)
