"""Every conversion between the protos and the service's own values, in both directions.

The server (uploads, model records), the client (keywords → messages) and the CLI (messages →
JSON) all convert here, so an enum value or a field is mapped in one place. Light to import:
the generated protos and protobuf only, so the client can use it without loading the server.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from google.protobuf.timestamp_pb2 import Timestamp

from service.api.preimage.v1 import preimage_pb2 as pb
from service.jobs.errors import invalid

if TYPE_CHECKING:
    from service.models.store import ModelRecord

MAX_MESSAGE_BYTES = 64 << 20  # one message; uploads stream in chunks, so this bounds images/results
# What the server sends stays under gRPC's default receive limit (4 MiB in every language): byte
# fields larger than CHUNK_BYTES travel as Chunk events ahead of their message.
DEFAULT_CLIENT_LIMIT = 4 << 20
CHUNK_BYTES = 1 << 20
CHANNEL_ORDERS = {pb.CHANNEL_ORDER_RGB: "RGB", pb.CHANNEL_ORDER_BGR: "BGR", pb.CHANNEL_ORDER_GRAY: "GRAY"}
CHANNEL_ORDER_VALUES = {name: value for value, name in CHANNEL_ORDERS.items()}
LAYOUTS = {"NCHW": pb.LAYOUT_NCHW, "NHWC": pb.LAYOUT_NHWC}
DTYPES = {"float32": pb.INPUT_DTYPE_FLOAT32, "float16": pb.INPUT_DTYPE_FLOAT16}


# -- server side: messages → the store's values, records → messages -------------------------------
def requested_preprocessing(msg: pb.Preprocessing) -> dict[str, Any] | None:
    """The uploader's preprocessing as Preprocessing kwargs, or None when nothing was given."""
    given: dict[str, Any] = {}
    for name in ("mean", "std"):
        values = list(getattr(msg, name))
        if values:
            if not all(math.isfinite(v) for v in values):
                raise invalid(f"preprocessing.{name} must be finite numbers, got {values}")
            given[name] = values
    if msg.HasField("scale"):
        if not (math.isfinite(msg.scale) and msg.scale > 0):
            raise invalid(f"preprocessing.scale must be a positive finite number, got {msg.scale}")
        given["scale"] = msg.scale
    if msg.channel_order:
        if msg.channel_order not in CHANNEL_ORDERS:
            raise invalid(f"preprocessing.channel_order {msg.channel_order} is not a ChannelOrder value")
        given["channel_order"] = CHANNEL_ORDERS[msg.channel_order]
    for name in ("height", "width"):  # the nominal size of a dynamic-size model
        if msg.HasField(name):
            if getattr(msg, name) == 0:
                raise invalid(f"preprocessing.{name} must be ≥ 1 when given")
            given[name] = getattr(msg, name)
    # Layout and dtype always come from the graph (converters.inputs), so they are not passed on.
    return given or None


def preprocessing_message(pre: dict[str, Any]) -> pb.Preprocessing:
    msg = pb.Preprocessing(
        mean=pre.get("mean", []),
        std=pre.get("std", []),
        channel_order=CHANNEL_ORDER_VALUES.get(pre.get("channel_order", ""), pb.CHANNEL_ORDER_UNSPECIFIED),
        layout=LAYOUTS.get(pre.get("layout", ""), pb.LAYOUT_UNSPECIFIED),
        dtype=DTYPES.get(pre.get("dtype", ""), pb.INPUT_DTYPE_UNSPECIFIED),
    )
    if pre.get("scale") is not None:
        msg.scale = pre["scale"]
    if pre.get("height"):
        msg.height = pre["height"]
    if pre.get("width"):
        msg.width = pre["width"]
    return msg


# Where a model comes from for the caller (service.rpc.auth.origin's names) ↔ pb.ModelOrigin.
ORIGINS = {v.name.removeprefix("MODEL_ORIGIN_").lower(): v.number
           for v in pb.ModelOrigin.DESCRIPTOR.values if v.number}  # fmt: skip
ORIGIN_NAMES = {number: name for name, number in ORIGINS.items()}


def origin_text(m: pb.Model) -> str:
    """How a listing says where the model comes from: own, shared by OWNER, public (OWNER), bundled."""
    name = ORIGIN_NAMES.get(m.origin, "")
    if name == "shared":
        return f"shared by {m.owner}"
    if name in ("public", "other") and m.owner:
        return f"{name} ({m.owner})"
    return name


def model_message(r: ModelRecord, latest: bool = False, origin: str = "") -> pb.Model:
    """``origin``: where the model comes from for the caller (``ORIGINS``; empty: unspecified)."""
    created = Timestamp()
    created.FromNanoseconds(int(r.created_at * 1e9))
    return pb.Model(
        id=r.id,
        name=r.name,
        size_bytes=r.size_bytes,
        preprocessing=preprocessing_message(r.preprocessing),
        preprocessing_source=r.preprocessing_source,
        labels=r.labels,
        tap_count=r.tap_count,
        output_tap=r.output_tap,
        bundled=r.bundled,
        created_at=created,
        description=r.description,
        parity=r.parity,
        owner=r.owner,
        shared_with=r.shared_with,
        public=r.public or r.bundled,
        version=r.version,
        latest=latest,
        origin=ORIGINS.get(origin, pb.MODEL_ORIGIN_UNSPECIFIED),
    )


# -- large byte fields as Chunk events (both sides) ------------------------------------------------
def _chunks(field: int, index: int, data: bytes, size: int) -> list[tuple[str, pb.Chunk]]:
    return [
        ("chunk", pb.Chunk(field=field, target_index=index, offset=i, total_bytes=len(data), data=data[i : i + size]))
        for i in range(0, len(data), size)
    ]


def split_large_fields(kind: str, message: Any, size: int = CHUNK_BYTES) -> list[tuple[str, Any]]:
    """A stream event, preceded by Chunk events for each of its byte fields over ``size`` bytes
    (which are then left empty in the message): no message of the stream exceeds 4 MiB."""
    out: list[tuple[str, Any]] = []
    if kind == "result":
        if len(message.png) > size:
            out += _chunks(pb.CHUNK_FIELD_PNG, message.target_index, message.png, size)
            message.png = b""
        if message.HasField("tensor") and len(message.tensor.data) > size:
            out += _chunks(pb.CHUNK_FIELD_TENSOR, message.target_index, message.tensor.data, size)
            message.tensor.data = b""
    elif kind == "summary" and len(message.contact_sheet_png) > size:
        out += _chunks(pb.CHUNK_FIELD_CONTACT_SHEET, 0, message.contact_sheet_png, size)
        message.contact_sheet_png = b""
    return [*out, (kind, message)]


class ChunkJoiner:
    """The client's half of split_large_fields: collects Chunk events and puts their bytes back
    into the result or summary they precede."""

    def __init__(self) -> None:
        self._parts: dict[tuple[int, int], bytearray] = {}

    def add(self, chunk: pb.Chunk) -> None:
        buf = self._parts.setdefault((chunk.field, chunk.target_index), bytearray())
        if chunk.offset != len(buf):
            raise ValueError(f"chunk at offset {chunk.offset} after {len(buf)} bytes: the stream lost a chunk")
        buf += chunk.data

    def _take(self, field: int, index: int) -> bytes | None:
        buf = self._parts.pop((field, index), None)
        return bytes(buf) if buf is not None else None

    def complete(self, kind: str, message: Any) -> Any:
        if kind == "result":
            if (png := self._take(pb.CHUNK_FIELD_PNG, message.target_index)) is not None:
                message.png = png
            if (tensor := self._take(pb.CHUNK_FIELD_TENSOR, message.target_index)) is not None:
                message.tensor.data = tensor
        elif kind == "summary" and (sheet := self._take(pb.CHUNK_FIELD_CONTACT_SHEET, 0)) is not None:
            message.contact_sheet_png = sheet
        return message


# -- client side: keywords → messages; messages → JSON for the CLI --------------------------------
def preprocessing(**values: Any) -> pb.Preprocessing:
    """Preprocessing from keywords (mean, std, scale, channel_order="RGB"|"BGR"|"GRAY", height, width)."""
    msg = pb.Preprocessing()
    for name, value in values.items():
        if value is None:
            continue
        if name in ("mean", "std"):
            getattr(msg, name).extend(float(v) for v in value)
        elif name == "channel_order":
            msg.channel_order = CHANNEL_ORDER_VALUES[value.upper()] if isinstance(value, str) else value
        else:
            setattr(msg, name, value)
    return msg


def preprocessing_dict(p: pb.Preprocessing) -> dict[str, Any]:
    return {
        "mean": list(p.mean),
        "std": list(p.std),
        "scale": p.scale if p.HasField("scale") else None,
        "channel_order": CHANNEL_ORDERS.get(p.channel_order),
        "height": p.height if p.HasField("height") else None,
        "width": p.width if p.HasField("width") else None,
    }


def model_dict(m: pb.Model) -> dict[str, Any]:
    return {
        "id": m.id,
        "name": m.name,
        "size_bytes": m.size_bytes,
        "taps": m.tap_count,
        "output_tap": m.output_tap,
        "bundled": m.bundled,
        "description": m.description,
        "preprocessing": preprocessing_dict(m.preprocessing),
        "preprocessing_source": m.preprocessing_source,
        "labels": len(m.labels),
        "version": m.version,
        "latest": m.latest,
        "origin": ORIGIN_NAMES.get(m.origin, ""),
        "owner": m.owner,
    }
