"""Errors whose gRPC status code is already decided where they are raised.

The job engine, quotas and the server all raise them; service/rpc/errors.py turns them (and the
other exceptions it knows) into statuses, with google.rpc details built from the fields here:
``reason`` (ErrorInfo's stable reason, listed in the proto's service comment), ``field`` (the
request field at fault, for BadRequest), ``retry_after`` (seconds, for RetryInfo).
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error with its status code (and its details for clients) already decided."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.field = field
        self.retry_after = retry_after


def invalid(message: str, *, field: str | None = None, reason: str = "INVALID_ARGUMENT") -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, reason=reason, field=field)


def exhausted(
    message: str, *, field: str | None = None, reason: str = "TOO_LARGE", retry_after: float | None = None
) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, message, reason=reason, field=field, retry_after=retry_after
    )


def unavailable(message: str, *, retry_after: float = 1.0) -> ServiceError:
    """The server is shutting down: retry (another replica will take it)."""
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message, reason="SHUTTING_DOWN", retry_after=retry_after)


# What an allocation failure says in each library: numpy and Python raise MemoryError, torch's CPU
# allocator a RuntimeError, CUDA torch.OutOfMemoryError, onnxruntime its own exception types.
_ALLOCATION_FAILURES = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "bad_alloc",
    "bad allocation",
    "failed to allocate",
    "unable to allocate",
)


def is_allocation_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed allocation, from torch, numpy or onnxruntime."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, ServiceError):
        return False
    text = str(exc).lower()
    return any(s in text for s in _ALLOCATION_FAILURES)


def out_of_memory(what: str, detail: str = "") -> ServiceError:
    """RESOURCE_EXHAUSTED for an allocation that failed while doing ``what``."""
    detail = f" ({detail[:300]})" if detail else ""
    return exhausted(
        f"out of memory while {what}{detail}: try a smaller image, fewer targets or an earlier tap",
        reason="OUT_OF_MEMORY",
        retry_after=5.0,
    )
