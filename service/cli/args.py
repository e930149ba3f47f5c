"""Arguments that fail early and in one line.

Every value a person types is checked by argparse (through the ``type=`` functions here) before
any server starts, so a typo costs no start-up and ends as one line on stderr with exit status 2::

    preimage maximize: error: argument --channel: '5-2' is an empty range: write the lower end first

``CliParser`` is the parser class of every command: its ``error`` prints that one line (and the
command's ``--help`` hint) instead of argparse's usage block. ``UsageError`` is for what can only
be checked after parsing (a file named by two flags, a server's INVALID_ARGUMENT): ``main``
prints it the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad argument found after parsing; ``main`` prints ``error: <message>`` and exits 2."""


class CliParser(argparse.ArgumentParser):
    """argparse with a one-line error: ``PROG: error: MESSAGE (see PROG --help)``."""

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())  # argparse's own messages may wrap
        sys.stderr.write(f"{self.prog}: error: {line} (see `{self.prog} --help`)\n")
        sys.exit(EXIT_USAGE)


def _number(kind: type, text: str, what: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _typed(name: str, kind: type, what: str, check: Callable[[float], bool] | None, bound: str) -> Callable:
    def parse(text: str) -> float:
        value = _number(kind, text, what)
        if check is not None and not check(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be {bound}")
        return value

    parse.__name__ = name  # argparse names the type in some messages
    parse.domain = bound  # type: ignore[attr-defined]  # what the --help sweep test feeds it
    return parse


integer = _typed("integer", int, "an integer", None, "an integer")
nonneg_int = _typed("nonneg_int", int, "an integer", lambda v: v >= 0, "≥ 0")
positive_int = _typed("positive_int", int, "an integer", lambda v: v >= 1, "≥ 1")
number = _typed("number", float, "a number", None, "a finite number")
nonneg_float = _typed("nonneg_float", float, "a number", lambda v: v >= 0, "≥ 0")
positive_float = _typed("positive_float", float, "a number", lambda v: v > 0, "> 0")


def channels(text: str) -> list[int]:
    """'3', '0-15' or '1,4,9' (parts may mix: '0-3,7') → channel indices, each ≥ 0."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if sep and not lo:  # "-1": argparse hands it over as the value when it does not look like a flag
            raise argparse.ArgumentTypeError(f"{text!r}: channels are ≥ 0")
        try:
            first, last = (int(lo), int(hi)) if sep else (int(part), int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a channel list: give 3, 0-15 or 1,4,9") from None
        if first < 0 or last < 0:
            raise argparse.ArgumentTypeError(f"{text!r}: channels are ≥ 0")
        if last < first:
            raise argparse.ArgumentTypeError(f"{part!r} is an empty range: write the lower end first ({last}-{first})")
        out.extend(range(first, last + 1))
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r} names no channel: give 3, 0-15 or 1,4,9")
    return out


channels.domain = "3, 0-15 or 1,4,9"  # type: ignore[attr-defined]


def neuron(text: str) -> tuple[int, int, int]:
    """'c,y,x' → a neuron: three integers ≥ 0."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a neuron: give channel,row,column, e.g. 3,7,7") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(
            f"{text!r} has {len(values)} number(s); a neuron is channel,row,column (3 integers, e.g. 3,7,7)"
        )
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a neuron's channel, row and column are ≥ 0")
    return values  # type: ignore[return-value]


neuron.domain = "channel,row,column"  # type: ignore[attr-defined]


def floats(text: str) -> list[float]:
    """'0.485,0.456,0.406' → finite floats (one value or one per channel)."""
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} has a value that is not finite")
    return values


floats.domain = "numbers separated by commas"  # type: ignore[attr-defined]


def existing_file(text: str) -> str:
    """A file that exists (checked now, not after a server has started)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text!r}: no such file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    return text


existing_file.domain = "an existing file"  # type: ignore[attr-defined]


def model_ref(text: str) -> str:
    """A model on the server (name, name:version, id) or an ONNX file, which must then exist."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the model is empty: give a name, an id or an .onnx file")
    if text.endswith(".onnx"):
        return existing_file(text)
    return text


model_ref.domain = "a model name, id or .onnx file"  # type: ignore[attr-defined]


def tenants(text: str) -> list[str]:
    """'team-a,team-b' → tenant names (blanks dropped); '' → nobody. The server's rule for a name."""
    from service.rpc.auth import TENANT_RE

    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if not TENANT_RE.match(t)]
    if bad:
        raise argparse.ArgumentTypeError(
            f"{', '.join(map(repr, bad))}: a tenant name is 1-64 letters, digits, '.', '_' or '-'"
        )
    return names


tenants.domain = "tenant names separated by commas"  # type: ignore[attr-defined]


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse and run a command: every way it can end is an exit status and at most one line.

    UsageError → 2; a closed stdout (``| head``) → quiet, 141 as for SIGPIPE; Ctrl-C → 130; any
    other exception → ``internal error`` in one line, 1 (``PREIMAGE_DEBUG=1`` shows the traceback).
    """
    import os

    prog = parser.prog
    try:
        args = parser.parse_args(argv)
        prog = " ".join(filter(None, (parser.prog, getattr(args, "command", None))))
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit where Python reports it
        return code
    except UsageError as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        # Python would complain again while flushing stdout at exit: point it at /dev/null first.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # an output folder that cannot be made, a full disk
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if os.environ.get("PREIMAGE_DEBUG"):
            raise
        message = " ".join(str(exc).split())
        print(f"{prog}: internal error: {type(exc).__name__}: {message} (PREIMAGE_DEBUG=1 shows where)",
              file=sys.stderr)  # fmt: skip
        return 1
