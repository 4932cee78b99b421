"""HOST:PORT addresses, as a config, a peer and the Raft adapter all read them. Pure."""

from __future__ import annotations


def split_address(address: str) -> tuple[str, int]:
    host, separator, port = address.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} is not HOST:PORT")
    return host, int(port)
