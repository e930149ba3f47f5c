"""CheckRelease over gRPC: run a check in a worker thread and relay it as a stream of events.

Why a thread: ``run_check`` reports progress through a callback, and a gRPC handler can only yield
from its own frame; the queue between them also lets the handler notice a cancelled RPC and stop
the check at its next step (``should_stop``).
"""

from __future__ import annotations

import json
import math
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Any

import torch

from service.api.preimage.v1 import preimage_pb2 as pb
from service.jobs.job import find_tap
from service.release.check import PRESETS, CheckCancelled, Thresholds, run_check, summary
from service.release.report import render_html

HTML_CHUNK = 1 << 20  # 1 MiB per message: far below gRPC's 4 MiB default limit


def thresholds_from(msg: pb.CheckThresholds) -> Thresholds:
    """The request's limits; each must be a finite number ≥ 0 (a ValueError becomes INVALID_ARGUMENT)."""
    given: dict[str, float] = {}
    for name in (f.name for f in fields(Thresholds)):  # the proto mirrors Thresholds field by field
        if msg.HasField(name):
            value = getattr(msg, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"thresholds.{name} must be a finite number ≥ 0, got {value}")
            given[name] = float(value)
    return Thresholds(**given)


def check_events(
    request: pb.CheckReleaseRequest,
    model: Any,
    baseline: Any | None,
    device: torch.device,
    names: tuple[str, str | None],
    alive: Callable[[], bool],
) -> Iterator[pb.CheckReleaseResponse]:
    """Validate the request, run the check, and yield progress, the HTML in chunks, then the report."""
    preset = request.preset or "small"
    if preset not in PRESETS:
        raise ValueError(f"preset {request.preset!r} is not known; choose one of {', '.join(PRESETS)}")
    limits = thresholds_from(request.thresholds)
    for tap in request.taps:
        find_tap(model, tap)  # INVALID_ARGUMENT, close names, before any work starts
    events: queue.Queue = queue.Queue()
    stop = threading.Event()

    def progress(stage: str, done: int, total: int, message: str) -> None:
        events.put(("progress", pb.CheckProgress(stage=stage, done=done, total=total, message=message)))

    def work() -> None:
        try:
            result = run_check(model, baseline, preset=preset, taps=list(request.taps) or None, thresholds=limits,
                               device=device, model_name=names[0], baseline_name=names[1],
                               seed=request.seed if request.HasField("seed") else 0, progress=progress,
                               should_stop=stop.is_set)
            events.put(("done", result))
        except BaseException as exc:  # relayed to the handler, which maps it to a status
            events.put(("error", exc))

    threading.Thread(target=work, name="check-release", daemon=True).start()
    try:
        while True:
            try:
                kind, item = events.get(timeout=0.2)
            except queue.Empty:
                if not alive():
                    return
                continue
            if kind == "progress":
                yield pb.CheckReleaseResponse(progress=item)
            elif kind == "error":
                if isinstance(item, CheckCancelled):
                    return
                raise item
            else:
                page = render_html(item).encode("utf-8")
                for i in range(0, len(page), HTML_CHUNK):
                    yield pb.CheckReleaseResponse(html_chunk=page[i : i + HTML_CHUNK])
                report = pb.CheckReport(ok=item.ok, reasons=item.reasons, summary_json=json.dumps(summary(item)),
                                        html_bytes=len(page))
                yield pb.CheckReleaseResponse(report=report)
                return
    finally:
        stop.set()  # a cancelled or failed RPC stops the check at its next optimization step
