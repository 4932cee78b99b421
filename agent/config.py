"""Configuration of `redge peer`: a TOML file and flags, checked before anything starts.

Flags override the file. The cluster secret never comes from a flag (it would show in `ps`):
it is read from a file or from REDGE_SECRET. Every problem is reported at once, with the key
that caused it, so an operator fixes a config in one pass instead of one error per restart.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from redge.agent.errors import ConfigError
from redge.agent.profile import get_profile
from redge.consensus.addresses import split_address
from redge.consensus.state import NAME_PATTERN

SECRET_ENV = "REDGE_SECRET"
ADMIN_TOKEN_ENV = "REDGE_ADMIN_TOKEN"
READ_TOKEN_ENV = "REDGE_READ_TOKEN"
# Where a peer on loopback without a given secret keeps the one it generated (mode 0600).
GENERATED_SECRET_FILENAME = "secret"


@dataclass
class PeerConfig:
    node_id: str
    http: str
    raft: str
    heartbeat: str
    data_dir: Path
    peers: list[str] = field(default_factory=list)
    join: str | None = None
    store: Path | None = None
    storage_budget_bytes: int = 10 * 1024**3
    source: str | None = None
    profile: str = "enterprise"
    secret_file: Path | None = None
    admin_token_file: Path | None = None
    # With a read token, the cluster's state, events, metrics and artifacts answer only calls
    # that carry it (or the admin token); inference, routes and health stay open.
    read_token_file: Path | None = None
    log_level: str = "info"
    memory_bytes: int = 0
    accelerator_memory_bytes: int = 0
    device_kind: str = "cpu"
    request_body_bytes_max: int = 64 * 1024 * 1024
    # Bytes of request bodies a peer holds at once, across all requests (agent/dataplane.py):
    # past it a request is refused with 503 before its body is read.
    request_bytes_held_max: int = 256 * 1024 * 1024
    # A model input's dynamic (-1) dimension may be at most this: it bounds the body a
    # request for that model may have.
    dynamic_dimension_max: int = 64
    # Requests an HTTP worker holds at once while their apps have no ready replica but one
    # is being loaded (each until its own deadline); past it, 503 at once.
    held_requests_max: int = 256
    # A cold backup also stores the serving format (optimised graph derived): recoveries
    # load at about the read of the bytes. Off: half the disk, and a recovery serves from
    # the cold format and switches once the serving one is fetched and loaded.
    cold_serving_format: bool = True
    # Data-plane worker processes that serve HTTP, and how much nicer than the peer they run.
    http_workers: int = 1
    http_worker_nice: int = 5
    # The control process's own niceness, taken at start where the peer may (root or
    # CAP_SYS_NICE): heartbeats, probes and Raft first when the box is saturated. The
    # workers and the model host are niced relative to it.
    control_nice: int = -5
    model_threads: int = 1
    model_host_nice: int = 10
    # The model host's niceness while it loads a model, where the peer may lower it (root,
    # or CAP_SYS_NICE): a recovery's load is the critical path.
    model_host_load_nice: int = 0
    # Degraded when an app's median latency here stays above this factor x its SLO (agent/slo.py).
    slo_factor: float = 1.5
    # Above 8 members each peer watches a bounded set of others (agent/detector.py
    # monitoring_targets); while this peer leads, it commits a new shuffle every this many
    # seconds of its monotonic clock, so one bad observer cannot hide or frame a node for
    # long. 0: only with membership.
    watch_rotation_s: float = 60.0
    # Filled by `load`, never from the file.
    secret: str = field(default="", repr=False)
    admin_token: str = field(default="", repr=False)
    read_token: str = field(default="", repr=False)

    @property
    def store_dir(self) -> Path:
        return self.store if self.store is not None else self.data_dir / "store"


_PATH_KEYS = {"data_dir", "store", "secret_file", "admin_token_file", "read_token_file"}
_FILE_KEYS = {f.name for f in fields(PeerConfig)} - {"secret", "admin_token", "read_token"}


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
    table = data.get("peer", data)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [peer] must be a table")
    unknown = sorted(set(table) - _FILE_KEYS)
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys {', '.join(unknown)}")
    return dict(table)


def load(values: dict[str, Any], environ: dict[str, str] | None = None) -> PeerConfig:
    """Build and check a PeerConfig from merged file and flag values."""
    environ = dict(os.environ) if environ is None else environ
    problems: list[str] = []
    for required in ("node_id", "http", "raft", "heartbeat", "data_dir"):
        if not values.get(required):
            problems.append(f"{required.replace('_', '-')} is required")
    if problems:
        raise ConfigError("; ".join(problems))
    values = dict(values)
    for key in _PATH_KEYS:
        if values.get(key) is not None:
            values[key] = Path(values[key])
    peers = values.get("peers") or []
    if isinstance(peers, str):
        peers = [p.strip() for p in peers.split(",") if p.strip()]
    values["peers"] = list(peers)
    config = PeerConfig(**{k: v for k, v in values.items() if k in _FILE_KEYS and v is not None})

    if not NAME_PATTERN.match(config.node_id):
        problems.append(f"node-id {config.node_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
    hosts = []
    for key in ("http", "raft", "heartbeat"):
        try:
            host, _ = split_address(getattr(config, key))
            hosts.append(host)
        except ValueError as error:
            problems.append(f"{key}: {error}")
    for index, peer in enumerate(config.peers):
        try:
            host, _ = split_address(peer)
            hosts.append(host)
        except ValueError as error:
            problems.append(f"peers[{index}]: {error}")
    if config.raft in config.peers:
        problems.append("peers must list the other members' Raft addresses, not this peer's own")
    if config.peers and config.join:
        problems.append("give either peers (a new cluster) or join (an existing one), not both")
    if config.join and not config.join.startswith(("http://", "https://")):
        problems.append(f"join must be a member's HTTP URL such as http://127.0.0.1:8101, got {config.join!r}")
    try:
        get_profile(config.profile)
    except ValueError as error:
        problems.append(str(error))
    if config.storage_budget_bytes <= 0:
        problems.append("storage-budget-bytes must be > 0")
    if not -20 <= config.model_host_load_nice <= 19:
        problems.append("model-host-load-nice must be between -20 and 19")
    if not 0 <= config.model_host_nice <= 19:
        problems.append("model-host-nice must be between 0 and 19")
    if not isinstance(config.slo_factor, (int, float)) or not 1.0 <= config.slo_factor <= 100.0:
        problems.append("slo-factor must be between 1 and 100")
    if not isinstance(config.watch_rotation_s, (int, float)) or not (
        config.watch_rotation_s == 0 or 10.0 <= config.watch_rotation_s <= 86_400.0
    ):
        problems.append("watch-rotation-s must be 0 (off) or between 10 and 86400")
    if not 1 <= config.model_threads <= 256:
        problems.append("model-threads must be between 1 and 256")
    if config.request_body_bytes_max <= 0:
        problems.append("request-body-bytes-max must be > 0")
    if config.request_bytes_held_max < config.request_body_bytes_max:
        problems.append("request-bytes-held-max must be at least request-body-bytes-max (one body must fit)")
    if not 0 <= config.held_requests_max <= 1 << 16:
        problems.append("held-requests-max must be between 0 and 65536")
    if not 1 <= config.dynamic_dimension_max <= 1 << 20:
        problems.append("dynamic-dimension-max must be between 1 and 1048576")
    if not 1 <= config.http_workers <= 64:
        problems.append("http-workers must be between 1 and 64")
    if not 0 <= config.http_worker_nice <= 19:
        problems.append("http-worker-nice must be between 0 and 19")
    if not -20 <= config.control_nice <= 0:
        problems.append("control-nice must be between -20 and 0")
    if config.log_level not in ("debug", "info", "warning", "error"):
        problems.append("log-level must be debug, info, warning or error")

    config.secret = _read_secret(config.secret_file, environ.get(SECRET_ENV), "secret", problems)
    config.admin_token = _read_secret(config.admin_token_file, environ.get(ADMIN_TOKEN_ENV), "admin token", problems)
    config.read_token = _read_secret(config.read_token_file, environ.get(READ_TOKEN_ENV), "read token", problems)
    for name in ("admin_token", "read_token"):
        if not getattr(config, name).isascii() or not getattr(config, name).isprintable():
            problems.append(f"the {name.replace('_', ' ')} must be printable ASCII (it travels in an HTTP header)")
    if not config.secret:
        if all(_is_loopback(h) for h in hosts):
            # Never a fixed key (any local user could speak Raft, pickles, to the peer):
            # a random one, kept in the data dir for this peer's restarts.
            config.secret = _generated_secret(config.data_dir / GENERATED_SECRET_FILENAME, problems)
        else:
            problems.append(
                f"refusing to start: Raft on a non-loopback address needs the cluster secret "
                f"(set {SECRET_ENV} or secret_file); Raft messages are pickles and an open port runs anyone's code"
            )
    if problems:
        raise ConfigError("; ".join(problems))
    return config


def _generated_secret(path: Path, problems: list[str]) -> str:
    """The secret in `path`, written there first (random, mode 0600) when there is none."""
    import secrets

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
    except FileExistsError:
        pass
    except OSError as error:
        problems.append(f"cannot keep a generated secret in {path}: {error.strerror or error}")
        return ""
    try:
        if path.stat().st_mode & 0o077:
            problems.append(f"the generated secret {path} is readable by other users: chmod 600 it, or remove it")
            return ""
    except OSError:
        pass  # reported by the read below
    return _read_secret(path, None, "generated secret", problems)


def _read_secret(path: Path | None, from_environment: str | None, what: str, problems: list[str]) -> str:
    if path is not None:
        try:
            value = path.read_text().strip()
        except OSError as error:
            problems.append(f"cannot read the {what} file {path}: {error.strerror or error}")
            return ""
        if not value:
            problems.append(f"the {what} file {path} is empty")
        return value
    return (from_environment or "").strip()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
