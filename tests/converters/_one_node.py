"""Small ONNX graphs against onnxruntime: the converted torch module and onnxruntime on the same input.

One builder (`graph`: float input "x", the given nodes and initializers) and one comparison
(`against_onnxruntime`), shared by the per-op checks (test_ops.py) and the Resize sweep
(test_resize.py), so both judge with the session the parity gate uses (converters.parity.ort_session)
and both fail when the converted graph returns another number of outputs or another shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from onnx2torch import convert

import converters.ops  # noqa: F401  (registers the converters)
from converters.parity import ort_session


def graph(nodes: onnx.NodeProto | Sequence[onnx.NodeProto], opset: int, x_shape: Sequence[int],
          inits: Iterable[onnx.TensorProto] = (), outputs: Sequence[str] = ("y",),
          output_shape: Sequence[int] | None = None, ir_version: int = 10) -> onnx.ModelProto:
    """A model whose one float input is "x" (of ``x_shape``) and whose float outputs are ``outputs``
    (of ``output_shape``, None: left to shape inference or to the runtime)."""
    nodes = [nodes] if isinstance(nodes, onnx.NodeProto) else list(nodes)
    shape = list(output_shape) if output_shape is not None else None
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o in outputs], list(inits),
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


@dataclass
class Compared:
    module: torch.nn.Module  # the onnx2torch conversion (with our converters registered)
    got: list[np.ndarray]  # its outputs
    want: list[np.ndarray]  # onnxruntime's, as many and of the same shapes

    @property
    def rel_error(self) -> float:
        """max |got − want| / max |want| over the outputs (each normalized by its own scale)."""
        pairs = zip(self.got, self.want, strict=True)
        return max(float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-6)) for g, w in pairs)

    def assert_close(self, rtol: float = 1e-5, atol: float = 1e-5) -> None:
        for i, (g, w) in enumerate(zip(self.got, self.want, strict=True)):
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"output {i}")


def against_onnxruntime(model: onnx.ModelProto, x: np.ndarray) -> Compared:
    """Run ``model`` on ``x`` through onnxruntime and through its torch conversion."""
    want = ort_session(model).run(None, {"x": x})
    module = convert(model)
    out = module(torch.from_numpy(x))
    got = [t.detach().numpy() for t in (out if isinstance(out, (tuple, list)) else [out])]
    assert len(got) == len(want), f"{len(got)} outputs, onnxruntime has {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape, f"output {i}: shape {g.shape}, onnxruntime {w.shape}"
    return Compared(module, got, want)
