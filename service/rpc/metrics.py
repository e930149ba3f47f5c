"""Prometheus metrics on their own HTTP port (``ServerConfig.metrics_port``), like Triton's, with
the probes an orchestrator acts on beside them.

Paths: ``/metrics`` (and ``/``) the Prometheus text, 200 also while draining (``preimage_serving
0`` is news a scraper should get); ``/healthz`` 200 while the process answers (liveness: a
draining replica is alive and must not be killed before its grace period); ``/readyz`` 200 only
while gRPC health is SERVING and the server is not draining, else 503 (readiness: take it out of
the Service); any other path 404.

Where each figure comes from, and why there:

- RPCs by method and status code: the per-RPC JSON log line (service/rpc/errors.py ``rpc_handler``)
  already carries both, for every RPC and every way it ends; counting those records means the
  logs and the metrics cannot disagree and no handler needs a second hook.
- Jobs by task, outcome and model, optimization time: the scheduler's ``on_end`` callback, chained
  after the servicer's own. The model label is bounded (``TopModels``): the ``model_labels`` most
  used models by id, every other model "other", so a store of thousands of models cannot turn into
  thousands of series per replica.
- Model conversions (count and seconds): the converted cache's loader, wrapped, so a conversion
  is counted where it happens, whichever RPC caused it.
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
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
OTHER_MODELS = "other"  # the model label of every model outside the top N
METRICS_PATHS = ("/metrics", "/")


class TopModels:
    """The model label of a job: its id while it is among the ``n`` most used models, else "other".

    Uses are counted per model id as jobs end. A model takes a label when it has more uses than the
    least used labelled model, which then gives its label up: ``on_dropped`` hears its id so its
    series can be removed, and its later jobs count under "other". At most ``n`` model labels plus
    "other" exist at any time; a counter series only ever grows while it exists.
    """

    def __init__(self, n: int, on_dropped: Callable[[str], None] | None = None, max_tracked: int | None = None) -> None:
        if n < 0:
            raise ValueError(f"model labels must be ≥ 0, got {n}")
        self.n = n
        self.on_dropped = on_dropped
        # The tally of unlabelled models is bounded too (ids of deleted models would pile up).
        self.max_tracked = max_tracked if max_tracked is not None else max(64, 16 * n)
        self.uses: collections.Counter[str] = collections.Counter()
        self.labelled: set[str] = set()
        self._lock = threading.Lock()

    def use(self, model_id: str) -> str:
        """Count one use of ``model_id``; returns the label to record it under."""
        dropped = None
        with self._lock:
            self.uses[model_id] += 1
            if model_id not in self.labelled and self.n > 0:
                if len(self.labelled) < self.n:
                    self.labelled.add(model_id)
                else:
                    weakest = min(self.labelled, key=lambda m: (self.uses[m], m))
                    if self.uses[model_id] > self.uses[weakest]:
                        self.labelled.discard(weakest)
                        self.labelled.add(model_id)
                        dropped = weakest
            if len(self.uses) > self.max_tracked:
                keep = sorted(self.uses, key=lambda m: (m in self.labelled or m == model_id, self.uses[m]))
                for m in keep[: len(self.uses) - self.max_tracked]:
                    del self.uses[m]
            label = model_id if model_id in self.labelled else OTHER_MODELS
        if dropped is not None and self.on_dropped is not None:
            self.on_dropped(dropped)
        return label


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

    def __init__(
        self,
        scheduler: Scheduler,
        store: ModelStore,
        cache: ConvertedCache,
        device: torch.device,
        model_labels: int = 10,
    ) -> None:
        self.scheduler, self.store, self.cache, self.device = scheduler, store, cache, device
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpcs = Counter(
            "preimage_rpcs", "RPCs that ended, by method and status code", ["method", "code"], registry=r
        )
        self.jobs = Counter(
            "preimage_jobs",
            f"Optimization jobs that ended, by task, outcome and model (the {model_labels} most used; the rest other)",
            ["task", "outcome", "model"],
            registry=r,
        )
        self.job_seconds = Histogram(
            "preimage_job_seconds",
            "Optimization time of a job, from admission to its last step",
            ["task", "model"],
            buckets=JOB_SECONDS_BUCKETS,
            registry=r,
        )
        self.conversions = Counter(
            "preimage_model_conversions", "Models converted to torch by this replica (cache misses)", registry=r
        )
        self.conversion_seconds = Counter(
            "preimage_model_conversion_seconds", "Seconds spent converting models in this replica", registry=r
        )
        # (task, outcome) and task label values each labelled model has series under, to remove them
        self._series: dict[str, set[tuple[str, ...]]] = collections.defaultdict(set)
        self._series_lock = threading.Lock()
        self.models = TopModels(model_labels, on_dropped=self._drop_model)
        self._ready = True
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
        loader = self.cache.loader

        def convert(record: Any) -> Any:
            start = time.monotonic()
            value = loader(record)
            self.conversions.inc()
            self.conversion_seconds.inc(time.monotonic() - start)
            return value

        self.cache.loader = convert
        self._hooked = True

    def job_ended(self, handle: JobHandle) -> None:
        task, stats = handle.job.task, handle.stats
        # The scheduler sets ``seconds`` only for a job that ran to its end; one whose batch failed
        # or that the minimizer refused ends without it.
        outcome = "cancelled" if stats.cancelled else ("completed" if stats.seconds > 0 else "failed")
        model = self.models.use(handle.job.model_id)
        with self._series_lock:
            self.jobs.labels(task=task, outcome=outcome, model=model).inc()
            if outcome == "completed":
                self.job_seconds.labels(task=task, model=model).observe(stats.seconds)
            if model != OTHER_MODELS:
                self._series[model].add((task, outcome))

    def _drop_model(self, model_id: str) -> None:
        """Remove the series of a model that left the top N (its later jobs count as "other")."""
        with self._series_lock:
            for task, outcome in self._series.pop(model_id, set()):
                try:
                    self.jobs.remove(task, outcome, model_id)
                except KeyError:
                    pass
                try:
                    self.job_seconds.remove(task, model_id)
                except KeyError:  # no completed job of that task: no histogram series
                    pass

    # -- readiness ----------------------------------------------------------------------------------
    def draining(self) -> None:
        """The server stops taking work: /readyz 503 and preimage_serving 0 from now on.

        RunningServer.stop calls it where gRPC health turns NOT_SERVING (the only place it does),
        so the two probes cannot disagree."""
        self._ready = False
        self.serving.set(0)

    def ready(self) -> bool:
        return self._ready

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
        """Serve /metrics, /healthz and /readyz on ``address:port`` (0: a free port); returns the port.

        Raises OSError when the port cannot be bound (nothing is started then)."""
        self._http = _HttpServer((address, port), _handler(self))
        self.attach()
        self._thread = threading.Thread(target=self._http.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        return int(self._http.server_port)

    def stop(self) -> None:
        logging.getLogger("preimage.server").removeHandler(self._handler)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True  # a scrape in flight never holds the process at exit
    # SO_REUSEADDR: a restarted server binds while its old sockets linger in TIME_WAIT; on Linux it
    # does not let a second listener share the port, so a busy port still fails loudly.
    allow_reuse_address = True


def _handler(metrics: Metrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path in METRICS_PATHS:
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                ready = metrics.ready()
                self._send(200 if ready else 503, b"ready\n" if ready else b"not ready: draining or not serving\n")
            else:
                self._send(404, b"not found: /metrics, /healthz, /readyz\n")

        def do_HEAD(self) -> None:  # noqa: N802
            self.do_GET()

        def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # a probe every few seconds would drown the JSON log

    return Handler
