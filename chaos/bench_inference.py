"""Benchmark of the serving path: what HTTP, the model host and routing add to a model call.

resnet18 (ONNX Runtime, one thread), batch 1, on the CPU, measured side by side in one run,
in interleaved rounds so that machine noise hits every path alike:

- in-process: the loaded model called directly in this process (the floor);
- direct: the Open Inference Protocol over HTTP with binary tensors, to the peer that
  serves the app (HTTP + the peer + the model host process);
- forwarded: the same request to a second peer, which routes it to the first.

Then throughput against the serving peer with 1, 4 and 16 concurrent clients. Output JSON.

    python -m redge.chaos.bench_inference --out results/bench_inference.json [--rounds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from redge.agent import oip
from redge.chaos.cluster import LocalCluster, wait_until
from redge.chaos.stats import summary

APP = {"name": "r18", "variants": ["resnet18"], "priority": "critical", "slo_ms": 1000, "backup": "none"}


def prepare(out: Path) -> Path:
    from redge.runtime.zoo import export

    export(out, ["resnet18"], ["onnx"])
    return out


def in_process_model(zoo: Path) -> Any:
    from redge.runtime.loader import LoadOptions, load

    model, _ = load(zoo / "resnet18" / "1-onnx", options=LoadOptions(threads=1))
    return model


async def timed_posts(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        async with session.post(url, data=body, headers=headers) as response:
            payload = await response.read()
            if response.status != 200:
                raise RuntimeError(f"{url}: {response.status} {payload[:200]!r}")
        latencies.append((time.perf_counter() - started) * 1000)
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


async def measure(cluster: LocalCluster, model: Any, rounds: int, per_round: int, duration_s: float) -> dict[str, Any]:
    snapshot = cluster.peers["n1"].snapshot()
    primary = next(r["node_id"] for r in snapshot["plan"]["r18"] if r["role"] == "primary")
    other = next(n for n in cluster.peers if n != primary)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    body, headers = oip.encode_infer_request({"input": x})
    direct_url = f"{cluster.peers[primary].url}/v2/models/r18/infer"
    forwarded_url = f"{cluster.peers[other].url}/v2/models/r18/infer"
    paths: dict[str, list[float]] = {"in_process": [], "direct_http": [], "forwarded_http": []}
    async with aiohttp.ClientSession() as session:
        await timed_posts(session, direct_url, body, headers, 10)
        await timed_posts(session, forwarded_url, body, headers, 10)
        for _ in range(10):
            model.infer({"input": x})
        for round_index in range(rounds):
            for _ in range(per_round):
                started = time.perf_counter()
                model.infer({"input": x})
                paths["in_process"].append((time.perf_counter() - started) * 1000)
            paths["direct_http"] += await timed_posts(session, direct_url, body, headers, per_round)
            paths["forwarded_http"] += await timed_posts(session, forwarded_url, body, headers, per_round)
            print(f"  round {round_index + 1}/{rounds}", file=sys.stderr)
    latency = {name: summary(values) for name, values in paths.items()}
    result = {
        "latency_ms": latency,
        "added_p50_ms": {
            "direct_http": latency["direct_http"]["p50"] - latency["in_process"]["p50"],
            "forwarded_http": latency["forwarded_http"]["p50"] - latency["in_process"]["p50"],
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
    args = parser.parse_args(argv)
    import torch

    from redge.chaos.demo import zoo_directory

    torch.set_num_threads(1)
    zoo = prepare(zoo_directory())
    model = in_process_model(zoo)
    extra = ["--source", str(zoo), "--model-threads", "1", "--model-host-nice", str(args.model_host_nice)]
    with LocalCluster(size=2, extra_args=extra) as cluster:
        leader = cluster.wait_leader()
        status, body = cluster.register_app(leader, APP)
        if status != 200:
            raise RuntimeError(body)

        def serving() -> bool:
            snapshot = cluster.peers[leader].snapshot()
            return any(r["app"] == "r18" and r["state"] == "serving" for r in snapshot["replica_reports"])

        wait_until(serving, 180, interval_s=0.2, what="resnet18 serving")
        result = asyncio.run(measure(cluster, model, args.rounds, args.per_round, args.duration_s))
    report = {
        "benchmark": "inference",
        "command": "python -m redge.chaos.bench_inference " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": "resnet18, ONNX Runtime, 1 thread, batch 1, binary tensors",
        "model_host_nice": args.model_host_nice,
        "goal": {"direct_http_added_p50_ms": 1.5},
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    latency = result["latency_ms"]
    print(
        f"p50/p99 ms: in-process {latency['in_process']['p50']:.2f}/{latency['in_process']['p99']:.2f}, "
        f"direct HTTP {latency['direct_http']['p50']:.2f}/{latency['direct_http']['p99']:.2f}, "
        f"forwarded {latency['forwarded_http']['p50']:.2f}/{latency['forwarded_http']['p99']:.2f}; "
        f"added p50: direct {result['added_p50_ms']['direct_http']:.2f} ms, forwarded {result['added_p50_ms']['forwarded_http']:.2f} ms"
    )
    for row in result["throughput"]:
        print(f"  {row['concurrency']:2d} clients: {row['requests_per_s']:.1f} req/s, p50 {row['latency_ms']['p50']:.1f} ms")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
