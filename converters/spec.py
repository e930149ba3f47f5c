"""What a model eats: the preprocessing that maps an energy-space image to the model input.

Energy space (docs/ARCHITECTURE.md): ``x = pixels_255 - mean_rgb255``, float32 ``B×3×H×W``, RGB.
The model input is ``(to_channels(pixels_255) * scale - mean) / std`` in the model's channel order,
laid out as ``layout`` and cast to ``dtype``.

``mean`` and ``std`` are given per model channel, in the model's channel order and in the units of
``pixels_255 * scale``: with the default scale 1/255 they are the familiar 0–1 numbers
(ImageNet: 0.485, 0.456, 0.406); for a Caffe-style model fed 0–255 BGR pixels use ``scale=1``,
``channel_order="BGR"`` and means such as (103.94, 116.78, 123.68).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ChannelOrder = Literal["RGB", "BGR", "GRAY"]
Layout = Literal["NCHW", "NHWC"]
DType = Literal["float32", "float16"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R BT.601 luma weights (R, G, B): what most "convert to grey" code uses.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Preprocessing:
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    scale: float = 1.0 / 255.0
    channel_order: ChannelOrder = "RGB"
    layout: Layout = "NCHW"
    height: int | None = None
    width: int | None = None
    dtype: DType = "float32"

    def __post_init__(self) -> None:
        # Imported lazily to keep this module dependency-free for the proto/CLI side.
        from converters.errors import ModelError

        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.channel_order not in ("RGB", "BGR", "GRAY"):
            raise ModelError(f"channel_order must be RGB, BGR or GRAY, not {self.channel_order!r}")
        if self.layout not in ("NCHW", "NHWC"):
            raise ModelError(f"layout must be NCHW or NHWC, not {self.layout!r}")
        if self.dtype not in ("float32", "float16"):
            raise ModelError(f"dtype must be float32 or float16, not {self.dtype!r}")
        n = self.channels
        for field_name in ("mean", "std"):
            values = getattr(self, field_name)
            if len(values) == 1 and n == 3:
                object.__setattr__(self, field_name, values * 3)
            elif len(values) != n:
                raise ModelError(f"{field_name} has {len(values)} values; a {self.channel_order} model needs {n}")
        if any(s <= 0 for s in self.std):
            raise ModelError(f"std must be positive, got {self.std}")
        if not self.scale > 0:
            raise ModelError(f"scale must be positive, got {self.scale}")
        for field_name in ("height", "width"):
            value = getattr(self, field_name)
            if value is not None and not (isinstance(value, int) and value > 0):
                raise ModelError(f"{field_name} must be a positive integer or None, got {value!r}")

    @property
    def channels(self) -> int:
        return 1 if self.channel_order == "GRAY" else 3

    @property
    def mean_rgb255(self) -> tuple[float, float, float]:
        """The mean colour (RGB, 0–255) that the energy subtracts from pixels."""
        pixel_mean = [m / self.scale for m in self.mean]
        if self.channel_order == "GRAY":
            return (pixel_mean[0],) * 3
        if self.channel_order == "BGR":
            pixel_mean.reverse()
        return (pixel_mean[0], pixel_mean[1], pixel_mean[2])

    @property
    def fixed_size(self) -> bool:
        return self.height is not None and self.width is not None


def input_size(text: str) -> tuple[int, int]:
    """A declared input size: '48x320' (also '48×320', '48X320') → (height, width), both positive.
    Named for the message argparse makes of its ValueError ("invalid input_size value")."""
    parts = text.strip().lower().replace("×", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected HxW, e.g. 48x320, got {text!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"both sides must be positive, got {text!r}")
    return h, w
