"""Round robin vs model affinity over two real `preimage serve` replicas sharing one store.

    python bench/affinity.py [--rounds 2] [--jobs 8] [--steps 6] [--json bench/results/affinity.json]

Each trial sends ``--jobs`` concurrent single-target Maximize jobs of one model to the replicas,
either round robin (job k to replica k mod 2) or by a consistent hash of the routing header the
client library sets (``x-preimage-model``), the way deploy/envoy.yaml's RING_HASH routes them. The
routing is done here, client side: no Envoy binary exists on the machines this runs on, so this
stands in for the proxy (same key, same idea: a ring of virtual nodes per replica; not Envoy's
xxHash, so which replica a given model lands on differs, but every job of one model lands on one).

Every trial uses a model no replica has converted yet (EfficientNet-Lite0 with a different
doc_string: new bytes, new id; uploaded before the clock starts), so each trial pays the
conversions its routing causes. Trials alternate A/B/A/B in one run. Per trial: wall time from
the first send to the last result, and per replica the jobs served and models converted (from
each replica's /metrics: preimage_jobs_total and preimage_model_conversions_total).
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from converters.bundled import bundled_model_path  # noqa: E402
from service.client import PreimageClient  # noqa: E402
from service.client.library import routing_metadata  # noqa: E402
from tests.deploy._servers import ServerProcess, start  # noqa: E402

VNODES = 160  # virtual nodes per replica on the ring (spreads models evenly over replicas)


class Ring:
    """A consistent-hash ring: a key goes to the first replica point at or after its hash."""

    def __init__(self, replicas: list[str]) -> None:
        points = sorted((_hash(f"{r}#{i}"), r) for r in replicas for i in range(VNODES))
        self.keys = [p for p, _ in points]
        self.owners = [r for _, r in points]

    def pick(self, key: str) -> str:
        i = bisect.bisect_left(self.keys, _hash(key)) % len(self.keys)
        return self.owners[i]


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def scrape(port: int) -> tuple[float, float]:
    """(jobs ended, models converted) of one replica so far."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    jobs = conversions = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "preimage_jobs_total":
                jobs += s.value
            elif s.name == "preimage_model_conversions_total":
                conversions += s.value
    return jobs, conversions


def variant(base: onnx.ModelProto, i: int) -> bytes:
    """The same network with different bytes: a model id of its own, converted afresh."""
    copy = onnx.ModelProto()
    copy.CopyFrom(base)
    copy.doc_string = f"affinity bench trial {i}"
    return copy.SerializeToString()


def trial(
    mode: str,
    model: tuple[str, str],
    servers: list[ServerProcess],
    clients: dict[str, PreimageClient],
    jobs: int,
    steps: int,
) -> dict:
    model_id, tap = model
    addresses = [s.address for s in servers]
    ring = Ring(addresses)
    key = routing_metadata(model_id)[0][1]
    targets = [addresses[k % len(addresses)] if mode == "round_robin" else ring.pick(key) for k in range(jobs)]
    before = {s.address: scrape(s.metrics_port) for s in servers}
    errors: list[BaseException] = []
    barrier = threading.Barrier(jobs + 1)

    def run(k: int) -> None:
        barrier.wait()
        try:
            run = clients[targets[k]].maximize(model_id, tap, [k], steps=steps, refine_steps=0, report_every=steps)
            run.wait()
            assert len(run.results) == 1
        except BaseException as exc:  # reported after the trial
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(jobs)]
    for t in threads:
        t.start()
    barrier.wait()
    start_time = time.monotonic()
    for t in threads:
        t.join()
    wall = time.monotonic() - start_time
    if errors:
        raise RuntimeError(f"{mode}: {len(errors)} jobs failed: {errors[0]!r}")
    after = {s.address: scrape(s.metrics_port) for s in servers}
    per_replica = {
        a: {"jobs": after[a][0] - before[a][0], "conversions": after[a][1] - before[a][1]} for a in addresses
    }
    return {"mode": mode, "wall_s": round(wall, 2), "replicas": list(per_replica.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="A/B pairs")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    base = onnx.load(str(bundled_model_path()))
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        env = {"PREIMAGE_TORCH_THREADS": "1", "PREIMAGE_DEVICE": "cpu"}
        servers = [start(store, env=env), start(store, env=env)]
        clients = {s.address: PreimageClient(s.address, timeout=1800) for s in servers}
        try:
            uploader = clients[servers[0].address]
            models = []
            for i in range(2 * args.rounds):
                uploaded = uploader.upload(variant(base, i), name=f"lite0-{i}").model
                models.append((uploaded.id, uploaded.output_tap))
            # Warm both replicas' torch kernels on a model of its own, outside the figures.
            warm = uploader.upload(variant(base, -1), name="lite0-warm").model
            for s in servers:
                clients[s.address].maximize(warm.id, warm.output_tap, [0], steps=1, refine_steps=0).wait()
            results = []
            for r in range(args.rounds):
                for j, mode in enumerate(("round_robin", "affinity") if r % 2 == 0 else ("affinity", "round_robin")):
                    result = trial(mode, models[2 * r + j], servers, clients, args.jobs, args.steps)
                    results.append(result)
                    print(json.dumps(result), flush=True)
        finally:
            for c in clients.values():
                c.close()
            for s in servers:
                s.terminate()
            for s in servers:
                try:
                    s.proc.wait(timeout=60)
                finally:
                    s.close()
    walls = {m: [r["wall_s"] for r in results if r["mode"] == m] for m in ("round_robin", "affinity")}
    conversions = {
        m: [sum(x["conversions"] for x in r["replicas"]) for r in results if r["mode"] == m] for m in walls
    }
    summary = {
        "jobs": args.jobs,
        "steps": args.steps,
        "rounds": args.rounds,
        "wall_s": walls,
        "conversions_per_trial": conversions,
        "affinity_over_round_robin": round(sum(walls["affinity"]) / sum(walls["round_robin"]), 3),
        "cpus": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "trials": results,
    }
    print(json.dumps(summary, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
