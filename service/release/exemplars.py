"""The release check's exemplars: for each sampled channel of a visualized layer, the reference
photographs (with their mirror images and centre crops) that excite it most, as receptive-field
crops, and notes when a channel's top exemplars differ from the baseline's.

The ranking is the Exemplars RPC's own (``service.jobs.exemplars``), run in process on a fixed
set, so a release and its baseline are ranked on the same images in the same order: identical
models give identical exemplars, and any note means the ranking itself moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from converters.taps import TapInfo
from service.jobs.exemplars import MAX_CROP, MIN_CROP, ExemplarsRun, Target
from service.jobs.forward import tap_forward
from service.jobs.limits import JobLimits
from service.jobs.reference import REFERENCE_PHOTOS, center_crop_resize, photo

TOP_K = 3


@dataclass
class Exemplar:
    image_id: str  # "chelsea", "chelsea-flip", "chelsea-crop"
    activation: float
    fraction_of_max: float  # activation / the channel's maximum over the set (0 when that is ≤ 0)
    crop: np.ndarray  # H×W×3 uint8, the receptive field around the maximum


@dataclass
class ChannelExemplars:
    channel: int
    top: list[Exemplar]

    @property
    def ids(self) -> list[str]:
        return [e.image_id for e in self.top]


def reference_set(height: int, width: int) -> list[tuple[str, np.ndarray]]:
    """The reference photographs at height×width, each also mirrored and as a centre crop of half
    its side (a crop shows a part at a larger scale, which a mid-layer channel may prefer)."""
    out = []
    for name in REFERENCE_PHOTOS:
        img = photo(name)
        h, w = img.shape[:2]
        full = center_crop_resize(img, height, width)
        crop = center_crop_resize(img[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2], height, width)
        out += [(name, full), (f"{name}-flip", np.ascontiguousarray(full[:, ::-1])), (f"{name}-crop", crop)]
    return out


def layer_exemplars(
    model: Any,
    tap: TapInfo,
    channels: list[int],
    size: tuple[int, int],
    device: torch.device,
    images: list[tuple[str, np.ndarray]] | None = None,
    k: int = TOP_K,
) -> list[ChannelExemplars]:
    """The top ``k`` of ``images`` (default: ``reference_set``) for each channel of ``tap``."""
    h, w = size
    images = images if images is not None else reference_set(h, w)
    rf = tap.receptive_field_yx
    side = int(min(max(min(rf[0], h), MIN_CROP), MAX_CROP)) if rf else MAX_CROP
    run = ExemplarsRun(
        converted=model,
        tap=tap,
        targets=[Target("channel", c) for c in channels],
        top_k=k,
        bottom_k=0,
        crop_size=side,
        batch_size=len(images),
        height=h,
        width=w,
        forward=tap_forward(model, tap, device),
        device=device,
        limits=JobLimits(),
    )
    for start in range(0, len(images), 8):  # small batches: a check runs beside a serving process
        run.run_batch(images[start : start + 8])
    out = []
    for t, c in enumerate(channels):
        best = run.maxima[t]
        out.append(
            ChannelExemplars(
                c,
                [
                    Exemplar(e.image_id, e.activation, e.activation / best if best > 0 else 0.0, e.crop)
                    for e in run.tops[t].best_first()
                ],
            )
        )
    return out


def exemplar_drift(new: list[ChannelExemplars], old: list[ChannelExemplars]) -> list[str]:
    """One note per channel whose top exemplars differ from the baseline's: other images, or the
    same images in another order. Empty when every channel ranks the set as before."""
    notes = []
    for a, b in zip(new, old, strict=True):
        if a.ids == b.ids:
            continue
        if sorted(a.ids) == sorted(b.ids):
            notes.append(f"channel {a.channel}: the same top {len(a.ids)} reordered ({', '.join(b.ids)} → "
                         f"{', '.join(a.ids)})")  # fmt: skip
        else:
            gone = [i for i in b.ids if i not in a.ids]
            came = [i for i in a.ids if i not in b.ids]
            notes.append(f"channel {a.channel}: top {len(a.ids)} exemplars changed (no longer {', '.join(gone)}; "
                         f"now {', '.join(came)}; was {', '.join(b.ids)})")  # fmt: skip
    return notes
