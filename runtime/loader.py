"""Loading artifacts into runnable models, one backend per format, with timed phases.

Loading time is one of the paper's recovery metrics, and its phases tell where a slow
recovery went, so every load returns a `LoadReport`: read (file bytes into memory),
deserialize (bytes into a module or session), to_device, warmup (one inference on zero
inputs so the first real request does not pay for lazy initialisation), and total.

The backends, and why each loads the way it does (measured on the project's CPU):

- safetensors: the architecture is built on the meta device (no memory, no random init)
  and the tensors are assigned into it (`load_state_dict(assign=True)`) straight from
  `safe_open`: no copy, no init, at or under the raw read time.
- torchscript: `torch.jit.load`, fast but it holds the GIL for the whole load, which is
  why loads run in the host process (`host.py`), never in the peer's own process.
- onnx: ONNX Runtime, the fastest CPU inference; `threads` sets its intra-op threads.
  Building a session spends half its time optimising the graph (fusions, the CPU's own
  weight layout) and the rest copying weights: with `derived_dir`, the optimised graph is
  saved once per node (`derive_onnx`, off the critical path) with its weights in a file of
  their own, and later loads take it with optimisation off and the weights mapped, not
  copied: resnet50's session in 14 ms instead of 120-160, for the same inference speed.
- tensorrt: only when `torch_tensorrt` imports and a GPU is present; engines are built
  ahead of time, never at load.
- pt2: `torch.export.load` works but is 10-190x slower than its read: accepted, never
  chosen as a backup format (see `manifest.FORMATS`).

Every expected failure is typed: `ArtifactCorrupt` (size or sha256), `UnknownFormat`,
`BackendUnavailable`, `LoadFailed` (with the phase), `InvalidInput`, `InferenceFailed`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import io
import os
import platform
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from redge.runtime.errors import (
    ArtifactCorrupt,
    ArtifactNotFound,
    BackendUnavailable,
    InferenceFailed,
    InvalidInput,
    LoadFailed,
    RuntimeFailure,
)
from redge.runtime.manifest import Architecture, Manifest, check_format
from redge.runtime.store import verify_directory, verify_stamped
from redge.runtime.tensor import INPUT_BYTES_MAX_DEFAULT, check_inputs

log = structlog.get_logger(__name__)

TRUSTED_MODULES_DEFAULT: tuple[str, ...] = ("torchvision", "redge.runtime")
VERIFY_MODES = ("none", "size", "sha256", "stamped")


@dataclass(frozen=True)
class LoadOptions:
    # Intra-op threads for ONNX Runtime sessions; torch's are process-wide (host sets them).
    threads: int | None = None
    warmup: bool = True
    # "size" catches truncation for free; "sha256" re-hashes every time; "stamped" hashes a
    # file only when it has no stamp in `stamps_dir` (from the store's own hash when it
    # stored it, or an earlier load) or its inode, size or mtime changed since.
    verify: str = "size"
    stamps_dir: str = ""
    # Architecture references (safetensors) may import only these module prefixes.
    trusted_modules: tuple[str, ...] = TRUSTED_MODULES_DEFAULT
    input_bytes_max: int = INPUT_BYTES_MAX_DEFAULT
    # Where this node keeps what it derives from artifacts to load them faster (ONNX
    # graphs optimised for its CPU); empty: nothing is derived or read from there.
    derived_dir: str = ""

    def __post_init__(self) -> None:
        assert self.verify in VERIFY_MODES, self.verify
        assert self.verify != "stamped" or self.stamps_dir, "verify='stamped' needs stamps_dir"
        assert self.threads is None or self.threads >= 1


@dataclass(frozen=True)
class LoadReport:
    name: str
    version: str
    format: str
    device: str
    bytes_read: int
    verify_ms: float
    read_ms: float
    deserialize_ms: float
    to_device_ms: float
    warmup_ms: float
    total_ms: float
    # safetensors reads the file while it builds the architecture: read and deserialize
    # then overlap, and total is less than the sum of the phases.
    read_overlaps_deserialize: bool = False
    # The session came from a graph this node optimised earlier (`derive_onnx`), not from
    # the artifact's own graph: what `derivable` says could be done after this load.
    derived: bool = False
    derivable: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Phases:
    milliseconds: dict[str, float] = field(default_factory=dict)
    current: str = "start"

    @contextmanager
    def measure(self, phase: str) -> Iterator[None]:
        self.current = phase
        started = time.perf_counter()
        try:
            yield
        finally:
            self.milliseconds[phase] = self.milliseconds.get(phase, 0.0) + (time.perf_counter() - started) * 1000


class LoadedModel:
    """A model ready to run: `infer` takes and returns dicts of numpy arrays by tensor name."""

    def __init__(self, manifest: Manifest, device: str, input_bytes_max: int) -> None:
        self.manifest = manifest
        self.device = device
        self.input_bytes_max = input_bytes_max

    @property
    def label(self) -> str:
        return f"{self.manifest.name}/{self.manifest.version}"

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = check_inputs(self.manifest.inputs, inputs, self.input_bytes_max)
        try:
            outputs = self._run(arrays)
        except RuntimeFailure:
            raise
        except Exception as error:  # the model's own code: anything can come out of forward()
            raise InferenceFailed(self.label, f"{type(error).__name__}: {error}") from error
        specs = self.manifest.outputs
        if len(outputs) != len(specs):
            raise InferenceFailed(self.label, f"model returned {len(outputs)} outputs, manifest names {len(specs)}")
        return {spec.name: output for spec, output in zip(specs, outputs, strict=True)}

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Drop the model's memory; the object must not be used afterwards."""


class TorchModel(LoadedModel):
    def __init__(self, manifest: Manifest, device: str, input_bytes_max: int, module: Any) -> None:
        super().__init__(manifest, device, input_bytes_max)
        self.module = module

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        with torch.inference_mode():
            tensors = [torch.from_numpy(array).to(self.device) for array in arrays]
            result = self.module(*tensors)
            if isinstance(result, torch.Tensor):
                flat = [result]
            elif isinstance(result, dict):
                flat = list(result.values())
            elif isinstance(result, list | tuple):
                flat = list(result)
            else:
                raise InferenceFailed(self.label, f"model returned {type(result).__name__}, not tensors")
            return [tensor.detach().to("cpu").numpy() for tensor in flat]

    def close(self) -> None:
        self.module = None


class OnnxModel(LoadedModel):
    def __init__(self, manifest: Manifest, device: str, input_bytes_max: int, session: Any, derived: bool = False) -> None:
        super().__init__(manifest, device, input_bytes_max)
        self.session = session
        self.derived = derived  # built from a graph this node optimised earlier (`derive_onnx`)
        self.input_names = [spec.name for spec in manifest.inputs]

    def _run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        feeds = dict(zip(self.input_names, arrays, strict=True))
        return list(self.session.run(None, feeds))

    def close(self) -> None:
        self.session = None


Backend = Callable[[Path, Manifest, str, LoadOptions, _Phases], LoadedModel]


def load(
    artifact_dir: Path | str,
    manifest: Manifest | None = None,
    device: str = "cpu",
    options: LoadOptions | None = None,
) -> tuple[LoadedModel, LoadReport]:
    """Load one artifact onto `device`; raise a typed error for anything expected."""
    directory = Path(artifact_dir)
    if not directory.is_dir():
        name, version = (manifest.name, manifest.version) if manifest else (directory.parent.name, directory.name)
        raise ArtifactNotFound(name, version, str(directory))
    if manifest is None:
        try:
            manifest = Manifest.read(directory)
        except FileNotFoundError:
            raise ArtifactNotFound(directory.parent.name, directory.name, str(directory)) from None
    options = options or LoadOptions()
    check_format(manifest.format)
    backend = BACKENDS[manifest.format]
    _check_device(manifest.format, device)
    phases = _Phases()
    started = time.perf_counter()
    if options.verify == "stamped":
        with phases.measure("verify"):
            verify_stamped(directory, manifest, Path(options.stamps_dir))
    elif options.verify != "none":
        with phases.measure("verify"):
            verify_directory(directory, manifest, hashes=options.verify == "sha256")
    try:
        model = backend(directory, manifest, device, options, phases)
    except RuntimeFailure:
        raise
    except Exception as error:
        raise LoadFailed(
            manifest.name, manifest.version, manifest.format, phases.current, f"{type(error).__name__}: {error}"
        ) from error
    if options.warmup:
        with phases.measure("warmup"):
            try:
                model.infer({spec.name: spec.example(1) for spec in manifest.inputs})
            except (InferenceFailed, InvalidInput) as error:
                raise LoadFailed(manifest.name, manifest.version, manifest.format, "warmup", str(error)) from error
    total_ms = (time.perf_counter() - started) * 1000
    derived = isinstance(model, OnnxModel) and model.derived
    ms = phases.milliseconds
    report = LoadReport(
        name=manifest.name,
        version=manifest.version,
        format=manifest.format,
        device=device,
        bytes_read=manifest.size_bytes,
        verify_ms=ms.get("verify", 0.0),
        read_ms=ms.get("read", 0.0),
        deserialize_ms=ms.get("deserialize", 0.0),
        to_device_ms=ms.get("to_device", 0.0),
        warmup_ms=ms.get("warmup", 0.0),
        total_ms=total_ms,
        read_overlaps_deserialize=manifest.format == "safetensors",
        derived=derived,
        derivable=not derived and can_derive(manifest, options),
    )
    return model, report


PREPARATIONS = ("torchvision", "meta_build", "onnxruntime")


def preparations_for(manifests: Iterable[Manifest]) -> tuple[str, ...]:
    """What `prepare_backends` should do for a node that may load these artifacts."""
    needed = set()
    for manifest in manifests:
        if manifest.format == "onnx":
            needed.add("onnxruntime")
        if manifest.format == "safetensors" and manifest.architecture is not None:
            needed.add("meta_build")
            if manifest.architecture.module_name == "torchvision":
                needed.add("torchvision")
    return tuple(name for name in PREPARATIONS if name in needed)


def prepare_backends(device: str = "cpu", steps: Iterable[str] = PREPARATIONS) -> dict[str, float]:
    """Pay once, before any load, what a backend costs the first time it is used:
    importing torchvision's model builders, building on the meta device, creating an ONNX
    Runtime session. Measured on 2 shared cores, the first safetensors load in a fresh host
    took 2.3 s, 2.2 s of it the torchvision import. Returns the milliseconds each step
    took; a backend that is not installed is skipped."""
    timings: dict[str, float] = {}
    wanted = set(steps)

    def step(name: str, action: Callable[[], Any]) -> None:
        if name not in wanted:
            return
        started = time.perf_counter()
        try:
            action()
        except ImportError:
            return
        timings[name] = round((time.perf_counter() - started) * 1000, 3)

    def meta_build() -> None:
        import torch

        with torch.device("meta"), _initialisation_skipped():
            torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2))

    def onnx_session() -> None:
        import onnxruntime

        onnxruntime.InferenceSession(_IDENTITY_ONNX, sess_options=_session_options(LoadOptions(threads=1), optimize=True),
                                     providers=_onnx_providers(device))

    step("torchvision", lambda: importlib.import_module("torchvision.models"))
    step("meta_build", meta_build)
    step("onnxruntime", onnx_session)
    return timings


# The smallest ONNX model there is (opset 13, Identity over a float [1] tensor), written out
# so that warming ONNX Runtime up needs neither the onnx package nor a file.
_IDENTITY_ONNX = bytes.fromhex(
    "08073a3b0a140a01781201791a02696422084964656e746974791201675a0f0a0178120a0a08080112040a0208"
    "01620f0a0179120a0a08080112040a02080142040a00100d"
)


def device_kind(device: str) -> str:
    """`cuda:1` -> `cuda`: the key of profiles and format preferences."""
    return device.split(":", 1)[0]


def _check_device(format_name: str, device: str) -> None:
    kind = device_kind(device)
    if kind not in ("cpu", "cuda"):
        raise BackendUnavailable(format_name, device, "devices are 'cpu' or 'cuda[:index]'")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailable(format_name, device, "torch sees no CUDA device")


def _main_file(directory: Path, manifest: Manifest) -> Path:
    # By convention the first file listed is the one the backend opens.
    return directory / manifest.files[0].path


def _read_bytes(path: Path, manifest: Manifest) -> bytes:
    data = path.read_bytes()
    if len(data) != manifest.files[0].size_bytes:
        raise ArtifactCorrupt(
            manifest.name, manifest.version, manifest.files[0].path,
            f"read {len(data)} bytes, manifest says {manifest.files[0].size_bytes}",
        )
    return data


def build_architecture(architecture: Architecture, trusted_modules: tuple[str, ...]) -> Any:
    """Call the architecture's builder; the caller decides the default device (meta)."""
    module_name = architecture.module_name
    if not any(module_name == prefix or module_name.startswith(prefix + ".") for prefix in trusted_modules):
        raise ValueError(
            f"architecture module {module_name!r} is not trusted; trusted prefixes: {', '.join(trusted_modules)}"
        )
    if module_name == "torchvision":
        import torchvision

        return torchvision.models.get_model(architecture.callable_name, weights=None, **architecture.kwargs)
    module = importlib.import_module(module_name)
    builder = getattr(module, architecture.callable_name)
    return builder(**architecture.kwargs)


_INIT_LOCK = threading.Lock()


@contextmanager
def _initialisation_skipped() -> Iterator[None]:
    """Make `torch.nn.init.*_` no-ops while an architecture is built on the meta device.

    The weights are assigned from the file right after, so initialising is wasted work,
    and on the meta device each init call still pays torch's function-mode dispatch:
    skipping it builds resnet152 in 90 ms instead of 790 ms on the project's CPU.
    Process-wide, so builds are serialised by a lock.
    """
    from torch.nn import init

    names = [name for name in dir(init) if name.endswith("_") and not name.startswith("_")]
    with _INIT_LOCK:
        saved = {name: getattr(init, name) for name in names}
        try:
            for name in names:
                setattr(init, name, _identity_init)
            yield
        finally:
            for name, function in saved.items():
                setattr(init, name, function)


def _identity_init(tensor: Any, *args: Any, **kwargs: Any) -> Any:
    return tensor


SAFETENSORS_HEADER_BYTES_MAX = 100 * 1024 * 1024
# One read call per 256 MiB: the GIL is released for the whole call, so the reading
# thread is not slowed by the architecture build that holds the GIL meanwhile.
READ_CHUNK_BYTES = 256 * 1024 * 1024


def _read_safetensors(path: Path, manifest: Manifest) -> dict[str, Any]:
    """Read the whole file in one sequential pass and view its tensors without copying.

    `safe_open` reads tensor by tensor and measured up to 1.6x the raw read time cold;
    one `readinto` into one buffer is the raw read, and the tensors are views into it
    (the format puts each tensor at an aligned offset after a JSON header).
    """
    import orjson
    import torch

    dtypes = {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
        "U8": torch.uint8, "BOOL": torch.bool,
    }
    size_bytes = manifest.files[0].size_bytes
    buffer = np.empty(size_bytes, dtype=np.uint8)
    view = memoryview(buffer)
    offset = 0
    with open(path, "rb", buffering=0) as handle:
        while offset < size_bytes:
            count = handle.readinto(view[offset : offset + READ_CHUNK_BYTES])
            if not count:
                raise ArtifactCorrupt(manifest.name, manifest.version, manifest.files[0].path, f"ends at byte {offset} of {size_bytes}")
            offset += count
    if size_bytes < 8:
        raise ValueError("file too short for a safetensors header")
    header_bytes = int.from_bytes(buffer[:8].tobytes(), "little")
    if header_bytes > min(SAFETENSORS_HEADER_BYTES_MAX, size_bytes - 8):
        raise ValueError(f"safetensors header length {header_bytes} is beyond the file")
    header = orjson.loads(buffer[8 : 8 + header_bytes].tobytes())
    if not isinstance(header, dict):
        raise TypeError("safetensors header is not a JSON object")
    data = torch.from_numpy(buffer)
    base = 8 + header_bytes
    state: dict[str, Any] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = dtypes.get(info.get("dtype")) if isinstance(info, dict) else None
        if dtype is None:
            raise ValueError(f"tensor {name!r}: unsupported or missing dtype")
        start, end = info["data_offsets"]
        shape = [int(dimension) for dimension in info["shape"]]
        if not 0 <= start <= end <= size_bytes - base:
            raise ValueError(f"tensor {name!r}: data offsets {start}..{end} are outside the file")
        piece = data[base + start : base + end]
        if end == start:
            state[name] = torch.empty(shape, dtype=dtype)
            continue
        try:
            state[name] = piece.view(dtype).reshape(shape)
        except RuntimeError:  # misaligned for its dtype: copy instead of view
            state[name] = piece.clone().view(dtype).reshape(shape)
    return state


def _load_safetensors(directory: Path, manifest: Manifest, device: str, options: LoadOptions, phases: _Phases) -> LoadedModel:
    import torch

    path = _main_file(directory, manifest)
    assert manifest.architecture is not None
    # Reading is I/O (no GIL) and building the architecture is Python (GIL): overlap
    # them, so a cold load costs about max(read, build) instead of their sum.
    read_result: dict[str, Any] = {}

    def read() -> None:
        started = time.perf_counter()
        try:
            read_result["state"] = _read_safetensors(path, manifest)
        except BaseException as error:  # noqa: BLE001 - re-raised in the loading thread below
            read_result["error"] = error
        read_result["ms"] = (time.perf_counter() - started) * 1000

    reader = threading.Thread(target=read, name="safetensors-read", daemon=True)
    reader.start()
    try:
        with phases.measure("deserialize"), torch.device("meta"), _initialisation_skipped():
            module = build_architecture(manifest.architecture, options.trusted_modules)
    finally:
        reader.join()
    phases.milliseconds["read"] = read_result["ms"]
    if "error" in read_result:
        phases.current = "read"
        raise read_result["error"]
    with phases.measure("deserialize"):
        module.load_state_dict(read_result["state"], strict=True, assign=True)
        for tensor_name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.is_meta:
                raise LoadFailed(
                    manifest.name, manifest.version, manifest.format, "deserialize",
                    f"tensor {tensor_name!r} has no weights in the file (a non-persistent buffer?)",
                )
        module.eval()
    with phases.measure("to_device"):
        if device != "cpu":
            module = module.to(device)
    return TorchModel(manifest, device, options.input_bytes_max, module)


def _load_torchscript(directory: Path, manifest: Manifest, device: str, options: LoadOptions, phases: _Phases) -> LoadedModel:
    import torch

    with phases.measure("read"):
        data = _read_bytes(_main_file(directory, manifest), manifest)
    with phases.measure("deserialize"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        module.eval()
    with phases.measure("to_device"):
        if device != "cpu":
            module = module.to(device)
    return TorchModel(manifest, device, options.input_bytes_max, module)


def _load_pt2(directory: Path, manifest: Manifest, device: str, options: LoadOptions, phases: _Phases) -> LoadedModel:
    import torch

    with phases.measure("read"):
        data = _read_bytes(_main_file(directory, manifest), manifest)
    with phases.measure("deserialize"):
        program = torch.export.load(io.BytesIO(data))
        module = program.module()
    with phases.measure("to_device"):
        if device != "cpu":
            module = module.to(device)
    return TorchModel(manifest, device, options.input_bytes_max, module)


def _session_options(options: LoadOptions, optimize: bool) -> Any:
    import onnxruntime

    session_options = onnxruntime.SessionOptions()
    if options.threads is not None:
        session_options.intra_op_num_threads = options.threads
        session_options.inter_op_num_threads = 1
    session_options.log_severity_level = 3
    if not optimize:
        session_options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    return session_options


def _onnx_providers(device: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device_kind(device) == "cuda" else ["CPUExecutionProvider"]


DERIVED_MODEL_FILE = "model.onnx"
DERIVED_WEIGHTS_FILE = "weights.bin"


def derived_onnx_path(derived_dir: str | Path, manifest: Manifest, device: str = "cpu") -> Path:
    """The directory where this node keeps `manifest`'s ONNX graph optimised for its CPU and
    runtime: the graph (`model.onnx`) and, beside it, its weights (`weights.bin`).

    Named by the model file's sha256, the ONNX Runtime version and the CPU (an optimised
    graph holds weights in the layout of this CPU's vector width): it can never be taken
    for another model's, or carried to a machine it does not fit.
    """
    import onnxruntime

    return Path(derived_dir) / f"{manifest.files[0].sha256}-ort{onnxruntime.__version__}-{device_kind(device)}-{machine_key()}"


def can_derive(manifest: Manifest, options: LoadOptions) -> bool:
    """Whether `derive_onnx` can make a faster-loading form of this artifact: an ONNX model in
    one file (weights in external files stay where they are), with somewhere to keep it."""
    return manifest.format == "onnx" and len(manifest.files) == 1 and bool(options.derived_dir)


@functools.cache
def machine_key() -> str:
    """A short name for this CPU: its architecture and instruction-set flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    flags = line.split(":", 1)[-1].strip()
                    break
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:12]


def derive_onnx(directory: Path | str, manifest: Manifest, device: str = "cpu", options: LoadOptions | None = None) -> Path | None:
    """Optimise `manifest`'s ONNX graph for this node once and save it where later loads
    look (`derived_onnx_path`), its weights in a file of their own that loads map instead
    of copying; returns the directory, or None for a model that cannot be derived (weights
    already in external files). Written to a temporary directory, then renamed: a crash
    half-way leaves nothing a load would take."""
    import onnxruntime

    options = options or LoadOptions()
    if not can_derive(manifest, options):
        return None
    target = derived_onnx_path(options.derived_dir, manifest, device)
    if (target / DERIVED_MODEL_FILE).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    session_options = _session_options(options, optimize=True)
    session_options.optimized_model_filepath = str(partial / DERIVED_MODEL_FILE)
    session_options.add_session_config_entry("session.optimized_model_external_initializers_file_name", DERIVED_WEIGHTS_FILE)
    session_options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        onnxruntime.InferenceSession(_read_bytes(_main_file(Path(directory), manifest), manifest),
                                     sess_options=session_options, providers=_onnx_providers(device))
        try:
            os.rename(partial, target)
        except OSError:
            if not (target / DERIVED_MODEL_FILE).exists():  # not another deriver that won the race
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _load_onnx(directory: Path, manifest: Manifest, device: str, options: LoadOptions, phases: _Phases) -> LoadedModel:
    import onnxruntime

    providers = _onnx_providers(device)
    path = _main_file(directory, manifest)
    if can_derive(manifest, options):
        derived = derived_onnx_path(options.derived_dir, manifest, device)
        if (derived / DERIVED_MODEL_FILE).exists():
            try:
                # From its path, optimisation off: ONNX Runtime maps the weights file rather
                # than copying it, so its pages are read as the warm-up first touches them.
                with phases.measure("deserialize"):
                    session = onnxruntime.InferenceSession(str(derived / DERIVED_MODEL_FILE),
                                                           sess_options=_session_options(options, optimize=False),
                                                           providers=providers)
                return OnnxModel(manifest, device, options.input_bytes_max, session, derived=True)
            except Exception as error:  # noqa: BLE001 - a damaged derived graph: drop it, use the artifact
                log.warning("derived_model_unusable", path=str(derived), error=f"{type(error).__name__}: {error}")
                shutil.rmtree(derived, ignore_errors=True)
                phases.milliseconds.pop("deserialize", None)
    with phases.measure("read"):
        # Weights in external files are resolved relative to the path, so read only
        # single-file models into memory.
        source: bytes | str = _read_bytes(path, manifest) if len(manifest.files) == 1 else str(path)
    with phases.measure("deserialize"):
        session = onnxruntime.InferenceSession(source, sess_options=_session_options(options, optimize=True), providers=providers)
    return OnnxModel(manifest, device, options.input_bytes_max, session)


def _load_tensorrt(directory: Path, manifest: Manifest, device: str, options: LoadOptions, phases: _Phases) -> LoadedModel:
    try:
        import torch_tensorrt  # noqa: F401  (registers the TensorRT engine ops with torch)
    except Exception as error:  # noqa: BLE001 - ImportError, or a broken CUDA/TensorRT install
        raise BackendUnavailable("tensorrt", device, f"torch_tensorrt does not import: {error}") from None
    if device_kind(device) != "cuda":
        raise BackendUnavailable("tensorrt", device, "TensorRT engines run only on a CUDA device")
    import torch

    with phases.measure("read"):
        data = _read_bytes(_main_file(directory, manifest), manifest)
    with phases.measure("deserialize"):
        if manifest.files[0].path.endswith(".ep") or manifest.files[0].path.endswith(".pt2"):
            module = torch.export.load(io.BytesIO(data)).module()
        else:
            module = torch.jit.load(io.BytesIO(data), map_location=device)
    with phases.measure("to_device"):
        module = module.to(device)
    return TorchModel(manifest, device, options.input_bytes_max, module)


BACKENDS: dict[str, Backend] = {
    "safetensors": _load_safetensors,
    "torchscript": _load_torchscript,
    "onnx": _load_onnx,
    "tensorrt": _load_tensorrt,
    "pt2": _load_pt2,
}


def measure_profile(
    artifact_dir: Path | str,
    manifest: Manifest,
    device: str = "cpu",
    options: LoadOptions | None = None,
    iterations: int = 10,
    batch_size: int = 1,
) -> tuple[Any, LoadReport]:
    """Load once and time `iterations` inferences: a `Profile` for the manifest.

    memory_bytes is the bytes of the model's parameters and buffers (torch) or of its
    files (ONNX Runtime, whose arena is not visible from here): a lower bound.
    """
    from redge.runtime.manifest import Profile

    assert 1 <= iterations <= 10_000 and batch_size >= 1
    model, report = load(artifact_dir, manifest, device, options)
    inputs = {spec.name: spec.example(batch_size) for spec in manifest.inputs}
    latencies_ms = []
    for _ in range(iterations):
        started = time.perf_counter()
        model.infer(inputs)
        latencies_ms.append((time.perf_counter() - started) * 1000)
    latencies_ms.sort()
    memory_bytes = manifest.size_bytes
    if isinstance(model, TorchModel):
        tensors = list(model.module.parameters()) + list(model.module.buffers())
        memory_bytes = sum(t.numel() * t.element_size() for t in tensors)
    model.close()
    profile = Profile(
        device_kind=device_kind(device),
        load_ms=round(report.total_ms, 3),
        latency_ms=round(latencies_ms[len(latencies_ms) // 2], 3),
        memory_bytes=memory_bytes,
        batch_size=batch_size,
    )
    return profile, report
