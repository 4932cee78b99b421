"""The previous release, unpacked from this repository's history, for upgrade tests.

Tests that need it run its code in subprocesses with `PYTHONPATH` set to the returned
folder (which holds it as the package `redge`), beside this build."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

# The release before command formats existed (format 1 only).
PREVIOUS_RELEASE = "190f78d1f34fd606a625552f52988a5d381c14b4"
REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: the previous release cannot be unpacked")
    archive = subprocess.run(["git", "-C", str(REPOSITORY), "archive", PREVIOUS_RELEASE],
                             capture_output=True, timeout=60)
    if archive.returncode != 0:
        pytest.skip(f"the previous release {PREVIOUS_RELEASE[:10]} is not in this checkout's history "
                    f"(a shallow clone?): {archive.stderr.decode(errors='replace').strip()}")
    root = tmp_path_factory.mktemp("previous-release")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(root / "redge", filter="data")
    return root
