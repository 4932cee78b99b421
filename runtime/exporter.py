"""Writing a torch module as an artifact in one format, with its manifest.

The zoo (torchvision models) and the test families (small MLPs) both go through
`export_module`, so every artifact redge ever loads was written the same way: one main
file first in the manifest, tensor specs with a dynamic batch dimension, hashes and
sizes computed from what actually landed on disk.

ONNX is written with the TorchScript-based exporter when it works: it takes 0.15 s for
a small model where the torch.export-based one takes 5 s, and it writes one
self-contained file that ONNX Runtime can open from memory.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

from redge.runtime.errors import BackendUnavailable
from redge.runtime.manifest import Architecture, Manifest, check_format, describe_files
from redge.runtime.tensor import TensorSpec

MAIN_FILENAMES = {
    "safetensors": "model.safetensors",
    "torchscript": "model.ts",
    "onnx": "model.onnx",
    "pt2": "model.pt2",
    "tensorrt": "model.trt.ts",
}
ONNX_OPSET = 18
# torch.export specialises a dimension traced at size 1, so examples use a batch of 2.
EXAMPLE_BATCH_SIZE = 2


def export_module(
    module: Any,
    artifact_dir: Path | str,
    *,
    name: str,
    version: str,
    format_name: str,
    family: str,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
    architecture: Architecture | None = None,
    accuracy: float | None = None,
    gflops: float | None = None,
) -> Manifest:
    """Write `module` into `artifact_dir` (created, emptied) in `format_name`; return its manifest."""
    import torch

    check_format(format_name)
    directory = Path(artifact_dir)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    module = module.eval()
    examples = tuple(torch.from_numpy(spec.example(EXAMPLE_BATCH_SIZE)) for spec in inputs)
    main = directory / MAIN_FILENAMES[format_name]
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # torch.jit.trace/save warn that TorchScript is deprecated; it is still the
        # fastest self-contained format to load, and one we measure.
        warnings.simplefilter("ignore", FutureWarning)
        if format_name == "safetensors":
            _write_safetensors(module, main)
        elif format_name == "torchscript":
            traced = torch.jit.trace(module, examples, check_trace=False)
            torch.jit.save(traced, str(main))
        elif format_name == "onnx":
            _write_onnx(module, examples, inputs, outputs, main)
        elif format_name == "pt2":
            batch = torch.export.Dim("batch", min=1, max=1024)
            dynamic = tuple({0: batch} if spec.shape and spec.shape[0] == -1 else {} for spec in inputs)
            program = torch.export.export(module, examples, dynamic_shapes=dynamic)
            torch.export.save(program, str(main))
        elif format_name == "tensorrt":
            raise BackendUnavailable(
                "tensorrt", "cpu", "engines are built ahead of time on the target GPU with torch_tensorrt; not exported here"
            )
    files = describe_files(directory)
    # The backend opens the first file: put the main file first.
    files = tuple(sorted(files, key=lambda entry: entry.path != main.name))
    parameter_count = sum(parameter.numel() for parameter in module.parameters())
    manifest = Manifest(
        name=name,
        version=version,
        format=format_name,
        files=files,
        size_bytes=sum(entry.size_bytes for entry in files),
        parameter_count=parameter_count,
        inputs=inputs,
        outputs=outputs,
        family=family,
        architecture=architecture,
        accuracy=accuracy,
        gflops=gflops,
    )
    manifest.write(directory)
    return manifest


def _write_safetensors(module: Any, path: Path) -> None:
    from safetensors.torch import save_file

    state = {key: value.detach().contiguous() for key, value in module.state_dict().items()}
    save_file(state, str(path))


def _write_onnx(module: Any, examples: tuple[Any, ...], inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], path: Path) -> None:
    import torch

    input_names = [spec.name for spec in inputs]
    output_names = [spec.name for spec in outputs]
    dynamic_axes = {
        spec.name: {0: "batch"} for spec in inputs + outputs if spec.shape and spec.shape[0] == -1
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, examples, str(path), input_names=input_names, output_names=output_names,
                dynamic_axes=dynamic_axes, opset_version=ONNX_OPSET, dynamo=False,
            )
        return
    except Exception:  # noqa: BLE001 - the legacy exporter is deprecated and may be gone: use the new one
        for leftover in path.parent.iterdir():
            leftover.unlink()
    import onnx

    batch = torch.export.Dim("batch", min=1, max=1024)
    dynamic = tuple({0: batch} if spec.shape and spec.shape[0] == -1 else {} for spec in inputs)
    torch.onnx.export(
        module, examples, str(path), input_names=input_names, output_names=output_names,
        dynamic_shapes=dynamic, dynamo=True, verbose=False,
    )
    # Fold external weights back in so the model is one file that loads from memory.
    model = onnx.load(str(path), load_external_data=True)
    for leftover in path.parent.iterdir():
        leftover.unlink()
    onnx.save(model, str(path), save_as_external_data=False)


def artifact_version(revision: str, format_name: str) -> str:
    """One model's artifacts differ by format: version `1-onnx`, `1-safetensors`, ..."""
    return f"{revision}-{format_name}"
