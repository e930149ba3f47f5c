"""Prometheus metrics on their own HTTP port (``ServerConfig.metrics_port``), like Triton's.

Where each figure comes from, and why there:

- RPCs by method and status code: the per-RPC JSON log line (service/rpc/errors.py ``rpc_handler``)
  already carries both, for every RPC and every way it ends; counting those records means the
  logs and the metrics cannot disagree and no handler needs a second hook.
- Jobs by task and outcome, optimization time: the scheduler's ``on_end`` callback, chained
  after the servicer's own.
- Batch sizes and steps: a per-step callback of the scheduler's loop (``Scheduler.on_step``), so
  the histogram sees every step, not a sample of them.
- Queue depth, running images, store size, converted-cache size, GPU memory: read when scraped
  (a collector), so they are current and cost nothing between scrapes.

One metrics endpoint per process: the log handler sees the RPC lines of every server in the
process (tests start several in-process servers, but only one with metrics).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    import torch

    from service.jobs.job import JobHandle
    from service.jobs.scheduler import Scheduler
    from service.models.store import ConvertedCache, ModelStore

STEP_WINDOW_SECONDS = 10.0  # steps_per_second averages over this much recent time
# Optimizations take from well under a second (tiny models, few steps) to many minutes (300+60
# steps of a deep net on a CPU).
JOB_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class _RpcLogHandler(logging.Handler):
    """Counts the ``rpc`` records rpc_handler logs (method, code)."""

    def __init__(self, counter: Counter) -> None:
        super().__init__(level=logging.INFO)
        self.counter = counter

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg != "rpc":
            return
        fields = getattr(record, "fields", None) or {}
        method = fields.get("method")
        if method:
            self.counter.labels(method=method, code=fields.get("code", "UNKNOWN")).inc()


class _Sampled(Collector):
    """Figures read at scrape time from the scheduler, the store and the converted cache."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Any]:
        m = self.m
        described = m.scheduler.describe()
        yield GaugeMetricFamily("preimage_queue_jobs", "Jobs waiting for admission", value=described["queued"])
        yield GaugeMetricFamily("preimage_running_batches", "Batches being optimized", value=described["batches"])
        yield GaugeMetricFamily(
            "preimage_running_images", "Images (rows) being optimized, over all batches", value=described["rows"]
        )
        yield CounterMetricFamily(
            "preimage_batch_steps",
            "Optimization steps of batches (one forward/backward each)",
            value=m.scheduler.steps_run,
        )
        yield GaugeMetricFamily(
            "preimage_steps_per_second",
            f"Batch steps per second over the last {STEP_WINDOW_SECONDS:g} s",
            value=self.m.steps_per_second(),
        )
        records = m.store.list()
        yield GaugeMetricFamily("preimage_store_models", "Models in the (shared) store", value=len(records))
        size = sum(r.size_bytes for r in records)
        yield GaugeMetricFamily("preimage_store_bytes", "Bytes of the models in the (shared) store", value=size)
        yield GaugeMetricFamily(
            "preimage_converted_models", "Converted models in this replica's memory", value=len(list(m.cache))
        )
        yield from self._gpu(m.device)

    @staticmethod
    def _gpu(device: torch.device) -> Iterator[Any]:
        if device.type != "cuda":
            return  # no samples: a CPU replica has no GPU memory to report
        import torch

        labels = [str(device)]
        allocated = GaugeMetricFamily(
            "preimage_gpu_memory_allocated_bytes", "GPU memory held by tensors (torch)", labels=["device"]
        )
        allocated.add_metric(labels, torch.cuda.memory_allocated(device))
        reserved = GaugeMetricFamily(
            "preimage_gpu_memory_reserved_bytes", "GPU memory reserved by torch's caching allocator", labels=["device"]
        )
        reserved.add_metric(labels, torch.cuda.memory_reserved(device))
        free, total = torch.cuda.mem_get_info(device)
        used = GaugeMetricFamily(
            "preimage_gpu_memory_used_bytes", "GPU memory in use by every process (driver)", labels=["device"]
        )
        used.add_metric(labels, total - free)
        yield allocated
        yield reserved
        yield used


class Metrics:
    """The server's metrics: ``start()`` serves them over HTTP, ``stop()`` ends that."""

    def __init__(self, scheduler: Scheduler, store: ModelStore, cache: ConvertedCache, device: torch.device) -> None:
        self.scheduler, self.store, self.cache, self.device = scheduler, store, cache, device
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpcs = Counter(
            "preimage_rpcs", "RPCs that ended, by method and status code", ["method", "code"], registry=r
        )
        self.jobs = Counter(
            "preimage_jobs", "Optimization jobs that ended, by task and outcome", ["task", "outcome"], registry=r
        )
        self.job_seconds = Histogram(
            "preimage_job_seconds",
            "Optimization time of a job, from admission to its last step",
            ["task"],
            buckets=JOB_SECONDS_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "preimage_batch_size", "Images in a batch at each optimization step", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.image_steps = Counter("preimage_image_steps", "Optimization steps summed over images", registry=r)
        self.serving = Gauge("preimage_serving", "1 while accepting work, 0 while shutting down", registry=r)
        self.serving.set(1)
        r.register(_Sampled(self))
        self._steps: collections.deque[float] = collections.deque()
        self._steps_lock = threading.Lock()
        self._handler = _RpcLogHandler(self.rpcs)
        self._http: Any = None
        self._thread: threading.Thread | None = None
        self._hooked = False

    # -- hooks ------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Start counting: the RPC log handler, the scheduler's end-of-job and per-step callbacks."""
        if self._hooked:
            return
        logger = logging.getLogger("preimage.server")
        # rpc_handler logs at INFO; a logger left at the default WARNING would never create the
        # records this handler counts.
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(self._handler)
        scheduler = self.scheduler
        previous_end: Callable[[JobHandle], None] | None = scheduler.on_end

        def on_end(handle: JobHandle) -> None:
            if previous_end is not None:
                previous_end(handle)
            self.job_ended(handle)

        scheduler.on_end = on_end
        scheduler.on_step = self.step
        self._hooked = True

    def job_ended(self, handle: JobHandle) -> None:
        task, stats = handle.job.task, handle.stats
        # The scheduler sets ``seconds`` only for a job that ran to its end; one whose batch failed
        # or that the minimizer refused ends without it.
        outcome = "cancelled" if stats.cancelled else ("completed" if stats.seconds > 0 else "failed")
        self.jobs.labels(task=task, outcome=outcome).inc()
        if outcome == "completed":
            self.job_seconds.labels(task=task).observe(stats.seconds)

    def step(self, rows: int) -> None:
        """Called by the scheduler's loop after every batch step with the batch's image count."""
        self.batch_size.observe(rows)
        self.image_steps.inc(rows)
        now = time.monotonic()
        with self._steps_lock:
            self._steps.append(now)
            while self._steps and self._steps[0] < now - STEP_WINDOW_SECONDS:
                self._steps.popleft()

    def steps_per_second(self) -> float:
        now = time.monotonic()
        with self._steps_lock:
            while self._steps and self._steps[0] < now - STEP_WINDOW_SECONDS:
                self._steps.popleft()
            return len(self._steps) / STEP_WINDOW_SECONDS

    # -- HTTP -------------------------------------------------------------------------------------
    def start(self, address: str, port: int) -> int:
        """Serve /metrics on ``address:port`` (0: a free port); returns the port."""
        self.attach()
        self._http, self._thread = start_http_server(port, addr=address, registry=self.registry)
        return int(self._http.server_port)

    def stop(self) -> None:
        logging.getLogger("preimage.server").removeHandler(self._handler)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
