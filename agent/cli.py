"""The `redge` command line: run a peer, look at a cluster, manage apps.

Commands that talk to a cluster take `--peer URL` (any member's HTTP address) and print a
table for people or, with `--json`, the raw answer for scripts. Errors go to stderr with a
non-zero exit status, never as a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from redge.agent.errors import AgentError, ConfigError

DEFAULT_PEER = "http://127.0.0.1:8101"
PEER_SWITCH_INTERVAL_S = 0.001


def _add_peer_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file with the same keys as the flags ([peer] table)")
    parser.add_argument("--node-id", help="this node's id (letters, digits, . _ -)")
    parser.add_argument("--http", help="HTTP address HOST:PORT (inference, admin, metrics)")
    parser.add_argument("--raft", help="Raft address HOST:PORT")
    parser.add_argument("--heartbeat", help="UDP heartbeat address HOST:PORT")
    parser.add_argument("--peers", help="comma-separated Raft addresses of the other initial members")
    parser.add_argument("--join", help="join a running cluster through a member's HTTP URL")
    parser.add_argument("--data-dir", help="directory for the Raft journal and peer state")
    parser.add_argument("--store", help="model store directory (default DATA_DIR/store)")
    parser.add_argument("--storage-budget-bytes", type=int, help="bytes the model store may use")
    parser.add_argument("--source", help="read-only model repository: a directory or URL")
    parser.add_argument("--profile", help="timing profile: enterprise or iobt")
    parser.add_argument("--secret-file", help="file holding the cluster secret (else REDGE_SECRET)")
    parser.add_argument("--admin-token-file", help="file holding the admin token (else REDGE_ADMIN_TOKEN)")
    parser.add_argument("--read-token-file",
                        help="file holding the read token (else REDGE_READ_TOKEN): with one, reads of the cluster "
                             "state, events, metrics and artifacts need it (or the admin token)")
    parser.add_argument("--log-level", help="debug, info, warning or error")
    parser.add_argument("--memory-bytes", type=int, help="memory this peer offers to models (default: all)")
    parser.add_argument("--accelerator-memory-bytes", type=int, help="accelerator memory offered to models")
    parser.add_argument("--device-kind", help="cpu or gpu")
    parser.add_argument("--model-threads", type=int, help="threads for model inference (default 1)")
    parser.add_argument("--model-host-nice", type=int, help="CPU niceness added to the model host (default 10)")
    parser.add_argument("--model-host-load-nice", type=int,
                        help="the model host's niceness while it loads, where the peer may lower it (root or "
                             "CAP_SYS_NICE; default 0): a recovery's load is the critical path")
    parser.add_argument("--request-body-bytes-max", type=int, help="largest inference request accepted (default 64 MiB)")
    parser.add_argument(
        "--request-bytes-held-max", type=int,
        help="request body bytes held at once across all requests; past it, 503 (default 256 MiB)",
    )
    parser.add_argument(
        "--dynamic-dimension-max", type=int, help="largest value of a model input's dynamic dimension (default 64)"
    )
    parser.add_argument(
        "--held-requests-max", type=int,
        help="requests each HTTP worker holds at once while their apps recover (default 256; 0: answer 503 at once)"
    )
    parser.add_argument(
        "--cold-serving-format", action=argparse.BooleanOptionalAction, default=None,
        help="a cold backup also stores the format this device serves best, its optimised graph derived, so a "
             "recovery loads at about the read of its bytes (default on; off halves a cold backup's disk, and a "
             "recovery serves from the cold format, then switches)",
    )
    parser.add_argument("--http-workers", type=int, help="data-plane worker processes serving HTTP (default 1)")
    parser.add_argument("--http-worker-nice", type=int, help="CPU niceness added to the HTTP workers (default 5)")
    parser.add_argument(
        "--control-nice", type=int,
        help="niceness of the peer's control process where it may take it (root): heartbeats first (default -5)",
    )
    parser.add_argument(
        "--slo-factor", type=float, help="report this node degraded when an app's median latency here exceeds this x its SLO (default 1.5)"
    )
    parser.add_argument(
        "--watch-rotation-s",
        type=float,
        help="above 8 members, move each peer's bounded watch set to a new shuffle this often (default 60; 0: off)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="redge", description="Failure-resilient ML serving for the edge.")
    commands = parser.add_subparsers(dest="command", required=True)

    peer = commands.add_parser("peer", help="run a peer: host models, serve HTTP, vote in Raft")
    _add_peer_flags(peer)

    status = commands.add_parser("status", help="show members, leader, apps and placements")
    status.add_argument("--peer", default=DEFAULT_PEER, help="any member's HTTP URL")
    status.add_argument("--json", action="store_true", help="print the raw snapshot")

    events = commands.add_parser("events", help="show the cluster's event log")
    events.add_argument("--peer", default=DEFAULT_PEER)
    events.add_argument("--since", type=int, default=0, help="only events after this sequence number")
    events.add_argument("--limit", type=int, default=100)
    events.add_argument("--json", action="store_true")
    for sub in (status, events):
        sub.add_argument("--token-file", type=Path,
                         help="read (or admin) token file, for a peer that requires one for reads "
                              "(else REDGE_READ_TOKEN)")

    apps = commands.add_parser("apps", help="register, remove and list apps")
    app_commands = apps.add_subparsers(dest="apps_command", required=True)
    add = app_commands.add_parser("add", help="register or update an app")
    add.add_argument("name")
    add.add_argument("--variants", required=True, help="comma-separated artifact names, largest first")
    add.add_argument("--priority", default="standard", choices=["critical", "standard", "best-effort"])
    add.add_argument("--slo-ms", type=float, default=1000.0)
    add.add_argument("--backup", default="auto", choices=["warm", "cold", "none", "auto"])
    add.add_argument("--request-rate", type=float, default=0.0, help="expected requests per second")
    remove = app_commands.add_parser("rm", help="remove an app")
    remove.add_argument("name")
    app_commands.add_parser("ls", help="list apps and where they run")
    for sub in (add, remove, app_commands.choices["ls"]):
        sub.add_argument("--peer", default=DEFAULT_PEER)
        sub.add_argument("--token-file", type=Path, help="admin token file (else REDGE_ADMIN_TOKEN)")
        sub.add_argument("--json", action="store_true")

    fetch = commands.add_parser("fetch", help="copy an artifact into a model store, with progress and hash checks")
    fetch.add_argument("name")
    fetch.add_argument("version")
    fetch.add_argument("--source", required=True, help="a peer's URL (http://HOST:PORT) or a repository directory")
    fetch.add_argument("--store", required=True, type=Path, help="the model store directory")
    fetch.add_argument("--storage-budget-bytes", type=int, default=10 * 1024**3)

    store = commands.add_parser("store", help="a node's model store: quarantined artifacts, and clearing them")
    store_commands = store.add_subparsers(dest="store_command", required=True)
    quarantined = store_commands.add_parser("quarantine", help="list artifacts that failed their check or load here")
    clear = store_commands.add_parser("clear", help="let the node fetch a quarantined artifact again")
    clear.add_argument("artifact", nargs="?", help="NAME/VERSION (default: every one)")
    for sub in (quarantined, clear):
        sub.add_argument("--store", type=Path, help="the model store directory (default: DATA_DIR/store)")
        sub.add_argument("--data-dir", type=Path, help="the peer's data directory")

    zoo = commands.add_parser("zoo", help="export torchvision model families as redge artifacts")
    zoo.add_argument("zoo_command", choices=["export"], help="export: see `redge zoo export --help`")
    zoo.add_argument("zoo_args", nargs=argparse.REMAINDER)

    for name, entry in sorted(plugin_commands().items()):
        plugin = commands.add_parser(name, add_help=False, help=_plugin_help(entry))
        plugin.add_argument("plugin_args", nargs=argparse.REMAINDER)
    return parser


# Commands other packages add (pyproject.toml, entry points `redge.commands`): each entry is
# a function of the remaining arguments that returns an exit status. The chaos package adds
# `chaos` and `demo` this way, so the product never imports its own test harness.
PLUGIN_GROUP = "redge.commands"


def plugin_commands() -> dict[str, importlib.metadata.EntryPoint]:
    return {entry.name: entry for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP)}


def _plugin_help(entry: importlib.metadata.EntryPoint) -> str:
    """The first line of the command function's docstring (its module imports lazily)."""
    try:
        doc = entry.load().__doc__ or ""
    except ImportError as error:
        return f"unavailable: {error}"
    return doc.strip().splitlines()[0] if doc.strip() else f"from {entry.module}"


BUILT_IN = ("peer", "status", "events", "apps", "fetch", "store", "zoo")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["zoo", "export"]:
        from redge.runtime.zoo import main as zoo_main

        sys.exit(zoo_main(argv[2:]))
    plugins = plugin_commands()
    if argv and argv[0] in plugins and argv[0] not in BUILT_IN:
        sys.exit(plugins[argv[0]].load()(argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        if args.command == "peer":
            _run_peer(args)
        elif args.command == "status":
            _status(args)
        elif args.command == "events":
            _events(args)
        elif args.command == "apps":
            _apps(args)
        elif args.command == "fetch":
            _fetch(args)
        elif args.command == "store":
            _store(args)
    except (AgentError, OSError) as error:
        print(f"redge {args.command}: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def _store(args: argparse.Namespace) -> None:
    from redge.runtime.store import Store

    if args.store is None and args.data_dir is None:
        raise ConfigError("give --store DIR or --data-dir DIR")
    root = args.store if args.store is not None else args.data_dir / "store"
    if not root.is_dir():
        raise ConfigError(f"no model store at {root}")
    store = Store(root, budget_bytes=0)
    if args.store_command == "quarantine":
        failures = store.quarantined()
        for key, entry in sorted(failures.items()):
            print(f"{key}: {entry['count']} bad copies{' (excluded)' if store.excluded(*key.split('/', 1)) else ''}: "
                  f"{entry.get('reason', '')}")
        if not failures:
            print("nothing quarantined")
        return
    name, _, version = (args.artifact or "").partition("/")
    if args.artifact and not version:
        raise ConfigError("name the artifact as NAME/VERSION")
    cleared = store.clear_quarantine(name or None, version or None)
    print(f"cleared {', '.join(cleared)}" if cleared else "nothing to clear")


# ---------------------------------------------------------------------- peer


def peer_values(args: argparse.Namespace) -> dict[str, Any]:
    from redge.agent.config import read_toml

    values: dict[str, Any] = read_toml(args.config) if args.config else {}
    for key in (
        "node_id", "http", "raft", "heartbeat", "peers", "join", "data_dir", "store", "storage_budget_bytes",
        "source", "profile", "secret_file", "admin_token_file", "read_token_file", "log_level", "memory_bytes",
        "accelerator_memory_bytes", "device_kind", "model_threads", "model_host_nice", "model_host_load_nice", "request_body_bytes_max",
        "slo_factor", "watch_rotation_s", "request_bytes_held_max", "dynamic_dimension_max", "held_requests_max", "http_workers",
        "http_worker_nice", "control_nice", "cold_serving_format",
    ):
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    return values


def _run_peer(args: argparse.Namespace) -> None:
    from redge.agent import logs
    from redge.agent.config import load
    from redge.agent.peer import run_peer

    config = load(peer_values(args))
    logs.configure(config.node_id, config.log_level)
    # The peer's threads (heartbeats, Raft's tick, the event loop) wait on sockets and run
    # briefly; a thread woken by a packet should not wait Python's default 5 ms for the GIL.
    sys.setswitchinterval(PEER_SWITCH_INTERVAL_S)
    asyncio.run(run_peer(config))


# ---------------------------------------------------------------------- client side


def _request(method: str, url: str, body: Any = None, token: str | None = None, timeout_s: float = 10.0) -> Any:
    import urllib.error
    import urllib.request

    data = orjson.dumps(body) if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return orjson.loads(response.read())
    except urllib.error.HTTPError as error:
        try:
            message = orjson.loads(error.read()).get("error", error.reason)
        except (orjson.JSONDecodeError, AttributeError):
            message = error.reason
        raise AgentError(f"{url} answered {error.code}: {message}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", error)
        raise AgentError(f"cannot reach {url}: {reason}") from None


def _admin_token(args: argparse.Namespace) -> str:
    if args.token_file:
        try:
            return args.token_file.read_text().strip()
        except OSError as error:
            raise ConfigError(f"cannot read token file {args.token_file}: {error.strerror}") from None
    return os.environ.get("REDGE_ADMIN_TOKEN", "")


def _read_token(args: argparse.Namespace) -> str:
    """For reads: the token file, else REDGE_READ_TOKEN. (Never the admin token unasked: it
    would travel to whatever --peer says; give it with --token-file where that is meant.)"""
    return (_admin_token(args) if args.token_file else "") or os.environ.get("REDGE_READ_TOKEN", "")


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def _status(args: argparse.Namespace) -> None:
    snapshot = _request("GET", f"{args.peer.rstrip('/')}/cluster", token=_read_token(args))
    if args.json:
        _print_json(snapshot)
        return
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)
    for table in status_tables(snapshot):
        console.print(table)


def status_tables(snapshot: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    summary = Table(title="cluster", show_header=False, box=None)
    summary.add_row("asked", snapshot.get("node_id", "?"))
    summary.add_row("leader", str(snapshot.get("leader") or "none"))
    summary.add_row("term", str(snapshot.get("term")))
    summary.add_row("commit index", str(snapshot.get("commit_index")))
    summary.add_row("epoch", str(snapshot.get("epoch")))

    members = Table(title="members")
    for column in ("node", "status", "incarnation", "http", "raft", "heartbeat", "memory GiB", "role"):
        members.add_column(column)
    for member in snapshot.get("members", []):
        status = member["status"] + (" (degraded)" if member.get("degraded") or member.get("slow") else "")
        members.add_row(
            member["node_id"],
            status,
            str(member["incarnation"]),
            member["http_address"],
            member["raft_address"],
            member["heartbeat_address"],
            f"{member.get('memory_bytes', 0) / 1024**3:.1f}",
            "leader" if member["node_id"] == snapshot.get("leader") else "",
        )

    apps = Table(title="apps")
    for column in ("app", "priority", "slo ms", "backup", "variants", "replicas (node:variant:role state)"):
        apps.add_column(column)
    plan = snapshot.get("plan", {})
    reports = {(r["app"], r["node_id"]): r["state"] for r in snapshot.get("replica_reports", [])}
    for app in snapshot.get("apps", []):
        replicas = ", ".join(
            f"{r['node_id']}:{r['variant']}:{r['role']} {reports.get((app['name'], r['node_id']), '-')}"
            for r in plan.get(app["name"], [])
        ) or "-"
        apps.add_row(app["name"], app["priority"], f"{app['slo_ms']:g}", app["backup"], ",".join(app["variants"]), replicas)
    return [summary, members, apps]


def _events(args: argparse.Namespace) -> None:
    data = _request("GET", f"{args.peer.rstrip('/')}/cluster/events?since={args.since}&limit={args.limit}",
                    token=_read_token(args))
    if args.json:
        _print_json(data)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="events")
    for column in ("seq", "time (UTC)", "kind", "details"):
        table.add_column(column)
    for event in data["events"]:
        details = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("seq", "at_ms", "kind"))
        stamp = time.strftime("%H:%M:%S", time.gmtime(event["at_ms"] / 1000)) + f".{event['at_ms'] % 1000:03d}"
        table.add_row(str(event["seq"]), stamp, event["kind"], details)
    Console().print(table)


def _fetch(args: argparse.Namespace) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from redge.runtime.errors import RuntimeFailure
    from redge.runtime.fetch import fetch_artifact
    from redge.runtime.store import Store

    store = Store(args.store, args.storage_budget_bytes)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, transient=False) as progress:
        tasks: dict[str, Any] = {}

        def on_progress(step: Any) -> None:
            if step.file not in tasks:
                tasks[step.file] = progress.add_task(f"{args.name}/{args.version} {step.file}", total=step.bytes_total)
            progress.update(tasks[step.file], completed=step.bytes_done)

        try:
            manifest = asyncio.run(fetch_artifact(args.source, args.name, args.version, store, progress=on_progress))
        except RuntimeFailure as error:
            raise AgentError(str(error)) from None
    print(f"{manifest.name}/{manifest.version}: {manifest.size_bytes} bytes, sha256 checked, in {args.store}")


def _apps(args: argparse.Namespace) -> None:
    base = args.peer.rstrip("/")
    if args.apps_command == "add":
        body = {
            "name": args.name,
            "variants": [v.strip() for v in args.variants.split(",") if v.strip()],
            "priority": args.priority,
            "slo_ms": args.slo_ms,
            "backup": args.backup,
            "request_rate_per_s": args.request_rate,
        }
        result = _request("POST", f"{base}/cluster/apps", body, token=_admin_token(args))
    elif args.apps_command == "rm":
        result = _request("DELETE", f"{base}/cluster/apps/{args.name}", token=_admin_token(args))
    else:
        result = _request("GET", f"{base}/cluster/apps", token=_read_token(args))
        if not args.json:
            from rich.console import Console

            snapshot = {"apps": result["apps"], "plan": result["plan"]}
            Console().print(status_tables({**snapshot, "members": []})[2])
            return
    _print_json(result)


if __name__ == "__main__":
    main()
