"""Client streams with an idle limit: a client that stalls between messages must not hold a
stream slot (and its thread) forever."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from service.jobs.errors import ServiceError


def idle_limited(messages: Iterator[Any], idle_seconds: float, *, what: str, advice: str) -> Iterator[Any]:
    """``messages``, ended with DEADLINE_EXCEEDED when none arrives for ``idle_seconds``; the
    message reads "{what} sent nothing for … and was ended{advice}".

    A sync server's request iterator blocks without a timeout, so a reader thread feeds a queue the
    handler waits on with one; when the handler gives up, gRPC ends the call, which ends the read.
    """
    box: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=2)  # the reader stays ≤ 2 messages ahead
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

    threading.Thread(target=read, name="stream-reader", daemon=True).start()
    received = 0
    try:
        while True:
            try:
                kind, value = box.get(timeout=idle_seconds)
            except queue.Empty:
                raise ServiceError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"{what} sent nothing for {idle_seconds:g} s after {received} messages and was ended{advice}",
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
