"""Request validation and job running, without a server: the pieces behind the status codes."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from service.api.preimage.v1 import preimage_pb2 as pb
from service.energy import EnergyParams
from service.jobs.errors import ServiceError
from service.jobs.images import contact_sheet
from service.jobs.job import JobLimits, decode_image, params_from_message, params_message


def test_unset_params_keep_the_paper_defaults() -> None:
    assert params_from_message(pb.EnergyParams()) == EnergyParams()
    given = params_from_message(pb.EnergyParams(loss_weight=20, beta=1.5, steps=40, optimizer=pb.OPTIMIZER_ADAM))
    assert (given.loss_weight, given.beta, given.steps, given.optimizer) == (20, 1.5, 40, "adam")
    assert given.alpha == 6 and given.refine_steps is None  # still resolved per task later
    # Explicit zeros are honoured, not mistaken for "unset" (proto3 optional).
    assert params_from_message(pb.EnergyParams(lambda_tv=0.0, refine_steps=0)).lambda_tv == 0.0


def test_resolved_params_round_trip() -> None:
    resolved = EnergyParams().resolved("invert", 32, 32, 4)
    msg = params_message(resolved)
    assert msg.loss_weight == 300 and msg.refine_steps == 50 and msg.jitter == 1
    assert params_from_message(msg) == resolved


@pytest.mark.parametrize(
    ("params", "hint"),
    [
        (pb.EnergyParams(steps=-1), "steps"),
        (pb.EnergyParams(alpha=0.5), "alpha"),
        (pb.EnergyParams(momentum=1.0), "momentum"),
        (pb.EnergyParams(learning_rate=float("inf")), "finite"),
        (pb.EnergyParams(jitter=0), "jitter"),
    ],
)
def test_bad_params_are_invalid_argument(params: pb.EnergyParams, hint: str) -> None:
    with pytest.raises(ServiceError) as err:
        params_from_message(params)
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
