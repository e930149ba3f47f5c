"""The Exemplars RPC's handler body: reads the header, resolves the model and tap, then relays
service/jobs/exemplars.py's events. Kept apart from servicer.py, which only delegates here."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from service.api.preimage.v1 import preimage_pb2 as pb
from service.jobs.errors import invalid
from service.jobs.exemplars import exemplar_events, start_run
from service.rpc.idle import idle_limited


def _images(requests: Iterator[pb.ExemplarsRequest]) -> Iterator[pb.ExemplarsImage]:
    for msg in requests:
        part = msg.WhichOneof("part")
        if part != "image":
            raise invalid(f"unexpected `{part}` after the header: send the header once, first", field="header")
        yield msg.image


def exemplars_stream(
    servicer: Any, requests: Iterator[pb.ExemplarsRequest], context: grpc.ServicerContext, fields: dict[str, Any]
) -> Iterator[pb.ExemplarsResponse]:
    requests = idle_limited(
        requests,
        servicer.config.upload_idle_seconds,
        what="the Exemplars stream",
        advice="; send the images without pausing",
    )
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
    compute = servicer.scheduler.call  # the server's torch work runs on one thread (Scheduler.call)
    run = compute(start_run, header, converted, servicer.device, limits, labels=list(record.labels))
    fields["targets"] = len(run.targets)
    try:
        yield from exemplar_events(run, _images(requests), alive=context.is_active, submit=servicer.scheduler.call_soon)
    finally:  # in the log line however the call ends: how far a cancelled one got
        fields["images"] = run.seen
