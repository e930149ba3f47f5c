"""The gRPC server: PreimageService plus grpc.health.v1 and server reflection.

A sync ``grpc.server``; long streams run on a pool of their own, counted per tenant before they
take a thread (service/rpc/streams.py). RPC threads only validate and relay, the optimizations
run on the scheduler's loop thread (service/jobs/scheduler.py: continuous batching of compatible
jobs), so a slow job never blocks health checks or
model management. Cancellation and deadlines reach a job through ``context.add_callback`` (called
by gRPC when the RPC ends for any reason) and stop it before its next step.

``start_server`` returns a running server (tests, embedding); ``serve`` is what ``preimage serve``
calls: it seeds the store with the bundled models and blocks until SIGINT/SIGTERM.
"""

from __future__ import annotations

import logging
import queue
import string
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import grpc
import torch

from service.api.enums import ENERGY_ENUMS
from service.api.preimage.v1 import preimage_pb2 as pb
from service.api.preimage.v1 import preimage_pb2_grpc as pb_grpc
from service.jobs.batch_invariance import row_quantum
from service.jobs.errors import ServiceError, exhausted, invalid
from service.jobs.job import JobHandle, JobStats, prepare_job
from service.jobs.quotas import StorageQuotas
from service.jobs.scheduler import Scheduler
from service.models.dryrun import DryRuns
from service.models.store import ConvertedCache, ModelNotFound, ModelRecord, ModelStore, latest_ids
from service.models.worker import load_requested, vet_model
from service.rpc.auth import (
    Authenticator,
    Principal,
    can_read,
    can_write,
    check_share_list,
    origin_rank,
)
from service.rpc.auth import origin as model_origin
from service.rpc.config import ServerConfig
from service.rpc.errors import register_private_dir, rpc_handler, status_for
from service.rpc.idle import idle_limited
from service.rpc.messages import (
    DEFAULT_CLIENT_LIMIT,
    MAX_MESSAGE_BYTES,
    model_message,
    requested_preprocessing,
    split_large_fields,
)
from service.rpc.statistics import ModelStatistics, device_info, package_version, supported_ops
from service.rpc.streams import StreamSlots

log = logging.getLogger("preimage.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PreimageService"].full_name
MAX_NAME = 200
MAX_LABELS = 100_000



@dataclass(frozen=True)
class FinishedJob:
    """What the server remembers of a finished job."""

    task: str
    model_id: str
    tap: str
    stats: JobStats


def _load_converted(store: ModelStore, record: ModelRecord) -> Any:
    # The same call the vetting child made, so the model converts the same way it was vetted.
    # verify=False: the vetting child already checked parity with this exact call.
    try:
        data = store.blob_path(record.id).read_bytes()
    except FileNotFoundError:  # deleted between the lookup and this first use
        raise ModelNotFound(f"model {record.name!r} ({record.id[:12]}) was deleted") from None
    return load_requested(data, record.requested_preprocessing, verify=False)


def release_memory() -> None:
    """Give freed memory back to the OS: a failed job's tensors would otherwise stay in malloc's
    arenas and count in the server's RSS until reused."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


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
        raise invalid(
            f"metadata.name must be 1–{MAX_NAME} printable ASCII characters, got {name[:40]!r}", field="metadata.name"
        )
    if ":" in name:
        raise invalid(
            f"metadata.name {name[:40]!r} has a ':', which separates a name from its version (NAME:2): "
            "upload under the name alone; each upload of new bytes becomes its next version",
            field="metadata.name",
        )
    return name


def module_paths(taps: list[Any]) -> dict[str, str]:
    """Every torch module path that names a tap → that tap's value name, as ConvertedModel.tap
    resolves them: a path names the last tap computed inside it (taps are in topological order)."""
    out: dict[str, str] = {}
    for t in taps:
        parts = t.module.split(".") if t.module else []
        for i in range(1, len(parts) + 1):
            out.pop(".".join(parts[:i]), None)  # re-insert: the order follows the tap each path names
            out[".".join(parts[:i])] = t.name
    return out


class PreimageServicer(pb_grpc.PreimageServiceServicer):
    """The RPCs. Each handler gets ``fields``: what it adds there goes into the RPC's log line."""

    def __init__(self, config: ServerConfig, store: ModelStore):
        self.config = config
        self.store = store
        register_private_dir(store.root)  # no message a client gets names the store's files
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Conversions run on the scheduler's loop thread, the server's one compute owner.
        self.cache = ConvertedCache(
            lambda r: self.scheduler.call(_load_converted, store, r),
            capacity=config.converted_cache_size,
            max_bytes=config.converted_cache_bytes,
        )
        quantum = row_quantum(self.device) if config.batch_invariant else 1
        self.scheduler = Scheduler(config.scheduler, on_end=self._job_ended, row_quantum=quantum)
        self._parity: dict[tuple[str, str], float] = {}
        self._figures_lock = threading.Lock()  # guards _parity, recent_jobs and jobs_finished
        self.auth = Authenticator(config.auth)
        self.storage_quotas = StorageQuotas()
        self.streams = StreamSlots(config.stream_threads, config.tenant_streams)  # counted by StreamGate
        self._vet_slots = threading.Semaphore(1)  # one conversion child at a time: each can use GBs
        self._check_slots = threading.Semaphore(1)  # one release check at a time (CheckRelease)
        # The memory of graphs that size tensors from their input's shape (their feed made by the owner).
        self.dry_runs = DryRuns(config.worker_limits, compute=self.scheduler.call)
        # How recent jobs ended (stats only: a handle would keep the job's tensors alive).
        self.recent_jobs: deque[FinishedJob] = deque(maxlen=64)
        self.jobs_finished = 0
        self._release_pending = False  # a release_memory is scheduled (guarded by _figures_lock)
        self.statistics = ModelStatistics()  # GetModelStatistics: per model, since this process started

    # -- model management ---------------------------------------------------------------------
    @rpc_handler
    def UploadModel(self, request_iterator: Iterator[pb.UploadModelRequest], context: grpc.ServicerContext, fields):
        request_iterator = idle_limited(
            request_iterator, self.config.upload_idle_seconds, what="the upload",
            advice=" (its bytes were discarded); send the chunks without pausing, and `finish` last",
        )  # fmt: skip
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "metadata":
            raise invalid("the first message of an upload must be `metadata` (name, preprocessing, labels)")
        principal = self._principal(context, fields)
        meta = first.metadata
        name = _check_name(meta.name)
        fields["name"] = name
        if any(r.bundled and r.name == name for r in self.store.list()):
            # A version 2 of a bundled model would take its name from everyone who uses it.
            raise invalid(f"the name {name!r} is a bundled model's: upload under another name", field="metadata.name")
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
        requested = requested_preprocessing(meta.preprocessing)
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
                return self._already_stored(existing, name)
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
        if existed:  # a parallel upload of the same bytes won
            return self._already_stored(record, name)
        return pb.UploadModelResponse(model=self._message(record, principal), already_existed=False)

    def _already_stored(self, record: ModelRecord, name: str) -> pb.UploadModelResponse:
        """Identical bytes: nothing changes, and the note says what the caller got."""
        ref = f"{record.name}:{record.version} ({record.id[:12]})"
        if record.name != name:
            note = (f"these bytes are already stored as {ref}; the name {name!r} was not applied "
                    f"(one model, one name: refer to it as {record.name!r} or by its id)")  # fmt: skip
        else:
            note = f"these bytes are already stored as {ref}; no new version was made"
        # the id is a hash of the tenant and the bytes: the stored copy is the caller's own
        return pb.UploadModelResponse(model=self._message(record, origin="own"), already_existed=True, note=note)

    @rpc_handler
    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext, fields) -> pb.GetModelResponse:
        fields["model"] = request.model
        record = self._get(request.model, context, fields)
        return pb.GetModelResponse(model=self._message(record, self._principal(context, fields)))

    @rpc_handler
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext, fields):
        principal = self._principal(context, fields)
        records = [
            r for r in self.store.list(lambda r: can_read(principal, r)) if r.name.startswith(request.name_prefix)
        ]
        latest = latest_ids(self.store.list())
        models = [model_message(r, r.id in latest, model_origin(principal, r)) for r in records]
        return pb.ListModelsResponse(models=models)

    @rpc_handler
    def DeleteModel(self, request: pb.DeleteModelRequest, context: grpc.ServicerContext, fields):
        fields["model"] = request.model
        principal = self._principal(context, fields)
        record = self._owned(principal, request.model, context, fields, "delete")
        record = self.store.delete(record.id)
        self.cache.evict(record.id)
        return pb.DeleteModelResponse(model=model_message(record, latest=False))

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

        reply = pb.ListTapsResponse(
            model_id=record.id,
            taps=taps,
            nominal_height=pre.height or NOMINAL_SIZE,
            nominal_width=pre.width or NOMINAL_SIZE,
        )
        if request.module_paths:
            reply.module_paths.extend(pb.ModulePath(path=p, tap=t) for p, t in module_paths(converted.taps).items())
        return reply

    # -- visualizations -------------------------------------------------------------------------
    def _visualize(self, task: str, request: Any, context: grpc.ServicerContext, fields, response_cls) -> Iterator:
        fields.update(model=request.model, tap=request.tap, task=task)
        principal = self._principal(context, fields)
        record = self._get(request.model, context, fields)
        start, code = time.monotonic(), "OK"
        try:
            yield from self._run_job(task, request, context, fields, response_cls, principal, record)
        except BaseException as exc:  # counted, then the same exception goes on to rpc_handler
            known = status_for(exc) if isinstance(exc, Exception) else None
            code = known[0].name if known else ("CANCELLED" if not isinstance(exc, Exception) else "INTERNAL")
            raise
        finally:
            if code == "OK" and not context.is_active():
                code = "CANCELLED"
            if code in ("RESOURCE_EXHAUSTED", "INTERNAL"):  # the failures that may leave memory behind
                self._release_memory_soon()
            self.statistics.record(record.id, task, code, int(fields.get("steps", 0)), time.monotonic() - start)

    def _run_job(self, task, request, context, fields, response_cls, principal: Principal, record: ModelRecord):
        report_stages = request.options.report_stages
        if report_stages and record.id not in self.cache:
            message = f"converting model {record.name} ({record.id[:12]}) to torch: the first call on it in this server"
            yield response_cls(progress=pb.ProgressEvent(stage="converting", message=message))
        converted = self.cache.get(record)
        limits = principal.quota.job_limits(self.config.job_limits)
        # The torch part runs on the compute owner; what it reports on the way (the channel
        # statistics) reaches the client while it runs, not after. None marks its end.
        stages: queue.SimpleQueue[pb.ProgressEvent | None] = queue.SimpleQueue()
        try:
            materialize = prepare_job(
                task,
                request,
                converted,
                record.id,
                self.device,
                limits,
                parity=lambda tap: self._tap_parity(record.id, converted, tap),
                measure=lambda tap, h, w, cap: self.dry_runs.peak(record.id, converted, tap, h, w, cap),
                stats_dir=self.store.stats_dir(record.id),
                on_stage=(lambda stage, message: stages.put(pb.ProgressEvent(stage=stage, message=message)))
                if report_stages
                else None,
            )
            future = self.scheduler.call_soon(materialize)
            future.add_done_callback(lambda _: stages.put(None))
            while (event := stages.get()) is not None:
                yield response_cls(progress=event)
            job = future.result()
        except ServiceError as exc:
            if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and limits != self.config.job_limits:
                # The limit hit may be the tenant's quota rather than the server's: name them.
                q = principal.quota
                tighter = {"max_image_pixels": q.max_image_pixels, "max_steps": q.max_steps}
                named = ", ".join(f"{k}={v}" for k, v in tighter.items() if v is not None)
                raise exhausted(
                    f"{exc.message} (tenant {principal.tenant!r} quota {named})",
                    reason="QUOTA_EXCEEDED",
                    field=exc.field,
                ) from exc
            raise
        fields.update(targets=len(job.problems), size=f"{job.height}x{job.width}")
        quota = principal.quota
        handle = self.scheduler.submit(
            job, principal.tenant, max_running=quota.max_concurrent_jobs, max_queued=quota.max_queued_jobs
        )
        # Runs when the RPC ends for any reason (client cancel, deadline, completion); cancelling a
        # finished job is a no-op. If the RPC already ended, add_callback returns False.
        if not context.add_callback(handle.cancel):
            handle.cancel()
        for kind, message in handle.events(alive=context.is_active):
            for part, piece in split_large_fields(kind, message):
                yield response_cls(**{part: piece})
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
    def Exemplars(self, request_iterator: Iterator[pb.ExemplarsRequest], context: grpc.ServicerContext, fields):
        from service.rpc.exemplars_rpc import exemplars_stream

        yield from exemplars_stream(self, request_iterator, context, fields)

    @rpc_handler
    def ShareModel(self, request: pb.ShareModelRequest, context: grpc.ServicerContext, fields):
        fields["model"] = request.model
        principal = self._principal(context, fields)
        record = self._owned(principal, request.model, context, fields, "share")
        record.shared_with = check_share_list(list(request.shared_with))
        record.public = request.public
        self.store.update(record)
        return pb.ShareModelResponse(model=self._message(record, principal))

    # -- metadata -------------------------------------------------------------------------------
    @rpc_handler
    def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.ServicerContext, fields):
        principal = self._principal(context, fields)
        limits = principal.quota.job_limits(self.config.job_limits)
        auth = self.config.auth
        return pb.GetServerInfoResponse(
            version=package_version(),
            api=pb.DESCRIPTOR.package,
            device=device_info(self.device),
            limits=pb.ServerLimits(
                max_message_bytes=MAX_MESSAGE_BYTES,
                max_sent_message_bytes=DEFAULT_CLIENT_LIMIT,
                max_model_bytes=min(self.store.max_model_bytes, principal.quota.max_model_bytes or 1 << 62),
                max_steps=limits.max_steps,
                max_pixels=limits.max_pixels,
                max_targets=limits.max_targets,
                max_image_bytes=limits.max_image_bytes,
                max_input_pixels=limits.max_input_pixels,
                max_queued_jobs=min(self.config.scheduler.max_queued, principal.quota.max_queued_jobs or 1 << 31),
            ),
            presets=list(ENERGY_ENUMS["preset"]),
            parameterizations=list(ENERGY_ENUMS["parameterization"]),
            optimizers=list(ENERGY_ENUMS["optimizer"]),
            ops=supported_ops(),
            auth=pb.AUTH_MODE_OPEN if auth.open else pb.AUTH_MODE_TOKENS,
            tls=auth.tls_cert is not None,
            mutual_tls=auth.tls_client_ca is not None,
            tenant=principal.tenant,
            batch_invariant=self.config.batch_invariant,
        )

    @rpc_handler
    def GetModelStatistics(self, request: pb.GetModelStatisticsRequest, context: grpc.ServicerContext, fields):
        fields["model"] = request.model
        if request.model:
            records = [self._get(request.model, context, fields)]
        else:
            principal = self._principal(context, fields)
            ran = set(self.statistics.model_ids())
            records = [r for r in self.store.list(lambda r: can_read(principal, r)) if r.id in ran]
        return pb.GetModelStatisticsResponse(
            models=[self.statistics.message(r) for r in records], uptime_seconds=self.statistics.uptime()
        )

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
            raise exhausted(
                "a release check is already running on this server; retry in a minute",
                reason="SERVER_BUSY",
                retry_after=60.0,
            )
        try:
            # NAME:VERSION, so that a report of mynet against mynet:previous says which two it compared.
            names = (f"{record.name}:{record.version}", f"{base.name}:{base.version}" if base is not None else None)
            yield from check_events(request, converted, baseline, self.device, names, context.is_active)
        finally:
            self._check_slots.release()

    # -- helpers --------------------------------------------------------------------------------
    def _release_memory_soon(self) -> None:
        """``release_memory`` once the failed job's traceback (and the tensors its frames hold) is
        gone; at most one pending at a time: a collection holds the GIL and a trim costs page faults."""
        with self._figures_lock:
            if self._release_pending:
                return
            self._release_pending = True

        def run() -> None:
            with self._figures_lock:
                self._release_pending = False
            release_memory()

        threading.Timer(0.5, run).start()

    def _message(self, record: ModelRecord, principal: Principal | None = None, origin: str = "") -> pb.Model:
        """The model as the caller sees it: its origin for ``principal`` (or the ``origin`` given)."""
        if principal is not None:
            origin = model_origin(principal, record)
        return model_message(record, latest=self.store.is_latest(record), origin=origin)

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
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"model {record.name!r} ({record.id[:12]}) {reason}",
                reason="MODEL_READ_ONLY",
                field="model",
            )
        return record

    def _get(self, ref: str, context: grpc.ServicerContext, fields: dict[str, Any]) -> ModelRecord:
        """The model ``ref`` names among those the caller may read; others do not exist for it."""
        principal = self._principal(context, fields)
        return self.store.get(ref, lambda r: can_read(principal, r), origin_rank(principal))

    def _tap_parity(self, model_id: str, converted: Any, tap: str) -> float | None:
        key = (model_id, tap)
        with self._figures_lock:
            if key in self._parity:
                return self._parity[key]
        from converters.parity import check_parity

        try:
            value = check_parity(converted, [tap], n_images=1, device=self.device).taps[0].rel_error
        except Exception:  # a parity figure is informative; never fail a visualization over it
            log.warning("parity failed", exc_info=True, extra={"fields": {"model": model_id, "tap": tap}})
            return None
        with self._figures_lock:
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
        with self._figures_lock:
            self.recent_jobs.append(FinishedJob(handle.job.task, handle.job.model_id, handle.job.tap_name, s))
            self.jobs_finished += 1
