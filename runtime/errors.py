"""Typed errors of the model runtime.

Every expected operational failure of `redge.runtime` (a missing or corrupt artifact, a
full store, a model that will not load or run, a host process that died) is one of these
classes, so the agent can tell them apart and report them without parsing messages.
Each one carries its facts as attributes and writes them into its message.

They cross the boundary of the model host process, so they must survive pickling even
though their constructors take keyword fields: `RuntimeFailure.__reduce__` rebuilds an
instance from its message and attributes instead of calling `__init__` again.
"""

from __future__ import annotations

from typing import Any


def _rebuild(cls: type[RuntimeFailure], message: str, fields: dict[str, Any]) -> RuntimeFailure:
    instance = cls.__new__(cls)
    Exception.__init__(instance, message)
    instance.__dict__.update(fields)
    return instance


class RuntimeFailure(Exception):
    """Base class of every typed error of `redge.runtime`."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), str(self), dict(self.__dict__)))


class ManifestInvalid(RuntimeFailure):
    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"invalid manifest: {field}: {reason}")


class UnknownFormat(RuntimeFailure):
    def __init__(self, format_name: str, known: tuple[str, ...]) -> None:
        self.format_name = format_name
        self.known = known
        super().__init__(f"unknown artifact format {format_name!r}; known formats: {', '.join(known)}")


class BackendUnavailable(RuntimeFailure):
    """The format is known but this machine cannot run it (no torch_tensorrt, no GPU)."""

    def __init__(self, format_name: str, device: str, reason: str) -> None:
        self.format_name = format_name
        self.device = device
        self.reason = reason
        super().__init__(f"backend {format_name!r} is unavailable on device {device!r}: {reason}")


class ArtifactNotFound(RuntimeFailure):
    def __init__(self, name: str, version: str, where: str, file: str | None = None) -> None:
        self.name = name
        self.version = version
        self.where = where
        self.file = file
        what = f"artifact {name}/{version}" + (f" file {file!r}" if file else "")
        super().__init__(f"{what} not found in {where}")


class ArtifactCorrupt(RuntimeFailure):
    def __init__(self, name: str, version: str, file: str, reason: str) -> None:
        self.name = name
        self.version = version
        self.file = file
        self.reason = reason
        super().__init__(f"artifact {name}/{version} file {file!r} is corrupt: {reason}")


class ArtifactConflict(RuntimeFailure):
    """An artifact with this name and version is stored already, with different content."""

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        super().__init__(
            f"artifact {name}/{version} is already stored with different content; "
            "remove it first or publish a new version"
        )


class StoreOverBudget(RuntimeFailure):
    def __init__(
        self,
        needed_bytes: int,
        usage_bytes: int,
        budget_bytes: int,
        evictable_bytes: int,
        pinned_bytes: int,
    ) -> None:
        self.needed_bytes = needed_bytes
        self.usage_bytes = usage_bytes
        self.budget_bytes = budget_bytes
        self.evictable_bytes = evictable_bytes
        self.pinned_bytes = pinned_bytes
        super().__init__(
            f"store over budget: need {needed_bytes} bytes, using {usage_bytes} of "
            f"{budget_bytes} bytes; only {evictable_bytes} bytes are evictable "
            f"({pinned_bytes} bytes are pinned by the plan)"
        )


class FetchFailed(RuntimeFailure):
    def __init__(self, name: str, version: str, source: str, reason: str) -> None:
        self.name = name
        self.version = version
        self.source = source
        self.reason = reason
        super().__init__(f"fetching artifact {name}/{version} from {source} failed: {reason}")


class LoadFailed(RuntimeFailure):
    def __init__(self, name: str, version: str, format_name: str, phase: str, reason: str) -> None:
        self.name = name
        self.version = version
        self.format_name = format_name
        self.phase = phase
        self.reason = reason
        super().__init__(
            f"loading {name}/{version} ({format_name}) failed during {phase}: {reason}"
        )


class InvalidInput(RuntimeFailure):
    """The caller's tensors do not match the model's input specs: a 4xx, never a crash."""

    def __init__(self, tensor: str, reason: str) -> None:
        self.tensor = tensor
        self.reason = reason
        super().__init__(f"invalid input tensor {tensor!r}: {reason}")


class InferenceFailed(RuntimeFailure):
    def __init__(self, model: str, reason: str) -> None:
        self.model = model
        self.reason = reason
        super().__init__(f"inference on model {model!r} failed: {reason}")


class ModelNotLoaded(RuntimeFailure):
    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__(f"model {model!r} is not loaded in this host")


class ModelNotServing(RuntimeFailure):
    """The model is loaded as a warm backup; promote it before sending it traffic."""

    def __init__(self, model: str, role: str) -> None:
        self.model = model
        self.role = role
        super().__init__(f"model {model!r} is {role}, not serving; promote it first")


class HostBusy(RuntimeFailure):
    def __init__(self, requests_pending: int, requests_pending_max: int) -> None:
        self.requests_pending = requests_pending
        self.requests_pending_max = requests_pending_max
        super().__init__(
            f"model host is busy: {requests_pending} requests pending, limit {requests_pending_max}"
        )


class HostCrashed(RuntimeFailure):
    def __init__(self, exit_code: int | None, reason: str) -> None:
        self.exit_code = exit_code
        self.reason = reason
        super().__init__(f"model host process is gone (exit code {exit_code}): {reason}")


class HostClosed(RuntimeFailure):
    def __init__(self) -> None:
        super().__init__("model host is closed")


class DeadlineExceeded(RuntimeFailure):
    def __init__(self, operation: str, model: str, budget_ms: float) -> None:
        self.operation = operation
        self.model = model
        self.budget_ms = budget_ms
        super().__init__(f"{operation} on model {model!r} missed its deadline ({budget_ms:.1f} ms budget)")


class RangeNotSatisfiable(RuntimeFailure):
    """A byte range outside the file: HTTP 416."""

    def __init__(self, file: str, start: int, end: int | None, size_bytes: int) -> None:
        self.file = file
        self.start = start
        self.end = end
        self.size_bytes = size_bytes
        super().__init__(f"byte range [{start}, {end}) is outside file {file!r} of {size_bytes} bytes")
