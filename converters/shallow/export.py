"""The shallow representations as ONNX models, served exactly like uploaded models.

Each model maps one grey image ``N×1×H×W`` (dynamic N, H, W) to its feature map ``N×D×h×w``. The
input convention is written into ``metadata_props`` (keys read by ``converters.inputs``): grey levels
on the 0-255 scale minus 127.5, i.e. ``channel_order=GRAY, scale=1, mean=127.5, std=1``. Every one
of these representations depends only on differences of grey levels, so the offset changes no feature;
it only makes the energy's mean colour mid-grey. The representation's own parameters are stored as
JSON under ``preimage.shallow``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from converters.shallow.dsift import DenseSift
from converters.shallow.hog import HogDalalTriggs, HogUoctti

OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "features"
GREY_MEAN_255 = 127.5
# Bump when the graphs or the metadata change so cached exports are rebuilt.
_EXPORT_VERSION = "1"

_CLASSES: dict[str, type[torch.nn.Module]] = {
    "HogUoctti": HogUoctti,
    "HogDalalTriggs": HogDalalTriggs,
    "DenseSift": DenseSift,
}


@dataclass(frozen=True)
class ShallowSpec:
    """One shallow model: the torch class, its parameters, the reference it is tested against."""

    name: str
    cls: str
    params: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    reference: str = ""

    def build(self) -> torch.nn.Module:
        return _CLASSES[self.cls](**self.params).eval()


SHALLOW_MODELS: dict[str, ShallowSpec] = {
    spec.name: spec
    for spec in (
        ShallowSpec(
            "hog",
            "HogUoctti",
            {"cell_size": 8, "num_orientations": 9, "bilinear": False},
            "HOG UoCTTI (vl_hog), cell 8, 9 orientations, 27 dims, hard orientation assignment",
            "VLFeat 0.9.21 vl_hog, VlHogVariantUoctti (first 27 dims)",
        ),
        ShallowSpec(
            "hogb",
            "HogUoctti",
            {"cell_size": 8, "num_orientations": 9, "bilinear": True},
            "HOGb: HOG UoCTTI with bilinear orientation assignment, cell 8, 27 dims",
            "VLFeat 0.9.21 vl_hog, VlHogVariantUoctti, bilinear orientations (first 27 dims)",
        ),
        ShallowSpec(
            "hog_dalaltriggs",
            "HogDalalTriggs",
            {"cell_size": 8, "num_orientations": 9, "block_size": 2},
            "HOG Dalal-Triggs (skimage.feature.hog), cell 8, 2x2 blocks, 9 orientations, L2-Hys",
            "skimage.feature.hog(block_norm='L2-Hys'), feature_vector=False",
        ),
        ShallowSpec(
            "dsift",
            "DenseSift",
            {"bin_size": 8, "step": 4, "num_bins": 4, "num_orientations": 8, "window_size": 2.0},
            "dense SIFT (vl_dsift), 4x4 bins of 8 px, 8 orientations, step 4, Gaussian window",
            "VLFeat 0.9.21 vl_dsift_process, Gaussian window",
        ),
    )
}


def preprocessing_metadata() -> dict[str, str]:
    """The input convention in the metadata_props keys that converters.inputs reads."""
    return {
        "preimage.channel_order": "GRAY",
        "preimage.scale": "1",
        "preimage.mean": repr(GREY_MEAN_255),
        "preimage.std": "1",
    }


def export_onnx(name: str, path: str | Path, example_size: tuple[int, int] = (64, 64)) -> Path:
    """Write shallow model ``name`` (a key of SHALLOW_MODELS) to ``path`` as ONNX and return the path.

    The graph uses only standard ONNX ops (opset 17) that onnx2torch converts back. ``example_size``
    is only the tracing size; height and width stay dynamic.
    """
    spec = SHALLOW_MODELS[name]
    module = spec.build()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    example = torch.zeros(1, 1, *example_size)
    try:
        with warnings.catch_warnings():
            # cap()/floor() make scalar constants with torch.tensor; the tracer flags them needlessly.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # The legacy (TorchScript) exporter is chosen on purpose, as for the bundled model: it keeps
            # height and width dynamic with plain ops. Its deprecation and folding notes are noise here.
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1.*")
            warnings.filterwarnings("ignore", message="The feature will be removed.*")
            torch.onnx.export(
                module,
                (example,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={
                    INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
                    OUTPUT_NAME: {0: "batch", 2: "rows", 3: "cols"},
                },
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        proto = onnx.load(str(tmp))
        meta = dict(preprocessing_metadata())
        meta["preimage.shallow"] = json.dumps(
            {"name": spec.name, "class": spec.cls, "params": spec.params, "reference": spec.reference}
        )
        meta["preimage.description"] = spec.description
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.producer_name = "preimage"
        proto.doc_string = spec.description
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _digest(name: str) -> str:
    spec = SHALLOW_MODELS[name]
    text = json.dumps([_EXPORT_VERSION, torch.__version__, onnx.__version__, spec.cls, spec.params], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def export_all(directory: str | Path) -> dict[str, Path]:
    """Export every shallow model into ``directory`` (cached by parameters and versions)."""
    directory = Path(directory)
    paths = {}
    for name in SHALLOW_MODELS:
        path = directory / f"shallow-{name}-{_digest(name)}.onnx"
        if not path.exists():
            export_onnx(name, path)
        paths[name] = path
    return paths
