"""The placement problem as plain values: nodes, apps, the current plan, settings.

The leader converts its committed cluster state into these frozen dataclasses
and hands them to the planner (or the exact solver). Nothing here refers to
consensus, time or I/O, so a plan is a deterministic function of a `Problem`:
a new leader that replans from the same committed state gets the same plan,
which is what lets it finish what an old leader started.

Sizes are bytes, latencies milliseconds, rates per second. Collections are
tuples (or frozensets) so that values compare and print predictably; code
that iterates them sorts by name first, because set order depends on the
process's hash seed and would make two leaders disagree.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from types import MappingProxyType

from redge.placement.errors import InvalidProblem


class Health(enum.Enum):
    """A node's committed health. Only `alive` nodes take new load."""

    ALIVE = "alive"
    SUSPECTED = "suspected"
    DEGRADED = "degraded"
    FAILED = "failed"
    LEFT = "left"


HEALTH_KEEPS_REPLICAS = frozenset({Health.ALIVE, Health.SUSPECTED, Health.DEGRADED})
"""A suspicion is not a verdict: replicas on a suspected or degraded node stay
in the plan (moving them would turn every false suspicion into an outage),
but such nodes get nothing new."""


class Priority(enum.IntEnum):
    """Higher value wins. Order matters, the numbers do not."""

    BEST_EFFORT = 0
    STANDARD = 1
    CRITICAL = 2

    @classmethod
    def parse(cls, text: str) -> Priority:
        return _PRIORITY_NAMES[text]

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


_PRIORITY_NAMES = {
    "best-effort": Priority.BEST_EFFORT,
    "standard": Priority.STANDARD,
    "critical": Priority.CRITICAL,
}


class BackupPolicy(enum.Enum):
    WARM = "warm"
    COLD = "cold"
    NONE = "none"
    AUTO = "auto"  # critical -> warm, otherwise cold (FailLite's mixture)


class Role(enum.Enum):
    PRIMARY = "primary"
    WARM = "warm"
    COLD = "cold"


@dataclasses.dataclass(frozen=True)
class Variant:
    """One model of an app's family. `latency_ms_by_device` holds
    (device_kind, latency_ms) pairs measured in isolation; a device kind that
    is missing cannot run this variant."""

    name: str
    memory_bytes: int
    latency_ms_by_device: tuple[tuple[str, float], ...]
    accuracy: float
    size_bytes: int
    load_ms: float | None = None  # None: estimated from size and Settings

    def __post_init__(self) -> None:
        by_device = self.latency_ms_by_device
        if isinstance(by_device, Mapping):  # accept {"gpu": 4.5} from callers
            object.__setattr__(self, "latency_ms_by_device", tuple(sorted(by_device.items())))
        else:
            object.__setattr__(self, "latency_ms_by_device", tuple((k, v) for k, v in by_device))

    def latency_ms(self, device_kind: str) -> float | None:
        for kind, latency_ms in self.latency_ms_by_device:
            if kind == device_kind:
                return latency_ms
        return None


@dataclasses.dataclass(frozen=True)
class App:
    """An inference service; `variants` are ordered best (largest) first."""

    name: str
    priority: Priority
    slo_ms: float
    variants: tuple[Variant, ...]
    request_rate_per_s: float = 0.0
    backup: BackupPolicy = BackupPolicy.AUTO

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", tuple(self.variants))

    def backup_role(self) -> Role | None:
        """The backup role this app asks for; None when it wants none."""
        if self.backup is BackupPolicy.WARM:
            return Role.WARM
        if self.backup is BackupPolicy.COLD:
            return Role.COLD
        if self.backup is BackupPolicy.NONE:
            return None
        return Role.WARM if self.priority is Priority.CRITICAL else Role.COLD

    def variant_index(self, variant_name: str) -> int | None:
        for index, variant in enumerate(self.variants):
            if variant.name == variant_name:
                return index
        return None


@dataclasses.dataclass(frozen=True)
class Node:
    """A peer's capacities. Loaded models occupy the memory of the node's
    device: accelerator memory on an accelerator node, host memory on a
    `cpu` node (set both alike for unified-memory boards such as Jetsons).
    `hold_down` marks a recently recovered node: it may take backups but no
    primaries until the leader clears the flag."""

    node_id: str
    device_kind: str
    memory_bytes: int
    accelerator_memory_bytes: int
    storage_bytes: int
    health: Health = Health.ALIVE
    hold_down: bool = False

    @property
    def model_memory_bytes(self) -> int:
        if self.device_kind == "cpu":
            return self.memory_bytes
        return self.accelerator_memory_bytes


@dataclasses.dataclass(frozen=True, order=True)
class Replica:
    app: str
    node_id: str
    variant: str
    role: Role = dataclasses.field(compare=False)

    def __post_init__(self) -> None:
        assert isinstance(self.role, Role), self.role


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which variant of each app runs where, in which role. Replicas are kept
    sorted by (app, node) so that equal plans are equal values."""

    epoch: int = 0
    replicas: tuple[Replica, ...] = ()

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.replicas, key=lambda r: (r.app, r.node_id)))
        object.__setattr__(self, "replicas", ordered)

    def replicas_of(self, app: str) -> tuple[Replica, ...]:
        return tuple(r for r in self.replicas if r.app == app)

    def primary_of(self, app: str) -> Replica | None:
        for replica in self.replicas:
            if replica.app == app and replica.role is Role.PRIMARY:
                return replica
        return None

    def assignment(self) -> frozenset[tuple[str, str, str, Role]]:
        """The plan without its epoch: what stability compares."""
        return frozenset((r.app, r.node_id, r.variant, r.role) for r in self.replicas)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every knob of the planner, with the bound it puts on its decisions."""

    # Co-location: a primary's latency grows by this fraction per other
    # primary on its node (the paper measured 2-17 %), and by the smaller
    # one per idle warm backup, which holds memory but computes little.
    inflation_per_primary: float = 0.08
    inflation_per_warm: float = 0.01
    # New load never brings a node past (1 - headroom) of memory, storage or
    # compute; replicas already there may use it all.
    headroom_fraction: float = 0.1
    # At most this many model loads (primaries and warm backups) and
    # prefetches per plan, so one failure cannot start a storm; the rest
    # follows in later epochs (PlanResult.complete says whether any waited).
    loads_per_plan_max: int | None = 32
    prefetches_per_plan_max: int | None = 64
    # Objective: value of one unit of accuracy served, per priority.
    priority_weights: tuple[float, float, float] = (1.0, 3.0, 9.0)
    # Objective: accuracy-units lost per second of expected recovery time.
    recovery_weight_per_s: float = 0.01
    # Recovery time of an app that is not served at all.
    unserved_recovery_ms: float = 60_000.0
    # Throughputs used to estimate loading and transfer time from a size.
    load_bytes_per_s: float = 1.0e9
    transfer_bytes_per_s: float = 1.25e8  # about 1 Gb/s

    def __post_init__(self) -> None:
        if not 0.0 <= self.headroom_fraction < 1.0:
            raise InvalidProblem(f"headroom_fraction {self.headroom_fraction} not in [0, 1)")
        if self.inflation_per_primary < 0 or self.inflation_per_warm < 0:
            raise InvalidProblem("inflation must not be negative")
        if self.load_bytes_per_s <= 0 or self.transfer_bytes_per_s <= 0:
            raise InvalidProblem("throughputs must be positive")

    def weight(self, priority: Priority) -> float:
        return self.priority_weights[int(priority)]

    def load_ms(self, variant: Variant) -> float:
        if variant.load_ms is not None:
            return variant.load_ms
        return 1000.0 * variant.size_bytes / self.load_bytes_per_s

    def transfer_ms(self, variant: Variant) -> float:
        return 1000.0 * variant.size_bytes / self.transfer_bytes_per_s


DEFAULT_SETTINGS = Settings()

APPS_MAX = 10_000
NODES_MAX = 10_000
VARIANTS_PER_APP_MAX = 64


def _frozen_artifacts(artifacts: Mapping[str, frozenset[str]]) -> Mapping[str, frozenset[str]]:
    return MappingProxyType({k: frozenset(v) for k, v in sorted(artifacts.items())})


@dataclasses.dataclass(frozen=True)
class Problem:
    """Everything one planning round looks at.

    `artifacts` maps a node id to the variant names on its disk.
    `unloadable` holds (node id, variant name) pairs that just failed to load
    there: the planner places that variant elsewhere while they last.
    `restore_allowed` is the restore hold-down: the leader clears it for a
    while after a failure, and the planner then keeps running primaries at
    their (possibly smaller) variants instead of reshuffling a cluster that
    has just been hurt.
    """

    nodes: tuple[Node, ...]
    apps: tuple[App, ...]
    current: Plan = Plan()
    artifacts: Mapping[str, frozenset[str]] = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )
    restore_allowed: bool = True
    settings: Settings = DEFAULT_SETTINGS
    unloadable: frozenset[tuple[str, str]] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(sorted(self.nodes, key=lambda n: n.node_id)))
        object.__setattr__(self, "apps", tuple(sorted(self.apps, key=lambda a: a.name)))
        object.__setattr__(self, "artifacts", _frozen_artifacts(self.artifacts))
        object.__setattr__(self, "unloadable", frozenset(self.unloadable))
        if len(self.nodes) > NODES_MAX or len(self.apps) > APPS_MAX:
            raise InvalidProblem(f"too large: {len(self.nodes)} nodes, {len(self.apps)} apps")
        _require_unique([n.node_id for n in self.nodes], "node id")
        _require_unique([a.name for a in self.apps], "app name")
        for app in self.apps:
            if not app.variants or len(app.variants) > VARIANTS_PER_APP_MAX:
                raise InvalidProblem(f"app {app.name}: {len(app.variants)} variants")
            _require_unique([v.name for v in app.variants], f"variant of {app.name}")
            if app.slo_ms <= 0 or app.request_rate_per_s < 0:
                raise InvalidProblem(f"app {app.name}: bad slo or request rate")
            for variant in app.variants:
                if variant.memory_bytes < 0 or variant.size_bytes < 0:
                    raise InvalidProblem(f"variant {variant.name}: negative size")
        for node in self.nodes:
            if min(node.memory_bytes, node.accelerator_memory_bytes, node.storage_bytes) < 0:
                raise InvalidProblem(f"node {node.node_id}: negative capacity")

    def node(self, node_id: str) -> Node | None:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        return None

    def app(self, name: str) -> App | None:
        for app in self.apps:
            if app.name == name:
                return app
        return None

    def artifacts_on(self, node_id: str) -> frozenset[str]:
        return self.artifacts.get(node_id, frozenset())

    def advanced(self, plan: Plan) -> Problem:
        """The problem as it stands once `plan` has been carried out: the plan
        is current and every replica's artifact is on its node's disk."""
        artifacts = {node_id: set(names) for node_id, names in self.artifacts.items()}
        for replica in plan.replicas:
            artifacts.setdefault(replica.node_id, set()).add(replica.variant)
        return dataclasses.replace(
            self, current=plan, artifacts={k: frozenset(v) for k, v in artifacts.items()}
        )


def _require_unique(names: list[str], what: str) -> None:
    if len(set(names)) != len(names):
        raise InvalidProblem(f"duplicate {what}")
