"""Reference photographs and per-tap channel statistics for activation maximization.

The paper normalizes the maximization loss by M_k, channel k's largest activation on natural
images. We measure it on the real photographs that scikit-image ships (no download), resized
and centre-cropped to the job's size, once per (model, tap, size), and cache it: in memory, and
when the caller gives a directory (the store's, next to the model) on disk too, so that restarts
and the other replicas on the store reuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from service.energy import channel_statistics, from_uint8
from service.energy.parameterizations import mean_amplitude

# Photographs bundled with scikit-image (colour first; grey ones are repeated into RGB).
REFERENCE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "camera", "brick", "clock")

# The scenes whose amplitude spectrum the phase parameterization imposes: colour photographs of
# ordinary scenes. Not the microscopy slide (immunohistochemistry), whose blue-brown stain would
# tint every image, nor the grey ones, which carry no colour (grey models use the grey of all).
AMPLITUDE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right")
AMPLITUDE_GREY_PHOTOS = ("camera", "brick", "clock", "grass", "gravel", "coins")
# Crops per photograph: the whole square, then the four corners at 70 % and at 50 % of its side,
# each also mirrored. Averaging over scales and positions is what makes the mean amplitude that
# of scenes in general (close to 1/f) instead of the few edges of six particular pictures.
_AMPLITUDE_CROPS = ((1.0, 0.5, 0.5),) + tuple(
    (side, fy, fx) for side in (0.7, 0.5) for fy in (0.0, 1.0) for fx in (0.0, 1.0)
)


def center_crop_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop to the target aspect ratio around the centre, then resize (bicubic) to height×width."""
    arr = np.asarray(image)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    arr = arr[..., :3]
    h, w = arr.shape[:2]
    target = width / height
    if w / h > target:
        new_w = max(1, round(h * target))
        left = (w - new_w) // 2
        arr = arr[:, left : left + new_w]
    else:
        new_h = max(1, round(w / target))
        top = (h - new_h) // 2
        arr = arr[top : top + new_h]
    return np.asarray(Image.fromarray(np.ascontiguousarray(arr)).resize((width, height), Image.Resampling.BICUBIC))


def photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled photographs as H×W×3 uint8."""
    import skimage.data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = skimage.data.stereo_motorcycle()
        image = np.asarray(left if name == "motorcycle_left" else right)
    elif name not in REFERENCE_PHOTOS and not hasattr(skimage.data, name):
        raise ValueError(f"unknown photo {name!r}; known: {', '.join(REFERENCE_PHOTOS)}")
    else:
        image = np.asarray(getattr(skimage.data, name)())
    return center_crop_resize(image, *image.shape[:2])


def reference_batch(
    height: int, width: int, mean_rgb255: tuple[float, ...], names: tuple[str, ...] = REFERENCE_PHOTOS
) -> torch.Tensor:
    """Photographs (default: the reference set) in energy space, N×3×H×W."""
    mean = torch.tensor(mean_rgb255, dtype=torch.float32)
    return torch.stack([from_uint8(center_crop_resize(photo(n), height, width), mean) for n in names])


_stats_lock = threading.Lock()
_stats: dict[tuple, torch.Tensor] = {}


def channel_max(
    phi: torch.nn.Module,
    key: str,
    height: int,
    width: int,
    mean_rgb255: tuple[float, float, float],
    cache_dir: Path | None = None,
    on_measure: Callable[[], None] | None = None,
) -> torch.Tensor:
    """M_k for every channel of ``phi``'s output at this size; cached under ``key`` (model id + tap),
    and in ``cache_dir`` when given (a file per key, size, mean, device type and photograph set).
    ``on_measure`` is called when neither cache has them, just before they are measured."""
    device = next((t.device for t in list(phi.parameters()) + list(phi.buffers())), torch.device("cpu"))
    cache_key = (key, height, width, tuple(mean_rgb255))
    with _stats_lock:
        if cache_key in _stats:
            return _stats[cache_key]
        # The device type is in the name: a GPU's sums differ from a CPU's in the last bits, and a
        # job must give the same bytes whichever replica measured its statistics.
        ident = repr((key, height, width, tuple(map(float, mean_rgb255)), device.type, REFERENCE_PHOTOS))
        path = None if cache_dir is None else Path(cache_dir) / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.npy"
        stats = _read_stats(path) if path is not None else None
        if stats is None:
            if on_measure is not None:
                on_measure()
            images = reference_batch(height, width, mean_rgb255).to(device)
            stats = channel_statistics(phi, images).cpu()
            if path is not None:
                _write_stats(path, stats)
        _stats[cache_key] = stats
        return stats


def _read_stats(path: Path) -> torch.Tensor | None:
    """The statistics stored at ``path``, or None when absent or unreadable (then measured again)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if arr.dtype != np.float32 or arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all():
        return None
    return torch.from_numpy(arr.copy())


def _write_stats(path: Path, stats: torch.Tensor) -> None:
    """Written to a temporary name and renamed, so a reader sees the whole file or none; a store
    that cannot be written (read-only, full) only costs the next process a measurement."""
    buffer = io.BytesIO()
    np.save(buffer, stats.numpy().astype(np.float32), allow_pickle=False)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def effective_receptive_field(receptive_field: int | tuple[int, int] | None, height: int, width: int) -> int:
    """ρ for the paper's 1/ρ² scaling: the theoretical field clipped to the image along each axis, as
    the side of the square of the same area (a tap's ``receptive_field_yx`` may differ between y and
    x). Unknown geometry (None or 0) counts as the whole image, the one bound every tap satisfies."""
    if isinstance(receptive_field, tuple | list):
        ry, rx = int(receptive_field[0]), int(receptive_field[1])
    else:
        ry = rx = int(receptive_field or 0)
    if ry <= 0 or rx <= 0:
        ry, rx = height, width
    return max(1, round(math.sqrt(min(ry, height) * min(rx, width))))


_amplitude_lock = threading.Lock()
_amplitudes: dict[tuple[int, int, int], torch.Tensor] = {}


def amplitude_crops(image: np.ndarray, height: int, width: int) -> list[np.ndarray]:
    """The crops of one photograph whose amplitudes are averaged (``_AMPLITUDE_CROPS``, each
    also mirrored), resized to height×width."""
    arr = np.asarray(image)
    h, w = arr.shape[:2]
    # The largest window of the target's aspect ratio, then fractions of it.
    full_h, full_w = (h, round(h * width / height)) if w / h > width / height else (round(w * height / width), w)
    crops = []
    for side, fy, fx in _AMPLITUDE_CROPS:
        ch, cw = max(8, round(full_h * side)), max(8, round(full_w * side))
        top, left = round((h - ch) * fy), round((w - cw) * fx)
        crop = arr[top : top + ch, left : left + cw]
        crops += [center_crop_resize(crop, height, width), center_crop_resize(crop[:, ::-1], height, width)]
    return crops


def amplitude_spectrum(height: int, width: int, channels: int) -> torch.Tensor:
    """The mean amplitude spectrum of photographs of scenes at this size (the phase
    parameterization's fixed magnitude), cached per size and channel count."""
    key = (height, width, channels)
    with _amplitude_lock:
        if key not in _amplitudes:
            names = AMPLITUDE_PHOTOS if channels == 3 else AMPLITUDE_PHOTOS + AMPLITUDE_GREY_PHOTOS
            _amplitudes[key] = amplitude_of((photo(n) for n in names), height, width, channels)
        return _amplitudes[key]


def amplitude_of(images: Iterable[np.ndarray], height: int, width: int, channels: int) -> torch.Tensor:
    """The mean amplitude spectrum of ``images`` (H×W×3 uint8, any size) at this size, with the
    crops of ``amplitude_spectrum``'s photographs (a client's own photographs, for example).

    ``images`` is consumed one at a time and only each one's crops are kept, so a generator that
    decodes on demand holds one full-size image at a time, not all of them."""
    crops = [c for image in images for c in amplitude_crops(image, height, width)]
    if not crops:
        raise ValueError("the amplitude spectrum needs at least one image")
    stack = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0
    return mean_amplitude(stack, channels)
