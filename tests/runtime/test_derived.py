"""What a node derives to load faster: ONNX graphs optimised once for its CPU, loaded
with optimisation off; and backends prepared before the first load."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from redge.runtime.host import HostOptions, ModelHost
from redge.runtime.loader import (
    PREPARATIONS,
    LoadOptions,
    derive_onnx,
    derived_onnx_path,
    load,
    preparations_for,
    prepare_backends,
)
from redge.runtime.manifest import Architecture, Manifest
from redge.runtime.store import Store

INPUT = {"input": np.linspace(-1, 1, 5 * 16, dtype=np.float32).reshape(5, 16)}


def onnx_artifact(family_source: tuple[Path, list[Manifest]], name: str = "mlp-medium") -> tuple[Path, Manifest]:
    source, manifests = family_source
    manifest = next(m for m in manifests if m.name == name and m.format == "onnx")
    return source / manifest.name / manifest.version, manifest


def test_a_derived_graph_loads_unoptimised_and_answers_the_same(family_source, tmp_path: Path) -> None:
    directory, manifest = onnx_artifact(family_source)
    options = LoadOptions(threads=1, derived_dir=str(tmp_path / "derived"))
    first, first_report = load(directory, manifest, options=options)
    assert (first_report.derived, first_report.derivable) == (False, True)
    path = derive_onnx(directory, manifest, options=options)
    assert path == derived_onnx_path(options.derived_dir, manifest)
    assert sorted(p.name for p in path.iterdir()) == ["model.onnx", "weights.bin"]  # weights apart: mapped at load
    assert manifest.files[0].sha256 in path.name
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".partial")]
    second, second_report = load(directory, manifest, options=options)
    assert (second_report.derived, second_report.derivable) == (True, False)
    np.testing.assert_allclose(second.infer(INPUT)["output"], first.infer(INPUT)["output"], rtol=1e-5, atol=1e-6)
    assert derive_onnx(directory, manifest, options=options) == path  # once is enough


def test_without_a_derived_dir_nothing_is_derived(family_source) -> None:
    directory, manifest = onnx_artifact(family_source)
    _, report = load(directory, manifest, options=LoadOptions(threads=1))
    assert (report.derived, report.derivable) == (False, False)
    assert derive_onnx(directory, manifest, options=LoadOptions()) is None


@pytest.mark.parametrize("damage", [b"", b"not an onnx graph", b"\x08\x07" * 100])
def test_a_damaged_derived_graph_is_dropped_and_the_artifact_loads(family_source, tmp_path: Path, damage: bytes) -> None:
    directory, manifest = onnx_artifact(family_source)
    options = LoadOptions(threads=1, derived_dir=str(tmp_path / "derived"))
    path = derived_onnx_path(options.derived_dir, manifest)
    path.mkdir(parents=True)
    (path / "model.onnx").write_bytes(damage)
    model, report = load(directory, manifest, options=options)
    assert not report.derived and report.derivable
    assert not path.exists()
    assert model.infer(INPUT)["output"].shape == (5, 4)


def test_removing_an_artifact_removes_what_was_derived_from_it(family_source, tmp_path: Path) -> None:
    source, manifests = family_source
    store = Store(tmp_path / "store", 1 << 30)
    kept = next(m for m in manifests if m.name == "mlp-small" and m.format == "onnx")
    for manifest in (onnx_artifact(family_source)[1], kept):
        store.add_directory(source / manifest.name / manifest.version)
        derive_onnx(store.path(manifest.name, manifest.version), manifest,
                    options=LoadOptions(derived_dir=str(store.derived_dir)))
    medium = onnx_artifact(family_source)[1]
    assert store.remove(medium.name, medium.version)
    remaining = sorted(p.name.split("-", 1)[0] for p in store.derived_dir.iterdir())
    assert remaining == [kept.files[0].sha256]
    assert [m.key for m in store.list()] == [kept.key]  # the derived directory is not an artifact


@pytest.mark.parametrize(
    ("formats", "expected"),
    [
        ([], ()),
        ([("onnx", None)], ("onnxruntime",)),
        ([("safetensors", "redge.runtime.testing:mlp")], ("meta_build",)),
        ([("safetensors", "torchvision:resnet18")], ("torchvision", "meta_build")),
        ([("torchscript", None), ("safetensors", "torchvision:resnet18"), ("onnx", None)], PREPARATIONS),
    ],
)
def test_preparations_follow_what_the_node_may_load(family_source, formats, expected) -> None:
    base = onnx_artifact(family_source)[1]
    manifests = [
        replace(base, format=format_name, architecture=Architecture(reference) if reference else None)
        for format_name, reference in formats
    ]
    assert preparations_for(manifests) == expected


def test_prepare_backends_times_only_the_steps_asked_for() -> None:
    timings = prepare_backends("cpu", ("onnxruntime", "meta_build"))
    assert set(timings) == {"onnxruntime", "meta_build"}
    assert all(ms >= 0 for ms in timings.values())


def test_the_host_derives_after_a_load_without_delaying_it(family_source, tmp_path: Path) -> None:
    directory, manifest = onnx_artifact(family_source)

    async def scenario() -> tuple[bool, bool, bool]:
        host = ModelHost(HostOptions(threads=1, derived_dir=str(tmp_path / "derived"), prepare=("onnxruntime",)))
        await host.start()
        try:
            first = await host.load("a", directory, manifest, role="serving")
            await host.derived(timeout_s=60)
            second = await host.load("b", directory, manifest, role="serving")
            outputs = await host.infer("b", INPUT)
            return first.derived, second.derived, outputs["output"].shape == (5, 4)
        finally:
            await host.aclose()

    assert asyncio.run(scenario()) == (False, True, True)


def test_derived_weights_cut_short_are_dropped_and_the_artifact_loads(family_source, tmp_path: Path) -> None:
    directory, manifest = onnx_artifact(family_source)
    options = LoadOptions(threads=1, derived_dir=str(tmp_path / "derived"))
    path = derive_onnx(directory, manifest, options=options)
    weights = path / "weights.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    model, report = load(directory, manifest, options=options)
    assert not report.derived and not path.exists()
    assert model.infer(INPUT)["output"].shape == (5, 4)
