"""The commands that change the cluster state, and their wire encoding.

Every change to the replicated state is one of these frozen records, proposed through Raft
and applied in the same order on every peer. Commands carry their own timestamp (`at_ms`,
the proposer's wall clock) because the state machine may not read a clock: replaying the
journal must give the same state. They are encoded with orjson, not pickle, so that the
replicated log holds plain data that any version of the code can read and reject cleanly.

Formats. Every encoded command carries the format version it was written in (`"v"`; absent
means 1, the format before versions existed). The rules that keep replicas of different
builds identical (docs/operations.md#upgrades):
- A field or command type added in format N has a default meaning "as before", and a writer
  includes it only once the cluster's committed format (`ClusterState.format_version`) is at
  least N, which the leader raises only when every member runs a build that reads N.
- A format-1 command is decoded exactly as the builds before versions did: an unknown field
  is an error. A command of format 2 or later has its unknown fields ignored.
- The state machine refuses a command whose format is above the committed one, on every
  replica alike (`ClusterState.apply`): how a command is treated never depends on the build.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

import orjson

from redge.consensus.errors import FormatTooNew, MalformedCommand

# The newest format this build reads and writes; see the module docstring.
FORMAT_VERSION = 2
PRIORITIES = ("critical", "standard", "best-effort")
BACKUP_POLICIES = ("warm", "cold", "none", "auto")
ROLES = ("primary", "warm", "cold")
REPORT_KINDS = ("load_started", "load_done", "serving", "load_failed", "unloaded", "degraded", "recovered")


@dataclass(frozen=True)
class Join:
    """A peer announces itself: first start, restart (higher incarnation) or address change."""

    node_id: str
    http_address: str
    raft_address: str
    heartbeat_address: str
    incarnation: int
    at_ms: int
    memory_bytes: int = 0
    accelerator_memory_bytes: int = 0
    storage_bytes: int = 0
    device_kind: str = "cpu"
    # Format 2: the newest command format the joining build reads. From format 2 on, a Join
    # from a build that cannot read the cluster's format is refused (a build from before
    # formats sends none, and so cannot come back into a cluster it could not follow).
    reads_format: int = 0


@dataclass(frozen=True)
class Leave:
    """A peer leaves the cluster on purpose (SIGTERM); it is not a failure."""

    node_id: str
    at_ms: int


@dataclass(frozen=True)
class Suspect:
    """One observer believes `target_id` is down (or, with reason `degraded`, too slow)."""

    observer_id: str
    target_id: str
    target_incarnation: int
    reason: str
    at_ms: int
    # When the observer formed this opinion, if earlier than `at_ms` (the proposal that
    # committed may be a retry, after an election or a partition).
    since_ms: int = 0


@dataclass(frozen=True)
class Unsuspect:
    """An observer withdraws its suspicion: heartbeats are arriving again."""

    observer_id: str
    target_id: str
    at_ms: int


@dataclass(frozen=True)
class RegisterApp:
    """Register or update an app. Variants name artifacts, largest first."""

    name: str
    variants: tuple[str, ...]
    priority: str
    slo_ms: float
    backup: str
    at_ms: int
    request_rate_per_s: float = 0.0
    proposer_id: str = ""  # format 2: whose clock `at_ms` is


@dataclass(frozen=True)
class RemoveApp:
    name: str
    at_ms: int
    proposer_id: str = ""  # format 2: whose clock `at_ms` is


@dataclass(frozen=True)
class Replica:
    node_id: str
    variant: str
    role: str


@dataclass(frozen=True)
class AppPlacement:
    app: str
    replicas: tuple[Replica, ...]


@dataclass(frozen=True)
class CommitPlan:
    """The leader's decision. `epoch` must be the current epoch plus one, so a plan computed
    from stale state (by an old leader, or before another plan landed) is refused."""

    epoch: int
    placements: tuple[AppPlacement, ...]
    proposer_id: str
    reason: str
    at_ms: int


@dataclass(frozen=True)
class Report:
    """A peer reports what its reconciler did (load_started, load_done, serving, ...)."""

    node_id: str
    kind: str
    at_ms: int
    app: str = ""
    variant: str = ""
    epoch: int = 0
    detail: str = ""
    duration_ms: float = 0.0


@dataclass(frozen=True)
class ArtifactProfile:
    device_kind: str
    load_ms: float
    latency_ms: float
    memory_bytes: int


@dataclass(frozen=True)
class ArtifactSummary:
    """What the planner needs to know of a stored artifact (its manifest, without file hashes)."""

    name: str
    version: str
    format: str
    size_bytes: int
    parameter_count: int
    family: str
    accuracy: float | None = None
    profiles: tuple[ArtifactProfile, ...] = ()


@dataclass(frozen=True)
class StoreReport:
    """A peer's model store changed: here is everything it holds now, and how full it is."""

    node_id: str
    artifacts: tuple[ArtifactSummary, ...]
    used_bytes: int
    at_ms: int
    # What this peer can fetch from its own model repository (--source), not stored yet.
    source_artifacts: tuple[ArtifactSummary, ...] = ()


@dataclass(frozen=True)
class Probe:
    """A no-op that still goes through the log: used to measure commits and check liveness."""

    proposer_id: str
    token: str
    at_ms: int


@dataclass(frozen=True)
class RaiseFormat:
    """Format 2: from now on every replica accepts commands of format `version`. The leader
    proposes it once every member has said that its build reads that format; `members` are
    those it asked ("node@incarnation", sorted), and the command counts only while they are
    still exactly the members that have not left (ClusterState.raise_format_valid)."""

    version: int
    proposer_id: str
    at_ms: int
    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class RotateWatch:
    """Format 2: every peer moves to watch round `round` (the current one plus one) as it
    applies this, instead of at a turn of its own wall clock. The leader proposes it every
    `watch_rotation_s` of its monotonic clock, above `watch_all_members_max` members."""

    round: int
    proposer_id: str
    at_ms: int


Command = Union[
    Join, Leave, Suspect, Unsuspect, RegisterApp, RemoveApp, CommitPlan, Report, StoreReport, Probe, RaiseFormat,
    RotateWatch,
]

COMMAND_TYPES: dict[str, type] = {
    "join": Join,
    "leave": Leave,
    "suspect": Suspect,
    "unsuspect": Unsuspect,
    "register_app": RegisterApp,
    "remove_app": RemoveApp,
    "commit_plan": CommitPlan,
    "report": Report,
    "store_report": StoreReport,
    "probe": Probe,
    "raise_format": RaiseFormat,
    "rotate_watch": RotateWatch,
}
# The format each command type and field first appeared in; anything not listed is format 1.
# (RaiseFormat is new in format 2 but written as format 1: it is what lets a format-1
# cluster accept format 2, and it is only proposed once every member has said that it reads it.)
TYPES_INTRODUCED_IN: dict[type, int] = {RotateWatch: 2}
FIELDS_INTRODUCED_IN: dict[tuple[type, str], int] = {
    (RegisterApp, "proposer_id"): 2, (RemoveApp, "proposer_id"): 2, (Join, "reads_format"): 2,
}
TYPE_NAMES: dict[type, str] = {cls: name for name, cls in COMMAND_TYPES.items()}

MAX_COMMAND_BYTES = 1 << 20
_PROPOSER_FIELDS = ("proposer_id", "observer_id", "node_id")


def proposer_of(command: Command) -> str:
    """The node that proposed `command`, whose wall clock its `at_ms` is ("" if unknown)."""
    for name in _PROPOSER_FIELDS:
        value = getattr(command, name, None)
        if isinstance(value, str) and value:
            return value
    return ""


def encode(command: Command, format_version: int = 1) -> bytes:
    """Encode in the highest format up to `format_version` (the cluster's committed one):
    fields of a later format are left out, which the readers take as their default."""
    cls = type(command)
    version = min(format_version, FORMAT_VERSION)
    if TYPES_INTRODUCED_IN.get(cls, 1) > version:
        # Never proposed, not even to be refused: a build that does not know the type would
        # record the entry differently from one that does.
        raise FormatTooNew(f"{TYPE_NAMES[cls]} needs format {TYPES_INTRODUCED_IN[cls]}; the cluster's is {version}")
    payload = dataclasses.asdict(command)
    for (kind, name), introduced in FIELDS_INTRODUCED_IN.items():
        if kind is cls and introduced > version:
            del payload[name]
    payload["type"] = TYPE_NAMES[cls]
    if version > 1:
        payload["v"] = version
    return orjson.dumps(payload)


def entry_format(data: bytes) -> int:
    """The format an encoded entry says it is in (1 when it does not parse: it is malformed
    whatever its format)."""
    try:
        return format_in(orjson.loads(data))
    except (orjson.JSONDecodeError, TypeError):
        return 1


def format_in(payload: Any) -> int:
    """The format a decoded entry says it is in: its "v" when that is an integer of at least
    2, else 1 (no "v", or one that the builds before formats refuse as an unknown field)."""
    version = payload.get("v") if isinstance(payload, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) and version >= 2 else 1


def decode(data: bytes) -> Command:
    """Decode and type-check a command. Raises MalformedCommand, never anything else."""
    return decode_versioned(data)[0]


def decode_versioned(data: bytes) -> tuple[Command, int]:
    """A command and the format it was written in. Raises MalformedCommand, never anything else."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_COMMAND_BYTES:
        raise MalformedCommand("command must be bytes of at most 1 MiB")
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise MalformedCommand(f"not JSON: {error}") from None
    if not isinstance(payload, dict):
        raise MalformedCommand("command must be a JSON object")
    type_name = payload.pop("type", None)
    version = format_in(payload)
    if version > 1:
        del payload["v"]
    # (Anything else in "v" stays a field: format 1 refuses it as the builds before did.)
    cls = COMMAND_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise MalformedCommand(f"unknown command type {type_name!r}")
    return _build(cls, payload, type_name, strict=version == 1), version


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], dict[str, dataclasses.Field]]:
    # get_type_hints evaluates string annotations: far too slow to run on every commit.
    return typing.get_type_hints(cls), {f.name: f for f in dataclasses.fields(cls)}


def _build(cls: type, payload: Any, where: str, strict: bool) -> Any:
    if not isinstance(payload, dict):
        raise MalformedCommand(f"{where}: expected an object")
    hints, known = _schema(cls)
    unknown = set(payload) - set(known)
    if unknown and strict:
        raise MalformedCommand(f"{where}: unknown fields {sorted(unknown)}")
    values = {}
    for name, spec in known.items():
        if name not in payload:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise MalformedCommand(f"{where}: missing field {name!r}")
            continue
        values[name] = _convert(hints[name], payload[name], f"{where}.{name}", strict)
    return cls(**values)


def _convert(hint: Any, value: Any, where: str, strict: bool) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where, strict)
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise MalformedCommand(f"{where}: expected a list")
        return tuple(_convert(item_hint, item, f"{where}[{index}]", strict) for index, item in enumerate(value))
    if origin in (Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _convert(option, value, where, strict)
            except MalformedCommand:
                continue
        raise MalformedCommand(f"{where}: no alternative matched")
    if hint is type(None):
        if value is not None:
            raise MalformedCommand(f"{where}: expected null")
        return None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MalformedCommand(f"{where}: expected a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MalformedCommand(f"{where}: expected an integer")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise MalformedCommand(f"{where}: expected a string")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise MalformedCommand(f"{where}: expected a boolean")
        return value
    raise MalformedCommand(f"{where}: unsupported type {hint!r}")


__all__ = [
    "BACKUP_POLICIES",
    "COMMAND_TYPES",
    "FORMAT_VERSION",
    "PRIORITIES",
    "REPORT_KINDS",
    "ROLES",
    "AppPlacement",
    "ArtifactProfile",
    "ArtifactSummary",
    "Command",
    "CommitPlan",
    "Join",
    "Leave",
    "Probe",
    "RaiseFormat",
    "RotateWatch",
    "RegisterApp",
    "RemoveApp",
    "Replica",
    "Report",
    "StoreReport",
    "Suspect",
    "Unsuspect",
    "decode",
    "decode_versioned",
    "entry_format",
    "encode",
    "proposer_of",
]
