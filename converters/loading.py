"""Safe loading of untrusted ONNX bytes.

Order matters: every check that can be done on declared sizes runs before anything is allocated from
them (numpy arrays, torch tensors, shape inference of a huge constant). Heavy steps that onnx itself
leaves open to denial of service (checker, shape inference) are meant to run in a resource-limited
worker process; that isolation is the service's job (see DESIGN.md), these checks are the first line.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from converters.errors import ModelError

# Domains whose ops we can convert. Deliberately ours: onnxruntime would also run com.microsoft
# contrib ops, which onnx2torch cannot convert and onnx's checker cannot check.
ALLOWED_DOMAINS = frozenset({"", "ai.onnx"})

_ITEMSIZE = {
    onnx.TensorProto.FLOAT: 4, onnx.TensorProto.UINT8: 1, onnx.TensorProto.INT8: 1,
    onnx.TensorProto.UINT16: 2, onnx.TensorProto.INT16: 2, onnx.TensorProto.INT32: 4,
    onnx.TensorProto.INT64: 8, onnx.TensorProto.BOOL: 1, onnx.TensorProto.FLOAT16: 2,
    onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.UINT32: 4, onnx.TensorProto.UINT64: 8,
    onnx.TensorProto.BFLOAT16: 2,
}
_PACKED_4BIT = {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1")
                if hasattr(onnx.TensorProto, name)}


@dataclass(frozen=True)
class LoadLimits:
    """Caps for one upload. The defaults fit every torchvision classifier with room to spare."""

    max_bytes: int = 1 << 30  # serialized model; protobuf itself stops at 2 GiB
    max_tensor_elements: int = 1 << 28  # one initializer/constant (268M elements, 1 GiB of float32)
    max_total_elements: int = 1 << 29  # all initializers together
    max_value_elements: int = 1 << 28  # any intermediate value at the nominal input size, batch 1
    max_nodes: int = 100_000
    min_opset: int = 7


def _read(data: bytes | str | Path, limits: LoadLimits) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
    else:
        path = Path(data)
        try:
            size = os.stat(path).st_size
        except OSError as exc:
            raise ModelError(f"cannot read model file {str(path)!r}: {exc.strerror}") from exc
        if size > limits.max_bytes:
            raise ModelError(f"model file is {size} bytes; the limit is {limits.max_bytes}")
        raw = path.read_bytes()
    if len(raw) > limits.max_bytes:
        raise ModelError(f"model is {len(raw)} bytes; the limit is {limits.max_bytes}")
    if not raw:
        raise ModelError("model is empty (0 bytes)")
    return raw


def parse(raw: bytes) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelError(f"not a valid ONNX protobuf (truncated or corrupt?): {exc}") from exc
    if not model.HasField("graph") or not model.graph.node:
        raise ModelError("the file parsed but holds no graph nodes: not an ONNX model (truncated?)")
    return model


def _node_tensors(nodes, where_prefix: str = ""):
    for node in nodes:
        for a in node.attribute:
            where = f"{where_prefix}attribute {a.name!r} of node {node.name or node.op_type!r}"
            if a.HasField("t"):
                yield where, a.t
            for t in a.tensors:
                yield where, t
            if a.HasField("g"):
                yield from iter_tensors(a.g)
            for sub in a.graphs:
                yield from iter_tensors(sub)


def iter_tensors(graph: onnx.GraphProto):
    """Every dense TensorProto stored in a graph: initializers, Constant attributes and tensors in
    subgraphs (If/Loop bodies), with a label saying where it sits."""
    for t in graph.initializer:
        yield f"initializer {t.name!r}", t
    yield from _node_tensors(graph.node)


def check_sparse(model: onnx.ModelProto) -> None:
    """Sparse tensors are refused outright: densifying one allocates its declared dense size, which an
    upload can set to anything, and no vision exporter emits them."""
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        if len(g.sparse_initializer):
            raise ModelError(f"the model stores sparse initializers ({g.sparse_initializer[0].values.name!r}); "
                             "re-export with dense weights")
        nodes = list(g.node)
        if g is model.graph:
            nodes += [n for f in model.functions for n in f.node]
        for node in nodes:
            for a in node.attribute:
                if a.HasField("sparse_tensor") or len(a.sparse_tensors):
                    raise ModelError(f"node {node.name or node.op_type!r} holds a sparse tensor; "
                                     "re-export with dense constants")
                if a.HasField("g"):
                    graphs.append(a.g)
                graphs.extend(a.graphs)


def check_tensors(model: onnx.ModelProto, limits: LoadLimits) -> None:
    """Refuse external data and tensors whose declared size is absurd or disagrees with their bytes."""
    total = 0
    function_tensors = _node_tensors([n for f in model.functions for n in f.node], "function ")
    for where, t in itertools.chain(iter_tensors(model.graph), function_tensors):
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data):
            loc = next((e.value for e in t.external_data if e.key == "location"), "?")
            raise ModelError(
                f"{where} stores its data outside the model (external data, location={loc!r}); "
                "uploads must be self-contained: re-save with onnx.save(model, path, "
                "save_as_external_data=False)")
        if any(d < 0 for d in t.dims):
            raise ModelError(f"{where} declares a negative dimension {list(t.dims)}")
        n = math.prod(t.dims)
        if n > limits.max_tensor_elements:
            raise ModelError(f"{where} declares {n:.3g} elements (dims {list(t.dims)}); "
                             f"the limit is {limits.max_tensor_elements:.3g} per tensor")
        total += n
        if t.HasField("raw_data") or t.raw_data:
            size = _ITEMSIZE.get(t.data_type)
            if size is not None and len(t.raw_data) != n * size:
                raise ModelError(f"{where} declares {n} elements but holds {len(t.raw_data)} bytes "
                                 f"({n * size} expected): corrupt or truncated tensor")
        elif t.data_type != onnx.TensorProto.STRING:
            stored = max(len(t.float_data), len(t.int32_data), len(t.int64_data), len(t.double_data),
                         len(t.uint64_data))
            expected = n
            if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
                expected = 2 * n  # real and imaginary parts
            elif t.data_type in _PACKED_4BIT:
                expected = (n + 1) // 2  # two 4-bit values per entry
            if stored != expected:
                raise ModelError(f"{where} declares {n} elements but holds {stored}: corrupt tensor")
    if total > limits.max_total_elements:
        raise ModelError(f"the model's tensors hold {total:.3g} elements; the limit is "
                         f"{limits.max_total_elements:.3g}")


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.HasField("g"):
                yield from _all_nodes(a.g)
            for sub in a.graphs:
                yield from _all_nodes(sub)


# Domains onnxruntime resolves by itself: a local function there is not what onnxruntime runs.
RUNTIME_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training", "ai.onnx.training",
                             "com.microsoft", "com.microsoft.nchwc", "com.microsoft.experimental",
                             "com.microsoft.dml", "com.ms.internal.nhwc", "org.pytorch.aten"})  # fmt: skip


def check_functions(model: onnx.ModelProto) -> None:
    """Refuse local functions that shadow an operator onnxruntime runs itself: the service inlines
    the function while onnxruntime runs its own op, so the judge would check a different model."""
    for f in model.functions:
        standard = f.domain in ("", "ai.onnx") and onnx.defs.has(f.name)
        if standard or (f.domain not in ("", "ai.onnx") and f.domain in RUNTIME_DOMAINS):
            raise ModelError(f"the model defines a local function {f.name!r} in domain {f.domain or 'ai.onnx'!r}, "
                             "where onnxruntime runs its own operator of that name: rename the function "
                             "into a domain of your own")


def check_domains(model: onnx.ModelProto) -> None:
    check_functions(model)
    local = {(f.domain, f.name) for f in model.functions}
    bad: dict[str, set[str]] = {}
    nodes = list(_all_nodes(model.graph))
    for f in model.functions:  # function bodies and the subgraphs inside them too
        nodes.extend(n for top in f.node for n in _all_nodes(onnx.GraphProto(node=[top])))
    for node in nodes:
        if node.domain not in ALLOWED_DOMAINS and (node.domain, node.op_type) not in local:
            bad.setdefault(node.domain, set()).add(node.op_type)
    if bad:
        listed = "; ".join(f"domain {d!r}: {', '.join(sorted(ops))}" for d, ops in sorted(bad.items()))
        raise ModelError(f"the model uses operators outside the standard ONNX domain ({listed}); "
                         "only standard ONNX ops can be converted: export without custom/contrib ops")


def check_opset(model: onnx.ModelProto, limits: LoadLimits) -> int:
    versions = {o.domain: o.version for o in model.opset_import}
    version = versions.get("", versions.get("ai.onnx"))
    if version is None:
        raise ModelError("the model imports no standard ONNX opset")
    newest = onnx.defs.onnx_opset_version()
    if not limits.min_opset <= version <= newest:
        raise ModelError(f"the model uses ONNX opset {version}; supported opsets are "
                         f"{limits.min_opset}..{newest}")
    return version


def load_untrusted(data: bytes | str | Path, limits: LoadLimits) -> onnx.ModelProto:
    """Parse and validate; returns a model that passed the checker, with no external data."""
    raw = _read(data, limits)
    model = parse(raw)
    del raw
    n_nodes = len(model.graph.node) + sum(len(f.node) for f in model.functions)
    if n_nodes > limits.max_nodes:
        raise ModelError(f"the model has {n_nodes} nodes; the limit is {limits.max_nodes}")
    check_sparse(model)
    check_tensors(model, limits)
    check_domains(model)
    check_opset(model, limits)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        raise ModelError(f"the ONNX checker rejects the model: {first}") from exc
    return model
