"""Shared fixtures: one small MLP family, exported once per session in every format."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from redge.runtime.manifest import Manifest
from redge.runtime.testing import write_family

torch.set_num_threads(1)

FORMATS = ("safetensors", "torchscript", "onnx", "pt2")


@pytest.fixture(scope="session")
def family_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Manifest]]:
    """A source directory `<dir>/<name>/<version>/` with the MLP family in every format."""
    root = tmp_path_factory.mktemp("family-source")
    manifests = write_family(root, formats=FORMATS, sizes={"mlp-medium": (64, 2), "mlp-small": (16, 1)})
    return root, manifests


@pytest.fixture(scope="session")
def tripwire_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Manifest]]:
    root = tmp_path_factory.mktemp("tripwire-source")
    manifests = write_family(root, formats=("safetensors",), sizes={"trip": (16, 1)}, tripwire=True)
    return root, manifests


@pytest.fixture
def copy_artifact(tmp_path: Path):
    """Copy one artifact of a source directory somewhere the test may damage it."""

    def copy(source: Path, manifest: Manifest) -> Path:
        target = tmp_path / "copies" / manifest.name / manifest.version
        shutil.copytree(source / manifest.name / manifest.version, target)
        return target

    return copy
