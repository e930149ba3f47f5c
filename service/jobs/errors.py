"""Errors whose gRPC status code is already decided where they are raised.

The job engine, quotas and the server all raise them; service/rpc/errors.py turns them (and the
other exceptions it knows) into statuses.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    """An error with its status code already decided."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def exhausted(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
