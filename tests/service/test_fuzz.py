"""Fuzz targets (hypothesis) for the two places untrusted input enters: the model loader and the
request validator.

Properties:
- loader: ``converters.loading.load_untrusted`` (the gate every upload passes first) either returns
  a model or raises ModelError; ``load_model`` on what passed the gate raises only ordinary
  exceptions (the vetting child turns those into INVALID_ARGUMENT), and the vetting child itself
  (``vet_model``) answers or raises VetError for every mutant: nothing kills the caller;
- validator: ``build_job`` returns a Job or raises what it documents, ServiceError
  (INVALID_ARGUMENT or RESOURCE_EXHAUSTED) or UnknownTap (INVALID_ARGUMENT through
  ``service.rpc.errors.status_for``); any other exception, even one status_for would map, is a
  check build_job missed; the preprocessing and energy-parameter parsers only raise ServiceError.
Every example has a deadline (no hang). The budget is bounded for CI: PREIMAGE_FUZZ_EXAMPLES
(default 40) examples per target, under a minute on 2 cores for the whole file; raise it for a
longer local run (``PREIMAGE_FUZZ_EXAMPLES=2000 pytest tests/service/test_fuzz.py``).
"""

from __future__ import annotations

import io
import os
from datetime import timedelta
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from converters.errors import ModelError, UnknownTap
from converters.loading import LoadLimits, load_untrusted
from service.api.preimage.v1 import preimage_pb2 as pb
from service.jobs.errors import ServiceError
from service.jobs.job import JobLimits, build_job, params_from_message
from service.rpc.errors import status_for
from tests._service_models import conv_net, fcn

EXAMPLES = int(os.environ.get("PREIMAGE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=20),  # generous on a shared 2-core box; a hang still fails
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=os.environ.get("PREIMAGE_FUZZ_RANDOM") is None,  # reproducible in CI unless asked
    database=None,
)
BASE = conv_net(seed=41)
LIMITS = LoadLimits(max_bytes=1 << 20, max_tensor_elements=1 << 20, max_total_elements=1 << 21,
                    max_value_elements=1 << 22, max_nodes=200)  # fmt: skip
INT64 = st.integers(-(2**63), 2**63 - 1)
WEIRD_INTS = st.one_of(st.integers(-3, 70), st.sampled_from([2**31 - 1, 2**32, 2**62, -(2**31)]), INT64)
OPS = ["Conv", "Relu", "Gemm", "Reshape", "Loop", "If", "Scan", "Einsum", "Resize", "NonZero", "Bogus", ""]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


# -- model mutations ------------------------------------------------------------------------------------
@st.composite
def mutants(draw: st.DrawFn) -> bytes:
    """A structurally mutated conv_net, sometimes then cut or bit-flipped."""
    model = onnx.load_from_string(BASE)
    g = model.graph
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["dims", "external", "op", "domain", "drop", "input", "opset", "attr", "ir"]))
        if kind == "dims":
            t = draw(st.sampled_from(list(g.initializer)))
            i = draw(st.integers(0, len(t.dims)))
            if i < len(t.dims):
                t.dims[i] = draw(WEIRD_INTS)
            else:
                t.dims.append(draw(WEIRD_INTS))
        elif kind == "external":
            t = draw(st.sampled_from(list(g.initializer)))
            t.data_location = onnx.TensorProto.EXTERNAL
            e = t.external_data.add()
            e.key = draw(st.sampled_from(["location", "offset", "length", "checksum", "x"]))
            e.value = draw(st.sampled_from(["/etc/passwd", "../../x", "a/../../b", "w.bin", "", "\0", "9" * 30]))
        elif kind == "op" and len(g.node):
            draw(st.sampled_from(list(g.node))).op_type = draw(st.sampled_from(OPS))
        elif kind == "domain" and len(g.node):
            draw(st.sampled_from(list(g.node))).domain = draw(st.sampled_from(["com.microsoft", "ai.onnx.ml", "x"]))
        elif kind == "drop" and len(g.node):
            del g.node[draw(st.integers(0, len(g.node) - 1))]
        elif kind == "input":
            dim = g.input[0].type.tensor_type.shape.dim[draw(st.integers(0, 3))]
            if draw(st.booleans()):
                dim.dim_value = draw(st.integers(-5, 2**40))
            else:
                dim.dim_param = draw(st.text(max_size=5))
        elif kind == "opset":
            model.opset_import[0].version = draw(st.integers(-1, 40))
        elif kind == "attr":
            node = draw(st.sampled_from([n for n in g.node if n.attribute] or list(g.node)))
            if node.attribute:
                a = draw(st.sampled_from(list(node.attribute)))
                if a.ints:
                    a.ints[draw(st.integers(0, len(a.ints) - 1))] = draw(WEIRD_INTS)
                else:
                    a.i = draw(WEIRD_INTS)
        elif kind == "ir":
            model.ir_version = draw(st.integers(0, 20))
    raw = model.SerializeToString()
    cut = draw(st.sampled_from(["none", "none", "truncate", "flip"]))
    if cut == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif cut == "flip":
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
        raw = bytes(data)
    return raw


@FUZZ
@given(raw=mutants())
def test_loader_gate_raises_only_model_errors(raw: bytes) -> None:
    try:
        model = load_untrusted(raw, LIMITS)
    except ModelError:
        return
    # What passed the gate carries no external data and only allowed domains.
    for t in model.graph.initializer:
        assert t.data_location != onnx.TensorProto.EXTERNAL


@FUZZ
@given(raw=mutants())
def test_conversion_of_mutants_fails_cleanly(raw: bytes) -> None:
    from converters.model import load_model

    try:
        load_model(raw, limits=LIMITS, verify=False)
    except ModelError:
        pass
    except Exception as exc:  # noqa: BLE001 - allowed (the vetting child reports it as INVALID_ARGUMENT)
        assert not isinstance(exc, (MemoryError, RecursionError)), repr(exc)


@settings(FUZZ, max_examples=max(3, EXAMPLES // 8), deadline=timedelta(seconds=60))
@given(raw=mutants())
def test_vetting_child_answers_every_mutant(raw: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    from service.models.worker import VetError, WorkerLimits, vet_model

    path = tmp_path_factory.mktemp("vet") / "m.onnx"
    path.write_bytes(raw)
    try:
        answer = vet_model(str(path), None, WorkerLimits(cpu_seconds=30, wall_seconds=60))
    except VetError as exc:
        assert exc.kind in ("invalid", "resources") and str(exc)
    else:
        assert answer["ok"] and answer["tap_count"] > 0


# -- requests -------------------------------------------------------------------------------------------
def _png(mode: str, size: int = 32) -> bytes:
    img = Image.fromarray(np.random.default_rng(size).integers(0, 255, (size, size, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG" if mode != "CMYK" else "JPEG")
    return buf.getvalue()


IMAGES = [
    _png("RGB"),
    _png("L", 7),
    _png("P", 40),
    _png("CMYK"),
    _png("RGB", 200),
    b"",
    b"\x89PNG\r\n",
    _png("RGB")[:100],
]
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1.0, 1e-320, 1e308]))
U32 = st.integers(0, 2**32 - 1)
I32 = st.integers(-(2**31), 2**31 - 1)
TAPS = st.one_of(st.sampled_from(["relu2", "conv1", "fc", "logits", "r2", "relu1", "flatten"]), st.text(max_size=40))


@st.composite
def energy(draw: st.DrawFn) -> pb.EnergyParams:
    msg = pb.EnergyParams()
    for f in pb.EnergyParams.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        if f.type == f.TYPE_MESSAGE:  # amplitude_images: good, odd and broken encodings
            msg.amplitude_images.extend(pb.Image(data=d) for d in draw(st.lists(st.sampled_from(IMAGES), max_size=3)))
            continue
        if f.type == f.TYPE_ENUM:  # known values, the unspecified 0, and values no enum has
            value = draw(st.sampled_from([0, 1, 2, 3, 4, -1, 2**31 - 1]))
        elif f.name in ("steps", "refine_steps"):  # keep most jobs tiny; extremes still drawn
            value = draw(st.one_of(st.integers(-3, 4), I32))
        elif f.name in ("jitter", "copies"):
            value = draw(st.one_of(st.integers(0, 40), U32))
        else:
            value = draw(FLOATS)
        setattr(msg, f.name, value)
    return msg


@st.composite
def options(draw: st.DrawFn) -> pb.RunOptions:
    msg = pb.RunOptions()
    for name, values in (("height", U32), ("width", U32), ("seed", st.integers(0, 2**64 - 1)),
                         ("report_every", U32), ("preview_every", U32), ("contact_sheet", st.booleans())):  # fmt: skip
        if draw(st.booleans()):
            setattr(msg, name, draw(values))
    msg.return_tensor = draw(st.booleans())
    return msg


@st.composite
def targets(draw: st.DrawFn) -> list[pb.MaximizeTarget]:
    out = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["channel", "neuron", "direction", "none"]))
        t = pb.MaximizeTarget()
        if kind == "channel":
            t.channel.channel = draw(st.one_of(st.integers(0, 12), U32))
        elif kind == "neuron":
            t.neuron.channel, t.neuron.y, t.neuron.x = (draw(st.one_of(st.integers(0, 20), U32)) for _ in range(3))
        elif kind == "direction":
            t.direction.weights.extend(draw(st.lists(st.floats(width=32), max_size=draw(st.sampled_from([8, 10, 20])))))
        out.append(t)
    return out


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, Any]:
    task = draw(st.sampled_from(["invert", "maximize", "caricature"]))
    common = {"model": "m", "tap": draw(TAPS), "params": draw(energy()), "options": draw(options())}
    if task == "maximize":
        msg: Any = pb.MaximizeRequest(targets=draw(targets()), **common)
        if draw(st.booleans()):
            msg.channel_max = draw(FLOATS)
    else:
        images = [pb.Image(data=d) for d in draw(st.lists(st.sampled_from(IMAGES), max_size=3))]
        cls = pb.InvertRequest if task == "invert" else pb.CaricatureRequest
        msg = cls(images=images, **common)
        if task == "invert" and draw(st.booleans()):
            msg.mask.center_size = draw(st.one_of(st.integers(0, 20), U32))
    return task, msg


@pytest.fixture(scope="module")
def converted() -> dict[str, Any]:
    from converters.model import load_model

    return {"fixed": load_model(conv_net(seed=42), verify=False), "dynamic": load_model(fcn(seed=42), verify=False)}


REQUEST_LIMITS = JobLimits(max_pixels=48 * 48, max_input_pixels=256 * 256, max_targets=4, max_steps=20)


@FUZZ
@given(request=requests(), which=st.sampled_from(["fixed", "dynamic"]))
def test_request_validator_maps_every_error(converted: dict[str, Any], request: tuple[str, Any], which: str) -> None:
    task, msg = request
    try:
        job = build_job(task, msg, converted[which], "m", torch.device("cpu"), REQUEST_LIMITS)
    except (ServiceError, UnknownTap) as exc:  # what build_job raises; anything else fails the test
        known = status_for(exc)
        assert known is not None and known[0] in (grpc.StatusCode.INVALID_ARGUMENT,
                                                  grpc.StatusCode.RESOURCE_EXHAUSTED), (type(exc).__name__, known)
        return
    assert job.height * job.width <= REQUEST_LIMITS.max_pixels and 1 <= len(job.problems) <= 4
    for p in job.problems:
        r = p.params.resolved(task, job.height, job.width, job.stride)  # type: ignore[arg-type]
        assert r.steps + (r.refine_steps or 0) <= REQUEST_LIMITS.max_steps


@FUZZ
@given(msg=energy())
def test_energy_params_parser_raises_only_service_errors(msg: pb.EnergyParams) -> None:
    try:
        params_from_message(msg, "maximize")
    except ServiceError as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT


@FUZZ
@given(
    mean=st.lists(FLOATS, max_size=4),
    std=st.lists(FLOATS, max_size=4),
    scale=st.one_of(st.none(), FLOATS),
    order=st.integers(-1, 2**31 - 1),
    hw=st.tuples(st.one_of(st.none(), U32), st.one_of(st.none(), U32)),
)
def test_preprocessing_parser_raises_only_service_errors(mean, std, scale, order, hw) -> None:
    from service.rpc.messages import requested_preprocessing

    msg = pb.Preprocessing(mean=mean, std=std, channel_order=order)
    if scale is not None:
        msg.scale = scale
    for name, value in zip(("height", "width"), hw, strict=True):
        if value is not None:
            setattr(msg, name, value)
    try:
        out = requested_preprocessing(msg)
    except ServiceError as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT
        return
    for v in (out or {}).get("mean", []) + (out or {}).get("std", []):
        assert np.isfinite(v)
