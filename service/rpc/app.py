"""The server as a whole: ``start_server`` wires the servicer, auth, health, reflection and metrics
onto a gRPC server; ``RunningServer.stop`` is the one way it stops; ``serve`` runs it until a signal.

Stopping with ``drain=True`` is what ``preimage serve`` does on SIGTERM (and on the first SIGINT).

Order, all within ``ServerConfig.shutdown_grace`` seconds of the signal:

1. Health reports NOT_SERVING for every service, so load balancers (Envoy's gRPC health check,
   Kubernetes probes) stop sending work here. The server keeps answering RPCs meanwhile: health
   checks must see NOT_SERVING, not a closed port, and management calls are cheap.
2. New visualization jobs are refused with UNAVAILABLE (a code clients and Envoy retry on
   another replica); jobs already queued or running go on.
3. When every job has ended, or ``margin`` seconds before the grace period ends, whatever is
   still queued or running is cancelled and its RPC ends with UNAVAILABLE and a message saying
   why. The margin leaves time for the step in flight to end and the statuses to be sent.
4. The gRPC server stops with what is left of the grace period for in-flight RPCs (results
   being streamed, uploads being vetted), then the scheduler, the store, the metrics endpoint stop and the
   kernels' settings (``batch_invariant``) are restored.

A second signal skips the wait in step 3. Without ``drain`` (tests, the CLI's embedded server)
jobs are cancelled at once and the gRPC server gets ``grace`` seconds.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.api.preimage.v1 import preimage_pb2_grpc as pb_grpc
from service.jobs.batch_invariance import use_batch_invariant_kernels
from service.models.seeding import seed_bundled
from service.models.store import ModelStore, default_store_dir
from service.models.worker import warm_up
from service.rpc.auth import AuthInterceptor, check_listen, server_credentials
from service.rpc.config import ServerConfig
from service.rpc.errors import configure_logging
from service.rpc.messages import MAX_MESSAGE_BYTES
from service.rpc.reflection import enable_reflection
from service.rpc.servicer import SERVICE_NAME, PreimageServicer
from service.rpc.streams import StreamGate

log = logging.getLogger("preimage.server")

POLL_SECONDS = 0.05


def cancel_margin(grace: float) -> float:
    """Seconds before the end of the grace period at which running jobs are cancelled."""
    return min(2.0, 0.25 * grace)


@dataclass
class RunningServer:
    """A started server: ``port``, ``servicer``, ``stop()``."""

    server: grpc.Server
    port: int
    servicer: PreimageServicer
    health: health.HealthServicer
    metrics: Any = None  # service.rpc.metrics.Metrics (also /healthz, /readyz) when metrics_port is set
    metrics_port: int | None = None
    gate: StreamGate | None = None  # the long streams' pool, shut down last
    restore_kernels: Callable[[], None] | None = None  # undoes ServerConfig.batch_invariant

    def stop(
        self, grace: float | None = 2.0, *, drain: bool = False, hurry: threading.Event | None = None
    ) -> dict[str, Any]:
        """Stop serving (see the module's docstring); returns what happened (also logged when draining).

        ``drain``: let jobs finish within ``grace`` seconds first; ``hurry`` set cuts that wait short.
        """
        start = time.monotonic()
        scheduler = self.servicer.scheduler
        self.health.enter_graceful_shutdown()  # NOT_SERVING now, and set() is ignored from here on
        if self.metrics is not None:
            self.metrics.draining()  # /readyz 503 and preimage_serving 0 with it; /metrics goes on
        figures: dict[str, Any] = {}
        if drain:
            grace = max(0.0, grace or 0.0)
            deadline = start + grace
            scheduler.close("the server is shutting down and accepts no new jobs; retry (another replica will take it)")
            log.info(
                "shutting down",
                extra={"fields": {"grace_s": grace, "rows_running": scheduler.running_rows(),
                                  "jobs_queued": scheduler.queued()}},  # fmt: skip
            )
            cancel_at = deadline - cancel_margin(grace)
            while not scheduler.idle() and time.monotonic() < cancel_at and not (hurry is not None and hurry.is_set()):
                time.sleep(POLL_SECONDS)
            waited = time.monotonic() - start
            cancelled = 0
            if not scheduler.idle():
                hurried = hurry is not None and hurry.is_set()
                why = "on a second stop signal" if hurried else f"after the {grace:g} s grace period"
                cancelled = scheduler.cancel_all(
                    f"the server is shutting down: the job was cancelled {why}; retry (another replica will take it)"
                )
            self.server.stop(max(0.0, deadline - time.monotonic())).wait()
            scheduler.shutdown()
            figures = {"waited_s": round(waited, 3), "cancelled_jobs": cancelled}
        else:
            scheduler.shutdown()  # running jobs end now, so server.stop does not wait for their streams
            self.server.stop(grace).wait()
        if self.gate is not None:
            self.gate.pool.shutdown(wait=False)
        self.servicer.store.close()
        if self.metrics is not None:
            self.metrics.stop()
        if self.restore_kernels is not None:
            self.restore_kernels()
            self.restore_kernels = None
        if drain:
            figures["seconds"] = round(time.monotonic() - start, 3)
            log.info("stopped", extra={"fields": figures})
        return figures


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # gRPC sets SO_REUSEPORT by default: a second server on a busy port would silently share
        # its traffic (and its clients would see two different stores). Fail loudly instead.
        ("grpc.so_reuseport", 0),
    ]


def start_server(address: str, config: ServerConfig, progress: Callable[[str], None] | None = None) -> RunningServer:
    """Start serving on ``address`` ("host:port"; port 0 picks a free one) and return at once.

    ``progress`` hears what a slow start is doing (the CLI's embedded server prints it)."""
    check_listen(address, config.auth)  # an open server (no tokens) may only listen on loopback
    if config.torch_threads is not None and config.torch_threads < 1:
        raise ValueError(f"torch_threads must be ≥ 1 (or unset for one per core), got {config.torch_threads}")
    if config.metrics_model_labels < 0:
        labels = config.metrics_model_labels
        raise ValueError(f"metrics_model_labels must be ≥ 0 (0: every model is other), got {labels}")
    store = ModelStore(config.store_dir, max_model_bytes=config.max_model_bytes)
    # The conversion fork server starts on the first upload (or a bundled model not yet stored);
    # short-lived embedded servers (the CLI's local commands) never pay for it. serve() warms it.
    if config.seed_bundled:
        # On a thread that ends: a first run exports the bundled models with torch before the
        # compute owner exists, and an OpenMP team lives as long as its thread (jobs/scheduler.py).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="seed") as once:
            once.submit(seed_bundled, store, config.worker_limits, progress).result()
    servicer = PreimageServicer(config, store)
    credentials = server_credentials(config.auth)
    gate = StreamGate(servicer.auth, servicer.streams)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=config.rpc_threads, thread_name_prefix="rpc"),
        options=server_options(),
        interceptors=[AuthInterceptor(servicer.auth), gate],
    )
    pb_grpc.add_PreimageServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    enable_reflection((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        servicer.scheduler.shutdown()
        raise RuntimeError(f"cannot listen on {address}: is another server using that port?")
    metrics, metrics_port = None, None
    if config.metrics_port is not None:
        from service.rpc.metrics import Metrics  # prometheus-client is needed only with metrics on

        metrics = Metrics(
            servicer.scheduler, servicer.store, servicer.cache, servicer.device, config.metrics_model_labels
        )
        try:
            metrics_port = metrics.start(config.metrics_address, config.metrics_port)
        except OSError as exc:  # before gRPC starts: nothing is left serving half a server
            server.stop(0)
            gate.pool.shutdown(wait=False)
            servicer.scheduler.shutdown()
            servicer.store.close()
            where = f"{config.metrics_address}:{config.metrics_port}"
            raise RuntimeError(
                f"cannot serve metrics on {where} ({exc.strerror or exc}): is another server using that port? "
                "Set metrics_port to a free port, 0 for any, or none to turn metrics off"
            ) from None
    restore_kernels = use_batch_invariant_kernels(servicer.device) if config.batch_invariant else None
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    server.start()
    log.info(
        "serving",
        extra={
            "fields": {
                "address": address,
                "port": port,
                "store": str(config.store_dir),
                "device": str(servicer.device),
                "metrics_port": metrics_port,
                "batch_invariant": config.batch_invariant,
                "torch_threads": torch.get_num_threads(),
            }
        },
    )
    return RunningServer(server, port, servicer, health_servicer, metrics, metrics_port, gate, restore_kernels)


def serve(address: str = "localhost:50051", store_dir: str | Path | None = None, **options: Any) -> None:
    """Run the server until SIGINT/SIGTERM: what ``preimage serve`` calls.

    ``store_dir`` defaults to $PREIMAGE_STORE, else ~/.local/share/preimage/store. ``options`` are
    ServerConfig fields (device, scheduler, seed_bundled, ...).
    """
    import os

    configure_logging()
    if store_dir is None:
        store_dir = os.environ.get("PREIMAGE_STORE") or default_store_dir()
    config = ServerConfig(store_dir=Path(store_dir), **options)
    if not address.startswith(("localhost:", "127.0.0.1:", "[::1]:")):
        log.warning(
            "serving without authentication or TLS on a non-local address",
            extra={"fields": {"address": address}},
        )
    warm_up()  # a long-running server: import torch in the conversion fork server now, not on upload 1
    running = start_server(address, config)
    stopped, hurry = threading.Event(), threading.Event()  # first signal: drain; second: cancel jobs now
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: (hurry if stopped.is_set() else stopped).set())
    print(
        f"preimage server listening on {address.rsplit(':', 1)[0]}:{running.port} (store: {config.store_dir})",
        flush=True,
    )
    while not stopped.wait(1.0):
        pass
    running.stop(config.shutdown_grace, drain=True, hurry=hurry)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Run the preimage gRPC server.")
    parser.add_argument("--address", default="localhost:50051")
    parser.add_argument("--store", default=None, help="store directory")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-bundled", action="store_true", help="do not seed the bundled models")
    args = parser.parse_args(argv)
    serve(args.address, args.store, device=args.device, seed_bundled=not args.no_bundled)


if __name__ == "__main__":
    main()
