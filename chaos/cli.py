"""`redge chaos` and `redge demo`: commands the chaos package adds to the `redge` CLI.

The product does not import its test harness: agent/cli.py finds these through the entry
point group `redge.commands` (pyproject.toml), so a build without chaos/ still has every
other command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def chaos_main(argv: list[str]) -> int:
    """break a local cluster on purpose and measure what it costs (`redge chaos run --help`)"""
    if argv[:1] == ["run"]:
        from redge.chaos.runner import main as run_main

        return run_main(argv[1:])
    parser = argparse.ArgumentParser(prog="redge chaos", description="Break a local cluster on purpose and measure "
                                     "what it costs.")
    parser.add_argument("chaos_command", choices=["run"], help="run: see `redge chaos run --help`")
    parser.parse_args(argv)
    return 2


def demo_main(argv: list[str]) -> int:
    """run a local cluster, break it, and print what it cost (what `make demo` runs)"""
    parser = argparse.ArgumentParser(prog="redge demo", description="Run a local cluster, break it, and print what "
                                     "it cost.")
    parser.add_argument("--out", type=Path, default=Path("results/demo"), help="where to write the report")
    parser.add_argument("--peers", type=int, default=3)
    args = parser.parse_args(argv)
    from redge.chaos.demo import run_demo

    try:
        return run_demo(out_dir=args.out, peer_count=args.peers)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover - `python -m redge.chaos.cli demo ...`
    command, *rest = sys.argv[1:] or ["demo"]
    sys.exit({"chaos": chaos_main, "demo": demo_main}[command](rest))
