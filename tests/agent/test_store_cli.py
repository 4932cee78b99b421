"""`redge store quarantine` and `redge store clear`: what failed on a node, and letting it
fetch that artifact again."""

from __future__ import annotations

import pytest

from redge.agent.cli import main
from redge.runtime.store import QUARANTINE_FAILURES_MAX, Store
from redge.runtime.testing import write_family


def test_quarantine_lists_and_clear_forgets(tmp_path, capsys):
    source = tmp_path / "source"
    [manifest] = write_family(source, formats=("onnx",), sizes={"mlp-small": (8, 1)})
    store = Store(tmp_path / "data" / "store", 1 << 30)
    for _ in range(QUARANTINE_FAILURES_MAX):
        store.add_directory(source / manifest.name / manifest.version)
        store.quarantine(*manifest.key, "sha256 mismatch")
    main(["store", "quarantine", "--data-dir", str(tmp_path / "data")])
    listed = capsys.readouterr().out
    assert f"{manifest.name}/{manifest.version}: 3 bad copies (excluded): sha256 mismatch" in listed
    with pytest.raises(SystemExit) as exited:
        main(["store", "clear", "--data-dir", str(tmp_path / "data"), "no-version"])
    assert exited.value.code == 2 and "NAME/VERSION" in capsys.readouterr().err
    main(["store", "clear", "--store", str(store.root), f"{manifest.name}/{manifest.version}"])
    assert f"cleared {manifest.name}/{manifest.version}" in capsys.readouterr().out
    assert store.excluded(*manifest.key) is None
    main(["store", "quarantine", "--store", str(store.root)])
    assert "nothing quarantined" in capsys.readouterr().out
