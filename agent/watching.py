"""Who watches whom: the ring of watchers above 8 members and its rotation rounds. The
counts follow consensus/watch.py, the rule the state machine confirms failures by. Pure."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from redge.consensus.watch import ALL_MEMBERS_MAX, FANOUT, watchers_per_node

# ---------------------------------------------------------------------------
# who watches whom

SMALL_CLUSTER_MAX = ALL_MEMBERS_MAX
DEFAULT_FANOUT = FANOUT


def _ring_position(seed: int, round_number: int, node_id: str) -> bytes:
    material = f"{seed}:{round_number}:{node_id}".encode()
    return hashlib.blake2b(material, digest_size=16).digest()


def watch_round(now_s: float, rotation_s: float) -> int:
    """The rotation round of the watch sets at wall time `now_s`, for clusters still at command
    format 1 (from format 2 the round is committed: consensus RotateWatch). Every peer computes the
    same from its own clock. Peers up to ~1 s apart on a turn is harmless: a new watcher
    gives a node it has not heard yet `first_heartbeat_grace_ms`, and a node keeps sending
    to the watchers it dropped that long (`HeartbeatService.set_targets`). 0 when off."""
    if rotation_s <= 0:
        return 0
    return int(now_s // rotation_s)


def monitoring_targets(
    self_id: str,
    member_ids: Iterable[str],
    *,
    seed: int = 0,
    round_number: int = 0,
    fanout: int = DEFAULT_FANOUT,
    small_cluster_max: int = SMALL_CLUSTER_MAX,
    cluster_size: int | None = None,
) -> list[str]:
    """The nodes `self_id` exchanges heartbeats with and watches, among the live
    `member_ids`; `cluster_size` is the members that have not left, failed ones included
    (default: the live ones), which decides whether the watch is bounded
    (consensus/watch.py, the rule the state machine counts observers by).

    Small clusters: everyone watches everyone. Larger ones: members are placed
    on a ring shuffled by (seed, round_number) and each watches its fanout/2
    nearest neighbours on each side. The relation is symmetric (a watches b
    iff b watches a), so the heartbeats one node sends are exactly the ones
    its watchers need, and every node has exactly `fanout` watchers (fanout
    rounded up to even). Changing `round_number` (e.g. from a committed
    epoch, or wall time / rotation period) rotates who watches whom, so one
    persistently bad observer cannot hide or frame a node for long. Every
    member computes the same answer without talking.
    """
    members = sorted(set(member_ids) | {self_id})
    others = [m for m in members if m != self_id]
    assert fanout >= 1
    half = (fanout + 1) // 2
    size = max(cluster_size or 0, len(members))
    if watchers_per_node(size, small_cluster_max, fanout) >= len(others):
        return others
    ring = sorted(members, key=lambda m: _ring_position(seed, round_number, m))
    index = ring.index(self_id)
    size = len(ring)  # (the ring is the live members only)
    chosen: list[str] = []
    for distance in range(1, half + 1):
        chosen.append(ring[(index + distance) % size])
        chosen.append(ring[(index - distance) % size])
    return chosen
