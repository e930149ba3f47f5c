"""What every command resolves the same way: the server, the store, the caller's token, models, images.

One rule for every command that talks to the service: ``--server ADDR``, else ``$PREIMAGE_SERVER``,
else an embedded server started in this process on the local store.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path
from typing import Any

from service.models.store import default_store_dir

TOKEN_ENV = "PREIMAGE_TOKEN"
SERVER_ENV = "PREIMAGE_SERVER"
# scikit-image's photographs that load offline as 8-bit images (the rest of skimage.data downloads
# files or returns volumes, masks and float phantoms).
PHOTOS = (
    "astronaut", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock", "coffee", "coins",
    "colorwheel", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms",
    "moon", "page", "retina", "rocket", "text",
)  # fmt: skip


def default_store() -> Path:
    """$PREIMAGE_STORE, else the store's own default (~/.local/share/preimage/store)."""
    return Path(os.environ.get("PREIMAGE_STORE") or default_store_dir())


def server_address(flag: str | None) -> str | None:
    """The server a command talks to: the flag, else $PREIMAGE_SERVER; None means embedded."""
    return flag or os.environ.get(SERVER_ENV) or None


def token_from_env() -> str | None:
    """A team's token from the environment, not a flag: flags end up in shell history and `ps`."""
    return os.environ.get(TOKEN_ENV) or None


def image_ref(spec: str) -> str:
    """An argparse type: an image file, or the name of one of scikit-image's photographs."""
    if Path(spec).is_file():
        return spec
    if spec in PHOTOS:
        return spec
    if Path(spec).suffix or "/" in spec:
        raise argparse.ArgumentTypeError(f"{spec!r}: no such file")
    close = difflib.get_close_matches(spec, PHOTOS, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise argparse.ArgumentTypeError(
        f"{spec!r} is neither a file nor a scikit-image photo; {hint}photos: {', '.join(PHOTOS)}"
    )


image_ref.domain = "an image file or a scikit-image photo name"  # type: ignore[attr-defined]


def resolve_image(spec: str) -> Any:
    """A path on disk, or the named photograph as an H×W×3 uint8 array."""
    if Path(spec).is_file():
        return spec
    from service.jobs.reference import photo

    return photo(image_ref(spec))


def resolve_model(client: Any, spec: str, as_json: bool, size: tuple[int, int] | None = None) -> Any:
    """A model id/name on the server, or an ONNX file uploaded first (idempotent: content-addressed);
    ``size`` (height, width) is declared with the upload, for a dynamic-size model."""
    if spec.endswith(".onnx") or Path(spec).is_file():
        if not as_json:
            print(f"uploading {spec} (a new model is converted and checked first)", file=sys.stderr, flush=True)
        pre = {"height": size[0], "width": size[1]} if size else None
        response = client.upload(spec, name=Path(spec).stem, preprocessing=pre)
        if not as_json:
            m = response.model
            print(f"model {m.name}:{m.version} {m.id[:12]}", file=sys.stderr)
            if response.note:
                print(response.note, file=sys.stderr)
        return response.model
    return client.get(spec)
