"""The Python client library (loads grpc and the generated protos, nothing of the server)."""

from service.client.library import (
    CheckRun,
    ErrorDetails,
    PreimageClient,
    Run,
    encode_image,
    energy_params,
    error_details,
    preprocessing,
    run_options,
    target,
)
from service.client.token import with_token

__all__ = [
    "CheckRun",
    "ErrorDetails",
    "PreimageClient",
    "Run",
    "encode_image",
    "energy_params",
    "error_details",
    "preprocessing",
    "run_options",
    "target",
    "with_token",
]
