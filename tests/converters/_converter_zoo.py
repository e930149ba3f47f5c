"""Torchvision architectures for the converter coverage checks (tests and bench/converter_coverage.py).

Weights are random (``weights=None``, no model hub). Several architectures are shrunk — fewer blocks,
narrower layers, smaller classifiers — so that exporting and checking all of them stays affordable on
two CPU cores; each keeps the structure that makes it interesting to a converter (named per entry).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.densenet import DenseNet
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vgg import VGG, make_layers
from torchvision.models.vision_transformer import VisionTransformer

SIZE = 64  # input side in pixels


def _alexnet() -> nn.Module:
    m = tvm.alexnet(weights=None, num_classes=10)
    m.classifier = nn.Sequential(nn.Dropout(), nn.Linear(256 * 6 * 6, 128), nn.ReLU(), nn.Linear(128, 10))
    return m


def _vgg11_bn() -> nn.Module:
    cfg = [16, "M", 32, "M", 64, 64, "M", 128, 128, "M", 128, 128, "M"]
    m = VGG(make_layers(cfg, batch_norm=True), num_classes=10)
    m.classifier = nn.Sequential(nn.Linear(128 * 7 * 7, 128), nn.ReLU(True), nn.Dropout(), nn.Linear(128, 10))
    return m


@dataclass(frozen=True)
class Arch:
    name: str
    family: str  # what makes it interesting for the converter
    build: Callable[[], nn.Module]
    size: int = SIZE  # AlexNet/VGG: their adaptive pools need 224 px for the legacy exporter


ARCHS: list[Arch] = [
    Arch("alexnet", "plain conv, adaptive pool (classifier shrunk)", _alexnet, 224),
    Arch("vgg11_bn", "plain conv + batch norm (widths /4, classifier shrunk)", _vgg11_bn, 224),
    Arch("squeezenet1_1", "fire modules: concat of 1×1/3×3, ceil-mode pools", lambda: tvm.squeezenet1_1(weights=None)),
    Arch("resnet18", "residual", lambda: tvm.resnet18(weights=None)),
    Arch("resnext_small", "bottleneck residual, grouped conv (1 block/stage)",
         lambda: ResNet(Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=8, num_classes=10)),
    Arch("mobilenet_v2", "depthwise separable, inverted residual, ReLU6", lambda: tvm.mobilenet_v2(weights=None)),
    Arch("mobilenet_v3_small", "depthwise, squeeze-excite, hardswish/hardsigmoid",
         lambda: tvm.mobilenet_v3_small(weights=None)),
    Arch("efficientnet_b0", "depthwise, squeeze-excite, SiLU", lambda: tvm.efficientnet_b0(weights=None)),
    Arch("regnet_y_400mf", "grouped conv, squeeze-excite", lambda: tvm.regnet_y_400mf(weights=None)),
    Arch("mnasnet0_5", "depthwise (NAS)", lambda: tvm.mnasnet0_5(weights=None)),
    Arch("shufflenet_v2_x0_5", "channel shuffle (reshape/transpose), split",
         lambda: tvm.shufflenet_v2_x0_5(weights=None)),
    Arch("googlenet", "inception modules",
         lambda: tvm.googlenet(weights=None, aux_logits=False, init_weights=True, transform_input=False)),
    Arch("densenet_small", "dense blocks: concat chains (growth 12, 2 layers/block)",
         lambda: DenseNet(growth_rate=12, block_config=(2, 2, 2, 2), num_init_features=32, num_classes=10)),
    Arch("convnext_small", "ConvNeXt: depthwise 7×7, LayerNorm2d, channels-last Linear, layer scale",
         lambda: ConvNeXt([CNBlockConfig(32, 64, 1), CNBlockConfig(64, 128, 1), CNBlockConfig(128, 256, 1),
                           CNBlockConfig(256, None, 1)], num_classes=10)),
    Arch("vit_small", "ViT: patch conv, class token, multi-head attention, GELU",
         lambda: VisionTransformer(image_size=SIZE, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64,
                                   mlp_dim=128, num_classes=10)),
    Arch("swin_small", "Swin: shifted windows (roll, masks), patch merging, relative position bias",
         lambda: SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                 window_size=[4, 4], num_classes=10)),
]
ARCH_BY_NAME = {a.name: a for a in ARCHS}

# (label, dynamo, opset)
EXPORTERS: list[tuple[str, bool, int]] = [("legacy-13", False, 13), ("legacy-17", False, 17), ("dynamo-18", True, 18)]


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0, size: int = SIZE) -> nn.Module:
    """Random but non-degenerate weights: biases and norm affine parameters nonzero and unequal, so
    that a converter that drops or swaps one of them is caught; batch-norm statistics calibrated on
    random images and then perturbed, so activations keep a healthy scale through deep nets (with
    arbitrary statistics they shrink towards zero layer after layer and every comparison is vacuous)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(t.shape, generator=g) * (hi - lo) + lo

    for mod in model.modules():
        for name, p in mod.named_parameters(recurse=False):
            if name == "bias":
                p.copy_(rnd(p, -0.1, 0.1))
            elif name == "weight" and p.dim() == 1:  # norm scales
                p.copy_(rnd(p, 0.5, 1.5))
            elif p.dim() >= 2 and p.abs().sum() == 0:  # zero-initialized matrices (e.g. ViT head)
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1]) ** 0.5)
            elif name == "layer_scale":
                p.copy_(rnd(p, 0.5, 1.5))
            elif p.dim() != 2 and name in ("class_token", "pos_embedding", "relative_position_bias_table"):
                p.copy_(rnd(p, -0.2, 0.2))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batch
        model.train()
        model(torch.randn(4, 3, size, size, generator=g))
        for bn in bns:
            std = bn.running_var.sqrt()
            bn.running_mean.add_(torch.randn(bn.running_mean.shape, generator=g) * 0.1 * std)
            bn.running_var.mul_(rnd(bn.running_var, 0.8, 1.25))
            bn.momentum = 0.1
    return model.eval()


def build(name: str, init: str = "random") -> nn.Module:
    torch.manual_seed(0)
    model = ARCH_BY_NAME[name].build()
    if init == "random":
        randomize(model, size=ARCH_BY_NAME[name].size)
    return model.eval()


def export(model: nn.Module, dynamo: bool, opset: int, size: int = SIZE) -> bytes:
    x = torch.randn(1, 3, size, size)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=opset, input_names=["input"],
                                     verbose=False)
            prog.save(f) if hasattr(prog, "save") else None
            if not f.getvalue():
                import onnx

                onnx.save(prog.model_proto, f)
        else:
            torch.onnx.export(model, (x,), f, dynamo=False, opset_version=opset, input_names=["input"])
    return f.getvalue()
