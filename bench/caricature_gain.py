"""Caricature gain per tap of the bundled model: ⟨Φ(x*), Φ0⁺⟩ / ⟨Φ(x0), Φ0⁺⟩ measured on the PNG,
for `coffee`, with the default settings (C = 100, 300 steps), larger C, and optionally with the
priors and the bound B₊ switched off (`--free`) or without jitter (`--no-jitter`), next to the most
any image could reach at that tap.

    python bench/caricature_gain.py [--size 128] [--steps 300] [--weights 100,1000] [--free] [--no-jitter]
                                    [--taps /_blocks.7/_depthwise_conv/Conv,...|all] [--ceilings-only]
                                    [--relu] [--contrast 0.5,1.5,2,3]

`--relu` runs the same on a counterfactual copy of the model whose ReLU6s are ReLUs (every Clip's
upper limit raised to 10⁶, same weights): what the 6 ceiling costs. `--contrast` prints, instead of
optimizing, the gain of the contrast-scaled start k·x0 (quantized to uint8, so clipped to the
pixel range): whether "more of the same image" raises the response.

Columns:
- ceiling: an upper bound on the gain over *every* uint8 image, Σ_i w_i·u_i with w = Φ0⁺/‖Φ0⁺‖²
  and u_i the largest value unit i can take, from interval bound propagation through the ONNX
  graph (Conv with W⁺/W⁻, Clip clamps, Add sums) over the box of valid pixel values. At a Clip
  tap it is at most 6·Σφ0⁺/‖Φ0⁺‖² (every unit of the support at 6 at once); after a few linear
  layers it is loose. A ceiling below 3 proves that no image reaches 3× at that tap.
- gain, one column per setting: the objective on the PNG (1 at the start image).
- at B₊: the share of pixels whose RGB norm is at (within 1% of) the bound 2B = 160 or beyond, in
  the start image → at the end of the default run (C = the first weight). `coffee` has bright and
  dark pixels beyond 160: the minimizer projects the start onto B₊ before the first step.
- at 6: for a Clip tap, the share of Φ0⁺'s support (units > 0 at the start) sitting at the ReLU6
  ceiling, at the start → at the end of the default run; for a Conv/Add tap the same for the
  last Clip before it (the ReLU6 that feeds it), named in the footnote. With `--relu` it counts
  the units at 6 *or above*: the ones a ReLU6 would have capped.
"""

from __future__ import annotations

import argparse

import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from converters.bundled import bundled_model_path
from converters.model import ConvertedModel, load_model
from service.energy import EnergyParams, Objective, Problem, from_uint8, minimize, to_uint8
from service.jobs.reference import center_crop_resize, photo

# Block outputs (Add / project conv) as first measured, then the inside of blocks 4, 7 and 10:
# the expand conv and the depthwise conv before their ReLU6 (pre-activations), and the ReLU6s.
TAPS = (
    "/_conv_stem/Conv",
    "/_blocks.2/Add",
    "/_blocks.4/_expand_conv/Conv",
    "/_blocks.4/_depthwise_conv/Conv",
    "/_blocks.4/act_1/Clip",
    "/_blocks.4/_project_conv/Conv",
    "/_blocks.4/Add",
    "/_blocks.7/_expand_conv/Conv",
    "/_blocks.7/act/Clip",
    "/_blocks.7/_depthwise_conv/Conv",
    "/_blocks.7/act_1/Clip",
    "/_blocks.7/Add",
    "/_blocks.10/_expand_conv/Conv",
    "/_blocks.10/_depthwise_conv/Conv",
    "/_blocks.10/Add",
    "/_blocks.14/Add",
)
RELU6_TOP = 6.0 - 1e-3


def interval_upper_bounds(model, lo: torch.Tensor, hi: torch.Tensor) -> dict[str, torch.Tensor]:
    """Elementwise upper bound of every value of the graph for any model input in [lo, hi] (1×C×H×W).

    Handles the ops of EfficientNet-Lite0 up to the head (Conv, Clip, Add); stops at the first other op.
    """
    graph = model.onnx.graph
    consts = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()).float() for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = torch.from_numpy(numpy_helper.to_array(node.attribute[0].t).copy()).float()
    bounds = {graph.input[0].name: (lo, hi)}
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                break
            low, high = bounds[node.input[0]]
            w = consts[node.input[1]]
            bias = consts[node.input[2]] if len(node.input) > 2 else None
            pads = list(attrs.get("pads", [0, 0, 0, 0]))
            pad = (pads[1], pads[3], pads[0], pads[2])  # ONNX (top, left, bottom, right) → F.pad order
            low, high = F.pad(low, pad), F.pad(high, pad)
            kw = {
                "stride": tuple(attrs.get("strides", [1, 1])),
                "dilation": tuple(attrs.get("dilations", [1, 1])),
                "groups": int(attrs.get("group", 1)),
            }
            wp, wn = w.clamp_min(0), w.clamp_max(0)
            bounds[node.output[0]] = (
                F.conv2d(low, wp, bias, **kw) + F.conv2d(high, wn, None, **kw),
                F.conv2d(high, wp, bias, **kw) + F.conv2d(low, wn, None, **kw),
            )
        elif node.op_type == "Clip":
            low, high = bounds[node.input[0]]
            a, b = float(consts[node.input[1]]), float(consts[node.input[2]])
            bounds[node.output[0]] = (low.clamp(a, b), high.clamp(a, b))
        elif node.op_type == "Add":
            (l1, h1), (l2, h2) = bounds[node.input[0]], bounds[node.input[1]]
            bounds[node.output[0]] = (l1 + l2, h1 + h2)
        elif node.op_type != "Constant":
            break
    return {name: high[0] for name, (_, high) in bounds.items()}


def relu_variant(path) -> ConvertedModel:
    """The model with every Clip's upper limit raised to 10⁶ (ReLU6 → ReLU), weights unchanged."""
    proto = onnx.load(str(path))
    limits = {node.input[2] for node in proto.graph.node if node.op_type == "Clip" and len(node.input) > 2}
    uses = [(n.op_type, i) for n in proto.graph.node for i, name in enumerate(n.input) if name in limits]
    if any(use != ("Clip", 2) for use in uses):
        raise ValueError(f"a Clip limit is shared with another input: {uses}")
    raised = set()
    for init in proto.graph.initializer:
        if init.name in limits:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 0 + 1e6, init.name))
            raised.add(init.name)
    if raised != limits:
        raise ValueError(f"Clip limits that are not initializers: {limits - raised}")
    return load_model(proto.SerializeToString())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--weights", default="100,1000", help="C values; the first is the default run")
    parser.add_argument("--free", action="store_true", help="add a run at the largest C with λ_α = λ_V = 0, no B₊")
    parser.add_argument("--no-jitter", action="store_true", help="add a run at the first C without jitter (T = 1)")
    parser.add_argument("--taps", default=",".join(TAPS))
    parser.add_argument("--relu", action="store_true", help="the counterfactual model with ReLU instead of ReLU6")
    parser.add_argument("--contrast", default="", help="k values: print the gain of k·x0 instead of optimizing")
    parser.add_argument("--ceilings-only", action="store_true", help="only the ceiling column (no optimization)")
    args = parser.parse_args()
    model = relu_variant(bundled_model_path()) if args.relu else load_model(bundled_model_path())
    mean = torch.tensor(model.preprocessing.mean_rgb255)
    size = args.size
    x0 = from_uint8(center_crop_resize(photo("coffee"), size, size), mean)
    # every uint8 image lies in the box [−mean, 255 − mean] of energy space
    box = [(-mean).view(1, 3, 1, 1), (255 - mean).view(1, 3, 1, 1)]
    lo, hi = (torch.as_tensor(model.to_model_input(b.expand(1, 3, size, size).contiguous())) for b in box)
    upper = interval_upper_bounds(model, lo, hi)
    names = [t.name for t in model.taps if t.name in upper] if args.taps == "all" else args.taps.split(",")

    weights = [float(c) for c in args.weights.split(",")]
    settings = [(f"C = {c:g}", EnergyParams(steps=args.steps, loss_weight=c)) for c in weights]
    if args.free:
        free = EnergyParams(steps=args.steps, loss_weight=max(weights), lambda_alpha=0, lambda_tv=0, bound=1e9)
        settings.append((f"C = {max(weights):g}, no priors, no B₊", free))
    if args.no_jitter:
        settings.append(
            (f"C = {weights[0]:g}, no jitter", EnergyParams(steps=args.steps, loss_weight=weights[0], jitter=1))
        )
    if args.contrast:
        ks = [float(k) for k in args.contrast.split(",")]
        print("| tap | " + " | ".join(f"k = {k:g}" for k in ks) + " |\n|---|" + "---|" * len(ks))
        for name in names:
            phi = model.representation(model.tap(name))
            with torch.no_grad():
                w = Objective.caricature(phi(x0[None])[0]).weights
                gains = [float((phi(from_uint8(to_uint8(k * x0, mean), mean)[None])[0] * w).sum()) for k in ks]
            print(f"| `{model.tap(name).alias}` | " + " | ".join(f"{g:.2f}×" for g in gains) + " |", flush=True)
        return
    clips = [t for t in model.taps if t.op_type == "Clip"]
    if args.ceilings_only:
        print("| tap | ceiling |\n|---|---|")
    else:
        print("| tap | ceiling | " + " | ".join(f"gain, {label}" for label, _ in settings) + " | at B₊ | at 6 |")
        print("|---|---|" + "---|" * len(settings) + "---|---|")
    footnotes = []
    for name in names:
        tap = model.tap(name)
        phi = model.representation(tap)
        with torch.no_grad():
            phi0 = phi(x0[None])[0]
        objective = Objective.caricature(phi0)
        bounded = tap.name in upper and not args.relu  # with ReLUs the bound is astronomically loose
        ceiling = f"{float((objective.weights * upper[tap.name]).sum()):.2f}×" if bounded else "—"
        if args.ceilings_only:
            print(f"| `{tap.alias}` | {ceiling} |", flush=True)
            continue
        problems = [Problem(objective, params, seed=0, start=x0) for _, params in settings]
        results = minimize(phi, problems, height=size, width=size, stride=tap.stride, mean_rgb255=mean)
        default = results[0]
        bound = float(default.params.bound or 0)
        at_bound = [float((x.pow(2).sum(0).sqrt() >= 0.99 * bound).float().mean()) for x in (x0, default.image)]
        feeding = [c for c in clips if c.index <= tap.index]
        shares = f"{at_bound[0]:.1%} → {at_bound[1]:.1%} | "
        if feeding:  # the stem conv has no ReLU6 before it
            clip = feeding[-1]
            relu6 = model.representation(clip)
            with torch.no_grad():
                start = relu6(x0[None])[0]
                end = relu6(from_uint8(default.image_uint8, mean)[None])[0]
            support = start > 0
            at6 = [float((v[support] >= RELU6_TOP).float().mean()) for v in (start, end)]
            shares += f"{at6[0]:.1%} → {at6[1]:.1%}"
            if clip is not tap:
                footnotes.append(f"`{tap.alias}`: `{clip.alias}`")
        else:
            shares += "—"
        gains = " | ".join(f"{r.objective_value:.2f}×" for r in results)
        print(f"| `{tap.alias}` | {ceiling} | {gains} | {shares} |", flush=True)
    if footnotes:
        print("\nReLU6 in the last column: " + "; ".join(footnotes))


if __name__ == "__main__":
    main()
