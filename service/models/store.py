"""The model store: ONNX files on disk, content-addressed by sha256, with JSON metadata beside them.

Layout under the store root::

    blobs/<sha256>.onnx   the model bytes, exactly as uploaded
    meta/<sha256>.json    a ModelRecord; a model exists (is listed) iff this file exists
    stats/<sha256>/       what was measured on the model and can be reused: the channel
                          statistics M_k per tap and size (service.jobs.reference)
    staging/<replica>/    uploads being received, one folder per server process
    staging/<replica>.lock   held (flock) while that process lives
    .lock                 held (flock) while the store is changed

Several server processes (replicas) may share one store directory on one host (a docker volume;
NFSv4 with working locks also does). Every change (commit, update, delete, the start-up cleanup)
holds ``.lock``, so one replica's check-then-publish cannot interleave with another's: two replicas
receiving the same bytes store one model, and the cleanup never takes a blob that another replica
is about to publish for an orphan. Each replica stages into its own folder; the cleanup removes
only folders whose owner is gone (their lock can be taken). Converted graphs live in each
replica's memory (``ConvertedCache``); nothing converted is shared.

Every file is written to a temporary name, fsynced and renamed into place, then the directory is
fsynced, so a crash leaves either the old state or the new one. The metadata is written last
(and removed first on delete), so a listed model always has its bytes; blobs without metadata
are orphans of an interrupted write and are removed when the store opens.

``ConvertedCache`` keeps the most recently used converted models in memory (LRU): converting a
model takes seconds, a visualization request should not pay that every time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MIN_PREFIX = 8


def default_store_dir() -> Path:
    """Where a store lives when nothing names one (the CLI's and the server's default)."""
    return Path.home() / ".local" / "share" / "preimage" / "store"


class StoreError(Exception):
    """Base of the store's errors; messages are meant for the person calling the service."""


class ModelNotFound(StoreError, KeyError):
    def __str__(self) -> str:
        return self.args[0]


class AmbiguousModel(StoreError, ValueError):
    pass


class ModelProtected(StoreError, PermissionError):
    """Bundled models cannot be deleted."""


@dataclass
class ModelRecord:
    """What the store knows about one model (serialized as the JSON metadata file)."""

    id: str  # sha256 hex of the bytes
    name: str
    size_bytes: int
    # What the uploader asked for (None: from the model's metadata/defaults); passed again to
    # load_model on every (re)load so a model converts the same way after a restart.
    requested_preprocessing: dict[str, Any] | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)  # resolved, for display
    preprocessing_source: str = ""
    labels: list[str] = field(default_factory=list)
    tap_count: int = 0
    output_tap: str = ""
    parity: float | None = None  # largest ‖torch − onnxruntime‖/‖onnxruntime‖ over the taps checked at upload
    bundled: bool = False
    description: str = ""
    created_at: float = field(default_factory=time.time)
    # Tenancy (service/rpc/auth.py): the uploading tenant ("" on open servers and for bundled models),
    # who else may read/use it, and whether everyone may.
    owner: str = ""
    shared_with: list[str] = field(default_factory=list)
    public: bool = False
    # Among the owner's models of this name, in upload order (1, 2, ...); set when committed. 0 in
    # records written before versions existed: ``with_versions`` numbers those by creation time.
    version: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelRecord:
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        # Unknown keys are ignored so an older server can read a newer store.
        return cls(**{k: v for k, v in raw.items() if k in known})


VERSION_SUFFIX = re.compile(r"^(?P<name>.+):(?P<version>[0-9]+|latest|previous)$")


def with_versions(records: list[ModelRecord]) -> list[ModelRecord]:
    """``records`` with every version set: records from before versions existed (version 0) are
    numbered by creation time within their owner and name, after any numbered ones."""
    groups: dict[tuple[str, str], list[ModelRecord]] = {}
    for r in records:
        groups.setdefault((r.owner, r.name), []).append(r)
    for group in groups.values():
        legacy = sorted((r for r in group if not r.version), key=lambda r: (r.created_at, r.id))
        used = {r.version for r in group if r.version}
        n = 0
        for r in legacy:
            n += 1
            while n in used:
                n += 1
            r.version = n
    return records


def latest_ids(records: list[ModelRecord]) -> set[str]:
    """Ids of the latest version of each owner's name among ``records``."""
    best: dict[tuple[str, str], ModelRecord] = {}
    for r in records:
        key = (r.owner, r.name)
        if key not in best or r.version > best[key].version:
            best[key] = r
    return {r.id for r in best.values()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class StagedUpload:
    """A file being received chunk by chunk; hashes as it goes. Use as a context manager."""

    def __init__(self, directory: Path, max_bytes: int):
        self.max_bytes = max_bytes
        fd, name = tempfile.mkstemp(dir=directory, prefix="upload-", suffix=".onnx")
        self.path = Path(name)
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        if self.size + len(chunk) > self.max_bytes:
            raise UploadTooLarge(self.max_bytes)
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def finish(self) -> str:
        """Flush to disk; return the sha256 hex of everything written."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._hash.hexdigest()

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> StagedUpload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()  # after a successful put the file has been moved away: nothing to do


class UploadTooLarge(StoreError):
    def __init__(self, limit: int):
        super().__init__(f"the model is larger than this server's limit of {limit} bytes ({limit / 2**20:.0f} MiB)")
        self.limit = limit


class ModelStore:
    """Persistent, content-addressed model files plus metadata. Thread-safe."""

    def __init__(self, root: str | Path, max_model_bytes: int = 1 << 30):
        self.root = Path(root)
        self.max_model_bytes = max_model_bytes
        self.blobs = self.root / "blobs"
        self.meta = self.root / "meta"
        self.staging_root = self.root / "staging"
        self.stats = self.root / "stats"
        for d in (self.blobs, self.meta, self.staging_root, self.stats):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._lock_depth = 0
        self._store_lock_fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        with self._exclusive():
            # Claim a staging folder of our own before cleaning, so the cleanup cannot take it.
            prefix = f"{socket.gethostname()}-{os.getpid()}-"
            self.staging = Path(tempfile.mkdtemp(dir=self.staging_root, prefix=prefix))
            self._staging_lock_fd = os.open(f"{self.staging}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._staging_lock_fd, fcntl.LOCK_EX)
            self._recover()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This process's threads (RLock) and other processes (flock on .lock) wait their turn."""
        with self._lock:
            if self._lock_depth == 0:
                fcntl.flock(self._store_lock_fd, fcntl.LOCK_EX)
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0:
                    fcntl.flock(self._store_lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Give up this replica's staging folder (its leftovers become removable)."""
        with contextlib.suppress(OSError):
            shutil.rmtree(self.staging)
        for name in ("_staging_lock_fd", "_store_lock_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, None)
        with contextlib.suppress(OSError):
            os.unlink(f"{self.staging}.lock")

    def __del__(self) -> None:  # a store object dropped without close() must not look alive forever
        with contextlib.suppress(Exception):  # a half-built object, or interpreter teardown
            self.close()

    def _dead_staging(self) -> Iterator[Path]:
        """Staging folders (and stray files) whose process is gone: their lock can be taken."""
        for entry in self.staging_root.iterdir():
            if entry == self.staging or entry.suffix == ".lock":
                continue
            lock = Path(f"{entry}.lock")
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:  # no lock file: the layout before replicas, or a stray file
                yield entry
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live replica's uploads
            finally:
                os.close(fd)  # closing drops the lock we may have taken
            yield entry

    def _recover(self) -> None:
        """Drop what an interrupted write left behind: staged uploads, temp files, orphan blobs.

        Runs under ``_exclusive``: no replica is between publishing a blob and its metadata, so a
        blob without metadata is an orphan, and a temp file belongs to a write that died.
        """
        for leftover in list(self._dead_staging()):
            with contextlib.suppress(OSError):
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
            with contextlib.suppress(OSError):
                os.unlink(f"{leftover}.lock")
        for directory in (self.blobs, self.meta):
            for tmp in directory.glob(".*.tmp"):
                with contextlib.suppress(OSError):
                    tmp.unlink()
        listed = {p.stem for p in self.meta.glob("*.json")}
        for blob in self.blobs.glob("*.onnx"):
            if blob.stem not in listed:
                with contextlib.suppress(OSError):
                    blob.unlink()
        for measured in self.stats.iterdir():
            if measured.name not in listed:
                shutil.rmtree(measured, ignore_errors=True)

    # -- writing --------------------------------------------------------------------------------
    def stage(self) -> StagedUpload:
        return StagedUpload(self.staging, self.max_model_bytes)

    def blob_path(self, model_id: str) -> Path:
        return self.blobs / f"{model_id}.onnx"

    def stats_dir(self, model_id: str) -> Path:
        """Where measurements of the model are kept (created by their writer)."""
        return self.stats / model_id

    def _meta_path(self, model_id: str) -> Path:
        return self.meta / f"{model_id}.json"

    def commit(self, staged_path: Path, record: ModelRecord) -> tuple[ModelRecord, bool]:
        """Make a staged (already fsynced) file a stored model. Returns (record, already_existed)."""
        if not SHA256_RE.match(record.id):
            raise ValueError(f"not a sha256 id: {record.id!r}")
        with self._exclusive():
            existing = self._read(record.id)
            if existing is not None:
                with contextlib.suppress(FileNotFoundError):
                    staged_path.unlink()
                return self._numbered(existing), True
            if not record.version:  # under the lock: two uploads of one name cannot take one number
                same = [r for r in self._all() if r.owner == record.owner and r.name == record.name]
                record.version = 1 + max((r.version for r in same), default=0)
            os.replace(staged_path, self.blob_path(record.id))
            _fsync_dir(self.blobs)
            atomic_write(self._meta_path(record.id), record.to_json().encode())
            return record, False

    def add_file(self, path: Path, record_for: Callable[[str, int], ModelRecord]) -> tuple[ModelRecord, bool]:
        """Store a copy of a local file (bundled models); ``record_for(sha256, size)`` builds its record."""
        with self.stage() as staged:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    staged.write(block)
            sha = staged.finish()
            existing = self._read(sha)
            if existing is not None:
                return existing, True
            return self.commit(staged.path, record_for(sha, staged.size))

    def update(self, record: ModelRecord) -> None:
        with self._exclusive():
            if self._read(record.id) is None:
                raise ModelNotFound(f"model {record.id} is not in the store")
            atomic_write(self._meta_path(record.id), record.to_json().encode())

    def delete(self, ref: str, allow_bundled: bool = False) -> ModelRecord:
        with self._exclusive():
            record = self.get(ref)
            if record.bundled and not allow_bundled:
                raise ModelProtected(
                    f"model {record.name!r} ({record.id[:12]}) ships with the server and cannot be deleted"
                )
            # Metadata first: once it is gone the model is invisible, whatever happens next.
            self._meta_path(record.id).unlink()
            _fsync_dir(self.meta)
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(record.id).unlink()
            shutil.rmtree(self.stats_dir(record.id), ignore_errors=True)
            return record

    # -- reading --------------------------------------------------------------------------------
    def _read(self, model_id: str) -> ModelRecord | None:
        try:
            return ModelRecord.from_json(self._meta_path(model_id).read_text())
        except FileNotFoundError:
            return None

    def _numbered(self, record: ModelRecord) -> ModelRecord:
        """``record`` with its version set (records from before versions existed have none)."""
        if record.version:
            return record
        others = [r for r in self._all() if r.name == record.name and r.id != record.id]
        return with_versions([*others, record])[-1]

    def find(self, model_id: str) -> ModelRecord | None:
        """The model with exactly this id, or None."""
        record = self._read(model_id) if SHA256_RE.match(model_id) else None
        return self._numbered(record) if record is not None else None

    def _all(self) -> list[ModelRecord]:
        records = []
        for path in self.meta.glob("*.json"):
            with contextlib.suppress(FileNotFoundError, ValueError, TypeError):
                records.append(ModelRecord.from_json(path.read_text()))
        return with_versions(records)

    def list(self, visible: Callable[[ModelRecord], bool] | None = None) -> list[ModelRecord]:
        """Every stored model (every version), or those ``visible`` accepts (a tenant's view)."""
        records = self._all()
        if visible is not None:
            records = [r for r in records if visible(r)]
        return sorted(records, key=lambda r: (not r.bundled, r.name, r.owner, r.version, r.id))

    def is_latest(self, record: ModelRecord) -> bool:
        """Whether ``record`` is the latest version of its owner's name."""
        return record.id in latest_ids([r for r in self._all() if r.name == record.name])

    def get(
        self,
        ref: str,
        visible: Callable[[ModelRecord], bool] | None = None,
        rank: Callable[[ModelRecord], int] | None = None,
    ) -> ModelRecord:
        """A model by id, unique id prefix (≥ 8 hex characters), NAME (its latest version),
        NAME:N, NAME:latest or NAME:previous (the version before the latest).

        With ``visible``, models it rejects do not exist for this lookup: same NOT_FOUND, not named
        in the hint, not counted for ambiguity (a tenant cannot probe another's models).
        With ``rank``, a name means the models of that name with the lowest rank only (the caller's
        own before those shared with it, before public ones): another tenant's model of the same
        name never makes one's own ambiguous.
        """

        def best(named: list[ModelRecord]) -> list[ModelRecord]:
            if rank is None:
                return named
            top = min(rank(r) for r in named)
            return [r for r in named if rank(r) == top]

        ref = ref.strip()
        if not ref:
            raise ModelNotFound("no model given: pass a model id or name (see ListModels)")
        if SHA256_RE.match(ref):
            record = self._read(ref)
            if record is not None and (visible is None or visible(record)):
                return self._numbered(record)
        records = self.list(visible)
        by_name = [r for r in records if r.name == ref]
        if by_name:  # a name as given, ':' included, before NAME:VERSION is tried
            return self._version(ref, best(by_name), "latest")
        versioned = VERSION_SUFFIX.match(ref)
        if versioned and (named := [r for r in records if r.name == versioned["name"]]):
            return self._version(versioned["name"], best(named), versioned["version"])
        if len(ref) >= MIN_PREFIX and re.fullmatch(r"[0-9a-f]+", ref):
            by_prefix = [r for r in records if r.id.startswith(ref)]
            if len(by_prefix) == 1:
                return by_prefix[0]
            if len(by_prefix) > 1:
                raise AmbiguousModel(f"id prefix {ref!r} matches {len(by_prefix)} models: give more characters")
        names = sorted({r.name for r in records})
        hint = f"; stored models: {', '.join(names[:20])}" if names else "; the store is empty"
        raise ModelNotFound(f"no model {ref!r} in the store{hint}")

    @staticmethod
    def _version(name: str, records: list[ModelRecord], which: str) -> ModelRecord:
        owners = sorted({r.owner for r in records})
        if len(owners) > 1:
            ids = ", ".join(f"{r.id[:12]} ({r.owner or 'open'})" for r in records)
            raise AmbiguousModel(f"tenants {', '.join(owners)} each have a model named {name!r} ({ids}): use the id")
        ordered = sorted(records, key=lambda r: r.version)
        numbers = ", ".join(str(r.version) for r in ordered)
        if which == "latest":
            return ordered[-1]
        if which == "previous":
            if len(ordered) < 2:
                raise ModelNotFound(f"model {name!r} has one version ({numbers}): there is no {name}:previous")
            return ordered[-2]
        found = [r for r in ordered if r.version == int(which)]
        if not found:
            raise ModelNotFound(f"model {name!r} has no version {which}; its versions: {numbers}")
        return found[0]


NODE_BYTES = 12 << 10  # a converted graph's Python objects per ONNX node (1.1 GB for 99,990 nodes)


_STATIC_BYTES: weakref.WeakKeyDictionary[Any, tuple[int, int]] = weakref.WeakKeyDictionary()


def converted_bytes(converted: Any) -> int:
    """Estimated bytes a converted model holds: its weights (the ONNX protos and the torch copy)
    and, per node, the Python objects of the torch graph and of each representation built."""
    static = _STATIC_BYTES.get(converted)
    if static is None:  # the weights and nodes never change: measured once (a cache hit runs this)
        graph = getattr(converted, "onnx", None)
        nodes = len(graph.graph.node) if graph is not None else 0
        weights = sum(t.ByteSize() for t in (graph.graph.initializer if graph is not None else ()))
        # the ONNX proto, the torch copy, and the uploaded file when it is kept in memory for the judge
        static = (2 * weights + int(getattr(converted, "reference_bytes", 0)), nodes)
        with contextlib.suppress(TypeError):  # an object without weak references: measured each time
            _STATIC_BYTES[converted] = static
    weights, nodes = static
    return weights + (1 + len(getattr(converted, "_cache", {}))) * nodes * NODE_BYTES


class ConvertedCache:
    """LRU cache of converted models, keyed by model id; converts each model once even under load.

    Bounded by count and by estimated bytes (``size``, re-read at each use: representations built
    since grow a model); the model just used always stays."""

    def __init__(
        self,
        loader: Callable[[ModelRecord], Any],
        capacity: int = 4,
        max_bytes: int | None = None,
        size: Callable[[Any], int] = converted_bytes,
    ):
        self.loader = loader
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.size = size
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def nbytes(self) -> int:
        """Estimated bytes of every cached model."""
        with self._lock:
            return sum(self.size(v) for v in self._items.values())

    def _trim(self) -> None:  # under self._lock
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        if self.max_bytes is not None:
            sizes = {k: self.size(v) for k, v in self._items.items()}
            while len(self._items) > 1 and sum(sizes[k] for k in self._items) > self.max_bytes:
                self._items.popitem(last=False)

    def get(self, record: ModelRecord) -> Any:
        with self._lock:
            if record.id in self._items:
                self._items.move_to_end(record.id)
                self._trim()
                return self._items[record.id]
            per_model = self._loading.setdefault(record.id, threading.Lock())
        with per_model:  # a second request for the same model waits for the first conversion
            with self._lock:
                if record.id in self._items:
                    self._items.move_to_end(record.id)
                    return self._items[record.id]
            value = self.loader(record)
            with self._lock:
                self._items[record.id] = value
                self._items.move_to_end(record.id)
                self._trim()
                self._loading.pop(record.id, None)
            return value

    def evict(self, model_id: str) -> None:
        with self._lock:
            self._items.pop(model_id, None)

    def __contains__(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._items

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._items))
