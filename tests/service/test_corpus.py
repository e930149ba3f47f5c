"""A corpus of hostile and broken inputs, generated here, sent to a real server over gRPC.

Each case names the status code it must get. After the whole corpus the server must still answer
health and a normal request (``test_server_survives_the_corpus`` runs last in this module).
Valid but unusual images (16-bit, CMYK, palette, 1-bit, ...) must simply work: OK is their right
code.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from service.api.preimage.v1 import preimage_pb2 as pb
from service.api.preimage.v1 import preimage_pb2_grpc as pb_grpc
from service.client import PreimageClient
from service.jobs.job import JobLimits
from service.rpc.app import start_server
from service.rpc.config import ServerConfig
from service.rpc.messages import MAX_MESSAGE_BYTES
from tests._service_models import conv_net, external_data_net, fcn
from tests.service._logs import captured_server_logs

OK, INVALID, EXHAUSTED, NOT_FOUND = (
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
)
FAST = {"steps": 2, "refine_steps": 0, "report_every": 0}
U32, I32 = 2**32 - 1, 2**31 - 1


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    config = ServerConfig(
        store_dir=tmp_path_factory.mktemp("store"),
        seed_bundled=False,
        max_model_bytes=8 << 20,
        job_limits=JobLimits(max_input_pixels=256 * 256, max_pixels=128 * 128, max_steps=1000),
    )
    running = start_server("127.0.0.1:0", config)
    _SERVERS[f"127.0.0.1:{running.port}"] = running
    yield running
    running.stop(grace=None)


@pytest.fixture(scope="module")
def client(server: Any) -> Iterator[PreimageClient]:
    with PreimageClient(f"127.0.0.1:{server.port}", timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def models(client: PreimageClient) -> dict[str, str]:
    return {
        "_staging": str(client_server_staging(client)),
        "tiny": client.upload(conv_net(seed=31), name="tiny").model.id,
        "fcn": client.upload(fcn(seed=31), name="fcn").model.id,
        "nan": client.upload(nan_gradient_net(), name="nan-grad").model.id,
    }


def client_server_staging(client: PreimageClient) -> Path:
    return _SERVERS[client.address].servicer.store.staging


_SERVERS: dict[str, Any] = {}


# -- generated inputs ---------------------------------------------------------------------------------
def nan_gradient_net() -> bytes:
    """conv_net plus sqrt(z·z) at conv2, where z is a conv of the image with zero weights: z ≡ 0,
    so the forward pass is conv_net's own (finite; parity passes at upload), but the gradient
    through sqrt at 0 is ∞·0 = NaN and reaches the image on the minimizer's first step."""
    model = onnx.load_from_string(conv_net(seed=32))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((8, 3, 3, 3), np.float32), "wz"))
    nodes = list(model.graph.node)
    relu2 = next(n for n in nodes if n.name == "relu2")
    relu2.input[0] = "c2b"
    extra = [
        helper.make_node(
            "Conv", ["image", "wz"], ["z"], name="zero_conv", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
        ),  # fmt: skip
        helper.make_node("Mul", ["z", "z"], ["zz"], name="square"),
        helper.make_node("Sqrt", ["zz"], ["s"], name="sqrt"),
        helper.make_node("Add", ["c2", "s"], ["c2b"], name="add"),
    ]
    at = nodes.index(relu2)
    nodes[at:at] = extra
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def small_graph(nodes: list, inputs: list, outputs: list, inits: list | None = None, opset: int = 17, **kw) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *kw.get("extra_opsets", [])])
    model.ir_version = 8
    return model.SerializeToString()


def image_in(*dims: int | str) -> Any:
    return helper.make_tensor_value_info("image", TensorProto.FLOAT, list(dims))


def conv_only(h: int | str = 32, w: int | str = 32, domain: str = "") -> bytes:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1")
    node = helper.make_node("Conv", ["image", "w1"], ["out"], name="conv", kernel_shape=[3, 3], domain=domain)
    extra = [helper.make_opsetid(domain, 1)] if domain else []
    return small_graph(
        [node],
        [image_in("N", 3, h, w)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [w1],
        extra_opsets=extra,
    )


def huge_initializer() -> bytes:
    model = onnx.load_from_string(conv_net())
    w = next(t for t in model.graph.initializer if t.name == "wfc")
    w.ClearField("raw_data")
    del w.dims[:]
    w.dims.extend([1 << 20, 1 << 20])  # 2^40 floats declared, none stored
    return model.SerializeToString()


def huge_reshape() -> bytes:
    shape = numpy_helper.from_array(np.array([1, 1 << 16, 1 << 16, 1 << 10], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("Expand", ["image", "shape"], ["big"], name="expand"),
        helper.make_node("Relu", ["big"], ["out"], name="relu"),
    ]
    return small_graph(
        nodes, [image_in(1, 3, 32, 32)], [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [shape]
    )


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(mode: str = "RGB", size: int = 32) -> Image.Image:
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 255, (size, size, 3), dtype=np.uint8))
    return rgb.convert(mode)


def png_16bit() -> bytes:
    arr = (np.random.default_rng(2).random((32, 32)) * 65535).astype(np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    return png_bytes(img)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height and whose data is a few bytes: a decompression bomb's
    shape without the bomb (the server must refuse it from the header alone)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def zeros_bomb() -> bytes:
    """A real 4000×4000 grey PNG of zeros: ~16 MB decoded from a few KB."""
    return png_bytes(Image.new("L", (4000, 4000)), optimize=True)


# -- how a case is sent ----------------------------------------------------------------------------------
def upload_stream(data: bytes, name: str = "case", pre: pb.Preprocessing | None = None, **meta: Any) -> Callable:
    def messages() -> Iterator[pb.UploadModelRequest]:
        yield pb.UploadModelRequest(
            metadata=pb.UploadModelMetadata(name=name, preprocessing=pre or pb.Preprocessing(), **meta)
        )
        for i in range(0, len(data), 1 << 20):
            yield pb.UploadModelRequest(chunk=data[i : i + (1 << 20)])
        yield pb.UploadModelRequest(finish=pb.UploadModelFinish(sha256=hashlib.sha256(data).hexdigest()))

    return lambda c, m: c.stub.UploadModel(messages(), timeout=120)


def invert(image: bytes, model: str = "tiny", tap: str = "relu2", **kw: Any) -> Callable:
    return lambda c, m: c.invert(m.get(model, model), tap, [image], **{**FAST, **kw}).wait()


def maximize(targets: list, model: str = "tiny", tap: str = "relu2", **kw: Any) -> Callable:
    return lambda c, m: c.maximize(m.get(model, model), tap, targets, **{**FAST, **kw}).wait()


def exemplars(images: list[bytes], targets: list | None = None, tap: str = "relu2", **kw: Any) -> Callable:
    return lambda c, m: c.exemplars(m["tiny"], tap, images, [0] if targets is None else targets, **kw)


def raw_exemplars(*images: pb.ExemplarsImage) -> Callable:
    """An Exemplars stream of these image messages, as a client other than ours may send them."""

    def call(c: PreimageClient, m: dict[str, str]) -> Any:
        header = pb.ExemplarsHeader(
            model=m["tiny"], tap="relu2", targets=[pb.MaximizeTarget(channel=pb.ChannelTarget())]
        )
        requests = [pb.ExemplarsRequest(header=header), *(pb.ExemplarsRequest(image=i) for i in images)]
        return list(c.stub.Exemplars(iter(requests), timeout=60))

    return call


def pixels(h: int, w: int, c: int, data: bytes | None = None) -> pb.ExemplarsImage:
    return pb.ExemplarsImage(
        pixels=pb.RawPixels(height=h, width=w, channels=c, data=bytes(h * w * c) if data is None else data)
    )


def cancelled_exemplars(c: PreimageClient, m: dict[str, str]) -> Any:
    """An Exemplars stream the client cancels while its images flow."""
    header = pb.ExemplarsHeader(model=m["tiny"], tap="relu2", targets=[pb.MaximizeTarget(channel=pb.ChannelTarget())])
    holder: dict[str, Any] = {}

    def requests() -> Iterator[pb.ExemplarsRequest]:
        yield pb.ExemplarsRequest(header=header)
        for i in range(10_000):
            if i == 40:
                holder["call"].cancel()
            yield pb.ExemplarsRequest(image=pb.ExemplarsImage(data=png_bytes(photo())))

    holder["call"] = c.stub.Exemplars(requests(), timeout=60)
    return list(holder["call"])


def raw_maximize(mutate: Callable[[pb.MaximizeRequest], None], model: str = "tiny") -> Callable:
    def call(c: PreimageClient, m: dict[str, str]) -> Any:
        request = pb.MaximizeRequest(
            model=m[model], tap="relu2", targets=[pb.MaximizeTarget(channel=pb.ChannelTarget(channel=0))]
        )
        request.params.steps, request.params.refine_steps, request.options.report_every = 2, 0, 0
        mutate(request)
        return list(c.stub.Maximize(request, timeout=60))

    return call


def oversized_invert(c: PreimageClient, m: dict[str, str]) -> Any:
    # A client that is willing to send more than the server's 64 MiB per message.
    opts = [("grpc.max_send_message_length", 2 * MAX_MESSAGE_BYTES)]
    with grpc.insecure_channel(c.address, options=opts) as channel:
        request = pb.InvertRequest(
            model=m["tiny"], tap="relu2", images=[pb.Image(data=b"\0" * (MAX_MESSAGE_BYTES + 1))]
        )
        return list(pb_grpc.PreimageServiceStub(channel).Invert(request, timeout=60))


def oversized_chunk(c: PreimageClient, m: dict[str, str]) -> Any:
    opts = [("grpc.max_send_message_length", 2 * MAX_MESSAGE_BYTES)]

    def messages() -> Iterator[pb.UploadModelRequest]:
        yield pb.UploadModelRequest(metadata=pb.UploadModelMetadata(name="big"))
        yield pb.UploadModelRequest(chunk=b"\0" * (MAX_MESSAGE_BYTES + 1))

    with grpc.insecure_channel(c.address, options=opts) as channel:
        return pb_grpc.PreimageServiceStub(channel).UploadModel(messages(), timeout=60)


def symlinked_external() -> Callable:
    """External data named as a plain file that is really a symlink planted next to staged uploads."""

    def call(c: PreimageClient, m: dict[str, str]) -> Any:
        staging = Path(m["_staging"])
        link = staging / "weights.bin"
        if not link.exists():
            link.symlink_to("/etc/passwd")
        return upload_stream(external_data_net("weights.bin"))(c, m)

    return call


@dataclass(frozen=True)
class Case:
    name: str
    call: Callable[..., Any]
    code: grpc.StatusCode
    hint: str = ""  # a fragment the message must contain (what a person needs to act)


def corpus() -> list[Case]:
    good = conv_net(seed=33)
    nan = float("nan")
    return [
        # -- model files ------------------------------------------------------------------------------
        Case("random bytes", upload_stream(np.random.default_rng(3).bytes(5000)), INVALID, "ONNX"),
        Case("truncated model", upload_stream(good[: len(good) // 2]), INVALID),
        Case("one byte", upload_stream(b"\x08"), INVALID),
        Case("PNG as a model (wrong magic)", upload_stream(png_bytes(photo())), INVALID),
        Case("zip as a model", upload_stream(b"PK\x03\x04" + b"\0" * 200), INVALID),
        Case(
            "model without a graph",
            upload_stream(helper.make_model(helper.make_graph([], "g", [], [])).SerializeToString()),
            INVALID,
        ),  # fmt: skip
        Case("external data, absolute path", upload_stream(external_data_net("/etc/passwd")), INVALID, "external"),
        Case("external data, ../ path", upload_stream(external_data_net("../../etc/passwd")), INVALID, "external"),
        Case("external data, subdir/../ path", upload_stream(external_data_net("a/../../x.bin")), INVALID, "external"),
        Case("external data, symlink", symlinked_external(), INVALID, "external"),
        Case("huge declared input dims", upload_stream(conv_only(1 << 20, 1 << 20)), INVALID),
        Case("huge declared initializer", upload_stream(huge_initializer()), INVALID),
        Case("huge intermediate (Expand)", upload_stream(huge_reshape()), INVALID),
        Case("contrib-domain op", upload_stream(conv_only(domain="com.microsoft")), INVALID, "domain"),
        Case("unknown-domain op", upload_stream(conv_only(domain="com.evil")), INVALID, "domain"),
        Case("declared size over the server cap", upload_stream(good, size_bytes=1 << 40), EXHAUSTED),
        Case("stream over the server cap", upload_stream(good * 100), EXHAUSTED),
        Case(
            "NaN preprocessing mean", upload_stream(good, pre=pb.Preprocessing(mean=[nan, 0.5, 0.5])), INVALID, "finite"
        ),
        Case("infinite std", upload_stream(good, pre=pb.Preprocessing(std=[float("inf")])), INVALID, "finite"),
        Case("zero std", upload_stream(good, pre=pb.Preprocessing(std=[0.0])), INVALID, "std"),
        Case("NaN scale", upload_stream(good, pre=pb.Preprocessing(scale=nan)), INVALID, "scale"),
        Case("model name with control characters", upload_stream(good, name="net\x00\x1b[31m"), INVALID, "printable"),
        Case("oversized chunk message", oversized_chunk, EXHAUSTED),
        # -- images -----------------------------------------------------------------------------------
        Case("16-bit grey PNG", invert(png_16bit()), OK),
        Case("CMYK JPEG", invert(png_bytes(photo("CMYK"), "JPEG")), OK),
        Case("palette PNG", invert(png_bytes(photo("P"))), OK),
        Case("palette PNG with transparency", invert(png_bytes(photo("P"), transparency=0)), OK),
        Case("1-bit PNG", invert(png_bytes(photo("1"))), OK),
        Case("grey+alpha PNG", invert(png_bytes(photo("LA"))), OK),
        Case("32-bit float TIFF", invert(png_bytes(photo("F"), "TIFF")), OK),
        Case("decompression bomb (header)", invert(png_header_only(100_000, 100_000)), EXHAUSTED, "pixels"),
        Case("decompression bomb (zeros)", invert(zeros_bomb()), EXHAUSTED, "pixels"),
        Case("truncated PNG", invert(png_bytes(photo())[:200]), INVALID, "image"),
        Case("empty image", invert(b""), INVALID, "empty"),
        Case("oversized request message", oversized_invert, EXHAUSTED),
        # -- names ------------------------------------------------------------------------------------
        Case("tap with control characters", maximize([0], tap="relu2\x00\n\x1b[2J"), INVALID, "relu2"),
        Case("tap of 100k characters", maximize([0], tap="r" * 100_000), INVALID),
        Case("model ref with control characters", maximize([0], model="tiny\r\n\x00"), NOT_FOUND),
        Case("empty model ref", maximize([0], model=""), NOT_FOUND),
        # -- numeric fields at their extremes ---------------------------------------------------------
        Case("steps int32 max", maximize([0], steps=I32), EXHAUSTED, "steps"),
        Case("steps int32 min", maximize([0], steps=-(2**31)), INVALID, "steps"),
        Case("refine_steps int32 max", maximize([0], steps=1, refine_steps=I32), EXHAUSTED, "steps"),
        Case("jitter uint32 max", maximize([0], jitter=U32), INVALID, "jitter"),
        # Legal, if silly: the bound projection keeps the image finite, so it is an (ugly) answer.
        Case("learning_rate 1e308", maximize([0], learning_rate=1e308, preset=pb.PRESET_PAPER), OK),
        # A parameterized image's variable is O(1): such a rate is refused with the default to use.
        Case("learning_rate 1e308 natural", maximize([0], learning_rate=1e308), INVALID, "learning_rate"),
        Case("learning_rate -inf", maximize([0], learning_rate=float("-inf")), INVALID, "finite"),
        Case("loss_weight NaN", maximize([0], loss_weight=nan), INVALID, "finite"),
        Case("beta 0", maximize([0], beta=0.0), INVALID, "beta"),
        Case("alpha 1e308", maximize([0], alpha=1e308), INVALID, "non-finite"),  # |x|^α overflows
        Case("b_norm denormal", maximize([0], b_norm=5e-324), INVALID, "b_norm"),  # 0 once in float32
        Case("height uint32 max", maximize([0], model="fcn", tap="relu1", height=U32, width=U32), EXHAUSTED, "pixels"),
        Case("height 1", maximize([0], model="fcn", tap="conv2", height=1, width=1), INVALID, "size"),
        Case("seed uint64 max", maximize([0], seed=2**64 - 1), OK),
        Case("report_every uint32 max", maximize([0], report_every=U32), OK),
        Case("preview_every 1", maximize([0], preview_every=1), OK),
        Case("channel uint32 max", maximize([U32]), INVALID, "range"),
        Case("neuron at uint32 max", maximize([(0, U32, U32)]), INVALID, "outside"),
        Case("direction with NaN", maximize([[nan] * 8]), INVALID),
        Case("direction of zeros", maximize([[0.0] * 8]), INVALID),
        Case("direction of 1e6 weights", maximize([[1.0] * 1_000_000]), INVALID),
        Case("channel_max NaN", maximize([0], channel_max=nan), INVALID, "channel_max"),
        Case("channel_max -inf", maximize([0], channel_max=float("-inf")), INVALID, "channel_max"),
        Case(
            "mask center uint32 max",
            lambda c, m: c.invert(m["tiny"], "relu2", [png_bytes(photo())], mask_center=U32, **FAST).wait(),
            INVALID,
            "mask",
        ),  # fmt: skip
        Case(
            "optimizer enum out of range",
            raw_maximize(lambda r: setattr(r.params, "optimizer", 99)),
            INVALID,
            "optimizer",
        ),  # fmt: skip
        Case("65 targets", maximize(list(range(8)) * 9), EXHAUSTED, "targets"),
        Case("no target kind set", raw_maximize(lambda r: r.targets.add()), INVALID),
        # -- Exemplars: a client stream of images -----------------------------------------------------
        Case("exemplars: odd images", exemplars([png_16bit(), png_bytes(photo("CMYK"), "JPEG")]), OK),
        Case("exemplars: a non-image", exemplars([png_bytes(photo()), b"not an image"]), INVALID, "images[1]"),
        Case("exemplars: truncated PNG", exemplars([png_bytes(photo())[:200]]), INVALID, "images[0]"),
        Case("exemplars: empty image", exemplars([b""]), INVALID, "empty"),
        Case("exemplars: decompression bomb", exemplars([zeros_bomb()]), EXHAUSTED, "pixels"),
        Case("exemplars: 65 targets", exemplars([png_bytes(photo())], list(range(8)) * 9), EXHAUSTED, "targets"),
        Case("exemplars: unknown tap", exemplars([png_bytes(photo())], tap="relu9"), INVALID, "unknown tap"),
        Case("exemplars: channel uint32 max", exemplars([png_bytes(photo())], [U32]), INVALID, "channel"),
        Case("exemplars: direction with NaN", exemplars([png_bytes(photo())], [[nan] * 8]), INVALID, "finite"),
        Case("exemplars: top_k uint32 max", exemplars([png_bytes(photo())], top_k=U32), INVALID, "top_k"),
        Case("exemplars: crop_size 1", exemplars([png_bytes(photo())], crop_size=1), INVALID, "crop_size"),
        Case("exemplars: no images", exemplars([]), INVALID, "no images"),
        Case("exemplars: arrays as pixels", exemplars([np.asarray(photo()), np.asarray(photo("L"))]), OK),
        Case("exemplars: RGBA pixels", raw_exemplars(pixels(20, 30, 4)), OK),
        Case("exemplars: pixels short of bytes", raw_exemplars(pixels(20, 30, 3, b"\0" * 100)), INVALID, "needs 1800"),
        Case("exemplars: pixels of 2 channels", raw_exemplars(pixels(20, 30, 2)), INVALID, "channels 1, 3 or 4"),
        Case("exemplars: pixels 0 high", raw_exemplars(pixels(0, 30, 3)), INVALID, "height and width"),
        Case("exemplars: pixels uint32 max wide", raw_exemplars(pixels(U32, U32, 3, b"")), EXHAUSTED, "pixels"),
        Case(
            "exemplars: data and pixels",
            raw_exemplars(pb.ExemplarsImage(data=png_bytes(photo()), pixels=pixels(2, 2, 3).pixels)),
            INVALID,
            "both",
        ),  # fmt: skip
        Case("exemplars: cancelled stream", cancelled_exemplars, grpc.StatusCode.CANCELLED),
        # -- a model that produces NaN in the minimizer ------------------------------------------------
        Case("NaN gradient in the minimizer", maximize([0], model="nan", steps=3), INVALID, "non-finite"),
        Case("NaN gradient in an inversion", invert(png_bytes(photo()), model="nan", steps=3), INVALID, "non-finite"),
    ]


CORPUS = {c.name: c for c in corpus()}
CASE_NAMES = list(CORPUS)


def test_corpus_is_big_enough() -> None:
    assert len(CASE_NAMES) >= 30 and len(set(CASE_NAMES)) == len(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input(server: Any, client: PreimageClient, models: dict[str, str], name: str) -> None:
    case = CORPUS[name]
    try:
        case.call(client, models)
    except grpc.RpcError as exc:
        code, message = exc.code(), exc.details() or ""
    else:
        code, message = OK, ""
    assert code == case.code, f"{name}: got {code.name}: {message[:300]}"
    assert case.hint.lower() in message.lower(), f"{name}: {message[:300]!r} lacks {case.hint!r}"
    assert "Traceback" not in message and "internal error" not in message
    # Nothing of the server's own: its store's files, a library's sources
    assert str(server.servicer.store.root) not in message, f"{name}: {message[:300]!r}"
    assert ".cc:" not in message and ".cpp:" not in message and "site-packages" not in message, message[:300]


def test_log_lines_stay_bounded(client: PreimageClient, models: dict[str, str]) -> None:
    with captured_server_logs() as stream:
        with pytest.raises(grpc.RpcError):
            maximize([0], tap="r" * 100_000)(client, models)
    lines = stream.getvalue().splitlines()
    assert lines and max(len(line) for line in lines) < 6000  # the tap is cut to 300, the message to 4000


def test_server_survives_the_corpus(server: Any, client: PreimageClient, models: dict[str, str]) -> None:
    # Runs after the corpus (pytest keeps file order): health, listing and a normal request still work.
    with grpc.insecure_channel(client.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert {"tiny", "fcn", "nan-grad"} <= {m.name for m in client.models()}
    run = client.invert(models["tiny"], "relu2", [png_bytes(photo())], **FAST).wait()
    assert len(run.results) == 1 and Image.open(io.BytesIO(run.results[0].png)).size == (32, 32)
    leftovers = [p.name for p in server.servicer.store.staging.iterdir() if p.name != "weights.bin"]
    assert leftovers == []  # no staged files left by refused uploads
