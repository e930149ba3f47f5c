"""``preimage``: the command line.

Every command that needs the service runs through gRPC, so local and remote behave the same, by
one rule: ``--server ADDR``, else ``$PREIMAGE_SERVER``, else an embedded server started in this
process (loopback only, the local store under $PREIMAGE_STORE or ~/.local/share/preimage/store,
seeded with the bundled models). ``--json`` prints the same object either way, so a script moves
from local to remote by one flag. Bad arguments end in one line on stderr and exit status 2
(service/cli/args.py).

    preimage demo --out out/                      # the main job: all three RPCs on the bundled model
    preimage invert --tap /_blocks.7/Add --image chelsea --out inv.png --json
    preimage maximize --tap logits --channel 285 --out cat.png
    preimage caricature --tap /_blocks.4/_project_conv/Conv --image coffee.jpg --out car.png
    preimage models --json ; preimage inspect model.onnx --json ; preimage serve
    preimage check release.onnx --baseline previous.onnx --out report/   # CI gate (service/cli/check.py)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import service.cli.args as types
import service.cli.remote as cli_remote
from converters.spec import input_size
from service.cli.args import CliParser, run_cli
from service.cli.check import add_check_command
from service.cli.embedded import connect, embedded_server, say
from service.cli.exemplars import add_exemplars_command
from service.cli.remote import (
    SERVER_HELP,
    add_energy_arguments,
    add_remote_commands,
    add_server_argument,
    add_target_arguments,
    maximize_targets,
    rpc_error,
)
from service.cli.resolve import SERVER_ENV, TOKEN_ENV, image_ref, resolve_image, resolve_model, server_address

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_IMAGES = {"invert": "chelsea", "caricature": "coffee"}
VISUALIZATIONS = ("invert", "maximize", "caricature")
EPILOG = (
    f"Every command that needs the service talks to --server ADDR, else ${SERVER_ENV}, else an embedded "
    f"server started in this process on the local store ($PREIMAGE_STORE, default "
    f"~/.local/share/preimage/store). A server with tokens reads the caller's from ${TOKEN_ENV} (not a "
    f"flag: flags end up in shell history). Exit status: 0 done, 1 the service failed or refused, "
    f"2 a bad argument."
)

__all__ = ["build_parser", "embedded_server", "main"]


def _visualize(args: argparse.Namespace) -> int:
    """Invert, maximize or caricature with the flag form (--model, --tap, --image, --channel)."""
    if args.command == "maximize":
        maximize_targets(args)  # a missing target is a usage error: say so before any server starts
    try:
        with connect(args.server, timeout=args.timeout) as (client, embedded):
            args.embedded = embedded
            model = resolve_model(client, args.model, args.json)
            args.model = model.id
            if args.tap is None:
                args.tap = model.output_tap
            if args.command in DEFAULT_IMAGES:
                args.images = [resolve_image(s) for s in (args.image or [DEFAULT_IMAGES[args.command]])]
            return cli_remote.COMMANDS[args.command](client, args)
    except cli_remote.grpc.RpcError as err:
        return rpc_error(err, server_address(args.server))


def _inspect(args: argparse.Namespace) -> int:
    from converters.errors import ModelError
    from converters.inspect import inspect_model

    try:
        report = inspect_model(args.model, size=args.size)
    except ModelError as exc:
        print(json.dumps({"ok": False, "error": str(exc)}) if args.json else f"error: {exc}")
        return 1
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        from converters.inspect import format_report

        print(format_report(report))
    return 0 if report.get("ok", True) else 1


def _serve(args: argparse.Namespace) -> int:
    import dataclasses
    import logging

    from service.rpc.app import serve
    from service.rpc.config import ConfigError, resolve

    # Flags override the environment, which overrides the file (docs/operations.md).
    flags = {
        "address": args.address,
        "store_dir": Path(args.store) if args.store else None,
        "device": args.device,
        "seed_bundled": False if args.no_bundled else None,
        "metrics_port": args.metrics_port,
        "shutdown_grace": args.shutdown_grace,
        "auth.tokens_file": Path(args.tokens) if args.tokens else None,
    }
    try:
        address, config = resolve(args.config, overrides=flags)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "store_dir"}
    serve(address, config.store_dir, **options)
    # The server has drained and stopped, the store is closed. Interpreter teardown (torch's and
    # CUDA's destructors, the conversion fork server) measured 2-4.5 s on a busy 2-core box, time
    # that would come out of the shutdown grace period: flush and leave now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _classify(png: Path, model_name: str, report: dict[str, Any]) -> dict[str, Any]:
    """What the bundled model says of a PNG: its top class, the class's name and its softmax
    probability, computed by onnxruntime on the ONNX file (not by the service's torch graph)."""
    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    from service.models.seeding import quiet_bundled_models

    path = next(m.path for m in quiet_bundled_models() if m.name == model_name)
    pre = report["preprocessing"]
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) * (pre["scale"] or 1 / 255)
    x = ((pixels - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)).transpose(2, 0, 1)[None]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0][0].astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = int(p.argmax())
    try:  # ImageNet's class names ship with torchvision (no download)
        from torchvision.models import ResNet18_Weights

        label: str | None = ResNet18_Weights.IMAGENET1K_V1.meta["categories"][top]
    except (ImportError, AttributeError, IndexError, KeyError):
        label = None
    return {"class": top, "label": label, "probability": float(p[top])}


def _demo(args: argparse.Namespace) -> int:
    """The main job: invert, maximize and caricature on the bundled model through the embedded server."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = ["--height", str(args.size), "--width", str(args.size)]
    steps = ["--steps", str(args.steps)] if args.steps else []
    jobs = [
        ["invert", "--tap", "/_blocks.2/Add", "--image", "chelsea", "--out", str(out / "invert-blocks2.png")],
        ["invert", "--tap", "/_blocks.10/Add", "--image", "chelsea", "--out", str(out / "invert-blocks10.png")],
        ["maximize", "--tap", "logits", "--channel", "285", "--out", str(out / "maximize-class285.png")],
        # The mid-layer tap with the largest caricature gain on this model (docs/energy.md: 2.13×).
        [
            "caricature",
            "--tap",
            "/_blocks.4/_project_conv/Conv",
            "--image",
            "coffee",
            "--out",
            str(out / "caricature-blocks4.png"),
        ],
    ]
    summary = []
    with contextlib.ExitStack() as stack:
        address = server_address(args.server)
        if address is None:
            address = stack.enter_context(embedded_server(Path(args.store) if args.store else None))
        for i, job in enumerate(jobs):
            why = {0: " (converting the model first)", 2: " (measuring its channel statistics first)"}.get(i, "")
            say(f"{job[0]} at {job[2]}{why}")
            sub = build_parser().parse_args([*job, *size, *steps, "--server", address, "--json"])
            with contextlib.redirect_stdout(tempfile.SpooledTemporaryFile(mode="w+")) as captured:
                status = sub.func(sub)
            captured.seek(0)
            if status != 0:
                print(f"demo step {' '.join(job)} failed", file=sys.stderr)
                return status
            report = json.loads(captured.read())
            fe, objective = report.get("feature_error"), report.get("objective")
            row = {"command": job[0], "tap": sub.tap, "output": report["output"], "feature_error": fe,
                   "objective": objective}  # fmt: skip
            if job[0] == "caricature" and objective is not None:
                # Φ0⁺ is normalized so the start image scores 1: the objective is the gain.
                figure = f"  ⟨Φ, Φ0⁺⟩ {objective:.2f}× the start"
            elif job[0] == "maximize":
                seen = row["classified"] = _classify(Path(report["output"]), DEFAULT_MODEL, report)
                label = f" ({seen['label']})" if seen["label"] else ""
                figure = f"  the model sees class {seen['class']}{label}, p={seen['probability']:.3f}"
            else:
                figure = f"  feature error {fe:.3f}" if fe is not None else ""
            summary.append(row)
            print(f"{job[0]:<10} {sub.tap:<18} → {report['output']}{figure}", flush=True)
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    return 0


_DESCRIPTIONS = {
    "invert": "Reconstruct images from their representation at a tap: what the layer keeps of them.",
    "maximize": "Find natural-looking images that excite channels, neurons or classes of a tap: what the layer "
    "detects.",
    "caricature": "Start from images and exaggerate what a tap detects in them.",
}


def _add_local_visualization(sub: Any, task: str) -> None:
    help_text = {
        "invert": "reconstruct images from their representation at a tap",
        "maximize": "find natural-looking images that excite channels/neurons of a tap",
        "caricature": "exaggerate what a tap detects in images",
    }[task]
    p = sub.add_parser(task, help=help_text, description=_DESCRIPTIONS[task], epilog=EPILOG)
    p.add_argument("--model", default=DEFAULT_MODEL, type=types.model_ref,
                   help=f"NAME, NAME:N, an id, or an .onnx file (uploaded first; default {DEFAULT_MODEL})")  # fmt: skip
    p.add_argument("--tap", default=None,
                   help="ONNX value name, node name or torch module path of the tensor (see `preimage taps`; "
                   "default: the model output)")  # fmt: skip
    if task in DEFAULT_IMAGES:
        default = DEFAULT_IMAGES[task]
        p.add_argument("--image", action="append", default=None, type=image_ref,
                       help=f"image file or scikit-image photo name, repeatable (default {default})")  # fmt: skip
        if task == "invert":
            p.add_argument("--mask-center", type=types.nonneg_int, default=0,
                           help="keep only a central k×k window of features")  # fmt: skip
    else:
        add_target_arguments(p)
    cli_remote.add_run_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with outputs and figures")
    add_server_argument(p)
    add_energy_arguments(p, amplitude_images=task != "invert")
    p.set_defaults(func=_visualize, command=task)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from service.api.preimage.v1 import preimage_pb2 as pb

    try:
        own = version("preimage")
    except PackageNotFoundError:  # run from a checkout that was never installed
        own = "unknown"
    return f"preimage {own} (API {pb.DESCRIPTOR.package})"


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="preimage",
        description="Natural pre-images of vision models: see what an ONNX model's layers keep and detect.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for task in VISUALIZATIONS:
        _add_local_visualization(sub, task)
    p = sub.add_parser("inspect", help="input spec, taps, ops and parity of an ONNX file (no server)",
                       description="Read an ONNX file and report what the service would make of it: the "
                       "image input it detected, the taps, the operators and parity against onnxruntime. "
                       "Runs locally; nothing is stored.")  # fmt: skip
    p.add_argument("model", type=types.existing_file, help="the .onnx file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--size", type=input_size, default=None, metavar="HxW",
                   help="input size of a dynamic-size model, e.g. 48x320 (default: metadata, else probed)")  # fmt: skip
    p.set_defaults(func=_inspect)
    p = sub.add_parser("serve", help="run the gRPC server (settings: docs/operations.md)",
                       description="Run the gRPC server until SIGTERM/SIGINT (the first drains running jobs, "
                       "a second cancels them). Flags override $PREIMAGE_* variables, which override the "
                       "settings file; docs/operations.md lists every setting.")  # fmt: skip
    p.add_argument("--config", default=None, type=types.existing_file,
                   help="TOML settings file (default $PREIMAGE_CONFIG)")  # fmt: skip
    p.add_argument("--address", default=None, help="host:port to listen on (default localhost:50051)")
    p.add_argument("--metrics-port", type=types.nonneg_int, default=None,
                   help="port of /metrics, /healthz, /readyz (default 9464; 0: any free one; "
                        "PREIMAGE_METRICS_PORT=none: off)")  # fmt: skip
    p.add_argument("--shutdown-grace", type=types.nonneg_float, default=None,
                   help="seconds from SIGTERM to exit (default 30)")  # fmt: skip
    p.add_argument("--tokens", default=None, type=types.existing_file,
                   help="tenants' tokens file (service/rpc/auth.py); required off loopback")  # fmt: skip
    p.add_argument("--store", default=None,
                   help="store directory (default $PREIMAGE_STORE or ~/.local/share/preimage/store)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--no-bundled", action="store_true", help="do not seed the bundled models")
    p.set_defaults(func=_serve)
    p = sub.add_parser("demo", help="the main job: all three visualizations on the bundled model",
                       description="Invert, maximize and caricature on the bundled EfficientNet-Lite0, writing "
                       "PNGs and demo.json into --out; each line says what the model makes of its image.",
                       epilog=EPILOG)  # fmt: skip
    p.add_argument("--out", default="out", help="folder for the PNGs and demo.json (default out/)")
    p.add_argument("--size", type=types.positive_int, default=160, help="image size in pixels (default 160)")
    p.add_argument("--steps", type=types.positive_int, default=None,
                   help="first-stage steps (default: each preset's own)")  # fmt: skip
    p.add_argument("--store", default=None, help="store directory of the embedded server")
    p.add_argument("--server", metavar="ADDR", default=None, help=SERVER_HELP)
    p.set_defaults(func=_demo)
    add_check_command(sub)
    add_exemplars_command(sub, EPILOG, DEFAULT_MODEL)
    add_remote_commands(sub, skip=set(VISUALIZATIONS))
    for name, action in sub.choices.items():
        if name in cli_remote.ALL_COMMANDS and name not in VISUALIZATIONS:
            action.epilog = EPILOG
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
