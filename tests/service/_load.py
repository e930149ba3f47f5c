"""A load generator for the preimage server (tests/service/test_load.py runs it briefly,
bench/load.py for the full ≥ 60 s with ≥ 16 clients).

Each client belongs to a tenant and loops over a random mix of calls: uploads (new small models,
and re-uploads that must say already_existed), ListTaps, ListModels/GetModel, and short
Maximize/Invert jobs. Every answer is checked:

- lost: a job stream that ends without every result and its summary; an acknowledged upload that
  is missing at the end;
- wrong: a result with the wrong count, index, size or description; a model id that is not the
  tenant's id for the bytes sent; a listing that shows another tenant's private model; a repeated
  identical request (same seed) whose image differs by more than one grey level from the first;
- errors: counted by status code; only RESOURCE_EXHAUSTED (queue full, quotas) is allowed.

Resident memory of the server process is sampled once a second.
"""

from __future__ import annotations

import collections
import hashlib
import io
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
from PIL import Image

from service.client import PreimageClient
from service.rpc.servicer import tenant_model_id
from tests._service_models import SIZE, conv_net

ALLOWED = {grpc.StatusCode.RESOURCE_EXHAUSTED}
TAPS = ["conv1", "relu1", "conv2", "relu2", "flatten", "fc"]


@dataclass
class LoadReport:
    seconds: float = 0.0
    clients: int = 0
    calls: collections.Counter = field(default_factory=collections.Counter)
    errors: collections.Counter = field(default_factory=collections.Counter)  # "Kind:CODE" → count
    lost: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    rss_mib: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MiB)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def unexpected_errors(self) -> dict[str, int]:
        allowed = {c.name for c in ALLOWED}
        return {k: v for k, v in self.errors.items() if k.split(":")[1] not in allowed}

    def rss_growth_after_warmup(self, warmup_fraction: float = 0.3) -> tuple[float, float]:
        """(MiB at the end of warm-up, MiB at the end), medians of 3 samples each."""
        samples = [m for t, m in self.rss_mib if t >= warmup_fraction * self.seconds]
        if len(samples) < 6:
            return (float("nan"), float("nan"))
        return statistics.median(samples[:3]), statistics.median(samples[-3:])

    def summary(self) -> str:
        lines = [f"{self.clients} clients, {self.seconds:.0f} s, {sum(self.calls.values())} calls"]
        for kind in sorted(self.calls):
            lat = sorted(self.latencies[kind]) or [float("nan")]
            p50, p95 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.95))]
            lines.append(f"  {kind:<10} {self.calls[kind]:>5} calls  p50 {p50 * 1e3:7.0f} ms  p95 {p95 * 1e3:7.0f} ms")
        lines.append(f"  errors: {dict(self.errors) or 'none'}")
        lines.append(f"  lost: {len(self.lost)}  wrong: {len(self.wrong)}")
        start, end = self.rss_growth_after_warmup()
        lines.append(f"  server RSS after warm-up {start:.0f} MiB → end {end:.0f} MiB ({end - start:+.0f} MiB)")
        return "\n".join(lines)


def _png(seed: int) -> bytes:
    coarse = np.random.default_rng(seed).integers(0, 255, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


class _Shared:
    """What all clients know: uploaded models per tenant, first images of repeated requests."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.models: dict[str, dict[str, bytes]] = collections.defaultdict(dict)  # tenant → id → bytes
        self.private: dict[str, str] = {}  # model id → owner tenant
        self.reference: dict[tuple, np.ndarray] = {}
        self.seeds = iter(range(10_000, 10**9))


def run_load(
    address: str,
    tenants: dict[str, str],
    clients: int = 16,
    seconds: float = 60.0,
    seed: int = 0,
    rss: Callable[[], float] | None = None,
) -> LoadReport:
    """Drive ``clients`` threads (spread over ``tenants``: name → token) for ``seconds``."""
    report, shared, stop = LoadReport(clients=clients), _Shared(), threading.Event()
    names = sorted(tenants)
    start = time.monotonic()

    def sampler() -> None:
        while not stop.wait(1.0):
            if rss is not None:
                report.rss_mib.append((time.monotonic() - start, rss()))

    def client_loop(index: int) -> None:
        tenant = names[index % len(names)]
        rng = random.Random(seed * 1000 + index)
        with PreimageClient(address, timeout=120, token=tenants[tenant] or None) as client:
            while not stop.is_set():
                kind = rng.choices(["upload", "taps", "list", "maximize", "invert"], [1, 3, 2, 3, 2])[0]
                mine = list(shared.models[tenant])
                if kind != "upload" and not mine:
                    kind = "upload"
                t0 = time.monotonic()
                try:
                    _call(kind, client, tenant, rng, shared, report, mine)
                except grpc.RpcError as exc:
                    with report.lock:
                        report.errors[f"{kind}:{exc.code().name}"] += 1
                    if exc.code() in ALLOWED:
                        time.sleep(rng.uniform(0.05, 0.3))  # back off as a polite client would
                    continue
                with report.lock:
                    report.calls[kind] += 1
                    report.latencies[kind].append(time.monotonic() - t0)

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    sample = threading.Thread(target=sampler, daemon=True)
    sample.start()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(180)
        if t.is_alive():
            report.lost.append("a client call never returned")
    report.seconds = time.monotonic() - start
    # Every acknowledged upload is still there, for its tenant.
    for tenant, models in shared.models.items():
        with PreimageClient(address, timeout=60, token=tenants[tenant] or None) as client:
            listed = {m.id for m in client.models()}
        report.lost += [f"upload {mid[:12]} of {tenant}" for mid in models if mid not in listed]
    return report


def _call(
    kind: str,
    client: PreimageClient,
    tenant: str,
    rng: random.Random,
    shared: _Shared,
    report: LoadReport,
    mine: list[str],
) -> None:
    def wrong(text: str) -> None:
        with report.lock:
            report.wrong.append(f"{kind}: {text}")

    if kind == "upload":
        again = mine and rng.random() < 0.3
        if again:
            model_id = rng.choice(mine)
            data = shared.models[tenant][model_id]
        else:
            with shared.lock:
                data = conv_net(seed=next(shared.seeds))
        response = client.upload(data, name=f"{tenant}-{hashlib.sha256(data).hexdigest()[:8]}")
        expected = tenant_model_id(tenant, hashlib.sha256(data).hexdigest())
        if response.model.id != expected:
            wrong(f"id {response.model.id[:12]} for bytes whose id is {expected[:12]}")
        if again and not response.already_existed:
            wrong("a re-upload did not say already_existed")
        with shared.lock:
            shared.models[tenant][response.model.id] = data
            shared.private[response.model.id] = tenant
    elif kind == "taps":
        taps = client.taps(rng.choice(mine))
        if [t.alias for t in taps.taps] != TAPS:
            wrong(f"taps {[t.alias for t in taps.taps]}")
    elif kind == "list":
        listed = client.models()
        with shared.lock:
            foreign = [m.id for m in listed if shared.private.get(m.id, tenant) != tenant]
        if foreign:
            wrong(f"{tenant} sees other tenants' models {[f[:12] for f in foreign]}")
        model_id = rng.choice(mine)
        if client.get(model_id).id != model_id:
            wrong("GetModel answered another model")
    else:
        model_id, tap, seed = rng.choice(mine[:3]), rng.choice(["relu1", "relu2"]), rng.randint(0, 3)
        if kind == "maximize":
            targets = rng.sample(range(8), rng.randint(1, 3))
            run = client.maximize(model_id, tap, targets, seed=seed, steps=3, refine_steps=0, report_every=0)
            descriptions = [f"channel {t}" for t in targets]
            key: tuple = (model_id, tap, seed, tuple(targets))
        else:
            image_seed = rng.randint(0, 2)
            run = client.invert(model_id, tap, [_png(image_seed)], seed=seed, steps=3, refine_steps=0, report_every=0)
            descriptions = ["image 0"]
            key = (model_id, tap, seed, image_seed)
        run.wait()
        if run.summary is None or len(run.results) != len(descriptions):
            with report.lock:
                report.lost.append(
                    f"{kind}: {len(run.results)}/{len(descriptions)} results, summary {run.summary is not None}"
                )
            return
        for i, (result, description) in enumerate(zip(run.results, descriptions, strict=True)):
            if result.target_index != i or result.description != description:
                wrong(f"result {result.target_index} {result.description!r} for target {i} {description!r}")
            pixels = _pixels(result.png)
            if pixels.shape != (SIZE, SIZE, 3):
                wrong(f"image of shape {pixels.shape}")
                continue
            with shared.lock:
                first = shared.reference.setdefault((*key, i), pixels)
            # Same request, same seed: the same image, whatever else shared its batch (one grey
            # level of slack for float summation order in a differently sized batch).
            diff = int(np.abs(first - pixels).max())
            if diff > 1:
                wrong(f"repeat of {key} differs by {diff} grey levels")
