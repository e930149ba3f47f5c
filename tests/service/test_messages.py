"""Messages and codes: a model deleted while it is first used is NOT_FOUND, and no message names
the server's files or a library's internals (onnxruntime's C++ sources). Over a real server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from service.client import PreimageClient
from service.rpc.app import RunningServer, start_server
from service.rpc.config import ServerConfig
from service.rpc.errors import TRAILER_BUDGET, Details, bounded_status, rich_status, scrub, trailer_bytes
from tests._service_models import conv_net

FAST = {"steps": 2, "refine_steps": 0, "report_every": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path_factory.mktemp("store"), seed_bundled=False))
    yield running
    running.stop(grace=None)


def _delete_when_looked_up(server: RunningServer, model_id: str) -> None:
    """The next lookup of ``model_id`` by an RPC is raced by a DeleteModel from another client,
    which completes between the lookup and the model's first use (its conversion)."""
    servicer = server.servicer
    original = servicer._get
    fired = threading.Event()

    def racing_get(ref: str, context: Any, fields: dict[str, Any]) -> Any:
        record = original(ref, context, fields)
        if record.id == model_id and not fired.is_set():
            fired.set()
            servicer._get = original
            done = threading.Thread(target=lambda: PreimageClient(f"127.0.0.1:{server.port}").delete(model_id))
            done.start()
            done.join(60)
        return record

    servicer._get = racing_get


@pytest.mark.parametrize("rpc", ["taps", "maximize"])
def test_a_delete_racing_the_first_use_is_not_found(server: RunningServer, rpc: str) -> None:
    with PreimageClient(f"127.0.0.1:{server.port}", timeout=120) as client:
        model = client.upload(conv_net(seed=31 if rpc == "taps" else 32), name=f"racy-{rpc}").model
        assert model.id not in server.servicer.cache  # never used yet
        _delete_when_looked_up(server, model.id)
        with pytest.raises(grpc.RpcError) as err:
            if rpc == "taps":
                client.taps(model.id)
            else:
                client.maximize(model.id, "relu2", [0], **FAST).wait()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()
        assert "was deleted" in err.value.details()
        assert str(server.servicer.store.root) not in err.value.details()
        assert model.id not in {m.id for m in client.models()}


def _ort_error(model: onnx.ModelProto) -> str:
    with pytest.raises(Exception) as err:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return str(err.value)


@pytest.mark.parametrize(("ir", "opset", "kept"), [(99, 17, "Unsupported model IR version: 99"), (8, 99, "Opset 99")])
def test_onnxruntime_messages_lose_their_cpp_sources(ir: int, opset: int, kept: str) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    raw = _ort_error(model)
    assert ".cc:" in raw or ".h:" in raw  # what onnxruntime says: its source file and a C++ signature
    clean = scrub(raw)
    assert kept in clean
    for internal in (".cc:", ".h:", "onnxruntime_src", "onnxruntime::", "std::", "[ONNXRuntimeError]"):
        assert internal not in clean, clean


@pytest.mark.parametrize("text", ["x" * 4000, "×" * 4000, "%" * 4000])
def test_a_long_message_is_cut_until_the_trailer_fits_what_clients_accept(text: str) -> None:
    # ASCII, two-byte UTF-8 and '%' percent-encode to 1, 6 and 3 bytes a character; the message
    # travels twice (grpc-message, and the rich details with a field violation's description).
    message = f"unknown tap {text!r}"
    details = Details("UNKNOWN_TAP", "tap", metadata={"tap": text * 25})
    assert trailer_bytes(rich_status(grpc.StatusCode.INVALID_ARGUMENT, message, details)) > 8192
    status, sent = bounded_status(grpc.StatusCode.INVALID_ARGUMENT, message, details)
    assert trailer_bytes(status) <= TRAILER_BUDGET < 8192
    assert sent.startswith("unknown tap ") and sent.endswith("… (truncated)") and status.details == sent
    short, kept = bounded_status(grpc.StatusCode.INVALID_ARGUMENT, "unknown tap 'relu9'", details)
    assert kept == "unknown tap 'relu9'"  # nothing to cut


def test_an_unknown_tap_of_any_length_gets_its_code(server: RunningServer) -> None:
    with PreimageClient(f"127.0.0.1:{server.port}", timeout=60) as client:
        model = client.upload(conv_net(seed=1), name="long-tap").model.id
        for _ in range(5):  # the soft limit refused at random: repeat
            with pytest.raises(grpc.RpcError) as err:
                client.maximize(model, "×" * 100_000, [0], preset="paper", **FAST).wait()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()[:200]
