"""CPU priority: a load boosted where the host may lower its niceness, put back after."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from redge.runtime.priority import autogroup_nice

# Run in a session of its own, so its scheduling group is its own and not the test runner's.
PROBE = """
import json, os, threading
os.setsid()
from redge.runtime.priority import autogroup_nice, boosted, set_autogroup_nice
os.setpriority(os.PRIO_PROCESS, 0, 10)
set_autogroup_nice(10)
thread = threading.get_native_id()
with boosted(2) as took:
    inside = (autogroup_nice(), os.getpriority(os.PRIO_PROCESS, thread))
after = (autogroup_nice(), os.getpriority(os.PRIO_PROCESS, thread))
with boosted(15) as higher:  # never raises niceness: nothing to do
    unchanged = (autogroup_nice(), os.getpriority(os.PRIO_PROCESS, thread))
print(json.dumps({"took": took, "inside": inside, "after": after, "higher": higher, "unchanged": unchanged}))
"""


@pytest.mark.skipif(autogroup_nice() is None, reason="this kernel schedules without autogroups")
def test_a_boost_lowers_group_and_thread_niceness_where_permitted_and_restores_both():
    result = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                                       timeout=60).stdout)
    assert result["after"] == [10, 10]
    assert result["higher"] is False and result["unchanged"] == [10, 10]
    if os.geteuid() == 0:
        assert result["took"] is True and result["inside"] == [2, 2]
    else:  # lowering niceness needs CAP_SYS_NICE: the boost says it did not take, and changes nothing
        assert result["took"] is False and result["inside"] == [10, 10]
