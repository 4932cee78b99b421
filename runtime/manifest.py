"""The artifact manifest: what an artifact is, what it needs and how fast it loads.

Every artifact directory holds `manifest.json` next to its files. It is the single
description that the store (budget, hashes), the fetch client (what to download, what
to verify), the loaders (format, architecture, tensor specs) and the planner (size,
accuracy, measured load time and latency per device kind) all read, so it is validated
strictly once, at parse time, and is immutable afterwards (frozen dataclasses).

A file name is always a plain relative path without `..`: a manifest comes from another
peer and must never name a path outside its artifact's directory.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from redge.runtime.errors import ManifestInvalid, UnknownFormat
from redge.runtime.tensor import TensorSpec

MANIFEST_FILENAME = "manifest.json"
MANIFEST_SCHEMA = 1
MANIFEST_BYTES_MAX = 1024 * 1024
FILES_MAX = 64
PROFILES_MAX = 16
HASH_CHUNK_BYTES = 4 * 1024 * 1024

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FILE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9._-]{0,127}){0,3}$")
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_ARCHITECTURE_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class FormatInfo:
    """What redge knows about a serialization format, beyond its name."""

    name: str
    backup_eligible: bool
    needs_architecture: bool
    note: str


FORMATS: dict[str, FormatInfo] = {
    "safetensors": FormatInfo(
        "safetensors", True, True,
        "weights only, loaded into an architecture built on the meta device; loads at about the raw read time",
    ),
    "torchscript": FormatInfo(
        "torchscript", True, False, "self-contained; torch.jit.load holds the GIL for the whole load",
    ),
    "onnx": FormatInfo(
        "onnx", True, False, "ONNX Runtime; fastest CPU inference measured, fast load",
    ),
    "tensorrt": FormatInfo(
        "tensorrt", True, False, "Torch-TensorRT engine built ahead of time for one GPU model; GPU only",
    ),
    "pt2": FormatInfo(
        "pt2", False, False,
        "torch.export archive; accepted, but loads 10-190x slower than its raw read (measured): never a backup format",
    ),
}
FORMAT_NAMES: tuple[str, ...] = tuple(FORMATS)


# Which format to load, best first, per device kind and purpose. On this CPU (see
# docs/runtime.md) ONNX Runtime infers 2-5x faster than torch eager, so it serves; a cold
# backup is judged by how fast it loads, where safetensors into a meta-device
# architecture is at the raw read time. pt2 is never listed: it is accepted, not chosen.
FORMAT_PREFERENCE: dict[tuple[str, str], tuple[str, ...]] = {
    ("cpu", "serving"): ("onnx", "safetensors", "torchscript"),
    ("cpu", "cold_backup"): ("safetensors", "onnx", "torchscript"),
    ("cuda", "serving"): ("tensorrt", "safetensors", "torchscript", "onnx"),
    ("cuda", "cold_backup"): ("safetensors", "tensorrt", "torchscript", "onnx"),
}


def choose_manifest(
    manifests: list[Manifest], device_kind: str, purpose: str = "serving"
) -> Manifest | None:
    """The stored artifact of one model that this device should load, or None."""
    order = FORMAT_PREFERENCE.get((device_kind, purpose)) or FORMAT_PREFERENCE[("cpu", purpose)]
    ranked = [m for m in manifests if m.format in order]
    if not ranked:
        return None
    newest_first = sorted(ranked, key=lambda m: m.version, reverse=True)
    return min(newest_first, key=lambda m: order.index(m.format))


def check_format(format_name: str) -> FormatInfo:
    info = FORMATS.get(format_name)
    if info is None:
        raise UnknownFormat(format_name, FORMAT_NAMES)
    return info


def check_name(field_name: str, value: Any) -> str:
    if not isinstance(value, str) or not _NAME_PATTERN.match(value):
        raise ManifestInvalid(
            field_name, f"must match {_NAME_PATTERN.pattern} (letters, digits, . _ -), got {value!r}"
        )
    return value


def check_file_path(value: Any) -> str:
    if (
        not isinstance(value, str)
        or not _FILE_PATTERN.match(value)
        or any(part in ("..", ".") for part in value.split("/"))
        or value == MANIFEST_FILENAME
    ):
        raise ManifestInvalid("files.path", f"must be a plain relative path inside the artifact, got {value!r}")
    return value


def _non_negative_int(field_name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ManifestInvalid(field_name, f"must be a non-negative integer, got {value!r}")
    return value


def _optional_number(field_name: str, value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise ManifestInvalid(field_name, f"must be a non-negative number or null, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size_bytes: int

    def __post_init__(self) -> None:
        check_file_path(self.path)
        if not isinstance(self.sha256, str) or not _SHA256_PATTERN.match(self.sha256):
            raise ManifestInvalid(f"files[{self.path}].sha256", "must be 64 lowercase hex digits")
        _non_negative_int(f"files[{self.path}].size_bytes", self.size_bytes)


@dataclass(frozen=True)
class Architecture:
    """How to build the module that safetensors weights go into.

    `reference` is `torchvision:<model name>` or `<module.path>:<callable>`; `kwargs` are
    passed to the builder. Loaders import only modules they are told to trust.
    """

    reference: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.reference, str) or not _ARCHITECTURE_PATTERN.match(self.reference):
            raise ManifestInvalid(
                "architecture.reference", f"must look like 'torchvision:resnet18' or 'pkg.module:callable', got {self.reference!r}"
            )
        if not isinstance(self.kwargs, dict) or not all(isinstance(key, str) for key in self.kwargs):
            raise ManifestInvalid("architecture.kwargs", "must be an object with string keys")

    @property
    def module_name(self) -> str:
        return self.reference.split(":", 1)[0]

    @property
    def callable_name(self) -> str:
        return self.reference.split(":", 1)[1]


@dataclass(frozen=True)
class Profile:
    """Measured on one kind of device: what the planner uses instead of guesses."""

    device_kind: str
    load_ms: float
    latency_ms: float
    memory_bytes: int
    batch_size: int = 1

    def __post_init__(self) -> None:
        check_name("profiles.device_kind", self.device_kind)
        _optional_number("profiles.load_ms", self.load_ms)
        _optional_number("profiles.latency_ms", self.latency_ms)
        _non_negative_int("profiles.memory_bytes", self.memory_bytes)
        if _non_negative_int("profiles.batch_size", self.batch_size) < 1:
            raise ManifestInvalid("profiles.batch_size", "must be at least 1")


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    format: str
    files: tuple[FileEntry, ...]
    size_bytes: int
    parameter_count: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    family: str
    architecture: Architecture | None = None
    accuracy: float | None = None
    gflops: float | None = None
    profiles: tuple[Profile, ...] = ()
    schema: int = MANIFEST_SCHEMA

    def __post_init__(self) -> None:
        check_name("name", self.name)
        check_name("version", self.version)
        check_name("family", self.family)
        info = check_format(self.format)
        if not self.files:
            raise ManifestInvalid("files", "an artifact has at least one file")
        if len(self.files) > FILES_MAX:
            raise ManifestInvalid("files", f"at most {FILES_MAX} files")
        paths = [entry.path for entry in self.files]
        if len(set(paths)) != len(paths):
            raise ManifestInvalid("files", "file paths must be unique")
        _non_negative_int("size_bytes", self.size_bytes)
        if self.size_bytes != sum(entry.size_bytes for entry in self.files):
            raise ManifestInvalid(
                "size_bytes", f"{self.size_bytes} is not the sum of the files' sizes {sum(entry.size_bytes for entry in self.files)}"
            )
        _non_negative_int("parameter_count", self.parameter_count)
        if not self.inputs:
            raise ManifestInvalid("inputs", "a model has at least one input")
        if not self.outputs:
            raise ManifestInvalid("outputs", "a model has at least one output")
        for kind, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            names = [spec.name for spec in specs]
            if len(set(names)) != len(names):
                raise ManifestInvalid(kind, "tensor names must be unique")
        if info.needs_architecture and self.architecture is None:
            raise ManifestInvalid("architecture", f"format {self.format} needs an architecture reference")
        if self.accuracy is not None and not 0.0 <= self.accuracy <= 100.0:
            raise ManifestInvalid("accuracy", f"must be a percentage in [0, 100], got {self.accuracy}")
        _optional_number("gflops", self.gflops)
        if len(self.profiles) > PROFILES_MAX:
            raise ManifestInvalid("profiles", f"at most {PROFILES_MAX} profiles")
        if self.schema != MANIFEST_SCHEMA:
            raise ManifestInvalid("schema", f"this runtime reads schema {MANIFEST_SCHEMA}, got {self.schema}")

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.version)

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def profile(self, device_kind: str) -> Profile | None:
        for profile in self.profiles:
            if profile.device_kind == device_kind:
                return profile
        return None

    def with_profile(self, profile: Profile) -> Manifest:
        """A copy with `profile` replacing any earlier one of the same device kind."""
        others = tuple(p for p in self.profiles if p.device_kind != profile.device_kind)
        return replace(self, profiles=others + (profile,))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "family": self.family,
            "files": [
                {"path": entry.path, "sha256": entry.sha256, "size_bytes": entry.size_bytes}
                for entry in self.files
            ],
            "size_bytes": self.size_bytes,
            "parameter_count": self.parameter_count,
            "inputs": [spec.to_json() for spec in self.inputs],
            "outputs": [spec.to_json() for spec in self.outputs],
            "architecture": (
                None
                if self.architecture is None
                else {"reference": self.architecture.reference, "kwargs": self.architecture.kwargs}
            ),
            "accuracy": self.accuracy,
            "gflops": self.gflops,
            "profiles": [
                {
                    "device_kind": p.device_kind,
                    "load_ms": p.load_ms,
                    "latency_ms": p.latency_ms,
                    "memory_bytes": p.memory_bytes,
                    "batch_size": p.batch_size,
                }
                for p in self.profiles
            ],
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), option=orjson.OPT_INDENT_2)

    @classmethod
    def from_dict(cls, value: Any) -> Manifest:
        if not isinstance(value, dict):
            raise ManifestInvalid("manifest", f"must be a JSON object, got {type(value).__name__}")
        try:
            architecture_value = value.get("architecture")
            if architecture_value is not None and not isinstance(architecture_value, dict):
                raise ManifestInvalid("architecture", "must be an object or null")
            files_value = _list(value, "files")
            return cls(
                schema=value.get("schema", MANIFEST_SCHEMA),
                name=value["name"],
                version=value["version"],
                format=value["format"],
                family=value["family"],
                files=tuple(
                    FileEntry(path=_item(f, "path"), sha256=_item(f, "sha256"), size_bytes=_item(f, "size_bytes"))
                    for f in files_value
                ),
                size_bytes=value["size_bytes"],
                parameter_count=value["parameter_count"],
                inputs=tuple(TensorSpec.from_json(spec) for spec in _list(value, "inputs")),
                outputs=tuple(TensorSpec.from_json(spec) for spec in _list(value, "outputs")),
                architecture=(
                    None
                    if architecture_value is None
                    else Architecture(
                        reference=architecture_value.get("reference"),
                        kwargs=architecture_value.get("kwargs") or {},
                    )
                ),
                accuracy=_optional_number("accuracy", value.get("accuracy")),
                gflops=_optional_number("gflops", value.get("gflops")),
                profiles=tuple(
                    Profile(
                        device_kind=_item(p, "device_kind"),
                        load_ms=_item(p, "load_ms"),
                        latency_ms=_item(p, "latency_ms"),
                        memory_bytes=_item(p, "memory_bytes"),
                        batch_size=p.get("batch_size", 1),
                    )
                    for p in _list(value, "profiles", required=False)
                ),
            )
        except KeyError as missing:
            raise ManifestInvalid(str(missing).strip("'"), "missing") from None

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        if len(data) > MANIFEST_BYTES_MAX:
            raise ManifestInvalid("manifest", f"larger than {MANIFEST_BYTES_MAX} bytes")
        try:
            value = orjson.loads(data)
        except orjson.JSONDecodeError as error:
            raise ManifestInvalid("manifest", f"not valid JSON: {error}") from None
        return cls.from_dict(value)

    @classmethod
    def read(cls, artifact_dir: Path) -> Manifest:
        path = Path(artifact_dir) / MANIFEST_FILENAME
        with open(path, "rb") as handle:
            data = handle.read(MANIFEST_BYTES_MAX + 1)
        return cls.from_json(data)

    def write(self, artifact_dir: Path) -> Path:
        path = Path(artifact_dir) / MANIFEST_FILENAME
        temporary = path.with_name(MANIFEST_FILENAME + ".tmp")
        temporary.write_bytes(self.to_json())
        temporary.replace(path)
        return path


def _list(value: dict[str, Any], key: str, required: bool = True) -> list[Any]:
    item = value.get(key) if not required else value[key]
    if item is None and not required:
        return []
    if not isinstance(item, list):
        raise ManifestInvalid(key, f"must be a list, got {type(item).__name__}")
    return item


def _item(value: Any, key: str) -> Any:
    if not isinstance(value, dict):
        raise ManifestInvalid(key, f"must be inside an object, got {type(value).__name__}")
    return value[key]


def sha256_file(path: Path, chunk_bytes: int = HASH_CHUNK_BYTES) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(artifact_dir: Path) -> tuple[FileEntry, ...]:
    """Hash every file under `artifact_dir` except the manifest, in a stable order."""
    root = Path(artifact_dir)
    entries = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name in (MANIFEST_FILENAME, MANIFEST_FILENAME + ".tmp"):
            continue
        relative = path.relative_to(root).as_posix()
        entries.append(FileEntry(path=relative, sha256=sha256_file(path), size_bytes=path.stat().st_size))
    return tuple(entries)
