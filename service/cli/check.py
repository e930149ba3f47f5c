"""``preimage check``: gate a model release in CI (parity, a visual report, drift from a baseline).

    preimage check release.onnx --baseline previous.onnx --out report/ --max-drift 0.05
    preimage check release.onnx --out report/ --server preimage.internal:50051   # on a GPU server

Without a server (``--server`` or ``$PREIMAGE_SERVER``) the check runs in this process, on the
ONNX files themselves: the models are loaded without the upload's parity gate, because the
check's own parity section is the judge and a release that fails it still deserves a report
that says where. With ``--server`` the files are
uploaded (a model whose parity is broken is refused there, with the taps named) and the server's
CheckRelease RPC renders the same report.

Exit status: 0 when parity holds and drift is within the limits, 1 when the check fails (the reasons
are printed), 2 when it could not run (unreadable model, unknown tap, bad flags).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import service.cli.args as types
from converters.spec import input_size
from service.cli.args import UsageError
from service.cli.remote import add_server_argument
from service.cli.resolve import resolve_model, server_address, token_from_env

_LIMIT_FLAGS = {
    "parity_tolerance": "largest parity figure at any tap, max|a-b| / (max|b| + |b|) per element, a: torch, "
    "b: onnxruntime (default 1e-4 for float32, 1e-2 for float16; docs/converters.md#parity)",
    "max_drift": "largest visual drift per layer (feature distance of the same visualization)",
    "max_feature_drift": "largest feature drift per layer on the reference photographs",
    "max_changed_fraction": "largest fraction of a layer's channels whose responses changed",
    "channel_correlation": "a channel changed when its responses correlate below this (default 0.9)",
}


DESCRIPTION = (
    "Gate a model release in CI: parity against onnxruntime at every tap, a visual report "
    "(report.html, check.json) and, with --baseline, drift from the previous release. Without a server "
    "(--server or $PREIMAGE_SERVER) the check runs in this process on the ONNX files themselves."
)
EXIT_STATUS = "Exit status: 0 parity holds and drift is within the limits, 1 the check failed, 2 it could not run."


def add_check_command(sub: Any) -> None:
    p = sub.add_parser(
        "check",
        help="check a model release: parity, visual report, drift from a baseline",
        description=DESCRIPTION,
        epilog=EXIT_STATUS,
    )
    p.add_argument("model", type=types.model_ref, help="the release: an .onnx file (or a bundled/server model name)")
    p.add_argument(
        "--baseline",
        default=None,
        type=types.model_ref,
        help="the previous release, for drift figures (on a server: a name, an id or NAME:previous)",
    )
    p.add_argument("--out", required=True, help="folder for report.html and check.json")
    p.add_argument("--preset", default="small", choices=("small", "full"),
                   help="small: CPU in minutes (default); full: the paper's 300 steps at 224 px, for GPUs")
    p.add_argument("--tap", action="append", default=[], help="layer to visualize (repeatable; default: spread)")
    for name, text in _LIMIT_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=types.nonneg_float, default=None, metavar="X", help=text)
    p.add_argument("--seed", type=types.nonneg_int, default=0, help="seed of every visualization (default 0)")
    p.add_argument("--device", default=None, help="local runs: cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--size", type=input_size, default=None, metavar="HxW",
                   help="input size of dynamic-size models (release and baseline), e.g. 48x320")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the JSON summary instead of the verdict lines")
    add_server_argument(p)
    p.set_defaults(func=run_check_command)


def _limits(args: argparse.Namespace) -> dict[str, float]:
    # argparse checked each value (finite, ≥ 0).
    return {name: getattr(args, name) for name in _LIMIT_FLAGS if getattr(args, name) is not None}


def _progress(stage: str, done: int, total: int, message: str) -> None:
    print(f"[{stage} {done}/{total}] {message}", file=sys.stderr, flush=True)


def _load_local(spec: str, size: tuple[int, int] | None = None) -> Any:
    from converters.model import load_model
    from service.models.seeding import quiet_bundled_models

    bundled = {m.name: m.path for m in quiet_bundled_models()} if not Path(spec).exists() else {}
    if not Path(spec).exists() and spec not in bundled:
        raise UsageError(
            f"{spec!r} is neither a file nor a bundled model ({', '.join(bundled)}); a stored model's name "
            "(NAME, NAME:3, NAME:previous) needs a server: --server ADDR or $PREIMAGE_SERVER"
        )
    return load_model(bundled.get(spec, spec), verify=False, size=size)


def _run_local(args: argparse.Namespace, limits: dict[str, float]) -> tuple[dict, str]:
    import torch

    from service.release.check import Thresholds, run_check, summary
    from service.release.report import render_html

    model = _load_local(args.model, args.size)
    baseline = _load_local(args.baseline, args.size) if args.baseline else None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = run_check(model, baseline, preset=args.preset, taps=args.tap or None, thresholds=Thresholds(**limits),
                       device=device, model_name=Path(args.model).name,
                       baseline_name=Path(args.baseline).name if args.baseline else None, seed=args.seed,
                       progress=_progress)
    return summary(result), render_html(result)


def _run_remote(args: argparse.Namespace, limits: dict[str, float]) -> tuple[dict, str]:
    from service.client import PreimageClient

    with PreimageClient(server_address(args.server), token=token_from_env()) as client:
        model = resolve_model(client, args.model, args.json, size=args.size)
        baseline = resolve_model(client, args.baseline, args.json, size=args.size) if args.baseline else None

        def show(event: Any) -> None:
            _progress(event.stage, event.done, event.total, event.message)

        run = client.check(model.id, baseline.id if baseline else "", preset=args.preset, taps=args.tap,
                           seed=args.seed, on_progress=show, **limits).wait()
    if run.report is None:
        raise RuntimeError("the server ended the check without a report")
    return json.loads(run.report.summary_json), run.html.decode("utf-8")


def run_check_command(args: argparse.Namespace) -> int:
    import grpc

    from converters.errors import ModelError

    limits = _limits(args)
    try:
        data, page = _run_remote(args, limits) if server_address(args.server) else _run_local(args, limits)
    except grpc.RpcError as err:
        print(f"error ({err.code().name}): {' '.join((err.details() or '').split())}", file=sys.stderr)
        return 2
    except (ModelError, ValueError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.html").write_text(page, encoding="utf-8")
    (out / "check.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print(f"{'PASS' if data['ok'] else 'FAIL'}: {args.model}"
              + (f" vs {args.baseline}" if args.baseline else "") + f" → {out / 'report.html'}")
        for layer in data["layers"]:
            d = layer["drift"]
            if d is not None:
                print(f"  {layer['tap']['alias']}: feature drift {d['feature_drift']:.3g}, visual drift "
                      f"{d['visual_drift_max']:.3g}, {d['changed_channels']}/{d['n_channels']} channels changed")
    for reason in data["reasons"]:
        print(f"  {reason}", file=sys.stderr)
    return 0 if data["ok"] else 1
