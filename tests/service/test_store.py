"""The model store: content addressing, atomic visibility, restart, lookup; the LRU cache."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from service.models.store import (
    AmbiguousModel,
    ConvertedCache,
    ModelNotFound,
    ModelProtected,
    ModelRecord,
    ModelStore,
    UploadTooLarge,
)


def _put(store: ModelStore, data: bytes, name: str, bundled: bool = False) -> tuple[ModelRecord, bool]:
    with store.stage() as staged:
        for i in range(0, len(data), 7):
            staged.write(data[i : i + 7])
        sha = staged.finish()
        assert sha == hashlib.sha256(data).hexdigest()
        return store.commit(staged.path, ModelRecord(id=sha, name=name, size_bytes=staged.size, bundled=bundled))


def test_put_get_list_delete_and_restart(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    a, existed = _put(store, b"model a bytes", "alpha")
    assert not existed and store.blob_path(a.id).read_bytes() == b"model a bytes"
    again, existed = _put(store, b"model a bytes", "alpha-again")
    assert existed and again.name == "alpha"  # same bytes, same model
    b, _ = _put(store, b"model b", "beta", bundled=True)
    assert [r.name for r in store.list()] == ["beta", "alpha"]  # bundled first
    assert store.get(a.id) == a and store.get(a.id[:8]) == a and store.get("alpha") == a
    assert not list(store.staging.iterdir())

    reopened = ModelStore(tmp_path)
    assert {r.id for r in reopened.list()} == {a.id, b.id}
    assert reopened.delete("alpha").id == a.id
    assert not reopened.blob_path(a.id).exists()
    with pytest.raises(ModelNotFound, match="no model 'alpha'.*beta"):
        reopened.get("alpha")
    with pytest.raises(ModelProtected):
        reopened.delete("beta")


def test_lookup_errors(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _put(store, b"one", "same")
    _put(store, b"two", "same")
    with pytest.raises(AmbiguousModel, match="use the id"):
        store.get("same")
    with pytest.raises(ModelNotFound, match="no model given"):
        store.get("  ")
    with pytest.raises(ModelNotFound):
        store.get("0123456789abcdef")


def test_interrupted_writes_are_cleaned_on_open(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    a, _ = _put(store, b"kept", "kept")
    staged = store.stage()
    staged.write(b"half an upload")
    orphan = store.blob_path("f" * 64)
    orphan.write_bytes(b"blob without metadata")
    (store.meta / f".{a.id}.json.123.tmp").write_text("{")
    reopened = ModelStore(tmp_path)
    assert [r.id for r in reopened.list()] == [a.id]
    assert not orphan.exists() and not list(reopened.staging.iterdir())
    assert not list(reopened.meta.glob(".*.tmp"))


def test_size_limit(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, max_model_bytes=10)
    with store.stage() as staged, pytest.raises(UploadTooLarge, match="10 bytes"):
        staged.write(b"x" * 11)
    assert not list(store.staging.iterdir())


def test_converted_cache_is_lru_and_converts_once(tmp_path: Path) -> None:
    calls: list[str] = []
    gate = threading.Event()

    def loader(record: ModelRecord) -> str:
        calls.append(record.id)
        gate.wait(5)
        return f"converted {record.id}"

    cache = ConvertedCache(loader, capacity=2)
    recs = [ModelRecord(id=c * 64, name=c, size_bytes=1) for c in "abc"]
    threads = [threading.Thread(target=cache.get, args=(recs[0],)) for _ in range(4)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert calls == [recs[0].id]  # four concurrent requests, one conversion
    cache.get(recs[1])
    cache.get(recs[0])  # a is now the most recent
    cache.get(recs[2])  # evicts b
    assert recs[0].id in cache and recs[2].id in cache and recs[1].id not in cache
