"""Seeding the store with the bundled models, each vetted like an upload."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

from converters.bundled import bundled_models
from service.models.store import ModelRecord, ModelStore
from service.models.worker import WorkerLimits, vet_model

log = logging.getLogger("preimage.server")


def quiet_bundled_models() -> list:
    """``bundled_models()`` without the torch exporter's UserWarnings (constant folding, opset
    notes): they are about our own export, which a test checks, and only alarm whoever runs it."""
    with warnings.catch_warnings():
        # Only around our own export: warnings of anything else still show.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return bundled_models()


def seed_bundled(
    store: ModelStore, worker_limits: WorkerLimits | None = None, progress: Callable[[str], None] | None = None
) -> list[ModelRecord]:
    """Put the bundled models into the store (a no-op for those already there).

    ``progress`` hears about the slow part only: a bundled model being checked for the first time.
    """
    from converters.bundled import cache_dir

    if progress is not None and not any(cache_dir().glob("*.onnx")):
        progress(f"exporting the bundled models to ONNX into {cache_dir()} (first run only)")
    records = []
    for bundled in quiet_bundled_models():

        def record_for(sha: str, size: int, b=bundled) -> ModelRecord:
            if progress is not None:
                progress(f"checking the bundled model {b.name} against onnxruntime (once per store)")
            # Vetted like an upload: same conversion, same figures in the record.
            answer = vet_model(str(b.path), None, worker_limits)
            return ModelRecord(
                id=sha,
                name=b.name,
                size_bytes=size,
                preprocessing=answer["preprocessing"],
                preprocessing_source=answer["preprocessing_source"],
                tap_count=answer["tap_count"],
                output_tap=answer["output_tap"],
                parity=answer["parity"],
                bundled=True,
                description=b.description,
            )

        record, existed = store.add_file(Path(bundled.path), record_for)
        # A new release of a bundled model (different bytes, same name) replaces the old one, so
        # the name keeps resolving to exactly one model.
        for old in store.list():
            if old.bundled and old.name == record.name and old.id != record.id:
                store.delete(old.id, allow_bundled=True)
                log.info("bundled model replaced", extra={"fields": {"name": old.name, "old_id": old.id}})
        log.info("bundled model", extra={"fields": {"name": record.name, "id": record.id, "new": not existed}})
        records.append(record)
    return records
