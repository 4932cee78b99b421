"""The Open Inference Protocol codec: round trips, every malformed request a BadRequest, fuzzed."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from redge.agent.oip import (
    HEADER_LENGTH,
    BadRequest,
    RequestedOutput,
    decode_infer_response,
    encode_infer_request,
    encode_infer_response,
    parse_infer_request,
)

LIMIT = 1 << 20

dtypes = st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.uint8, np.float16, np.bool_])
arrays = dtypes.flatmap(lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=1, max_dims=4, max_side=5)))


@given(array=arrays, binary=st.booleans())
@settings(max_examples=200, deadline=None)
def test_request_round_trip(array, binary):
    # JSON has no inf or nan: only the binary extension carries them.
    assume(binary or array.dtype.kind != "f" or bool(np.isfinite(array).all()))
    body, headers = encode_infer_request({"x": array}, binary=binary)
    parsed = parse_infer_request(body, headers.get(HEADER_LENGTH), LIMIT)
    assert parsed.inputs["x"].dtype == array.dtype
    assert parsed.inputs["x"].shape == array.shape
    np.testing.assert_array_equal(parsed.inputs["x"], array)


@given(array=arrays, binary=st.booleans())
@settings(max_examples=100, deadline=None)
def test_response_round_trip(array, binary):
    assume(binary or array.dtype.kind != "f" or bool(np.isfinite(array).all()))
    request = parse_infer_request(*_json_request(), LIMIT)
    request.binary_output_default = binary
    body, headers = encode_infer_response("app", "1", {"y": array}, request, {"node_id": "n1", "epoch": 3})
    header, outputs = decode_infer_response(body, headers.get(HEADER_LENGTH))
    assert header["parameters"] == {"node_id": "n1", "epoch": 3}
    np.testing.assert_array_equal(outputs["y"], array)


def _json_request(data=None):
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": data or [1.0, 2.0]}]})
    return body, None


def test_nested_data_is_row_major():
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "INT64", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]})
    parsed = parse_infer_request(body, None, LIMIT)
    np.testing.assert_array_equal(parsed.inputs["x"], np.array([[1, 2], [3, 4]]))


def test_requested_outputs_choose_binary_per_output():
    body = orjson.dumps({
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}],
        "outputs": [{"name": "a", "parameters": {"binary_data": True}}, {"name": "b"}],
    })
    request = parse_infer_request(body, None, LIMIT)
    assert request.outputs == [RequestedOutput("a", True), RequestedOutput("b", False)]
    response, headers = encode_infer_response(
        "m", "1", {"a": np.zeros(2, np.float32), "b": np.ones(1, np.int64)}, request
    )
    header, _ = decode_infer_response(response, headers[HEADER_LENGTH])
    assert "data" not in header["outputs"][0] and header["outputs"][1]["data"] == [1]


def binary_request(declared_size: int, payload: bytes, header_length: int | None = None) -> tuple[bytes, str]:
    header = orjson.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": declared_size}}]}
    )
    return header + payload, str(header_length if header_length is not None else len(header))


BAD = [
    ("not json", b"{nope", None, "not valid JSON"),
    ("array at top", b"[]", None, "JSON object"),
    ("no inputs", b"{}", None, "non-empty 'inputs'"),
    ("datatype not a string", orjson.dumps({"inputs": [{"name": "x", "datatype": [1], "shape": [1], "data": [1]}]}), None, "must be a string"),
    ("unknown datatype", orjson.dumps({"inputs": [{"name": "x", "datatype": "FP8", "shape": [1], "data": [1]}]}), None, "unknown datatype"),
    ("bytes datatype", orjson.dumps({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}), None, "BYTES"),
    ("shape mismatch", orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}), None, "3 expected"),
    ("negative dim", orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]}), None, "non-negative"),
    ("string data", orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": ["a"]}]}), None, "FP32"),
    ("float for int", orjson.dumps({"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1.5]}]}), None, "integers"),
    ("overflow", orjson.dumps({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [300]}]}), None, "UINT8"),
    ("duplicate input", orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}] * 2}), None, "twice"),
    ("no data", orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}), None, "needs 'data'"),
    ("header length not int", *binary_request(8, b"\0" * 8)[:1], "abc", "must be an integer"),
    ("header length too long", binary_request(8, b"\0" * 8)[0], "100000", "outside the body"),
    ("binary size wrong", *binary_request(4, b"\0" * 4), "does not match"),
    ("binary truncated", *binary_request(8, b"\0" * 4), "ends after the body"),
    ("binary trailing", *binary_request(8, b"\0" * 12), "after the last binary input"),
    ("huge shape", orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1 << 30, 1 << 30], "data": [1]}]}), None, "size limit"),
]


@pytest.mark.parametrize("name,body,header_length,message", BAD, ids=[case[0] for case in BAD])
def test_malformed_requests_are_bad_requests(name, body, header_length, message):
    with pytest.raises(BadRequest, match=message):
        parse_infer_request(body, header_length, LIMIT)


def test_body_over_the_limit():
    body, headers = encode_infer_request({"x": np.zeros(1000, np.float32)})
    with pytest.raises(BadRequest, match="exceeds the limit"):
        parse_infer_request(body, headers[HEADER_LENGTH], 100)


@given(body=st.binary(max_size=512), header_length=st.one_of(st.none(), st.integers(-5, 600).map(str), st.text(max_size=5)))
@settings(max_examples=500, deadline=None)
def test_fuzzed_bytes_never_raise_anything_but_bad_request(body, header_length):
    try:
        parse_infer_request(body, header_length, LIMIT)
    except BadRequest:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@given(
    inputs=st.lists(
        st.fixed_dictionaries(
            {"name": st.text(max_size=4), "datatype": st.sampled_from(["FP32", "INT64", "BOOL", "UINT8", "X"]),
             "shape": st.lists(st.integers(-2, 4), max_size=3), "data": json_values},
            optional={"parameters": st.dictionaries(st.just("binary_data_size"), st.integers(-1, 64))},
        ),
        max_size=3,
    ),
    trailing=st.binary(max_size=64),
)
@settings(max_examples=500, deadline=None)
def test_fuzzed_structured_requests_never_raise_anything_but_bad_request(inputs, trailing):
    header = json.dumps({"inputs": inputs}).encode()
    try:
        parse_infer_request(header + trailing, str(len(header)), LIMIT)
    except BadRequest:
        pass


# -- the model's declared inputs, judged before the data is decoded

from redge.agent.oip import dimension_problem, request_bytes_bound  # noqa: E402
from redge.runtime.tensor import TensorSpec  # noqa: E402

IMAGE = TensorSpec("input", "FP32", (-1, 3, 224, 224))
VECTOR = TensorSpec("input", "FP32", (-1, 16))


@pytest.mark.parametrize(
    ("spec", "datatype", "shape", "problem"),
    [
        (IMAGE, "FP32", (1, 3, 224, 224), None),
        (IMAGE, "FP32", (64, 3, 224, 224), None),
        (IMAGE, "FP32", (65, 3, 224, 224), "dynamic dimension must be 1..64"),
        (IMAGE, "FP32", (0, 3, 224, 224), "dynamic dimension must be 1..64"),
        (IMAGE, "FP32", (1, 12_000_000), "the model takes [-1, 3, 224, 224]"),
        (IMAGE, "FP64", (1, 3, 224, 224), "datatype FP64, the model takes FP32"),
        (IMAGE, "FP32", (1, 3, 224, 225), "the model takes [-1, 3, 224, 224]"),
        (VECTOR, "FP32", (2, 16, 1), "the model takes [-1, 16]"),
    ],
)
def test_a_declared_tensor_is_judged_against_the_model_s_input(spec, datatype, shape, problem):
    found = dimension_problem(spec, datatype, shape, dynamic_max=64)
    assert (found is None) if problem is None else (problem in found)


@pytest.mark.parametrize(
    ("specs", "binary", "bound"),
    [
        ((VECTOR,), True, 64 * 16 * 4 + 64 * 1024),
        ((VECTOR,), False, 64 * 16 * 40 + 64 * 1024),
        ((IMAGE,), True, 64 * 3 * 224 * 224 * 4 + 64 * 1024),
        ((TensorSpec("a", "UINT8", (8,)), TensorSpec("b", "INT64", (2, -1))), True, 8 + 2 * 64 * 8 + 64 * 1024),
    ],
)
def test_the_largest_body_a_model_s_inputs_allow(specs, binary, bound):
    assert request_bytes_bound(specs, binary, dynamic_max=64) == bound


def test_a_wrong_shape_is_refused_before_its_data_is_looked_at():
    # 2 million elements of data that is not even numbers: had it been decoded it would have
    # failed on the data; it fails on the declared shape first.
    body = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2_000_000], "data": ["x"] * 10}]})
    with pytest.raises(BadRequest, match=r"shape \[1, 2000000\], the model takes \[-1, 16\]"):
        parse_infer_request(body, None, LIMIT * 64, (VECTOR,), dynamic_max=64)
    with pytest.raises(BadRequest, match="not one of the model's inputs"):
        parse_infer_request(orjson.dumps({"inputs": [{"name": "other", "datatype": "FP32", "shape": [1, 16],
                                                      "data": [0.0] * 16}]}), None, LIMIT, (VECTOR,))
    parsed = parse_infer_request(orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 16],
                                                           "data": [0.5] * 32}]}), None, LIMIT, (VECTOR,), dynamic_max=64)
    assert parsed.inputs["input"].shape == (2, 16)


@given(body=st.binary(max_size=300), header_length=st.one_of(st.none(), st.integers(-5, 400).map(str)))
@settings(max_examples=300, deadline=None)
def test_fuzzed_bytes_with_the_model_s_specs_only_ever_bad_request(body, header_length):
    try:
        parse_infer_request(body, header_length, LIMIT, (VECTOR,), dynamic_max=64)
    except BadRequest:
        pass
