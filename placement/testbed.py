"""Problems to plan: the paper's testbed and seeded random clusters.

Tests, the benchmark and the peer's demo all need realistic instances, and
all of them must be reproducible, so the generators take a `random.Random`
(or anything with its methods) as an argument and never seed one
themselves. The model families carry sizes, accuracies (ImageNet top-1,
COCO mAP for YOLOv8) and latencies of the order the paper measured on an
NVIDIA A2 ("gpu") and a Xeon or Arm CPU ("cpu"); the loaded footprint is
a few times the weights, for activations and workspace.
"""

from __future__ import annotations

from typing import Protocol

from redge.placement.problem import (
    DEFAULT_SETTINGS,
    App,
    BackupPolicy,
    Node,
    Priority,
    Problem,
    Settings,
    Variant,
)

MB = 1_000_000
GB = 1_000_000_000


class Rng(Protocol):
    def random(self) -> float: ...
    def randint(self, a: int, b: int) -> int: ...
    def choice(self, seq): ...


def _variant(name: str, params_millions: float, accuracy: float, gpu_ms: float) -> Variant:
    size_bytes = int(params_millions * 4 * MB)
    return Variant(
        name=name,
        memory_bytes=int(size_bytes * 3 + 150 * MB),
        latency_ms_by_device=(("cpu", gpu_ms * 12.0), ("gpu", gpu_ms)),
        accuracy=accuracy,
        size_bytes=size_bytes,
    )


FAMILIES: dict[str, tuple[Variant, ...]] = {
    "resnet": (
        _variant("resnet152", 60.2, 0.783, 11.0),
        _variant("resnet101", 44.5, 0.774, 8.0),
        _variant("resnet50", 25.6, 0.761, 4.5),
        _variant("resnet18", 11.7, 0.698, 2.0),
    ),
    "efficientnet": (
        _variant("efficientnet_b4", 19.3, 0.834, 9.0),
        _variant("efficientnet_b2", 9.1, 0.803, 5.5),
        _variant("efficientnet_b0", 5.3, 0.777, 3.5),
    ),
    "yolov8": (
        _variant("yolov8m", 25.9, 0.502, 14.0),
        _variant("yolov8s", 11.2, 0.449, 7.0),
        _variant("yolov8n", 3.2, 0.373, 4.0),
    ),
    "mobilenet": (
        _variant("mobilenet_v3_large", 5.5, 0.753, 2.2),
        _variant("mobilenet_v3_small", 2.5, 0.677, 1.5),
    ),
}


def enterprise_node(node_id: str) -> Node:
    """A PowerEdge R630 with an NVIDIA A2, as in the paper's Table I."""
    return Node(node_id, "gpu", 256 * GB, 16 * GB, 400 * GB)


def testbed_problem(settings: Settings = DEFAULT_SETTINGS) -> Problem:
    """Five enterprise-edge nodes and 27 apps across the families, a third
    of them critical: the scale of FailLite's testbed."""
    nodes = tuple(enterprise_node(f"n{i + 1}") for i in range(5))
    families = sorted(FAMILIES)
    priorities = (Priority.CRITICAL, Priority.STANDARD, Priority.BEST_EFFORT)
    apps = []
    for k in range(27):
        family = FAMILIES[families[k % len(families)]]
        slowest_ms = family[0].latency_ms("gpu") or 0.0
        apps.append(
            App(
                name=f"app{k:02d}",
                priority=priorities[k % 3],
                slo_ms=round(slowest_ms * 1.5 + 5.0, 1),
                variants=family,
                request_rate_per_s=10.0,
            )
        )
    return Problem(nodes=nodes, apps=tuple(apps), settings=settings)


def random_problem(
    rng: Rng,
    node_count: int,
    app_count: int,
    memory_pressure: float = 1.0,
    settings: Settings = DEFAULT_SETTINGS,
    variants_max: int = 4,
) -> Problem:
    """A random cluster. `memory_pressure` is the ratio of the apps' largest
    variants' total memory to the nodes' total: above 1 someone must shrink
    or be shed. Node memory varies about fourfold; some nodes are CPU-only."""
    families = sorted(FAMILIES)
    apps = []
    for k in range(app_count):
        family = FAMILIES[families[rng.randint(0, len(families) - 1)]][:variants_max]
        first = rng.randint(0, max(0, len(family) - 2))
        variants = family[first:]
        slowest_ms = variants[0].latency_ms("gpu") or 0.0
        apps.append(
            App(
                name=f"app{k:03d}",
                priority=Priority(rng.randint(0, 2)),
                slo_ms=round(slowest_ms * (1.1 + rng.random()), 2),
                variants=variants,
                request_rate_per_s=round(rng.random() * 20.0, 2),
                backup=rng.choice(
                    (
                        BackupPolicy.AUTO,
                        BackupPolicy.AUTO,
                        BackupPolicy.WARM,
                        BackupPolicy.COLD,
                        BackupPolicy.NONE,
                    )
                ),
            )
        )
    demand_bytes = sum(a.variants[0].memory_bytes for a in apps)
    shares = [0.5 + rng.random() * 1.5 for _ in range(node_count)]
    nodes = []
    for i, share in enumerate(shares):
        memory_bytes = int(demand_bytes / max(memory_pressure, 1e-6) * share / sum(shares))
        storage_bytes = int(sum(a.variants[0].size_bytes for a in apps) * (0.3 + rng.random()))
        kind = "cpu" if rng.random() < 0.15 else "gpu"
        nodes.append(Node(f"node{i:03d}", kind, memory_bytes, memory_bytes, storage_bytes))
    return Problem(nodes=tuple(nodes), apps=tuple(apps), settings=settings)
