"""Models built to fool the release gate are refused at upload, over a real server.

A local function named like a standard op (``("", "Relu")`` whose body is Neg) is what the
service would inline and run, while onnxruntime, the judge, runs its own Relu: parity would
compare the service with itself. Operators outside the allowed domains are refused wherever they
sit: the main graph, a function body, or a subgraph inside a function body.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from service.client import PreimageClient, error_details
from service.rpc.app import RunningServer, start_server
from service.rpc.config import ServerConfig


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path_factory.mktemp("store"), seed_bundled=False))
    yield running
    running.stop(grace=None)


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[PreimageClient]:
    with PreimageClient(f"127.0.0.1:{server.port}", timeout=300) as c:
        yield c


def _net(act_domain: str, act_op: str, functions: list[onnx.FunctionProto], extra_opsets: dict[str, int]) -> bytes:
    w = np.random.default_rng(0).normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node(act_op, ["c"], ["y"], name="act", domain=act_domain),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
        [numpy_helper.from_array(w, "w")],
    )
    opsets = [helper.make_opsetid("", 17)] + [helper.make_opsetid(d, v) for d, v in extra_opsets.items()]
    model = helper.make_model(graph, opset_imports=opsets, functions=functions)
    model.ir_version = 8
    return model.SerializeToString()


def _function(domain: str, name: str, body: list[onnx.NodeProto], opsets: dict[str, int]) -> onnx.FunctionProto:
    return helper.make_function(
        domain, name, ["X"], ["Y"], body, [helper.make_opsetid(d, v) for d, v in opsets.items()]
    )


def _refused(client: PreimageClient, data: bytes, name: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        client.upload(data, name=name)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert error_details(err.value).reason == "MODEL_REFUSED"
    return err.value


def test_a_local_function_shadowing_a_standard_op_is_refused(client: PreimageClient) -> None:
    fake_relu = _function("", "Relu", [helper.make_node("Neg", ["X"], ["Y"])], {"": 17})
    err = _refused(client, _net("", "Relu", [fake_relu], {}), "shadow")
    assert "local function 'Relu'" in err.details() and "onnxruntime runs its own" in err.details()


def test_a_local_function_in_onnxruntimes_contrib_domain_is_refused(client: PreimageClient) -> None:
    fake = _function("com.microsoft", "FastGelu", [helper.make_node("Neg", ["X"], ["Y"])], {"": 17})
    err = _refused(client, _net("com.microsoft", "FastGelu", [fake], {"com.microsoft": 1}), "contrib")
    assert "'FastGelu'" in err.details()


def test_a_contrib_op_inside_a_subgraph_of_a_function_body_is_refused(client: PreimageClient) -> None:
    then = helper.make_graph(
        [helper.make_node("FastGelu", ["X"], ["t"], domain="com.microsoft")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Relu", ["X"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    body = [
        helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
        helper.make_node("If", ["cond"], ["Y"], then_branch=then, else_branch=other),
    ]
    mine = _function("my.ops", "Act", body, {"": 17, "com.microsoft": 1})
    err = _refused(client, _net("my.ops", "Act", [mine], {"my.ops": 1, "com.microsoft": 1}), "nested")
    assert "domain 'com.microsoft': FastGelu" in err.details()


def test_a_local_function_in_a_domain_of_its_own_is_served(client: PreimageClient, tmp_path: Path) -> None:
    # The same Neg body under a name of its own: nothing is shadowed, the judge runs what is served
    mine = _function("my.ops", "Flip", [helper.make_node("Neg", ["X"], ["Y"])], {"": 17})
    model = client.upload(_net("my.ops", "Flip", [mine], {"my.ops": 1}), name="own-function").model
    assert model.parity <= 1e-4
