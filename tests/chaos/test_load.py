"""Load clients: how answers become outcomes, and a real closed loop against a tiny server."""

from __future__ import annotations

import asyncio
import threading

import pytest
from aiohttp import web

from redge.chaos.cluster import free_ports, wait_until
from redge.chaos.load import LoadGenerator, LoadSpec, classify, infer_body


@pytest.mark.parametrize(
    "kind, status, answer, headers, expected",
    [
        ("probe", 200, {"node_id": "n2", "committed": 1}, {}, ("ok", "n2", None)),
        ("probe", 200, {"node_id": "n2", "committed": 0, "failures": {"ProposalTimeout": 3}}, {}, ("info", None, None)),
        ("probe", 200, {"node_id": "n2", "committed": 0, "failures": {"NotLeader": 3}}, {}, ("fail", None, None)),
        ("probe", 503, {"error": "no quorum"}, {}, ("fail", None, None)),
        ("probe", 504, {"error": "unknown"}, {}, ("info", None, None)),
        ("probe", 502, {"error": "x"}, {"X-Redge-Portal": "unreachable"}, ("fail", None, None)),
        ("infer", 200, {"outputs": [], "parameters": {"node_id": "n3", "epoch": 4}}, {}, ("ok", "n3", 4)),
        ("infer", 200, {"outputs": []}, {"X-Redge-Node": "n1", "X-Redge-Epoch": "7"}, ("ok", "n1", 7)),
        ("infer", 200, {"model_name": "det"}, {}, ("fail", None, None)),
        ("infer", 200, None, {}, ("info", None, None)),
        ("infer", 400, {"error": "bad shape"}, {}, ("fail", None, None)),
        ("infer", 503, {"error": "no replica"}, {}, ("fail", None, None)),
    ],
)
def test_classify(kind, status, answer, headers, expected):
    outcome, node, epoch, _ = classify(kind, status, answer, headers)
    assert (outcome, node, epoch) == expected


def test_infer_body_is_an_open_inference_protocol_request():
    body = infer_body(LoadSpec(kind="infer", app="det", input_shape=(2, 3), input_datatype="FP32"))
    assert body == {"inputs": [{"name": "input", "shape": [2, 3], "datatype": "FP32", "data": [0.5] * 6}]}


@pytest.fixture
def tiny_server():
    """One HTTP server answering infer calls: ok, then 503, then a dropped connection."""
    port = free_ports(1)[0]
    answers = iter(["ok", "503", "drop"] * 1000)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def infer(request: web.Request) -> web.StreamResponse:
        await request.read()
        answer = next(answers)
        if answer == "ok":
            return web.json_response({"outputs": [], "parameters": {"node_id": "n1", "epoch": 1}})
        if answer == "503":
            return web.json_response({"error": "no replica"}, status=503)
        request.transport.close()  # sent, then lost: unknown
        return web.Response()

    async def serve() -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/v2/models/{app}/infer", infer)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    def run() -> None:
        asyncio.set_event_loop(loop)
        runner = loop.run_until_complete(serve())
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    yield f"http://127.0.0.1:{port}", free_ports(1)[0]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def test_a_closed_loop_records_every_outcome_and_stays_bounded(tiny_server):
    url, closed_port = tiny_server
    spec = LoadSpec(kind="infer", app="det", clients=2, timeout_s=1.0, operations_max=60, input_shape=(1, 4))
    load = LoadGenerator(spec, {"n1": url, "n2": f"http://127.0.0.1:{closed_port}"})
    load.start(duration_s_max=20)
    wait_until(lambda: len(load.history) >= 60, 20, what="60 operations")
    history = load.stop()
    assert len(history) == 60 and history.dropped <= spec.clients
    counts = history.counts()
    assert counts["ok"] and counts["fail"] and counts["info"]
    refused = [o for o in history if o.target == "n2"]
    assert refused and all(o.outcome == "fail" and o.error.startswith("not delivered") for o in refused)
    assert all(o.node == "n1" and o.epoch == 1 for o in history if o.outcome == "ok")
    assert all(o.end_ms >= o.start_ms for o in history)


def test_a_raised_request_is_failed_only_when_it_never_reached_the_server():
    import aiohttp

    from redge.chaos.load import failed_outcome

    refused = aiohttp.ClientConnectorError(None, ConnectionRefusedError(111, "Connection refused"))
    assert failed_outcome(refused, 2.0)[0] == "fail"
    assert failed_outcome(TimeoutError(), 2.0) == ("info", "no answer within 2.0s")
    assert failed_outcome(aiohttp.ServerDisconnectedError(), 2.0)[0] == "info"  # it may have been served
    assert failed_outcome(ConnectionResetError(104, "reset"), 2.0)[0] == "info"
