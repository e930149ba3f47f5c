"""Converters that onnx2torch 1.5.15 lacks, registered through its own ``add_converter`` registry."""

from __future__ import annotations
