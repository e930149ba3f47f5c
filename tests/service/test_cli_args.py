"""The command line as people meet it: help for every command, and every bad argument ending in one
line on stderr with exit status 2, no traceback, before any server starts; the same rule for which
server every command talks to; a closed pipe; the server's own refusals (unknown tap, model)."""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import service.cli.embedded as embedded
from converters.spec import input_size
from service.cli import args as types
from service.cli.exemplars import image_set
from service.cli.main import build_parser, main
from service.cli.resolve import image_ref
from service.client import PreimageClient
from service.rpc.app import start_server
from service.rpc.config import ServerConfig
from tests._service_models import conv_net

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    torch.set_num_threads(1)
    running = start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path_factory.mktemp("store"), seed_bundled=False))
    address = f"127.0.0.1:{running.port}"
    with PreimageClient(address, timeout=120) as client:
        client.upload(conv_net(seed=5), name="tiny")
    yield address
    running.stop(grace=None)


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to reach or start a server fails the test: bad arguments must be caught first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a bad argument got past the parser: the command tried to reach a server")

    monkeypatch.delenv("PREIMAGE_SERVER", raising=False)
    monkeypatch.setattr(embedded, "connect", refuse)
    # The package's `main` attribute is the function: reach the module through sys.modules.
    monkeypatch.setattr(sys.modules["service.cli.main"], "connect", refuse)
    monkeypatch.setattr(sys.modules["service.cli.main"], "embedded_server", refuse)
    monkeypatch.setattr("service.cli.remote.connect", refuse)
    monkeypatch.setattr("service.rpc.app.start_server", refuse)
    monkeypatch.setattr("service.rpc.app.serve", refuse)
    monkeypatch.setattr("service.cli.check._run_local", refuse)
    monkeypatch.setattr("service.cli.check._run_remote", refuse)
    monkeypatch.setattr("converters.inspect.inspect_model", refuse)


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's own exits (--help, --version, errors)
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_usage_error(code: int, err: str, *expected: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error" in lines[0]
    for text in expected:
        assert text in lines[0], lines[0]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


# -- help -------------------------------------------------------------------------------------------
def test_every_command_has_a_description_and_plain_help(capsys: pytest.CaptureFixture) -> None:
    commands = subcommands()
    assert {"invert", "maximize", "caricature", "models", "taps", "upload", "delete", "share", "info", "stats",
            "inspect", "serve", "demo", "check"} <= set(commands)  # fmt: skip
    for name, parser in commands.items():
        assert parser.description and len(parser.description) > 20, f"{name} has no description"
        code, out, err = run(capsys, name, "--help")
        assert code == 0 and not err, (name, err)
        assert parser.description.split()[0] in out
        assert "``" not in out, f"{name}'s help shows RST markup"
    code, out, _ = run(capsys, "--help")
    assert code == 0 and all(name in out for name in commands) and "PREIMAGE_TOKEN" in out


def test_check_help_names_the_parity_measure() -> None:
    """--parity-tolerance bounds converters' elementwise figure, not a plain relative error (which a value
    near zero in a tensor of large values could never meet)."""
    action = next(a for a in subcommands()["check"]._actions if "--parity-tolerance" in a.option_strings)
    assert "max|a-b| / (max|b| + |b|)" in action.help
    assert "relative error" not in action.help


def test_version(capsys: pytest.CaptureFixture) -> None:
    from importlib.metadata import version

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"preimage {version('preimage')} (API preimage.v1)"


# -- the sweep: every typed flag of every command, with values it must refuse ---------------------------
BAD_VALUES = {
    types.integer: ["cat", "1.5"],
    types.nonneg_int: ["cat", "-1", "2.5"],
    types.positive_int: ["cat", "0", "-64"],
    types.number: ["cat", "nan", "inf"],
    types.nonneg_float: ["cat", "-0.5", "nan"],
    types.positive_float: ["cat", "0", "-1", "inf"],
    types.channels: ["-1", "cat", "5-2", "1-", ","],
    types.neuron: ["1,2", "a,b,c", "1,2,3,4", "-1,0,0"],
    types.floats: ["a,b", "1,nan"],
    types.existing_file: ["/no/such/file.onnx"],
    types.model_ref: ["missing.onnx", ""],
    types.tenants: ["team a", "a,b c", "-x"],
    image_ref: ["chelsae", "no_such_photo.png"],
    input_size: ["48", "0x32", "ax3"],
    image_set: ["/no/such/folder", "/no/such/*.png"],
}
BAD_CHOICE = "not-a-choice"


def _positionals(parser: argparse.ArgumentParser, onnx: Path, **override: str) -> list[str]:
    values = {"file": str(onnx), "model": "tiny", "tap": "relu1", "images": "chelsea"}
    if parser.prog.endswith(("inspect", "check")):
        values["model"] = str(onnx)
    values.update(override)
    return [values[a.dest] for a in parser._actions if not a.option_strings and a.dest in values]


def _required_options(parser: argparse.ArgumentParser, tmp: Path) -> list[str]:
    return [arg for a in parser._actions if a.option_strings and a.required for arg in (a.option_strings[0], str(tmp))]


def _bad_values(name: str, action: argparse.Action) -> list[str]:
    if action.choices is not None:
        return [BAD_CHOICE]
    assert action.type in BAD_VALUES, f"{name} {action.dest}: add its type's bad values to BAD_VALUES"
    return BAD_VALUES[action.type]


def test_every_flag_refuses_bad_values_in_one_line(
    no_server: None, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    onnx = tmp_path / "net.onnx"
    onnx.write_bytes(conv_net(seed=1))
    checked = 0
    swept: set[tuple[str, str]] = set()
    for name, parser in subcommands().items():
        required = _required_options(parser, tmp_path)
        for action in parser._actions:
            if action.nargs == 0 or isinstance(action, argparse._HelpAction):
                continue
            if action.choices is None and action.type is None:
                continue  # free text (names, paths to write, addresses): nothing to refuse locally
            for value in _bad_values(name, action):
                if action.option_strings:
                    flag = action.option_strings[-1]
                    argv = [name, *_positionals(parser, onnx), *required, f"{flag}={value}"]
                else:
                    flag = action.dest
                    argv = [name, *_positionals(parser, onnx, **{action.dest: value}), *required]
                code, out, err = run(capsys, *argv)
                assert_one_line_usage_error(code, err, flag)
                assert not out
                checked += 1
                swept.add((name, flag))
    assert checked > 150  # every command's flags were reached, not skipped
    # The one energy flag that is not a number: photographs for the phase amplitude (not on invert).
    assert {("maximize", "--amplitude-image"), ("caricature", "--amplitude-image")} <= swept
    assert ("invert", "--amplitude-image") not in swept
    assert {("exemplars", f) for f in ("--images", "--channel", "--top", "--bottom", "--crop", "--batch")} <= swept


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["maximize", "--channel", "-1"], ["--channel", "≥ 0"]),
        (["maximize", "--channel", "cat"], ["--channel", "'cat'", "0-15"]),
        (["maximize", "--channel", "5-2"], ["empty range", "2-5"]),
        (["maximize", "--neuron", "1,2"], ["--neuron", "channel,row,column"]),
        (["maximize", "--height", "-64"], ["--height", "≥ 1"]),
        (["maximize"], ["--channel", "--neuron"]),
        (["invert", "--model", "missing.onnx"], ["--model", "missing.onnx", "no such file"]),
        (["invert", "--image", "chelsae"], ["did you mean chelsea", "astronaut", "coffee"]),
        (["caricature", "--image", "no-such-photo"], ["scikit-image photo", "photos:"]),
        (["maximize", "--channel", "1", "--amplitude-image", "chelsae"], ["--amplitude-image", "did you mean chelsea"]),
        (["invert", "--amplitude-image", "chelsea"], ["unrecognized arguments: --amplitude-image"]),
        (["upload", "missing.onnx"], ["no such file"]),
        (["check", "missing.onnx", "--out", "x"], ["no such file"]),
        (["share", "tiny", "--public", "--private"], ["not allowed with"]),
        (["frobnicate"], ["invalid choice", "maximize"]),
    ],
)
def test_the_reported_typos(
    no_server: None, capsys: pytest.CaptureFixture, argv: list[str], expected: list[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert_one_line_usage_error(code, err, *expected)
    assert not out


# -- against a real server ---------------------------------------------------------------------------
def test_the_servers_refusals_are_usage_errors_in_one_line(server: str, capsys: pytest.CaptureFixture) -> None:
    with PreimageClient(server, timeout=60) as client:
        listed = len(client.taps("tiny").taps)
    code, _, err = run(capsys, "maximize", "--model", "tiny", "--tap", "relu9", "--channel", "0", "--server", server)
    # The count is of the taps ListTaps lists, not of every name that resolves to one.
    assert_one_line_usage_error(code, err, "INVALID_ARGUMENT", f"has {listed} taps", "relu1", "--all")
    code, _, err = run(capsys, "taps", "no-such-model", "--server", server)
    assert_one_line_usage_error(code, err, "NOT_FOUND")
    code, _, err = run(capsys, "maximize", "--model", "tiny", "--tap", "relu1", "--channel", "999",
                       "--server", server, "--steps", "2")  # fmt: skip
    assert_one_line_usage_error(code, err, "INVALID_ARGUMENT", "999")


def test_unreachable_server_is_one_line_and_status_1(capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "models", "--server", "127.0.0.1:1")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "no preimage server at 127.0.0.1:1" in err


def test_one_rule_for_every_command(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """--server, else $PREIMAGE_SERVER, else embedded: for the visualizations and the store commands."""
    started: list[str] = []

    @contextlib.contextmanager
    def fake_embedded(store: Path | None = None, quiet: bool = False) -> Iterator[str]:
        started.append("embedded")  # stands in for a real embedded start (seeding takes a minute)
        yield server

    monkeypatch.setattr(embedded, "embedded_server", fake_embedded)
    fast = ["--steps", "2", "--height", "32", "--width", "32", "--report-every", "1"]
    commands = [
        ["models"],
        ["info"],
        ["taps", "tiny"],
        ["maximize", "--model", "tiny", "--tap", "relu1", "--channel", "0", "-o", str(tmp_path / "m.png"), *fast],
        ["upload", str(_onnx(tmp_path)), "--name", "other"],
        ["share", "other", "--with", "team-b"],
        ["delete", "other"],
    ]
    monkeypatch.setenv("PREIMAGE_SERVER", "127.0.0.1:1")  # nothing listens there
    for argv in commands:
        code, _, err = run(capsys, *argv)
        assert code == 1 and "no preimage server at 127.0.0.1:1" in err, (argv, err)
    assert started == []
    monkeypatch.setenv("PREIMAGE_SERVER", server)
    for argv in commands:
        assert run(capsys, *argv, "--json")[0] == 0, argv
    assert started == []
    monkeypatch.delenv("PREIMAGE_SERVER")
    for argv in commands:
        code, out, err = run(capsys, *argv, "--json")
        assert code == 0, (argv, err)
        json.loads(out)  # progress lines went to stderr, stdout is the JSON alone
    assert started == ["embedded"] * len(commands)
    # --server wins over the environment.
    monkeypatch.setenv("PREIMAGE_SERVER", "127.0.0.1:1")
    assert run(capsys, "taps", "tiny", "--server", server)[0] == 0


def _onnx(tmp_path: Path) -> Path:
    path = tmp_path / "other.onnx"
    path.write_bytes(conv_net(seed=9))
    return path


def test_share(server: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert run(capsys, "upload", str(_onnx(tmp_path)), "--name", "to-share", "--server", server)[0] == 0
    code, out, _ = run(capsys, "share", "to-share", "--with", "team-a, team-b", "--server", server, "--json")
    shared = json.loads(out)
    assert code == 0 and shared["shared_with"] == ["team-a", "team-b"] and shared["public"] is False
    code, out, _ = run(capsys, "share", "to-share", "--public", "--server", server)
    assert code == 0 and "shared with everyone" in out
    with PreimageClient(server, timeout=30) as client:
        assert client.get("to-share").public
        client.delete("to-share")


def _torch_exported(path: Path) -> Path:
    """A small torch model exported by torch's own (legacy) exporter: its node names carry module paths."""
    import warnings

    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2))
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x).mean(dim=(2, 3)))

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Net().eval(), (torch.zeros(1, 3, 32, 32),), str(path), input_names=["image"],
                          output_names=["logits"], opset_version=17, dynamo=False)  # fmt: skip
    return path


def test_taps_all_lists_module_paths_that_resolve(server: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    net = _torch_exported(tmp_path / "scoped.onnx")
    assert run(capsys, "upload", str(net), "--name", "scoped", "--server", server)[0] == 0
    code, out, _ = run(capsys, "taps", "scoped", "--all", "--server", server, "--json")
    reply = json.loads(out)
    assert code == 0 and reply["module_paths"]
    names = {t["name"] for t in reply["taps"]}
    paths = {m["path"]: m["tap"] for m in reply["module_paths"]}
    assert {"features", "features.0", "features.2", "head"} <= set(paths) and set(paths.values()) <= names
    assert paths["features"] == paths["features.2"]  # a container names the tap of its output
    code, out, _ = run(capsys, "taps", "scoped", "--server", server, "--json")
    assert "module_paths" not in json.loads(out)
    # Each listed path is accepted wherever a tap name is.
    with PreimageClient(server, timeout=60) as client:
        for path in ("features.0", "features"):
            result = client.maximize("scoped", path, [0], steps=1, height=32, width=32, channel_max=1.0).wait()
            assert result.summary.tap == paths[path]
        client.delete("scoped")


def test_a_closed_pipe_ends_quietly(server: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "taps", "tiny", "--all", "--server", server],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc.stdout.close()  # as `| head` does once it has its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_the_demo_says_what_the_model_sees(tmp_path: Path) -> None:
    import numpy as np
    import skimage.data
    from PIL import Image

    from service.cli.main import _classify

    png = tmp_path / "chelsea.png"
    Image.fromarray(np.asarray(Image.fromarray(skimage.data.chelsea()).resize((224, 224)))).save(png)
    report = {"preprocessing": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "scale": None}}
    seen = _classify(png, "efficientnet_lite0", report)
    assert (seen["class"], seen["label"]) == (285, "Egyptian cat") and 0.2 < seen["probability"] <= 1.0


def test_exporting_the_bundled_models_prints_no_warnings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    from service.models.seeding import quiet_bundled_models

    monkeypatch.setenv("PREIMAGE_CACHE", str(tmp_path))  # a fresh cache: the export really runs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models = quiet_bundled_models()
    assert (tmp_path / "bundled").is_dir() and any(m.path.exists() for m in models)
    assert [str(w.message)[:80] for w in caught] == []


def test_info_and_stats(server: str, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "info", "--server", server, "--json")
    info = json.loads(out)
    assert code == 0 and info["api"] == "preimage.v1" and info["auth"] == "AUTH_MODE_OPEN" and "Conv" in info["ops"]
    code, out, _ = run(capsys, "info", "--server", server)
    assert code == 0 and out.startswith("preimage ") and "device" in out and "natural" in out
    fast = ["--steps", "1", "--channel-max", "1", "-o", "/dev/null"]
    run(capsys, "maximize", "--model", "tiny", "--tap", "relu1", "--channel", "0", "--server", server, *fast)
    code, out, _ = run(capsys, "stats", "tiny", "--server", server, "--json")
    [tiny] = json.loads(out)["models"]
    assert code == 0 and tiny["name"] == "tiny" and tiny["requests"] >= 1 and tiny["by_task"]["maximize"] >= 1
    code, out, _ = run(capsys, "stats", "--server", server, "--json")  # every model that ran
    assert code == 0 and "tiny" in [m["name"] for m in json.loads(out)["models"]]
    code, _, err = run(capsys, "stats", "nope", "--server", server)
    assert_one_line_usage_error(code, err, "NOT_FOUND")


def test_a_stored_name_without_a_server_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("PREIMAGE_SERVER", raising=False)
    code, _, err = run(capsys, "check", "mynet", "--baseline", "mynet:previous", "--out", str(tmp_path))
    assert_one_line_usage_error(code, err, "'mynet'", "needs a server", "efficientnet_lite0")


def test_a_local_check_counts_taps_as_the_server_does(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("PREIMAGE_SERVER", raising=False)
    onnx = tmp_path / "net.onnx"
    onnx.write_bytes(conv_net(seed=1))
    code, _, err = run(capsys, "check", str(onnx), "--out", str(tmp_path / "r"), "--tap", "relu9", "--device", "cpu")
    assert_one_line_usage_error(code, err, "unknown tap 'relu9'", "has 6 taps", "relu1")
