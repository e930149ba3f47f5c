"""Long streams get their own threads, and each tenant a bounded number of them.

A sync gRPC server gives one thread to each RPC for its whole life. An upload holds its thread
while it waits for the next chunk, a visualization while its job runs, so a pool shared by every
RPC can be emptied by one tenant's streams, and Health and ListModels then wait behind them.

``StreamGate`` is a server interceptor. Interceptors run on gRPC's polling thread, before any
pool thread is taken, so that is where an open stream is counted: the server's cap
(``stream_threads``) and the tenant's (``tenant_streams``; an open server has no tenants). A
stream over either cap is refused at once with RESOURCE_EXHAUSTED; one within both runs on the stream pool (grpc's
``experimental_thread_pool`` of a behavior), which has a thread for every stream the cap admits.
Short RPCs keep the server's default pool to themselves.

A slot is given back when the handler ends, when gRPC ends the call (``add_callback``), or, for a
call cancelled before its handler started, when gRPC drops the handler (``weakref.finalize``).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from service.jobs.errors import ServiceError, exhausted
from service.rpc.auth import Authenticator, refusing_handler

# The RPCs that may hold their thread for long: client streams (waiting for chunks) and the jobs.
LONG_METHODS = frozenset(
    f"/preimage.v1.PreimageService/{m}"
    for m in ("UploadModel", "Invert", "Maximize", "Caricature", "CheckRelease", "Exemplars")
)


class StreamSlots:
    """Counts of open long streams, for the server and per tenant."""

    def __init__(self, total: int, per_tenant: int) -> None:
        if total < 1 or per_tenant < 1:
            raise ValueError(f"stream_threads and tenant_streams must be ≥ 1, got {total} and {per_tenant}")
        self.total = total
        self.per_tenant = per_tenant
        self._lock = threading.Lock()
        self._open = 0
        self._by_tenant: dict[str, int] = {}

    def take(self, tenant: str) -> Callable[[], None]:
        """A release function for a new slot, or ServiceError(RESOURCE_EXHAUSTED)."""
        with self._lock:
            mine = self._by_tenant.get(tenant, 0)
            # An open server (no tokens) has one caller, "": only the server's cap applies to it.
            if tenant and mine >= self.per_tenant:
                raise exhausted(
                    f"tenant {tenant!r} already has {mine} open streams (uploads, visualizations, release checks), "
                    f"the most allowed (tenant_streams={self.per_tenant}); wait for one to end, or "
                    "cancel stalled ones",
                    reason="QUOTA_EXCEEDED",
                    retry_after=2.0,
                )
            if self._open >= self.total:
                raise exhausted(
                    f"the server has {self._open} open streams, the most it serves at once "
                    f"(stream_threads={self.total}); retry shortly",
                    reason="SERVER_BUSY",
                    retry_after=2.0,
                )
            self._open += 1
            self._by_tenant[tenant] = mine + 1
        done = threading.Event()

        def release() -> None:
            with self._lock:
                if done.is_set():
                    return
                done.set()
                self._open -= 1
                left = self._by_tenant[tenant] - 1
                if left:
                    self._by_tenant[tenant] = left
                else:
                    del self._by_tenant[tenant]

        return release

    def open(self, tenant: str | None = None) -> int:
        """Open streams: of the server, or of one tenant."""
        with self._lock:
            return self._open if tenant is None else self._by_tenant.get(tenant, 0)


class _Gated:
    """A handler's behavior that runs on the stream pool and holds a slot while it runs."""

    def __init__(
        self, behavior: Callable[..., Any], pool: ThreadPoolExecutor, release: Callable[[], None], streaming: bool
    ) -> None:
        self.experimental_thread_pool = pool  # read by grpc._server when it submits the call
        self._behavior = behavior
        self._release = release
        self._streaming = streaming
        weakref.finalize(self, release)

    def __call__(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.add_callback(self._release)
        if self._streaming:
            return self._stream(request, context)
        try:
            return self._behavior(request, context)
        finally:
            self._release()

    def _stream(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from self._behavior(request, context)
        finally:
            self._release()


def _refusing(handler: grpc.RpcMethodHandler, error: ServiceError) -> grpc.RpcMethodHandler:
    from service.rpc.errors import Details, rich_status

    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        details = Details(error.reason or "SERVER_BUSY", retry_after=error.retry_after)
        context.abort_with_status(rich_status(error.code, error.message, details))

    return refusing_handler(handler, abort)


class StreamGate(grpc.ServerInterceptor):
    """Counts long streams before they take a thread, and runs them on their own pool."""

    def __init__(self, authenticator: Authenticator, slots: StreamSlots) -> None:
        self.authenticator = authenticator
        self.slots = slots
        self.pool = ThreadPoolExecutor(max_workers=slots.total, thread_name_prefix="stream")

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or details.method not in LONG_METHODS:
            return handler
        try:
            tenant = self.authenticator.authenticate(details.invocation_metadata).tenant
        except ServiceError:
            return handler  # AuthInterceptor refuses it (it runs after this one returns)
        try:
            release = self.slots.take(tenant)
        except ServiceError as exc:
            return _refusing(handler, exc)
        kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.request_streaming and not handler.response_streaming:
            return grpc.stream_unary_rpc_method_handler(_Gated(handler.stream_unary, self.pool, release, False), **kw)
        if handler.response_streaming and not handler.request_streaming:
            return grpc.unary_stream_rpc_method_handler(_Gated(handler.unary_stream, self.pool, release, True), **kw)
        if handler.request_streaming and handler.response_streaming:  # Exemplars
            return grpc.stream_stream_rpc_method_handler(_Gated(handler.stream_stream, self.pool, release, True), **kw)
        release()
        return handler
