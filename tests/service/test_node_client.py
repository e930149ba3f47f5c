"""A real client in another language: Node with @grpc/grpc-js and @grpc/proto-loader from npm, at
their default settings, against a real server on a loopback port (node_client.js).

The packages are installed once into $PREIMAGE_CACHE/node (default ~/.cache/preimage/node) at
pinned versions. The test skips, saying why, only where node or npm is not installed, or where the
npm registry cannot be reached; .ci/run installs both from apt, so CI runs it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2, status_pb2
from PIL import Image

from service.client import PreimageClient
from service.rpc.app import start_server
from service.rpc.config import ServerConfig
from tests._service_models import SIZE, conv_net, fcn

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("node_client.js")
PACKAGES = {"@grpc/grpc-js": "1.14.7", "@grpc/proto-loader": "0.8.1"}
OFFLINE = ("ENOTFOUND", "EAI_AGAIN", "ETIMEDOUT", "ECONNREFUSED", "ECONNRESET", "network")


def _cache() -> Path:
    root = os.environ.get("PREIMAGE_CACHE") or Path.home() / ".cache" / "preimage"
    return Path(root) / "node"


def _installed(prefix: Path) -> bool:
    for name, version in PACKAGES.items():
        manifest = prefix / "node_modules" / name / "package.json"
        if not manifest.exists() or json.loads(manifest.read_text()).get("version") != version:
            return False
    return True


@pytest.fixture(scope="module")
def node_modules() -> Path:
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (.ci/run installs nodejs and npm with apt)")
    prefix = _cache()
    if not _installed(prefix):
        prefix.mkdir(parents=True, exist_ok=True)
        specs = [f"{name}@{version}" for name, version in PACKAGES.items()]
        proc = subprocess.run(
            ["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--loglevel=error", *specs],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if proc.returncode != 0:
            if any(word in proc.stderr for word in OFFLINE):
                pytest.skip(f"the npm registry cannot be reached: {proc.stderr.strip()[:200]}")
            pytest.fail(f"npm install failed:\n{proc.stderr}")
        assert _installed(prefix), "npm install did not install the pinned versions"
    return prefix / "node_modules"


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    torch.set_num_threads(1)
    running = start_server("127.0.0.1:0", ServerConfig(store_dir=tmp_path_factory.mktemp("store"), seed_bundled=False))
    address = f"127.0.0.1:{running.port}"
    with PreimageClient(address, timeout=120) as client:
        client.upload(conv_net(seed=4), name="tiny")
        client.upload(fcn(seed=4), name="fcn")  # any input size
    yield address
    running.stop(grace=None)


def test_a_node_client_lists_and_maximizes(node_modules: Path, address: str, tmp_path: Path) -> None:
    png = tmp_path / "node.png"
    proc = subprocess.run(
        ["node", str(SCRIPT), address, str(ROOT / "protos"), "tiny", "relu2", str(png), "fcn", "relu1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "NODE_PATH": str(node_modules)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    with PreimageClient(address, timeout=120) as client:
        assert seen["models"] == [m.name for m in client.models()] == ["fcn", "tiny"]
        assert seen["taps"] == [t.name for t in client.taps("tiny").taps]
        # The same request from Python: same seed, same device, so the same image.
        python = client.maximize("tiny", "relu2", [0], channel_max=1.0, steps=6, preset="paper",
                                 height=32, width=32, seed=3, report_every=2).wait()  # fmt: skip
    assert seen["kinds"] == ["progress"] * 3 + ["result", "summary"]
    assert seen["steps"] == [[2, 6], [4, 6], [6, 6]]
    image = np.asarray(Image.open(io.BytesIO(png.read_bytes())))
    assert image.shape == (SIZE, SIZE, 3) and image.std() > 0
    assert png.read_bytes() == python.results[0].png
    # An error's google.rpc details reach Node too, in the trailer every gRPC language reads.
    missing = seen["missing"]
    assert missing["code"] == grpc.StatusCode.NOT_FOUND.value[0] and "no-such-model" in missing["message"]
    status = status_pb2.Status.FromString(base64.b64decode(missing["status"]))
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.reason == "MODEL_NOT_FOUND" and info.domain == "preimage.v1"
    # A result whose tensor is larger than grpc-js's default 4 MiB receive limit arrived, in chunks.
    assert seen["big"] == {"shape": [3, 640, 640], "tensor_bytes": 3 * 640 * 640 * 4, "inline_bytes": 0}
