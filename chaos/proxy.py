"""A user-space proxy that delays TCP streams and UDP datagrams, because this kernel has no netem.

`Delay` (chaos/faults.py) starts one per delayed node, inside the node's namespace, and
redirects the node's incoming HTTP, Raft and heartbeat traffic to it with nftables. It adds
`delay_ms` ± `jitter_ms` (uniform, from a seeded `random.Random`) to each chunk it forwards
towards the node. A TCP stream keeps its order (a chunk never overtakes the one before it);
UDP datagrams are independent and may be reordered, as on a real jittery link. Replies go
back undelayed: the fault delays what the node receives.

Everything is bounded: connections, UDP flows and the chunks queued per direction.

    python -m redge.chaos.proxy --target 10.213.77.2 --tcp 18100:8100 --udp 17100:7100 \
        --delay-ms 50 --jitter-ms 20 --seed 7

prints `ready` on stdout once every listener is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import sys
from dataclasses import dataclass

CONNECTIONS_MAX = 512
UDP_FLOWS_MAX = 1024
QUEUED_CHUNKS_MAX = 1024
CHUNK_BYTES = 65536
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class DelayModel:
    """The pure part: when a chunk received at `now_s` is delivered."""

    delay_ms: float
    jitter_ms: float

    def sample_s(self, rng: random.Random) -> float:
        jitter = rng.uniform(-self.jitter_ms, self.jitter_ms) if self.jitter_ms else 0.0
        return max(0.0, self.delay_ms + jitter) / 1000

    def stream_deliver_at_s(self, now_s: float, previous_s: float, rng: random.Random) -> float:
        """In a stream a chunk leaves no earlier than the chunk before it."""
        return max(previous_s, now_s + self.sample_s(rng))


class DelayProxy:
    def __init__(self, target: str, model: DelayModel, rng: random.Random) -> None:
        self.target = target
        self.model = model
        self.rng = rng
        self.connections = 0
        self.servers: list[asyncio.AbstractServer] = []
        self.transports: list[asyncio.BaseTransport] = []

    async def serve_tcp(self, listen_port: int, target_port: int) -> None:
        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if self.connections >= CONNECTIONS_MAX:
                writer.close()
                return
            self.connections += 1
            try:
                upstream_reader, upstream_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.target, target_port), CONNECT_TIMEOUT_S
                )
            except (TimeoutError, OSError):
                self.connections -= 1
                writer.close()
                return
            try:
                await asyncio.gather(
                    self._pump(reader, upstream_writer, delayed=True),
                    self._pump(upstream_reader, writer, delayed=False),
                )
            finally:
                self.connections -= 1
                for stream in (writer, upstream_writer):
                    stream.close()

        self.servers.append(await asyncio.start_server(on_connection, "0.0.0.0", listen_port, reuse_address=True))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delayed: bool) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUED_CHUNKS_MAX)

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                deliver_at_s, chunk = item
                wait_s = deliver_at_s - loop.time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)  # the injected delay itself, not a wait for a condition
                writer.write(chunk)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        sender = asyncio.create_task(deliver())
        previous_s = 0.0
        try:
            while chunk := await reader.read(CHUNK_BYTES):
                now_s = loop.time()
                previous_s = self.model.stream_deliver_at_s(now_s, previous_s, self.rng) if delayed else now_s
                await queue.put((previous_s, chunk))
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                await queue.put(None)
                await sender
            except (ConnectionError, OSError):
                pass

    async def serve_udp(self, listen_port: int, target_port: int) -> None:
        loop = asyncio.get_running_loop()
        proxy = self

        class Listener(asyncio.DatagramProtocol):
            def __init__(self) -> None:
                self.flows: dict[tuple[str, int], asyncio.DatagramTransport] = {}
                self.transport: asyncio.DatagramTransport | None = None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport  # type: ignore[assignment]

            def datagram_received(self, data: bytes, source: tuple[str, int]) -> None:
                loop.call_later(proxy.model.sample_s(proxy.rng), self._forward, data, source)

            def _forward(self, data: bytes, source: tuple[str, int]) -> None:
                flow = self.flows.get(source)
                if flow is None:
                    if len(self.flows) >= UDP_FLOWS_MAX:
                        return
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    sock.setblocking(False)
                    try:
                        sock.connect((proxy.target, target_port))
                    except OSError:
                        sock.close()
                        return
                    listener = self

                    class Reply(asyncio.DatagramProtocol):
                        def datagram_received(self, reply: bytes, _: tuple[str, int]) -> None:
                            if listener.transport is not None:
                                listener.transport.sendto(reply, source)

                        def error_received(self, exc: Exception) -> None:
                            pass  # the node refused (crashed): the sender learns from its own socket

                    task = loop.create_datagram_endpoint(Reply, sock=sock)
                    asyncio.ensure_future(self._register(task, source, data))
                    return
                flow.sendto(data)

            async def _register(self, task, source: tuple[str, int], data: bytes) -> None:
                transport, _ = await task
                self.flows[source] = transport
                proxy.transports.append(transport)
                transport.sendto(data)

        transport, _ = await loop.create_datagram_endpoint(Listener, local_addr=("0.0.0.0", listen_port))
        self.transports.append(transport)


def _port_pair(text: str) -> tuple[int, int]:
    listen, _, target = text.partition(":")
    return int(listen), int(target)


async def main_async(args: argparse.Namespace) -> None:
    proxy = DelayProxy(args.target, DelayModel(args.delay_ms, args.jitter_ms), random.Random(args.seed))
    for pair in args.tcp:
        await proxy.serve_tcp(*_port_pair(pair))
    for pair in args.udp:
        await proxy.serve_udp(*_port_pair(pair))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    await stop.wait()  # runs until the nemesis kills it


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="redge.chaos.proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="address to forward to")
    parser.add_argument("--tcp", action="append", default=[], help="LISTEN_PORT:TARGET_PORT")
    parser.add_argument("--udp", action="append", default=[], help="LISTEN_PORT:TARGET_PORT")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.jitter_ms > args.delay_ms or args.delay_ms < 0:
        parser.error("need 0 <= jitter_ms <= delay_ms")
    try:
        asyncio.run(main_async(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
