"""What a fused CPU kernel would save: the minimizer's image-space work (priors' gradient, the
network gradient's windows, the paper's update, the projection) in eager PyTorch, against the same
arithmetic written as two C++ loops (built here with torch's ``load_inline``; not used by the
service: docs/energy.md says why). Checks that both give the same x, μ, G, then prints the time of
each per step and what the service's step / floor ratio would become.

    python bench/fused_step_prototype.py [--batch 4] [--size 128] [--jitter 4] [--floor-ms 35]

``--floor-ms``: the bare forward+backward to compare with (bench/step_overhead.py prints it for the
same tap, batch and size; 35 ms is `/_blocks.7/Add`, batch 4, 128 px on the 2-core test machine).
The first run compiles the extension (about a minute; cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.cpp_extension import load_inline

from service.energy.optimizers import paper_update_
from service.energy.params import EnergyParams
from service.energy.regularizers import prior_terms_and_grad, project_bounded
from service.energy.workspace import Workspace

# Two passes over a B×3×Hp×Wp float32 batch, rows and image lines in parallel:
# 1. grad = λα·α/(HW·B²)·q^(α/2−1)·x + λV·β/(HW·V²)·(TV stencil) + the network's gradient in the
#    row's window (α = 6, β = 2: the defaults, as integer powers);
# 2. G ← ρG + g²; μ ← mμ − s·g/(1/η + √G); x ← x + μ; then x scaled to ‖x(u)‖ ≤ bound per pixel.
_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

// The TV stencil at one pixel, with the (H−1)×(W−1) grid's borders (general form).
static inline float tv_at(const float* xc, int64_t y, int64_t xx, int64_t H, int64_t W) {
  const int64_t i = y * W + xx;
  float t = 0.f;
  if (y < H - 1 && xx < W - 1) t -= (xc[i + 1] - xc[i]) + (xc[i + W] - xc[i]);
  if (xx >= 1 && y < H - 1) t += xc[i] - xc[i - 1];
  if (y >= 1 && xx < W - 1) t += xc[i] - xc[i - W];
  return t;
}

void fused_step(torch::Tensor x, torch::Tensor mu, torch::Tensor g2, torch::Tensor grad,
                torch::Tensor grad_image, torch::Tensor offsets, double inv_b2, double alpha_coef,
                double tv_coef, double decay, double momentum, double inv_lr, double lr_scale,
                double bound) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t h = grad_image.size(2), w = grad_image.size(3);
  float* __restrict__ X = x.data_ptr<float>(); float* __restrict__ M = mu.data_ptr<float>();
  float* __restrict__ G = g2.data_ptr<float>();
  float* __restrict__ D = grad.data_ptr<float>(); const float* __restrict__ GI = grad_image.data_ptr<float>();
  const int64_t* O = offsets.data_ptr<int64_t>();
  const int64_t plane = H * W;
  const float fb2 = (float)inv_b2, fa = (float)alpha_coef, ftv = (float)tv_coef;
  // Pass 1: ∂E/∂x into D, line by line; the interior's loops have no branches (vectorizable).
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(W);
    for (int64_t bi = begin; bi < end; ++bi) {
      const int64_t b = bi / H, y = bi % H;
      for (int64_t xx = 0; xx < W; ++xx) p[xx] = 0.f;
      for (int64_t c = 0; c < C; ++c) {
        const float* xl = X + (b * C + c) * plane + y * W;
        for (int64_t xx = 0; xx < W; ++xx) p[xx] += xl[xx] * xl[xx];
      }
      for (int64_t xx = 0; xx < W; ++xx) { const float q = p[xx] * fb2; p[xx] = q * q * fa; }
      const bool inner_row = y >= 1 && y < H - 1;
      for (int64_t c = 0; c < C; ++c) {
        const float* xc = X + (b * C + c) * plane;
        const float* xl = xc + y * W;
        float* dl = D + (b * C + c) * plane + y * W;
        for (int64_t xx = 0; xx < W; ++xx) dl[xx] = p[xx] * xl[xx];
        if (inner_row) {
          const float* up = xl - W; const float* down = xl + W;
          for (int64_t xx = 1; xx < W - 1; ++xx)
            dl[xx] += ftv * (4.f * xl[xx] - xl[xx + 1] - xl[xx - 1] - down[xx] - up[xx]);
          dl[0] += ftv * tv_at(xc, y, 0, H, W);
          dl[W - 1] += ftv * tv_at(xc, y, W - 1, H, W);
        } else {
          for (int64_t xx = 0; xx < W; ++xx) dl[xx] += ftv * tv_at(xc, y, xx, H, W);
        }
        const int64_t gy = y - O[2 * b], ox = O[2 * b + 1];
        if (gy >= 0 && gy < h) {
          const float* gl = GI + ((b * C + c) * h + gy) * w;
          for (int64_t k = 0; k < w; ++k) dl[ox + k] += gl[k];
        }
      }
    }
  });
  // Pass 2: the paper's update, then the projection onto ‖x(u)‖ ≤ bound, line by line.
  const float fd = (float)decay, fm = (float)momentum, fl = (float)inv_lr, fs = (float)lr_scale;
  const float fbound = (float)bound;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> n2(W);
    for (int64_t bi = begin; bi < end; ++bi) {
      const int64_t b = bi / H, y = bi % H;
      for (int64_t xx = 0; xx < W; ++xx) n2[xx] = 0.f;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t k0 = (b * C + c) * plane + y * W;
        float* xl = X + k0; float* ml = M + k0; float* gl = G + k0; const float* dl = D + k0;
        for (int64_t xx = 0; xx < W; ++xx) {
          const float g = dl[xx];
          const float gg = fd * gl[xx] + g * g;
          gl[xx] = gg;
          const float m = fm * ml[xx] - fs * g / (fl + std::sqrt(gg));
          ml[xx] = m;
          const float v = xl[xx] + m;
          xl[xx] = v;
          n2[xx] += v * v;
        }
      }
      for (int64_t xx = 0; xx < W; ++xx) n2[xx] = std::min(1.f, fbound / std::sqrt(std::max(n2[xx], 1e-24f)));
      for (int64_t c = 0; c < C; ++c) {
        float* xl = X + (b * C + c) * plane + y * W;
        for (int64_t xx = 0; xx < W; ++xx) xl[xx] *= n2[xx];
      }
    }
  });
}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--jitter", type=int, default=4)
    parser.add_argument("--floor-ms", type=float, default=35.0)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    start = time.perf_counter()
    ext = load_inline("preimage_fused_step", cpp_sources=_SOURCE, functions=["fused_step"],
                      extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fopenmp"], extra_ldflags=["-fopenmp"],
                      verbose=False)  # fmt: skip
    print(f"extension ready in {time.perf_counter() - start:.0f} s")
    b, h, pad = args.batch, args.size, args.jitter - 1
    params = EnergyParams().resolved("invert", h, h, 16)
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(b, 3, h + pad, h + pad, generator=gen) * 2 - 1) * 100
    mu0 = torch.randn(x0.shape, generator=gen)
    g20 = torch.rand(x0.shape, generator=gen) * 1e4
    grad_image = torch.randn(b, 3, h, h, generator=gen) * 1e-2
    offsets = [(int(v) % args.jitter, int(v) // args.jitter % args.jitter) for v in range(b)]
    area, b2, v2 = (h + pad) ** 2, params.b_norm**2, float(params.tv_norm) ** 2

    def eager(x: torch.Tensor, mu: torch.Tensor, g2: torch.Tensor, work: Workspace) -> None:
        grad = work.get("grad", x.shape, x)
        prior_terms_and_grad(x, grad, params, work, terms=False)
        for i, (dy, dx) in enumerate(offsets):
            grad[i, :, dy : dy + h, dx : dx + h].add_(grad_image[i])
        paper_update_(x, mu, g2, grad, params, 1.0, work)
        project_bounded(x, float(params.bound), work)

    off = torch.tensor(offsets, dtype=torch.int64)

    def fused(x: torch.Tensor, mu: torch.Tensor, g2: torch.Tensor, grad: torch.Tensor) -> None:
        ext.fused_step(x, mu, g2, grad, grad_image, off, 1 / b2, params.lambda_alpha * params.alpha / (area * b2),
                       params.lambda_tv * params.beta / (area * v2), params.decay, params.momentum,
                       1 / float(params.learning_rate), 1.0, float(params.bound))  # fmt: skip

    # Same result (up to float rounding: the loops sum in another order).
    xe, me, ge = x0.clone(), mu0.clone(), g20.clone()
    xf, mf, gf = x0.clone(), mu0.clone(), g20.clone()
    eager(xe, me, ge, Workspace())
    fused(xf, mf, gf, torch.empty_like(x0))
    rel = max(float((a - c).abs().max() / c.abs().max()) for a, c in ((xe, xf), (me, mf), (ge, gf)))
    print(f"fused vs eager after one step: max relative difference {rel:.1e}")
    assert rel < 1e-4, rel

    work, grad = Workspace(), torch.empty_like(x0)
    timings: dict[str, list[float]] = {"eager": [], "fused": []}
    state = {name: (x0.clone(), mu0.clone(), g20.clone()) for name in timings}
    for _ in range(args.repeats):
        for name in timings:
            x, mu, g2 = state[name]
            t0 = time.perf_counter()
            eager(x, mu, g2, work) if name == "eager" else fused(x, mu, g2, grad)
            timings[name].append(time.perf_counter() - t0)
    e, f = (statistics.median(timings[k]) * 1e3 for k in ("eager", "fused"))
    print(f"batch {b}, {h} px + {pad} padding, {torch.get_num_threads()} threads: "
          f"eager {e:.2f} ms, fused {f:.2f} ms per step ({e / f:.1f}× faster)")  # fmt: skip
    print(f"with a {args.floor_ms:.0f} ms floor, these parts alone would add {e / args.floor_ms:.3f} (eager) "
          f"and {f / args.floor_ms:.3f} (fused) to the step / floor ratio")  # fmt: skip


if __name__ == "__main__":
    main()
