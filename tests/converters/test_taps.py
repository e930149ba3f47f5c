"""Taps: geometry (per-axis stride and receptive field, global, unknown), names, module lookup; and
inspect_model."""

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
from converters.shallow.export import SHALLOW_MODELS, export_all
from service.energy.params import EnergyParams
from service.jobs.reference import effective_receptive_field
from tests.converters._converter_zoo import build, export

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
    # square kernels and strides: both axes agree with the scalar fields
    for t in resnet18.taps:
        assert t.stride_yx == (t.stride, t.stride) and t.receptive_field_yx == (t.receptive_field,) * 2, t


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
                             "dtype": "float32", "nominal_height": 224, "nominal_width": 224,
                             "size_source": "default"}
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


# --- per-axis geometry ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shallow(tmp_path_factory) -> dict:
    paths = export_all(tmp_path_factory.mktemp("shallow-taps"))
    return {name: load_model(path.read_bytes(), verify=False) for name, path in paths.items()}


def test_shallow_geometry_follows_their_definitions(shallow) -> None:
    """The output taps' stride and receptive field, derived from each representation's parameters."""
    for name in ("hog", "hogb"):
        c = SHALLOW_MODELS[name].params["cell_size"]
        out = shallow[name].output_tap
        # one cell per c px; a cell's histogram spreads votes over 2c px (bilinear), its normalisation
        # reads the 3×3 cells of the four 2×2 blocks around it (+2c), the central difference +2 px
        assert (out.stride_yx, out.receptive_field_yx, out.is_global) == ((c, c), (4 * c + 2,) * 2, False)
        assert (out.stride, out.receptive_field) == (8, 34)
        cells = next(t for t in shallow[name].taps if t.op_type == "Conv")
        assert (cells.stride_yx, cells.receptive_field_yx) == ((c, c), (2 * c + 2,) * 2)
    p = SHALLOW_MODELS["dsift"].params
    s, step, n = p["bin_size"], p["step"], p["num_bins"]
    taps = shallow["dsift"].taps
    rows, cols = [t for t in taps if t.op_type == "Conv"]
    # separable pooling: rows first (a tall kernel, stride step×1), then columns (wide, 1×step)
    span = s * (n - 1) + 2 * (s - 1) + 1 + 2  # the n bins' triangles of half-width s, + the gradient's 2 px
    assert (rows.stride_yx, rows.receptive_field_yx) == ((step, 1), (span, 3))
    assert (cols.stride_yx, cols.receptive_field_yx) == ((step, step), (span, span))
    out = shallow["dsift"].output_tap
    assert (out.stride_yx, out.receptive_field_yx, out.is_global) == ((4, 4), (41, 41), False)
    p = SHALLOW_MODELS["hog_dalaltriggs"].params
    c, b = p["cell_size"], p["block_size"]
    out = shallow["hog_dalaltriggs"].output_tap
    # b×b cells of c px each (box sums), + the central difference; the block slices' ends are computed
    # from the map's shape at run time, which must not make the blocks look global
    assert (out.stride_yx, out.receptive_field_yx, out.is_global) == ((c, c), (b * c + 2,) * 2, False)


def test_shape_plumbing_is_not_a_tap(shallow) -> None:
    # ConstantOfShape(Shape(x)) depends on the image's size, not its pixels: nothing to visualize
    for model in shallow.values():
        assert all(t.op_type != "ConstantOfShape" for t in model.taps)
        assert all(t.geometry_known for t in model.taps)


def test_jitter_defaults_use_the_corrected_stride(shallow) -> None:
    def jitter(name: str) -> int:
        return EnergyParams().resolved("invert", 128, 128, shallow[name].output_tap.stride).jitter
    # T = max(round(stride / 4), 1): DSIFT's frames every 4 px → 1 (it was 4 at the wrong stride 16)
    assert (jitter("dsift"), jitter("hog"), jitter("hogb")) == (1, 2, 2)


class _NonSquare(nn.Module):
    def __init__(self, transpose: bool = False) -> None:
        super().__init__()
        self.transpose = transpose
        self.a = nn.Conv2d(3, 4, (3, 5), stride=(2, 1), padding=(1, 2))
        self.b = nn.Conv2d(4, 4, (1, 3), stride=(1, 2))

    def forward(self, x):
        if self.transpose:
            x = x.transpose(2, 3)  # the convs now slide their first axis along the image's x
        return self.b(torch.relu(self.a(x)))


def test_non_square_strides_are_per_axis() -> None:
    torch.manual_seed(0)
    model = load_model(export(_NonSquare().eval(), dynamo=False, opset=17, size=32), verify=False)
    a, b = (t for t in model.taps if t.op_type == "Conv")
    assert (a.stride_yx, a.receptive_field_yx) == ((2, 1), (3, 5))
    assert (b.stride_yx, b.receptive_field_yx) == ((2, 2), (3, 7))  # x: 5 + (3 − 1)·1
    assert (b.stride, b.receptive_field) == (2, 7)  # the scalars: the larger axis
    flipped = load_model(export(_NonSquare(transpose=True).eval(), dynamo=False, opset=17, size=32), verify=False)
    a, b = (t for t in flipped.taps if t.op_type == "Conv")
    assert (a.stride_yx, a.receptive_field_yx) == ((1, 2), (5, 3))
    assert (b.stride_yx, b.receptive_field_yx) == ((2, 2), (7, 3))


class _Unknowable(nn.Module):
    """An upsampling and a reshape that folds rows into channels: positions the taps cannot describe."""

    def __init__(self, fold: bool) -> None:
        super().__init__()
        self.fold = fold
        self.conv = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if self.fold:
            y = y.reshape(1, 4 * y.shape[2], y.shape[3], 1)
        else:
            y = nn.functional.interpolate(y, scale_factor=2.0, mode="nearest")
        return (y * 2.0).mean(dim=(2, 3))


@pytest.mark.parametrize("fold", [False, True])
def test_unmodelled_ops_give_unknown_geometry_not_a_wrong_number(fold: bool) -> None:
    torch.manual_seed(0)
    model = load_model(export(_Unknowable(fold).eval(), dynamo=False, opset=17, size=32), verify=False)
    conv = next(t for t in model.taps if t.op_type == "Conv")
    assert conv.geometry_known and conv.stride_yx == (2, 2)
    after = model.taps[model.taps.index(conv) + 2]  # Relu, then the Resize / Reshape
    assert after.op_type == ("Reshape" if fold else "Resize")
    assert not after.geometry_known and (after.stride, after.receptive_field) == (0, 0)
    assert after.as_dict()["stride_yx"] is None
    out = model.output_tap  # global again: the receptive field is the whole input, the grid unknown
    assert out.is_global and out.receptive_field_yx == (32, 32) and out.stride_yx is None
    assert EnergyParams().resolved("invert", 32, 32, after.stride).jitter == 1  # no jitter
    text = format_inspection(inspect_model(export(_Unknowable(fold).eval(), dynamo=False, opset=17, size=32)))
    assert " s?" in text and " rf?" in text


def test_effective_receptive_field_per_axis() -> None:
    assert effective_receptive_field((34, 34), 64, 64) == 34
    assert effective_receptive_field((41, 3), 64, 64) == 11  # side of the square of area 41·3
    assert effective_receptive_field((435, 435), 48, 64) == 55  # clipped per axis: √(48·64)
    assert effective_receptive_field(435, 64, 64) == 64  # a scalar still works
    assert effective_receptive_field(None, 32, 32) == effective_receptive_field(0, 32, 32) == 32  # unknown
