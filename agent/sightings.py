"""How long ago this peer saw each member change, on its own monotonic clock.

The committed state carries times (`at_ms`), but each is the wall clock of whichever node
proposed the command: comparing one with this peer's clock compares two machines' clocks,
and a peer whose clock is an hour ahead would hold a recovered node down for an hour. The
leader's timers (the hold-down after a recovery, the pause before growing apps back after
a failure, the grace before removing a departed voter) are therefore durations since this
peer first saw the change, on one clock. A peer that learns of a change late (it started,
or was sent a snapshot, after it committed) sees it later and so waits longer than the
others: never shorter than the setting, at most one setting longer.
"""

from __future__ import annotations

from redge.agent.clock import Clock
from redge.consensus.state import FAILED, LEFT, ClusterState, Member

RECOVERED_EVENT = "member_recovered"


class Sightings:
    """First sightings of each member incarnation and of each (incarnation, status)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._incarnations: dict[tuple[str, int], float] = {}
        self._statuses: dict[tuple[str, int, str], float] = {}
        # (node, variant) -> when this peer saw its load there fail (its Report).
        self._load_failures: dict[tuple[str, str], float] = {}

    def observe(self, state: ClusterState) -> None:
        """Note what is new in `state` (call it on every commit; cheap: one pass over members)."""
        now_ms = self.clock.now_ms()
        incarnations, statuses = {}, {}
        for member in state.members.values():
            key = (member.node_id, member.incarnation)
            incarnations[key] = self._incarnations.get(key, now_ms)
            status_key = (*key, member.status)
            statuses[status_key] = self._statuses.get(status_key, now_ms)
        self._incarnations, self._statuses = incarnations, statuses

    def incarnation_age_ms(self, member: Member) -> float:
        seen = self._incarnations.get((member.node_id, member.incarnation))
        return 0.0 if seen is None else self.clock.now_ms() - seen

    def status_age_ms(self, member: Member) -> float:
        seen = self._statuses.get((member.node_id, member.incarnation, member.status))
        return 0.0 if seen is None else self.clock.now_ms() - seen

    def hold_down_left_ms(self, state: ClusterState, member: Member) -> float:
        """How much longer `member` takes no primaries: `hold_down_ms` from when this peer first
        saw the incarnation that recovered from a confirmed failure; 0 for any other."""
        if member.hold_down_until_ms <= 0 or member.status in (FAILED, LEFT):
            return 0.0
        if recovered_incarnation(state, member.node_id) != member.incarnation:
            return 0.0
        return max(0.0, state.settings.hold_down_ms - self.incarnation_age_ms(member))

    def since_last_failure_ms(self, state: ClusterState) -> float | None:
        """How long ago this peer saw the latest of the failed members fail (None: none failed)."""
        ages = [self.status_age_ms(m) for m in state.members.values() if m.status == FAILED]
        return min(ages) if ages else None

    def left_for_ms(self, member: Member) -> float:
        return self.status_age_ms(member) if member.status == LEFT else 0.0

    def load_failed(self, node_id: str, variant: str) -> None:
        self._load_failures[(node_id, variant)] = self.clock.now_ms()

    def load_succeeded(self, node_id: str, variant: str | None = None) -> None:
        """`variant` loaded on `node_id` (None: the node restarted, so forget all of it)."""
        for key in [k for k in self._load_failures if k[0] == node_id and variant in (None, k[1])]:
            del self._load_failures[key]

    def unloadable(self, avoid_ms: float) -> dict[tuple[str, str], float]:
        """(node, variant) pairs whose load failed less than `avoid_ms` ago, with the time left."""
        now_ms = self.clock.now_ms()
        return {key: avoid_ms - (now_ms - at) for key, at in self._load_failures.items() if now_ms - at < avoid_ms}


def recovered_incarnation(state: ClusterState, node_id: str) -> int | None:
    """The incarnation of `node_id` whose Join ended a confirmed failure, as the committed
    events record it (None if none is in the event window)."""
    for event in reversed(state.events):
        if event.kind == RECOVERED_EVENT and event.fields.get("node") == node_id:
            return event.fields.get("incarnation")
    return None
