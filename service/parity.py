"""The parity figure of a tap: how closely the service's torch graph matches onnxruntime there.

Reported with every visualization so a user can tell a faithful picture of their layer from one
of a mis-converted graph. Measured on a seeded probe image; callers cache it per (model, tap).
"""

from __future__ import annotations

import numpy as np
import torch

PROBE_SEED = 1234


def probe_image(height: int, width: int) -> torch.Tensor:
    """A seeded energy-space image (1×3×H×W): smooth noise with natural-image-like range."""
    g = torch.Generator().manual_seed(PROBE_SEED)
    coarse = torch.rand(1, 3, max(height // 8, 1), max(width // 8, 1), generator=g) * 160 - 80
    fine = torch.rand(1, 3, height, width, generator=g) * 40 - 20
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear") + fine


def tap_parity(converted, tap, height: int | None = None, width: int | None = None) -> float:
    """max |torch − onnxruntime| / max |onnxruntime| at ``tap`` on the probe image."""
    import onnxruntime as ort

    from converters.truncate import extract_subgraph

    info = converted.tap(tap)
    pre = converted.preprocessing
    h = height or pre.height or 224
    w = width or pre.width or 224
    x = probe_image(h, w)
    rep = converted.representation(info)
    # The server may have moved the representation to a GPU; compare on whatever device it is on.
    device = next(iter(rep.buffers()), x).device
    with torch.no_grad():
        mine = rep(x.to(device)).float().cpu().numpy()
    sub = extract_subgraph(converted.onnx, converted.input_name, [info.name])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(sub.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (theirs,) = session.run([info.name], {converted.input_name: converted.to_model_input(x)})
    theirs = np.asarray(theirs, dtype=np.float32).reshape(mine.shape)
    scale = float(np.abs(theirs).max())
    return float(np.abs(mine - theirs).max() / max(scale, 1e-12))
