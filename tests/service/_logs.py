"""Capture the server's JSON log lines in a test."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

from service.rpc.errors import JsonFormatter


@contextlib.contextmanager
def captured_server_logs() -> Iterator[io.StringIO]:
    """The ``preimage.server`` logger's lines, JSON-formatted, at INFO, for the duration of the block."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("preimage.server")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
