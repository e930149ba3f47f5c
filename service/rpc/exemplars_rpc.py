"""The Exemplars RPC's handler body: reads the header, resolves the model and tap, then relays
service/jobs/exemplars.py's events. Kept apart from servicer.py, which only delegates here."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from service.api.preimage.v1 import preimage_pb2 as pb
from service.jobs.errors import ServiceError, invalid
from service.jobs.exemplars import exemplar_events, start_run


def _idle_limited(messages: Iterator[Any], idle_seconds: float) -> Iterator[Any]:
    """``messages``, ended with DEADLINE_EXCEEDED when none arrives for ``idle_seconds``: a client
    that stalls between images must not hold a stream slot forever. A sync server's request
    iterator blocks without a timeout, so a reader thread feeds a queue (≤ 2 messages ahead)."""
    box: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=2)
    stopped = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stopped.is_set():
            try:
                box.put(item, timeout=0.5)
                return True
            except queue.Full:
                pass
        return False

    def read() -> None:
        try:
            for m in messages:
                if not put(("message", m)):
                    return
            put(("end", None))
        except BaseException as exc:  # the client cancelled: the handler re-raises it
            put(("error", exc))

    threading.Thread(target=read, name="exemplars-reader", daemon=True).start()
    received = 0
    try:
        while True:
            try:
                kind, value = box.get(timeout=idle_seconds)
            except queue.Empty:
                raise ServiceError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the Exemplars stream sent nothing for {idle_seconds:g} s after {received} messages and "
                    "was ended; send the images without pausing",
                    reason="DEADLINE_EXCEEDED",
                ) from None
            if kind == "end":
                return
            if kind == "error":
                raise value
            received += 1
            yield value
    finally:
        stopped.set()


def _images(requests: Iterator[pb.ExemplarsRequest]) -> Iterator[pb.ExemplarsImage]:
    for msg in requests:
        part = msg.WhichOneof("part")
        if part != "image":
            raise invalid(f"unexpected `{part}` after the header: send the header once, first", field="header")
        yield msg.image


def exemplars_stream(
    servicer: Any, requests: Iterator[pb.ExemplarsRequest], context: grpc.ServicerContext, fields: dict[str, Any]
) -> Iterator[pb.ExemplarsResponse]:
    requests = _idle_limited(requests, servicer.config.upload_idle_seconds)
    first = next(requests, None)
    if first is None or first.WhichOneof("part") != "header":
        raise invalid("the first message of an Exemplars stream must be `header` (model, tap, targets)")
    header = first.header
    fields.update(model=header.model, tap=header.tap, task="exemplars")
    principal = servicer._principal(context, fields)
    record = servicer._get(header.model, context, fields)
    converted = servicer.cache.get(record)
    # The tenant's quota tightens the server's limits, as for the visualizations.
    limits = principal.quota.job_limits(servicer.config.job_limits)
    run = start_run(header, converted, servicer.device, limits)
    fields["targets"] = len(run.targets)
    try:
        yield from exemplar_events(run, _images(requests), alive=context.is_active)
    finally:  # in the log line however the call ends: how far a cancelled one got
        fields["images"] = run.seen
