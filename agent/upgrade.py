"""Raising the cluster's command format once every member reads it.

A build that writes a newer command format (consensus/commands.py) must not use it while a
member of an older build could apply those commands: that replica would refuse what the
others apply, and the replicas would differ from then on. So the cluster's format is a
committed value, raised by the leader with a `RaiseFormat` once every member that has not
left says, on `GET /v2`, that its build reads the new one; the same rule etcd follows for its
cluster version. A member that does not answer (down, unreachable, or of a build that
predates the question) holds the format where it is. Once raised, a peer of an older build
that comes back is not ready, with the reason (docs/operations.md#upgrades).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp

ASK_TIMEOUT_S = 2.0


def format_to_raise(current: int, answers: Mapping[str, int | None], mine: int) -> int | None:
    """The format the cluster may move to: the lowest any member reads, when every member
    answered and that is above `current`. Pure."""
    if any(answer is None for answer in answers.values()):
        return None
    target = min([mine, *(answer for answer in answers.values() if answer is not None)])
    return target if target > current else None


async def ask_formats(addresses: Mapping[str, str], timeout_s: float = ASK_TIMEOUT_S) -> dict[str, int | None]:
    """Each member's answer to `GET /v2` (`command_format`; 1 for a build that predates it),
    or None where it did not answer."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def ask(address: str) -> int | None:
            try:
                async with session.get(f"http://{address}/v2") as response:
                    if response.status != 200:
                        return None
                    body = await response.json(content_type=None)
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
                return None
            answer = body.get("command_format", 1) if isinstance(body, dict) else None
            return answer if isinstance(answer, int) and not isinstance(answer, bool) and answer >= 1 else None

        nodes = sorted(addresses)
        answers = await asyncio.gather(*(ask(addresses[node]) for node in nodes))
    return dict(zip(nodes, answers, strict=True))
