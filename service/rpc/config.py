"""Server configuration from a TOML file and PREIMAGE_* environment variables.

Every field of ``ServerConfig`` (and of its nested limits: ``scheduler``, ``job_limits``,
``worker_limits``) is a setting, plus ``address`` (where gRPC listens, an argument of ``serve``).
A setting is named by its dotted path; the same name is a key in the file and, upper-cased with
dots turned into underscores and ``PREIMAGE_`` in front, an environment variable::

    # preimage.toml                         # environment
    address = "0.0.0.0:50051"               PREIMAGE_ADDRESS=0.0.0.0:50051
    metrics_port = 9464                     PREIMAGE_METRICS_PORT=9464
    [scheduler]
    max_rows = 32                           PREIMAGE_SCHEDULER_MAX_ROWS=32

Precedence, lowest first: the dataclass defaults, the file, the environment, command-line flags.
The settings are discovered from the dataclasses themselves, and ``docs/operations.md`` holds the
table ``settings_table()`` prints (a test compares the two), so a new field cannot be added
without being documented, nor a documented one disappear.

    python -m service.rpc.config --table          # the Markdown table for docs/operations.md
    python -m service.rpc.config --show FILE      # the configuration FILE + environment resolve to
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.jobs.limits import JobLimits, SchedulerLimits
from service.models.store import default_store_dir
from service.models.worker import WorkerLimits

ENV_PREFIX = "PREIMAGE_"
DEFAULT_ADDRESS = "localhost:50051"
# store_dir keeps the variable the CLI has always read (README, .ci/run), not PREIMAGE_STORE_DIR.
ENV_NAMES = {"store_dir": "PREIMAGE_STORE"}
CONFIG_ENV = "PREIMAGE_CONFIG"  # a config file named by the environment (containers)
# Where ``preimage serve`` (resolve) differs from ServerConfig(): a served process exports metrics
# and probes on Triton's way, on a port of their own, unless told otherwise.
SERVE_DEFAULTS: dict[str, Any] = {"metrics_port": 9464}

# One line per setting, for the table. The test fails for a field missing here, so write one when
# adding a field to ServerConfig or one of its nested limits.
HELP: dict[str, str] = {
    "address": "where gRPC listens, host:port (`0.0.0.0:50051` in a container)",
    "store_dir": "model store directory; several replicas may share it (docs/operations.md)",
    "device": "`cpu`, `cuda`, `cuda:1`; unset: cuda when available, else cpu",
    "rpc_threads": "gRPC worker threads of the short RPCs (health, listings, model management)",
    "stream_threads": "threads of the long streams (uploads, visualizations, release checks): the most open at once",
    "tenant_streams": "long streams one tenant may hold open at once (refused beyond: RESOURCE_EXHAUSTED)",
    "upload_idle_seconds": "an upload that sends nothing for this long ends (DEADLINE_EXCEEDED, staging removed)",
    "torch_threads": "threads of the optimizations' tensor operations; unset: one per core (split among replicas)",
    "converted_cache_size": "converted models kept in memory per replica (LRU)",
    "converted_cache_bytes": "estimated bytes of the converted models kept per replica (LRU; the last used stays)",
    "max_model_bytes": "largest upload accepted",
    "seed_bundled": "put the bundled models into the store at start",
    "metrics_port": "port of `/metrics`, `/healthz`, `/readyz` (0: any free); `none`: off (in-code ServerConfig: off)",
    "metrics_address": "interface the metrics endpoint listens on (`0.0.0.0` in a container, for Prometheus)",
    "metrics_model_labels": "models with their own `model` label on job metrics (the most used; the rest: `other`)",
    "shutdown_grace": "seconds from SIGTERM to exit: running jobs may finish, then are cancelled (UNAVAILABLE)",
    "batch_invariant": "results independent of who shares a batch (CPU: batches padded to 4 rows; lone jobs 2.5×)",
    "scheduler.max_rows": "images the network runs in one batch (a fourier/phase job counts its views)",
    "scheduler.max_pixels": "Σ H·W of one batch's images (stands in for activation memory)",
    "scheduler.max_total_pixels": "Σ H·W of every running image, over all batches",
    "scheduler.max_queued": "jobs waiting for admission before RESOURCE_EXHAUSTED",
    "job_limits.max_pixels": "pixels of one output image",
    "job_limits.max_image_bytes": "bytes of one encoded input image",
    "job_limits.max_input_pixels": "pixels of one decoded input image (checked before decoding)",
    "job_limits.max_targets": "targets (images/channels) of one request",
    "job_limits.max_steps": "optimization steps of one request, both stages",
    "job_limits.max_request_pixels": "Σ decoded pixels of one request's input images (checked from the headers)",
    "job_limits.max_job_bytes": "estimated memory of one request (rows × activations + images)",
    "worker_limits.extra_address_space": "bytes of address space a model's conversion child may add",
    "worker_limits.cpu_seconds": "CPU seconds of a model's conversion child",
    "worker_limits.wall_seconds": "wall-clock seconds of a model's conversion child",
    "auth.tokens_file": "tenants' token hashes (JSON, service/rpc/auth.py); unset: open, loopback addresses only",
    "auth.tls_cert": "PEM certificate: serve TLS only",
    "auth.tls_key": "PEM private key of `auth.tls_cert`",
    "auth.tls_client_ca": "PEM CA: also require client certificates it signed (mutual TLS)",
}


@dataclass(frozen=True)
class AuthConfig:
    """How the server authenticates (a ServerConfig field).

    ``tokens_file``: the JSON above; None runs open (loopback only). ``tls_cert``/``tls_key``: PEM
    files; with them the server speaks TLS only. ``tls_client_ca``: also require client
    certificates signed by this CA (mutual TLS). Tokens are still required with mutual TLS: the
    certificate proves the machine, the token names the team.
    """

    tokens_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None

    @property
    def open(self) -> bool:
        return self.tokens_file is None


@dataclass
class ServerConfig:
    """Everything a deployment may tune; defaults suit one CPU box."""

    store_dir: Path
    device: str | None = None  # None: cuda when available, else cpu
    rpc_threads: int = 16
    # Long streams run on a pool of their own, so that no number of them can delay a health check;
    # they are counted per tenant before they take a thread (service/rpc/streams.py).
    stream_threads: int = 32
    tenant_streams: int = 8
    upload_idle_seconds: float = 30.0
    # Threads of the optimizations' tensor operations; None: torch's default, one per core. Split the
    # cores when replicas or other jobs share the box: oversubscribed threads wait on each other at
    # every operator (2 processes × 2 threads on 2 cores made 17 ms steps take 1.7–2.6 s).
    torch_threads: int | None = None
    scheduler: SchedulerLimits = field(default_factory=SchedulerLimits)  # batch bounds, queue length
    converted_cache_size: int = 4
    converted_cache_bytes: int = 4 << 30  # estimated bytes of the converted models kept (ConvertedCache)
    max_model_bytes: int = 1 << 30
    job_limits: JobLimits = field(default_factory=JobLimits)
    worker_limits: WorkerLimits = field(default_factory=WorkerLimits)
    seed_bundled: bool = True
    auth: AuthConfig = field(default_factory=AuthConfig)  # tokens, TLS; default: open, loopback only
    # Prometheus /metrics and the HTTP probes on this port (0: any free one); None: off. Off for a
    # ServerConfig built in code (embedded servers, tests: many per machine, none scraped);
    # ``preimage serve`` turns it on (SERVE_DEFAULTS).
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"  # the interface /metrics listens on (containers: 0.0.0.0)
    metrics_model_labels: int = 10  # job metrics' model label: the N most used models, the rest "other"
    shutdown_grace: float = 30.0  # seconds from SIGTERM to exit: jobs may finish, then are cancelled
    # Results independent of batch composition; on CPU the network runs on batches padded with zero
    # images to a multiple of 4 rows, which costs lone jobs 2.5× (service/jobs/batch_invariance.py).
    batch_invariant: bool = False


class ConfigError(ValueError):
    """A setting that does not exist or does not parse; the message names the source."""


@dataclass(frozen=True)
class Setting:
    """One leaf of the configuration tree."""

    name: str  # dotted path, e.g. "scheduler.max_rows"
    type: Any  # the annotation, resolved
    default: Any

    @property
    def env(self) -> str:
        return ENV_NAMES.get(self.name, ENV_PREFIX + self.name.replace(".", "_").upper())

    @property
    def optional(self) -> bool:
        return _is_optional(self.type)

    @property
    def base(self) -> type:
        return _base_type(self.type)


def _is_optional(tp: Any) -> bool:
    return isinstance(tp, types.UnionType | typing._UnionGenericAlias) and type(None) in typing.get_args(tp)  # type: ignore[attr-defined]


def _base_type(tp: Any) -> Any:
    if _is_optional(tp):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


SCALARS = (bool, int, float, str, Path)


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None  # required (store_dir): the resolver supplies one


def settings() -> list[Setting]:
    """Every setting: ``address``, then ServerConfig's fields, nested dataclasses flattened."""
    out = [Setting("address", str, DEFAULT_ADDRESS)]

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            else:
                name = prefix + f.name
                out.append(Setting(name, tp, SERVE_DEFAULTS.get(name, _default_of(f))))

    walk(ServerConfig, "")
    return out


def unsupported_settings() -> list[str]:
    """Settings whose type a file or variable cannot express (the test requires none)."""
    return [s.name for s in settings() if s.base not in SCALARS]


def _parse(setting: Setting, raw: Any, source: str) -> Any:
    """A value from TOML (already typed) or the environment (a string) → the field's type."""
    where = f"{setting.name} (from {source})"
    if isinstance(raw, str) and setting.optional and raw.strip().lower() in ("", "none", "null"):
        return None
    base = setting.base
    try:
        if base is bool:
            if isinstance(raw, bool):
                return raw
            if not isinstance(raw, str):  # TOML has booleans: 1 or "1" there is more likely a mistake
                raise ValueError(f"{raw!r} is not a boolean (true/false)")
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"{raw!r} is not a boolean (true/false, 1/0, yes/no)")
        if base is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(f"{raw!r} is not an integer")
            return int(str(raw).replace("_", "")) if isinstance(raw, str) else int(raw)
        if base is float:
            if isinstance(raw, bool):
                raise ValueError(f"{raw!r} is not a number")
            return float(raw)
        if base is Path:
            return Path(os.path.expanduser(str(raw)))
        if base is str:
            if not isinstance(raw, str):
                raise ValueError(f"{raw!r} is not a string")
            return raw
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    raise ConfigError(f"{where}: settings of type {setting.type} cannot be set from a file or the environment")


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def resolve(
    file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[str, ServerConfig]:
    """(address, ServerConfig) from defaults < ``file`` (TOML) < ``env`` < ``overrides``.

    ``env`` defaults to os.environ; ``file`` defaults to $PREIMAGE_CONFIG. ``overrides`` maps
    dotted names to already-typed values (command-line flags); None values are ignored.
    """
    env = os.environ if env is None else env
    known = {s.name: s for s in settings()}
    values: dict[str, Any] = {name: s.default for name, s in known.items()}
    file = file or env.get(CONFIG_ENV) or None
    if file is not None:
        try:
            with open(file, "rb") as f:
                table = tomllib.load(f)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {file} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from exc
        for name, raw in _flatten(table).items():
            if name not in known:
                close = [k for k in known if k.split(".")[-1] == name.split(".")[-1]]
                hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
                raise ConfigError(f"config file {file}: unknown setting {name!r}{hint}")
            values[name] = _parse(known[name], raw, str(file))
    prefixed = {k for k in env if k.startswith(ENV_PREFIX)}
    for setting in known.values():
        if setting.env in env:
            values[setting.name] = _parse(setting, env[setting.env], setting.env)
    # A misspelt variable would otherwise be ignored silently; PREIMAGE_* names used by other
    # parts (client, CLI, caches) are not server settings and are allowed.
    foreign = {"PREIMAGE_SERVER", "PREIMAGE_CACHE", CONFIG_ENV, "PREIMAGE_TOKEN"}
    unknown = sorted(prefixed - {s.env for s in known.values()} - foreign)
    if unknown:
        import logging

        logging.getLogger("preimage.config").warning(
            "unknown PREIMAGE_* environment variables ignored", extra={"fields": {"names": unknown}}
        )
    for name, value in (overrides or {}).items():
        if name not in known:
            raise ConfigError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = value
    if values["store_dir"] is None:
        values["store_dir"] = default_store_dir()
    address = values.pop("address")
    return address, build(values)


def build(values: Mapping[str, Any]) -> ServerConfig:
    """A ServerConfig from flat dotted values (nested dataclasses rebuilt)."""

    def make(cls: type, prefix: str) -> Any:
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                kwargs[f.name] = make(tp, f"{prefix}{f.name}.")
            elif prefix + f.name in values:
                kwargs[f.name] = values[prefix + f.name]
        return cls(**kwargs)

    return make(ServerConfig, "")


def _type_name(s: Setting) -> str:
    name = {bool: "bool", int: "int", float: "float", str: "string", Path: "path"}.get(s.base, str(s.type))
    return f"{name} or unset" if s.optional else name


def _default_text(s: Setting) -> str:
    if s.name == "store_dir":
        return "`~/.local/share/preimage/store`"
    if s.default is None:
        return "unset"
    if isinstance(s.default, bool):
        return f"`{str(s.default).lower()}`"
    return f"`{s.default}`"


def settings_table() -> str:
    """The Markdown table in docs/operations.md (between the settings-table markers)."""
    rows = [
        "| setting (TOML key) | environment variable | type | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for s in settings():
        help_text = HELP.get(s.name, "**undocumented: add a line to service.config.HELP**")
        rows.append(f"| `{s.name}` | `{s.env}` | {_type_name(s)} | {_default_text(s)} | {help_text} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="The preimage server's settings.")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of every setting")
    parser.add_argument("--show", metavar="FILE", nargs="?", const="", help="print the resolved configuration")
    args = parser.parse_args(argv)
    if args.table:
        sys.stdout.write(settings_table())
        return 0
    try:
        address, config = resolve(args.show or None)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"address": address, **dataclasses.asdict(config)}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
