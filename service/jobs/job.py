"""Visualization jobs: from a validated request to a stream of progress events and results.

``build_job`` turns an Invert/Maximize/Caricature request into a ``Job`` (every check that can fail
happens here, before any optimization starts). ``service.scheduler.Scheduler`` runs jobs, batching
compatible ones, and hands their events to the RPC through the ``JobHandle``'s queue.

Why a queue between the job and the RPC thread: the scheduler's loop is the only place that knows
the optimizer's step, and the RPC only relays.
"""

from __future__ import annotations

import io
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from service.api.enums import ENERGY_ENUMS
from service.api.preimage.v1 import preimage_pb2 as pb
from service.energy import (
    EnergyParams,
    Objective,
    Problem,
    Result,
    channel_weights,
    direction_weights,
    from_uint8,
    neuron_weights,
)
from service.energy.presets import preset_params
from service.jobs.errors import ServiceError, exhausted, invalid, is_allocation_failure, out_of_memory
from service.jobs.images import png_bytes
from service.jobs.limits import JobLimits
from service.jobs.reference import amplitude_of, amplitude_spectrum, center_crop_resize, effective_receptive_field
from service.jobs.reference import channel_max as channel_max_stats

DEFAULT_SIZE = 224
DEFAULT_REPORT_EVERY = 10
# Enum fields: {value: name}; UNSPECIFIED (0) is absent and means the preset's choice.
_ENUMS = {name: {v: k for k, v in values.items()} for name, values in ENERGY_ENUMS.items()}
_FLOAT_PARAMS = (
    "loss_weight", "alpha", "lambda_alpha", "beta", "lambda_tv", "b_norm", "tv_norm", "bound",
    "refine_lr_scale", "lr_end_scale", "learning_rate", "momentum", "decay", "fourier_decay", "translate", "scale_min",
    "scale_max", "rotate", "crop_start", "crop_end", "crop_spread", "noise", "anchor", "diversity", "canvas",
)  # fmt: skip
_INT_PARAMS = ("jitter", "steps", "refine_steps", "copies")
# EnergyParams.amplitude_images: each photograph gives 10 crops at the output size, all held at
# once as float32 for the spectrum (16 photos at 224 px: ~100 MB), so the count is capped.
MAX_AMPLITUDE_IMAGES = 16


# -- request → energy ---------------------------------------------------------------------------
def params_from_message(msg: pb.EnergyParams, task: str) -> EnergyParams:
    """The request's hyperparameters: its preset's (or the task's default preset's) values, with
    every field the request sets on top."""
    given: dict[str, Any] = {}
    for name in _FLOAT_PARAMS:
        if msg.HasField(name):
            value = getattr(msg, name)
            if not math.isfinite(value):
                raise invalid(f"params.{name} must be a finite number, got {value}", field=f"params.{name}")
            given[name] = float(value)
    for name in _INT_PARAMS:
        if msg.HasField(name):
            given[name] = int(getattr(msg, name))
    for name, values in _ENUMS.items():
        value = getattr(msg, name)
        if value != 0 and value not in values:
            raise invalid(f"params.{name} {value} is not a known value", field=f"params.{name}")
        if value in values and name != "preset":
            given[name] = values[value]
    try:
        params = preset_params(_ENUMS["preset"].get(msg.preset), task, **given)  # type: ignore[arg-type]
        params.validate()
    except ValueError as exc:
        # The energy's messages start with the field they are about ("beta must be ...").
        first = str(exc).split(" ", 1)[0].strip(":,")
        field = f"params.{first}" if first in pb.EnergyParams.DESCRIPTOR.fields_by_name else "params"
        raise invalid(f"params: {exc}", field=field) from exc
    return params


def params_message(p: EnergyParams) -> pb.EnergyParams:
    """EnergyParams (resolved) → proto, every field set."""
    msg = pb.EnergyParams()
    for name, values in _ENUMS.items():
        if name != "preset":  # the resolved fields say everything a preset did
            setattr(msg, name, next(k for k, v in values.items() if v == getattr(p, name)))
    for name in _FLOAT_PARAMS + _INT_PARAMS:
        value = getattr(p, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def image_size(data: bytes, index: int, limits: JobLimits) -> tuple[int, int]:
    """(H, W) of encoded bytes from the header alone, with the checks ``decode_image`` makes first."""
    if not data:
        raise invalid(f"images[{index}] is empty: send the bytes of a PNG or JPEG file", field=f"images[{index}]")
    if len(data) > limits.max_image_bytes:
        raise exhausted(
            f"images[{index}] is {len(data)} bytes; this server accepts at most {limits.max_image_bytes}",
            field=f"images[{index}]",
        )
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Image.DecompressionBombError as exc:
        raise exhausted(f"images[{index}] is too large to decode: {exc}", field=f"images[{index}]") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise invalid(
            f"images[{index}] is not an image Pillow can read (send PNG or JPEG bytes): {exc}", field=f"images[{index}]"
        ) from exc
    if w * h > limits.max_input_pixels:
        raise exhausted(
            f"images[{index}] is {w}×{h} pixels; this server decodes at most {limits.max_input_pixels} pixels",
            field=f"images[{index}]",
        )
    return h, w


def decode_image(data: bytes, index: int, limits: JobLimits, name: str = "images") -> np.ndarray:
    """Encoded bytes → H×W×3 uint8 RGB, refusing non-images and oversized ones before decoding;
    errors name the request field ``name[index]``."""
    if not data:
        raise invalid(f"{name}[{index}] is empty: send the bytes of a PNG or JPEG file", field=f"{name}[{index}]")
    if len(data) > limits.max_image_bytes:
        raise exhausted(
            f"{name}[{index}] is {len(data)} bytes; this server accepts at most {limits.max_image_bytes}",
            field=f"{name}[{index}]",
        )
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size  # from the header: nothing decoded yet
        if w * h > limits.max_input_pixels:
            raise exhausted(
                f"{name}[{index}] is {w}×{h} pixels; this server decodes at most {limits.max_input_pixels} pixels",
                field=f"{name}[{index}]",
            )
        img.load()
        rgb = img.convert("RGB")
    except ServiceError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own cap fires in open(), before ours
        raise exhausted(f"{name}[{index}] is too large to decode: {exc}", field=f"{name}[{index}]") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise invalid(
            f"{name}[{index}] is not an image Pillow can read (send PNG or JPEG bytes): {exc}", field=f"{name}[{index}]"
        ) from exc
    return np.asarray(rgb, dtype=np.uint8)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre-crop to the target's aspect ratio, then resize (bicubic): no stretching."""
    if image.shape[:2] == (height, width):
        return image
    return center_crop_resize(image, height, width)


def tensor_message(x: torch.Tensor) -> pb.FloatTensor:
    arr = np.ascontiguousarray(x.detach().cpu().numpy().astype("<f4"))
    return pb.FloatTensor(shape=list(arr.shape), data=arr.tobytes())


# -- jobs ---------------------------------------------------------------------------------------
@dataclass
class Job:
    """A validated visualization request, ready to run."""

    task: str  # "invert" | "maximize" | "caricature"
    model_id: str
    tap_name: str
    phi: torch.nn.Module
    problems: list[Problem]
    descriptions: list[str]
    height: int
    width: int
    stride: int
    mean_rgb255: tuple[float, float, float]
    device: torch.device
    report_every: int
    preview_every: int
    return_tensor: bool
    contact_sheet: bool
    parity: Callable[[], float | None] = lambda: None
    seeds: list[int] = field(default_factory=list)
    channels: int = 3  # the model's input channels: what a parameterized image has
    magnitude: torch.Tensor | None = None  # amplitude spectrum of the phase parameterization


def fixed_input_size(converted: Any) -> tuple[int, int] | None:
    """(H, W) when the graph's image input has a fixed size, None when it is dynamic.

    Preprocessing.height/width are set in both cases (for a dynamic graph they are the nominal size
    taps are described at), so the graph's input is what tells them apart.
    """
    from converters.inputs import detect_input

    _, spec = detect_input(converted.onnx)
    return (spec.height, spec.width) if spec.height and spec.width else None


def _size(options: pb.RunOptions, converted: Any, first: tuple[int, int] | None, limits: JobLimits) -> tuple[int, int]:
    """The output size: fixed by the graph, else asked for, else the model's nominal size, else the
    first image's, else 224. Giving only one side keeps the aspect ratio of the default."""
    fixed = fixed_input_size(converted)
    h = options.height if options.HasField("height") and options.height > 0 else None
    w = options.width if options.HasField("width") and options.width > 0 else None
    if fixed is not None:
        if (h is not None and h != fixed[0]) or (w is not None and w != fixed[1]):
            raise invalid(
                f"this model's input is fixed at {fixed[0]}×{fixed[1]}; leave options.height/width unset "
                f"or set them to {fixed[0]} and {fixed[1]}",
                field="options.height",
            )
        h, w = fixed
    else:
        pre = converted.preprocessing
        if pre.height and pre.width:
            default = (pre.height, pre.width)
        elif first is not None:
            default = first
        else:
            default = (DEFAULT_SIZE, DEFAULT_SIZE)
        if h is None and w is None:
            h, w = default
        elif h is None:
            h = max(1, round(w * default[0] / default[1]))
        elif w is None:
            w = max(1, round(h * default[1] / default[0]))
    if h * w > limits.max_pixels:
        raise exhausted(
            f"an output of {h}×{w} pixels is larger than this server's limit of {limits.max_pixels} pixels",
            field="options.height",
        )
    return int(h), int(w)


def unknown_tap_message(converted: Any, exc: Any) -> str:
    """What an unknown tap is told: the count of the taps ListTaps lists (not of every name that
    resolves to one: aliases and module paths too), how taps are named, and the close names."""
    hint = f"; close names: {', '.join(exc.close)}" if exc.close else ""
    return (
        f"unknown tap {exc.name!r}: this model has {len(converted.taps)} taps (ListTaps, `preimage taps MODEL`), "
        f"each named by its ONNX value name or its node's name; torch module paths also work "
        f"(`preimage taps MODEL --all`){hint}"
    )


def find_tap(converted: Any, name: str) -> Any:
    """The tap ``name`` names (ONNX value name, node name or torch module path); INVALID_ARGUMENT
    otherwise (``unknown_tap_message``)."""
    from converters.errors import UnknownTap

    try:
        return converted.tap(name)
    except UnknownTap as exc:
        raise invalid(unknown_tap_message(converted, exc), field="tap", reason="UNKNOWN_TAP") from exc


def activation_bytes(converted: Any, tap: Any, height: int, width: int) -> int:
    """Bytes of the activations one image makes up to ``tap`` at height × width (float32): the
    taps' shapes at the model's nominal size, scaled by the ratio of pixels."""
    from converters.model import NOMINAL_SIZE

    pre = converted.preprocessing
    nominal = (pre.height or NOMINAL_SIZE) * (pre.width or NOMINAL_SIZE)
    values = sum(math.prod(d or 1 for d in t.shape) for t in converted.taps if t.index <= tap.index)
    return int(4 * values * max(1.0, height * width / nominal))


def job_bytes(
    converted: Any, tap: Any, height: int, width: int, n_targets: int, resolved: Any, measured: int | None = None
) -> tuple[int, int]:
    """(estimated bytes, network rows) a job needs: its rows' activations, kept for the backward
    pass, plus each target's image, gradient and optimizer state. ``measured``: one image's peak
    from a dry run at this size, where the graph sizes tensors from its input's shape."""
    per_row = 1 if resolved.parameterization == "pixel" else int(resolved.copies)
    rows = n_targets * per_row
    canvas_h, canvas_w = resolved.canvas_size(height, width)
    # Each target's canvas, gradient and optimizer state, and its views at the canvas size.
    images = n_targets * (6 + per_row) * 4 * 3 * canvas_h * canvas_w
    activations = max(activation_bytes(converted, tap, height, width), measured or 0)
    # 1.5: measured peak of a forward and backward on EfficientNet-Lite0 is ~1.3× the activations.
    return int(1.5 * rows * activations) + images, rows


# (tap, height, width, cap) → one image's peak bytes from a dry run, or None where the graph's tap
# shapes bound it; raises MemoryError when one image needs more than cap.
Measure = Callable[[Any, int, int, int], "int | None"]


def check_memory(
    converted: Any,
    tap: Any,
    height: int,
    width: int,
    n_targets: int,
    resolved: Any,
    limits: JobLimits,
    measure: Measure | None = None,
) -> None:
    """RESOURCE_EXHAUSTED, before any work, for a request estimated over ``limits.max_job_bytes``."""
    gib = 1 << 30
    try:
        measured = measure(tap, height, width, limits.max_job_bytes) if measure is not None else None
    except MemoryError as exc:
        raise exhausted(
            f"at {height}×{width} this model's graph up to tap {tap.alias!r} sizes its tensors from the input's "
            f"shape and needs more than this server's {limits.max_job_bytes / gib:.1f} GiB per request for one "
            "image alone (measured by a dry run): reduce the image size (options.height/width) or use an "
            "earlier tap",
            field="options.height",
        ) from exc
    need, rows = job_bytes(converted, tap, height, width, n_targets, resolved, measured)
    if need <= limits.max_job_bytes:
        return
    per_target = max(1, need // n_targets)
    fit = limits.max_job_bytes // per_target
    fewer = f"at most {fit} targets at this size" if fit >= 1 else "one target does not fit at this size"
    raise exhausted(
        f"this request needs about {need / gib:.1f} GiB ({n_targets} targets, {rows} network rows at "
        f"{height}×{width} up to tap {tap.alias!r}); this server runs at most {limits.max_job_bytes / gib:.1f} GiB "
        f"per request: reduce the image size, the number of targets ({fewer}), the views (copies) "
        "or use an earlier tap",
        field="options.height",
    )


def build_job(
    task: str,
    request: Any,
    converted: Any,
    model_id: str,
    device: torch.device,
    limits: JobLimits,
    parity: Callable[[str], float | None] | None = None,
    measure: Measure | None = None,
    compute: Callable[[Callable[[], Job]], Job] | None = None,
    stats_dir: Path | None = None,
) -> Job:
    """Validate ``request`` (InvertRequest, MaximizeRequest or CaricatureRequest) into a Job.
    ``compute``: runs the part that computes (targets, statistics, the amplitude) where the
    server's torch work runs; the validation before it stays on the caller's thread. The other
    arguments are ``prepare_job``'s."""
    materialize = prepare_job(task, request, converted, model_id, device, limits, parity, measure, stats_dir)
    return compute(materialize) if compute is not None else materialize()


def prepare_job(
    task: str,
    request: Any,
    converted: Any,
    model_id: str,
    device: torch.device,
    limits: JobLimits,
    parity: Callable[[str], float | None] | None = None,
    measure: Measure | None = None,
    stats_dir: Path | None = None,
    on_stage: Callable[[str, str], None] | None = None,
) -> Callable[[], Job]:
    """Validate ``request`` on the caller's thread; returns the torch part that makes the Job, to run
    where the server's torch work runs.
    ``measure``: the dry run for graphs whose memory their tap shapes do not bound (check_memory).
    ``stats_dir``: where the channel statistics of this model are kept between processes.
    ``on_stage(stage, message)``: told when the channel statistics are measured (ProgressEvent.stage)."""
    tap = find_tap(converted, request.tap)
    options = request.options
    params = params_from_message(request.params, task)
    if task in ("invert", "caricature"):
        if not request.images:
            raise invalid(f"{task} needs at least one image in `images`", field="images")
        if len(request.images) > limits.max_targets:
            raise exhausted(
                f"{len(request.images)} images in one request; the limit is {limits.max_targets}", field="images"
            )
        # Headers only, all of them, before any pixel is decoded: the request's pixel budget.
        sizes = [image_size(img.data, i, limits) for i, img in enumerate(request.images)]
        total = sum(h * w for h, w in sizes)
        if total > limits.max_request_pixels:
            raise exhausted(
                f"the {len(sizes)} images hold {total} pixels together; this server decodes at most "
                f"{limits.max_request_pixels} per request: send fewer or smaller images",
                field="images",
            )
    else:
        if not request.targets:
            raise invalid(
                "maximize needs at least one target in `targets` (a channel, neuron or direction)", field="targets"
            )
        if len(request.targets) > limits.max_targets:
            raise exhausted(
                f"{len(request.targets)} targets in one request; the limit is {limits.max_targets}", field="targets"
            )
    height, width = _size(options, converted, sizes[0] if task in ("invert", "caricature") else None, limits)
    resolved = params.resolved(task, height, width, tap.stride)  # type: ignore[arg-type]
    n_targets = len(request.images) if task in ("invert", "caricature") else len(request.targets)
    check_memory(converted, tap, height, width, n_targets, resolved, limits, measure)
    if resolved.steps + int(resolved.refine_steps or 0) > limits.max_steps:
        raise exhausted(
            f"{resolved.steps} + {resolved.refine_steps} steps is more than this server's limit of {limits.max_steps}",
            field="params.steps",
        )
    # The minimizer pads the image by the jitter: an absurd T would allocate (H+T)×(W+T) pixels.
    if resolved.jitter is not None and resolved.jitter > max(height, width):
        raise invalid(
            f"params.jitter {resolved.jitter} is larger than the image ({height}×{width}); use ≤ the tap's stride",
            field="params.jitter",
        )
    if request_has(request, "channel_max") and not (math.isfinite(request.channel_max) and request.channel_max >= 0):
        raise invalid(
            f"channel_max must be a finite number > 0 (0 or unset: measured), got {request.channel_max}",
            field="channel_max",
        )
    # From here on the work is torch's: on the compute owner's thread (Scheduler.call).
    def materialize() -> Job:
        # Spectra are of the optimized image, which may be a canvas larger than the output.
        canvas_h, canvas_w = params.canvas_size(height, width)
        magnitude = _client_amplitude(
            request.params, params, canvas_h, canvas_w, converted.preprocessing.channels, limits
        )
        mean = converted.preprocessing.mean_rgb255
        mean_t = torch.tensor(mean, dtype=torch.float32)
        phi = converted.representation(tap).to(device)
        seed0 = options.seed if options.HasField("seed") else 0

        problems: list[Problem] = []
        descriptions: list[str] = []
        if task in ("invert", "caricature"):
            # One image at a time: each is decoded, resized and run alone, so a request holds one
            # decoded image and one image's activations at most, whatever its number of images.
            starts_list, phi0_list = [], []
            for i, img in enumerate(request.images):
                start_i = from_uint8(resize(decode_image(img.data, i, limits), height, width), mean_t)
                starts_list.append(start_i)
                phi0_list.append(_run_phi(phi, start_i[None].to(device), tap.alias).cpu()[0])
            starts, phi0 = torch.stack(starts_list), torch.stack(phi0_list)
            if not torch.isfinite(phi0).all():
                raise invalid(f"the model's tap {tap.alias!r} is not finite (NaN/Inf) on the given image(s)")
            mask = _mask(request.mask, phi0.shape[1:]) if task == "invert" else None
            for i in range(len(starts_list)):
                try:
                    obj = Objective.invert(phi0[i], mask) if task == "invert" else Objective.caricature(phi0[i])
                except ValueError as exc:
                    raise invalid(f"images[{i}]: {exc}", field=f"images[{i}]") from exc
                start = starts[i] if task == "caricature" else None
                problems.append(Problem(obj, params, seed=_seed(seed0, i), start=start))
                descriptions.append(f"image {i}")
        else:
            shape = tuple(_run_phi(phi, torch.zeros(1, 3, height, width, device=device), tap.alias).shape[1:])
            # The paper's 1/(ρ²·M_k): ρ never exceeds the image; M_k is the client's, or measured per
            # channel on the reference photographs (cached per model, tap and size).
            rf = effective_receptive_field(tap.receptive_field_yx, height, width)
            given = request.channel_max if request.HasField("channel_max") and request.channel_max > 0 else None
            what = f"measuring the channel statistics of {tap.alias} at {height}×{width} on the reference photographs"
            announce = None if on_stage is None else lambda: on_stage("statistics", what)
            stats = None if given is not None else channel_max_stats(
                phi, f"{model_id}:{tap.name}", height, width, mean, cache_dir=stats_dir, on_measure=announce
            )

            def m_k(channel: int | None = None) -> float:
                if given is not None:
                    return float(given)
                assert stats is not None
                if channel is None:  # a direction: the layer's largest channel statistic
                    return float(stats.max())
                return float(stats[channel]) if 0 <= channel < stats.numel() else 1.0

            for i, target in enumerate(request.targets):
                kind = target.WhichOneof("kind")
                try:
                    if kind == "channel":
                        w = channel_weights(
                            shape, target.channel.channel, receptive_field=rf, channel_max=m_k(target.channel.channel),
                            spatial=params.spatial,
                        )  # fmt: skip
                        desc = f"channel {target.channel.channel}"
                    elif kind == "neuron":
                        n = target.neuron
                        w = neuron_weights(shape, n.channel, (n.y, n.x), receptive_field=rf, channel_max=m_k(n.channel))
                        desc = f"neuron {n.channel} at ({n.y}, {n.x})"
                    elif kind == "direction":
                        d = torch.tensor(list(target.direction.weights), dtype=torch.float32)
                        if d.numel() == math.prod(shape):
                            d = d.view(shape)
                        w = direction_weights(shape, d, receptive_field=rf, scale=m_k())
                        desc = f"direction ({d.numel()} weights)"
                    else:
                        raise ValueError("set one of channel, neuron or direction")
                except ValueError as exc:
                    raise invalid(
                        f"targets[{i}] on tap {tap.alias!r} (shape {list(shape)}): {exc}", field=f"targets[{i}]"
                    ) from exc
                # Repeats of one target form a group that the diversity term keeps apart.
                group = next((j for j, other in enumerate(request.targets[:i]) if other == target), i)
                problems.append(Problem(Objective.maximize(w), params, seed=_seed(seed0, i), group=group))
                descriptions.append(desc)

        # On each problem, not on the batch: jobs with other photographs (or none) still share a batch.
        for problem in problems:
            problem.magnitude = magnitude
        report_every = options.report_every if options.HasField("report_every") else DEFAULT_REPORT_EVERY
        return Job(
            task=task,
            model_id=model_id,
            tap_name=tap.name,
            phi=phi,
            problems=problems,
            descriptions=descriptions,
            height=height,
            width=width,
            stride=tap.stride,
            mean_rgb255=mean,
            device=device,
            report_every=report_every,
            preview_every=options.preview_every,
            return_tensor=options.return_tensor,
            contact_sheet=options.contact_sheet if options.HasField("contact_sheet") else True,
            parity=(lambda: parity(tap.name)) if parity is not None else (lambda: None),
            seeds=[p.seed for p in problems],
            channels=converted.preprocessing.channels,
            magnitude=(
                amplitude_spectrum(canvas_h, canvas_w, converted.preprocessing.channels)
                if params.parameterization == "phase" and magnitude is None
                else None
            ),
        )

    return materialize


def _client_amplitude(
    msg: pb.EnergyParams, params: EnergyParams, height: int, width: int, channels: int, limits: JobLimits
) -> torch.Tensor | None:
    """The mean amplitude spectrum of the request's ``params.amplitude_images`` at ``height`` ×
    ``width`` (the canvas; None when there are none), with the crops of the server's own photographs."""
    field = "params.amplitude_images"
    if not msg.amplitude_images:
        return None
    if params.parameterization != "phase":
        # Refused rather than ignored: a client that sends photographs expects them to count.
        raise invalid(
            f"{field} sets the amplitude of the phase parameterization; this request's parameterization is "
            f"{params.parameterization}: set params.parameterization to phase or send no amplitude images",
            field=field,
        )
    if len(msg.amplitude_images) > MAX_AMPLITUDE_IMAGES:
        raise invalid(f"{len(msg.amplitude_images)} images in {field}; at most {MAX_AMPLITUDE_IMAGES}", field=field)
    # Decoded one at a time as amplitude_of consumes them: one full-size image in memory at a time.
    decoded = (decode_image(img.data, i, limits, name=field) for i, img in enumerate(msg.amplitude_images))
    return amplitude_of(decoded, height, width, channels)


def request_has(request: Any, name: str) -> bool:
    """Whether ``request`` (any of the three) has the optional field ``name`` set."""
    return name in request.DESCRIPTOR.fields_by_name and request.HasField(name)


def _seed(seed0: int, index: int) -> int:
    """Target ``index``'s seed: seed + index, wrapped to the 64 bits a torch generator takes."""
    return (seed0 + index) % 2**64


def _run_phi(phi: torch.nn.Module, x: torch.Tensor, alias: str) -> torch.Tensor:
    """Φ(x) without gradients; a graph that cannot run at this size is the request's problem."""
    try:
        with torch.no_grad():
            return phi(x).float()
    except (RuntimeError, MemoryError) as exc:
        raise forward_error(exc, x, alias) from exc


def forward_error(exc: Exception, x: torch.Tensor, alias: str) -> ServiceError:
    """The request's error for a forward pass at ``x``'s size that raised ``exc`` (torch's, numpy's or
    onnxruntime's): RESOURCE_EXHAUSTED for a failed allocation, else INVALID_ARGUMENT."""
    h, w = x.shape[-2:]
    if is_allocation_failure(exc):
        # A MemoryError's own words are ours or numpy's (sizes), never a path: keep them.
        detail = str(exc) if isinstance(exc, MemoryError) else ""
        return out_of_memory(f"running the model at {h}×{w} up to tap {alias!r}", detail)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    return invalid(f"the model cannot run at {h}×{w} up to tap {alias!r} (try a larger size): {first}")


def _mask(msg: pb.FeatureMask, feature_shape: Sequence[int]) -> torch.Tensor | None:
    k = msg.center_size
    if k == 0:
        return None
    if len(feature_shape) < 3:
        raise invalid(
            f"mask.center_size needs a spatial tap (C×H×W); this tap's shape is {list(feature_shape)}",
            field="mask.center_size",
        )
    h, w = feature_shape[-2:]
    if k > min(h, w):
        raise invalid(f"mask.center_size {k} is larger than the feature map ({h}×{w})", field="mask.center_size")
    m = torch.zeros(tuple(feature_shape))
    top, left = (h - k) // 2, (w - k) // 2
    m[..., top : top + k, left : left + k] = 1.0
    return m


# -- running ------------------------------------------------------------------------------------
@dataclass
class JobStats:
    """How a job ended; kept for tests and logs (cancel latency is measured from these)."""

    steps: int = 0  # steps of the batch run (the largest over targets)
    cancelled: bool = False
    cancel_time: float | None = None  # monotonic time cancel() was called
    step_at_cancel: int | None = None
    end_time: float | None = None  # monotonic time the optimization loop exited
    seconds: float = 0.0

    @property
    def steps_after_cancel(self) -> int | None:
        return None if self.step_at_cancel is None else self.steps - self.step_at_cancel

    @property
    def cancel_latency(self) -> float | None:
        if self.cancel_time is None or self.end_time is None:
            return None
        return self.end_time - self.cancel_time


_DONE = object()  # queued after the job's last event


class JobHandle:
    """A submitted job: iterate ``events()`` for (kind, message) pairs; ``cancel()`` stops it."""

    def __init__(self, job: Job):
        self.job = job
        self.stats = JobStats()
        self._events: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.step = 0  # the last step the scheduler ran for this job (read by cancel)

    def cancel(self) -> None:
        if not self._stop.is_set():
            self.stats.cancel_time = time.monotonic()
            self.stats.step_at_cancel = self.step
            self._stop.set()

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    def emit(self, kind: str, message: Any) -> None:
        self._events.put((kind, message))

    def finish(self) -> None:
        """No more events: ``events()`` returns once it has yielded those already emitted."""
        self._events.put(_DONE)

    def events(self, alive: Callable[[], bool] = lambda: True) -> Iterator[tuple[str, Any]]:
        """Events until the job ends; re-raises the job's error. Stops early once ``alive()`` is false."""
        while True:
            try:
                item = self._events.get(timeout=0.5)
            except queue.Empty:
                if not alive():
                    self.cancel()
                    return
                continue
            if item is _DONE:
                return
            kind, message = item
            if kind == "error":
                raise message
            yield kind, message


def result_message(job: Job, index: int, result: Result, parity: float | None) -> pb.VisualizationResult:
    msg = pb.VisualizationResult(
        target_index=index,
        png=png_bytes(result.image_uint8),
        terms=result.terms,
        objective_value=result.objective_value,
        steps_run=result.steps_run,
        stopped=result.stopped,
        description=job.descriptions[index],
        resolved=pb.ResolvedParams(
            params=params_message(result.params), seed=job.seeds[index], height=job.height, width=job.width
        ),
    )
    if result.feature_error is not None:
        msg.feature_error = result.feature_error
    if parity is not None:
        msg.tap_parity = parity
    if job.return_tensor:
        msg.tensor.CopyFrom(tensor_message(result.image))
    return msg
