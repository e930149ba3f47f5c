"""Errors raised by converters/: every message should tell a person what to fix."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class ModelError(ValueError):
    """The model cannot be served; the message says why and, where possible, what to change."""


class UnknownTap(ModelError, KeyError):
    """A tap name or alias that the model does not have; lists the closest existing names."""

    def __init__(self, name: str, known: Iterable[str]):
        self.name = name
        known = list(dict.fromkeys(known))
        self.close = difflib.get_close_matches(name, known, n=5, cutoff=0.3)
        hint = f"; close names: {', '.join(self.close)}" if self.close else ""
        super().__init__(f"unknown tap {name!r} ({len(known)} taps in this model){hint}")

    # KeyError.__str__ would wrap the message in quotes; keep it readable.
    def __str__(self) -> str:
        return self.args[0]


_ORT_NODE = re.compile(r"running (\w+) node\. Name:'([^']*)'")
_INFER_NODE = re.compile(r"op_type:(\w+), node name: ([^)]*)\)")


def failing_node(message: str) -> tuple[str | None, str | None]:
    """(op type, node name) that an onnxruntime or ONNX shape-inference message blames, if any."""
    for pattern in (_ORT_NODE, _INFER_NODE):
        m = pattern.search(message)
        if m:
            return m.group(1), m.group(2).strip()
    return None, None


class FailsAtSize(ModelError):
    """The graph does not run at the input size it was tried at (shape inference or onnxruntime fail);
    ``op``/``node`` name the node blamed, when the message says."""

    def __init__(self, message: str, size: tuple[int, int], detail: str = ""):
        super().__init__(message)
        self.size = size
        self.detail = detail or message
        self.op, self.node = failing_node(self.detail)

    def where(self) -> str:
        """'in Concat node '/Concat'' or '' when no node is blamed."""
        return f"in {self.op} node {self.node!r}" if self.op else ""
