"""The natural pre-image energy minimizer (SPEC.md), pure torch: no gRPC, no ONNX.

Public API::

    from service.energy import EnergyParams, Objective, Problem, Minimizer, minimize, Result
    from service.energy import channel_weights, neuron_weights, direction_weights, channel_statistics

    phi = converted.representation(tap)                       # x (B×3×H×W energy space) → features
    obj = Objective.invert(phi0) | Objective.maximize(w) | Objective.caricature(phi0)
    results = minimize(phi, [Problem(obj, EnergyParams(), seed=0)], height=H, width=W,
                       stride=tap.stride, mean_rgb255=pre.mean_rgb255, on_step=print)

Images are mean-subtracted RGB on the 0–255 scale ("energy space"); ``to_uint8`` and
``from_uint8`` convert to and from PNG-ready arrays.

Presets and parameterizations (SPEC.md "Beyond the paper")::

    from service.energy import preset_params, mean_amplitude
    params = preset_params("natural", "maximize", steps=64)   # or "paper"; keywords override
    minimize(phi, [Problem(obj, params, seed=0)], ..., channels=3, magnitude=mean_amplitude(photos01))

``EnergyParams.parameterization`` is "pixel" (the paper's closed-form path), "fourier" or "phase"
(parameterizations.py, stepped with autograd through random views: transforms.py, natural.py);
both kinds of rows share one network batch. ``batch_signature(problems, H, W, stride)`` is what
a batch must agree on; ``network_rows(problems)`` how many images the network runs for them.

Continuous batching uses ``Minimizer`` directly: ``add(problem, record_every=k)`` joins a row
(energy terms recorded every k-th step, and the first and last: ``Result.history`` has a "step"
list), ``step()`` advances every row and returns the finished ones, ``cancel(handle)``. A
``row_quantum`` (Minimizer and ``minimize``) pads the network's batch with zero images to a
multiple of that many rows: batch-invariant mode (service/batch_invariance.py).
"""

from service.energy.minimize import (
    TERMS,
    Minimizer,
    Problem,
    Result,
    StepEvent,
    batch_signature,
    from_uint8,
    minimize,
    network_rows,
    noise_start,
    to_uint8,
)
from service.energy.objectives import Objective, feature_error
from service.energy.parameterizations import mean_amplitude
from service.energy.params import B_NORM, DEFAULT_LOSS_WEIGHT, EnergyParams
from service.energy.presets import PRESETS, preset_params
from service.energy.targets import channel_statistics, channel_weights, direction_weights, neuron_weights

__all__ = [
    "B_NORM",
    "DEFAULT_LOSS_WEIGHT",
    "TERMS",
    "PRESETS",
    "EnergyParams",
    "Minimizer",
    "Objective",
    "Problem",
    "Result",
    "StepEvent",
    "channel_statistics",
    "channel_weights",
    "direction_weights",
    "batch_signature",
    "feature_error",
    "from_uint8",
    "mean_amplitude",
    "minimize",
    "network_rows",
    "neuron_weights",
    "noise_start",
    "preset_params",
    "to_uint8",
]
