"""Per-tenant quotas: how much of the server one team may hold and ask for.

A ``Quota`` comes from the tokens file (``default_quotas`` merged with a tenant's ``quotas``;
service/rpc/auth.py). Every field is optional: None means only the server-wide limits apply.

- storage: ``max_models`` and ``max_model_bytes`` (sum of the tenant's stored models), checked
  when an upload starts (from its declared size), while it streams (the staged file stops at what
  is left) and again right before it is committed, under a per-tenant lock, so two parallel
  uploads cannot both take the last slot;
- jobs: ``max_concurrent_jobs`` (admitted and running at once: further jobs wait in the queue) and
  ``max_queued_jobs`` (waiting); the scheduler enforces both (service/jobs/scheduler.py);
- requests: ``max_image_pixels`` (each input image before decoding and each output image) and
  ``max_steps`` (both stages of a job) tighten the server's JobLimits.

Breaches are RESOURCE_EXHAUSTED and name the quota (``quota max_models=3``) so a team knows
which line of its configuration to ask about.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from service.jobs.errors import ServiceError, exhausted


@dataclass(frozen=True)
class Quota:
    max_models: int | None = None
    max_model_bytes: int | None = None
    max_concurrent_jobs: int | None = None
    max_queued_jobs: int | None = None
    max_image_pixels: int | None = None
    max_steps: int | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Quota:
        return cls().merged(raw)

    def merged(self, raw: Mapping[str, Any]) -> Quota:
        """This quota with ``raw``'s entries replacing its own. Raises ValueError on a bad entry."""
        if not isinstance(raw, Mapping):
            raise ValueError("quotas must be an object")
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown quota(s) {unknown}; known: {sorted(known)}")
        for key, value in raw.items():
            # bool is an int in Python; `true` as a quota is a typo, not 1.
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"quota {key} must be a non-negative integer or null, got {value!r}")
        return dataclasses.replace(self, **dict(raw))

    def job_limits(self, base: Any) -> Any:
        """``base`` (service.jobs.JobLimits) tightened by this quota."""
        changes: dict[str, int] = {}
        if self.max_image_pixels is not None:
            changes["max_pixels"] = min(base.max_pixels, self.max_image_pixels)
            changes["max_input_pixels"] = min(base.max_input_pixels, self.max_image_pixels)
        if self.max_steps is not None:
            changes["max_steps"] = min(base.max_steps, self.max_steps)
        return dataclasses.replace(base, **changes) if changes else base


def quota_error(tenant: str, what: str, limit_name: str, limit: int) -> ServiceError:
    who = f"tenant {tenant!r}" if tenant else "this server"
    return exhausted(f"{who}: {what} (quota {limit_name}={limit})", reason="QUOTA_EXCEEDED")


class StorageQuotas:
    """Checks the storage quotas of uploads; one lock per tenant serializes their commits."""

    def __init__(self) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def lock(self, tenant: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(tenant, threading.Lock())

    @staticmethod
    def usage(records: Iterable[Any], tenant: str) -> tuple[int, int]:
        """(models, bytes) the tenant owns."""
        owned = [r for r in records if not r.bundled and getattr(r, "owner", "") == tenant]
        return len(owned), sum(r.size_bytes for r in owned)

    @staticmethod
    def check(quota: Quota, tenant: str, records: Iterable[Any], adding_bytes: int) -> int | None:
        """Raise when one more model of ``adding_bytes`` breaks a quota; return the bytes left (None: no cap)."""
        count, used = StorageQuotas.usage(records, tenant)
        if quota.max_models is not None and count + 1 > quota.max_models:
            raise quota_error(
                tenant, f"already stores {count} models; delete one first", "max_models", quota.max_models
            )
        if quota.max_model_bytes is None:
            return None
        left = quota.max_model_bytes - used
        if adding_bytes > left:
            raise quota_error(
                tenant,
                f"stores {used} bytes of models; {adding_bytes} more would exceed the cap",
                "max_model_bytes",
                quota.max_model_bytes,
            )
        return left
