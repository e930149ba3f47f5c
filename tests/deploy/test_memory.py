"""No request can take the server's memory: real `preimage serve` processes, their RSS read from
/proc before and after each hostile request.

Sizes stay modest (hundreds of MB at most on the code before these bounds): what is asserted is
the code and that the growth stays far below what the request would have taken.
"""

from __future__ import annotations

import io
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from service.client import PreimageClient, error_details
from tests.deploy import _servers

MIB = 1 << 20
FAST = {"steps": 2, "refine_steps": 0, "report_every": 0, "preset": "paper"}


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def _model(nodes: list, inits: list, output: str = "y") -> bytes:
    graph = helper.make_graph(
        nodes,
        "m",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", 4, "Ho", "Wo"])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def _conv(name: str, inp: str, out: str, inits: list) -> onnx.NodeProto:
    w = np.random.default_rng(0).normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    inits.append(numpy_helper.from_array(w, f"{name}_w"))
    return helper.make_node("Conv", [inp, f"{name}_w"], [out], name=name, pads=[1, 1, 1, 1])


def resize_net() -> bytes:
    """x → nearest Resize ×2 (the matrix path) → Conv."""
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["up"], name="up", mode="nearest"),
        _conv("conv", "up", "y", inits),
    ]
    return _model(nodes, inits)


def cubic_shape_net() -> bytes:
    """A tensor of H×H×H ones whose mean scales the conv: harmless at the nominal size, gigabytes
    at 1024 px; no bound from the taps' shapes sees it, so only the allocation fails."""
    inits = [
        numpy_helper.from_array(np.array([2], np.int64), "i2"),
        numpy_helper.from_array(np.array([0, 0, 0], np.int64), "zeros3"),
    ]
    nodes = [
        _conv("conv", "x", "c", inits),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "i2"], ["h"], axis=0),
        helper.make_node("Concat", ["h", "h", "h"], ["hhh"], axis=0),
        helper.make_node(
            "ConstantOfShape", ["hhh"], ["ones"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
        ),
        helper.make_node("ReduceMean", ["ones"], ["scale"], keepdims=0),
        helper.make_node("Mul", ["c", "scale"], ["y"], name="scaled"),
    ]
    return _model(nodes, inits)


def zeros_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _start(tmp_path: Path, max_job_bytes: int) -> _servers.ServerProcess:
    env = {
        "PREIMAGE_JOB_LIMITS_MAX_JOB_BYTES": str(max_job_bytes),
        "PREIMAGE_JOB_LIMITS_MAX_REQUEST_PIXELS": str(4 * 2000 * 2000),
        "PREIMAGE_JOB_LIMITS_MAX_PIXELS": str(1024 * 1024),
        "PREIMAGE_TORCH_THREADS": "1",
    }
    return _servers.start(tmp_path / "store", env=env)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_servers.ServerProcess]:
    proc = _start(tmp_path, max_job_bytes=256 * MIB)
    try:
        yield proc
    finally:
        proc.close()


@pytest.fixture
def roomy_server(tmp_path: Path) -> Iterator[_servers.ServerProcess]:
    """A budget no request here reaches: what fails is the allocation itself."""
    proc = _start(tmp_path, max_job_bytes=1 << 40)
    try:
        yield proc
    finally:
        proc.close()


def _cube_at_1024(client: PreimageClient, model_id: str) -> list[grpc.RpcError]:
    """A Maximize and an Invert of cubic_shape_net at 1024², each of which must fail: their errors."""
    errors = []
    for task in ("maximize", "invert"):
        with pytest.raises(grpc.RpcError) as err:
            if task == "maximize":
                client.maximize(model_id, "scaled", [0], height=1024, width=1024, **FAST).wait()
            else:
                client.invert(model_id, "scaled", [zeros_png(64)], height=1024, width=1024, **FAST).wait()
        errors.append(err.value)
    return errors


def _settle(pid: int) -> int:
    """RSS once a failed job's memory had time to be returned (the server trims 0.5 s after)."""
    time.sleep(1.5)
    return rss(pid)


def test_wide_resize_is_refused_before_its_matrix_is_built(server: _servers.ServerProcess) -> None:
    pid = server.proc.pid
    with PreimageClient(server.address, timeout=300) as client:
        model = client.upload(resize_net(), name="resize").model
        client.maximize(model.id, "y", [0], height=16, width=64, **FAST).wait()  # warm: conversion, first job
        before = rss(pid)
        for width in (6000, 6400):  # (in + out) × in floats: 412 and 469 MiB to build
            with pytest.raises(grpc.RpcError) as err:
                client.maximize(model.id, "y", [0], height=16, width=width, **FAST).wait()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
            assert "Resize" in err.value.details() and "pixels wide" in err.value.details()
        grown = _settle(pid) - before
        assert grown < 100 * MIB, f"RSS grew by {grown / MIB:.0f} MiB"
        # A width within the bound still runs
        assert client.maximize(model.id, "y", [0], height=16, width=512, **FAST).wait().results


def test_a_request_over_the_memory_budget_is_refused_at_admission(server: _servers.ServerProcess) -> None:
    pid = server.proc.pid
    with PreimageClient(server.address, timeout=300) as client:
        model = client.upload(resize_net(), name="resize").model
        client.maximize(model.id, "y", [0], height=32, width=32, **FAST).wait()
        before = rss(pid)
        # 32 targets at 512²: ~1.7 GiB estimated against a 256 MiB budget
        with pytest.raises(grpc.RpcError) as err:
            client.maximize(model.id, "y", list(range(4)) * 8, height=512, width=512, **FAST).wait()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        message = err.value.details()
        assert "GiB" in message and "reduce the image size, the number of targets" in message, message
        assert error_details(err.value).reason == "TOO_LARGE"
        assert _settle(pid) - before < 50 * MIB
        # What the message says fits, fits
        assert len(client.maximize(model.id, "y", [0, 1], height=128, width=128, **FAST).wait().results) == 2


def test_many_large_images_are_refused_from_their_headers(server: _servers.ServerProcess) -> None:
    pid = server.proc.pid
    png = zeros_png(2000)  # 12 MB decoded, a few KB encoded
    with PreimageClient(server.address, timeout=300) as client:
        model = client.upload(resize_net(), name="resize").model
        client.invert(model.id, "y", [zeros_png(32)], height=32, width=32, **FAST).wait()
        before = rss(pid)
        with pytest.raises(grpc.RpcError) as err:
            client.invert(model.id, "y", [png] * 12, height=32, width=32, **FAST).wait()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "fewer or smaller images" in err.value.details()
        assert _settle(pid) - before < 50 * MIB
        # Within the budget, decoded one at a time: 4 × 12 MB never held together
        run = client.invert(model.id, "y", [png] * 4, height=32, width=32, **FAST).wait()
        assert len(run.results) == 4
        assert _settle(pid) - before < 40 * MIB


def test_an_allocation_that_fails_is_resource_exhausted_and_its_memory_returned(
    roomy_server: _servers.ServerProcess,
) -> None:
    server = roomy_server
    pid = server.proc.pid
    with PreimageClient(server.address, timeout=300) as client:
        model = client.upload(cubic_shape_net(), name="cubic").model
        client.maximize(model.id, "scaled", [0], height=64, width=64, **FAST).wait()
        before = rss(pid)
        # The server may not grow its address space by more than 1 GiB from here (4 GiB are asked).
        _, hard = resource.prlimit(pid, resource.RLIMIT_AS)
        resource.prlimit(pid, resource.RLIMIT_AS, (vm_size(pid) + 1024 * MIB, hard))
        for err in _cube_at_1024(client, model.id):
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            assert "out of memory" in err.details()
            assert error_details(err).reason == "OUT_OF_MEMORY"
        after = _settle(pid)
        assert after <= 1.1 * before, f"RSS {before / MIB:.0f} → {after / MIB:.0f} MiB"
        assert client.maximize(model.id, "scaled", [0], height=64, width=64, **FAST).wait().results


def test_a_graph_that_sizes_tensors_from_its_input_is_measured_at_the_requested_size(
    server: _servers.ServerProcess,
) -> None:
    """The taps' shapes at 1024² say a few MiB; the graph's H×H×H ones take 4 GiB. A dry run at the
    requested size in a child sees it, so the request is refused before the server allocates."""
    pid = server.proc.pid
    with PreimageClient(server.address, timeout=300) as client:
        model = client.upload(cubic_shape_net(), name="cubic").model
        client.maximize(model.id, "scaled", [0], height=64, width=64, **FAST).wait()
        before = rss(pid)
        for err in _cube_at_1024(client, model.id):
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
            message = err.details()
            assert "dry run" in message and "reduce the image size" in message, message
            assert error_details(err).reason == "TOO_LARGE"
        assert _settle(pid) - before < 50 * MIB
        # 256² needs 64 MiB for the cube: measured, within the budget, and it runs
        assert client.maximize(model.id, "scaled", [0], height=256, width=256, **FAST).wait().results
