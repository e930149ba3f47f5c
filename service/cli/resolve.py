"""What every command resolves the same way: the store, the caller's token, models and images."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from service.models.store import default_store_dir

TOKEN_ENV = "PREIMAGE_TOKEN"


def default_store() -> Path:
    """$PREIMAGE_STORE, else the store's own default (~/.local/share/preimage/store)."""
    return Path(os.environ.get("PREIMAGE_STORE") or default_store_dir())


def token_from_env() -> str | None:
    """A team's token from the environment, not a flag: flags end up in shell history and `ps`."""
    return os.environ.get(TOKEN_ENV) or None


def resolve_image(spec: str) -> Any:
    """A path on disk, or the name of one of scikit-image's bundled photographs."""
    if Path(spec).exists():
        return spec
    from service.jobs.reference import photo

    try:
        return photo(spec)
    except (ValueError, AttributeError) as exc:
        raise SystemExit(f"error: --image {spec!r} is neither a file nor a scikit-image photo name") from exc


def resolve_model(client: Any, spec: str, as_json: bool) -> Any:
    """A model id/name on the server, or an ONNX file uploaded first (idempotent: content-addressed)."""
    if spec.endswith(".onnx") or Path(spec).is_file():
        response = client.upload(spec, name=Path(spec).stem)
        if not as_json:
            print(f"model {response.model.name} {response.model.id[:12]}", file=sys.stderr)
        return response.model
    return client.get(spec)
