"""End to end: how many steps (and how much time) each optimizer setting needs to reach the inversion
error of SPEC.md's reference schedule, versus that schedule's 350 steps.

For the bundled EfficientNet-Lite0 and `chelsea`, per tap:

1. The reference: SPEC.md's schedule with the paper's optimizer (300 jittered steps, then 50 more at
   0.1× without jitter), stepped by ``service.energy.Minimizer`` as the service's scheduler steps it.
   Its normalized feature error ‖Φ(x*) − Φ0‖/‖Φ0‖, measured on the PNG, is E_ref; its optimization
   time (the steps alone, timed like every other setting's) is the seconds one visualization costs.
2. Every other setting the energy module offers, each run alone from the same seed: the service's
   default settings (``EnergyParams()``: today the paper's optimizer and schedule, so this row checks
   how early the reference trajectory itself gets to its final error), the same optimizer on shorter
   schedules (``steps``/``refine_steps``: S + S/6, what a user gets by asking for fewer steps, or any
   S + R), and Adam (the ``optimizer="adam"`` option, 300 + 50, default and other step sizes).
   Every ``--every`` steps the image a client would get if the job stopped now (the centre crop,
   quantized to uint8) is passed through Φ and its error compared with E_ref.

The figure is the first measured step at which a setting's error is ≤ E_ref (a multiple of
``--every``, or the schedule's last step), its ratio to the reference's 350 steps and the ratio of
the optimization wall time spent up to that step to the reference's wall time (fewer steps or less
time for the same error is a win; "not reached" when the setting's schedule ends above E_ref).

Measuring does not perturb the trajectory: it only reads the current image (no random generator
is touched; each problem's jitter comes from its own seeded generator) and is left out of the
timings. The default row repeats the reference run with measurements, and the script checks that
its final error equals E_ref exactly. All runs of a tap advance in lock-step (one step each in turn),
so a shared machine's changing load hits every setting alike. One CPU thread by default: with more
threads the reduction order, hence the trajectory and E_ref, changes (0.103 vs 0.097 at
``/_blocks.2/Add``, 128 px, 2 threads vs 1), and on a loaded 2-core machine extra threads only wait.

    python bench/steps_to_error.py [--size 128] [--taps /_blocks.2/Add,/_blocks.7/Add,/_blocks.14/Add]
        [--device cpu] [--every 10] [--schedules 100,200,150+100] [--adam-lrs 4,8] [--json PATH]
    python bench/steps_to_error.py --size 64 --steps 20 --refine 4 --schedules 10 --every 5   # smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from converters.bundled import bundled_model_path
from converters.model import load_model
from service.energy import EnergyParams, Minimizer, Objective, Problem, feature_error, from_uint8, minimize
from service.jobs.reference import center_crop_resize, photo

TAPS = "/_blocks.2/Add,/_blocks.7/Add,/_blocks.14/Add"  # early (stride 4), mid (16), late (32)


@dataclass
class Setting:
    name: str
    params: EnergyParams


@dataclass
class Trajectory:
    """One setting's run on one tap, measured every few steps."""

    setting: str
    schedule: str
    total_steps: int
    steps: list[int] = field(default_factory=list)  # measured steps (1-based)
    errors: list[float] = field(default_factory=list)  # feature error on the PNG at that step
    seconds: list[float] = field(default_factory=list)  # optimization time up to that step
    first_step: int | None = None  # first measured step with error ≤ E_ref
    seconds_to_first: float | None = None
    step_ratio: float | None = None  # first_step / reference steps
    time_ratio: float | None = None  # seconds_to_first / reference seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def schedule(params: EnergyParams) -> str:
    refine = 50 if params.refine_steps is None else params.refine_steps
    lr = "" if params.learning_rate is None else f", lr {params.learning_rate:g}"
    return f"{params.optimizer}{lr}, {params.steps}+{refine}"


class Run:
    """One problem stepped alone in its own Minimizer; every ``every`` steps (0: never) the error of the
    image a client would get now is measured. Only ``mini.step()`` is timed."""

    def __init__(
        self,
        phi: torch.nn.Module,
        phi0: torch.Tensor,
        setting: Setting,
        *,
        size: int,
        stride: int,
        mean: torch.Tensor,
        device: torch.device,
        every: int,
    ) -> None:
        self.phi, self.phi0, self.mean, self.device, self.every = phi, phi0, mean, device, every
        self.mini = Minimizer(phi, height=size, width=size, stride=stride, mean_rgb255=mean, device=device)
        self.handle = self.mini.add(Problem(Objective.invert(phi0), setting.params, seed=0))
        self.traj = Trajectory(setting.name, schedule(setting.params), self.mini.rows[0].total)
        self.elapsed, self.step, self.final = 0.0, 0, float("nan")

    @property
    def running(self) -> bool:
        return bool(self.mini.rows)

    def advance(self) -> None:
        sync(self.device)
        start = time.perf_counter()
        done = self.mini.step()
        sync(self.device)
        self.elapsed += time.perf_counter() - start
        self.step += 1
        if done:  # the minimizer's own final figure, measured on the PNG
            ((_, result),) = done
            error = self.final = float(result.feature_error)
        elif self.every and self.step % self.every == 0:
            with torch.no_grad():
                xq = from_uint8(self.mini.current_image(self.handle), self.mean).to(self.device)[None]
                error = feature_error(self.phi(xq).float()[0], self.phi0)
        else:
            return
        self.traj.steps.append(self.step)
        self.traj.errors.append(error)
        self.traj.seconds.append(self.elapsed)


def run_interleaved(runs: list[Run]) -> None:
    """Step every run once per round until all are done: drifts in the load of a shared machine then
    hit every setting alike, so the time ratios hold within one run of the script."""
    while any(r.running for r in runs):
        for r in runs:
            if r.running:
                r.advance()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--taps", default=TAPS, help="comma-separated tap names")
    parser.add_argument("--image", default="chelsea")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=300, help="reference first stage (SPEC: 300)")
    parser.add_argument("--refine", type=int, default=50, help="reference second stage (SPEC: 50)")
    parser.add_argument("--every", type=int, default=10, help="measure the error every this many steps")
    parser.add_argument(
        "--schedules",
        default="100,200,150+100",
        help="other schedules for the default optimizer: S (S + S/6 refine steps) or S+R, comma-separated",
    )
    parser.add_argument("--adam-lrs", default="4,8", help="Adam step sizes in pixels (4 is the default)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="write every trajectory here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_model(bundled_model_path())
    mean = torch.tensor(model.preprocessing.mean_rgb255)
    x0 = from_uint8(center_crop_resize(photo(args.image), args.size, args.size), mean)
    ref_params = EnergyParams(optimizer="paper", steps=args.steps, refine_steps=args.refine, refine_lr_scale=0.1)
    ref_total = args.steps + args.refine
    # The service's default: EnergyParams() as a request with no fields set gets it (service/jobs/job.py),
    # with the reference's step counts so that a smoke run stays short.
    default = EnergyParams(steps=args.steps, refine_steps=args.refine)
    settings = [Setting("service default", default)]
    for item in (v.strip() for v in args.schedules.split(",") if v.strip()):
        first, _, refine = item.partition("+")
        s, r = int(first), int(refine) if refine else round(int(first) / 6)
        settings.append(Setting(f"default, {s}+{r} steps", replace(default, steps=s, refine_steps=r)))
    for lr in (float(v) for v in args.adam_lrs.split(",") if v):
        name = "adam" + (" (default step)" if lr == 4.0 else f", step {lr:g} px")
        settings.append(Setting(name, replace(ref_params, optimizer="adam", learning_rate=lr)))
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), image {args.image} "
        f"{args.size}px, reference: paper optimizer {args.steps}+{args.refine} steps, error measured "
        f"every {args.every} steps on the PNG",
        flush=True,
    )
    report: list[dict] = []
    rows: list[str] = []
    for name in args.taps.split(","):
        tap = model.tap(name)
        phi = model.representation(tap).to(device)
        with torch.no_grad():
            phi0 = phi(x0[None].to(device)).float()[0]
        # warm-up (allocator, first-call costs) so the reference's wall time is a steady figure
        minimize(
            phi,
            [Problem(Objective.invert(phi0), replace(ref_params, steps=2, refine_steps=1))],
            height=args.size,
            width=args.size,
            stride=tap.stride,
            mean_rgb255=mean,
            device=device,
        )
        common = dict(size=args.size, stride=tap.stride, mean=mean, device=device)
        # the reference takes no intermediate measurements; all runs advance in lock-step
        reference = Run(phi, phi0, Setting("reference", ref_params), every=0, **common)
        runs = [Run(phi, phi0, setting, every=args.every, **common) for setting in settings]
        run_interleaved([reference, *runs])
        e_ref, ref_seconds = reference.final, reference.elapsed
        print(
            f"\n{tap.alias} {list(tap.shape)} stride {tap.stride}: E_ref = {e_ref:.4f} after {ref_total} steps, "
            f"{ref_seconds:.2f} s per visualization ({ref_total / ref_seconds:.1f} steps/s)",
            flush=True,
        )

        def resolve(p: EnergyParams, stride: int = tap.stride) -> EnergyParams:
            return p.resolved("invert", args.size, args.size, stride)

        tap_report = {
            "tap": tap.alias,
            "shape": list(tap.shape),
            "stride": tap.stride,
            "e_ref": e_ref,
            "reference_steps": ref_total,
            "reference_seconds": ref_seconds,
            "settings": [],
        }
        for setting, run in zip(settings, runs, strict=True):
            traj, final = run.traj, run.final
            hit = next((i for i, e in enumerate(traj.errors) if e <= e_ref), None)
            if hit is not None:
                traj.first_step, traj.seconds_to_first = traj.steps[hit], traj.seconds[hit]
                traj.step_ratio = traj.first_step / ref_total
                traj.time_ratio = traj.seconds_to_first / ref_seconds
            note = ""
            if setting.name == "service default" and resolve(default) == resolve(ref_params):
                same = "identical" if final == e_ref else f"DIFFERS: {final:.6f} vs {e_ref:.6f}"
                note = f" (the same settings as the reference; final error {same})"
            reached = (
                f"at step {traj.first_step} ({traj.step_ratio:.2f} of {ref_total}), "
                f"{traj.seconds_to_first:.2f} s ({traj.time_ratio:.2f} of the reference's time)"
                if traj.first_step is not None
                else f"not reached in {traj.total_steps} steps"
            )
            print(f"  {setting.name:<24} [{traj.schedule}]: final {final:.4f}; ≤ E_ref {reached}{note}", flush=True)
            rows.append(
                f"| `{tap.alias}` | {setting.name} | {traj.schedule} | {e_ref:.4f} | {final:.4f} | "
                + (
                    f"{traj.first_step} | {traj.step_ratio:.2f} | {traj.time_ratio:.2f} |"
                    if traj.first_step is not None
                    else f"not reached ({traj.total_steps}) | — | — |"
                )
            )
            tap_report["settings"].append({**asdict(traj), "final_error": final})
        report.append(tap_report)
    print(
        "\n| tap | setting | optimizer, steps | E_ref | final error | first step ≤ E_ref | steps / "
        f"{ref_total} | time / reference |\n|---|---|---|---|---|---|---|---|"
    )
    print("\n".join(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "device": str(device),
            "size": args.size,
            "image": args.image,
            "every": args.every,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        if device.type == "cuda":
            meta["device_name"] = torch.cuda.get_device_name(device)
        Path(args.json).write_text(json.dumps({**meta, "taps": report}, indent=1))


if __name__ == "__main__":
    main()
