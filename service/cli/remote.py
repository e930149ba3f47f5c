"""The command line's server half: subcommands that talk to a preimage server.

Every command here follows the one rule of service/cli/resolve.py: ``--server ADDR``, else
``$PREIMAGE_SERVER``, else an embedded server on the local store (service/cli/embedded.py).

Wiring (as service/cli/main.py does it)::

    from service.cli.remote import add_remote_commands, add_server_argument, add_energy_arguments
    add_remote_commands(subparsers, skip={"invert", ...})  # the ones main.py defines with flags
    add_server_argument(local_invert_parser)

Every subcommand here sets ``args.func``; ``run_remote(args)`` runs ``COMMANDS[args.command]`` with
a client. The visualizations take the same argument names in both forms (``model``, ``tap``,
``images``, ``out``, ``json`` and the energy flags of ``add_energy_arguments``); ``--json`` prints
``{"output", "model", "tap", "preprocessing", "terms", "feature_error", ...}``.

Exit status of every command: 0 done; 1 the service failed or refused (unavailable, busy,
permission, quota); 2 a bad argument, found here or by the server (INVALID_ARGUMENT, NOT_FOUND).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

import service.cli.args as types
from converters.spec import input_size
from service.api.enums import ENERGY_ENUMS
from service.api.preimage.v1 import preimage_pb2 as pb
from service.cli.args import EXIT_USAGE, CliParser, UsageError, model_ref, run_cli
from service.cli.embedded import connect, say
from service.cli.resolve import SERVER_ENV, image_ref, resolve_image
from service.rpc.messages import model_dict, origin_text, preprocessing_dict

ALL_COMMANDS = ("upload", "models", "taps", "delete", "share", "info", "stats", "invert", "maximize", "caricature")
# What the server's code says about the arguments: these are the caller's to fix (exit 2).
USAGE_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
MODEL_HELP = "NAME (its latest version), NAME:N, NAME:previous, an id or an id prefix"
_ENERGY_HELP = {
    "loss_weight": "C, weight of the loss (paper: 300 invert, 3e4 maximize, 100 caricature; fourier/phase: 1)",
    "alpha": "α of the α-norm (default 6)",
    "lambda_alpha": "λ_α (default 1)",
    "beta": "β of TV^β (default 2)",
    "lambda_tv": "λ_V (default 1)",
    "b_norm": "B (default 80)",
    "tv_norm": "V (default B/6.5)",
    "bound": "radius of B₊ (default 2B)",
    "jitter": "T, jitter shifts 0..T-1 (default max(round(stride/4),1))",
    "steps": "first-stage steps (default 300)",
    "refine_steps": "second-stage steps (default 50 invert, 0 otherwise)",
    "refine_lr_scale": "second-stage learning-rate factor (default 0.1)",
    "lr_end_scale": "factor the rate falls to by the last step, linearly (fourier/phase; natural maximize: 0.1)",
    "learning_rate": "η (paper: H·W·0.05·B²/α; adam on pixels 4; fourier 0.05; phase 1)",
    "momentum": "momentum (default 0.9)",
    "decay": "decay of G (default 0.9)",
    "optimizer": "update rule (default: the preset's; paper for pixels, nadam/adam otherwise)",
    "preset": "named defaults: paper (SPEC.md) or natural (default natural for maximize/caricature, paper for invert)",
    "parameterization": "what is optimized (default: the preset's)",
    "fourier_decay": "d of the fourier 1/f^d scale (default 1)",
    "copies": "transformed views per step (fourier/phase; natural: 4)",
    "translate": "largest random shift of a view, px",
    "scale_min": "smallest random zoom of a view",
    "scale_max": "largest random zoom of a view",
    "rotate": "largest random rotation of a view, degrees",
    "crop_start": "random crop side at the first step, fraction of the image",
    "crop_end": "random crop side at the last step",
    "crop_spread": "std of the crop centre, fraction of the side",
    "canvas": "side of the optimized image as a multiple of the output (fourier/phase; default 1)",
    "noise": "std of the noise added to each view, 0-1 units",
    "anchor": "weight of the pull back to the start image (caricature)",
    "diversity": "weight of the diversity penalty among repeats of one target",
    "spatial": "maximize a channel at the map's centre or its mean (default: the preset's)",
}


SERVER_HELP = f"preimage server host:port (default: ${SERVER_ENV}, else an embedded server on the local store)"


def add_server_argument(parser: argparse.ArgumentParser) -> None:
    """``--server ADDR``; unset: $PREIMAGE_SERVER, else embedded (service/cli/resolve.py)."""
    parser.add_argument("--server", metavar="ADDR", default=None, help=SERVER_HELP)


def add_energy_arguments(parser: argparse.ArgumentParser, amplitude_images: bool = False) -> None:
    """One flag per EnergyParams field (--loss-weight, ..., --preset); unset = the preset's default.
    ``amplitude_images``: also --amplitude-image PATH (repeatable), for maximize and caricature."""
    group = parser.add_argument_group("energy (SPEC.md; unset = the preset's default)")
    if amplitude_images:
        group.add_argument("--amplitude-image", dest="amplitude_images", action="append", default=None,
                           type=image_ref, metavar="PATH",
                           help="photograph (file or scikit-image photo name) whose amplitude spectrum the phase "
                           "parameterization imposes instead of the server's; repeatable, at most 16")  # fmt: skip
    for field in pb.EnergyParams.DESCRIPTOR.fields:
        if field.type == field.TYPE_MESSAGE:  # amplitude_images: the flag above, not a number
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.name in ENERGY_ENUMS:
            choices = list(ENERGY_ENUMS[field.name])
            group.add_argument(flag, choices=choices, default=None, help=_ENERGY_HELP[field.name])
        else:
            integral = field.type in (field.TYPE_INT32, field.TYPE_UINT32)
            kind = types.nonneg_int if integral else types.number
            group.add_argument(flag, type=kind, default=None, metavar="N" if integral else "X",
                               help=_ENERGY_HELP.get(field.name))  # fmt: skip


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--height", type=types.positive_int, default=None, help="output height (default: the model's)")
    parser.add_argument("--width", type=types.positive_int, default=None, help="output width (default: the model's)")
    parser.add_argument("--seed", type=types.nonneg_int, default=None, help="random seed (default 0)")
    parser.add_argument("--report-every", type=types.nonneg_int, default=None,
                        help="progress every N steps (default 10; 0: none)")  # fmt: skip
    parser.add_argument("--tensor", action="store_true", help="also save the float result as .npy")
    parser.add_argument("-o", "--out", default=None, help="output PNG (several results: PATH-<i>.png + contact sheet)")
    parser.add_argument("--timeout", type=types.positive_float, default=None, help="give up after this many seconds")


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """Maximize's targets: --channel and --neuron, checked as they are parsed."""
    parser.add_argument("--channel", action="append", type=types.channels, default=[], metavar="SPEC",
                        help="channel(s) or class: 3, 0-15 or 1,4,9 (repeatable)")  # fmt: skip
    parser.add_argument("--neuron", action="append", type=types.neuron, default=[], metavar="C,Y,X",
                        help="one neuron: channel,row,column (repeatable)")  # fmt: skip
    parser.add_argument("--channel-max", type=types.positive_float, default=None,
                        help="M_k of the paper's normalization (default: measured on reference photos)")  # fmt: skip


def add_remote_commands(subparsers: Any, skip: Iterable[str] = ()) -> None:
    """Register the server subcommands (all of ALL_COMMANDS except ``skip``)."""
    skip = set(skip)

    def command(name: str, help_text: str, description: str | None = None) -> argparse.ArgumentParser | None:
        if name in skip:
            return None
        p = subparsers.add_parser(name, help=help_text, description=description or help_text)
        add_server_argument(p)
        p.add_argument("--json", action="store_true", help="print machine-readable JSON")
        p.set_defaults(func=run_remote, command=name)
        return p

    if p := command("upload", "upload an ONNX model to the store",
                    "Upload an ONNX model: the server converts it, checks it against onnxruntime and "
                    "stores it. Uploading the same bytes again answers with the stored model."):  # fmt: skip
        p.add_argument("file", type=types.existing_file, help="the .onnx file")
        p.add_argument("--name", default=None, help="model name (default: the file name)")
        p.add_argument("--mean", type=types.floats, default=None, help="per-channel mean, e.g. 0.485,0.456,0.406")
        p.add_argument("--std", type=types.floats, default=None, help="per-channel std, e.g. 0.229,0.224,0.225")
        p.add_argument("--scale", type=types.positive_float, default=None,
                       help="pixel (0-255) → model multiplier (default 1/255)")  # fmt: skip
        p.add_argument("--channel-order", choices=["RGB", "BGR", "GRAY"], default=None,
                       help="colour order of the model's input (default: its metadata, else RGB)")  # fmt: skip
        p.add_argument("--size", type=input_size, default=None, metavar="HxW",
                       help="input size of a dynamic-size model, e.g. 48x320 (default: metadata, probed)")  # fmt: skip
        p.add_argument("--labels", type=types.existing_file, default=None,
                       help="text file with one class label per line")  # fmt: skip
        p.add_argument("--description", default="", help="free text shown by `models`")
    if p := command("models", "list the models in the store (bundled ones included)"):
        p.add_argument("--prefix", default="", help="only names starting with this")
    if p := command("taps", "list a model's taps (layers) with shapes, strides, receptive fields",
                    "List the tensors of a model that can be visualized. A tap is named by its ONNX value "
                    "name (the 'name' column of --json) or by the name of the node producing it (the first "
                    "column). Torch module paths of the converted graph (e.g. _blocks.9 for a block's "
                    "output) name taps too: --all lists them."):  # fmt: skip
        p.add_argument("model", type=model_ref, help=MODEL_HELP)
        p.add_argument("--all", action="store_true", help="also list the torch module paths that name a tap")
    if p := command("delete", "delete an uploaded model from the store"):
        p.add_argument("model", type=model_ref, help=MODEL_HELP)
    if p := command("share", "share one of your models with other tenants, or with everyone",
                    "Set who else may read and use one of your models (replaces the previous sharing). "
                    "Sharing is read-only: only the owner deletes or re-shares."):  # fmt: skip
        p.add_argument("model", type=model_ref, help=MODEL_HELP)
        p.add_argument("--with", dest="shared_with", type=types.tenants, default=[], metavar="TENANTS",
                       help="comma-separated tenants that may use it (default: nobody)")  # fmt: skip
        public = p.add_mutually_exclusive_group()
        public.add_argument("--public", dest="public", action="store_true", help="every tenant may use it")
        public.add_argument("--private", dest="public", action="store_false",
                            help="only the owner and --with tenants (the default)")  # fmt: skip
    command("info", "the server's version, device, limits, presets, operators and auth mode",
            "Describe the server (GetServerInfo): its version, the device it optimizes on, the limits that "
            "apply to you, the presets, parameterizations and optimizers, the ONNX operators it converts, "
            "and how callers authenticate.")  # fmt: skip
    if p := command("stats", "what the server has done with each model since it started",
                    "Per-model statistics of this server process (GetModelStatistics): visualization requests, "
                    "how many succeeded, steps, seconds and failures by status code."):  # fmt: skip
        p.add_argument("model", nargs="?", type=model_ref, default=None, help="one model (default: every model run)")
    for task, target_help in (("invert", "images to invert"), ("caricature", "start images")):
        if p := command(task, f"{task} images at a tap (positional form)"):
            p.add_argument("model", type=model_ref, help=MODEL_HELP)
            p.add_argument("tap", help="tap name or alias (see `taps`)")
            p.add_argument("images", nargs="+", type=image_ref, help=target_help)
            if task == "invert":
                p.add_argument("--mask-center", type=types.nonneg_int, default=0,
                               help="keep a central k×k window of features")  # fmt: skip
            add_run_arguments(p)
            add_energy_arguments(p, amplitude_images=task == "caricature")
    if p := command("maximize", "find images that excite channels/neurons of a tap (positional form)"):
        p.add_argument("model", type=model_ref, help=MODEL_HELP)
        p.add_argument("tap", help="tap name or alias (see `taps`)")
        add_target_arguments(p)
        add_run_arguments(p)
        add_energy_arguments(p, amplitude_images=True)


def maximize_targets(args: argparse.Namespace) -> list[Any]:
    """The parsed --channel and --neuron flags as client targets; UsageError when there are none."""
    targets: list[Any] = [c for group in getattr(args, "channel", None) or [] for c in group]
    targets += list(getattr(args, "neuron", None) or [])
    if not targets:
        raise UsageError("maximize needs a target: give --channel (e.g. 285 or 0-15) or --neuron c,y,x")
    return targets


def parse_channels(specs: Sequence[str]) -> list[int]:
    """'3', '0-15', '1,4,9' → channel indices (argparse.ArgumentTypeError for a bad one)."""
    return [c for spec in specs for c in types.channels(spec)]


def rpc_error(err: grpc.RpcError, address: str | None) -> int:
    """Print a gRPC error as one line; the exit status (2 when the server blames the arguments)."""
    code = err.code()
    if code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in (err.details() or "").lower():
        where = address or "the embedded server"
        print(f"error: no preimage server at {where} (start one with `preimage serve`, or unset --server "
              f"and ${SERVER_ENV} to run embedded)", file=sys.stderr)  # fmt: skip
        return 1
    message = " ".join((err.details() or "").split())
    print(f"error ({code.name}): {message}", file=sys.stderr)
    return EXIT_USAGE if code in USAGE_CODES else 1


def run_remote(args: argparse.Namespace) -> int:
    """Run ``args.command`` against the server the one rule picks; return the exit status."""
    from service.cli.resolve import server_address

    if args.command == "maximize":
        maximize_targets(args)  # before any server starts
    try:
        with connect(args.server, timeout=getattr(args, "timeout", None)) as (client, embedded):
            args.embedded = embedded
            if args.command in ("invert", "caricature"):
                args.images = [resolve_image(s) for s in args.images]
            return COMMANDS[args.command](client, args)
    except grpc.RpcError as err:
        return rpc_error(err, server_address(args.server))


def _print(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj, indent=1) if getattr(args, "json", False) else text)


def _upload(client: Any, args: argparse.Namespace) -> int:
    from service.rpc.messages import preprocessing

    floats = {k: getattr(args, k) for k in ("mean", "std") if getattr(args, k)}
    height, width = args.size or (None, None)
    pre = preprocessing(**floats, scale=args.scale, channel_order=args.channel_order, height=height, width=width)
    try:
        labels = Path(args.labels).read_text().splitlines() if args.labels else []
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--labels {args.labels}: cannot read it as text ({exc})") from exc
    bar = _bar(Path(args.file).stat().st_size, "upload", unit="B", disable=args.json)
    sent = [0]

    def on_chunk(done: int, total: int) -> None:
        bar.update(done - sent[0])
        sent[0] = done

    response = client.upload(
        args.file, name=args.name or Path(args.file).stem, preprocessing=pre, labels=labels,
        description=args.description, on_chunk=on_chunk,
    )  # fmt: skip
    bar.close()
    m = response.model
    verb = "already stored" if response.already_existed else "stored"
    text = f"{verb} {m.name}:{m.version} {m.id[:12]} ({m.tap_count} taps)"
    if response.note:
        text += f"\n{response.note}"
    _print(args, {**model_dict(m), "already_existed": response.already_existed, "note": response.note}, text)
    return 0


def _models(client: Any, args: argparse.Namespace) -> int:
    models = client.models(args.prefix)
    lines = [f"{m.id[:12]}  {f'{m.name}:{m.version}':<28} {m.size_bytes / 2**20:8.1f} MiB {m.tap_count:5d} taps"
             f"  {origin_text(m) or ('bundled' if m.bundled else '?'):<20}{'  latest' if m.latest else ''}"
             for m in models]  # fmt: skip
    _print(args, [model_dict(m) for m in models], "\n".join(lines) or "no models")
    return 0


def _taps(client: Any, args: argparse.Namespace) -> int:
    reply = client.taps(args.model, module_paths=args.all)
    rows = [
        {"name": t.name, "alias": t.alias, "op_type": t.op_type, "shape": list(t.shape), "stride": t.stride,
         "receptive_field": t.receptive_field, "global": t.is_global}
        for t in reply.taps
    ]  # fmt: skip
    lines = [
        f"{r['alias']:<40} {r['op_type']:<12} {str(r['shape']):<18} stride {r['stride']:<4} rf {r['receptive_field']}"
        for r in rows
    ]
    obj: dict[str, Any] = {"model": reply.model_id, "taps": rows}
    if args.all:
        alias = {t.name: t.alias for t in reply.taps}
        obj["module_paths"] = [{"path": m.path, "tap": m.tap} for m in reply.module_paths]
        lines.append(f"\n{len(reply.module_paths)} torch module paths (each names the tap of its output):")
        lines += [f"{m.path:<40} → {alias.get(m.tap, m.tap)}" for m in reply.module_paths]
    _print(args, obj, "\n".join(lines))
    return 0


def _delete(client: Any, args: argparse.Namespace) -> int:
    m = client.delete(args.model)
    _print(args, model_dict(m), f"deleted {m.name} {m.id[:12]}")
    return 0


def _share(client: Any, args: argparse.Namespace) -> int:
    m = client.share(args.model, shared_with=args.shared_with, public=args.public)
    who = "everyone" if m.public else (", ".join(m.shared_with) or "nobody else")
    _print(args, {**model_dict(m), "shared_with": list(m.shared_with), "public": m.public},
           f"{m.name} {m.id[:12]} is shared with {who}")  # fmt: skip
    return 0


def plain(message: Any) -> dict[str, Any]:
    """A message as JSON types, every field present, integers as numbers and enums by name (the
    proto3 JSON mapping writes 64-bit integers as strings, which scripts then have to convert)."""
    out: dict[str, Any] = {}
    for f in message.DESCRIPTOR.fields:
        value = getattr(message, f.name)
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            out[f.name] = dict(value)
        elif f.type == f.TYPE_MESSAGE:
            out[f.name] = [plain(v) for v in value] if f.is_repeated else plain(value)
        elif f.type == f.TYPE_ENUM:
            name = f.enum_type.values_by_number
            out[f.name] = [name[v].name for v in value] if f.is_repeated else name[value].name
        else:
            out[f.name] = list(value) if f.is_repeated else value
    return out


def _info(client: Any, args: argparse.Namespace) -> int:
    info = client.server_info()
    obj = plain(info)
    d, lim = info.device, info.limits
    text = "\n".join([
        f"preimage {info.version} ({info.api}) at {client.address}",
        f"device   {d.name}: {d.description}, {d.memory_bytes / 2**30:.1f} GiB",
        f"auth     {pb.AuthMode.Name(info.auth).removeprefix('AUTH_MODE_').lower()}"
        f"{', TLS' if info.tls else ''}{' (mutual)' if info.mutual_tls else ''}"
        f"{f', tenant {info.tenant}' if info.tenant else ''}",
        f"limits   {lim.max_steps} steps, {lim.max_pixels} pixels, {lim.max_targets} targets per request; "
        f"models up to {lim.max_model_bytes / 2**20:.0f} MiB; messages up to {lim.max_message_bytes >> 20} MiB "
        f"received, {lim.max_sent_message_bytes >> 20} MiB sent",
        f"presets  {', '.join(info.presets)}; parameterizations {', '.join(info.parameterizations)}; "
        f"optimizers {', '.join(info.optimizers)}",
        f"ops      {len(info.ops)} ONNX operators (--json lists them)",
    ])  # fmt: skip
    _print(args, obj, text)
    return 0


def _stats(client: Any, args: argparse.Namespace) -> int:
    reply = client.statistics(args.model or "")
    rows = [plain(m) for m in reply.models]
    lines = [
        f"{m.model_id[:12]}  {f'{m.name}:{m.version}':<28} {m.requests:6d} requests {m.succeeded:6d} ok "
        f"{m.steps:8d} steps {m.seconds:9.1f} s"
        + (f"  failed: {', '.join(f'{k} {v}' for k, v in sorted(m.failures.items()))}" if m.failures else "")
        for m in reply.models
    ]
    _print(args, {"models": rows, "uptime_seconds": reply.uptime_seconds},
           "\n".join(lines) or f"no jobs yet (up {reply.uptime_seconds:.0f} s)")  # fmt: skip
    return 0


def _energy_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    out = {f.name: getattr(args, f.name, None) for f in pb.EnergyParams.DESCRIPTOR.fields}
    for name in ("height", "width", "seed", "report_every"):
        out[name] = getattr(args, name, None)
    out["return_tensor"] = getattr(args, "tensor", False) or None
    out["report_stages"] = True  # shown on a terminal (conversion, statistics) before the bar starts
    if out.get("amplitude_images"):  # files stay paths, photo names become their pixels
        out["amplitude_images"] = [resolve_image(spec) for spec in out["amplitude_images"]]
    return {k: v for k, v in out.items() if v is not None}


def _visualize(client: Any, args: argparse.Namespace) -> int:
    # getattr: main.py's parsers do not define every optional flag defined here.
    as_json, save_tensor = getattr(args, "json", False), getattr(args, "tensor", False)
    kwargs = _energy_kwargs(args)
    model = client.get(args.model)
    if args.command == "maximize":
        targets = maximize_targets(args)
        channel_max = getattr(args, "channel_max", None)
        run = client.maximize(model.id, args.tap, targets, channel_max=channel_max, **kwargs)
    elif args.command == "invert":
        run = client.invert(model.id, args.tap, args.images, mask_center=getattr(args, "mask_center", 0) or 0, **kwargs)
    else:
        run = client.caricature(model.id, args.tap, args.images, **kwargs)
    bar = None
    for event in run:
        if isinstance(event, pb.ProgressEvent) and event.stage:  # the server's work before the first step
            if sys.stderr.isatty() and not as_json:  # for a person, like the bar; a log gets one line per error
                say(event.message)
        elif isinstance(event, pb.ProgressEvent) and event.target_index == 0:
            if bar is None:
                bar = _bar(event.total_steps, args.command, disable=as_json)
            bar.total = event.total_steps  # the last event's total is the steps actually run
            bar.update(event.step - bar.n)
            bar.set_postfix(energy=f"{event.terms.get('energy', float('nan')):.3g}")
    if bar is not None:
        bar.close()
    run.results.sort(key=lambda r: r.target_index)
    out = Path(getattr(args, "out", None) or f"{args.command}-{args.tap.replace('/', '_')}.png")
    report = write_results(out, run.results, run.summary, save_tensor=save_tensor)
    report = {**report, "model": model.name, "model_id": model.id, "tap": args.tap,
              "preprocessing": preprocessing_dict(model.preprocessing)}  # fmt: skip
    lines = []
    for r in report["results"]:
        error = r["feature_error"]
        lines.append(f"wrote {r['output']}" + (f"  feature error {error:.4f}" if error is not None else ""))
    text = "\n".join(lines)
    if len(run.results) > 1 and report["output"]:
        text += f"\nwrote {report['output']} (contact sheet)"
    _print(args, report, text)
    return 0


def write_results(
    out: Path,
    results: Sequence[pb.VisualizationResult],
    summary: pb.RunSummary | None,
    save_tensor: bool = False,
) -> dict[str, Any]:
    """Write PNGs (and .npy tensors) for ``results``; return the JSON report (local commands' shape)."""
    import numpy as np

    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in results:
        path = out if len(results) == 1 else out.with_name(f"{out.stem}-{r.target_index}{out.suffix or '.png'}")
        path.write_bytes(r.png)
        row: dict[str, Any] = {
            "output": str(path),
            "target": r.description,
            "terms": dict(r.terms),
            "feature_error": r.feature_error if r.HasField("feature_error") else None,
            "objective": r.objective_value,
            "tap_parity": r.tap_parity if r.HasField("tap_parity") else None,
            "steps": r.steps_run,
            "seed": r.resolved.seed,
        }
        if save_tensor and r.HasField("tensor"):
            npy = path.with_suffix(".npy")
            np.save(npy, np.frombuffer(r.tensor.data, dtype="<f4").reshape(tuple(r.tensor.shape)))
            row["tensor"] = str(npy)
        rows.append(row)
    report: dict[str, Any] = dict(rows[0]) if len(rows) == 1 else {"output": None}
    if len(rows) > 1 and summary is not None and summary.contact_sheet_png:
        out.write_bytes(summary.contact_sheet_png)
        report["output"] = str(out)
    report["results"] = rows
    if summary is not None:
        report.update(seconds=summary.seconds, device=summary.device)
    return report


def _bar(total: int, desc: str, unit: str = "step", disable: bool = False) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", file=sys.stderr,
                disable=disable or not sys.stderr.isatty(), leave=False)  # fmt: skip


COMMANDS = {
    "upload": _upload,
    "models": _models,
    "taps": _taps,
    "delete": _delete,
    "share": _share,
    "info": _info,
    "stats": _stats,
    "invert": _visualize,
    "maximize": _visualize,
    "caricature": _visualize,
}


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry with only the remote commands (python -m service.cli.remote ...)."""
    parser = CliParser(prog="preimage-remote", description="Talk to a preimage server.")
    add_remote_commands(parser.add_subparsers(dest="command", required=True))
    return run_cli(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
