"""Small artifacts for tests, here and in other parts of redge.

Real models take seconds to export and load; tests need a family of variants (big to
small, like resnet152 ... resnet18) in milliseconds. `write_family` writes MLPs of three
sizes into a store or a source directory. `TripwireMLP` behaves like an MLP on normal
inputs and fails on demand, so a test can make a loaded model raise, hang for a while or
kill its host process without any mocking:

- any input value above `RAISE_ABOVE` -> forward raises RuntimeError;
- first value in [SLOW_FROM, RAISE_ABOVE] -> forward sleeps (value - SLOW_FROM) ms;
- any input value below `EXIT_BELOW` -> the process exits at once (a host crash).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from redge.runtime.exporter import artifact_version, export_module
from redge.runtime.manifest import Architecture, Manifest
from redge.runtime.store import Store
from redge.runtime.tensor import TensorSpec

IN_FEATURES = 16
OUT_FEATURES = 4
# name -> (hidden width, hidden layers), largest first like a real family.
MLP_SIZES: dict[str, tuple[int, int]] = {
    "mlp-large": (256, 4),
    "mlp-medium": (128, 3),
    "mlp-small": (32, 2),
}
RAISE_ABOVE = 1e6
SLOW_FROM = 1e3
EXIT_BELOW = -1e6
EXIT_CODE = 17

MLP_INPUTS = (TensorSpec("input", "FP32", (-1, IN_FEATURES)),)
MLP_OUTPUTS = (TensorSpec("output", "FP32", (-1, OUT_FEATURES)),)


def mlp(in_features: int = IN_FEATURES, hidden: int = 32, depth: int = 2, out_features: int = OUT_FEATURES) -> Any:
    import torch

    layers: list[Any] = []
    width = in_features
    for _ in range(depth):
        layers += [torch.nn.Linear(width, hidden), torch.nn.ReLU()]
        width = hidden
    layers.append(torch.nn.Linear(width, out_features))
    return torch.nn.Sequential(*layers)


def _tripwire_class() -> type:
    import torch

    class TripwireMLP(torch.nn.Module):
        def __init__(self, in_features: int = IN_FEATURES, hidden: int = 32, depth: int = 2, out_features: int = OUT_FEATURES) -> None:
            super().__init__()
            self.body = mlp(in_features, hidden, depth, out_features)

        def forward(self, x: Any) -> Any:
            if bool((x < EXIT_BELOW).any()):
                os._exit(EXIT_CODE)
            if bool((x > RAISE_ABOVE).any()):
                raise RuntimeError("tripwire: input above RAISE_ABOVE")
            first = float(x.reshape(-1)[0])
            if first >= SLOW_FROM:
                time.sleep((first - SLOW_FROM) / 1000)
            return self.body(x)

    return TripwireMLP


def tripwire_mlp(**kwargs: Any) -> Any:
    return _tripwire_class()(**kwargs)


def slow_building_mlp(build_ms: float = 1000.0, **kwargs: Any) -> Any:
    """An MLP whose architecture takes `build_ms` to build, as a large model's Python build
    does: a load of it lasts that long, so tests can act while a replica is loading."""
    time.sleep(build_ms / 1000)
    return mlp(**kwargs)


def init_raises(**kwargs: Any) -> Any:
    """An architecture whose constructor fails: loading it must give LoadFailed."""
    raise RuntimeError("init_raises: this architecture cannot be built")


def write_artifact(
    module: Any,
    destination: Store | Path,
    *,
    name: str,
    version: str,
    format_name: str = "safetensors",
    family: str = "mlp",
    architecture: Architecture | None = None,
    inputs: tuple[TensorSpec, ...] = MLP_INPUTS,
    outputs: tuple[TensorSpec, ...] = MLP_OUTPUTS,
    accuracy: float | None = None,
) -> Manifest:
    """Export `module` into a store (verified, atomically) or into `<dir>/<name>/<version>/`."""
    kwargs: dict[str, Any] = {
        "name": name, "version": version, "format_name": format_name, "family": family,
        "inputs": inputs, "outputs": outputs, "architecture": architecture, "accuracy": accuracy,
    }
    if isinstance(destination, Store):
        with tempfile.TemporaryDirectory(prefix="redge-export-") as scratch:
            export_module(module, Path(scratch) / "artifact", **kwargs)
            return destination.add_directory(Path(scratch) / "artifact")
    return export_module(module, Path(destination) / name / version, **kwargs)


def write_family(
    destination: Store | Path,
    formats: Iterable[str] = ("safetensors",),
    revision: str = "1",
    sizes: dict[str, tuple[int, int]] | None = None,
    family: str = "mlp",
    seed: int = 0,
    tripwire: bool = False,
) -> list[Manifest]:
    """Write MLP variants, largest first, in each format; versions are `<revision>-<format>`.

    With `tripwire=True` the safetensors artifacts are `TripwireMLP`s (see module doc).
    """
    import torch

    manifests = []
    for index, (name, (hidden, depth)) in enumerate((sizes or MLP_SIZES).items()):
        torch.manual_seed(seed + index)
        builder = "tripwire_mlp" if tripwire else "mlp"
        kwargs = {"in_features": IN_FEATURES, "hidden": hidden, "depth": depth, "out_features": OUT_FEATURES}
        module = tripwire_mlp(**kwargs) if tripwire else mlp(**kwargs)
        accuracy = round(60.0 + 10.0 * (len(MLP_SIZES) - index), 1)
        for format_name in formats:
            manifests.append(
                write_artifact(
                    module, destination, name=name, version=artifact_version(revision, format_name),
                    format_name=format_name, family=family, accuracy=accuracy,
                    architecture=Architecture(f"redge.runtime.testing:{builder}", kwargs),
                )
            )
    return manifests
