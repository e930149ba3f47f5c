"""Exit 0 when the local server answers grpc.health.v1 SERVING, else 1: the container's HEALTHCHECK.

    python -m service.rpc.healthcheck [--address HOST:PORT] [--service NAME] [--timeout S]

The address defaults to $PREIMAGE_ADDRESS with a wildcard host (0.0.0.0, [::]) replaced by
loopback, so the check follows the server's own setting. Imports only grpc (no torch): Docker runs
this every few seconds, it must be cheap. TLS servers (auth.tls_cert) are checked over TLS
without verifying the certificate's name: the check asks whether this process serves, not who it is.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "localhost:50051"


def local_address(address: str) -> str:
    host, _, port = address.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def check(address: str, service: str = "", timeout: float = 5.0, tls_cert: str | None = None) -> str:
    """The serving status name (SERVING, NOT_SERVING, ...), or the gRPC error code's name."""
    if tls_cert:
        with open(tls_cert, "rb") as f:
            credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        # The certificate names the public host, not 127.0.0.1: ask for that name.
        channel = grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", "localhost")])
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as err:
            return err.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default=None, help="default: $PREIMAGE_ADDRESS on loopback")
    parser.add_argument("--service", default="", help='health service name (default "": the whole server)')
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    address = args.address or local_address(os.environ.get("PREIMAGE_ADDRESS", DEFAULT_ADDRESS))
    status = check(address, args.service, args.timeout, os.environ.get("PREIMAGE_AUTH_TLS_CERT") or None)
    print(f"{address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
