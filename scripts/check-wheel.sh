#!/usr/bin/env bash
# Builds redge as a wheel (not editable), installs it into a fresh virtual environment and
# runs a chaos scenario from outside the clone: what a user who runs `pip install .` gets,
# shipped scenario files included. The fresh environment borrows the cached one's
# dependencies (torch is large) through a .pth file; redge itself comes only from the wheel.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps=$("$root/scripts/venv.sh")
work=$(mktemp -d "${TMPDIR:-/tmp}/redge-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$deps/bin/pip" wheel --quiet --no-deps --no-build-isolation --wheel-dir "$work/dist" "$root" >&2
python=$("$deps/bin/python" -c 'import sys; print(sys.base_prefix)')/bin/python3
"$python" -m venv --without-pip "$work/venv"
site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$deps/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$site/redge-deps.pth"
"$deps/bin/pip" --python "$work/venv/bin/python" install --quiet --no-deps "$work"/dist/redge-*.whl >&2
cd "$work"
"$work/venv/bin/python" - <<'PY'
import pathlib, sys
import redge
where = pathlib.Path(redge.__file__).resolve()
assert "site-packages" in where.parts, f"redge came from {where}, not from the installed wheel"
scenarios = sorted(p.name for p in (where.parent / "chaos" / "scenarios").glob("*.toml"))
assert "primary-crash.toml" in scenarios, scenarios
print(f"redge {redge.__version__} installed from the wheel at {where.parent}, {len(scenarios)} scenarios shipped")
PY
"$work/venv/bin/redge" chaos run primary-crash --quiet --out "$work/primary-crash"
echo "redge chaos run primary-crash passed from the installed wheel"
