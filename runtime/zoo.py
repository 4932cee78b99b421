"""The model zoo: torchvision families exported as redge artifacts, with their metadata.

Heterogeneous replication needs families of variants whose accuracy, size and cost are
known: resnet152 ... resnet18, mobilenet_v3 large/small, efficientnet b4 ... b0. This
module writes them as artifacts in every supported format, one directory per artifact
(`<out>/<model>/<revision>-<format>/`), each with its manifest.

Edge nodes here cannot download from model hubs, so weights come from each
architecture's own initialisation (seeded), unless a weights file is given. Accuracy,
parameter count and GFLOPs come from torchvision's weight metadata, which ships inside
the torchvision package: the accuracy is that of the published weights, i.e. what the
variant achieves when deployed with them; load and inference times do not depend on
the weights' values.

CLI (wired by agent/cli.py): `redge zoo export --out DIR [--models ...] [--formats ...]`
calls `main(argv)`.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from redge.runtime.errors import BackendUnavailable
from redge.runtime.exporter import artifact_version, export_module
from redge.runtime.manifest import FORMAT_NAMES, Architecture, Manifest
from redge.runtime.tensor import TensorSpec

log = structlog.get_logger(__name__)

ZOO_MODELS: tuple[str, ...] = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
    "regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf",
)
# pt2 loads 20-40x slower than its read and tensorrt needs the target GPU: opt in.
ZOO_FORMATS_DEFAULT: tuple[str, ...] = ("safetensors", "onnx", "torchscript")
_FAMILY_PATTERNS = (
    (re.compile(r"^resnet\d+$"), "resnet"),
    (re.compile(r"^mobilenet_v3_"), "mobilenet_v3"),
    (re.compile(r"^efficientnet_b\d$"), "efficientnet"),
    (re.compile(r"^shufflenet_v2_"), "shufflenet_v2"),
    (re.compile(r"^regnet_y_"), "regnet_y"),
)


@dataclass(frozen=True)
class ZooProgress:
    model: str
    format: str
    index: int
    total: int
    seconds: float
    manifest: Manifest | None
    skipped_reason: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    accuracy: float | None
    gflops: float | None
    parameter_count: int | None
    input_size: int


def family_of(model: str) -> str:
    for pattern, family in _FAMILY_PATTERNS:
        if pattern.match(model):
            return family
    return model.rstrip("0123456789_").replace("_", "-") or model


def model_info(model: str) -> ModelInfo:
    """What torchvision's bundled metadata says about `model`'s default weights."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(model).DEFAULT
    meta = weights.meta
    metrics = meta.get("_metrics", {}).get("ImageNet-1K", {})
    crop = getattr(weights.transforms(), "crop_size", [224])
    return ModelInfo(
        name=model,
        family=family_of(model),
        accuracy=metrics.get("acc@1"),
        gflops=meta.get("_ops"),
        parameter_count=meta.get("num_params"),
        input_size=int(crop[0]),
    )


def build_model(model: str, weights_file: Path | None = None, seed: int = 0) -> Any:
    import torch
    import torchvision

    torch.manual_seed(seed)
    module = torchvision.models.get_model(model, weights=None)
    if weights_file is not None:
        if weights_file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights_file))
        else:
            state = torch.load(str(weights_file), map_location="cpu", weights_only=True)
        module.load_state_dict(state, strict=True)
    return module.eval()


def export(
    out_dir: Path | str,
    models: Iterable[str] = ZOO_MODELS,
    formats: Iterable[str] = ZOO_FORMATS_DEFAULT,
    progress: Callable[[ZooProgress], None] | None = None,
    *,
    revision: str = "1",
    weights: Mapping[str, Path] | None = None,
    skip_existing: bool = True,
) -> list[Manifest]:
    """Export each model in each format under `out_dir`; return the manifests written.

    A format this machine cannot produce (tensorrt without a GPU) is skipped and reported
    through `progress` with its reason; an artifact already exported is kept.
    """
    root = Path(out_dir)
    models = list(models)
    formats = list(formats)
    for format_name in formats:
        assert format_name in FORMAT_NAMES, f"unknown format {format_name!r}; known: {FORMAT_NAMES}"
    total = len(models) * len(formats)
    manifests: list[Manifest] = []
    index = 0
    for model in models:
        info = model_info(model)
        module = None
        for format_name in formats:
            index += 1
            directory = root / model / artifact_version(revision, format_name)
            started = time.perf_counter()
            if skip_existing and (directory / "manifest.json").is_file():
                manifest = Manifest.read(directory)
                manifests.append(manifest)
                if progress:
                    progress(ZooProgress(model, format_name, index, total, 0.0, manifest, "already exported"))
                continue
            if module is None:
                module = build_model(model, (weights or {}).get(model))
            try:
                manifest = export_module(
                    module, directory,
                    name=model, version=artifact_version(revision, format_name), format_name=format_name,
                    family=info.family,
                    inputs=(TensorSpec("input", "FP32", (-1, 3, info.input_size, info.input_size)),),
                    outputs=(TensorSpec("logits", "FP32", (-1, 1000)),),
                    architecture=Architecture(f"torchvision:{model}"),
                    accuracy=info.accuracy,
                    gflops=info.gflops,
                )
            except BackendUnavailable as unavailable:
                if progress:
                    progress(ZooProgress(model, format_name, index, total, 0.0, None, unavailable.reason))
                continue
            manifests.append(manifest)
            seconds = time.perf_counter() - started
            log.info("zoo_exported", model=model, format=format_name, size_bytes=manifest.size_bytes, seconds=round(seconds, 2))
            if progress:
                progress(ZooProgress(model, format_name, index, total, seconds, manifest))
    return manifests


def _parse_list(value: str) -> list[str]:
    return [item for item in re.split(r"[,\s]+", value) if item]


def main(argv: list[str] | None = None) -> int:
    """`redge zoo export --out DIR [--models a,b] [--formats x,y] [--revision R] [--weights M=FILE]`."""
    parser = argparse.ArgumentParser(prog="redge zoo export", description="Export torchvision models as redge artifacts.")
    parser.add_argument("--out", required=True, type=Path, help="directory to write <model>/<revision>-<format>/ into")
    parser.add_argument("--models", type=_parse_list, default=list(ZOO_MODELS), help=f"comma-separated; default: {','.join(ZOO_MODELS)}")
    parser.add_argument("--formats", type=_parse_list, default=list(ZOO_FORMATS_DEFAULT), help=f"comma-separated from {','.join(FORMAT_NAMES)}")
    parser.add_argument("--revision", default="1")
    parser.add_argument("--weights", action="append", default=[], metavar="MODEL=FILE", help="trained weights (.safetensors or .pth state dict)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads while exporting")
    parser.add_argument("--force", action="store_true", help="re-export artifacts that exist")
    arguments = parser.parse_args(argv)
    from torchvision.models import list_models

    known = set(list_models())
    unknown = [m for m in arguments.models if m not in known]
    bad_formats = [f for f in arguments.formats if f not in FORMAT_NAMES]
    if unknown or bad_formats:
        parser.error(f"unknown models {unknown} or formats {bad_formats}")
    weights = {}
    for item in arguments.weights:
        model, _, file = item.partition("=")
        weights[model] = Path(file)
    if arguments.threads:
        import torch

        torch.set_num_threads(arguments.threads)

    def report(step: ZooProgress) -> None:
        if step.manifest is None:
            print(f"[{step.index}/{step.total}] {step.model} {step.format}: skipped ({step.skipped_reason})", flush=True)
        else:
            size_mb = step.manifest.size_bytes / 1e6
            note = f" ({step.skipped_reason})" if step.skipped_reason else f" in {step.seconds:.1f} s"
            print(f"[{step.index}/{step.total}] {step.model} {step.format}: {size_mb:.1f} MB{note}", flush=True)

    manifests = export(
        arguments.out, arguments.models, arguments.formats, report,
        revision=arguments.revision, weights=weights, skip_existing=not arguments.force,
    )
    print(f"{len(manifests)} artifacts in {arguments.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
