"""``preimage``: the command line.

Every visualization command runs through the gRPC service, so local and remote behave the same:
without ``--server`` the command starts an embedded server in this process (loopback only, the
local store under $PREIMAGE_STORE or ~/.local/share/preimage/store, seeded with the bundled
models); with ``--server ADDR`` it talks to that server instead. ``--json`` prints the same
object either way, so a script moves from local to remote by one flag.

    preimage demo --out out/                      # the main job: all three RPCs on the bundled model
    preimage invert --tap /_blocks.7/Add --image chelsea --out inv.png --json
    preimage maximize --tap logits --channel 285 --out cat.png
    preimage caricature --tap /_blocks.4/_project_conv/Conv --image coffee.jpg --out car.png
    preimage models --json | preimage inspect model.onnx --json | preimage serve
    preimage check release.onnx --baseline previous.onnx --out report/   # CI gate (service/cli/check.py)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import service.cli.remote as cli_remote
from service.cli.check import add_check_command
from service.cli.remote import add_energy_arguments, add_remote_commands, add_server_argument
from service.cli.resolve import default_store, resolve_image, resolve_model, token_from_env

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_IMAGES = {"invert": "chelsea", "caricature": "coffee"}
VISUALIZATIONS = ("invert", "maximize", "caricature")


@contextlib.contextmanager
def embedded_server(store: Path | None = None) -> Iterator[str]:
    """An in-process server on a free loopback port; yields its address."""
    from service.rpc.app import start_server
    from service.rpc.config import ServerConfig

    running = start_server("127.0.0.1:0", ServerConfig(store_dir=store or default_store()))
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        running.stop(grace=None)


def _visualize(args: argparse.Namespace) -> int:
    """Local or remote: normalize the local flags into the remote command's arguments and run it."""
    from service.client import PreimageClient

    with contextlib.ExitStack() as stack:
        address = args.server or stack.enter_context(embedded_server())
        client = stack.enter_context(PreimageClient(address, timeout=args.timeout, token=token_from_env()))
        try:
            model = resolve_model(client, args.model, args.json)
            args.model = model.id
            if args.tap is None:
                args.tap = model.output_tap
            if args.command in DEFAULT_IMAGES:
                args.images = [resolve_image(s) for s in (args.image or [DEFAULT_IMAGES[args.command]])]
            return cli_remote.COMMANDS[args.command](client, args)
        except cli_remote.grpc.RpcError as err:
            print(f"error ({err.code().name}): {err.details()}", file=sys.stderr)
            return 1


def _models(args: argparse.Namespace) -> int:
    if args.server:
        return cli_remote.run_remote(args)
    from converters.bundled import bundled_models

    rows = [{"name": m.name, "path": str(m.path), "description": m.description} for m in bundled_models()]
    print(json.dumps(rows, indent=1) if args.json else "\n".join(f"{r['name']:<22} {r['path']}" for r in rows))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from converters.errors import ModelError
    from converters.inspect import inspect_model

    try:
        report = inspect_model(args.model)
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
        ["caricature", "--tap", "/_blocks.4/_project_conv/Conv", "--image", "coffee",
         "--out", str(out / "caricature-blocks4.png")],
    ]
    summary = []
    with embedded_server(Path(args.store) if args.store else None) as address:
        for job in jobs:
            sub = build_parser().parse_args([*job, *size, *steps, "--server", address, "--json"])
            with contextlib.redirect_stdout(tempfile.SpooledTemporaryFile(mode="w+")) as captured:
                status = sub.func(sub)
            captured.seek(0)
            if status != 0:
                print(f"demo step {' '.join(job)} failed", file=sys.stderr)
                return status
            report = json.loads(captured.read())
            summary.append(
                {
                    "command": job[0],
                    "tap": sub.tap,
                    "output": report["output"],
                    "feature_error": report.get("feature_error"),
                    "objective": report.get("objective"),
                }
            )
            fe, objective = report.get("feature_error"), report.get("objective")
            if job[0] == "caricature" and objective is not None:
                # Φ0⁺ is normalized so the start image scores 1: the objective is the gain.
                figure = f"  ⟨Φ, Φ0⁺⟩ {objective:.2f}× the start"
            else:
                figure = f"  feature error {fe:.3f}" if fe is not None else ""
            print(f"{job[0]:<10} {sub.tap:<18} → {report['output']}{figure}", flush=True)
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    return 0


def _add_local_visualization(sub: Any, task: str) -> None:
    help_text = {
        "invert": "reconstruct images from their representation at a tap",
        "maximize": "find natural-looking images that excite channels/neurons of a tap",
        "caricature": "exaggerate what a tap detects in images",
    }[task]
    p = sub.add_parser(task, help=help_text, description=help_text)
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model name/id on the server, or an .onnx file (default {DEFAULT_MODEL})",
    )
    p.add_argument("--tap", default=None, help="ONNX value name or node name of the tensor (default: the model output)")
    if task in DEFAULT_IMAGES:
        p.add_argument(
            "--image",
            action="append",
            default=None,
            help=f"image file or scikit-image photo name, repeatable (default {DEFAULT_IMAGES[task]})",
        )
        if task == "invert":
            p.add_argument("--mask-center", type=int, default=0, help="keep only a central k×k window of features")
    else:
        p.add_argument("--channel", action="append", default=[], help="channel(s)/class: 3, 0-15 or 1,4,9 (repeatable)")
        p.add_argument("--neuron", action="append", default=[], help="neuron c,y,x (repeatable)")
        p.add_argument(
            "--channel-max",
            type=float,
            default=None,
            help="M_k of the paper's normalization (default: measured on reference photos)",
        )
    cli_remote.add_run_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with outputs and figures")
    add_server_argument(p)
    add_energy_arguments(p)
    p.set_defaults(func=_visualize, command=task)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preimage", description="Natural pre-images of vision models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for task in VISUALIZATIONS:
        _add_local_visualization(sub, task)
    p = sub.add_parser("models", help="list models (bundled ones locally, or a server's)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--prefix", default="", help="(with --server) only names starting with this")
    add_server_argument(p)
    p.set_defaults(func=_models, command="models")
    p = sub.add_parser("inspect", help="input spec, taps, ops and parity of an ONNX file")
    p.add_argument("model", help="the .onnx file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("serve", help="run the gRPC server (settings: docs/operations.md)")
    p.add_argument("--config", default=None, help="TOML settings file (default $PREIMAGE_CONFIG)")
    p.add_argument("--address", default=None, help="host:port to listen on (default localhost:50051)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    p.add_argument("--shutdown-grace", type=float, default=None, help="seconds from SIGTERM to exit (default 30)")
    p.add_argument("--tokens", default=None, help="tenants' tokens file (service/rpc/auth.py); required off loopback")
    p.add_argument(
        "--store", default=None, help="store directory (default $PREIMAGE_STORE or ~/.local/share/preimage/store)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--no-bundled", action="store_true", help="do not seed the bundled models")
    p.set_defaults(func=_serve)
    p = sub.add_parser("demo", help="the main job: all three visualizations on the bundled model")
    p.add_argument("--out", default="out", help="folder for the PNGs and demo.json (default out/)")
    p.add_argument("--size", type=int, default=160, help="image size in pixels (default 160)")
    p.add_argument("--steps", type=int, default=None, help="first-stage steps (default: the paper's 300)")
    p.add_argument("--store", default=None, help="store directory")
    p.set_defaults(func=_demo)
    add_check_command(sub)
    add_remote_commands(sub, skip={"models", *VISUALIZATIONS})
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
