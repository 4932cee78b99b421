"""Who watches whom, counted: the one rule that the state machine (how many observers confirm
a failure) and the failure detector (which members each node watches) both follow.

Up to `all_members_max` members everyone watches everyone; above it each node has `fanout`
watchers (rounded up to even: its nearest neighbours on both sides of a ring). The count is
of the members that have not left, failed ones included: a failed member still counts
towards the size of the cluster it may come back to. Pure.
"""

from __future__ import annotations

ALL_MEMBERS_MAX = 8
FANOUT = 4


def watchers_per_node(member_count: int, all_members_max: int = ALL_MEMBERS_MAX, fanout: int = FANOUT) -> int:
    """How many watchers each node has among `member_count` members (itself included)."""
    assert fanout >= 1 and member_count >= 0
    others = max(member_count - 1, 0)
    bounded = 2 * ((fanout + 1) // 2)
    return others if member_count <= all_members_max or bounded >= others else bounded
