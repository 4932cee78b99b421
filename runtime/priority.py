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
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


def autogroup_nice(pid: int | str = "self") -> int | None:
    """The niceness of `pid`'s autogroup (`/autogroup-42 nice 10`), or None without one."""
    try:
        return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


@contextmanager
def boosted(nice: int) -> Iterator[bool]:
    """Run the body with this process's scheduling group, and the calling thread, at `nice`
    when that is lower than now (it needs CAP_SYS_NICE: root, or a unit that grants it),
    then put both back. Yields whether the boost took. For the model host's loads: on a busy
    node a recovery's load is the critical path, and the host's usual niceness would give
    it a tenth of a core against a client at nice 0 (measured: resnet18's cold MTTR p50
    296 -> 241 ms at nice 0 instead of 10, on 2 cores under the demo's load)."""
    group = autogroup_nice()
    thread = threading.get_native_id()
    try:
        own = os.getpriority(os.PRIO_PROCESS, thread)
    except OSError:
        own = None
    group_boosted = group is not None and nice < group and set_autogroup_nice(nice)
    thread_boosted = False
    if own is not None and nice < own:
        try:
            os.setpriority(os.PRIO_PROCESS, thread, nice)
            thread_boosted = True
        except OSError:
            pass
    try:
        yield group_boosted or thread_boosted
    finally:
        if group_boosted:
            set_autogroup_nice(group)
        if thread_boosted:
            try:
                os.setpriority(os.PRIO_PROCESS, thread, own)
            except OSError:
                pass
