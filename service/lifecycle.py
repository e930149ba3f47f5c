"""Graceful shutdown: what ``preimage serve`` does on SIGTERM (and on the first SIGINT).

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
   being streamed, uploads being vetted), then the scheduler and the metrics endpoint stop.

A second signal skips the wait in step 3.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.server import RunningServer

log = logging.getLogger("preimage.server")

POLL_SECONDS = 0.05


def cancel_margin(grace: float) -> float:
    """Seconds before the end of the grace period at which running jobs are cancelled."""
    return min(2.0, 0.25 * grace)


def graceful_stop(running: RunningServer, grace: float, hurry: threading.Event | None = None) -> dict[str, Any]:
    """Drain and stop ``running`` within ``grace`` seconds; returns what happened (also logged)."""
    start = time.monotonic()
    deadline = start + max(0.0, grace)
    runner = running.servicer.runner
    running.health.enter_graceful_shutdown()  # NOT_SERVING now, and set() is ignored from here on
    metrics = getattr(running, "metrics", None)
    if metrics is not None:
        metrics.serving.set(0)
    runner.close("the server is shutting down and accepts no new jobs; retry (another replica will take it)")
    log.info(
        "shutting down",
        extra={"fields": {"grace_s": grace, "rows_running": runner.running_rows(), "jobs_queued": runner.queued()}},
    )
    cancel_at = deadline - cancel_margin(grace)
    while not runner.idle() and time.monotonic() < cancel_at and not (hurry is not None and hurry.is_set()):
        time.sleep(POLL_SECONDS)
    waited = time.monotonic() - start
    cancelled = 0
    if not runner.idle():
        why = (
            "on a second stop signal" if hurry is not None and hurry.is_set() else f"after the {grace:g} s grace period"
        )
        cancelled = runner.cancel_all(
            f"the server is shutting down: the job was cancelled {why}; retry (another replica will take it)"
        )
    running.server.stop(max(0.0, deadline - time.monotonic())).wait()
    runner.shutdown()
    running.servicer.store.close()
    if metrics is not None:
        metrics.stop()
    figures = {"waited_s": round(waited, 3), "cancelled_jobs": cancelled, "seconds": round(time.monotonic() - start, 3)}
    log.info("stopped", extra={"fields": figures})
    return figures
