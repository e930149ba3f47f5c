"""A small Python client for the preimage service.

    from service.client import PreimageClient
    with PreimageClient("localhost:50051") as client:
        model = client.upload("model.onnx", name="my-net")
        print([t.alias for t in client.taps(model.id)])
        run = client.invert(model.id, "relu2", ["cat.png"], steps=100)
        for event in run:            # progress, results, summary as they arrive (optional)
            ...
        run.results[0].png           # bytes of the PNG

Every keyword of ``EnergyParams`` in SPEC.md (``loss_weight``, ``alpha``, ``steps``, ...) can be
passed to invert/maximize/caricature; unset ones take the defaults of the request's preset on the
server (``preset=``: natural for Maximize and Caricature, paper for Invert).
``amplitude_images=[...]`` (files, bytes or arrays, as the images) gives the phase
parameterization the amplitude spectrum of those photographs instead of the server's.
"""

from __future__ import annotations

import hashlib
import io
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from service.api.enums import ENERGY_ENUMS
from service.api.preimage.v1 import preimage_pb2 as pb
from service.api.preimage.v1 import preimage_pb2_grpc as pb_grpc
from service.client.token import with_token
from service.rpc.messages import MAX_MESSAGE_BYTES, ChunkJoiner, preprocessing

CHUNK_BYTES = 1 << 20
# Sent on every call about one model, so a proxy can route by model (deploy/envoy.yaml hashes it):
# one model's jobs then share one replica's batches and converted cache.
ROUTING_HEADER = "x-preimage-model"
ENERGY_FIELDS = {f.name for f in pb.EnergyParams.DESCRIPTOR.fields}
OPTIONS_FIELDS = {f.name for f in pb.RunOptions.DESCRIPTOR.fields}

ImageLike = bytes | str | Path | Any  # encoded bytes, a file path, or an H×W×3 uint8 array


def routing_metadata(model: str) -> tuple[tuple[str, str], ...]:
    """The routing header for calls about ``model`` (the string as given: a name and an id of one
    model hash apart, so use one of them consistently). Non-ASCII names are percent-encoded:
    gRPC metadata values are printable ASCII."""
    if not model:
        return ()
    from urllib.parse import quote

    return ((ROUTING_HEADER, quote(model, safe="")),)


def energy_params(**values: Any) -> pb.EnergyParams:
    """EnergyParams from keywords; None values are left unset (server default)."""
    msg = pb.EnergyParams()
    for name, value in values.items():
        if value is None:
            continue
        if name not in ENERGY_FIELDS:
            raise TypeError(f"unknown energy parameter {name!r}; known: {', '.join(sorted(ENERGY_FIELDS))}")
        if name == "amplitude_images":  # the one message field: images, encoded as the request's
            if isinstance(value, (bytes, str, Path)) or hasattr(value, "shape"):
                # One image would be iterated as characters, bytes or rows.
                raise TypeError("amplitude_images takes a list of images (files, bytes or arrays)")
            msg.amplitude_images.extend(pb.Image(data=encode_image(i)) for i in value)
            continue
        if name in ENERGY_ENUMS and isinstance(value, str):
            if value not in ENERGY_ENUMS[name]:
                raise ValueError(f"{name} must be one of {', '.join(ENERGY_ENUMS[name])}, got {value!r}")
            value = ENERGY_ENUMS[name][value]
        setattr(msg, name, value)
    return msg


def run_options(**values: Any) -> pb.RunOptions:
    msg = pb.RunOptions()
    for name, value in values.items():
        if value is not None:
            setattr(msg, name, value)
    return msg


def encode_image(image: ImageLike) -> bytes:
    """Bytes of an encoded image: passed through, read from a path, or a uint8 array as PNG."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def exemplar_image(image: ImageLike, image_id: str = "") -> pb.ExemplarsImage:
    """One image of an Exemplars stream: a uint8 array (H×W, H×W×1, ×3 or ×4) goes as its pixels,
    which neither side then encodes or decodes; bytes and paths go as they are."""
    if isinstance(image, (bytes, str, Path)):
        return pb.ExemplarsImage(data=encode_image(image), id=image_id)
    import numpy as np

    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"an image array must be H×W or H×W×C uint8, got {array.dtype} of shape {array.shape}")
    if array.ndim == 2:
        array = array[:, :, None]
    h, w, c = array.shape
    pixels = pb.RawPixels(height=h, width=w, channels=c, data=np.ascontiguousarray(array).tobytes())
    return pb.ExemplarsImage(pixels=pixels, id=image_id)


def target(spec: int | tuple[int, int, int] | Sequence[float] | pb.MaximizeTarget) -> pb.MaximizeTarget:
    """A maximization target: an int is a channel (or class), (c, y, x) a neuron, floats a direction."""
    if isinstance(spec, pb.MaximizeTarget):
        return spec
    if isinstance(spec, int):
        return pb.MaximizeTarget(channel=pb.ChannelTarget(channel=spec))
    values = list(spec)
    if len(values) == 3 and all(isinstance(v, int) for v in values):
        return pb.MaximizeTarget(neuron=pb.NeuronTarget(channel=values[0], y=values[1], x=values[2]))
    return pb.MaximizeTarget(direction=pb.DirectionTarget(weights=[float(v) for v in values]))


@dataclass
class Run:
    """A running visualization: iterate for events; ``results``/``summary`` fill in as they arrive."""

    call: Any  # the grpc streaming call
    results: list[pb.VisualizationResult] = field(default_factory=list)
    summary: pb.RunSummary | None = None
    on_progress: Callable[[pb.ProgressEvent], None] | None = None

    def __iter__(self) -> Iterator[Any]:
        joiner = ChunkJoiner()  # large fields arrive as Chunk events ahead of their message
        for response in self.call:
            kind = response.WhichOneof("event")
            event = getattr(response, kind)
            if kind == "chunk":
                joiner.add(event)
            else:
                joiner.complete(kind, event)
            if kind == "result":
                self.results.append(event)
            elif kind == "summary":
                self.summary = event
            elif kind == "progress" and self.on_progress is not None:
                self.on_progress(event)
            yield event

    def wait(self) -> Run:
        """Consume the stream to the end; returns self with results (in target order) and summary."""
        for _ in self:
            pass
        self.results.sort(key=lambda r: r.target_index)
        return self

    def cancel(self) -> None:
        self.call.cancel()


class PreimageClient:
    """Calls a preimage server. ``timeout`` (seconds) applies to every call unless given per call."""

    def __init__(
        self,
        address: str,
        timeout: float | None = None,
        channel: grpc.Channel | None = None,
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        """``token``: the team's bearer token (sent as `authorization: Bearer ...` on every call);
        ``credentials``: TLS (``grpc.ssl_channel_credentials(ca, key, cert)`` for mutual TLS)."""

        self.address = address
        self.timeout = timeout
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if channel is None:
            if credentials is not None:
                channel = grpc.secure_channel(address, credentials, options=options)
            else:
                channel = grpc.insecure_channel(address, options=options)
        self._raw_channel = channel
        self.channel = with_token(channel, token)
        self.stub = pb_grpc.PreimageServiceStub(self.channel)

    def __enter__(self) -> PreimageClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    # -- models ---------------------------------------------------------------------------------
    def upload(
        self,
        model: bytes | str | Path,
        name: str | None = None,
        *,
        preprocessing: pb.Preprocessing | dict | None = None,
        labels: Iterable[str] = (),
        description: str = "",
        chunk_bytes: int = CHUNK_BYTES,
        on_chunk: Callable[[int, int], None] | None = None,
        timeout: float | None = None,
        shared_with: Iterable[str] = (),
        public: bool = False,
        size: tuple[int, int] | None = None,
    ) -> pb.UploadModelResponse:
        """Upload an ONNX file (path or bytes) in chunks; ``on_chunk(sent, total)`` reports progress.

        A file is streamed from disk and hashed on the way (memory: one chunk), so models of any
        size the server accepts can be sent. ``size=(height, width)`` declares the size a dynamic-size
        model runs at (``preimage upload --size HxW``, Preprocessing height/width); the rest of the
        preprocessing still comes from ``preprocessing``, the model's metadata or the defaults.
        """
        total = len(model) if isinstance(model, bytes) else Path(model).stat().st_size
        if name is None:
            name = Path(model).stem if not isinstance(model, bytes) else "model"
        pre = preprocessing if isinstance(preprocessing, pb.Preprocessing) else _pre(preprocessing)
        if size is not None:
            pre = _with_size(pre, size)

        def messages() -> Iterator[pb.UploadModelRequest]:
            meta = pb.UploadModelMetadata(
                name=name,
                preprocessing=pre,
                labels=list(labels),
                size_bytes=total,
                description=description,
                shared_with=list(shared_with),
                public=public,
            )
            yield pb.UploadModelRequest(metadata=meta)
            digest, sent = hashlib.sha256(), 0
            for chunk in _chunks(model, chunk_bytes):
                digest.update(chunk)
                sent += len(chunk)
                yield pb.UploadModelRequest(chunk=chunk)
                if on_chunk is not None:
                    on_chunk(sent, total)
            yield pb.UploadModelRequest(finish=pb.UploadModelFinish(sha256=digest.hexdigest()))

        return self.stub.UploadModel(messages(), timeout=self._timeout(timeout))

    def get(self, model: str, timeout: float | None = None) -> pb.Model:
        request = pb.GetModelRequest(model=model)
        return self.stub.GetModel(request, timeout=self._timeout(timeout), metadata=routing_metadata(model)).model

    def models(self, name_prefix: str = "", timeout: float | None = None) -> list[pb.Model]:
        request = pb.ListModelsRequest(name_prefix=name_prefix)
        return list(self.stub.ListModels(request, timeout=self._timeout(timeout)).models)

    def delete(self, model: str, timeout: float | None = None) -> pb.Model:
        request = pb.DeleteModelRequest(model=model)
        return self.stub.DeleteModel(request, timeout=self._timeout(timeout), metadata=routing_metadata(model)).model

    def share(
        self, model: str, shared_with: Iterable[str] = (), public: bool = False, timeout: float | None = None
    ) -> pb.Model:
        """Replace who else may read and use one of your models (named tenants, or everyone)."""
        request = pb.ShareModelRequest(model=model, shared_with=list(shared_with), public=public)
        return self.stub.ShareModel(request, timeout=self._timeout(timeout), metadata=routing_metadata(model)).model

    def taps(self, model: str, module_paths: bool = False, timeout: float | None = None) -> pb.ListTapsResponse:
        """The model's taps; ``module_paths`` also lists the torch module paths that name taps."""
        request = pb.ListTapsRequest(model=model, module_paths=module_paths)
        return self.stub.ListTaps(request, timeout=self._timeout(timeout), metadata=routing_metadata(model))

    # -- metadata -------------------------------------------------------------------------------
    def server_info(self, timeout: float | None = None) -> pb.GetServerInfoResponse:
        """Version, device, the limits that apply to you, presets, ops, auth mode."""
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=self._timeout(timeout))

    def statistics(self, model: str = "", timeout: float | None = None) -> pb.GetModelStatisticsResponse:
        """Jobs, steps, seconds and failures per model since the server started (``model``: one)."""
        request = pb.GetModelStatisticsRequest(model=model)
        return self.stub.GetModelStatistics(request, timeout=self._timeout(timeout), metadata=routing_metadata(model))

    # -- release checks -------------------------------------------------------------------------
    def check(
        self,
        model: str,
        baseline: str = "",
        *,
        preset: str = "small",
        taps: Sequence[str] = (),
        seed: int | None = None,
        timeout: float | None = None,
        on_progress: Callable | None = None,
        **thresholds: float,
    ) -> CheckRun:
        """Start a release check of ``model`` (against ``baseline``). Keywords: CheckThresholds fields."""
        request = pb.CheckReleaseRequest(model=model, baseline=baseline, preset=preset, taps=list(taps),
                                         thresholds=pb.CheckThresholds(**thresholds), seed=seed)
        call = self.stub.CheckRelease(request, timeout=self._timeout(timeout), metadata=routing_metadata(model))
        return CheckRun(call, on_progress=on_progress)

    # -- visualizations -------------------------------------------------------------------------
    def invert(
        self,
        model: str,
        tap: str,
        images: Sequence[ImageLike],
        *,
        mask_center: int = 0,
        timeout: float | None = None,
        on_progress: Callable | None = None,
        **kwargs: Any,
    ) -> Run:
        """Start an inversion of each image at ``tap``. Keywords: EnergyParams and RunOptions fields."""
        params, options = _split(kwargs)
        request = pb.InvertRequest(
            model=model, tap=tap, images=[pb.Image(data=encode_image(i)) for i in images],
            mask=pb.FeatureMask(center_size=mask_center), params=params, options=options,
        )  # fmt: skip
        call = self.stub.Invert(request, timeout=self._timeout(timeout), metadata=routing_metadata(model))
        return Run(call, on_progress=on_progress)

    def maximize(
        self,
        model: str,
        tap: str,
        targets: Sequence[Any],
        *,
        channel_max: float | None = None,
        timeout: float | None = None,
        on_progress: Callable | None = None,
        **kwargs: Any,
    ) -> Run:
        """Start a maximization of each target (see ``target``). Keywords as for invert."""
        params, options = _split(kwargs)
        request = pb.MaximizeRequest(
            model=model, tap=tap, targets=[target(t) for t in targets], params=params, options=options
        )
        if channel_max is not None:
            request.channel_max = channel_max
        call = self.stub.Maximize(request, timeout=self._timeout(timeout), metadata=routing_metadata(model))
        return Run(call, on_progress=on_progress)

    def caricature(
        self,
        model: str,
        tap: str,
        images: Sequence[ImageLike],
        *,
        timeout: float | None = None,
        on_progress: Callable | None = None,
        **kwargs: Any,
    ) -> Run:
        """Start a caricature of each image at ``tap``. Keywords as for invert."""
        params, options = _split(kwargs)
        request = pb.CaricatureRequest(
            model=model, tap=tap, images=[pb.Image(data=encode_image(i)) for i in images],
            params=params, options=options,
        )  # fmt: skip
        call = self.stub.Caricature(request, timeout=self._timeout(timeout), metadata=routing_metadata(model))
        return Run(call, on_progress=on_progress)

    def exemplars(
        self,
        model: str,
        tap: str,
        images: Iterable[Any],
        targets: Sequence[Any],
        *,
        top_k: int = 9,
        bottom_k: int = 0,
        crop_size: int = 0,
        batch_size: int = 0,
        heat_maps: bool = False,
        timeout: float | None = None,
        on_progress: Callable[[pb.ExemplarsProgress], None] | None = None,
    ) -> list[pb.ExemplarsResult]:
        """The images of ``images`` that excite each target most (and least, ``bottom_k``), one
        ExemplarsResult per target in target order. ``images``: paths, encoded bytes, uint8
        arrays or (id, any of those) pairs; read and sent one at a time, lazily, so a generator
        over thousands of files holds one at a time. A path's id is its file name. ``heat_maps``:
        each exemplar also carries its location map as a PNG (``heat_map_png``); on a labelled
        model's 1-D output each carries its ``top_classes`` regardless."""
        header = pb.ExemplarsHeader(
            model=model,
            tap=tap,
            targets=[target(t) for t in targets],
            top_k=top_k,
            bottom_k=bottom_k,
            crop_size=crop_size,
            batch_size=batch_size,
            heat_maps=heat_maps,
        )

        def messages() -> Iterator[pb.ExemplarsRequest]:
            yield pb.ExemplarsRequest(header=header)
            for i, item in enumerate(images):
                image_id, image = item if isinstance(item, tuple) else (None, item)
                if image_id is None:
                    image_id = Path(image).name if isinstance(image, (str, Path)) else str(i)
                yield pb.ExemplarsRequest(image=exemplar_image(image, str(image_id)))

        results: list[pb.ExemplarsResult] = []
        call = self.stub.Exemplars(messages(), timeout=self._timeout(timeout), metadata=routing_metadata(model))
        for response in call:
            kind = response.WhichOneof("event")
            if kind == "result":
                results.append(response.result)
            elif kind == "progress" and on_progress is not None:
                on_progress(response.progress)
        return sorted(results, key=lambda r: r.target_index)


@dataclass
class CheckRun:
    """A running release check: iterate for progress; ``html`` and ``report`` fill in at the end."""

    call: Any
    html: bytes = b""
    report: pb.CheckReport | None = None
    on_progress: Callable[[pb.CheckProgress], None] | None = None

    def wait(self) -> CheckRun:
        chunks: list[bytes] = []
        for response in self.call:
            kind = response.WhichOneof("event")
            if kind == "progress" and self.on_progress is not None:
                self.on_progress(response.progress)
            elif kind == "html_chunk":
                chunks.append(response.html_chunk)
            elif kind == "report":
                self.report = response.report
        self.html = b"".join(chunks)
        return self

    def cancel(self) -> None:
        self.call.cancel()


def _chunks(model: bytes | str | Path, size: int) -> Iterator[bytes]:
    if isinstance(model, bytes):
        for start in range(0, len(model), size):
            yield model[start : start + size]
        return
    with open(model, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def _pre(values: dict | None) -> pb.Preprocessing:
    return preprocessing(**values) if values else pb.Preprocessing()


def _with_size(pre: pb.Preprocessing, size: tuple[int, int]) -> pb.Preprocessing:
    """A copy of ``pre`` with height and width set (the caller's message is left as it was)."""
    try:
        height, width = (operator.index(v) for v in size)  # ints, numpy ints; not floats
    except (TypeError, ValueError):
        raise ValueError(f"size must be (height, width), two integers, got {size!r}") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive, got {height}×{width}")
    out = pb.Preprocessing()
    out.CopyFrom(pre)
    for name, value in (("height", height), ("width", width)):
        # Two different sizes for one upload: refuse rather than pick one silently.
        if out.HasField(name) and getattr(out, name) != value:
            raise ValueError(f"size gives {name} {value} but preprocessing gives {getattr(out, name)}")
        setattr(out, name, value)
    return out


def _split(kwargs: dict[str, Any]) -> tuple[pb.EnergyParams, pb.RunOptions]:
    energy = {k: v for k, v in kwargs.items() if k in ENERGY_FIELDS}
    options = {k: v for k, v in kwargs.items() if k in OPTIONS_FIELDS}
    unknown = set(kwargs) - set(energy) - set(options)
    if unknown:
        raise TypeError(
            f"unknown keyword(s) {sorted(unknown)}; energy: {sorted(ENERGY_FIELDS)}, options: {sorted(OPTIONS_FIELDS)}"
        )
    return energy_params(**energy), run_options(**options)


@dataclass(frozen=True)
class ErrorDetails:
    """The google.rpc details of a server error (see the proto's service comment)."""

    code: grpc.StatusCode
    message: str
    reason: str | None  # ErrorInfo.reason, stable: MODEL_NOT_FOUND, UNKNOWN_TAP, QUEUE_FULL, ...
    metadata: dict[str, str]
    fields: dict[str, str]  # BadRequest: field → description
    retry_after: float | None  # RetryInfo, seconds


def error_details(err: grpc.RpcError) -> ErrorDetails:
    """Decode the details the server put in an error's grpc-status-details-bin trailer."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    reason, metadata, fields, retry = None, {}, {}, None
    status = rpc_status.from_call(err) if hasattr(err, "trailing_metadata") else None
    for detail in status.details if status is not None else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = {v.field: v.description for v in bad.field_violations}
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info_r = error_details_pb2.RetryInfo()
            detail.Unpack(info_r)
            retry = info_r.retry_delay.ToMilliseconds() / 1000
    return ErrorDetails(err.code(), err.details() or "", reason, metadata, fields, retry)
