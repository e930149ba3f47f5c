"""The torch module the energy minimizer differentiates: preprocessing + a truncated converted graph."""

from __future__ import annotations

import torch
from torch import nn

from converters.spec import GRAY_WEIGHTS, Preprocessing


class Preprocess(nn.Module):
    """Energy-space x (B×3×H×W, RGB, mean-subtracted, 0–255) → the model's input tensor.

    Kept as a module (with buffers) so ``.to(device)`` moves it with the graph, and so the same code
    produces what onnxruntime gets (``ConvertedModel.to_model_input``).
    """

    def __init__(self, pre: Preprocessing):
        super().__init__()
        self.channel_order = pre.channel_order
        self.layout = pre.layout
        self.half = pre.dtype == "float16"
        n = pre.channels
        # model = (to_channels(x + mean_rgb255) · scale − mean) / std = to_channels(x) · a + b with
        # a = scale/std and b = (to_channels(mean_rgb255) · scale − mean)/std (to_channels is linear).
        # b is 0 up to rounding since mean_rgb255 is derived from mean; it is kept for generality.
        # One fused multiply-add instead of four elementwise passes over the image.
        mean_px = torch.tensor(pre.mean_rgb255, dtype=torch.float64)
        gray = torch.tensor(GRAY_WEIGHTS, dtype=torch.float64)
        if self.channel_order == "GRAY":
            mean_px = (mean_px * gray).sum().view(1)
        elif self.channel_order == "BGR":
            mean_px = mean_px.flip(0)
        std = torch.tensor(pre.std, dtype=torch.float64)
        a = pre.scale / std
        b = (mean_px * pre.scale - torch.tensor(pre.mean, dtype=torch.float64)) / std
        self.register_buffer("a", a.float().view(1, n, 1, 1))
        self.register_buffer("b", b.float().view(1, n, 1, 1))
        self.register_buffer("gray", gray.float().view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an energy-space image B×3×H×W, got shape {tuple(x.shape)}")
        if self.channel_order == "GRAY":
            x = (x * self.gray).sum(dim=1, keepdim=True)
        elif self.channel_order == "BGR":
            x = x.flip(1)
        y = torch.addcmul(self.b, x, self.a)
        if self.layout == "NHWC":
            y = y.permute(0, 2, 3, 1)
        if self.half:
            # The round trip through float16 is what the deployed model sees; autograd passes the
            # gradient straight through the casts.
            y = y.half()
        return y


class Representation(nn.Module):
    """Φ_L(x): energy-space image → the tap's tensor (float32), with frozen parameters."""

    def __init__(self, pre: Preprocessing, graph: nn.Module, tap_name: str, batch: int | None = None):
        super().__init__()
        self.preprocess = Preprocess(pre)
        self.graph = graph
        self.tap_name = tap_name
        # A graph exported with a fixed batch size often hard-codes it (Reshape to [1, -1]); such a graph
        # is run on chunks of exactly that size, so callers may still batch several images.
        self.batch = batch
        self.requires_grad_(False)

    def _run(self, y: torch.Tensor) -> torch.Tensor:
        out = self.graph(y)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.preprocess(x)
        if self.batch is None or y.shape[0] == self.batch:
            return self._run(y)
        if y.shape[0] % self.batch:
            raise ValueError(f"this model was exported with batch size {self.batch}; got a batch of {y.shape[0]}")
        return torch.cat([self._run(chunk) for chunk in y.split(self.batch)], dim=0)
