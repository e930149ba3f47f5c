"""The gRPC server: PreimageService plus grpc.health.v1 and server reflection.

A sync ``grpc.server`` with a thread pool: RPC threads only validate and relay, the optimizations
run on the scheduler's loop thread (service/scheduler.py: continuous batching of compatible
jobs), so a slow job never blocks health checks or
model management. Cancellation and deadlines reach a job through ``context.add_callback`` (called
by gRPC when the RPC ends for any reason) and stop it before its next step.

``start_server`` returns a running server (tests, embedding); ``serve`` is what ``preimage serve``
calls: it seeds the store with the bundled models and blocks until SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import math
import signal
import string
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.api.preimage.v1 import preimage_pb2 as pb
from service.api.preimage.v1 import preimage_pb2_grpc as pb_grpc
from service.auth import (
    AuthConfig,
    Authenticator,
    AuthInterceptor,
    Principal,
    can_read,
    can_write,
    check_listen,
    check_share_list,
    server_credentials,
)
from service.batch_invariance import row_quantum, use_batch_invariant_kernels
from service.convert_worker import WorkerLimits, load_requested, vet_model, warm_up
from service.errors import ServiceError, configure_logging, exhausted, invalid, rpc_handler
from service.jobs import JobHandle, JobLimits, JobStats, build_job
from service.quotas import StorageQuotas
from service.scheduler import Scheduler, SchedulerLimits
from service.store import ConvertedCache, ModelRecord, ModelStore

log = logging.getLogger("preimage.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PreimageService"].full_name
MAX_MESSAGE_BYTES = 64 << 20  # one message; uploads stream in chunks, so this bounds images/results
MAX_NAME = 200
MAX_LABELS = 100_000

_CHANNEL_ORDERS = {pb.CHANNEL_ORDER_RGB: "RGB", pb.CHANNEL_ORDER_BGR: "BGR", pb.CHANNEL_ORDER_GRAY: "GRAY"}
_LAYOUTS = {"NCHW": pb.LAYOUT_NCHW, "NHWC": pb.LAYOUT_NHWC}
_DTYPES = {"float32": pb.INPUT_DTYPE_FLOAT32, "float16": pb.INPUT_DTYPE_FLOAT16}


@dataclass(frozen=True)
class FinishedJob:
    """What the server remembers of a finished job."""

    task: str
    model_id: str
    tap: str
    stats: JobStats


@dataclass
class ServerConfig:
    """Everything a deployment may tune; defaults suit one CPU box."""

    store_dir: Path
    device: str | None = None  # None: cuda when available, else cpu
    rpc_threads: int = 16
    # Threads of the optimizations' tensor operations; None: torch's default, one per core. Split the
    # cores when replicas or other jobs share the box: oversubscribed threads wait on each other at
    # every operator (2 processes × 2 threads on 2 cores made 17 ms steps take 1.7–2.6 s).
    torch_threads: int | None = None
    scheduler: SchedulerLimits = field(default_factory=SchedulerLimits)  # batch bounds, queue length
    converted_cache_size: int = 4
    max_model_bytes: int = 1 << 30
    job_limits: JobLimits = field(default_factory=JobLimits)
    worker_limits: WorkerLimits = field(default_factory=WorkerLimits)
    seed_bundled: bool = True
    auth: AuthConfig = field(default_factory=AuthConfig)  # tokens, TLS; default: open, loopback only
    metrics_port: int | None = None  # Prometheus /metrics on this HTTP port (0: any free one); None: off
    metrics_address: str = "127.0.0.1"  # the interface /metrics listens on (containers: 0.0.0.0)
    shutdown_grace: float = 30.0  # seconds from SIGTERM to exit: jobs may finish, then are cancelled
    # Results independent of batch composition; on CPU the network runs on batches padded with zero
    # images to a multiple of 4 rows, which costs lone jobs 2.5× (service/batch_invariance.py).
    batch_invariant: bool = False


def _load_converted(store: ModelStore, record: ModelRecord) -> Any:
    # The same call the vetting child made, so the model converts the same way it was vetted.
    # verify=False: the vetting child already checked parity with this exact call.
    return load_requested(store.blob_path(record.id), record.requested_preprocessing, verify=False)


def _requested_preprocessing(msg: pb.Preprocessing) -> dict[str, Any] | None:
    """The uploader's preprocessing as Preprocessing kwargs, or None when nothing was given."""
    given: dict[str, Any] = {}
    for name in ("mean", "std"):
        values = list(getattr(msg, name))
        if values:
            if not all(math.isfinite(v) for v in values):
                raise invalid(f"preprocessing.{name} must be finite numbers, got {values}")
            given[name] = values
    if msg.HasField("scale"):
        if not (math.isfinite(msg.scale) and msg.scale > 0):
            raise invalid(f"preprocessing.scale must be a positive finite number, got {msg.scale}")
        given["scale"] = msg.scale
    if msg.channel_order:
        if msg.channel_order not in _CHANNEL_ORDERS:
            raise invalid(f"preprocessing.channel_order {msg.channel_order} is not a ChannelOrder value")
        given["channel_order"] = _CHANNEL_ORDERS[msg.channel_order]
    for name in ("height", "width"):  # the nominal size of a dynamic-size model
        if msg.HasField(name):
            if getattr(msg, name) == 0:
                raise invalid(f"preprocessing.{name} must be ≥ 1 when given")
            given[name] = getattr(msg, name)
    # Layout and dtype always come from the graph (converters.inputs), so they are not passed on.
    return given or None


def _preprocessing_message(pre: dict[str, Any]) -> pb.Preprocessing:
    order = {v: k for k, v in _CHANNEL_ORDERS.items()}
    msg = pb.Preprocessing(
        mean=pre.get("mean", []),
        std=pre.get("std", []),
        channel_order=order.get(pre.get("channel_order", ""), pb.CHANNEL_ORDER_UNSPECIFIED),
        layout=_LAYOUTS.get(pre.get("layout", ""), pb.LAYOUT_UNSPECIFIED),
        dtype=_DTYPES.get(pre.get("dtype", ""), pb.INPUT_DTYPE_UNSPECIFIED),
    )
    if pre.get("scale") is not None:
        msg.scale = pre["scale"]
    if pre.get("height"):
        msg.height = pre["height"]
    if pre.get("width"):
        msg.width = pre["width"]
    return msg


def model_message(r: ModelRecord) -> pb.Model:
    created = Timestamp()
    created.FromNanoseconds(int(r.created_at * 1e9))
    return pb.Model(
        id=r.id,
        name=r.name,
        size_bytes=r.size_bytes,
        preprocessing=_preprocessing_message(r.preprocessing),
        preprocessing_source=r.preprocessing_source,
        labels=r.labels,
        tap_count=r.tap_count,
        output_tap=r.output_tap,
        bundled=r.bundled,
        created_at=created,
        description=r.description,
        parity=r.parity,
        owner=r.owner,
        shared_with=r.shared_with,
        public=r.public or r.bundled,
    )


def tenant_model_id(tenant: str, content_sha256: str) -> str:
    """A tenant's id for uploaded bytes: the bytes' sha256 on open servers, else scoped to the tenant.

    No deduplication across tenants: a shared id (or "already existed") would tell a team that
    another team holds exactly these bytes.
    """
    if not tenant:
        return content_sha256
    import hashlib

    return hashlib.sha256(f"preimage-tenant\0{tenant}\0{content_sha256}".encode()).hexdigest()


def _check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME or any(c not in string.printable or c in "\t\n\r\x0b\x0c" for c in name):
        raise invalid(f"metadata.name must be 1–{MAX_NAME} printable ASCII characters, got {name[:40]!r}")
    return name


class PreimageServicer(pb_grpc.PreimageServiceServicer):
    """The RPCs. Each handler gets ``fields``: what it adds there goes into the RPC's log line."""

    def __init__(self, config: ServerConfig, store: ModelStore):
        self.config = config
        self.store = store
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cache = ConvertedCache(lambda r: _load_converted(store, r), capacity=config.converted_cache_size)
        quantum = row_quantum(self.device) if config.batch_invariant else 1
        self.runner = Scheduler(config.scheduler, on_end=self._job_ended, row_quantum=quantum)
        self._parity: dict[tuple[str, str], float] = {}
        self._parity_lock = threading.Lock()
        self.auth = Authenticator(config.auth)
        self.storage_quotas = StorageQuotas()
        self._vet_slots = threading.Semaphore(1)  # one conversion child at a time: each can use GBs
        self._check_slots = threading.Semaphore(1)  # one release check at a time (CheckRelease)
        # How recent jobs ended (stats only: a handle would keep the job's tensors alive).
        self.recent_jobs: deque[FinishedJob] = deque(maxlen=64)
        self.jobs_finished = 0

    # -- model management ---------------------------------------------------------------------
    @rpc_handler
    def UploadModel(self, request_iterator: Iterator[pb.UploadModelRequest], context: grpc.ServicerContext, fields):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "metadata":
            raise invalid("the first message of an upload must be `metadata` (name, preprocessing, labels)")
        principal = self._principal(context, fields)
        meta = first.metadata
        name = _check_name(meta.name)
        fields["name"] = name
        shared_with = check_share_list(list(meta.shared_with))
        # Early, only what can never fit (the tenant's whole byte quota): re-sending a model already
        # stored stays idempotent even at the quota, so the count and the room left are checked once
        # the bytes (hence the id) are known, before the expensive vetting.
        quota_cap = principal.quota.max_model_bytes
        if quota_cap is not None and meta.size_bytes > quota_cap:
            self.storage_quotas.check(principal.quota, principal.tenant, [], meta.size_bytes)
        if meta.size_bytes > self.store.max_model_bytes:
            raise exhausted(
                f"the model is {meta.size_bytes} bytes; this server stores models up to "
                f"{self.store.max_model_bytes} bytes"
            )
        if len(meta.labels) > MAX_LABELS:
            raise invalid(f"{len(meta.labels)} labels; at most {MAX_LABELS}")
        requested = _requested_preprocessing(meta.preprocessing)
        with self.store.stage() as staged:
            claimed = None
            for msg in request_iterator:
                part = msg.WhichOneof("part")
                if part == "chunk":
                    if claimed is not None:
                        raise invalid("a chunk arrived after `finish`: finish must be the last message")
                    if quota_cap is not None and staged.size + len(msg.chunk) > quota_cap:
                        # The size may be undeclared: stop receiving what can never fit.
                        self.storage_quotas.check(principal.quota, principal.tenant, [], staged.size + len(msg.chunk))
                    staged.write(msg.chunk)
                elif part == "finish":
                    claimed = msg.finish.sha256.strip().lower()
                else:
                    raise invalid(f"unexpected `{part}` in the middle of an upload: metadata comes only first")
            if claimed is None:
                raise invalid("the upload ended without a `finish` message carrying the sha256 of the bytes")
            actual = staged.finish()
            fields.update(size=staged.size, id=actual)
            if claimed != actual:
                raise invalid(
                    f"checksum mismatch: the server received {staged.size} bytes with sha256 {actual}, "
                    f"the client said {claimed}; the upload was corrupted or incomplete, send it again"
                )
            if staged.size == 0:
                raise invalid("the upload has no bytes: send the ONNX file in `chunk` messages")
            model_id = tenant_model_id(principal.tenant, actual)
            existing = self.store.find(model_id)
            if existing is not None:
                return pb.UploadModelResponse(model=model_message(existing), already_existed=True)
            self.storage_quotas.check(principal.quota, principal.tenant, self.store.list(), staged.size)
            # Wait for a conversion slot, but not for a client that has gone away.
            while not self._vet_slots.acquire(timeout=0.5):
                if not context.is_active():
                    raise invalid("the upload was cancelled while waiting to be converted")
            try:
                answer = vet_model(str(staged.path), requested, self.config.worker_limits)
            finally:
                self._vet_slots.release()
            record = ModelRecord(
                id=model_id,
                name=name,
                size_bytes=staged.size,
                requested_preprocessing=requested,
                preprocessing=answer["preprocessing"],
                preprocessing_source=answer["preprocessing_source"],
                labels=list(meta.labels),
                tap_count=answer["tap_count"],
                output_tap=answer["output_tap"],
                parity=answer["parity"],
                description=meta.description[:2000],
                owner=principal.tenant,
                shared_with=shared_with,
                public=meta.public,
            )
            # Checked again under the tenant's lock: parallel uploads must not both take the last slot.
            with self.storage_quotas.lock(principal.tenant):
                if self.store.find(model_id) is None:
                    self.storage_quotas.check(principal.quota, principal.tenant, self.store.list(), staged.size)
                record, existed = self.store.commit(staged.path, record)
        return pb.UploadModelResponse(model=model_message(record), already_existed=existed)

    @rpc_handler
    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext, fields) -> pb.GetModelResponse:
        fields["model"] = request.model
        return pb.GetModelResponse(model=model_message(self._get(request.model, context, fields)))

    @rpc_handler
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext, fields):
        principal = self._principal(context, fields)
        records = [
            r for r in self.store.list(lambda r: can_read(principal, r)) if r.name.startswith(request.name_prefix)
        ]
        return pb.ListModelsResponse(models=[model_message(r) for r in records])

    @rpc_handler
    def DeleteModel(self, request: pb.DeleteModelRequest, context: grpc.ServicerContext, fields):
        fields["model"] = request.model
        principal = self._principal(context, fields)
        record = self._owned(principal, request.model, context, fields, "delete")
        record = self.store.delete(record.id)
        self.cache.evict(record.id)
        return pb.DeleteModelResponse(model=model_message(record))

    @rpc_handler
    def ListTaps(self, request: pb.ListTapsRequest, context: grpc.ServicerContext, fields) -> pb.ListTapsResponse:
        fields["model"] = request.model
        record = self._get(request.model, context, fields)
        converted = self.cache.get(record)
        pre = converted.preprocessing
        taps = [
            pb.Tap(
                name=t.name,
                alias=t.alias,
                op_type=t.op_type,
                shape=[-1 if d is None else d for d in t.shape],
                stride=t.stride,
                receptive_field=t.receptive_field,
                index=t.index,
                is_global=t.is_global,
            )
            for t in converted.taps
        ]
        from converters.model import NOMINAL_SIZE

        return pb.ListTapsResponse(
            model_id=record.id,
            taps=taps,
            nominal_height=pre.height or NOMINAL_SIZE,
            nominal_width=pre.width or NOMINAL_SIZE,
        )

    # -- visualizations -------------------------------------------------------------------------
    def _visualize(self, task: str, request: Any, context: grpc.ServicerContext, fields, response_cls) -> Iterator:
        fields.update(model=request.model, tap=request.tap, task=task)
        principal = self._principal(context, fields)
        record = self._get(request.model, context, fields)
        converted = self.cache.get(record)
        limits = principal.quota.job_limits(self.config.job_limits)
        try:
            job = build_job(
                task,
                request,
                converted,
                record.id,
                self.device,
                limits,
                parity=lambda tap: self._tap_parity(record.id, converted, tap),
            )
        except ServiceError as exc:
            if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and limits != self.config.job_limits:
                # The limit hit may be the tenant's quota rather than the server's: name them.
                q = principal.quota
                tighter = {"max_image_pixels": q.max_image_pixels, "max_steps": q.max_steps}
                named = ", ".join(f"{k}={v}" for k, v in tighter.items() if v is not None)
                raise exhausted(f"{exc.message} (tenant {principal.tenant!r} quota {named})") from exc
            raise
        fields.update(targets=len(job.problems), size=f"{job.height}x{job.width}")
        quota = principal.quota
        handle = self.runner.submit(
            job, principal.tenant, max_running=quota.max_concurrent_jobs, max_queued=quota.max_queued_jobs
        )
        # Runs when the RPC ends for any reason (client cancel, deadline, completion); cancelling a
        # finished job is a no-op. If the RPC already ended, add_callback returns False.
        if not context.add_callback(handle.cancel):
            handle.cancel()
        for kind, message in handle.events(alive=context.is_active):
            yield response_cls(**{kind: message})
        fields.update(steps=handle.stats.steps)

    @rpc_handler
    def Invert(self, request: pb.InvertRequest, context: grpc.ServicerContext, fields) -> Iterator[pb.InvertResponse]:
        yield from self._visualize("invert", request, context, fields, pb.InvertResponse)

    @rpc_handler
    def Maximize(self, request: pb.MaximizeRequest, context: grpc.ServicerContext, fields):
        yield from self._visualize("maximize", request, context, fields, pb.MaximizeResponse)

    @rpc_handler
    def Caricature(self, request: pb.CaricatureRequest, context: grpc.ServicerContext, fields):
        yield from self._visualize("caricature", request, context, fields, pb.CaricatureResponse)

    @rpc_handler
    def ShareModel(self, request: pb.ShareModelRequest, context: grpc.ServicerContext, fields):
        fields["model"] = request.model
        principal = self._principal(context, fields)
        record = self._owned(principal, request.model, context, fields, "share")
        record.shared_with = check_share_list(list(request.shared_with))
        record.public = request.public
        self.store.update(record)
        return pb.ShareModelResponse(model=model_message(record))

    # -- release checks -------------------------------------------------------------------------
    @rpc_handler
    def CheckRelease(self, request: pb.CheckReleaseRequest, context: grpc.ServicerContext, fields):
        from service.release.stream import check_events

        fields.update(model=request.model, baseline=request.baseline, preset=request.preset or "small", task="check")
        if not request.model:
            raise invalid("CheckRelease needs `model`: the id or name of the release to check")
        record = self._get(request.model, context, fields)
        base = self._get(request.baseline, context, fields) if request.baseline else None
        converted = self.cache.get(record)
        baseline = self.cache.get(base) if base is not None else None
        # A check runs outside the scheduler (many layers, two models): one at a time per server,
        # so a CI burst cannot starve the interactive jobs.
        if not self._check_slots.acquire(blocking=False):
            raise exhausted("a release check is already running on this server; retry in a minute")
        try:
            names = (record.name, base.name if base is not None else None)
            yield from check_events(request, converted, baseline, self.device, names, context.is_active)
        finally:
            self._check_slots.release()

    # -- helpers --------------------------------------------------------------------------------
    def _principal(self, context: grpc.ServicerContext, fields: dict[str, Any]) -> Principal:
        principal = self.auth.authenticate(context.invocation_metadata())
        if principal.tenant:
            fields["tenant"] = principal.tenant
        return principal

    def _owned(
        self, principal: Principal, ref: str, context: grpc.ServicerContext, fields: dict[str, Any], action: str
    ) -> ModelRecord:
        """The model ``ref`` if the caller may change it (delete, share); PERMISSION_DENIED for a model
        it can only read (it already knows that one exists, so saying so leaks nothing)."""
        record = self._get(ref, context, fields)
        if not can_write(principal, record):
            reason = (
                "ships with the server and cannot be changed"
                if record.bundled
                else f"is shared with you read-only; only its owner can {action} it"
            )
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, f"model {record.name!r} ({record.id[:12]}) {reason}")
        return record

    def _get(self, ref: str, context: grpc.ServicerContext, fields: dict[str, Any]) -> ModelRecord:
        """The model ``ref`` names among those the caller may read; others do not exist for it."""
        principal = self._principal(context, fields)
        return self.store.get(ref, lambda r: can_read(principal, r))

    def _tap_parity(self, model_id: str, converted: Any, tap: str) -> float | None:
        key = (model_id, tap)
        with self._parity_lock:
            if key in self._parity:
                return self._parity[key]
        from converters.parity import check_parity

        try:
            value = check_parity(converted, [tap], n_images=1, device=self.device).taps[0].rel_error
        except Exception:  # a parity figure is informative; never fail a visualization over it
            log.warning("parity failed", exc_info=True, extra={"fields": {"model": model_id, "tap": tap}})
            return None
        with self._parity_lock:
            self._parity[key] = value
        return value

    def _job_ended(self, handle: JobHandle) -> None:
        s = handle.stats
        fields = {
            "task": handle.job.task,
            "model": handle.job.model_id,
            "tap": handle.job.tap_name,
            **asdict(s),
        }
        if s.cancel_latency is not None:
            fields["cancel_latency_s"] = round(s.cancel_latency, 4)
            fields["steps_after_cancel"] = s.steps_after_cancel
        log.info("job", extra={"fields": fields})
        with self._parity_lock:
            self.recent_jobs.append(FinishedJob(handle.job.task, handle.job.model_id, handle.job.tap_name, s))
            self.jobs_finished += 1


def seed_bundled(store: ModelStore, worker_limits: WorkerLimits | None = None) -> list[ModelRecord]:
    """Put the bundled models into the store (a no-op for those already there)."""
    try:
        from converters.bundled import bundled_models
    except ImportError:
        log.warning("no bundled models available (converters.bundled missing)")
        return []
    records = []
    for bundled in bundled_models():

        def record_for(sha: str, size: int, b=bundled) -> ModelRecord:
            # Vetted like an upload: same conversion, same figures in the record.
            answer = vet_model(str(b.path), None, worker_limits)
            return ModelRecord(
                id=sha,
                name=b.name,
                size_bytes=size,
                preprocessing=answer["preprocessing"],
                preprocessing_source=answer["preprocessing_source"],
                tap_count=answer["tap_count"],
                output_tap=answer["output_tap"],
                parity=answer["parity"],
                bundled=True,
                description=b.description,
            )

        record, existed = store.add_file(Path(bundled.path), record_for)
        # A new release of a bundled model (different bytes, same name) replaces the old one, so
        # the name keeps resolving to exactly one model.
        for old in store.list():
            if old.bundled and old.name == record.name and old.id != record.id:
                store.delete(old.id, allow_bundled=True)
                log.info("bundled model replaced", extra={"fields": {"name": old.name, "old_id": old.id}})
        log.info("bundled model", extra={"fields": {"name": record.name, "id": record.id, "new": not existed}})
        records.append(record)
    return records


@dataclass
class RunningServer:
    """A started server: ``port``, ``servicer``, ``stop()``."""

    server: grpc.Server
    port: int
    servicer: PreimageServicer
    health: health.HealthServicer
    metrics: Any = None  # service.metrics.Metrics when ServerConfig.metrics_port is set
    metrics_port: int | None = None
    restore_kernels: Callable[[], None] | None = None  # undoes ServerConfig.batch_invariant

    def stop(self, grace: float | None = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.servicer.runner.shutdown()
        self.server.stop(grace).wait()
        if self.metrics is not None:
            self.metrics.stop()
        self.servicer.store.close()
        if self.restore_kernels is not None:
            self.restore_kernels()


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # gRPC sets SO_REUSEPORT by default: a second server on a busy port would silently share
        # its traffic (and its clients would see two different stores). Fail loudly instead.
        ("grpc.so_reuseport", 0),
    ]


def start_server(address: str, config: ServerConfig) -> RunningServer:
    """Start serving on ``address`` ("host:port"; port 0 picks a free one) and return at once."""
    check_listen(address, config.auth)  # an open server (no tokens) may only listen on loopback
    if config.torch_threads is not None and config.torch_threads < 1:
        raise ValueError(f"torch_threads must be ≥ 1 (or unset for one per core), got {config.torch_threads}")
    store = ModelStore(config.store_dir, max_model_bytes=config.max_model_bytes)
    # The conversion fork server starts on the first upload (or a bundled model not yet stored);
    # short-lived embedded servers (the CLI's local commands) never pay for it. serve() warms it.
    if config.seed_bundled:
        seed_bundled(store, config.worker_limits)
    servicer = PreimageServicer(config, store)
    credentials = server_credentials(config.auth)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=config.rpc_threads, thread_name_prefix="rpc"),
        options=server_options(),
        interceptors=[AuthInterceptor(servicer.auth)],
    )
    pb_grpc.add_PreimageServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if port == 0:
        servicer.runner.shutdown()
        raise RuntimeError(f"cannot listen on {address}: is another server using that port?")
    restore_kernels = use_batch_invariant_kernels(servicer.device) if config.batch_invariant else None
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    server.start()
    metrics, metrics_port = None, None
    if config.metrics_port is not None:
        from service.metrics import Metrics  # prometheus-client is needed only with metrics on

        metrics = Metrics(servicer)
        metrics_port = metrics.start(config.metrics_address, config.metrics_port)
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
    return RunningServer(server, port, servicer, health_servicer, metrics, metrics_port, restore_kernels)


def serve(address: str = "localhost:50051", store_dir: str | Path | None = None, **options: Any) -> None:
    """Run the server until SIGINT/SIGTERM: what ``preimage serve`` calls.

    ``store_dir`` defaults to $PREIMAGE_STORE, else ~/.local/share/preimage/store. ``options`` are
    ServerConfig fields (device, scheduler, seed_bundled, ...).
    """
    import os

    configure_logging()
    if store_dir is None:
        store_dir = os.environ.get("PREIMAGE_STORE") or Path.home() / ".local" / "share" / "preimage" / "store"
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
    from service.lifecycle import graceful_stop

    graceful_stop(running, config.shutdown_grace, hurry)


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
