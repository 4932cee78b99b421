"""Faults as data: what can go wrong with a cluster, each with its own undo.

A fault is a frozen dataclass (Jepsen calls these nemeses): it can be written in a scenario
file, printed, compared and hashed, and it does nothing until a `Nemesis` applies it to a
running cluster. Every fault has `apply` and its inverse `heal`, and both are idempotent:
applying an active fault or healing a healed one changes nothing, so a schedule that is
interrupted half-way can always be healed in full.

Targets are node ids or selectors resolved when the fault is applied: "leader" (the Raft
leader at that moment), "primary:APP" (the node serving APP in the committed plan),
"follower" and "random" (drawn from the nemesis's seeded
`random.Random`, from a sorted list, so one seed gives one schedule). The nemesis records
which nodes each fault touched and when, because measurement and the checker need exactly
that: a confirmed failure of a node no fault touched is a false positive.

What each fault needs:

| fault | mechanism | loopback | netns |
| --- | --- | --- | --- |
| Crash, KillLeader | SIGKILL; heal restarts from the data dir | yes | yes |
| Restart | SIGTERM (the peer leaves); heal starts it again | yes | yes |
| Hang | SIGSTOP / SIGCONT | yes | yes |
| SlowNode | cgroup v1 cpu.cfs_quota_us (root) | yes | yes |
| CpuLoad | busy-loop processes beside the peers (touches no node) | yes | yes |
| Partition, PacketLoss | nftables in the namespaces | no | yes |
| Delay | user-space proxy (chaos/proxy.py) behind an nftables redirect | no | yes |
| Bandwidth | tc tbf on the node's interface | no | yes |
| Cascade | a schedule of the above | as its parts | as its parts |

A fault that cannot run where it is asked to raises `FaultUnavailable` saying why, before
anything is changed.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from redge.chaos.cluster import LocalCluster

LEADER_WAIT_S = 10.0
PROXY_READY_S = 10.0
PROXY_PORT_OFFSET = 10000
CGROUP_CPU_ROOT = Path("/sys/fs/cgroup/cpu")
CGROUP_PERIOD_US = 100_000
CASCADE_DURATION_S_MAX = 600.0
CPU_LOAD_WORKERS_MAX = 16
CPU_LOAD_PERIOD_S = 0.1
# A worker is busy for `busy_fraction` of every period and sleeps the rest: load that comes
# and goes on the scheduler's time scale, as a co-located job's would.
_CPU_LOAD_WORKER = (
    "import sys, time\n"
    "busy_s = float(sys.argv[1]) * float(sys.argv[2]); period_s = float(sys.argv[2])\n"
    "while True:\n"
    "    start = time.monotonic()\n"
    "    while time.monotonic() - start < busy_s: pass\n"
    "    time.sleep(max(0.0, period_s - (time.monotonic() - start)))\n"
)


class FaultUnavailable(Exception):
    """This fault cannot be injected here (wrong mode, no root, a tool missing)."""


def now_ms() -> float:
    return time.time() * 1000


# ---------------------------------------------------------------------- faults


class Fault:
    """Base of every fault. Subclasses are frozen dataclasses."""

    kind: ClassVar[str] = "fault"
    needs_netns: ClassVar[bool] = False

    def unavailable_reason(self, mode: str) -> str | None:
        """Why this fault cannot run in cluster `mode` on this machine, or None."""
        if self.needs_netns and mode != "netns":
            return f"{self.kind} needs mode = \"netns\" (separate network stacks); loopback has one shared stack"
        if self.needs_netns:
            from redge.chaos.netns import netns_unavailable_reason

            return netns_unavailable_reason()
        return None

    def apply(self, nemesis: Nemesis) -> tuple[str, ...]:
        raise NotImplementedError

    def heal(self, nemesis: Nemesis) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return repr(self)


@dataclass(frozen=True)
class Crash(Fault):
    """SIGKILL one peer; healing restarts it from its data directory (a new incarnation)."""

    node: str = "follower"
    kind: ClassVar[str] = "crash"

    def apply(self, nemesis: Nemesis) -> tuple[str, ...]:
        node = nemesis.resolve(self, (self.node,))[0]
        nemesis.note_targets(self, (node,))
        nemesis.cluster.peers[node].kill()
        return (node,)

    def heal(self, nemesis: Nemesis) -> None:
        _start_stopped(nemesis, self)


def _start_stopped(nemesis: Nemesis, fault: Fault) -> None:
    """Start again, from its data directory, every peer `fault` stopped."""
    for node in nemesis.touched(fault):
        peer = nemesis.cluster.peers[node]
        if not peer.running():
            if peer.log_file is not None:
                peer.log_file.close()
            peer.start()


@dataclass(frozen=True)
class Restart(Fault):
    """Stop one peer as an operator does (SIGTERM: it leaves the cluster, finishes the
    requests in flight), and start it again from its data directory at the heal. A peer
    restarted while others watch is the storm an upgrade or a crash loop makes."""

    node: str = "follower"
    kind: ClassVar[str] = "restart"

    def apply(self, nemesis: Nemesis) -> tuple[str, ...]:
        node = nemesis.resolve(self, (self.node,))[0]
        nemesis.note_targets(self, (node,))  # before the peer goes: it is leaving from now on
        nemesis.cluster.peers[node].terminate()
        return (node,)

    def heal(self, nemesis: Nemesis) -> None:
        _start_stopped(nemesis, self)


@dataclass(frozen=True)
class KillLeader(Crash):
    """SIGKILL whichever peer is the Raft leader when the fault is applied."""

    node: str = "leader"
    kind: ClassVar[str] = "kill-leader"


@dataclass(frozen=True)
class Hang(Fault):
    """SIGSTOP one peer: its sockets stay open but it answers nothing. Heal: SIGCONT."""

    node: str = "follower"
    kind: ClassVar[str] = "hang"

    def apply(self, nemesis: Nemesis) -> tuple[str, ...]:
        node = nemesis.resolve(self, (self.node,))[0]
        nemesis.note_targets(self, (node,))
        for pid in process_tree(nemesis.cluster.peers[node].pid):
            _signal(pid, signal.SIGSTOP)
        return (node,)

    def heal(self, nemesis: Nemesis) -> None:
        for node in nemesis.touched(self):
            for pid in process_tree(nemesis.cluster.peers[node].pid):
                _signal(pid, signal.SIGCONT)


@dataclass(frozen=True)
class Partition(Fault):
    """Cut the network between groups of peers (clients still reach every peer).

    `groups` lists node ids or selectors; the group ("rest",) holds every node not named
    elsewhere. With `one_way`, packets from the first group to the others are dropped and
    packets the other way pass.
    """

    groups: tuple[tuple[str, ...], ...] = ()
    one_way: bool = False
    kind: ClassVar[str] = "partition"
    needs_netns: ClassVar[bool] = True

    def apply(self, nemesis: Nemesis) -> tuple[str, ...]:
        groups = nemesis.resolve_groups(self, self.groups)
        network = nemesis.network()
        for index, group in enumerate(groups):
            if self.one_way:
                blocked = [] if index == 0 else groups[0]
            else:
                blocked = [node for other, members in enumerate(groups) if other != index for node in members]
            for node in group:
                sources = ", ".join(network.address(n) for n in blocked)
                rules = [f"ip saddr {{ {sources} }} drop"] if blocked else []
                network.set_rules(node, nemesis.key(self), rules)
        return minority(groups, self.one_way)

    def heal(self, nemesis: Nemesis) -> None:
        for node in nemesis.cluster.peers:  # rules sit on both sides of the cut
            nemesis.network().clear_rules(node, nemesis.key(self))


def minority(groups: list[list[str]], one_way: bool) -> tuple[str, ...]:
    """The nodes a partition may rightly get confirmed failed: all but the largest group.

    With `one_way` the first group is the one cut off (its packets are dropped).
    """
    if one_way:
        return tuple(groups[0])
    largest = max(range(len(groups)), key=lambda index: (len(groups[index]), -index))
    return tuple(node for index, group in enumerate(groups) if index != largest for node in group)


@dataclass(frozen=True)
class PacketLoss(Fault):
    """Drop `percent` of the packets arriving at each node (from peers and clients)."""

    nodes: tuple[str, ...] = ("follower",)
    percent: int = 5
    kind: ClassVar[str] = "packet-loss"
    needs_netns: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 1 <= self.percent <= 100:
            raise ValueError("percent must be 1..100")

    def apply(self, nemesis: Nemesis) -> tuple[str, ...]:
        nodes = nemesis.resolve(self, self.nodes)
        network = nemesis.network()
        from redge.chaos.netns import SUBNET_PREFIX

        match = f"ip saddr {SUBNET_PREFIX}.0/24"
        rule = f"{match} drop" if self.percent >= 100 else f"{match} numgen random mod 100 < {self.percent} drop"
        for node in nodes:
            network.set_rules(node, nemesis.key(self), [rule])
        return nodes

    def heal(self, nemesis: Nemesis) -> None:
        for node in nemesis.touched(self):
            nemesis.network().clear_rules(node, nemesis.key(self))


@dataclass(frozen=True)
class Delay(Fault):
    """Delay every packet arriving at each node by `ms` ± `jitter_ms` (uniform).

    The kernel here has no netem, so a user-space proxy (chaos/proxy.py) in the node's
    namespace receives the node's HTTP, Raft and heartbeat traffic through an nftables
    redirect and forwards it late. New connections and flows pass through the proxy; if the
    `conntrack` tool is installed existing ones are cut so that they reconnect through it.
    """

    nodes: tuple[str, ...] = ("follower",)
    ms: float = 50.0
    jitter_ms: float = 0.0
    kind: ClassVar[str] = "delay"
    needs_netns: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.ms < 0 or self.jitter_ms < 0 or self.jitter_ms > self.ms:
            raise ValueError("need 0 <= jitter_ms <= ms")

    def apply(self, nemesis: Nemesis) -> tuple[str, ...]:
        nodes = nemesis.resolve(self, self.nodes)
        network = nemesis.network()
        for node in nodes:
            peer = nemesis.cluster.peers[node]
            address = network.address(node)
            tcp_ports = (peer.http_port, peer.raft_port)
            command = [
                *network.exec_prefix(node), sys.executable, "-m", "redge.chaos.proxy",
                "--target", address, "--delay-ms", str(self.ms), "--jitter-ms", str(self.jitter_ms),
                "--seed", str(nemesis.rng.randrange(2**32)),
            ]
            for port in tcp_ports:
                command += ["--tcp", f"{port + PROXY_PORT_OFFSET}:{port}"]
            command += ["--udp", f"{peer.heartbeat_port + PROXY_PORT_OFFSET}:{peer.heartbeat_port}"]
            nemesis.start_proxy((self, node), command)
            rules = [f'iifname "eth0" tcp dport {port} redirect to :{port + PROXY_PORT_OFFSET}' for port in tcp_ports]
            rules.append(
                f'iifname "eth0" udp dport {peer.heartbeat_port} redirect to :{peer.heartbeat_port + PROXY_PORT_OFFSET}'
            )
            network.set_rules(node, nemesis.key(self), [], rules)
            _flush_conntrack(network.exec_prefix(node))
        return nodes

    def heal(self, nemesis: Nemesis) -> None:
        network = nemesis.network()
        for node in nemesis.touched(self):
            network.clear_rules(node, nemesis.key(self))
            _flush_conntrack(network.exec_prefix(node))
            nemesis.stop_proxy((self, node))


@dataclass(frozen=True)
class Bandwidth(Fault):
    """Limit what a node sends to `rate_mbit` (tc tbf on its interface)."""

    node: str = "follower"
    rate_mbit: float = 10.0
    kind: ClassVar[str] = "bandwidth"
    needs_netns: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not self.rate_mbit > 0:
            raise ValueError("rate_mbit must be > 0")

    def apply(self, nemesis: Nemesis) -> tuple[str, ...]:
        node = nemesis.resolve(self, (self.node,))[0]
        rate_kbit = max(8, int(self.rate_mbit * 1000))
        burst_kbit = max(32, rate_kbit // 100)
        nemesis.network().tc(
            node, ["qdisc", "replace", "dev", "eth0", "root", "tbf",
                   "rate", f"{rate_kbit}kbit", "burst", f"{burst_kbit}kbit", "latency", "400ms"],
        )
        return (node,)

    def heal(self, nemesis: Nemesis) -> None:
        from redge.chaos.netns import NetnsUnavailable

        for node in nemesis.touched(self):
            try:
                nemesis.network().tc(node, ["qdisc", "del", "dev", "eth0", "root"])
            except NetnsUnavailable:
                pass  # already gone: healing twice is fine


@dataclass(frozen=True)
class SlowNode(Fault):
    """Give a peer (and its children) `cpu_fraction` of one CPU via a cgroup v1 quota."""

    node: str = "follower"
    cpu_fraction: float = 0.1
    kind: ClassVar[str] = "slow-node"

    def __post_init__(self) -> None:
        if not 0.01 <= self.cpu_fraction <= 64:
            raise ValueError("cpu_fraction must be in 0.01..64")

    def unavailable_reason(self, mode: str) -> str | None:
        if os.geteuid() != 0:
            return "slow-node needs root to write cgroups"
        if not (CGROUP_CPU_ROOT / "cpu.cfs_quota_us").exists():
            return f"slow-node needs the cgroup v1 cpu controller at {CGROUP_CPU_ROOT}"
        if not os.access(CGROUP_CPU_ROOT, os.W_OK):
            return f"slow-node cannot write {CGROUP_CPU_ROOT} (read-only here)"
        return None

    def apply(self, nemesis: Nemesis) -> tuple[str, ...]:
        node = nemesis.resolve(self, (self.node,))[0]
        quota_us = max(1000, int(self.cpu_fraction * CGROUP_PERIOD_US))
        nemesis.cpu_groups.limit(f"{nemesis.tag}-{node}", process_tree(nemesis.cluster.peers[node].pid), quota_us)
        return (node,)

    def heal(self, nemesis: Nemesis) -> None:
        for node in nemesis.touched(self):
            nemesis.cpu_groups.release(f"{nemesis.tag}-{node}")


@dataclass(frozen=True)
class CpuLoad(Fault):
    """Run `workers` busy-loop processes on the machine, each busy `busy_fraction` of the time.

    CPU pressure with every peer alive and reachable: the peers, their model hosts and the
    workers share the cores. It touches no node, so a failure confirmed while it runs is a
    false positive. Heal: the workers are killed. Nice 0 like the peers, no root needed.
    """

    workers: int = 2
    busy_fraction: float = 0.5
    kind: ClassVar[str] = "cpu-load"

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= CPU_LOAD_WORKERS_MAX:
            raise ValueError(f"workers must be 1..{CPU_LOAD_WORKERS_MAX}")
        if not 0.01 <= self.busy_fraction <= 1.0:
            raise ValueError("busy_fraction must be in 0.01..1")

    def apply(self, nemesis: Nemesis) -> tuple[str, ...]:
        command = [sys.executable, "-c", _CPU_LOAD_WORKER, str(self.busy_fraction), str(CPU_LOAD_PERIOD_S)]
        nemesis.start_workers(self, [command] * self.workers)
        return ()

    def heal(self, nemesis: Nemesis) -> None:
        nemesis.stop_workers(self)


@dataclass(frozen=True)
class Cascade(Fault):
    """A schedule of faults: (offset_s, fault, duration_s or None for "until healed")."""

    steps: tuple[tuple[float, Fault, float | None], ...] = ()
    kind: ClassVar[str] = "cascade"

    def __post_init__(self) -> None:
        for offset_s, fault, duration_s in self.steps:
            if offset_s < 0 or (duration_s is not None and duration_s <= 0):
                raise ValueError("cascade offsets must be >= 0 and durations > 0")
            if isinstance(fault, Cascade):
                raise TypeError("a cascade cannot hold a cascade")
        if self.length_s() > CASCADE_DURATION_S_MAX:
            raise ValueError(f"a cascade lasts at most {CASCADE_DURATION_S_MAX:.0f}s")

    def length_s(self) -> float:
        return max((offset + (duration or 0.0) for offset, _, duration in self.steps), default=0.0)

    def unavailable_reason(self, mode: str) -> str | None:
        for _, fault, _ in self.steps:
            reason = fault.unavailable_reason(mode)
            if reason:
                return reason
        return None

    def flatten(self, at_s: float) -> list[tuple[float, Fault, float | None]]:
        """The steps as a plain schedule starting at `at_s` (what the runner executes)."""
        return sorted(((at_s + offset, fault, duration) for offset, fault, duration in self.steps),
                      key=lambda step: step[0])

    def apply(self, nemesis: Nemesis) -> tuple[str, ...]:
        """Run the whole schedule now, blocking for its length (bounded by the cascade limit)."""
        started = time.monotonic()
        actions = []
        for offset, fault, duration in self.steps:
            actions.append((offset, 0, fault))
            if duration is not None:
                actions.append((offset + duration, 1, fault))
        actions.sort(key=lambda action: (action[0], action[1]))
        stopped = threading.Event()
        touched: list[str] = []
        for offset, is_heal, fault in actions:
            stopped.wait(max(0.0, started + offset - time.monotonic()))
            if is_heal:
                nemesis.heal(fault)
            else:
                touched += nemesis.apply(fault).targets
        return tuple(dict.fromkeys(touched))

    def heal(self, nemesis: Nemesis) -> None:
        for _, fault, _ in reversed(self.steps):
            nemesis.heal(fault)


FAULT_KINDS: dict[str, type[Fault]] = {
    cls.kind: cls
    for cls in (Crash, KillLeader, Restart, Hang, Partition, PacketLoss, Delay, Bandwidth, SlowNode, CpuLoad, Cascade)
}


# ---------------------------------------------------------------------- the nemesis


@dataclass
class FaultRecord:
    """One application of a fault, as the measurement and the checker read it."""

    fault_id: int
    kind: str
    description: str
    targets: tuple[str, ...]
    applied_at_ms: float
    healed_at_ms: float | None = None
    error: str = ""
    # What a fault that sends traffic counted while it ran (chaos/hostile.py): requests sent,
    # statuses answered, requests that got no answer at all.
    notes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fault_id": self.fault_id, "kind": self.kind, "description": self.description,
            "targets": list(self.targets), "applied_at_ms": self.applied_at_ms,
            "healed_at_ms": self.healed_at_ms, "error": self.error, "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaultRecord:
        return cls(**{**data, "targets": tuple(data["targets"])})


@dataclass
class Nemesis:
    """Applies faults to one cluster, remembers what each touched, and heals them all at the end."""

    cluster: LocalCluster
    rng: random.Random
    records: list[FaultRecord] = field(default_factory=list)
    tag: str = field(default_factory=lambda: f"redge-chaos-{os.getpid()}-{time.monotonic_ns() % 10**6}")
    _active: dict[Fault, FaultRecord] = field(default_factory=dict)
    _proxies: dict[Any, subprocess.Popen[bytes]] = field(default_factory=dict)
    _workers: dict[Any, list[subprocess.Popen[bytes]]] = field(default_factory=dict)
    _background: dict[Any, tuple[threading.Thread, threading.Event]] = field(default_factory=dict)
    cpu_groups: CpuGroups = field(default_factory=lambda: CpuGroups())

    @property
    def mode(self) -> str:
        return self.cluster.mode

    def network(self) -> Any:
        if self.cluster.network is None:
            raise FaultUnavailable("this fault needs a cluster in netns mode")
        return self.cluster.network

    def key(self, fault: Fault) -> str:
        return "f" + hashlib.sha1(repr(fault).encode()).hexdigest()[:12]

    def touched(self, fault: Fault) -> tuple[str, ...]:
        record = self._active.get(fault)
        return record.targets if record else ()

    def is_active(self, fault: Fault) -> bool:
        return fault in self._active

    # ------------------------------------------------------------------ resolution

    def leader(self) -> str:
        from redge.chaos.cluster import ClusterError

        try:
            return self.cluster.wait_leader(timeout_s=LEADER_WAIT_S)
        except ClusterError as error:
            raise FaultUnavailable(f"no agreed leader to resolve a selector: {error}") from None

    def primary_of(self, app: str) -> str:
        """The node the committed plan makes `app`'s primary, as the leader sees it now."""
        from redge.chaos.observe import primary_of

        node = primary_of(self.cluster, self.leader(), app)
        if node is None:
            raise FaultUnavailable(f"app {app!r} has no primary in the committed plan")
        return node

    def resolve(self, fault: Fault, selectors: tuple[str, ...]) -> tuple[str, ...]:
        """Node ids for `selectors`; random picks come from the seeded rng, from sorted lists."""
        nodes: list[str] = []
        for selector in selectors:
            candidates = sorted(n for n in self.cluster.peers if n not in nodes)
            if selector == "leader":
                node = self.leader()
            elif selector == "follower":
                leader = self.leader()
                node = self.rng.choice([n for n in candidates if n != leader])
            elif selector == "random":
                node = self.rng.choice(candidates)
            elif selector.startswith("primary:"):
                node = self.primary_of(selector.partition(":")[2])
            elif selector in self.cluster.peers:
                node = selector
            else:
                raise FaultUnavailable(f"{fault.kind}: unknown node {selector!r}")
            nodes.append(node)
        return tuple(nodes)

    def resolve_groups(self, fault: Fault, groups: tuple[tuple[str, ...], ...]) -> list[list[str]]:
        named = [list(self.resolve(fault, tuple(s for s in group if s != "rest"))) for group in groups]
        everyone = {node for group in named for node in group}
        rest = sorted(n for n in self.cluster.peers if n not in everyone)
        return [group + (rest if "rest" in original else []) for group, original in zip(named, groups, strict=True)]

    # ------------------------------------------------------------------ apply / heal

    def apply(self, fault: Fault) -> FaultRecord:
        """Inject `fault` (a no-op when it is already active) and record what it touched."""
        if fault in self._active:
            return self._active[fault]
        reason = fault.unavailable_reason(self.mode)
        if reason:
            raise FaultUnavailable(reason)
        record = FaultRecord(len(self.records) + 1, fault.kind, fault.describe(), (), now_ms())
        self.records.append(record)
        self._active[fault] = record
        try:
            record.targets = fault.apply(self)
        except Exception as error:
            record.error = f"{type(error).__name__}: {error}"
            raise
        return record

    def heal(self, fault: Fault) -> None:
        record = self._active.get(fault)
        if record is None:
            return
        try:
            fault.heal(self)
        finally:
            record.healed_at_ms = now_ms()
            del self._active[fault]

    def heal_all(self) -> list[str]:
        """Heal every active fault, newest first; return the errors instead of stopping at one."""
        errors = []
        for fault in reversed(list(self._active)):
            try:
                self.heal(fault)
            except Exception as error:  # noqa: BLE001 - keep healing the rest: leave nothing behind
                errors.append(f"healing {fault.describe()}: {type(error).__name__}: {error}")
        return errors

    def close(self) -> list[str]:
        errors = self.heal_all()
        for key in list(self._proxies):
            self.stop_proxy(key)
        for key in list(self._workers):
            self.stop_workers(key)
        for key in list(self._background):
            self.stop_background(key)
        errors += self.cpu_groups.release_all()
        return errors

    # ------------------------------------------------------------------ proxies

    def start_proxy(self, key: Any, command: list[str]) -> None:
        if key in self._proxies and self._proxies[key].poll() is None:
            return
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        self._proxies[key] = process
        ready = threading.Event()

        def read_ready() -> None:
            assert process.stdout is not None
            if process.stdout.readline().startswith(b"ready"):
                ready.set()

        threading.Thread(target=read_ready, daemon=True).start()
        if not ready.wait(PROXY_READY_S):
            self.stop_proxy(key)
            raise FaultUnavailable(f"the delay proxy did not start in {PROXY_READY_S:.0f}s")

    def stop_proxy(self, key: Any) -> None:
        process = self._proxies.pop(key, None)
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(timeout=10)


    # ------------------------------------------------------------------ load workers

    def start_workers(self, key: Any, commands: list[list[str]]) -> None:
        if key in self._workers:
            return
        processes = self._workers[key] = []
        for command in commands:
            processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                              start_new_session=True))

    def stop_workers(self, key: Any) -> None:
        for process in self._workers.pop(key, []):
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)

    # ------------------------------------------------------------------ traffic threads

    def start_background(self, key: Any, run: Any) -> None:
        """Run `run(stop)` on a thread of its own until `stop` (a threading.Event) is set."""
        if key in self._background:
            return
        stop = threading.Event()
        thread = threading.Thread(target=run, args=(stop,), daemon=True, name=f"nemesis-{key}")
        self._background[key] = (thread, stop)
        thread.start()

    def stop_background(self, key: Any, timeout_s: float = 30.0) -> None:
        entry = self._background.pop(key, None)
        if entry is not None:
            thread, stop = entry
            stop.set()
            thread.join(timeout=timeout_s)

    def record_of(self, fault: Fault) -> FaultRecord | None:
        return self._active.get(fault)

    def note_targets(self, fault: Fault, targets: tuple[str, ...]) -> None:
        """Record whom `fault` touches before it acts (an apply that takes seconds, such as a
        peer's graceful stop, touches its node from its first moment)."""
        record = self._active.get(fault)
        if record is not None:
            record.targets = targets

    def active_records(self) -> list[FaultRecord]:
        return list(self._active.values())


# ---------------------------------------------------------------------- helpers


def _signal(pid: int, signal_number: int) -> None:
    try:
        os.kill(pid, signal_number)
    except ProcessLookupError:
        pass


def process_tree(pid: int | None) -> list[int]:
    """`pid` and every process descended from it (a peer's workers and model host, which run
    in sessions of their own), parents first."""
    if pid is None:
        return []
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))  # parent pid
    found = [pid]
    for parent in found:  # grows while it is walked: breadth first
        found.extend(children.get(parent, []))
    return found


def _flush_conntrack(prefix: list[str]) -> None:
    if shutil.which("conntrack") is None:
        return
    subprocess.run([*prefix, "conntrack", "-F"], capture_output=True, timeout=10, check=False)


class CpuGroups:
    """cgroup v1 cpu groups made for slow nodes; each remembers where its processes came from."""

    def __init__(self, root: Path = CGROUP_CPU_ROOT) -> None:
        self.root = root
        self._groups: dict[str, tuple[Path, dict[int, Path]]] = {}

    def _current_group(self, pid: int) -> Path:
        try:
            for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
                _, controllers, path = line.split(":", 2)
                if "cpu" in controllers.split(","):
                    candidate = self.root / path.lstrip("/")
                    return candidate if candidate.exists() else self.root
        except OSError:
            pass
        return self.root

    def limit(self, name: str, pids: list[int], quota_us: int) -> None:
        if name in self._groups:
            group, origins = self._groups[name]
        else:
            origins = {pid: self._current_group(pid) for pid in pids}
            parent = origins[pids[0]] if pids else self.root
            group = parent / name
            group.mkdir(exist_ok=True)
            self._groups[name] = (group, origins)
        (group / "cpu.cfs_period_us").write_text(str(CGROUP_PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(quota_us))
        for pid in pids:
            origins.setdefault(pid, self._current_group(pid))
            try:
                (group / "cgroup.procs").write_text(str(pid))
            except ProcessLookupError:
                pass

    def release(self, name: str) -> None:
        entry = self._groups.pop(name, None)
        if entry is None:
            return
        group, origins = entry
        try:
            members = [int(p) for p in (group / "cgroup.procs").read_text().split()]
        except OSError:
            members = []
        for pid in members:
            target = origins.get(pid, group.parent)
            try:
                (target / "cgroup.procs").write_text(str(pid))
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while True:
            try:
                group.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() >= deadline:
                    raise
                threading.Event().wait(0.05)  # a process may still be moving out

    def release_all(self) -> list[str]:
        errors = []
        for name in list(self._groups):
            try:
                self.release(name)
            except OSError as error:
                errors.append(f"removing cgroup {name}: {error}")
        return errors
