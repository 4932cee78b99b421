"""CPU priority across a peer's processes, as Linux schedules them.

A peer is three kinds of process: the control process (heartbeats, probes, Raft: it must
run the moment it wakes), its HTTP workers and its model host (heavy, and fine to wait).
Niceness alone does not order them: with the kernel's autogroup scheduling (on by default on
desktop and many server kernels) every session is a scheduling group, CPU is shared between
groups first, and niceness only orders the threads inside one group. A control process that
shares its group with a busy worker and model host gets only its group's share against a
busy neighbour, whatever its own niceness. So the worker and the host each start a session,
and thus a group, of their own, and every group's niceness is set as well as its threads':
the control process's group then holds nothing but the control process, and wins the CPU
whenever it wakes.
"""

from __future__ import annotations

import os
from pathlib import Path


def set_autogroup_nice(nice: int, pid: int | str = "self") -> bool:
    """Set the niceness of `pid`'s autogroup (its session's scheduling group); False where
    there is no autogroup or the change is not allowed (a lower value needs CAP_SYS_NICE)."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text(f"{nice}\n")
        return True
    except OSError:
        return False


def own_scheduling_group(nice: int) -> None:
    """Make this process a session (and so an autogroup) of its own, `nice` for both. Call it
    first thing in a child process; never in a process that leads its session already."""
    try:
        os.setsid()
    except OSError:
        pass  # already a session leader: keep the group it has
    if nice:
        set_autogroup_nice(nice)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
        except OSError:
            pass
