#!/usr/bin/env bash
# Prints the path of a virtual environment that holds redge's dependencies, building it first
# when missing. It lives outside the clone, keyed by a hash of the dependency spec, so a fresh
# clone (CI's included) reuses it instead of reinstalling torch; redge itself is installed
# editable from the calling clone each time, which takes seconds.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
# Only what decides the installed packages goes into the key: the [project] table (not the
# [tool.*] settings of pytest or ruff) and the constraints.
spec_hash=$( (sed -n '/^\[project\]/,/^\[tool\./p' "$root/pyproject.toml"; cat "$root/requirements/constraints.txt") | sha256sum | cut -c1-16)
venv=${REDGE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/redge/venv-$spec_hash}
if [ ! -f "$venv/.deps-installed" ]; then
    echo "building the environment in $venv (first run only: torch is large)" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip "setuptools>=77" wheel >&2
    "$venv/bin/pip" install --quiet -c "$root/requirements/constraints.txt" "$root[zoo,dev]" >&2
    "$venv/bin/pip" uninstall --quiet --yes redge >&2
    touch "$venv/.deps-installed"
fi
# Point the environment's `redge` at this clone.
if ! "$venv/bin/python" - "$root" <<'PY' >/dev/null 2>&1
import pathlib, sys
import redge
sys.exit(0 if pathlib.Path(redge.__file__).resolve().parent == pathlib.Path(sys.argv[1]).resolve() else 1)
PY
then
    "$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e "$root" >&2
fi
echo "$venv"
