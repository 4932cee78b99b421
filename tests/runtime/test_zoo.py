from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from redge.runtime.loader import load
from redge.runtime.manifest import Manifest
from redge.runtime.store import Store
from redge.runtime.zoo import family_of, main, model_info


@pytest.mark.parametrize(
    ("model", "family"),
    [
        ("resnet152", "resnet"),
        ("resnet18", "resnet"),
        ("mobilenet_v3_small", "mobilenet_v3"),
        ("efficientnet_b4", "efficientnet"),
        ("shufflenet_v2_x1_0", "shufflenet_v2"),
        ("regnet_y_400mf", "regnet_y"),
        ("alexnet", "alexnet"),
    ],
)
def test_family_names(model: str, family: str) -> None:
    assert family_of(model) == family


def test_metadata_comes_from_torchvision_without_download() -> None:
    info = model_info("efficientnet_b4")
    assert info.input_size == 380
    assert 80 < info.accuracy < 90
    assert info.parameter_count == 19341616
    assert model_info("resnet18").gflops == pytest.approx(1.814)


def test_main_exports_an_artifact_the_store_and_loader_accept(tmp_path: Path, capsys) -> None:
    assert main(["--out", str(tmp_path / "zoo"), "--models", "mobilenet_v3_small", "--formats", "safetensors,tensorrt", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "tensorrt: skipped" in printed
    directory = tmp_path / "zoo" / "mobilenet_v3_small" / "1-safetensors"
    manifest = Manifest.read(directory)
    assert manifest.parameter_count == model_info("mobilenet_v3_small").parameter_count
    assert manifest.accuracy == pytest.approx(67.668)
    assert manifest.inputs[0].shape == (-1, 3, 224, 224)
    store = Store(tmp_path / "store", budget_bytes=10**9)
    store.add_directory(directory)
    model, report = load(store.path(*manifest.key), manifest)
    output = model.infer({"input": np.zeros((1, 3, 224, 224), np.float32)})
    assert output["logits"].shape == (1, 1000)
    assert report.deserialize_ms > 0


def test_main_refuses_unknown_models(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--models", "resnet9000"])
