"""Tenants and tokens on a real server: authentication, isolation (every RPC tried), sharing, admin,
token reload without restart, the loopback-only open mode, TLS and mutual TLS.

Decision tested here (service/rpc/auth.py): another tenant's model answers exactly like a model that
does not exist (NOT_FOUND, same message shape, not named in hints); a model you may read but not
change answers PERMISSION_DENIED to delete/share.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.preimage.v1 import preimage_pb2 as pb
from service.api.preimage.v1 import preimage_pb2_grpc as pb_grpc
from service.client import PreimageClient
from service.rpc.app import start_server
from service.rpc.auth import AuthConfig, hash_token, write_config
from service.rpc.config import ServerConfig
from tests._service_models import conv_net

TOKENS = {"alice": "alice-token-1", "bob": "bob-token-1", "carol": "carol-token-1", "ops": "ops-token-1"}
FAST = {"steps": 2, "refine_steps": 0, "report_every": 0}
SECRET = conv_net(seed=11)  # alice's model


def tenants(**extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {name: {"tokens": [tok]} for name, tok in TOKENS.items()}
    out["ops"]["admin"] = True
    out.update(extra)
    return out


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens.json"
    write_config(path, tenants())
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tokens_file: Path) -> Iterator[Any]:
    config = ServerConfig(
        store_dir=tmp_path_factory.mktemp("store"), seed_bundled=False, auth=AuthConfig(tokens_file=tokens_file)
    )
    running = start_server("127.0.0.1:0", config)
    yield running
    running.stop(grace=None)


def client_for(server: Any, tenant: str | None, token: str | None = None) -> PreimageClient:
    return PreimageClient(
        f"127.0.0.1:{server.port}", timeout=60, token=token if token is not None else TOKENS.get(tenant or "")
    )


@pytest.fixture(scope="module")
def clients(server: Any) -> Iterator[dict[str, PreimageClient]]:
    made = {name: client_for(server, name) for name in TOKENS}
    yield made
    for c in made.values():
        c.close()


@pytest.fixture(scope="module")
def secret(clients: dict[str, PreimageClient]) -> pb.Model:
    return clients["alice"].upload(SECRET, name="secret").model


def code_of(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details() or ""


def every_rpc(ref: str) -> dict[str, Callable[[PreimageClient], Any]]:
    """One call per RPC of PreimageService that names ``ref`` (upload names nothing)."""
    return {
        "GetModel": lambda c: c.get(ref),
        "ListTaps": lambda c: c.taps(ref),
        "Invert": lambda c: c.invert(ref, "relu2", [_png()], **FAST).wait(),
        "Maximize": lambda c: c.maximize(ref, "relu2", [0], **FAST).wait(),
        "Caricature": lambda c: c.caricature(ref, "relu2", [_png()], **FAST).wait(),
        "ShareModel": lambda c: c.share(ref, ["bob"]),
        "DeleteModel": lambda c: c.delete(ref),
        "CheckRelease": lambda c: c.check(ref, taps=["relu2"]).wait(),
        "GetModelStatistics": lambda c: c.statistics(ref),
        "Exemplars": lambda c: c.exemplars(ref, "relu2", [_png()], [0]),
    }


def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_every_rpc_is_covered() -> None:
    names = {m.name for m in pb.DESCRIPTOR.services_by_name["PreimageService"].methods}
    assert names == set(every_rpc("x")) | {"UploadModel", "ListModels", "GetServerInfo"}


# -- authentication -------------------------------------------------------------------------------
@pytest.mark.parametrize("token", [None, "", "wrong-token"])
def test_missing_or_wrong_token_is_unauthenticated_on_every_rpc(server: Any, secret: pb.Model, token) -> None:
    with client_for(server, None, token or "") as c:
        calls = {**every_rpc(secret.id), "ListModels": lambda c: c.models(), "UploadModel": lambda c: c.upload(SECRET),
                 "GetServerInfo": lambda c: c.server_info()}  # fmt: skip
        for name, call in calls.items():
            code, msg = code_of(lambda call=call: call(c))
            assert code == grpc.StatusCode.UNAUTHENTICATED, name
            assert ("no token" if not token else "unknown") in msg, (name, msg)


def test_refusals_carry_a_reason(server: Any, secret: pb.Model, clients: dict[str, PreimageClient]) -> None:
    from service.client import error_details

    with client_for(server, None, "wrong-token") as c, pytest.raises(grpc.RpcError) as refused:
        c.models()
    assert error_details(refused.value).reason == "UNAUTHENTICATED"
    with pytest.raises(grpc.RpcError) as hidden:
        clients["bob"].get(secret.id)  # alice's, not shared: exactly a missing model
    details = error_details(hidden.value)
    assert details.code == grpc.StatusCode.NOT_FOUND and details.reason == "MODEL_NOT_FOUND"
    assert list(details.fields) == ["model"]


def test_a_header_that_is_not_a_bearer_token_is_unauthenticated(server: Any) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.PreimageServiceStub(channel)
        code, msg = code_of(lambda: stub.ListModels(pb.ListModelsRequest(), metadata=[("authorization", "Basic abc")]))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in msg


def test_blanks_around_a_valid_token_are_stripped(server: Any, secret: pb.Model) -> None:
    with client_for(server, None, TOKENS["alice"] + " ") as c:
        assert [m.id for m in c.models()] == [secret.id]


def test_refused_calls_are_logged(server: Any, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.WARNING, logger="preimage.auth"), client_for(server, None, "guess") as c:
        code_of(c.models)
    refused = [r for r in caplog.records if getattr(r, "fields", {}).get("code") == "UNAUTHENTICATED"]
    assert refused and refused[0].fields["method"] == "ListModels" and refused[0].fields["peer"]
    assert "guess" not in str(refused[0].fields)  # the token itself is never logged


def test_health_needs_no_token(server: Any) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


# -- isolation ------------------------------------------------------------------------------------
def test_other_tenants_cannot_see_use_or_delete(clients: dict[str, PreimageClient], secret: pb.Model) -> None:
    bob = clients["bob"]
    assert secret.owner == "alice" and not secret.public
    assert bob.models() == [] and bob.models(name_prefix="sec") == []
    nonexistent = {name: code_of(lambda call=call: call(bob)) for name, call in every_rpc("no-such").items()}
    for ref in ("secret", secret.id, secret.id[:10]):
        for name, call in every_rpc(ref).items():
            code, msg = code_of(lambda call=call: call(bob))
            # Exactly what a missing model gets: the code, and no trace of the model in the text.
            assert code == grpc.StatusCode.NOT_FOUND == nonexistent[name][0], (name, ref)
            assert "secret" not in msg.replace(f"'{ref}'", "") and secret.id[:8] not in msg.replace(ref, ""), msg
    # Nothing happened to it.
    assert clients["alice"].get("secret").id == secret.id


def test_same_bytes_are_a_separate_model_per_tenant(clients: dict[str, PreimageClient], secret: pb.Model) -> None:
    # Content-addressing across tenants would answer "already existed" and leak that alice has it.
    mine = clients["bob"].upload(SECRET, name="bobs")
    assert not mine.already_existed and mine.model.id != secret.id and mine.model.owner == "bob"
    assert clients["bob"].upload(SECRET, name="bobs").already_existed  # within a tenant: deduplicated
    assert [m.name for m in clients["alice"].models()] == ["secret"]
    clients["bob"].delete(mine.model.id)
    assert clients["alice"].get(secret.id).name == "secret"


def test_sharing_grants_exactly_read_and_use(clients: dict[str, PreimageClient], secret: pb.Model) -> None:
    alice, bob, carol = clients["alice"], clients["bob"], clients["carol"]
    shared = alice.share("secret", ["bob"])
    assert list(shared.shared_with) == ["bob"] and not shared.public
    try:
        assert [m.id for m in bob.models()] == [secret.id]
        assert bob.get(secret.id).name == "secret" and len(bob.taps(secret.id).taps) == 6
        run = bob.maximize(secret.id, "relu2", [0], **FAST).wait()
        assert len(run.results) == 1 and run.results[0].png
        for name in ("DeleteModel", "ShareModel"):
            code, msg = code_of(lambda name=name: every_rpc(secret.id)[name](bob))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "owner" in msg, name
        assert code_of(lambda: carol.get(secret.id))[0] == grpc.StatusCode.NOT_FOUND
        assert carol.models() == []

        public = alice.share("secret", [], public=True)
        assert public.public and list(public.shared_with) == []
        assert carol.get(secret.id).id == secret.id and [m.id for m in carol.models()] == [secret.id]
        assert code_of(lambda: carol.delete(secret.id))[0] == grpc.StatusCode.PERMISSION_DENIED
    finally:
        alice.share("secret", [], public=False)
    assert code_of(lambda: bob.get(secret.id))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: carol.taps(secret.id))[0] == grpc.StatusCode.NOT_FOUND
    code, msg = code_of(lambda: alice.share("secret", ["not a tenant!"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "tenant" in msg


def test_upload_can_share_at_once(clients: dict[str, PreimageClient]) -> None:
    model = clients["carol"].upload(conv_net(seed=12), name="carols", shared_with=["bob"]).model
    assert list(model.shared_with) == ["bob"]
    assert clients["bob"].get(model.id).owner == "carol"
    assert code_of(lambda: clients["alice"].get(model.id))[0] == grpc.StatusCode.NOT_FOUND
    clients["carol"].delete(model.id)


def test_admin_sees_and_deletes_everything(clients: dict[str, PreimageClient]) -> None:
    model = clients["bob"].upload(conv_net(seed=13), name="doomed").model
    assert model.id in {m.id for m in clients["ops"].models()}
    assert clients["ops"].taps(model.id).model_id == model.id
    clients["ops"].delete(model.id)
    assert code_of(lambda: clients["bob"].get(model.id))[0] == grpc.StatusCode.NOT_FOUND


def test_tokens_reload_without_restart(server: Any, tokens_file: Path, clients, secret: pb.Model) -> None:
    original = tokens_file.read_bytes()
    try:
        extra = tenants(dave={"tokens": ["dave-token-1"]})
        extra["bob"] = {"tokens": ["bob-token-2"]}  # bob's old token revoked, a new one issued
        write_config(tokens_file, extra)
        server.servicer.auth.force_reload()  # the server also notices by itself within a second
        with client_for(server, None, "dave-token-1") as dave:
            assert dave.models() == []
        assert code_of(lambda: clients["bob"].models())[0] == grpc.StatusCode.UNAUTHENTICATED
        with client_for(server, None, "bob-token-2") as bob:
            assert bob.models() == []
        # A broken file keeps the last good configuration instead of locking everyone out.
        tokens_file.write_text("{not json")
        server.servicer.auth.force_reload()
        with client_for(server, None, "dave-token-1") as dave:
            assert dave.models() == []
    finally:
        tokens_file.write_bytes(original)
        server.servicer.auth.force_reload()
    assert [m.id for m in clients["alice"].models()] == [secret.id]


def test_reload_by_mtime(tmp_path: Path) -> None:
    import os
    import time

    from service.rpc.auth import Authenticator

    path = tmp_path / "tokens.json"
    write_config(path, {"a": {"tokens": ["t1"]}})
    auth = Authenticator(AuthConfig(tokens_file=path))
    assert auth.authenticate([("authorization", "Bearer t1")]).tenant == "a"
    write_config(path, {"b": {"tokens": ["t1"]}})
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    auth._checked = 0.0  # skip the once-a-second throttle instead of sleeping
    assert auth.authenticate([("authorization", "Bearer t1")]).tenant == "b"
    assert hash_token("t1") in path.read_text() and 't1"' not in path.read_text()  # only hashes stored


def test_open_server_refuses_non_loopback(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="without authentication"):
        start_server("0.0.0.0:0", ServerConfig(store_dir=tmp_path, seed_bundled=False))


# -- TLS ------------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make test certificates")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return d


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_and_mutual_tls(pki: Path, tmp_path: Path, tokens_file: Path, mutual: bool) -> None:
    auth = AuthConfig(
        tokens_file=tokens_file,
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.pem" if mutual else None,
    )
    running = start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path, seed_bundled=False, auth=auth))
    try:
        address, ca = f"127.0.0.1:{running.port}", (pki / "ca.pem").read_bytes()
        key, cert = (pki / "client.key").read_bytes(), (pki / "client.pem").read_bytes()
        with_cert = grpc.ssl_channel_credentials(ca, key, cert)
        with PreimageClient(address, timeout=10, token=TOKENS["alice"], credentials=with_cert) as c:
            assert c.models() == []
        with PreimageClient(address, timeout=5, token=TOKENS["alice"]) as plain:  # plaintext to a TLS port
            assert code_of(plain.models)[0] == grpc.StatusCode.UNAVAILABLE
        ca_only = grpc.ssl_channel_credentials(ca)
        with PreimageClient(address, timeout=5, token=TOKENS["alice"], credentials=ca_only) as c:
            if mutual:  # no client certificate: the handshake fails
                assert code_of(c.models)[0] == grpc.StatusCode.UNAVAILABLE
            else:
                assert c.models() == []
        with PreimageClient(address, timeout=10, credentials=with_cert) as c:  # a certificate is not a token
            assert code_of(c.models)[0] == grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.stop(grace=None)


def test_cli_sends_the_token_from_the_environment(
    server: Any, secret: pb.Model, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    address = f"127.0.0.1:{server.port}"
    monkeypatch.delenv("PREIMAGE_TOKEN", raising=False)
    assert main(["models", "--server", address, "--json"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("PREIMAGE_TOKEN", TOKENS["alice"])
    assert main(["models", "--server", address, "--json"]) == 0
    assert secret.id in capsys.readouterr().out
    monkeypatch.setenv("PREIMAGE_TOKEN", TOKENS["bob"])
    assert main(["taps", secret.id, "--server", address]) == 2  # NOT_FOUND: a bad argument
    assert "NOT_FOUND" in capsys.readouterr().err
