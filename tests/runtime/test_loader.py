from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from redge.runtime import errors
from redge.runtime.loader import LoadOptions, load
from redge.runtime.manifest import Architecture, Manifest
from redge.runtime.testing import RAISE_ABOVE, write_artifact

FORMATS = ("safetensors", "torchscript", "onnx", "pt2")

INPUT = {"input": np.linspace(-1, 1, 3 * 16, dtype=np.float32).reshape(3, 16)}


def by_format(manifests: list[Manifest], name: str) -> dict[str, Manifest]:
    return {m.format: m for m in manifests if m.name == name}


def test_every_format_loads_and_agrees(family_source) -> None:
    source, manifests = family_source
    results = {}
    for format_name, manifest in by_format(manifests, "mlp-medium").items():
        model, report = load(source / manifest.name / manifest.version, manifest)
        output = model.infer(INPUT)
        assert set(output) == {"output"} and output["output"].shape == (3, 4)
        results[format_name] = output["output"]
        assert report.format == format_name
        if report.read_overlaps_deserialize:
            assert report.total_ms >= max(report.read_ms, report.deserialize_ms) + report.warmup_ms - 1e-6
        else:
            assert report.total_ms >= report.read_ms + report.deserialize_ms + report.warmup_ms - 1e-6
        assert report.bytes_read == manifest.size_bytes
    assert set(results) == set(FORMATS)
    for format_name, output in results.items():
        np.testing.assert_allclose(output, results["safetensors"], rtol=1e-4, atol=1e-5, err_msg=format_name)


@pytest.mark.parametrize("format_name", ["safetensors", "torchscript", "onnx"])
def test_truncated_file_is_refused_before_loading(copy_artifact, family_source, format_name: str) -> None:
    source, manifests = family_source
    manifest = by_format(manifests, "mlp-small")[format_name]
    directory = copy_artifact(source, manifest)
    path = directory / manifest.files[0].path
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(errors.ArtifactCorrupt, match="size"):
        load(directory, manifest)


@pytest.mark.parametrize("format_name", ["safetensors", "torchscript", "onnx"])
def test_flipped_byte_fails_sha256_or_deserialization(copy_artifact, family_source, format_name: str) -> None:
    source, manifests = family_source
    manifest = by_format(manifests, "mlp-small")[format_name]
    directory = copy_artifact(source, manifest)
    path = directory / manifest.files[0].path
    data = bytearray(path.read_bytes())
    data[: 64] = b"\xff" * 64  # headers destroyed
    path.write_bytes(bytes(data))
    with pytest.raises(errors.ArtifactCorrupt, match="sha256"):
        load(directory, manifest, options=LoadOptions(verify="sha256"))
    with pytest.raises(errors.LoadFailed) as caught:
        load(directory, manifest, options=LoadOptions(verify="size"))
    assert caught.value.phase in ("read", "deserialize")


def test_unknown_format_is_typed(family_source) -> None:
    source, manifests = family_source
    manifest = by_format(manifests, "mlp-small")["onnx"]
    object.__setattr__(bogus := replace(manifest), "format", "caffe")
    with pytest.raises(errors.UnknownFormat, match="caffe"):
        load(source / manifest.name / manifest.version, bogus)


def test_tensorrt_without_torch_tensorrt_is_unavailable(family_source) -> None:
    source, manifests = family_source
    manifest = replace(by_format(manifests, "mlp-small")["torchscript"], format="tensorrt")
    with pytest.raises(errors.BackendUnavailable, match="tensorrt"):
        load(source / manifest.name / manifest.version, manifest)


def test_cuda_without_a_gpu_is_unavailable(family_source) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    source, manifests = family_source
    manifest = by_format(manifests, "mlp-small")["safetensors"]
    with pytest.raises(errors.BackendUnavailable, match="CUDA"):
        load(source / manifest.name / manifest.version, manifest, device="cuda")


def test_architecture_that_raises_gives_load_failed(tmp_path: Path) -> None:
    from redge.runtime.testing import mlp

    manifest = write_artifact(
        mlp(), tmp_path, name="broken", version="1", architecture=Architecture("redge.runtime.testing:init_raises")
    )
    with pytest.raises(errors.LoadFailed) as caught:
        load(tmp_path / "broken" / "1", manifest)
    assert caught.value.phase == "deserialize"
    assert "cannot be built" in str(caught.value)


def test_untrusted_architecture_module_is_refused(tmp_path: Path, family_source) -> None:
    source, manifests = family_source
    manifest = by_format(manifests, "mlp-small")["safetensors"]
    evil = replace(manifest, architecture=Architecture("os:system", {"command": "true"}))
    with pytest.raises(errors.LoadFailed, match="not trusted"):
        load(source / manifest.name / manifest.version, evil)


def test_weights_of_another_architecture_give_load_failed(family_source) -> None:
    source, manifests = family_source
    manifest = by_format(manifests, "mlp-small")["safetensors"]
    wrong = replace(manifest, architecture=Architecture("redge.runtime.testing:mlp", {"hidden": 99, "depth": 1}))
    with pytest.raises(errors.LoadFailed, match="size mismatch"):
        load(source / manifest.name / manifest.version, wrong)


def test_forward_that_raises_fails_inference_and_warmup(tripwire_source) -> None:
    source, manifests = tripwire_source
    manifest = manifests[0]
    model, _ = load(source / manifest.name / manifest.version, manifest)
    assert model.infer({"input": np.zeros((1, 16), np.float32)})["output"].shape == (1, 4)
    with pytest.raises(errors.InferenceFailed, match="tripwire"):
        model.infer({"input": np.full((1, 16), RAISE_ABOVE * 10, np.float32)})


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "missing"),
        ({"input": np.zeros((1, 16), np.float64)}, "datatype FP64, expected FP32"),
        ({"input": np.zeros((1, 15), np.float32)}, "shape"),
        ({"input": np.zeros((16,), np.float32)}, "shape"),
        ({"input": np.zeros((1, 16), np.float32), "extra": np.zeros(1)}, "unexpected"),
        ({"input": [[0.0] * 16]}, "numpy array"),
    ],
)
def test_invalid_inputs_are_refused_before_the_model(family_source, inputs, message) -> None:
    source, manifests = family_source
    manifest = by_format(manifests, "mlp-small")["onnx"]
    model, _ = load(source / manifest.name / manifest.version, manifest)
    with pytest.raises(errors.InvalidInput, match=message):
        model.infer(inputs)


def test_input_size_limit(family_source) -> None:
    source, manifests = family_source
    manifest = by_format(manifests, "mlp-small")["onnx"]
    model, _ = load(source / manifest.name / manifest.version, manifest, options=LoadOptions(input_bytes_max=1024))
    with pytest.raises(errors.InvalidInput, match="exceed 1024 bytes"):
        model.infer({"input": np.zeros((100, 16), np.float32)})


def test_measure_profile_fills_a_manifest_profile(family_source) -> None:
    from redge.runtime.loader import measure_profile

    source, manifests = family_source
    manifest = by_format(manifests, "mlp-small")["safetensors"]
    profile, report = measure_profile(source / manifest.name / manifest.version, manifest, iterations=3)
    assert profile.device_kind == "cpu" and profile.latency_ms > 0
    assert profile.load_ms == pytest.approx(report.total_ms, abs=0.01)
    assert profile.memory_bytes == 4 * manifest.parameter_count
    assert manifest.with_profile(profile).profile("cpu") == profile
