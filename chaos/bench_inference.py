"""Benchmark of the serving path: what HTTP, the model host and routing add to a model call.

resnet18 (ONNX Runtime, one thread), batch 1, on the CPU, measured side by side in one run,
in interleaved rounds so that machine noise hits every path alike:

- in-process: the loaded model called directly in this process (the floor);
- model + HTTP floor: what HTTP alone costs on this machine: the same request body to a
  bare aiohttp server in another process that reads it and answers the same 4 KB, added to
  the in-process time of the same round (redge's server side runs on aiohttp too);
- direct: the Open Inference Protocol over HTTP with binary tensors, to the peer that
  serves the app (HTTP + the peer + the model host process);
- forwarded: the same request to a second peer, which routes it to the first;
- redge's server-side share: each direct request is sent right after a bare-server one that
  holds idle as long as the model ran in-process (a server waiting for its model), and the
  pair gives (direct latency - the model's own time in the host, Server-Timing `model`) -
  (bare latency - its idle hold): what redge's HTTP worker, the hop to the model host and
  back, and its encoding add, with the machine's noise and the model's speed taken out.

Then throughput against the serving peer with 1, 4 and 16 concurrent clients. Output JSON.

    python -m redge.chaos.bench_inference --out results/bench_inference.json [--rounds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from redge.agent import oip
from redge.agent.dataplane import TIMING_HEADER, parse_server_timing
from redge.chaos.cluster import LocalCluster, wait_until
from redge.chaos.stats import summary

FLOOR_RESPONSE_BYTES = 4000 + 200  # resnet18's 1000 FP32 scores and their JSON header


HOLD_HEADER = "X-Hold-Ms"
HELD_HEADER = "X-Held-Ms"


def _floor_server(port_queue: Any) -> None:
    """A bare aiohttp server in its own process: read the body, optionally stay idle for
    `X-Hold-Ms` (as a server waiting for its model would), answer 4 KB and say how long
    it actually held (`X-Held-Ms`)."""
    from aiohttp import web

    async def echo(request: web.Request) -> web.Response:
        await request.read()
        hold_ms = float(request.headers.get(HOLD_HEADER, "0"))
        started = time.perf_counter()
        if hold_ms > 0:
            await asyncio.sleep(hold_ms / 1000)
        held_ms = (time.perf_counter() - started) * 1000
        return web.Response(body=bytes(FLOOR_RESPONSE_BYTES), headers={HELD_HEADER: f"{held_ms:.3f}"})

    async def serve() -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/infer", echo)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_queue.put(runner.addresses[0][1])
        await asyncio.Event().wait()

    asyncio.run(serve())


APP = {"name": "r18", "variants": ["resnet18"], "priority": "critical", "slo_ms": 1000, "backup": "none"}


def prepare(out: Path) -> Path:
    from redge.runtime.zoo import export

    export(out, ["resnet18"], ["onnx"])
    return out


def in_process_model(zoo: Path) -> Any:
    from redge.runtime.loader import LoadOptions, load

    model, _ = load(zoo / "resnet18" / "1-onnx", options=LoadOptions(threads=1))
    return model


async def timed_posts(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    count: int,
    parts: dict[str, list[float]] | None = None,
    timings: list[dict[str, float]] | None = None,
) -> list[float]:
    """Client-side latencies of `count` requests; the servers' `Server-Timing` durations,
    and what the client saw beyond the server's total (`client+net`), go into `parts`, and
    each request's durations, in order, into `timings`."""
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        async with session.post(url, data=body, headers=headers) as response:
            payload = await response.read()
            if response.status != 200:
                raise RuntimeError(f"{url}: {response.status} {payload[:200]!r}")
            timing = parse_server_timing(response.headers.get(TIMING_HEADER, ""))
            if HELD_HEADER in response.headers:
                timing = {"held": float(response.headers[HELD_HEADER])}
        latency_ms = (time.perf_counter() - started) * 1000
        latencies.append(latency_ms)
        if timings is not None:
            timings.append(timing)
        if parts is not None and timing:
            for name, value in timing.items():
                parts.setdefault(name, []).append(value)
            outermost = timing.get("forward", timing.get("total"))
            if outermost is not None:
                parts.setdefault("client+net", []).append(latency_ms - outermost)
    return latencies


async def throughput(url: str, body: bytes, headers: dict[str, str], concurrency: int, duration_s: float) -> dict[str, Any]:
    latencies: list[float] = []
    deadline = time.perf_counter() + duration_s
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status == 200:
                        latencies.append((time.perf_counter() - started) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed_s = time.perf_counter() - started
    return {"concurrency": concurrency, "requests_per_s": len(latencies) / elapsed_s, "latency_ms": summary(latencies)}


async def measure(
    cluster: LocalCluster, model: Any, floor_url: str, rounds: int, per_round: int, duration_s: float
) -> dict[str, Any]:
    snapshot = cluster.peers["n1"].snapshot()
    primary = next(r["node_id"] for r in snapshot["plan"]["r18"] if r["role"] == "primary")
    other = next(n for n in cluster.peers if n != primary)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    body, headers = oip.encode_infer_request({"input": x})
    direct_url = f"{cluster.peers[primary].url}/v2/models/r18/infer"
    forwarded_url = f"{cluster.peers[other].url}/v2/models/r18/infer"
    paths: dict[str, list[float]] = {"in_process": [], "http_floor": [], "direct_http": [], "forwarded_http": []}
    parts: dict[str, dict[str, list[float]]] = {"direct_http": {}, "forwarded_http": {}}
    # Per pair of requests: redge's direct latency, less the model's own time in the host (its
    # Server-Timing `model`), less the latency of a bare aiohttp server for the same body sent
    # just before it (less the time it held idle in place of a model): what redge's server
    # side adds beyond HTTP itself and the model.
    shares: list[float] = []
    async with aiohttp.ClientSession() as session:
        await timed_posts(session, direct_url, body, headers, 10)
        await timed_posts(session, forwarded_url, body, headers, 10)
        await timed_posts(session, floor_url, body, headers, 10)
        for _ in range(10):
            model.infer({"input": x})
        for round_index in range(rounds):
            in_process = []
            for _ in range(per_round):
                started = time.perf_counter()
                model.infer({"input": x})
                in_process.append((time.perf_counter() - started) * 1000)
            paths["in_process"] += in_process
            # A bare aiohttp request and a redge one, in turn, so that both meet the same
            # machine: the model's time of this round plus what HTTP alone took, request by
            # request, and redge's share of each pair.
            floor: list[float] = []
            direct: list[float] = []
            for index in range(per_round):
                # The bare server stays idle as long as the model ran in this round, so that
                # both servers go through the same read, wait, answer.
                hold = {**headers, HOLD_HEADER: f"{in_process[index]:.3f}"}
                held: list[dict[str, float]] = []
                floor += await timed_posts(session, floor_url, body, hold, 1, timings=held)
                timings: list[dict[str, float]] = []
                direct += await timed_posts(session, direct_url, body, headers, 1, parts["direct_http"], timings)
                floor[-1] -= held[0].get("held", 0.0)
                if "model" in timings[0]:
                    shares.append(direct[-1] - timings[0]["model"] - floor[-1])
            paths["http_floor"] += [model_ms + http_ms for model_ms, http_ms in zip(in_process, floor, strict=True)]
            paths["direct_http"] += direct
            paths["forwarded_http"] += await timed_posts(
                session, forwarded_url, body, headers, per_round, parts["forwarded_http"]
            )
            print(f"  round {round_index + 1}/{rounds}", file=sys.stderr)
    latency = {name: summary(values) for name, values in paths.items()}
    result = {
        "latency_ms": latency,
        "server_share_ms": summary(shares),
        "added_p50_ms": {
            "http_floor": latency["http_floor"]["p50"] - latency["in_process"]["p50"],
            "direct_http": latency["direct_http"]["p50"] - latency["in_process"]["p50"],
            "forwarded_http": latency["forwarded_http"]["p50"] - latency["in_process"]["p50"],
        },
        # Where the time of each HTTP path went (p50 of each part, ms), from the serving
        # peer's Server-Timing header: read (body), parse, queue + model + hop (the model
        # host), total (the serving peer's handler), forward (the forwarding peer's handler,
        # including the serving peer's), client+net (the client and the loopback).
        "parts_p50_ms": {
            path: {name: summary(values)["p50"] for name, values in sorted(found.items())} for path, found in parts.items()
        },
        "throughput": [],
    }
    for concurrency in (1, 4, 16):
        result["throughput"].append(await throughput(direct_url, body, headers, concurrency, duration_s))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench_inference.json"))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-round", type=int, default=25)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--model-host-nice", type=int, default=10, help="the peers' --model-host-nice")
    parser.add_argument("--http-worker-nice", type=int, default=5, help="the peers' --http-worker-nice")
    args = parser.parse_args(argv)
    import torch

    from redge.chaos.demo import zoo_directory

    torch.set_num_threads(1)
    zoo = prepare(zoo_directory())
    model = in_process_model(zoo)
    extra = ["--source", str(zoo), "--model-threads", "1", "--model-host-nice", str(args.model_host_nice),
             "--http-worker-nice", str(args.http_worker_nice)]
    context = multiprocessing.get_context("spawn")
    port_queue = context.Queue()
    floor_server = context.Process(target=_floor_server, args=(port_queue,), daemon=True)
    floor_server.start()
    floor_url = f"http://127.0.0.1:{port_queue.get(timeout=60)}/infer"
    with LocalCluster(size=2, extra_args=extra) as cluster:
        leader = cluster.wait_leader()
        status, body = cluster.register_app(leader, APP)
        if status != 200:
            raise RuntimeError(body)

        def serving() -> bool:
            snapshot = cluster.peers[leader].snapshot()
            return any(r["app"] == "r18" and r["state"] == "serving" for r in snapshot["replica_reports"])

        wait_until(serving, 180, interval_s=0.2, what="resnet18 serving")
        try:
            result = asyncio.run(measure(cluster, model, floor_url, args.rounds, args.per_round, args.duration_s))
        finally:
            floor_server.kill()
    report = {
        "benchmark": "inference",
        "command": "python -m redge.chaos.bench_inference " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": "resnet18, ONNX Runtime, 1 thread, batch 1, binary tensors",
        "model_host_nice": args.model_host_nice,
        "goal": {"server_share_p50_ms": 1.5},
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    latency = result["latency_ms"]
    print(
        f"p50/p99 ms: in-process {latency['in_process']['p50']:.2f}/{latency['in_process']['p99']:.2f}, "
        f"model + HTTP floor {latency['http_floor']['p50']:.2f}/{latency['http_floor']['p99']:.2f}, "
        f"direct HTTP {latency['direct_http']['p50']:.2f}/{latency['direct_http']['p99']:.2f}, "
        f"forwarded {latency['forwarded_http']['p50']:.2f}/{latency['forwarded_http']['p99']:.2f}; "
        f"added p50: HTTP floor {result['added_p50_ms']['http_floor']:.2f} ms, direct {result['added_p50_ms']['direct_http']:.2f} ms, forwarded {result['added_p50_ms']['forwarded_http']:.2f} ms"
    )
    share = result["server_share_ms"]
    print(f"  redge's server-side share (beyond a bare aiohttp server and the model): p50 {share['p50']:.2f} ms, "
          f"p99 {share['p99']:.2f} ms (goal p50 <= 1.5)")
    for path, found in result["parts_p50_ms"].items():
        print(f"  {path} parts p50 (ms): " + ", ".join(f"{name} {value:.2f}" for name, value in found.items()))
    for row in result["throughput"]:
        print(f"  {row['concurrency']:2d} clients: {row['requests_per_s']:.1f} req/s, p50 {row['latency_ms']['p50']:.1f} ms")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
