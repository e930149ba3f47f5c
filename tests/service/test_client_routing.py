"""The client library sends the routing header (x-preimage-model) on every call about one model,
and only on those: a recording interceptor between the client and a real server sees what goes on
the wire, and the calls still succeed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from service.client import PreimageClient
from service.client.library import ROUTING_HEADER, routing_metadata
from service.rpc.app import RunningServer, start_server
from service.rpc.config import ServerConfig
from tests._service_models import conv_net


class Recorder(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

    def _record(self, details: Any) -> None:
        self.calls.append((details.method.rsplit("/", 1)[-1], dict(details.metadata or ())))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self._record(details)
        return continuation(details, request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        self._record(details)
        return continuation(details, request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        self._record(details)
        return continuation(details, request_iterator)

    def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        self._record(details)
        return continuation(details, request_iterator)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path_factory.mktemp("store"), seed_bundled=False))
    yield running
    running.stop(grace=None)


def test_model_scoped_calls_carry_the_model_and_others_do_not(server: RunningServer) -> None:
    recorder = Recorder()
    channel = grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{server.port}"), recorder)
    with PreimageClient("unused", timeout=120, channel=channel, token="t0ken") as client:
        model = client.upload(conv_net(seed=11), name="tiny").model
        client.models()
        client.server_info()
        client.statistics()
        client.get("tiny")
        client.taps(model.id)
        client.statistics(model.id)
        run = client.maximize("tiny", "conv2", [0], steps=2, refine_steps=0).wait()
        client.invert(model.id, "conv1", [photo()], steps=2, refine_steps=0).wait()
        client.delete(model.id)
    assert len(run.results) == 1
    sent = {(method, headers.get(ROUTING_HEADER)) for method, headers in recorder.calls}
    assert sent == {
        ("UploadModel", None),  # no model id before the upload: any replica
        ("ListModels", None),
        ("GetServerInfo", None),
        ("GetModelStatistics", None),  # statistics of every model
        ("GetModel", "tiny"),
        ("ListTaps", model.id),
        ("GetModelStatistics", model.id),
        ("Maximize", "tiny"),
        ("Invert", model.id),
        ("DeleteModel", model.id),
    }
    # The token interceptor adds to the call's metadata rather than replacing it.
    assert all(headers.get("authorization") == "Bearer t0ken" for _, headers in recorder.calls)


def test_a_name_gRPC_metadata_cannot_carry_is_percent_encoded() -> None:
    ((name, value),) = routing_metadata("réseau/α v2")
    assert name == ROUTING_HEADER and value == "r%C3%A9seau%2F%CE%B1%20v2" and value.isascii()
    assert routing_metadata("") == ()


def photo() -> bytes:
    import io

    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((64, 64)).save(buf, "PNG")
    return buf.getvalue()
