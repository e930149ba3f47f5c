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


def _put_as(store: ModelStore, data: bytes, name: str, owner: str) -> ModelRecord:
    with store.stage() as staged:
        staged.write(data)
        sha = staged.finish()
        return store.commit(staged.path, ModelRecord(id=sha, name=name, size_bytes=staged.size, owner=owner))[0]


def test_versions_of_a_name(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    one, _ = _put(store, b"one", "same")
    two, _ = _put(store, b"two", "same")
    other, _ = _put(store, b"other", "other")
    assert (one.version, two.version, other.version) == (1, 2, 1)
    assert store.get("same") == two and store.get("same:latest") == two
    assert store.get("same:1") == one and store.get("same:previous") == one and store.get(one.id) == one
    with pytest.raises(ModelNotFound, match="no version 3; its versions: 1, 2"):
        store.get("same:3")
    with pytest.raises(ModelNotFound, match="one version"):
        store.get("other:previous")
    again, existed = _put(store, b"one", "renamed")  # identical bytes: the stored model, no new version
    assert existed and (again.name, again.version) == ("same", 1)
    assert [(r.name, r.version) for r in store.list()] == [("other", 1), ("same", 1), ("same", 2)]
    store.delete("same")  # the latest; the name now resolves to the one before, numbers stay
    assert store.get("same") == one
    three, _ = _put(store, b"three", "same")
    assert three.version == 2  # the highest stored number + 1
    # Versions are per owner: two tenants' models of one name are ambiguous for who sees both.
    _put_as(store, b"alice's", "shared-name", "alice")
    _put_as(store, b"bob's", "shared-name", "bob")
    with pytest.raises(AmbiguousModel, match="use the id"):
        store.get("shared-name")
    assert store.get("shared-name", lambda r: r.owner == "bob").owner == "bob"
    assert store.get("shared-name:1", lambda r: r.owner == "alice").owner == "alice"


def test_records_from_before_versions_are_numbered_by_age(tmp_path: Path) -> None:
    import json

    store = ModelStore(tmp_path)
    ids = []
    for i, data in enumerate((b"first", b"second")):
        record, _ = _put(store, data, "old")
        raw = json.loads(store._meta_path(record.id).read_text())
        del raw["version"]  # as an older server wrote it
        raw["created_at"] = 1000.0 + i
        store._meta_path(record.id).write_text(json.dumps(raw))
        ids.append(record.id)
    reopened = ModelStore(tmp_path)
    assert [(r.id, r.version) for r in reopened.list()] == [(ids[0], 1), (ids[1], 2)]
    assert reopened.get("old").id == ids[1] and reopened.find(ids[0]).version == 1
    assert _put(reopened, b"third", "old")[0].version == 3


def test_lookup_errors(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
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
