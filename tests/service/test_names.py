"""Names resolve per tenant, over a real server with tokens: a caller's own model of a name comes
first, then one shared with it, then a public one, so no other tenant can make a caller's names
ambiguous by publishing or sharing a model of the same name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from service.client import PreimageClient
from service.rpc.app import RunningServer, start_server
from service.rpc.auth import AuthConfig, write_config
from service.rpc.config import ServerConfig
from tests._service_models import conv_net

TOKENS = {"alice": "alice-names", "bob": "bob-names", "carol": "carol-names", "dave": "dave-names", "ops": "ops-names"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    path: Path = tmp_path_factory.mktemp("auth") / "tokens.json"
    tenants = {name: {"tokens": [tok]} for name, tok in TOKENS.items()}
    tenants["ops"]["admin"] = True
    write_config(path, tenants)
    config = ServerConfig(store_dir=tmp_path_factory.mktemp("store"), seed_bundled=False, auth=AuthConfig(path))
    running = start_server("127.0.0.1:0", config)
    yield running
    running.stop(grace=None)


def client(server: RunningServer, tenant: str) -> PreimageClient:
    return PreimageClient(f"127.0.0.1:{server.port}", timeout=120, token=TOKENS[tenant])


@pytest.fixture(scope="module")
def models(server: RunningServer) -> dict[str, str]:
    """alice: a private `net`; bob: a public `net`; carol: a `net` shared with dave."""
    ids = {}
    with client(server, "alice") as c:
        ids["alice"] = c.upload(conv_net(seed=21), name="net").model.id
    with client(server, "bob") as c:
        ids["bob"] = c.upload(conv_net(seed=22), name="net", public=True).model.id
    with client(server, "carol") as c:
        ids["carol"] = c.upload(conv_net(seed=23), name="net", shared_with=["dave"]).model.id
    return ids


@pytest.mark.parametrize(
    ("tenant", "owner"),
    [
        ("alice", "alice"),  # her own, though bob's public one has the name too
        ("carol", "carol"),  # her own, though she can read bob's
        ("dave", "carol"),  # shared with him beats public
        ("ops", "bob"),  # an admin has none of its own: the public one, not an ambiguity
    ],
)
def test_a_name_is_the_callers_own_then_shared_then_public(
    server: RunningServer, models: dict[str, str], tenant: str, owner: str
) -> None:
    with client(server, tenant) as c:
        got = c.get("net")
        assert (got.owner, got.id) == (owner, models[owner])
        assert c.get("net:1").id == models[owner]
        assert c.taps("net").model_id == models[owner]  # the same resolution wherever a model is taken


def test_list_models_says_where_each_model_comes_from(server: RunningServer, models: dict[str, str]) -> None:
    with client(server, "dave") as c:
        listed = {(m.owner, m.public, tuple(m.shared_with)) for m in c.models() if m.name == "net"}
    # ListModels says where each comes from: bob's is public, carol's shared with dave
    assert listed == {("bob", True, ()), ("carol", False, ("dave",))}


def test_two_tenants_sharing_one_name_with_you_is_still_ambiguous(
    server: RunningServer, models: dict[str, str]
) -> None:
    with client(server, "bob") as c:
        c.share(models["bob"], ["dave"])  # now bob's and carol's are both shared with dave
    try:
        with client(server, "dave") as c, pytest.raises(grpc.RpcError) as err:
            c.get("net")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "use the id" in err.value.details()
    finally:
        with client(server, "bob") as c:
            c.share(models["bob"], [], public=True)


# Each tenant's view of the three `net` models: (owner, origin). Carol's is shared with dave only; an
# admin sees the models no one shared with it as "other".
VIEWS = {
    "alice": {("alice", "own"), ("bob", "public")},
    "bob": {("bob", "own")},
    "carol": {("carol", "own"), ("bob", "public")},
    "dave": {("carol", "shared"), ("bob", "public")},
    "ops": {("alice", "other"), ("bob", "public"), ("carol", "other")},
}


@pytest.mark.parametrize("tenant", sorted(VIEWS))
def test_list_models_names_each_models_origin_for_the_caller(
    server: RunningServer, models: dict[str, str], tenant: str
) -> None:
    from service.rpc.messages import ORIGIN_NAMES

    with client(server, tenant) as c:
        listed = {(m.owner, ORIGIN_NAMES[m.origin]) for m in c.models("net")}
        assert listed == VIEWS[tenant]
        # GetModel answers the same origin as the listing for the model a bare name resolves to
        got = c.get("net")
        assert (got.owner, ORIGIN_NAMES[got.origin]) in VIEWS[tenant]


def test_the_cli_listing_says_shared_by_whom(
    server: RunningServer, models: dict[str, str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.cli.main import main

    monkeypatch.setenv("PREIMAGE_TOKEN", TOKENS["dave"])
    address = f"127.0.0.1:{server.port}"
    assert main(["models", "--prefix", "net", "--server", address]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_id = {line.split()[0]: line for line in lines}
    assert "shared by carol" in by_id[models["carol"][:12]]
    assert "public (bob)" in by_id[models["bob"][:12]]
    assert main(["models", "--prefix", "net", "--server", address, "--json"]) == 0
    rows = {(r["owner"], r["origin"]) for r in json.loads(capsys.readouterr().out)}
    assert rows == VIEWS["dave"]
