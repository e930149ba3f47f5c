"""A declared input size over a real server: a dynamic-size model that runs at one odd size only (at none
of converters.model.COMMON_SIZES) is stored when the upload declares that size, and refused with the way to
declare it otherwise. Both the vetting child and the server's own load (ListTaps) must use the size."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from converters.model import COMMON_SIZES
from service.api.preimage.v1 import preimage_pb2 as pb
from service.client import PreimageClient
from service.client.library import _with_size
from service.rpc.app import start_server
from service.rpc.config import ServerConfig

HEIGHT, WIDTH = 50, 32  # 50: not a common size, so probing cannot find it


def odd_height_net() -> bytes:
    """Conv over [1, 3, ?, 32], then a Concat along the width with a constant [1, 4, 50, 8] block: the graph
    runs only when the input is 50 pixels high."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((1, 4, HEIGHT, 8)).astype(np.float32), "side"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="/conv/Conv"),
        helper.make_node("Concat", ["c", "side"], ["cat"], axis=3, name="/Concat"),
        helper.make_node("Relu", ["cat"], ["r"], name="/Relu"),
        helper.make_node("ReduceMean", ["r"], ["y"], axes=[2, 3], keepdims=0, name="/ReduceMean"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", WIDTH])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph(nodes, "odd", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    running = start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path_factory.mktemp("store"), seed_bundled=False))
    with PreimageClient(f"127.0.0.1:{running.port}", timeout=300) as c:
        yield c
    running.stop(grace=None)


def test_the_model_needs_a_declared_size() -> None:
    assert HEIGHT not in COMMON_SIZES  # otherwise probing would find it and nothing here would be tested


def test_upload_without_size_is_refused_with_what_to_do(client: PreimageClient) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.upload(odd_height_net(), name="odd")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = info.value.details()
    assert "Concat node '/Concat'" in message and "--size HxW" in message
    assert client.models() == []


def test_upload_with_declared_size_is_served_at_it(client: PreimageClient) -> None:
    model = client.upload(odd_height_net(), name="odd", size=(HEIGHT, WIDTH)).model
    assert (model.preprocessing.height, model.preprocessing.width) == (HEIGHT, WIDTH)
    # size= declares the size only: mean and std are still the defaults, not the uploader's
    assert model.preprocessing_source == "default"
    assert model.parity < 1e-4
    # ListTaps converts the stored model in the server process, from the recorded request
    taps = client.taps(model.id)
    assert (taps.nominal_height, taps.nominal_width) == (HEIGHT, WIDTH)
    assert taps.taps[-1].shape == [4]


def test_size_keyword_fills_preprocessing() -> None:
    given = pb.Preprocessing(mean=[0.5, 0.5, 0.5])
    sized = _with_size(given, (np.int64(HEIGHT), WIDTH))
    assert (sized.height, sized.width) == (HEIGHT, WIDTH) and list(sized.mean) == [0.5] * 3
    assert not given.HasField("height")  # the caller's message is left alone
    assert _with_size(pb.Preprocessing(height=HEIGHT), (HEIGHT, WIDTH)).width == WIDTH
    with pytest.raises(ValueError, match="preprocessing gives 64"):
        _with_size(pb.Preprocessing(height=64), (HEIGHT, WIDTH))
    for bad in ((HEIGHT,), (HEIGHT, 0), (50.5, WIDTH), "50x32"):
        with pytest.raises(ValueError):
            _with_size(pb.Preprocessing(), bad)
