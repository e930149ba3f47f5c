"""Exemplars: rank a client's images by how much they excite each target of a tap.

A forward pass only, through the converted model's representation at the tap (the truncated
graph), in batches. Each target keeps a bounded heap of its top-k (and bottom-k) images, holding
only the receptive-field crop of each, so memory does not grow with the number of images: the
full images of one batch are all that is ever held.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch

from service.api.preimage.v1 import preimage_pb2 as pb
from service.jobs.errors import ServiceError, exhausted, invalid
from service.jobs.forward import Forward, tap_forward
from service.jobs.images import png_bytes
from service.jobs.job import activation_bytes, decode_image, find_tap, fixed_input_size, resize
from service.jobs.limits import JobLimits
from service.jobs.reference import center_crop_resize

MAX_K = 16
DEFAULT_K = 9
MIN_CROP, MAX_CROP = 16, 128
DEFAULT_BATCH = 16
MAX_BATCH = 64
PROGRESS_SECONDS = 1.0
TOP_CLASSES = 5


@dataclass(order=True)
class _Entry:
    key: float  # the heap's order: activation (top) or -activation (bottom)
    tie: int  # ties: the earlier image wins (minus its index in the stream)
    activation: float = field(compare=False)
    image_id: str = field(compare=False)
    y: int = field(compare=False)
    x: int = field(compare=False)
    crop: np.ndarray = field(compare=False)
    box: tuple[int, int, int, int] = field(compare=False)
    # With heat maps: the model-input image (shared by every heap that keeps it, not copied) and
    # the target's map on it, rendered once the set's maximum is known.
    image: np.ndarray | None = field(default=None, compare=False)
    location_map: np.ndarray | None = field(default=None, compare=False)
    classes: list[tuple[int, float]] = field(default_factory=list, compare=False)


class _Heap:
    """The k best entries by key, in O(k) memory."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.items: list[_Entry] = []

    def wants(self, key: float, seq: int) -> bool:
        # An entry enters when the heap has room or it beats the worst kept (the root).
        return self.k > 0 and (len(self.items) < self.k or (key, -seq) > (self.items[0].key, self.items[0].tie))

    def push(self, entry: _Entry) -> None:
        if len(self.items) < self.k:
            heapq.heappush(self.items, entry)
        else:
            heapq.heapreplace(self.items, entry)

    def best_first(self) -> list[_Entry]:
        return sorted(self.items, reverse=True)


@dataclass(frozen=True)
class Target:
    """What one target reads off the tap: channel/direction take the map's maximum, a neuron its
    one position."""

    kind: str  # "channel" | "neuron" | "direction"
    channel: int = 0
    y: int = 0
    x: int = 0
    weights: torch.Tensor | None = None


def parse_targets(msgs: Iterable[pb.MaximizeTarget], shape: tuple[int, ...], limits: JobLimits) -> list[Target]:
    """The header's targets checked against the tap's shape (C, [H, W]) and the target limit."""
    msgs = list(msgs)
    if not msgs:
        raise invalid("the header needs at least one target (a channel, neuron or direction)", field="header.targets")
    if len(msgs) > limits.max_targets:
        raise exhausted(
            f"{len(msgs)} targets; this server ranks at most {limits.max_targets} per request",
            field="header.targets",
        )
    channels = shape[0]
    out = []
    for i, m in enumerate(msgs):
        kind = m.WhichOneof("kind")
        where = f"header.targets[{i}]"
        if kind == "channel":
            if m.channel.channel >= channels:
                raise invalid(f"{where}: channel {m.channel.channel}, the tap has {channels}", field=where)
            out.append(Target("channel", m.channel.channel))
        elif kind == "neuron":
            n = m.neuron
            hw = shape[1:3] if len(shape) >= 3 else (1, 1)
            if n.channel >= channels or n.y >= hw[0] or n.x >= hw[1]:
                raise invalid(
                    f"{where}: neuron ({n.channel}, {n.y}, {n.x}) is outside the tap's {tuple(shape)}", field=where
                )
            out.append(Target("neuron", n.channel, n.y, n.x))
        elif kind == "direction":
            w = torch.tensor(list(m.direction.weights), dtype=torch.float32)
            if w.numel() != channels or not torch.isfinite(w).all():
                raise invalid(f"{where}: a direction needs {channels} finite weights, got {w.numel()}", field=where)
            out.append(Target("direction", weights=w))
        else:
            raise invalid(f"{where} is empty: set channel, neuron or direction", field=where)
    return out


def _weights(target: Target) -> np.ndarray:
    assert target.weights is not None
    return target.weights.numpy().astype(np.float32, copy=False)


def _read(target: Target, a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(activation, y, x) per image of a batch ``a`` (B×C×H×W or B×C)."""
    b = a.shape[0]
    zeros = np.zeros(b, dtype=np.int64)
    if a.ndim == 2:
        v = a[:, target.channel] if target.weights is None else a @ _weights(target)
        return v, zeros, zeros
    if target.kind == "neuron":
        return a[:, target.channel, target.y, target.x], zeros + target.y, zeros + target.x
    m = _target_map(target, a)
    flat = m.reshape(b, -1)
    idx = flat.argmax(axis=1)
    w = m.shape[-1]
    return flat[np.arange(b), idx], idx // w, idx % w


def _target_map(target: Target, a: np.ndarray) -> np.ndarray:
    """The target's map (B×H×W) of a spatial batch ``a``: its channel's, or the direction's
    weighted sum (a neuron's is its channel's map: where else the channel fires)."""
    if target.weights is None:
        return a[:, target.channel]
    return np.einsum("bchw,c->bhw", a, _weights(target))


def heat_map(image: np.ndarray, location_map: np.ndarray, set_max: float) -> np.ndarray:
    """The map upsampled over ``image`` (H×W×3 uint8): 0 (or less) black, the set's maximum
    white, through red and yellow, blended half and half with the image. Against the set's
    maximum rather than the map's own, so the maps of one target's exemplars compare."""
    h, w = image.shape[:2]
    scale = set_max if set_max > 0 else float(location_map.max())
    v = np.clip(location_map / scale, 0.0, 1.0) if scale > 0 else np.zeros_like(location_map)
    up = torch.nn.functional.interpolate(
        torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))[None, None], size=(h, w), mode="bilinear",
        align_corners=False,
    )[0, 0].clamp(0, 1).numpy()  # fmt: skip
    # Black → red → yellow → white as v rises through thirds.
    colour = np.stack([np.clip(3 * up - k, 0.0, 1.0) for k in range(3)], axis=-1) * 255.0
    return (0.5 * image.astype(np.float32) + 0.5 * colour).round().astype(np.uint8)


def _read_channels(targets: list[Target], a: np.ndarray) -> dict[int, tuple[np.ndarray, ...]]:
    """``_read`` for every channel target of a spatial map at once (one max over the map for all
    of them, not one per target): target index → (activation, y, x) per image."""
    idx = [t for t, target in enumerate(targets) if target.kind == "channel"]
    if a.ndim != 4 or not idx:
        return {}
    m = a[:, [targets[t].channel for t in idx]].reshape(a.shape[0], len(idx), -1)  # B × T × (H·W)
    arg = m.argmax(axis=2)
    v = np.take_along_axis(m, arg[:, :, None], axis=2)[:, :, 0]
    w = a.shape[-1]
    return {t: (v[:, j], arg[:, j] // w, arg[:, j] % w) for j, t in enumerate(idx)}


def crop_box(tap: Any, y: int, x: int, map_hw: tuple[int, int], hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of unit (y, x)'s receptive field in the model-input image,
    clipped to it. The unit's centre is taken as its cell's centre at the map's effective stride
    (input side / map side), which is where same-padded convolutions put it; the side is the
    tap's theoretical receptive field. Unknown geometry or a global tap: the whole image."""
    h, w = hw
    rf = tap.receptive_field_yx
    if tap.is_global or rf is None or map_hw == (1, 1):
        return 0, 0, h, w
    ry, rx = min(int(rf[0]), h), min(int(rf[1]), w)
    cy, cx = (y + 0.5) * h / map_hw[0], (x + 0.5) * w / map_hw[1]
    top = int(min(max(round(cy - ry / 2), 0), h - ry))
    left = int(min(max(round(cx - rx / 2), 0), w - rx))
    return top, left, ry, rx


@dataclass
class ExemplarsRun:
    """One request's state: the tap's representation, the targets and their heaps."""

    converted: Any
    tap: Any
    targets: list[Target]
    top_k: int
    bottom_k: int
    crop_size: int
    batch_size: int
    height: int
    width: int
    forward: Forward  # images → the tap's tensor (service/jobs/forward.py)
    device: torch.device
    limits: JobLimits
    heat_maps: bool = False
    labels: list[str] = field(default_factory=list)
    tops: list[_Heap] = field(default_factory=list)
    bottoms: list[_Heap] = field(default_factory=list)
    maxima: list[float] = field(default_factory=list)
    seen: int = 0

    def __post_init__(self) -> None:
        self.tops = [_Heap(self.top_k) for _ in self.targets]
        self.bottoms = [_Heap(self.bottom_k) for _ in self.targets]
        self.maxima = [float("-inf")] * len(self.targets)
        self.mean = torch.tensor(self.converted.preprocessing.mean_rgb255, dtype=torch.float32)

    def run_batch(self, images: list[tuple[str, np.ndarray]]) -> None:
        """One batch: its forward pass, then its ranking."""
        self.rank(images, self.activations(images))

    def activations(self, images: list[tuple[str, np.ndarray]]) -> torch.Tensor:
        """The tap's tensor for one batch (float32, on the CPU): the part that runs on the compute
        owner (torch or onnxruntime)."""
        # One uint8 stack, then one conversion: per-image from_uint8 and a float stack measured
        # 15 % of a batch's time on the bundled model (2-core CPU).
        pixels = torch.from_numpy(np.stack([img for _, img in images])).to(self.device)
        x = pixels.permute(0, 3, 1, 2).float() - self.mean.to(self.device).view(1, 3, 1, 1)
        return self.forward(x)

    def rank(self, images: list[tuple[str, np.ndarray]], activations: torch.Tensor) -> None:
        """Fold one batch's activations into the heaps, batches in stream order. Numpy and Pillow
        only (no torch), so it can run on the RPC's thread beside the next batch's forward pass."""
        a = activations.numpy()
        map_hw = tuple(a.shape[2:4]) if a.ndim == 4 else (1, 1)
        read = _read_channels(self.targets, a)
        # Class names only where the output has one label per entry (a 1-D output of a labelled model).
        classes = a.ndim == 2 and len(self.labels) == a.shape[1]
        for t, target in enumerate(self.targets):
            values, ys, xs = read[t] if t in read else _read(target, a)
            maps = _target_map(target, a) if self.heat_maps and a.ndim == 4 else None
            for i, (image_id, img) in enumerate(images):
                v, y, xx, seq = float(values[i]), int(ys[i]), int(xs[i]), self.seen + i
                self.maxima[t] = max(self.maxima[t], v)
                for heap, key in ((self.tops[t], v), (self.bottoms[t], -v)):
                    if heap.wants(key, seq):
                        box = crop_box(self.tap, y, xx, map_hw, (self.height, self.width))
                        top, left, bh, bw = box
                        crop = center_crop_resize(img[top : top + bh, left : left + bw], self.crop_size, self.crop_size)
                        entry = _Entry(key, -seq, v, image_id, y, xx, crop, box)
                        if maps is not None:
                            entry.image, entry.location_map = img, maps[i].copy()
                        if classes:
                            order = np.argsort(-a[i], kind="stable")[:TOP_CLASSES]
                            entry.classes = [(int(c), float(a[i, c])) for c in order]
                        heap.push(entry)
        self.seen += len(images)

    def results(self) -> Iterator[pb.ExemplarsResult]:
        for t in range(len(self.targets)):
            set_max = self.maxima[t]

            def message(e: _Entry, set_max: float = set_max) -> pb.Exemplar:
                # A fraction only means something against a positive maximum.
                frac = e.activation / set_max if set_max > 0 else 0.0
                heat = b""
                if e.image is not None and e.location_map is not None:
                    heat = png_bytes(heat_map(e.image, e.location_map, set_max))
                return pb.Exemplar(
                    image_id=e.image_id,
                    activation=e.activation,
                    fraction_of_max=frac,
                    y=e.y,
                    x=e.x,
                    crop_png=png_bytes(e.crop),
                    box=list(e.box),
                    heat_map_png=heat,
                    top_classes=[pb.ExemplarClass(index=c, label=self.labels[c], score=s) for c, s in e.classes],
                )

            yield pb.ExemplarsResult(
                target_index=t,
                top=[message(e) for e in self.tops[t].best_first()],
                bottom=[message(e) for e in self.bottoms[t].best_first()],
                set_max=set_max if self.seen else 0.0,
                images=self.seen,
            )


def fit_batch(
    batch: int,
    converted: Any,
    tap: Any,
    height: int,
    width: int,
    n_targets: int,
    kept: int,
    crop: int,
    limits: JobLimits,
    heat_maps: bool = False,
) -> int:
    """The largest batch up to ``batch`` whose estimate fits ``limits.max_job_bytes``: every
    activation up to the tap for each image (a forward pass frees most as it goes, so this is an
    upper bound), the batch's images, and the kept crops (with heat maps, also each kept entry's
    model-input image, counted as if no two entries shared one), and the batch being ranked while
    the next one runs (its tap output and images). RESOURCE_EXHAUSTED when one image does not fit."""
    ranked = 4 * math.prod(d or 1 for d in tap.shape) + 3 * height * width
    per_image = activation_bytes(converted, tap, height, width) + 4 * 3 * height * width * 2 + ranked
    crops = n_targets * kept * (crop * crop * 3 + (height * width * 3 if heat_maps else 0))
    room = limits.max_job_bytes - crops
    fit = min(batch, room // per_image) if room > 0 else 0
    if fit < 1:
        gib = 1 << 30
        raise exhausted(
            f"one image at {height}×{width} up to tap {tap.alias!r} with {n_targets} targets needs about "
            f"{(per_image + crops) / gib:.2f} GiB; this server runs at most {limits.max_job_bytes / gib:.2f} GiB "
            "per request: use an earlier tap, fewer targets, a smaller top_k or crop_size",
            field="header",
        )
    return int(fit)


def start_run(
    header: pb.ExemplarsHeader,
    converted: Any,
    device: torch.device,
    limits: JobLimits,
    labels: list[str] | None = None,
) -> ExemplarsRun:
    """Check the header and set up the run (INVALID_ARGUMENT / RESOURCE_EXHAUSTED naming the field).
    ``labels``: the model's class labels (named in the top classes of a 1-D output's exemplars)."""
    from converters.model import NOMINAL_SIZE

    tap = find_tap(converted, header.tap)
    shape = tuple(d or 1 for d in tap.shape)
    if len(shape) not in (1, 3):
        raise invalid(f"tap {tap.alias!r} has shape {list(tap.shape)}; exemplars need C or C×H×W", field="tap")
    if header.top_k > MAX_K or header.bottom_k > MAX_K:
        raise invalid(f"top_k and bottom_k are at most {MAX_K}", field="header.top_k")
    if header.crop_size and not MIN_CROP <= header.crop_size <= MAX_CROP:
        raise invalid(f"crop_size is {MIN_CROP}–{MAX_CROP} pixels (0: the receptive field)", field="header.crop_size")
    if header.batch_size > MAX_BATCH:
        raise invalid(f"batch_size is at most {MAX_BATCH}", field="header.batch_size")
    targets = parse_targets(header.targets, shape, limits)
    fixed = fixed_input_size(converted)
    pre = converted.preprocessing
    height, width = fixed or (pre.height or NOMINAL_SIZE, pre.width or NOMINAL_SIZE)
    rf = tap.receptive_field_yx
    side = header.crop_size or (min(max(min(rf[0], height), MIN_CROP), MAX_CROP) if rf else MAX_CROP)
    top_k = header.top_k or DEFAULT_K
    batch = fit_batch(header.batch_size or DEFAULT_BATCH, converted, tap, height, width, len(targets),
                      top_k + header.bottom_k, int(side), limits, header.heat_maps)  # fmt: skip
    return ExemplarsRun(
        converted=converted,
        tap=tap,
        targets=targets,
        top_k=top_k,
        bottom_k=header.bottom_k,
        crop_size=int(side),
        batch_size=batch,
        height=height,
        width=width,
        forward=tap_forward(converted, tap, device),
        device=device,
        limits=limits,
        heat_maps=header.heat_maps,
        labels=list(labels or []),
    )


def exemplar_events(
    run: ExemplarsRun,
    images: Iterator[pb.ExemplarsImage],
    alive: Callable[[], bool],
    clock: Callable[[], float] = time.monotonic,
    submit: Callable[..., Future] | None = None,
) -> Iterator[pb.ExemplarsResponse]:
    """Progress events while ``images`` are ranked batch by batch, then one result per target.

    Each image is decoded (within the per-image limits) and resized as it arrives; a batch runs
    once it is full. ``alive`` is checked before each batch: a cancelled or expired call stops
    within one batch. ``submit(fn, *args)`` starts each batch's forward pass where the server's
    torch work runs and returns its future (default: runs it here). One batch is in flight while
    this thread ranks the one before and reads the next images: the compute owner then runs
    forward passes back to back instead of waiting on the ranking and the stream."""
    submit = submit or _run_now
    start = last = clock()
    batch: list[tuple[str, np.ndarray]] = []
    in_flight: tuple[list[tuple[str, np.ndarray]], Future] | None = None
    index = 0

    def rank_in_flight() -> Iterator[pb.ExemplarsResponse]:
        nonlocal in_flight, last
        if in_flight is None:
            return
        done, future = in_flight
        in_flight = None
        run.rank(done, future.result())
        now = clock()
        if now - last >= PROGRESS_SECONDS:
            last = now
            yield _progress(run, now - start)

    def flush() -> Iterator[pb.ExemplarsResponse]:
        nonlocal in_flight, batch
        if not alive():
            raise ServiceError(
                grpc.StatusCode.CANCELLED, "the call ended before the ranking finished", reason="CANCELLED"
            )
        future = submit(run.activations, batch)
        yield from rank_in_flight()
        in_flight, batch = (batch, future), []

    for msg in images:
        image = image_of(msg, index, run.limits)
        batch.append((msg.id or str(index), resize(image, run.height, run.width)))
        del image  # only the model-size copy stays until its batch runs
        index += 1
        if len(batch) >= run.batch_size:
            yield from flush()
    if batch:
        yield from flush()
    yield from rank_in_flight()
    if run.seen == 0:
        raise invalid("the stream sent no images after the header", field="image")
    yield _progress(run, clock() - start)
    for result in submit(lambda: list(run.results())).result():
        yield pb.ExemplarsResponse(result=result)


def _run_now(fn: Callable[..., Any], *args: Any) -> Future:
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except BaseException as exc:  # the caller's .result() raises it
        future.set_exception(exc)
    return future


def image_of(msg: pb.ExemplarsImage, index: int, limits: JobLimits) -> np.ndarray:
    """One streamed image as H×W×3 uint8: decoded from ``data``, or taken from ``pixels``; errors
    name ``images[index]``."""
    field_name = f"images[{index}]"
    if not msg.HasField("pixels"):
        return decode_image(msg.data, index, limits, name="images")
    if msg.data:
        raise invalid(f"{field_name} sets both data and pixels: send one", field=field_name)
    px = msg.pixels
    h, w, c = int(px.height), int(px.width), int(px.channels)
    if h < 1 or w < 1 or c not in (1, 3, 4):
        raise invalid(
            f"{field_name}.pixels is {h}×{w}×{c}: height and width must be ≥ 1, channels 1, 3 or 4",
            field=f"{field_name}.pixels",
        )
    if h * w > limits.max_input_pixels:
        raise exhausted(
            f"{field_name} is {w}×{h} pixels; this server takes at most {limits.max_input_pixels} pixels",
            field=f"{field_name}.pixels",
        )
    if len(px.data) != h * w * c:
        raise invalid(
            f"{field_name}.pixels.data is {len(px.data)} bytes; {h}×{w}×{c} needs {h * w * c}",
            field=f"{field_name}.pixels.data",
        )
    array = np.frombuffer(px.data, dtype=np.uint8).reshape(h, w, c)
    if c == 1:
        return np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3]) if c == 4 else array


def _progress(run: ExemplarsRun, seconds: float) -> pb.ExemplarsResponse:
    rate = run.seen / seconds if seconds > 0 else 0.0
    return pb.ExemplarsResponse(progress=pb.ExemplarsProgress(images_seen=run.seen, images_per_second=rate))
