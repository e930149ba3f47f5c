"""Request validation and job running, without a server: the pieces behind the status codes."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from service.api.preimage.v1 import preimage_pb2 as pb
from service.energy import EnergyParams
from service.energy.presets import preset_params
from service.jobs.errors import ServiceError
from service.jobs.images import contact_sheet
from service.jobs.job import JobLimits, decode_image, params_from_message, params_message


def test_unset_params_keep_the_paper_defaults_for_inversion() -> None:
    assert params_from_message(pb.EnergyParams(), "invert") == EnergyParams()
    msg = pb.EnergyParams(loss_weight=20, beta=1.5, steps=40, optimizer=pb.OPTIMIZER_ADAM)
    given = params_from_message(msg, "invert")
    assert (given.loss_weight, given.beta, given.steps, given.optimizer) == (20, 1.5, 40, "adam")
    assert given.alpha == 6 and given.refine_steps is None  # still resolved per task later
    # Explicit zeros are honoured, not mistaken for "unset" (proto3 optional).
    assert params_from_message(pb.EnergyParams(lambda_tv=0.0, refine_steps=0), "invert").lambda_tv == 0.0


def test_maximize_defaults_to_the_natural_preset_and_fields_override_it() -> None:
    natural = params_from_message(pb.EnergyParams(), "maximize")
    assert natural == preset_params("natural", "maximize")
    assert natural.parameterization == "phase" and natural.copies > 1
    paper = params_from_message(pb.EnergyParams(preset=pb.PRESET_PAPER), "maximize")
    assert paper == EnergyParams()
    mixed = params_from_message(
        pb.EnergyParams(copies=2, parameterization=pb.PARAMETERIZATION_FOURIER, spatial=pb.SPATIAL_CENTRE), "maximize"
    )
    assert (mixed.copies, mixed.parameterization, mixed.spatial) == (2, "fourier", "centre")
    assert mixed.rotate == natural.rotate  # the rest still comes from the preset


@pytest.mark.parametrize("task", ["invert", "maximize", "caricature"])
@pytest.mark.parametrize("preset", [pb.PRESET_PAPER, pb.PRESET_NATURAL])
def test_resolved_params_round_trip(task: str, preset: int) -> None:
    resolved = params_from_message(pb.EnergyParams(preset=preset), task).resolved(task, 32, 32, 4)
    msg = params_message(resolved)
    assert params_from_message(msg, task) == resolved
    if preset == pb.PRESET_PAPER and task == "invert":
        assert msg.loss_weight == 300 and msg.refine_steps == 50 and msg.jitter == 1


@pytest.mark.parametrize(
    ("params", "hint"),
    [
        (pb.EnergyParams(steps=-1), "steps"),
        (pb.EnergyParams(alpha=0.5), "alpha"),
        (pb.EnergyParams(momentum=1.0), "momentum"),
        (pb.EnergyParams(learning_rate=float("inf")), "finite"),
        (pb.EnergyParams(jitter=0), "jitter"),
        (pb.EnergyParams(preset=7), "preset"),
        (pb.EnergyParams(parameterization=9), "parameterization"),
        (pb.EnergyParams(spatial=5), "spatial"),
        (pb.EnergyParams(copies=0, parameterization=pb.PARAMETERIZATION_PHASE), "copies"),
        (pb.EnergyParams(copies=4, preset=pb.PRESET_PAPER), "views"),
        (pb.EnergyParams(rotate=400), "rotate"),
        (pb.EnergyParams(crop_end=0.0), "crop"),
        (pb.EnergyParams(scale_min=2, scale_max=1), "scale_min"),
        (pb.EnergyParams(noise=-0.1), "noise"),
        (pb.EnergyParams(anchor=-1), "anchor"),
        (pb.EnergyParams(diversity=1, preset=pb.PRESET_PAPER), "diversity"),
        (pb.EnergyParams(optimizer=pb.OPTIMIZER_PAPER), "optimizer"),  # natural maximize: no paper rule
        (pb.EnergyParams(optimizer=pb.OPTIMIZER_NADAM, preset=pb.PRESET_PAPER), "nadam"),
        (pb.EnergyParams(fourier_decay=9), "fourier_decay"),
        (pb.EnergyParams(canvas=0.5), "canvas must"),
        (pb.EnergyParams(canvas=8), "canvas must"),
        (pb.EnergyParams(canvas=2, preset=pb.PRESET_PAPER), "canvas needs"),
    ],
)
def test_bad_params_are_invalid_argument(params: pb.EnergyParams, hint: str) -> None:
    with pytest.raises(ServiceError) as err:
        params_from_message(params, "maximize")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and hint in err.value.message


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_image_accepts_any_pillow_mode() -> None:
    limits = JobLimits()
    grey = decode_image(_png(np.full((5, 7), 9, np.uint8)), 0, limits)
    assert grey.shape == (5, 7, 3) and (grey == 9).all()
    rgba = decode_image(_png(np.zeros((4, 4, 4), np.uint8)), 0, limits)
    assert rgba.shape == (4, 4, 3)


@pytest.mark.parametrize(
    ("data", "code", "hint"),
    [
        (b"", grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (b"\x89PNG\r\n\x1a\n broken", grpc.StatusCode.INVALID_ARGUMENT, "not an image"),
        (_png(np.zeros((300, 300), np.uint8)), grpc.StatusCode.RESOURCE_EXHAUSTED, "300×300"),
    ],
)
def test_decode_image_refusals(data: bytes, code: grpc.StatusCode, hint: str) -> None:
    with pytest.raises(ServiceError) as err:
        decode_image(data, 2, JobLimits(max_input_pixels=256 * 256))
    assert err.value.code == code and hint in err.value.message and "images[2]" in err.value.message


def test_contact_sheet_layout() -> None:
    tiles = [np.full((4, 6, 3), i, np.uint8) for i in range(5)]
    sheet = contact_sheet(tiles, gap=1)
    assert sheet.shape == (2 * 4 + 1, 3 * 6 + 2, 3)  # 3 columns, 2 rows
    assert (sheet[:4, 7:13] == 1).all() and (sheet[5:, 14:] == 255).all()
