from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from redge.runtime import errors
from redge.runtime.manifest import (
    FORMAT_NAMES,
    FORMATS,
    Architecture,
    FileEntry,
    Manifest,
    Profile,
    choose_manifest,
)
from redge.runtime.tensor import DATATYPE_NUMPY, TensorSpec

NAMES = st.from_regex(r"\A[a-z0-9][a-z0-9._-]{0,20}\Z")
SHA = st.from_regex(r"\A[0-9a-f]{64}\Z")


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    paths = draw(st.lists(NAMES.filter(lambda n: n != "manifest.json"), min_size=1, max_size=4, unique=True))
    files = tuple(FileEntry(p, draw(SHA), draw(st.integers(0, 2**40))) for p in paths)
    format_name = draw(st.sampled_from(FORMAT_NAMES))
    spec = st.builds(
        TensorSpec,
        name=NAMES,
        datatype=st.sampled_from(sorted(DATATYPE_NUMPY)),
        shape=st.lists(st.integers(1, 512) | st.just(-1), max_size=4).map(tuple),
    )
    architecture = draw(
        st.builds(
            Architecture,
            reference=st.sampled_from(["torchvision:resnet18", "redge.runtime.testing:mlp"]),
            kwargs=st.dictionaries(st.sampled_from(["hidden", "depth"]), st.integers(1, 9), max_size=2),
        )
    )
    return Manifest(
        name=draw(NAMES),
        version=draw(NAMES),
        format=format_name,
        files=files,
        size_bytes=sum(f.size_bytes for f in files),
        parameter_count=draw(st.integers(0, 10**10)),
        inputs=(draw(spec),),
        outputs=(draw(spec),),
        family=draw(NAMES),
        architecture=architecture,
        accuracy=draw(st.none() | st.floats(0, 100)),
        gflops=draw(st.none() | st.floats(0, 1000)),
        profiles=tuple(
            draw(st.lists(st.builds(Profile, device_kind=st.sampled_from(["cpu", "cuda"]),
                                    load_ms=st.floats(0, 1e5), latency_ms=st.floats(0, 1e4),
                                    memory_bytes=st.integers(0, 2**40)), max_size=2, unique_by=lambda p: p.device_kind))
        ),
    )


@settings(deadline=None, max_examples=100)
@given(manifests())
def test_manifest_round_trips_through_json(manifest: Manifest) -> None:
    assert Manifest.from_json(manifest.to_json()) == manifest


def valid() -> dict:
    return {
        "name": "resnet18", "version": "1-onnx", "format": "onnx", "family": "resnet",
        "files": [{"path": "model.onnx", "sha256": "a" * 64, "size_bytes": 10}],
        "size_bytes": 10, "parameter_count": 5,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}],
    }


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda m: m.update(name="../etc"), "name"),
        (lambda m: m.update(version=""), "version"),
        (lambda m: m["files"][0].update(path="../../passwd"), "files.path"),
        (lambda m: m["files"][0].update(path="manifest.json"), "files.path"),
        (lambda m: m["files"][0].update(sha256="xyz"), "files[model.onnx].sha256"),
        (lambda m: m.update(size_bytes=11), "size_bytes"),
        (lambda m: m["inputs"][0].update(datatype="FLOAT"), "tensor input.datatype"),
        (lambda m: m["inputs"][0].update(shape=[0, 3]), "tensor input.shape"),
        (lambda m: m.update(format="safetensors"), "architecture"),
        (lambda m: m.update(accuracy=120.0), "accuracy"),
        (lambda m: m.pop("family"), "family"),
        (lambda m: m.update(files=[]), "files"),
        (lambda m: m.update(schema=99), "schema"),
    ],
)
def test_invalid_manifests_name_the_field(change, field) -> None:
    value = valid()
    change(value)
    with pytest.raises(errors.ManifestInvalid) as caught:
        Manifest.from_dict(value)
    assert caught.value.field == field
    assert field in str(caught.value)


def test_unknown_format_lists_the_known_ones() -> None:
    value = valid()
    value["format"] = "caffe"
    with pytest.raises(errors.UnknownFormat, match="caffe.*safetensors"):
        Manifest.from_dict(value)


def test_not_json_is_a_manifest_error() -> None:
    with pytest.raises(errors.ManifestInvalid, match="not valid JSON"):
        Manifest.from_json(b"{nope")


def test_pt2_is_never_a_backup_format() -> None:
    assert not FORMATS["pt2"].backup_eligible
    assert all(FORMATS[f].backup_eligible for f in ("safetensors", "onnx", "torchscript"))


def test_choose_prefers_the_device_order_and_never_pt2() -> None:
    base = Manifest.from_dict(valid())

    def variant(format_name: str) -> Manifest:
        value = valid()
        value.update(format=format_name, version=f"1-{format_name}")
        value["architecture"] = {"reference": "torchvision:resnet18", "kwargs": {}}
        return Manifest.from_dict(value)

    stored = [variant("pt2"), variant("safetensors"), base, variant("torchscript")]
    assert choose_manifest(stored, "cpu", "serving").format == "onnx"
    assert choose_manifest(stored, "cpu", "cold_backup").format == "safetensors"
    assert choose_manifest([variant("pt2")], "cpu") is None


def test_with_profile_replaces_same_device_kind() -> None:
    manifest = Manifest.from_dict(valid())
    once = manifest.with_profile(Profile("cpu", 10.0, 2.0, 100))
    twice = once.with_profile(Profile("cpu", 12.0, 2.5, 100)).with_profile(Profile("cuda", 1.0, 0.2, 100))
    assert twice.profile("cpu").load_ms == 12.0
    assert len(twice.profiles) == 2


@pytest.mark.parametrize(
    "error",
    [
        errors.StoreOverBudget(10, 20, 25, 3, 17),
        errors.ArtifactCorrupt("m", "1", "model.onnx", "sha256 mismatch"),
        errors.LoadFailed("m", "1", "onnx", "deserialize", "boom"),
        errors.HostCrashed(-9, "killed"),
    ],
)
def test_errors_survive_pickling_with_their_fields(error: errors.RuntimeFailure) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.__dict__ == error.__dict__
