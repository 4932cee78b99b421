"""Benchmark: model loading time per format against the floor of reading the same bytes.

Loading time is one of the paper's recovery metrics (Fig. 2 plots it against model
size). This script measures, for torchvision models exported by `redge.runtime.zoo`:

- load time per format and per phase (read, deserialize, to_device, warmup), page cache
  warm and cold, next to the time to only read the same bytes (the floor);
- steady inference latency per backend (batch 1);
- the largest gap seen by a 1 ms ticker in the event loop while resnet152 loads, in a
  thread of this process (torch.jit.load holds the GIL) and in the model host process;
- warm-backup promotion time in the model host;

and checks the runtime's goals: the default cold-backup format loads in <= 1.5x the raw
read time for the median model; the serving format as a peer loads it (`onnx+derived`:
ONNX Runtime from the graph the node optimised once, `loader.derive_onnx`) in <= 2x the
raw read of the artifact's bytes; promotion is under 1 ms; the default CPU serving
backend is the fastest one measured. Trials repeat; distributions are p50/p99/max.

    python chaos/bench_loading.py --quick --out results/bench_loading.json

Cold means the artifact's pages are evicted before each trial: with
`echo 1 > /proc/sys/vm/drop_caches` where permitted, else `posix_fadvise(DONTNEED)` on
the artifact's files.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

QUICK_MODELS = ("mobilenet_v3_small", "resnet18", "efficientnet_b0", "resnet50", "resnet152")
FULL_MODELS = (
    "mobilenet_v3_small", "shufflenet_v2_x1_0", "regnet_y_400mf", "mobilenet_v3_large", "efficientnet_b0",
    "resnet18", "efficientnet_b1", "efficientnet_b2", "resnet34", "efficientnet_b3", "efficientnet_b4",
    "resnet50", "resnet101", "resnet152",
)
FORMATS = ("safetensors", "onnx", "torchscript", "pt2")
# ONNX as a peer loads it once its host has derived the optimised graph (`loader.derive_onnx`).
DERIVED = "onnx+derived"
GIL_MODEL = "resnet152"
TICK_S = 0.001


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else float("nan"),
        "trials": len(values),
    }


# -- page cache


def drop_caches_permitted() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("1")
        return True
    except OSError:
        return False


def evict(paths: list[Path], method: str) -> None:
    if method == "drop_caches":
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("1")
    elif method == "fadvise":
        for path in paths:
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)  # dirty pages (a file just fetched) are not dropped: write them first
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def raw_read_ms(paths: list[Path], fresh_buffer: bool = True) -> float:
    """Read the files' bytes; into fresh memory by default, as a loaded model must hold them.

    `fresh_buffer=False` reuses one 16 MiB buffer: no page faults, a lower floor.
    """
    started = time.perf_counter()
    for path in paths:
        size_bytes = path.stat().st_size
        with open(path, "rb", buffering=0) as handle:
            if fresh_buffer:
                buffer = np.empty(size_bytes, dtype=np.uint8)
                view = memoryview(buffer)
                offset = 0
                while offset < size_bytes:
                    count = handle.readinto(view[offset:])
                    if not count:
                        break
                    offset += count
                del view, buffer
            else:
                reused = bytearray(16 * 1024 * 1024)
                while handle.readinto(reused):
                    pass
    return (time.perf_counter() - started) * 1000


# -- loading and inference


def measure_loading(artifacts: list[tuple[Path, Any]], trials_warm: int, trials_cold: int, cold_method: str, threads: int,
                    derived_dir: Path) -> list[dict[str, Any]]:
    """Load one model in each format, trial by trial, the formats interleaved in each trial.

    Each trial first reads the same bytes (the floor) and then loads; in a cold trial the
    artifact's pages are evicted before each. Interleaving the formats puts them under
    the same background load on a shared machine.
    """
    from redge.runtime.loader import load

    results = []
    candidates = entries(artifacts, threads, derived_dir)
    for directory, manifest, label, options in candidates:
        results.append({
            "model": manifest.name, "format": label, "parameter_count": manifest.parameter_count,
            "size_bytes": manifest.size_bytes, "accuracy": manifest.accuracy, "gflops": manifest.gflops,
        })
        # The first load pays one-off imports and lazy initialisation: not a trial.
        model, _ = load(directory, manifest, "cpu", options)
        del model
    for cache, trials in (("warm", trials_warm), ("cold", trials_cold)):
        if cache == "cold" and cold_method == "none":
            continue
        reads: list[list[float]] = [[] for _ in candidates]
        reads_reused: list[list[float]] = [[] for _ in candidates]
        reports: list[list[Any]] = [[] for _ in candidates]
        for _ in range(trials):
            for index, (directory, manifest, label, options) in enumerate(candidates):
                files = [directory / entry.path for entry in manifest.files]
                if cache == "cold":
                    evict(files + derived_files(manifest, label, options), cold_method)
                else:
                    raw_read_ms(files)
                reads[index].append(raw_read_ms(files))
                if cache == "cold":
                    evict(files, cold_method)
                reads_reused[index].append(raw_read_ms(files, fresh_buffer=False))
                if cache == "cold":
                    evict(files + derived_files(manifest, label, options), cold_method)
                model, report = load(directory, manifest, "cpu", options)
                assert report.derived == (label == DERIVED), (label, report.derived)
                reports[index].append(report)
                del model
                gc.collect()
        for index, result in enumerate(results):
            phases = {
                phase: summary([getattr(r, f"{phase}_ms") for r in reports[index]])
                for phase in ("verify", "read", "deserialize", "to_device", "warmup", "total")
            }
            ready = [r.total_ms - r.warmup_ms for r in reports[index]]
            read_p50 = max(statistics.median(reads[index]), 1e-6)
            result[cache] = {
                "raw_read_ms": summary(reads[index]),
                "raw_read_reused_buffer_ms": summary(reads_reused[index]),
                "phases_ms": phases,
                "ready_ms": summary(ready),  # loaded, before the warm-up inference
                "ready_over_read": statistics.median(ready) / read_p50,
                "total_over_read": statistics.median([r.total_ms for r in reports[index]]) / read_p50,
            }
    return results


def entries(artifacts: list[tuple[Path, Any]], threads: int, derived_dir: Path) -> list[tuple[Path, Any, str, Any]]:
    """(directory, manifest, label, load options) per artifact, and for an ONNX artifact one
    more: `onnx+derived`, loaded from the graph optimised once (derived here first)."""
    from redge.runtime.loader import LoadOptions, can_derive, derive_onnx

    plain = LoadOptions(threads=threads, verify="size")
    derived = LoadOptions(threads=threads, verify="size", derived_dir=str(derived_dir))
    result = []
    for directory, manifest in artifacts:
        result.append((directory, manifest, manifest.format, plain))
        if can_derive(manifest, derived):
            derive_onnx(directory, manifest, "cpu", derived)
            result.append((directory, manifest, DERIVED, derived))
    return result


def derived_files(manifest: Any, label: str, options: Any) -> list[Path]:
    from redge.runtime.loader import derived_onnx_path

    if label != DERIVED:
        return []
    return sorted(path for path in derived_onnx_path(options.derived_dir, manifest).iterdir() if path.is_file())



def measure_inference(artifacts: list[tuple[Path, Any]], iterations: int, threads: int, derived_dir: Path) -> dict[str, dict[str, float]]:
    """Steady batch-1 latency of one model in each format, interleaved round-robin.

    The machines are shared and noisy: interleaving puts every backend under the same
    background load, so their ratio means something even when absolute times wander.
    """
    from redge.runtime.loader import load

    models = {label: load(directory, manifest, "cpu", options)[0] for directory, manifest, label, options in entries(artifacts, threads, derived_dir)}
    manifest = artifacts[0][1]
    rng = np.random.default_rng(0)
    example = {spec.name: rng.standard_normal(spec.example(1).shape).astype(spec.numpy_dtype) for spec in manifest.inputs}
    latencies: dict[str, list[float]] = {format_name: [] for format_name in models}
    for _ in range(iterations):
        for format_name, model in models.items():
            started = time.perf_counter()
            model.infer(example)
            latencies[format_name].append((time.perf_counter() - started) * 1000)
    del models
    gc.collect()
    return {format_name: summary(values) for format_name, values in latencies.items()}


# -- event loop stalls and promotion


async def _max_gap_during(operation: Any) -> float:
    """Run `operation` (a coroutine) next to a 1 ms ticker; return the largest tick gap in ms."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(TICK_S)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.02)
    gaps.clear()
    try:
        await operation
    finally:
        done.set()
        await task
    return max(gaps) * 1000 if gaps else float("nan")


async def measure_gil_and_promotion(zoo_dir: Path, trials: int, threads: int) -> dict[str, Any]:
    import torch

    from redge.runtime.host import HostOptions, ModelHost
    from redge.runtime.loader import LoadOptions, load
    from redge.runtime.manifest import Manifest

    ts_dir = zoo_dir / GIL_MODEL / "1-torchscript"
    st_dir = zoo_dir / GIL_MODEL / "1-safetensors"
    ts_manifest, st_manifest = Manifest.read(ts_dir), Manifest.read(st_dir)
    options = LoadOptions(threads=threads, warmup=False)
    raw_read_ms([ts_dir / ts_manifest.files[0].path, st_dir / st_manifest.files[0].path])

    def jit_load() -> None:
        torch.jit.load(str(ts_dir / ts_manifest.files[0].path), map_location="cpu")

    def safetensors_load() -> None:
        load(st_dir, st_manifest, "cpu", options)

    gaps: dict[str, list[float]] = {"idle": [], "jit_load_in_thread": [], "safetensors_in_thread": [], "torchscript_in_host": [], "safetensors_in_host": []}
    host = ModelHost(HostOptions(threads=threads))
    await host.start()
    try:
        for trial in range(trials):
            gaps["idle"].append(await _max_gap_during(asyncio.sleep(0.5)))
            gaps["jit_load_in_thread"].append(await _max_gap_during(asyncio.to_thread(jit_load)))
            gaps["safetensors_in_thread"].append(await _max_gap_during(asyncio.to_thread(safetensors_load)))
            gaps["torchscript_in_host"].append(await _max_gap_during(host.load(f"ts-{trial}", ts_dir, ts_manifest)))
            await host.unload(f"ts-{trial}")
            gaps["safetensors_in_host"].append(await _max_gap_during(host.load(f"st-{trial}", st_dir, st_manifest)))
            await host.unload(f"st-{trial}")
        await host.load("backup", st_dir, st_manifest, role="warm")
        promotions_us = []
        for _ in range(1000):
            started = time.perf_counter()
            await host.promote("backup")
            promotions_us.append((time.perf_counter() - started) * 1e6)
            await host.demote("backup")
        # Promotion while the host is busy loading another model: still a flag.
        busy_promotions_us = []
        loading = asyncio.ensure_future(host.load("busy", ts_dir, ts_manifest))
        while not loading.done() and len(busy_promotions_us) < 1000:
            started = time.perf_counter()
            await host.promote("backup")
            busy_promotions_us.append((time.perf_counter() - started) * 1e6)
            await host.demote("backup")
            await asyncio.sleep(0.0005)
        await loading
        example = {"input": np.zeros((1, 3, 224, 224), np.float32)}
        await host.promote("backup")
        host_latencies = []
        for _ in range(10):
            started = time.perf_counter()
            await host.infer("backup", example, time.monotonic() + 30)
            host_latencies.append((time.perf_counter() - started) * 1000)
    finally:
        await host.aclose()
    return {
        "model": GIL_MODEL,
        "tick_ms": TICK_S * 1000,
        "max_gap_ms": {name: summary(values) for name, values in gaps.items()},
        "promotion_us": summary(promotions_us),
        "promotion_while_host_loads_us": summary(busy_promotions_us),
        "host_infer_ms_safetensors": summary(host_latencies),
    }


# -- goals and figure


def evaluate_goals(artifacts: list[dict[str, Any]], gil: dict[str, Any] | None) -> dict[str, Any]:
    from redge.runtime.manifest import FORMAT_PREFERENCE

    cold_format = FORMAT_PREFERENCE[("cpu", "cold_backup")][0]
    serving_format = FORMAT_PREFERENCE[("cpu", "serving")][0]
    cache = "cold" if any("cold" in a for a in artifacts) else "warm"
    ratios = {a["model"]: a[cache]["ready_over_read"] for a in artifacts if a["format"] == cold_format and cache in a}
    ratios_total = {a["model"]: a[cache]["total_over_read"] for a in artifacts if a["format"] == cold_format and cache in a}
    fastest: dict[str, str] = {}
    for model in {a["model"] for a in artifacts}:
        candidates = [a for a in artifacts if a["model"] == model]
        fastest[model] = min(candidates, key=lambda a: a["inference_ms"]["p50"])["format"]
    serving_ratios = {a["model"]: a[cache]["total_over_read"] for a in artifacts if a["format"] == DERIVED and cache in a}
    serving_ready_ratios = {a["model"]: a[cache]["ready_over_read"] for a in artifacts if a["format"] == DERIVED and cache in a}
    goals: dict[str, Any] = {
        "serving_load": DERIVED,
        "serving_total_over_read_per_model": serving_ratios,
        "serving_total_over_read_median": statistics.median(serving_ratios.values()) if serving_ratios else None,
        "serving_ready_over_read_median": statistics.median(serving_ready_ratios.values()) if serving_ready_ratios else None,
        # With its weights mapped, the derived graph's bytes are read as the warm-up first
        # touches them: its load is measured with the warm-up, never without.
        "serving_load_goal_met": bool(serving_ratios) and statistics.median(serving_ratios.values()) <= 2.0,
        "cold_backup_format": cold_format,
        "cold_backup_ready_over_read_per_model": ratios,
        "cold_backup_ready_over_read_median": statistics.median(ratios.values()) if ratios else None,
        "cold_backup_total_with_warmup_over_read_median": statistics.median(ratios_total.values()) if ratios_total else None,
        "cold_backup_goal_met": bool(ratios) and statistics.median(ratios.values()) <= 1.5,
        "serving_format": serving_format,
        "fastest_inference_format_per_model": fastest,
        "serving_goal_met": all(f in (serving_format, DERIVED) for f in fastest.values()),
    }
    if gil is not None:
        goals["promotion_p99_us"] = gil["promotion_us"]["p99"]
        goals["promotion_goal_met"] = gil["promotion_us"]["p99"] < 1000 and gil["promotion_while_host_loads_us"]["p99"] < 1000
    return goals


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    artifacts = results["artifacts"]
    caches = [c for c in ("warm", "cold") if any(c in a for a in artifacts)]
    figure, axes = plt.subplots(1, len(caches) + 1, figsize=(6 * (len(caches) + 1), 5))
    markers = {"safetensors": "o", "onnx": "s", "torchscript": "^", "pt2": "D", "tensorrt": "v", DERIVED: "P"}
    for axis, cache in zip(axes, caches, strict=False):
        for format_name in sorted({a["format"] for a in artifacts}):
            points = sorted((a["parameter_count"], a[cache]["phases_ms"]["total"]["p50"], a[cache]["ready_ms"]["p50"]) for a in artifacts if a["format"] == format_name and cache in a)
            if points:
                (line,) = axis.plot([p[0] for p in points], [p[1] for p in points], marker=markers.get(format_name, "o"), label=f"{format_name} (with warm-up)")
                axis.plot([p[0] for p in points], [p[2] for p in points], marker=markers.get(format_name, "o"), linestyle=":", alpha=0.6, color=line.get_color(), label=f"{format_name} (ready, no warm-up)")
        floor = {}
        for a in artifacts:
            if cache in a:
                floor.setdefault(a["parameter_count"], []).append(a[cache]["raw_read_ms"]["p50"])
        xs = sorted(floor)
        axis.plot(xs, [statistics.median(floor[x]) for x in xs], color="black", linestyle="--", marker="x", label="raw read (floor)")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("parameters")
        axis.set_ylabel("load time, p50 (ms)")
        axis.set_title(f"loading time, page cache {cache}")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=6)
    axis = axes[-1]
    for format_name in sorted({a["format"] for a in artifacts}):
        points = sorted((a["parameter_count"], a["inference_ms"]["p50"]) for a in artifacts if a["format"] == format_name)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=markers.get(format_name, "o"), label=format_name)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("parameters")
    axis.set_ylabel("inference, batch 1, p50 (ms)")
    axis.set_title(f"steady inference ({results['settings']['threads']} threads)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("results/bench_loading.json"))
    parser.add_argument("--png", type=Path, default=None, help="default: --out with .png")
    parser.add_argument("--zoo-dir", type=Path, default=Path("results/zoo"))
    parser.add_argument("--quick", action="store_true", help="5 models, few trials: a few minutes")
    parser.add_argument("--models", default=None, help="comma-separated torchvision names")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--trials-warm", type=int, default=None)
    parser.add_argument("--trials-cold", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None, help="inference iterations per backend")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cold-method", choices=("auto", "drop_caches", "fadvise", "none"), default="auto")
    parser.add_argument("--skip-gil", action="store_true")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON at --out")
    arguments = parser.parse_args(argv)
    if arguments.replot:
        png = arguments.png or arguments.out.with_suffix(".png")
        plot(orjson.loads(arguments.out.read_bytes()), png)
        print(f"wrote {png}")
        return 0

    import torch

    from redge.runtime.manifest import Manifest
    from redge.runtime.zoo import export

    torch.set_num_threads(arguments.threads)
    models = arguments.models.split(",") if arguments.models else list(QUICK_MODELS if arguments.quick else FULL_MODELS)
    formats = arguments.formats.split(",")
    trials_warm = arguments.trials_warm or (3 if arguments.quick else 7)
    trials_cold = arguments.trials_cold or (2 if arguments.quick else 5)
    iterations = arguments.iterations or (15 if arguments.quick else 50)
    if not arguments.skip_gil and GIL_MODEL not in models:
        models.append(GIL_MODEL)
    cold_method = arguments.cold_method
    permitted = drop_caches_permitted()
    if cold_method == "auto":
        cold_method = "drop_caches" if permitted else "fadvise"
    elif cold_method == "drop_caches" and not permitted:
        print("drop_caches is not permitted here; using posix_fadvise(DONTNEED)", file=sys.stderr)
        cold_method = "fadvise"

    started = time.perf_counter()
    print(f"exporting {len(models)} models x {len(formats)} formats into {arguments.zoo_dir} (kept between runs)", flush=True)
    export(arguments.zoo_dir, models, formats, progress=lambda p: print(f"  export {p.model} {p.format}: {p.skipped_reason or f'{p.seconds:.1f} s'}", flush=True))

    artifacts = []
    for model in models:
        model_artifacts: list[tuple[Path, Any]] = []
        for format_name in formats:
            directory = arguments.zoo_dir / model / f"1-{format_name}"
            if (directory / "manifest.json").is_file():
                model_artifacts.append((directory, Manifest.read(directory)))
        if not model_artifacts:
            continue
        derived_dir = arguments.zoo_dir / ".derived"
        model_results = measure_loading(model_artifacts, trials_warm, trials_cold, cold_method, arguments.threads, derived_dir)
        inference = measure_inference(model_artifacts, iterations, arguments.threads, derived_dir)
        for result in model_results:
            result["inference_ms"] = inference[result["format"]]
            artifacts.append(result)
            cold = result.get("cold", {})
            print(
                f"  {model:20s} {result['format']:12s} warm {result['warm']['phases_ms']['total']['p50']:8.1f} ms "
                f"(read floor {result['warm']['raw_read_ms']['p50']:6.1f})"
                + (f"  cold {cold['phases_ms']['total']['p50']:8.1f} ms (floor {cold['raw_read_ms']['p50']:6.1f})" if cold else "")
                + f"  infer {result['inference_ms']['p50']:7.2f} ms",
                flush=True,
            )
    gil = None if arguments.skip_gil else asyncio.run(measure_gil_and_promotion(arguments.zoo_dir, trials=3 if arguments.quick else 5, threads=arguments.threads))
    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "settings": {
            "threads": arguments.threads, "trials_warm": trials_warm, "trials_cold": trials_cold,
            "iterations": iterations, "cold_method": cold_method, "drop_caches_permitted": permitted,
            "models": models, "formats": formats,
        },
        "artifacts": artifacts,
        "event_loop": gil,
    }
    results["goals"] = evaluate_goals(artifacts, gil)
    results["seconds"] = time.perf_counter() - started
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    png = arguments.png or arguments.out.with_suffix(".png")
    plot(results, png)
    print(orjson.dumps({"goals": results["goals"], "event_loop": gil}, option=orjson.OPT_INDENT_2).decode())
    print(f"wrote {arguments.out} and {png} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
