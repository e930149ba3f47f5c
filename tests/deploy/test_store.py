"""One store directory shared by several processes (replicas), without servers: fast and exact.

- Opening the store (a replica starting) never removes another live replica's staged upload; it
  does remove the leftovers of a replica that died.
- Replicas publishing at the same time lose nothing: every model each one committed is listed with
  its bytes, and the same bytes committed by several replicas become one model.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
from pathlib import Path

from service.models.store import ModelRecord, ModelStore

PER_PROCESS = 15


def _commit(store: ModelStore, data: bytes, name: str) -> tuple[ModelRecord, bool]:
    with store.stage() as staged:
        staged.write(data)
        sha = staged.finish()
        return store.commit(staged.path, ModelRecord(id=sha, name=name, size_bytes=staged.size))


def _stage_and_wait(root: str, ready, release) -> None:  # noqa: ANN001 (multiprocessing primitives)
    store = ModelStore(root)
    staged = store.stage()
    staged.write(b"half of an upload")
    ready.set()
    release.wait(60)


def _publish(root: str, worker: int, start, out) -> None:  # noqa: ANN001
    store = ModelStore(root)
    start.wait(60)
    existed = []
    for i in range(PER_PROCESS):
        _commit(store, f"worker {worker} model {i}".encode(), f"w{worker}-{i}")
        # Everyone also publishes the same bytes at about the same moment.
        existed.append(_commit(store, f"shared {i}".encode(), f"shared-{i}-by-{worker}")[1])
    out.put(existed)


def test_opening_the_store_keeps_a_live_replicas_uploads_and_cleans_a_dead_ones(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")  # a separate process, as another replica is
    ready, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_stage_and_wait, args=(str(tmp_path), ready, release))
    other.start()
    try:
        assert ready.wait(60)
        staged = [p for p in (tmp_path / "staging").rglob("upload-*")]
        assert len(staged) == 1
        ModelStore(tmp_path)  # another replica starts while the first is mid-upload
        assert staged[0].exists(), "a starting replica removed a live replica's upload"
        os.kill(other.pid, signal.SIGKILL)  # the first replica dies without cleaning up
        other.join(30)
        mine = ModelStore(tmp_path)
        assert not staged[0].exists() and not staged[0].parent.exists()
        assert sorted((tmp_path / "staging").iterdir()) == sorted([mine.staging, Path(f"{mine.staging}.lock")])
    finally:  # (setting `release` now could hang: its waiter was killed mid-wait)
        if other.is_alive():
            other.kill()
        other.join(30)


def test_replicas_publishing_at_once_lose_nothing(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_publish, args=(str(tmp_path), w, start, out)) for w in range(3)]
    for p in workers:
        p.start()
    start.set()
    existed = [out.get(timeout=120) for _ in workers]
    for p in workers:
        p.join(30)
        assert p.exitcode == 0
    store = ModelStore(tmp_path)
    records = store.list()
    expected = {f"worker {w} model {i}".encode() for w in range(3) for i in range(PER_PROCESS)}
    expected |= {f"shared {i}".encode() for i in range(PER_PROCESS)}
    assert {r.id for r in records} == {hashlib.sha256(d).hexdigest() for d in expected}
    for r in records:
        assert hashlib.sha256(store.blob_path(r.id).read_bytes()).hexdigest() == r.id
    # Each shared model was published exactly once; the other replicas were told it existed.
    for i in range(PER_PROCESS):
        assert sum(not e[i] for e in existed) == 1
    assert not list(tmp_path.rglob(".*.tmp"))
