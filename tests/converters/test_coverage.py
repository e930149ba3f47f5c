"""Coverage: torchvision architectures × exporters convert, match onnxruntime at 3 taps, pass gradients.

The full grid (16 architectures × legacy-13, legacy-17, dynamo-18, plus default initialization) runs in
bench/converter_coverage.py, which writes docs/coverage.md; it takes several minutes on two cores
because the dynamo exporter alone needs 2–15 s per model. This test covers, within its ~3 minute
budget: every architecture with legacy-17 (random weights) and with default initialization, half of
them with legacy-13, and the five cheapest-to-export architectures that stress the dynamo graph
differently (fire/concat, dense, ConvNeXt, ViT, Swin); resnet18, mobilenet_v3_small and the rest of
the dynamo-18 column are in the bench table only (the exporter takes 10–25 s per model there).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from converters.model import load_model
from converters.parity import probe_images
from tests.converters._converter_zoo import ARCH_BY_NAME, ARCHS, EXPORTERS, build, export

torch.set_num_threads(1)

_EXPORTER = {label: (dynamo, opset) for label, dynamo, opset in EXPORTERS}
ALL = [a.name for a in ARCHS]
LEGACY13 = ["squeezenet1_1", "resnet18", "mobilenet_v2", "efficientnet_b0", "googlenet", "densenet_small",
            "convnext_small", "swin_small"]  # vit_small: the legacy exporter has no opset-13 attention
DYNAMO = ["squeezenet1_1", "densenet_small", "convnext_small", "vit_small", "swin_small"]

CASES = (
    [(a, "legacy-17", "random") for a in ALL]
    + [(a, "legacy-13", "random") for a in LEGACY13]
    + [(a, "dynamo-18", "random") for a in DYNAMO]
    + [(a, "legacy-17", "default") for a in ALL]
)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Exported ONNX files, cached for the session (other converter tests reuse them)."""
    root = tmp_path_factory.mktemp("onnx_zoo")
    cache: dict[tuple[str, str, str], bytes] = {}

    def get(arch: str, exporter: str, init: str = "random") -> bytes:
        key = (arch, exporter, init)
        if key not in cache:
            dynamo, opset = _EXPORTER[exporter]
            data = export(build(arch, init), dynamo, opset, ARCH_BY_NAME[arch].size)
            (root / f"{arch}-{exporter}-{init}.onnx").write_bytes(data)
            cache[key] = data
        return cache[key]

    return get


@pytest.mark.parametrize(("arch", "exporter", "init"), CASES, ids=["-".join(c) for c in CASES])
def test_architecture_converts_with_parity_and_gradient(exported, arch: str, exporter: str, init: str) -> None:
    model = load_model(exported(arch, exporter, init))  # verifies parity at 3 taps (raises otherwise)
    report = model.parity
    assert report is not None and len(report.taps) == 3
    assert report.tolerance == 1e-4
    for tap in report.taps:
        assert tap.rel_error < 1e-4, report.summary()

    size = ARCH_BY_NAME[arch].size
    x = probe_images(2, size, size, seed=3)
    # The comparison above means something only if the output depends on the image (default
    # initialization may legitimately make it constant: ViT's head starts at zero).
    if init == "random":
        with torch.no_grad():
            y = model.representation(model.output_tap)(x).numpy()
        spread = float(np.linalg.norm(y[0] - y[1]) / max(np.linalg.norm(y[0]), 1e-30))
        assert spread > 1e-3, f"the output barely depends on the input ({spread:.1e}): vacuous parity"

    xg = x[:1].clone().requires_grad_(True)
    for tap in report.taps:
        model.representation(tap.name)(xg).square().mean().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    assert float(xg.grad.abs().max()) > 0


@pytest.mark.parametrize("arch", ["vit_small"])  # convnext_small passes too (bench); kept out for time
def test_dynamo_opset_21(arch: str) -> None:
    # opset 20+ brings Gelu as one op and version bumps of Reshape/Cast/Shape/… (converters/ops.py)
    data = export(build(arch), dynamo=True, opset=21, size=ARCH_BY_NAME[arch].size)
    model = load_model(data)
    assert {o.version for o in model.onnx.opset_import if o.domain in ("", "ai.onnx")} == {21}
    assert any(n.op_type == "Gelu" for n in model.onnx.graph.node)
    assert model.parity.ok and model.parity.max_rel_error < 1e-4
