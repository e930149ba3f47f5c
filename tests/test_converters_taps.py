"""Taps: geometry (stride, receptive field, global), names, module lookup; and inspect_model."""

from __future__ import annotations

import io
import json
import warnings

import pytest
import torch
from torch import nn

from converters.errors import UnknownTap
from converters.inspect import format_inspection, inspect_model
from converters.model import load_model
from tests._converter_zoo import build, export

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def resnet18():
    return load_model(export(build("resnet18"), dynamo=False, opset=17), verify=False)


def test_resnet18_geometry(resnet18) -> None:
    geo = {t.alias: (t.stride, t.receptive_field, t.is_global) for t in resnet18.taps}
    assert geo["/conv1/Conv"] == (2, 7, False)
    assert geo["/maxpool/MaxPool"] == (4, 11, False)
    assert geo["/layer1/layer1.0/conv1/Conv"] == (4, 19, False)
    assert geo["/layer1/layer1.0/Add"] == (4, 27, False)  # max over the residual's two inputs
    assert geo["/layer1/layer1.1/conv2/Conv"] == (4, 43, False)
    assert geo["/layer2/layer2.0/conv1/Conv"] == (8, 51, False)  # 43 + (3 − 1)·4
    # 435 px: the published receptive field of ResNet-18's last conv layer
    assert geo["/layer4/layer4.1/relu_1/Relu"] == (32, 435, False)
    assert geo["/avgpool/GlobalAveragePool"] == (32, 64, True)  # whole 64×64 input
    assert resnet18.output_tap.is_global and resnet18.output_tap.receptive_field == 64


def test_shapes_and_names(resnet18) -> None:
    t = resnet18.tap("/layer2/layer2.0/conv1/Conv")
    assert t.shape == (128, 8, 8) and t.op_type == "Conv" and t.module == "layer2.0.conv1"
    assert resnet18.tap(t.name) is t  # by ONNX value name too
    assert len({x.alias for x in resnet18.taps}) == len(resnet18.taps)
    assert [x.index for x in resnet18.taps] == list(range(len(resnet18.taps)))


def test_module_path_names_the_module_output(resnet18) -> None:
    assert resnet18.tap("layer1.0").alias == "/layer1/layer1.0/relu_1/Relu"
    assert resnet18.tap("layer4").alias == "/layer4/layer4.1/relu_1/Relu"
    assert resnet18.tap("layer2.0.conv1").alias == "/layer2/layer2.0/conv1/Conv"
    with pytest.raises(UnknownTap) as info:
        resnet18.tap("layer9.0")
    assert any(name.startswith("layer") for name in info.value.close)


def test_vit_tokens_are_local_until_attention() -> None:
    model = load_model(export(build("vit_small"), dynamo=False, opset=17), verify=False)
    patch = next(t for t in model.taps if t.op_type == "Conv")
    assert (patch.stride, patch.receptive_field, patch.is_global) == (16, 16, False)
    first_global = next(t for t in model.taps if t.is_global)
    # the class token is concatenated before the encoder, but the first op that mixes positions is
    # the attention's query·key MatMul (the LayerNorm before it works over channels only)
    before = model.taps[: first_global.index]
    assert first_global.op_type == "MatMul", first_global
    assert any(t.op_type in ("LayerNormalization", "ReduceMean") for t in before)
    assert all(t.stride == 16 for t in model.taps[patch.index:])
    assert model.output_tap.receptive_field == 64


@pytest.mark.parametrize("opset", [13, 17])
def test_convnext_channels_last_layernorm_stays_local(opset: int) -> None:
    model = load_model(export(build("convnext_small"), dynamo=False, opset=opset), verify=False)
    stem = model.taps[0]
    assert stem.op_type == "Conv" and (stem.stride, stem.receptive_field) == (4, 4)
    # the first block: depthwise 7×7 at stride 4 → rf 4 + 6·4 = 28; its LayerNorm (channels last)
    # and the Linear layers after it do not widen it
    block = [t for t in model.taps if t.module.startswith("features.1.0")]
    assert block and all(not t.is_global for t in block)
    assert max(t.receptive_field for t in block) == 28
    assert model.output_tap.is_global


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.stem(x).mean(dim=(2, 3)))


def test_dynamo_module_names() -> None:
    torch.manual_seed(0)
    model = load_model(export(_Tiny().eval(), dynamo=True, opset=18, size=32))
    assert model.tap("stem.0").op_type == "Conv"
    assert model.tap("stem").op_type == "Relu"
    assert model.tap("head").is_global
    assert model.tap("stem.0").receptive_field == 3 and model.tap("stem.0").stride == 2


def test_inspect_model_good_and_bad(tmp_path) -> None:
    f = io.BytesIO()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Tiny().eval(), (torch.randn(1, 3, 32, 32),), f, dynamo=False, opset_version=17,
                          input_names=["image"], dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}})
    path = tmp_path / "tiny.onnx"
    path.write_bytes(f.getvalue())
    info = inspect_model(path)
    json.dumps(info)  # JSON-able
    assert info["ok"] and info["error"] is None
    assert info["input"] == {"name": "image", "batch": None, "layout": "NCHW", "height": None, "width": None,
                             "dtype": "float32", "nominal_height": 224, "nominal_width": 224}
    assert info["preprocessing"]["source"] == "default"
    assert info["ops"]["Conv"] == 1 and info["parity"]["ok"]
    assert [t["op_type"] for t in info["taps"]][:2] == ["Conv", "Relu"]
    text = format_inspection(info)
    assert "dynamic H×W" in text and "parity vs onnxruntime: ok" in text

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(f.getvalue()[:100])
    info = inspect_model(bad)
    json.dumps(info)
    assert not info["ok"] and "ONNX" in info["error"]
    assert "NOT SERVABLE" in format_inspection(info)
