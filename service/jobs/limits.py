"""The bounds a server puts on one request and on its batches: plain dataclasses, so the settings
table (service/rpc/config.py) can list them without importing torch or grpc."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JobLimits:
    """What one request may ask for; a tenant's Quota may tighten them."""

    max_pixels: int = 1024 * 1024  # per output image
    max_image_bytes: int = 32 << 20  # per encoded input image
    max_input_pixels: int = 6000 * 6000  # decoded input image, checked before decoding
    max_targets: int = 64
    max_steps: int = 10_000  # both stages together
    max_request_pixels: int = 64 * 1024 * 1024  # Σ decoded input pixels of one request, from the headers
    max_job_bytes: int = 8 << 30  # estimated memory of one request (activations × rows + images)


@dataclass(frozen=True)
class SchedulerLimits:
    """Bounds of one batch and of the queue; defaults suit a 2-core CPU box (raise them on a GPU)."""

    # Images the network runs per batch (a parameterized problem counts its views); max_pixels is
    # the memory bound at large sizes, this one at small sizes.
    max_rows: int = 32
    max_pixels: int = 16 * 224 * 224  # Σ H·W over a batch's rows
    max_total_pixels: int = 64 * 224 * 224  # Σ H·W over every running row
    max_queued: int = 32  # jobs waiting for admission
