"""Who is calling: bearer tokens → tenants, the admin role, TLS, and who may see which model.

Tokens travel in the call metadata as ``authorization: Bearer <token>``. The server keeps only
their sha256 (a leaked config file does not leak tokens) in a JSON file::

    {
      "tenants": {
        "vision": {"tokens": ["<sha256 hex of the token>"], "quotas": {"max_models": 20}},
        "ops":    {"tokens": ["<sha256 hex>"], "admin": true}
      },
      "default_quotas": {"max_concurrent_jobs": 2}
    }

``python -m service.rpc.auth new`` prints a fresh token and the line to put in the file. The file is
re-read when its mtime (or size) changes, checked at most once a second, so tokens are added and
revoked without a restart; a file that does not parse keeps the previous configuration (and logs
why) rather than locking everybody out.

Without a tokens file the server runs *open*: every caller is the anonymous admin tenant "". That
is only allowed on a loopback address (the embedded default, tests, the CLI's local commands) and
the server logs that it is open.

Authorization (``can_read``/``can_write``): a model belongs to the tenant that uploaded it. Other
tenants may read and use it (get, list, taps, visualizations) only when it is public (bundled
models are) or shared with them by name; only the owner or an admin may delete or re-share it.
A model a caller may not read answers exactly like a model that does not exist (NOT_FOUND, and it
is left out of "stored models" hints), so tenants cannot probe each other's model names or ids.
A caller who may read a model but not change it gets PERMISSION_DENIED (it already knows the model
exists, so saying so leaks nothing).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from service.jobs.errors import ServiceError
from service.jobs.quotas import Quota
from service.rpc.config import AuthConfig

log = logging.getLogger("preimage.auth")

TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
PROTECTED_PREFIX = "/preimage.v1.PreimageService/"  # health and reflection stay open for probes
RELOAD_CHECK_SECONDS = 1.0


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def unauthenticated(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, message)


@dataclass(frozen=True)
class Principal:
    """The caller of one RPC."""

    tenant: str
    admin: bool = False
    quota: Quota = field(default_factory=Quota)


OPEN = Principal(tenant="", admin=True)


@dataclass(frozen=True)
class TenantConfig:
    name: str
    token_hashes: frozenset[str]
    admin: bool
    quota: Quota


def parse_config(raw: Any) -> tuple[dict[str, Principal], Quota]:
    """The tokens file's JSON → {token hash: principal}, default quota. Raises ValueError."""
    if not isinstance(raw, dict) or not isinstance(raw.get("tenants"), dict):
        raise ValueError('the tokens file must be a JSON object with a "tenants" object')
    default = Quota.from_dict(raw.get("default_quotas") or {})
    by_hash: dict[str, Principal] = {}
    for name, entry in raw["tenants"].items():
        if not TENANT_RE.match(name):
            raise ValueError(f"tenant name {name!r}: 1-64 letters, digits, '.', '_' or '-'")
        if not isinstance(entry, dict):
            raise ValueError(f"tenant {name!r}: expected an object")
        hashes = entry.get("tokens", [])
        if not isinstance(hashes, list) or not all(isinstance(h, str) and SHA256_RE.match(h) for h in hashes):
            raise ValueError(f"tenant {name!r}: tokens must be a list of lowercase sha256 hex digests")
        quota = default.merged(entry.get("quotas") or {})
        principal = Principal(tenant=name, admin=bool(entry.get("admin", False)), quota=quota)
        for h in hashes:
            if h in by_hash:
                raise ValueError(f"token {h[:12]}… is listed for two tenants")
            by_hash[h] = principal
    return by_hash, default


class Authenticator:
    """Maps call metadata to a Principal; reloads the tokens file when it changes."""

    def __init__(self, config: AuthConfig | None = None) -> None:
        self.config = config or AuthConfig()
        self._lock = threading.Lock()
        self._by_hash: dict[str, Principal] = {}
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self.reloads = 0
        if self.config.tokens_file is not None:
            self._reload(initial=True)

    @property
    def open(self) -> bool:
        return self.config.open

    def _reload(self, initial: bool = False) -> None:
        path = self.config.tokens_file
        assert path is not None
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            by_hash, _ = parse_config(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            if initial:  # a server must not start with an unreadable tokens file: fail loudly
                raise ValueError(f"tokens file {path}: {exc}") from exc
            log.error("tokens file not reloaded, keeping the previous one", extra={"fields": {"error": str(exc)}})
            # Remember the broken stamp so the error is logged once, not on every call.
            self._stamp = stamp if "stamp" in locals() else self._stamp
            return
        self._by_hash, self._stamp = by_hash, stamp
        self.reloads += 0 if initial else 1
        tenants = sorted({p.tenant for p in by_hash.values()})
        log.info("tokens loaded", extra={"fields": {"file": str(path), "tenants": tenants}})

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._checked < RELOAD_CHECK_SECONDS:
                return
            self._checked = now
            self._reload()

    def force_reload(self) -> None:
        """Re-read the tokens file now (tests; a SIGHUP handler could call this)."""
        with self._lock:
            self._checked = time.monotonic()
            self._stamp = None
            self._reload()

    def authenticate(self, metadata: Sequence[tuple[str, Any]] | None) -> Principal:
        """The caller, or ServiceError(UNAUTHENTICATED). Open servers accept everyone."""
        if self.open:
            return OPEN
        self._maybe_reload()
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            raise unauthenticated("no token: send `authorization: Bearer <token>` in the call metadata")
        if len(values) > 1:
            raise unauthenticated("more than one authorization header")
        value = values[0] if isinstance(values[0], str) else ""
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthenticated("the authorization header must be `Bearer <token>`")
        digest = hash_token(token.strip())
        with self._lock:
            by_hash = self._by_hash
        # A lookup by the token's digest: timing can at most leak bits of a sha256 digest of a
        # guess, never of a stored token, so no constant-time comparison is needed.
        principal = by_hash.get(digest)
        if principal is None:
            raise unauthenticated("unknown or revoked token")
        return principal


# -- authorization ------------------------------------------------------------------------------
def can_read(principal: Principal, record: Any) -> bool:
    """May ``principal`` see and use this model?"""
    return (
        principal.admin
        or record.bundled
        or getattr(record, "public", False)
        or getattr(record, "owner", "") == principal.tenant
        or principal.tenant in getattr(record, "shared_with", ())
    )


ORIGINS = ("bundled", "own", "shared", "public", "other")  # how names resolve: first wins


def origin(principal: Principal, record: Any) -> str:
    """Where a model the caller can read comes from, for that caller: ``ORIGINS``. Bundled names
    are reserved, so they come first; "other" is another tenant's model only an admin sees."""
    if record.bundled:
        return "bundled"
    if getattr(record, "owner", "") == principal.tenant:
        return "own"
    if principal.tenant in getattr(record, "shared_with", ()):
        return "shared"
    if getattr(record, "public", False):
        return "public"
    return "other"


def origin_rank(principal: Principal) -> Any:
    """``ModelStore.get``'s rank for this caller: a name is its own model, else one shared with it,
    else a public one."""
    return lambda record: ORIGINS.index(origin(principal, record))


def can_write(principal: Principal, record: Any) -> bool:
    """May ``principal`` delete or re-share this model?"""
    return principal.admin or (not record.bundled and getattr(record, "owner", "") == principal.tenant)


def check_share_list(tenants: Sequence[str]) -> list[str]:
    bad = [t for t in tenants if not TENANT_RE.match(t)]
    if bad:
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"shared_with: {bad[:5]!r} are not tenant names (1-64 letters, digits, '.', '_' or '-')",
        )
    if len(tenants) > 1000:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"shared_with: {len(tenants)} tenants; at most 1000")
    return sorted(set(tenants))


# -- the gRPC side --------------------------------------------------------------------------------
class AuthInterceptor(grpc.ServerInterceptor):
    """Rejects unauthenticated calls to PreimageService before any handler runs.

    Handlers still ask the Authenticator for the principal (a sync interceptor cannot hand values
    to the handler's context); this interceptor guarantees no RPC, including ones added later,
    runs for an unknown caller.
    """

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or self.authenticator.open or not details.method.startswith(PROTECTED_PREFIX):
            return handler
        try:
            self.authenticator.authenticate(details.invocation_metadata)
        except ServiceError as exc:
            return _refusing(handler, details.method, exc.message)
        return handler


def _refusing(handler: grpc.RpcMethodHandler, method: str, message: str) -> grpc.RpcMethodHandler:
    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        # Refused calls never reach rpc_handler: log them here (repeated failures from one peer
        # are how token guessing shows up).
        fields = {"method": method.rsplit("/", 1)[-1], "peer": context.peer(), "code": "UNAUTHENTICATED",
                  "message": message}  # fmt: skip
        log.warning("rpc", extra={"fields": fields})
        from service.rpc.errors import Details, rich_status

        context.abort_with_status(rich_status(grpc.StatusCode.UNAUTHENTICATED, message, Details("UNAUTHENTICATED")))

    return refusing_handler(handler, abort)


def refusing_handler(handler: grpc.RpcMethodHandler, abort: Callable[[Any, Any], Any]) -> grpc.RpcMethodHandler:
    """A handler of the same kind (unary or streaming on each side) and serializers as ``handler``
    that runs ``abort`` instead: what an interceptor returns to refuse a call before it starts."""
    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort, **kw)
    return grpc.unary_unary_rpc_method_handler(abort, **kw)


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_credentials(config: AuthConfig) -> grpc.ServerCredentials | None:
    """TLS credentials when configured (mutual TLS with a client CA), else None (plaintext)."""
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key too")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ValueError("TLS needs both tls_cert and tls_key")
    pair = [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
    if config.tls_client_ca is not None:
        return grpc.ssl_server_credentials(
            pair, root_certificates=Path(config.tls_client_ca).read_bytes(), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pair)


def check_listen(address: str, config: AuthConfig) -> None:
    """An open server (no tokens) may listen on loopback only; say loudly that it is open."""
    if config.open:
        if not is_loopback(address):
            raise RuntimeError(
                f"refusing to serve {address} without authentication: give a tokens file "
                "(--tokens) or listen on localhost"
            )
        log.warning(
            "serving OPEN: no authentication, every caller is an admin; loopback only",
            extra={"fields": {"address": address}},
        )


def write_config(path: Path, tenants: Mapping[str, Mapping[str, Any]], default_quotas: Mapping | None = None) -> None:
    """Write a tokens file from plain tokens: {tenant: {"tokens": [plain, ...], "admin": bool, "quotas": {}}}.

    Hashes the tokens; written atomically so a reloading server never reads half a file.
    """
    from service.models.store import atomic_write

    raw: dict[str, Any] = {"tenants": {}, "default_quotas": dict(default_quotas or {})}
    for name, entry in tenants.items():
        raw["tenants"][name] = {**entry, "tokens": [hash_token(t) for t in entry.get("tokens", [])]}
    parse_config(raw)  # refuse to write a file the server would refuse
    atomic_write(path, json.dumps(raw, indent=1).encode())


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Tokens for the preimage server's tokens file.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("new", help="print a new random token and its sha256 for the tokens file")
    h = sub.add_parser("hash", help="print the sha256 of a token read from stdin")
    h.add_argument("--stdin", action="store_true", default=True)
    args = parser.parse_args(argv)
    if args.command == "new":
        token = secrets.token_urlsafe(32)
        print(f"token:  {token}\nsha256: {hash_token(token)}")
    else:
        import sys

        print(hash_token(sys.stdin.readline().strip()))


if __name__ == "__main__":
    main()
