"""Errors raised by converters/: every message should tell a person what to fix."""

from __future__ import annotations

import difflib
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
