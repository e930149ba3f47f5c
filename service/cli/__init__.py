"""The `preimage` command line (pyproject's entry point `service.cli:main`)."""

from service.cli.main import main

__all__ = ["main"]
