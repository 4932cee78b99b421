"""Messages between a peer's control process and its data-plane workers.

One Unix socket pair per worker, made by the control process and inherited by the worker,
so nothing else on the machine can talk on it. Each message is a JSON object (orjson),
framed by a 4-byte big-endian length. The control process sends `routes` (the routing
table, whenever it changes); a worker sends `stats` (what it served, batched) and `hello`.
Both ends are asyncio protocols: sends never block, and a closed pair is how each learns
the other is gone (a worker exits; the control process restarts it).
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

import orjson
import structlog

log = structlog.get_logger("redge.channel")

MESSAGE_BYTES_MAX = 16 * 1024 * 1024
_LENGTH = struct.Struct(">I")


def frame(message: dict[str, Any]) -> bytes:
    payload = orjson.dumps(message)
    assert len(payload) <= MESSAGE_BYTES_MAX, f"a {len(payload)}-byte message is over the bound"
    return _LENGTH.pack(len(payload)) + payload


class MessageProtocol(asyncio.Protocol):
    """Framed JSON messages over a stream socket; `on_message(dict)` per message received,
    `on_lost()` once when the other end closes (or sends something that is not a message)."""

    def __init__(self, on_message: Callable[[dict[str, Any]], None], on_lost: Callable[[], None]) -> None:
        self._on_message = on_message
        self._on_lost = on_lost
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length > MESSAGE_BYTES_MAX:
                log.error("channel_message_oversized", length=length)
                self.close()
                return
            if len(self._buffer) < _LENGTH.size + length:
                return
            payload = bytes(self._buffer[_LENGTH.size : _LENGTH.size + length])
            del self._buffer[: _LENGTH.size + length]
            try:
                message = orjson.loads(payload)
            except orjson.JSONDecodeError as error:
                log.error("channel_message_unreadable", error=str(error))
                continue
            if isinstance(message, dict):
                self._on_message(message)

    def send(self, message: dict[str, Any]) -> bool:
        transport = self._transport
        if transport is None or transport.is_closing():
            return False
        transport.write(frame(message))
        return True

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._lost:
            self._lost = True
            self._on_lost()

    @property
    def open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing() and not self._lost


async def connect(
    sock: socket.socket, on_message: Callable[[dict[str, Any]], None], on_lost: Callable[[], None]
) -> MessageProtocol:
    """Wrap one end of a socket pair."""
    sock.setblocking(False)
    _, protocol = await asyncio.get_running_loop().create_connection(lambda: MessageProtocol(on_message, on_lost), sock=sock)
    return protocol
