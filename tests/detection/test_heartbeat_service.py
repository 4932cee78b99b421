"""The heartbeat wire format, and the service on real sockets (127.0.0.1 only)."""

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from redge.agent.detector_settings import ENTERPRISE
from redge.agent.heartbeat import (
    MAC_BYTES,
    Heartbeat,
    HeartbeatRejected,
    HeartbeatService,
    decode_heartbeat,
    encode_heartbeat,
    heartbeat_key,
)
from redge.agent.verdicts import Recover, Restarted, Suspect, SuspectReason
from redge.chaos.cluster import wait_until_async

KEY = heartbeat_key(b"s3cret")
BEAT = Heartbeat("n1", incarnation=7, sequence=42, sent_us=123_456)
LOOPBACK = "127.0.0.1"


# -- wire format


def test_round_trip():
    data = encode_heartbeat(KEY, BEAT)
    assert len(data) == 29 + len("n1") + MAC_BYTES
    assert decode_heartbeat(KEY, data) == BEAT


@pytest.mark.parametrize(("mangle", "reason"), [
    (lambda d: d[:10], "truncated"),
    (lambda d: d + b"x" * 100, "oversized"),
    (lambda d: b"XX" + d[2:], "bad_magic"),
    (lambda d: d[:2] + b"\x09" + d[3:], "bad_version"),
    (lambda d: d[:-1], "bad_length"),
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "bad_mac"),
    (lambda d: d[:20] + bytes([d[20] ^ 1]) + d[21:], "bad_mac"),  # tampered sequence
])
def test_rejections(mangle, reason):
    with pytest.raises(HeartbeatRejected) as caught:
        decode_heartbeat(KEY, mangle(encode_heartbeat(KEY, BEAT)))
    assert caught.value.reason == reason


def test_foreign_cluster_key_is_rejected():
    foreign = encode_heartbeat(heartbeat_key(b"another cluster"), BEAT)
    with pytest.raises(HeartbeatRejected, match="bad_mac"):
        decode_heartbeat(KEY, foreign)


@hypothesis_settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_ever_rejected(data):
    try:
        decode_heartbeat(KEY, data)
    except HeartbeatRejected:
        pass


@hypothesis_settings(max_examples=200, deadline=None)
@given(
    node_id=st.text(min_size=1, max_size=16),
    incarnation=st.integers(0, 2**64 - 1),
    sequence=st.integers(0, 2**64 - 1),
    sent_us=st.integers(0, 2**64 - 1),
)
def test_round_trip_property(node_id, incarnation, sequence, sent_us):
    beat = Heartbeat(node_id, incarnation, sequence, sent_us)
    assert decode_heartbeat(KEY, encode_heartbeat(KEY, beat)) == beat


# -- real sockets


async def wait_until(condition, timeout_s: float, what: str) -> None:
    await wait_until_async(condition, timeout_s, what=what)


def free_udp_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def service(node_id: str, verdicts: list, secret: bytes = b"s3cret") -> HeartbeatService:
    return HeartbeatService(node_id, (LOOPBACK, 0), secret, ENTERPRISE,
                            on_verdict=verdicts.append, incarnation=1)


@contextlib.asynccontextmanager
async def watching_each_other(heard: int = 10):
    """Services a and b, each watching the other, once both have heard `heard` heartbeats."""
    seen_by_a, seen_by_b = [], []
    a, b = service("a", seen_by_a), service("b", seen_by_b)
    await a.start()
    await b.start()
    try:
        a.set_targets([("b", b.address, 0)])
        b.set_targets([("a", a.address, 0)])
        await wait_until(lambda: a.stats().heartbeats_accepted >= heard
                         and b.stats().heartbeats_accepted >= heard, 5.0, "heartbeats both ways")
        yield a, b, seen_by_a, seen_by_b
    finally:
        await a.stop()
        await b.stop()


@pytest.mark.timeout(30)
def test_a_new_incarnation_numbers_its_heartbeats_from_one_again():
    async def scenario():
        async with watching_each_other() as (a, b, seen_by_a, _):
            watched = a.monitor._detectors["b"]
            sequence_before = watched.last_sequence
            accepted_before = watched.heartbeats_accepted
            b.set_incarnation(2)
            await wait_until(lambda: any(isinstance(v, Restarted) for v in seen_by_a), 5.0, "a sees b restart")
            await wait_until(lambda: watched.heartbeats_accepted >= accepted_before + 3, 5.0, "b's new life heard")
            assert watched.incarnation == 2 and watched.suspected is None
            assert watched.last_sequence < sequence_before  # numbered from 1 again, and accepted

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_a_dropped_target_still_gets_heartbeats_while_it_lingers():
    """A rotated-away watcher may turn later than us: it keeps hearing us for the linger,
    and its heartbeats to us meanwhile are taken quietly, not rejected as a stranger's."""
    async def scenario():
        async with watching_each_other() as (a, b, _, seen_by_b):
            a.set_targets([], linger_ms=300.0)
            assert a.monitor.watched() == []
            heard_by_b = b.stats().heartbeats_accepted
            await wait_until(lambda: b.stats().heartbeats_accepted >= heard_by_b + 5, 5.0, "b still hears a")
            assert "unknown_sender" not in a.stats().packets_rejected
            # Once the linger ends b hears no more heartbeats; but a is alive and answers b's
            # probes, so b only finds it late, never suspects it.
            await wait_until(lambda: b.stats().probe_rounds_answered >= 1, 5.0, "the linger ends")
            await wait_until(lambda: "unknown_sender" in a.stats().packets_rejected, 5.0, "b is a stranger now")
            assert not any(isinstance(v, Suspect) for v in seen_by_b)

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_two_services_see_each_other_then_a_stop_is_refused():
    async def scenario():
        async with watching_each_other() as (a, b, seen_by_a, seen_by_b):
            assert seen_by_a == [] and seen_by_b == []
            health = a.health()[0]
            assert health.node_id == "b" and health.suspected is None and health.phi < 1.0
            await b.stop()
            stopped_at = time.monotonic()
            await wait_until(lambda: seen_by_a, 2.0, "a suspects b")
            elapsed_ms = (time.monotonic() - stopped_at) * 1000.0
            verdict = seen_by_a[0]
            assert isinstance(verdict, Suspect) and verdict.reason is SuspectReason.UNREACHABLE
            assert elapsed_ms < 500.0, elapsed_ms
            assert a.stats().refusals >= 1 and a.stats().suspected == ["b"]

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_closed_port_is_suspected_at_once():
    async def scenario():
        verdicts = []
        a = service("a", verdicts)
        await a.start()
        try:
            a.set_targets([("ghost", (LOOPBACK, free_udp_port()), 0)])
            started = time.monotonic()
            await wait_until(lambda: verdicts, 2.0, "unreachable suspicion")
            elapsed_ms = (time.monotonic() - started) * 1000.0
            assert verdicts[0].reason is SuspectReason.UNREACHABLE and verdicts[0].node_id == "ghost"
            # one heartbeat interval plus scheduling, far below any timeout
            assert elapsed_ms < 200.0, elapsed_ms
        finally:
            await a.stop()

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_forged_and_garbage_packets_are_dropped_and_counted():
    async def scenario():
        verdicts = []
        a = service("a", verdicts)
        await a.start()
        try:
            a.set_targets([("b", (LOOPBACK, free_udp_port()), 0)])
            forged = encode_heartbeat(heartbeat_key(b"wrong secret"), Heartbeat("b", 1, 1, 0))
            stranger = encode_heartbeat(KEY, Heartbeat("mallory", 1, 1, 0))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
                for payload in (forged, forged, b"\x00" * 3, stranger):
                    attacker.sendto(payload, a.address)

                def rejected() -> dict[str, int]:
                    return a.stats().packets_rejected

                await wait_until(lambda: sum(rejected().values()) >= 4, 2.0, "rejections")
            assert rejected() == {"bad_mac": 2, "truncated": 1, "unknown_sender": 1}
            assert a.stats().heartbeats_accepted == 0
            assert not any(isinstance(v, Recover) for v in verdicts)
        finally:
            await a.stop()

    asyncio.run(scenario())


_CHILD = """
import asyncio, sys
from redge.agent.detector_settings import ENTERPRISE
from redge.agent.heartbeat import HeartbeatService
async def main():
    s = HeartbeatService("child", ("127.0.0.1", 0), b"s3cret", ENTERPRISE, incarnation=1)
    await s.start()
    s.set_targets([("parent", ("127.0.0.1", int(sys.argv[1])), 0)])
    print("PORT", s.address[1], flush=True)
    await asyncio.Event().wait()  # serve until the test kills this process
asyncio.run(main())
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("fault", "reason", "bound_ms"), [
    # the host answers for a dead process: refused on the next heartbeat
    (signal.SIGKILL, SuspectReason.UNREACHABLE, 250.0),
    # a stopped process keeps its socket: only silence, judged by phi (~96 ms nominal)
    (signal.SIGSTOP, SuspectReason.PHI, 400.0),
], ids=["sigkill", "sigstop"])
def test_real_process_fault_is_suspected(fault, reason, bound_ms):
    async def scenario():
        verdicts = []
        parent = service("parent", verdicts)
        await parent.start()
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CHILD, str(parent.address[1]),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            port = None
            for _ in range(20):  # structlog writes to stdout too: find our line
                line = (await asyncio.wait_for(child.stdout.readline(), 20.0)).decode()
                if line.startswith("PORT "):
                    port = int(line.split()[1])
                    break
            assert port is not None, "the child did not report its port"
            parent.set_targets([("child", (LOOPBACK, port), 0)])
            await wait_until(lambda: parent.stats().heartbeats_accepted >= 25, 10.0, "child alive")
            os.kill(child.pid, fault)
            faulted_at = time.monotonic()
            await wait_until(lambda: any(isinstance(v, Suspect) for v in verdicts), 2.0,
                             "suspicion of the child")
            elapsed_ms = (time.monotonic() - faulted_at) * 1000.0
            suspect = next(v for v in verdicts if isinstance(v, Suspect))
            print(f"{fault.name} -> suspicion ({suspect.reason}) in {elapsed_ms:.1f} ms")
            assert suspect.node_id == "child" and suspect.reason is reason
            assert elapsed_ms < bound_ms
            if fault == signal.SIGSTOP:
                os.kill(child.pid, signal.SIGCONT)
                await wait_until(lambda: any(isinstance(v, Recover) for v in verdicts), 5.0,
                                 "recovery after SIGCONT")
        finally:
            if child.returncode is None:
                child.kill()
            await asyncio.wait_for(child.wait(), 10.0)
            await parent.stop()

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_a_stalled_event_loop_does_not_suspect_its_peers():
    """Both services share one event loop; blocking it for 300 ms (3x the
    enterprise suspicion silence) stalls everyone. The observers must notice
    their own pause and not blame each other."""
    async def scenario():
        async with watching_each_other(heard=20) as (a, _, seen_by_a, seen_by_b):
            time.sleep(0.3)  # noqa: ASYNC251 -- the fault under test: this process does not run
            accepted = a.stats().heartbeats_accepted
            await wait_until(lambda: a.stats().heartbeats_accepted >= accepted + 10, 5.0,
                             "heartbeats after the stall")
            verdicts = seen_by_a + seen_by_b
            assert [v for v in verdicts if isinstance(v, Suspect)] == []
            assert a.stats().self_pauses >= 1 and a.stats().self_pause_ms_max >= 200.0
            assert a.stats().send_slots_skipped >= 10  # resumed the rhythm, no burst
            assert a.stats().send_gap_ms_max >= 250.0

    asyncio.run(scenario())


# -- evidence that cannot be forged, on real sockets


def test_probe_packets_round_trip_and_refuse_what_they_should():
    from redge.agent.heartbeat import ProbeKind, ProbePacket, decode_packet, encode_probe

    packet = ProbePacket(ProbeKind.PING_REQ, "n1", "n3", 7, 2**63 + 5, 99)
    data = encode_probe(KEY, packet)
    assert decode_packet(KEY, data) == packet
    assert decode_packet(KEY, encode_heartbeat(KEY, BEAT)) == BEAT  # both versions on one socket
    for mangled, reason in [
        (data[:-1] + bytes([data[-1] ^ 1]), "bad_mac"),
        (data[:3] + b"\x09" + data[4:], "bad_mac"),  # the kind is authenticated too
        (data[:20], "truncated"),
        (data + b"x", "bad_length"),
    ]:
        with pytest.raises(HeartbeatRejected) as caught:
            decode_packet(KEY, mangled)
        assert caught.value.reason == reason
    with pytest.raises(HeartbeatRejected, match="bad_mac"):
        decode_packet(heartbeat_key(b"another cluster"), data)


@hypothesis_settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_with_either_version_are_only_ever_rejected(data):
    from redge.agent.heartbeat import decode_packet

    for prefix in (b"RH\x01", b"RH\x02", b""):
        try:
            decode_packet(KEY, prefix + data)
        except HeartbeatRejected:
            pass


@pytest.mark.timeout(30)
@pytest.mark.skipif(os.geteuid() != 0, reason="forging ICMP needs a raw socket (root)")
def test_forged_port_unreachable_is_a_hint_the_live_node_refutes():
    """An attacker forges ICMP "port unreachable" for a's heartbeats to b, a hundred times:
    each refusal makes a probe b, b answers, and a never suspects it; a's heartbeats to b
    keep flowing (a refused send is retried at once)."""
    from redge.chaos.hostile import forge_port_unreachable, raw_icmp_socket

    async def scenario():
        async with watching_each_other() as (a, b, seen_by_a, _):
            observer = a._peers["b"].sock.getsockname()
            heard_by_b = b.stats().heartbeats_accepted
            with raw_icmp_socket() as raw:
                for _ in range(100):
                    forge_port_unreachable(raw, observer, b.address)
                    await asyncio.sleep(0.005)  # pacing the attack, not a wait for a condition
            await wait_until(lambda: a.stats().hints_refuted >= 10, 5.0, "refusals refuted by probes")
            assert a.stats().refusals >= 10
            assert not any(isinstance(v, Suspect) for v in seen_by_a), seen_by_a
            assert b.stats().heartbeats_accepted >= heard_by_b + 20  # a kept sending through it

    asyncio.run(scenario())


@pytest.mark.timeout(30)
def test_a_helper_relays_the_answer_to_a_ping_request():
    """a probes b with c as its helper: c pings b, b answers c, c relays the answer to a."""
    async def scenario():
        verdicts: list = []
        a, b, c = (service(name, verdicts) for name in ("a", "b", "c"))
        for node in (a, b, c):
            await node.start()
        try:
            book = [("a", a.address), ("b", b.address), ("c", c.address)]
            for node in (a, b, c):
                node.set_members(book)
            from redge.agent.verdicts import Hint

            a.monitor.watch("b", 1, a.clock.now_ms())
            a._hint("b", Hint.DISCONNECTED)
            await wait_until(lambda: c.stats().relays >= 1, 5.0, "c pings b for a")
            await wait_until(lambda: a.stats().probe_rounds_answered >= 1, 5.0, "a hears b answered")
            assert b.stats().acks_sent >= 2  # to a directly, and to c
            assert not any(isinstance(v, Suspect) for v in verdicts)
        finally:
            for node in (a, b, c):
                await node.stop()

    asyncio.run(scenario())
