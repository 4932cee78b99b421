"""The demo's report: load phases as its table prints them, loads as its plot shades them."""

from __future__ import annotations

import pytest

from redge.chaos.demo import load_spans, short_phases


@pytest.mark.parametrize(
    ("detail", "expected"),
    [
        ("onnx: verify 0.0 read 4.2 deserialize 22.9 to_device 0.0 warmup 6.6 ms (derived graph)", "onnx* r4 d23 w7"),
        ("safetensors: verify 0.0 read 147.5 deserialize 2318.9 to_device 0.0 warmup 29.8 ms", "safetensors r148 d2319 w30"),
        ("switched from safetensors; onnx: verify 0.0 read 3.5 deserialize 59.2 to_device 0.0 warmup 15.0 ms",
         "switched from safetensors; onnx r4 d59 w15"),
        ("", ""),
        ("garbage without phases", "garbage without phases"),
        ("onnx: read x deserialize 1.0", "onnx d1"),
    ],
)
def test_short_phases(detail: str, expected: str) -> None:
    assert short_phases(detail) == expected


def test_load_spans_end_at_load_done_and_last_its_duration() -> None:
    events = [
        {"kind": "load_started", "app": "tagger", "node": "n2", "at_ms": 10_100},
        {"kind": "load_done", "app": "tagger", "node": "n2", "at_ms": 10_400, "duration_ms": 300.0,
         "detail": "onnx: verify 0.0 read 4.0 deserialize 20.0 to_device 0.0 warmup 6.0 ms (derived graph)"},
        {"kind": "load_done", "app": "detector", "node": "n1", "at_ms": 10_500, "duration_ms": 100.0, "detail": ""},
        {"kind": "load_done", "app": "tagger", "node": "n3", "at_ms": 9_000, "duration_ms": 50.0, "detail": ""},
    ]
    assert load_spans(events, "tagger", 10.0) == [{"from_s": pytest.approx(0.1), "to_s": pytest.approx(0.4),
                                                   "label": "n2: onnx* r4 d20 w6"}]
