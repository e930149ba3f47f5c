"""Continuous batching of visualization jobs.

One loop thread owns every ``Minimizer``. Jobs that share a converted graph, a tap, an image size
and a jitter padding join one batch: their rows start at the batch's next step and leave when they
finish or are cancelled, so a short job never waits for a long one (each row keeps its own loss,
hyperparameters, schedule and seeded generators). Several batches take turns, one step each.

Admission: a job is queued (bounded; RESOURCE_EXHAUSTED with a retry hint beyond it) and admitted
into a compatible batch that has room (at most ``max_rows`` rows and ``max_pixels`` pixels per
batch: the pixels stand in for activation memory, which grows with rows × H × W), else into a new
batch while everything running stays under ``max_total_pixels``. A job larger than a batch's
bounds (the request validator already caps it) runs in a batch of its own when there is room.
Pending jobs are admitted round-robin over tenants, so one team's burst does not starve others.

Same contract as the one-job-per-thread runner it replaces: ``submit(job) -> JobHandle`` whose
``events()`` yield progress and results, ``cancel()`` stops within one step.

The loop thread is also the server's one compute owner: every torch operation of the server runs
on it (``call``), between batch steps. With OpenMP, each OS thread that runs a parallel torch
operation keeps a team of worker threads for as long as it lives, and two live teams on one
process made the loop's steps 1.3–1.7× slower on a 2-core CPU once an RPC thread had converted a
model or encoded a target (bench/service_step.py). RPC threads hand the work over and wait.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from service.api.preimage.v1 import preimage_pb2 as pb
from service.energy import Minimizer, Result
from service.energy.minimize import batch_signature, network_rows, padded_rows
from service.jobs.errors import exhausted, invalid, is_allocation_failure, unavailable
from service.jobs.images import contact_sheet, png_bytes
from service.jobs.job import Job, JobHandle, result_message
from service.jobs.limits import SchedulerLimits

# What RetryInfo tells a client refused for a full queue or memory: about the time a few short
# jobs take to leave (they admit continuously), not a promise.
QUEUE_RETRY_SECONDS = 2.0


@dataclass
class _JobState:
    handle: JobHandle
    tenant: str
    parity: float | None
    rows: dict[int, int] = field(default_factory=dict)  # minimizer handle → target index
    results: dict[int, Result] = field(default_factory=dict)
    start: float = field(default_factory=time.monotonic)

    @property
    def job(self) -> Job:
        return self.handle.job


@dataclass
class _Batch:
    key: tuple
    minimizer: Minimizer
    jobs: list[_JobState] = field(default_factory=list)

    def pixels(self, extra_rows: int = 0) -> int:
        """Σ H·W of the images the network runs, with ``extra_rows`` more: the zero rows that pad
        the batch in batch-invariant mode count, since they take activation memory too."""
        mini = self.minimizer
        return padded_rows(mini.network_rows() + extra_rows, mini.row_quantum) * mini.height * mini.width


def _finite(result: Result) -> bool:
    numbers = [result.objective_value, *result.terms.values()]
    return bool(torch.isfinite(result.image).all()) and all(math.isfinite(v) for v in numbers)


def _diverged(job: Job, index: int, result: Result) -> Exception:
    # The model's fault or the settings', not the server's: INVALID_ARGUMENT with what to try.
    return invalid(
        field=f"targets[{index}]" if job.task == "maximize" else f"images[{index}]",
        message=f"target {index} ({job.descriptions[index]}) at tap {job.tap_name!r} became non-finite (NaN/Inf) "
        f"within {result.steps_run} steps: the model's gradient is not finite somewhere on the way to this "
        "tap (sqrt, log or a division at 0?) or the settings diverge (try a smaller learning_rate)",
    )


def batch_key(job: Job) -> tuple:
    """Jobs with equal keys can share one forward/backward."""
    signature = batch_signature(job.problems, job.height, job.width, job.stride)
    return (job.model_id, job.tap_name, str(job.device), *signature)


class Scheduler:
    """Runs jobs in continuously-batched minimizers on one loop thread."""

    def __init__(
        self,
        limits: SchedulerLimits | None = None,
        on_end: Callable[[JobHandle], None] | None = None,
        row_quantum: int = 1,
    ) -> None:
        self.limits = limits or SchedulerLimits()
        self.on_end = on_end
        self.row_quantum = row_quantum  # batches padded to a multiple of it (batch-invariant mode)
        self._cond = threading.Condition()
        self._pending: dict[str, collections.deque[_JobState]] = collections.OrderedDict()
        self._batches: list[_Batch] = []
        self._max_running: dict[str, int] = {}  # per-tenant quota max_concurrent_jobs (latest submit's)
        self._stopped = False
        self._closed: str | None = None  # why new jobs are refused (shutting down), None: open
        self.on_step: Callable[[int], None] | None = None  # images in the batch, after each step (metrics)
        self.steps_run = 0  # batch steps, for metrics and tests
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=1000)
        self._calls: collections.deque[tuple[Future, Callable[[], Any]]] = collections.deque()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    # -- the RPC side ---------------------------------------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the loop thread, between batch steps; its result or its exception.

        Called on the loop thread itself (a call inside a call), it runs at once."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return self.call_soon(fn, *args, **kwargs).result()

    def call_soon(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """``call`` without waiting: the future of ``fn(*args, **kwargs)`` on the loop thread, so the
        caller can report on the work (stage events) while it runs."""
        future: Future = Future()
        with self._cond:
            if self._stopped:
                raise unavailable("the server is shutting down")
            self._calls.append((future, lambda: fn(*args, **kwargs)))
            self._cond.notify()
        return future

    def submit(
        self, job: Job, tenant: str = "", max_running: int | None = None, max_queued: int | None = None
    ) -> JobHandle:
        """Queue a job; raises RESOURCE_EXHAUSTED when the queue is full.

        ``max_running``/``max_queued``: the tenant's quotas. At most ``max_running`` of its jobs are
        admitted at once (the rest wait their turn); a job that would have to wait beyond
        ``max_queued`` is refused, naming the quota.
        """
        parity = self.call(job.parity)  # before the job is queued: a failure refuses nothing else
        with self._cond:
            if self._closed is not None:
                raise unavailable(self._closed)
            if max_running is None:
                self._max_running.pop(tenant, None)
            else:
                self._max_running[tenant] = max_running
            if max_running is not None or max_queued is not None:
                self._check_tenant_quota(tenant, max_running, max_queued)
            queued = sum(len(q) for q in self._pending.values())
            if queued >= self.limits.max_queued:
                raise exhausted(
                    f"server busy: {queued} jobs are waiting (limit {self.limits.max_queued}); retry in a few seconds",
                    reason="QUEUE_FULL",
                    retry_after=QUEUE_RETRY_SECONDS,
                )
            handle = JobHandle(job)
            self._pending.setdefault(tenant, collections.deque()).append(_JobState(handle, tenant, parity))
            self._cond.notify()
        return handle

    def _running(self, tenant: str) -> int:
        return sum(1 for b in self._batches for s in b.jobs if s.tenant == tenant)

    def _check_tenant_quota(self, tenant: str, max_running: int | None, max_queued: int | None) -> None:
        from service.jobs.quotas import quota_error

        if max_running == 0:  # such a job would wait forever
            raise quota_error(tenant, "may not run jobs on this server", "max_concurrent_jobs", 0)
        if max_queued is None:  # only the running cap: extra jobs wait (the server-wide queue bounds them)
            return
        running, waiting = self._running(tenant), len(self._pending.get(tenant, ()))
        free = 0 if max_running is None else max(0, max_running - running)
        if waiting >= max_queued + free:
            cap = f" (quota max_concurrent_jobs={max_running})" if max_running is not None else ""
            what = f"{running} jobs running{cap} and {waiting} waiting"
            raise quota_error(tenant, what, "max_queued_jobs", max_queued)

    def close(self, reason: str) -> None:
        """Refuse new jobs with UNAVAILABLE ``reason`` (graceful shutdown); running ones go on."""
        with self._cond:
            self._closed = reason

    def idle(self) -> bool:
        """No job queued or running."""
        with self._cond:
            return not self._pending and not any(b.jobs for b in self._batches)

    def cancel_all(self, reason: str) -> int:
        """End every queued and running job with UNAVAILABLE ``reason``; returns how many.

        The error is queued before the cancel, so each RPC ends with this status (retryable on
        another replica) rather than a bare CANCELLED; the loop drops the rows at its next step.
        """
        with self._cond:
            states = [s for q in self._pending.values() for s in q] + [s for b in self._batches for s in b.jobs]
        for state in states:
            state.handle.emit("error", unavailable(reason))
            state.handle.cancel()
        with self._cond:
            self._cond.notify()
        return len(states)

    def queued(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._pending.values())

    def running_rows(self) -> int:
        with self._cond:
            return sum(len(b.minimizer) for b in self._batches)

    def shutdown(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=10)
        with self._cond:
            calls = list(self._calls)
            self._calls.clear()
            states = [s for q in self._pending.values() for s in q] + [s for b in self._batches for s in b.jobs]
        for future, _ in calls:
            future.set_exception(unavailable("the server is shutting down"))
            self._pending.clear()
            self._batches.clear()
        for state in states:
            state.handle.cancel()
            self._finish(state)

    # -- the loop -------------------------------------------------------------------------------
    def _admit(self) -> None:
        """Move pending jobs into batches, one per tenant in turn, while they fit. Holds the lock."""
        progress = True
        while progress:
            progress = False
            for tenant in list(self._pending):
                queue = self._pending[tenant]
                state = queue[0]
                limit = self._max_running.get(tenant)
                if state.handle.cancelled:  # cancelled while queued: never starts
                    queue.popleft()
                    self._finish(state)
                elif limit is not None and self._running(tenant) >= limit:
                    pass  # the tenant's quota max_concurrent_jobs: waits for one of its jobs to end
                elif self._place(state):
                    queue.popleft()
                    progress = True
                if not queue:
                    del self._pending[tenant]
                else:  # round-robin: this tenant goes to the back of the line
                    self._pending.move_to_end(tenant)

    def _place(self, state: _JobState) -> bool:
        job = state.job
        key = batch_key(job)
        rows = network_rows(job.problems)
        pixels = padded_rows(rows, self.row_quantum) * job.height * job.width
        batch = next(
            (
                b
                for b in self._batches
                if b.key == key
                and b.minimizer.network_rows() + rows <= self.limits.max_rows
                and b.pixels(extra_rows=rows) <= self.limits.max_pixels
            ),
            None,
        )
        if batch is None:
            running = sum(b.pixels() for b in self._batches)
            if self._batches and running + pixels > self.limits.max_total_pixels:
                return False  # waits until running rows finish
            minimizer = Minimizer(
                job.phi,
                height=job.height,
                width=job.width,
                stride=job.stride,
                mean_rgb255=job.mean_rgb255,
                device=job.device,
                max_jitter=key[-1] + 1,
                row_quantum=self.row_quantum,
                channels=job.channels,
            )
            batch = _Batch(key, minimizer)
            self._batches.append(batch)
        if job.magnitude is not None:  # the same for every job of this model and size
            batch.minimizer.magnitude = job.magnitude
        try:
            for index, problem in enumerate(job.problems):
                # Terms are recorded on the steps that report them (progress or preview), and only those.
                record_every = math.gcd(job.report_every, job.preview_every)
                state.rows[batch.minimizer.add(problem, record_every=record_every)] = index
        except BaseException as exc:  # a problem the minimizer refuses: this job fails alone
            for row in state.rows:
                batch.minimizer.cancel(row)
            state.handle.emit("error", exc)
            self._finish(state)
            return True
        state.start = time.monotonic()
        batch.jobs.append(state)
        return True

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._batches and not self._pending and not self._calls:
                    self._cond.wait()
                if self._stopped:
                    return
                # One handed-over call per round: running jobs keep stepping between conversions.
                call = self._calls.popleft() if self._calls else None
            if call is not None:
                self._run_call(*call)
            with self._cond:
                self._admit()
                batches = list(self._batches)
                if not batches:
                    if call is None and not self._calls:  # everything pending waits for room
                        self._cond.wait(timeout=0.05)
                    continue
            for batch in batches:
                self._step(batch)
            with self._cond:
                self._batches = [b for b in self._batches if len(b.minimizer) or b.jobs]

    @staticmethod
    def _run_call(future: Future, fn: Callable[[], Any]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # the caller's to handle, on its own thread
            future.set_exception(exc)

    def _step(self, batch: _Batch) -> None:
        mini = batch.minimizer
        for state in batch.jobs:
            if state.handle.cancelled:
                for row in state.rows:
                    mini.cancel(row)
        try:
            finished = mini.step()
        except BaseException as exc:  # the whole batch failed (out of memory, a broken graph)
            self._fail_batch(batch, exc)
            return
        self.steps_run += 1
        self.batch_sizes.append(len(mini) + len(finished))
        if self.on_step is not None:
            self.on_step(len(mini) + len(finished))
        owner = {row: state for state in batch.jobs for row in state.rows}
        for row, result in finished:
            state = owner.get(row)
            if state is None or state not in batch.jobs:  # refused at admission, or already failed
                continue
            index = state.rows[row]
            if not state.handle.cancelled and not _finite(result):
                self._fail_job(batch, state, _diverged(state.job, index, result))
                continue
            state.results[index] = result
            if not state.handle.cancelled:
                if state.job.report_every and not result.stopped:
                    # The row left the batch at its last step, before _report: report that step here,
                    # so a progress bar ends at total/total (terms: the final ones, on the PNG).
                    state.handle.emit("progress", pb.ProgressEvent(
                        target_index=index, step=result.steps_run, total_steps=result.steps_run,
                        terms=result.terms))  # fmt: skip
                state.handle.emit("result", result_message(state.job, index, result, state.parity))
        for state in batch.jobs:
            state.handle.step = max((r.step for r in mini.rows if r.handle in state.rows), default=state.handle.step)
        self._report(batch)
        for state in [s for s in batch.jobs if len(s.results) == len(s.rows)]:
            batch.jobs.remove(state)
            self._complete(state)

    def _report(self, batch: _Batch) -> None:
        mini = batch.minimizer
        for state in batch.jobs:
            job = state.job
            for row in mini.rows:
                if row.handle not in state.rows or state.handle.cancelled:
                    continue
                report = bool(job.report_every) and row.step % job.report_every == 0
                preview = bool(job.preview_every) and row.step % job.preview_every == 0
                if report or preview:  # progress() syncs with the device: only on reporting steps
                    ev = mini.progress(row.handle)
                    msg = pb.ProgressEvent(
                        target_index=state.rows[row.handle], step=ev.step, total_steps=ev.total, terms=ev.terms
                    )
                    if preview:
                        msg.preview_png = png_bytes(mini.current_image(row.handle))
                    state.handle.emit("progress", msg)

    def _complete(self, state: _JobState) -> None:
        handle, job = state.handle, state.job
        stats = handle.stats
        stats.end_time = time.monotonic()
        stats.steps = max((r.steps_run for r in state.results.values()), default=0)
        stats.cancelled = handle.cancelled
        stats.seconds = stats.end_time - state.start
        if not handle.cancelled:
            summary = pb.RunSummary(
                model_id=job.model_id, tap=job.tap_name, seconds=stats.seconds, device=str(job.device)
            )
            if job.contact_sheet and len(state.results) > 1:
                images = [state.results[i].image_uint8 for i in sorted(state.results)]
                summary.contact_sheet_png = png_bytes(contact_sheet(images))
            handle.emit("summary", summary)
        self._finish(state)

    def _fail_job(self, batch: _Batch, state: _JobState, exc: BaseException) -> None:
        """End one job of a batch with an error; the batch's other jobs go on."""
        for row in state.rows:
            batch.minimizer.cancel(row)
        batch.jobs.remove(state)
        state.handle.emit("error", exc)
        self._finish(state)

    def _fail_batch(self, batch: _Batch, exc: BaseException) -> None:
        if is_allocation_failure(exc):
            exc = exhausted(
                f"out of memory with {len(batch.minimizer)} images in one batch; retry later",
                reason="OUT_OF_MEMORY",
                retry_after=QUEUE_RETRY_SECONDS,
            )
        with self._cond:
            self._batches = [b for b in self._batches if b is not batch]
        for state in batch.jobs:
            state.handle.emit("error", exc)
            self._finish(state)
        batch.jobs.clear()

    def _finish(self, state: _JobState) -> None:
        stats = state.handle.stats
        stats.end_time = stats.end_time or time.monotonic()
        stats.cancelled = state.handle.cancelled
        stats.steps = stats.steps or state.handle.step
        state.handle.finish()
        if self.on_end is not None:
            self.on_end(state.handle)

    def describe(self) -> dict[str, Any]:
        """Queue and batch figures for logs and metrics."""
        with self._cond:
            return {
                "queued": sum(len(q) for q in self._pending.values()),
                "batches": len(self._batches),
                "rows": sum(len(b.minimizer) for b in self._batches),
            }
