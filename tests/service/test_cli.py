"""The remote subcommands end to end against a real server (upload, models, taps, visualizations)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service.cli.remote import add_remote_commands, add_server_argument, main, parse_channels, run_remote
from service.rpc.app import start_server
from service.rpc.config import ServerConfig
from tests._service_models import SIZE, conv_net


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    running = start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path_factory.mktemp("store"), seed_bundled=False))
    yield f"127.0.0.1:{running.port}"
    running.stop(grace=None)


def cli_json(capsys: pytest.CaptureFixture, *argv: str):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


FAST = ["--steps", "8", "--refine-steps", "2"]


def test_remote_commands(address: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "net.onnx"
    model.write_bytes(conv_net(seed=3))
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class {i}" for i in range(10)))
    up = cli_json(capsys, "upload", str(model), "--server", address, "--labels", str(labels),
                  "--mean", "0.5,0.5,0.5", "--std", "0.25")  # fmt: skip
    assert up["name"] == "net" and up["labels"] == 10 and up["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert up["preprocessing_source"] == "uploader"
    assert [m["name"] for m in cli_json(capsys, "models", "--server", address)] == ["net"]
    taps = cli_json(capsys, "taps", "net", "--server", address)["taps"]
    assert [t["alias"] for t in taps][:2] == ["conv1", "relu1"]

    image = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "inv.png"
    report = cli_json(capsys, "invert", "net", "relu2", str(image), "-o", str(out), "--server", address, *FAST)
    assert report["output"] == str(out) and Image.open(out).size == (SIZE, SIZE)
    assert report["model"] == "net" and report["tap"] == "relu2" and report["feature_error"] > 0
    assert set(report["terms"]) >= {"energy", "loss"} and report["preprocessing"]["std"] == [0.25] * 3

    sheet = tmp_path / "max.png"
    report = cli_json(capsys, "maximize", "net", "conv2", "--channel", "0-3", "-o", str(sheet),
                      "--server", address, "--tensor", *FAST)  # fmt: skip
    assert report["output"] == str(sheet) and len(report["results"]) == 4
    assert all(Path(r["output"]).exists() and Path(r["tensor"]).exists() for r in report["results"])
    assert np.load(report["results"][0]["tensor"]).shape == (3, SIZE, SIZE)

    report = cli_json(capsys, "caricature", "net", "conv1", str(image), "-o", str(tmp_path / "c.png"),
                      "--server", address, *FAST)  # fmt: skip
    assert report["feature_error"] is not None

    assert main(["delete", "net", "--server", address]) == 0
    assert main(["taps", "net", "--server", address]) == 2  # NOT_FOUND: the argument is wrong
    assert "NOT_FOUND" in capsys.readouterr().err


def test_unreachable_server_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    args = argparse.Namespace(server="127.0.0.1:1", command="models", prefix="", json=False, timeout=2.0)
    assert run_remote(args) == 1
    assert "no preimage server at 127.0.0.1:1" in capsys.readouterr().err


def test_wiring_helpers() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    local = sub.add_parser("invert")  # what service/cli/main.py defines itself
    add_server_argument(local)
    add_remote_commands(sub, skip={"invert"})
    assert parser.parse_args(["invert"]).server is None  # local unless --server
    assert parser.parse_args(["invert", "--server", "h:1"]).server == "h:1"
    assert parser.parse_args(["taps", "m"]).func is run_remote
    assert parse_channels(["0-3", "7,9"]) == [0, 1, 2, 3, 7, 9]
