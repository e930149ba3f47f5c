"""The embedded server every command uses when no server is named, and the client to any server.

One rule (service/cli/resolve.py): ``--server ADDR``, else ``$PREIMAGE_SERVER``, else a server
started here on the local store. An embedded start can take a while (seeding the bundled models
on a new store, converting a model on its first use, measuring channel statistics), so it says
what it is doing on stderr, one line per stage; stdout stays the command's output (``--json``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.cli.resolve import default_store, server_address, token_from_env


def say(message: str) -> None:
    """One progress line on stderr (never stdout: that is the command's output)."""
    print(f"preimage: {message}", file=sys.stderr, flush=True)


class _EmbeddedLog(logging.Handler):
    """The embedded server's warnings and errors as one line each on stderr (its info lines, one
    JSON object per RPC, are for operators of a real server). An open server on loopback is what an
    embedded server is, so that warning is not repeated to every command."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("serving OPEN"):
            return
        fields = getattr(record, "fields", None) or {}
        detail = f" ({fields['message']})" if "message" in fields else ""
        if record.exc_info and record.exc_info[1] is not None:
            detail += f": {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        ref = f" [reference {fields['error_ref']}]" if "error_ref" in fields else ""
        say(" ".join(f"embedded server {record.levelname.lower()}: {record.getMessage()}{detail}{ref}".split()))


@contextlib.contextmanager
def embedded_server(store: Path | None = None, quiet: bool = False) -> Iterator[str]:
    """An in-process server on a free loopback port; yields its address."""
    from service.rpc.app import start_server
    from service.rpc.config import ServerConfig

    store = store or default_store()
    progress = None if quiet else say
    logger, handler = logging.getLogger("preimage"), _EmbeddedLog()
    logger.addHandler(handler)
    if progress is not None:
        progress(f"starting an embedded server on the store {store} (--server or $PREIMAGE_SERVER use another)")
    try:
        running = start_server("127.0.0.1:0", ServerConfig(store_dir=store), progress=progress)
        try:
            yield f"127.0.0.1:{running.port}"
        finally:
            running.stop(grace=None)
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def connect(server: str | None, timeout: float | None = None, quiet: bool = False) -> Iterator[tuple[Any, bool]]:
    """A client to ``server`` (or $PREIMAGE_SERVER, or an embedded server); yields (client, embedded)."""
    from service.client import PreimageClient

    address = server_address(server)
    with contextlib.ExitStack() as stack:
        embedded = address is None
        if address is None:
            address = stack.enter_context(embedded_server(quiet=quiet))
        client = stack.enter_context(PreimageClient(address, timeout=timeout, token=token_from_env()))
        yield client, embedded
