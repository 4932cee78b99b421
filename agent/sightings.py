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
    """When this peer first saw each member's (incarnation, status), each recovery from a
    confirmed failure, and each failed load."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._statuses: dict[tuple[str, int, str], float] = {}
        # (node, variant) -> when this peer saw its load there fail (its Report).
        self._load_failures: dict[tuple[str, str], float] = {}
        # node -> (the incarnation that came back from its latest confirmed failure, when
        # this peer saw it come back).
        self._recoveries: dict[str, tuple[int, float]] = {}
        self._scanned: dict[str, int] = {}  # node -> the incarnation whose events were read

    def observe(self, state: ClusterState) -> None:
        """Note what is new in `state` (call it on every commit; cheap: one pass over members)."""
        now_ms = self.clock.now_ms()
        statuses = {}
        for member in state.members.values():
            key = (member.node_id, member.incarnation, member.status)
            statuses[key] = self._statuses.get(key, now_ms)
        self._statuses = statuses
        for member in state.members.values():
            # A recovery comes with a new incarnation, and the committed events say which
            # one: read them once per incarnation. One this peer learns of late (it started
            # later, or got a snapshot) is timed from now, so the hold-down is never shorter.
            if member.hold_down_until_ms <= 0 or self._scanned.get(member.node_id) == member.incarnation:
                continue
            self._scanned[member.node_id] = member.incarnation
            incarnation = recovered_incarnation(state, member.node_id)
            known = self._recoveries.get(member.node_id)
            if incarnation is not None and (known is None or known[0] != incarnation):
                self._recoveries[member.node_id] = (incarnation, now_ms)

    def status_age_ms(self, member: Member) -> float:
        seen = self._statuses.get((member.node_id, member.incarnation, member.status))
        return 0.0 if seen is None else self.clock.now_ms() - seen

    def hold_down_left_ms(self, state: ClusterState, member: Member) -> float:
        """How much longer `member` takes no primaries: `hold_down_ms` from when this peer saw
        it come back from its latest confirmed failure (a restart meanwhile does not end it)."""
        seen = self._recoveries.get(member.node_id)
        if seen is None or member.status in (FAILED, LEFT):
            return 0.0
        return max(0.0, state.settings.hold_down_ms - (self.clock.now_ms() - seen[1]))

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
