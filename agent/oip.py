"""The Open Inference Protocol (KServe v2) wire format, as NVIDIA Triton speaks it over HTTP.

Pure codec: bytes in, numpy arrays out, and back. No aiohttp here, so the parser can be
fuzzed directly. Requests carry tensors as JSON (`data`, row-major, nested or flat) or with
the binary tensor extension: the `Inference-Header-Content-Length` header says how many
leading bytes are the JSON header, and each binary input's `binary_data_size` says how
many of the following bytes are its raw little-endian elements, in input order. Every way a
request can be wrong becomes a `BadRequest` with a message a client can act on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from redge.runtime.tensor import DATATYPE_NUMPY, NUMPY_DATATYPE, TensorSpec

HEADER_LENGTH = "Inference-Header-Content-Length"
INPUTS_MAX = 64
DIMENSIONS_MAX = 8
NAME_LENGTH_MAX = 128
# What a request may hold beyond its tensors' data: the JSON header of a binary request, or
# the names, shapes and parameters around the data of a JSON one.
HEADER_BYTES_MAX = 64 * 1024
# The longest a number can be written in JSON, with its separator ("-1.2345678901234567e-308,"
# and a little room for whitespace and brackets).
JSON_BYTES_PER_ELEMENT_MAX = 40


class BadRequest(ValueError):
    """The request does not follow the protocol; the message says where."""


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    request_id: str | None = None
    outputs: list[RequestedOutput] = field(default_factory=list)
    binary_output_default: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


def server_metadata() -> dict[str, Any]:
    """`GET /v2`: the protocol's server metadata, plus the newest cluster command format
    this build reads (`command_format`, which the leader asks before raising the cluster's)."""
    from redge import __version__
    from redge.consensus.commands import FORMAT_VERSION

    return {"name": "redge", "version": __version__, "extensions": ["binary_tensor_data"],
            "command_format": FORMAT_VERSION}


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > DIMENSIONS_MAX:
        raise BadRequest(f"{where}.shape must be a list of at most {DIMENSIONS_MAX} integers")
    for dimension in value:
        if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension < 0:
            raise BadRequest(f"{where}.shape must hold non-negative integers, got {value}")
    return tuple(value)


def _element_count(shape: tuple[int, ...], where: str, elements_max: int) -> int:
    count = 1
    for dimension in shape:
        count *= dimension
        if count > elements_max:
            raise BadRequest(f"{where} has more elements than the request size limit allows")
    return count


def _flatten(data: Any, where: str, elements_max: int) -> list[Any]:
    flat: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
            if len(flat) > elements_max:
                raise BadRequest(f"{where}.data has more elements than the request size limit allows")
    return flat


def dimension_problem(spec: TensorSpec, datatype: str, shape: tuple[int, ...], dynamic_max: int) -> str | None:
    """Why a tensor declared as `datatype` and `shape` cannot be `spec`'s input, or None.
    Judged from the declaration alone, before any of the tensor's data is decoded."""
    if datatype != spec.datatype:
        return f"datatype {datatype}, the model takes {spec.datatype}"
    if len(shape) != len(spec.shape):
        return f"shape {list(shape)}, the model takes {list(spec.shape)}"
    for given, wanted in zip(shape, spec.shape, strict=True):
        if wanted == -1:
            if not 1 <= given <= dynamic_max:
                return f"shape {list(shape)}: a dynamic dimension must be 1..{dynamic_max}"
        elif given != wanted:
            return f"shape {list(shape)}, the model takes {list(spec.shape)}"
    return None


def request_bytes_bound(specs: tuple[TensorSpec, ...], binary: bool, dynamic_max: int) -> int:
    """The largest body a well-formed request for a model with these inputs can have: its
    tensors' bytes (binary) or their longest JSON text, plus the header. A larger body is
    refused on its Content-Length, before it is read."""
    total = HEADER_BYTES_MAX
    for spec in specs:
        elements = 1
        for dimension in spec.shape:
            elements *= dynamic_max if dimension == -1 else dimension
        total += elements * (spec.numpy_dtype.itemsize if binary else JSON_BYTES_PER_ELEMENT_MAX)
    return total


def parse_infer_request(
    body: bytes | bytearray,
    header_length: str | None,
    body_bytes_max: int,
    specs: tuple[TensorSpec, ...] | None = None,
    dynamic_max: int = 1 << 20,
) -> InferRequest:
    """Parse one request. With the model's input `specs`, an input whose name, datatype or
    shape cannot fit is refused from its declaration, before its data is decoded."""
    if len(body) > body_bytes_max:
        raise BadRequest(f"body of {len(body)} bytes exceeds the limit of {body_bytes_max}")
    if header_length is not None:
        try:
            json_length = int(header_length)
        except ValueError:
            raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < json_length <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} {json_length} is outside the body of {len(body)} bytes")
        header_bytes, binary = body[:json_length], memoryview(body)[json_length:]
    else:
        header_bytes, binary = body, memoryview(b"")
    try:
        header = orjson.loads(header_bytes)
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"request header is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise BadRequest("request must be a JSON object")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("request needs a non-empty 'inputs' list")
    if len(raw_inputs) > INPUTS_MAX:
        raise BadRequest(f"at most {INPUTS_MAX} inputs")
    elements_max = max(body_bytes_max, 1)
    by_name = {spec.name: spec for spec in specs} if specs is not None else {}
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for index, raw in enumerate(raw_inputs):
        where = f"inputs[{index}]"
        if not isinstance(raw, dict):
            raise BadRequest(f"{where} must be an object")
        name = raw.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= NAME_LENGTH_MAX:
            raise BadRequest(f"{where}.name must be a string of 1 to {NAME_LENGTH_MAX} characters")
        where = f"input {name!r}"
        if name in inputs:
            raise BadRequest(f"{where} given twice")
        datatype = raw.get("datatype")
        if not isinstance(datatype, str):
            raise BadRequest(f"{where}: datatype must be a string such as FP32")
        if datatype == "BYTES":
            raise BadRequest(f"{where}: datatype BYTES is not supported by redge's tensor backends")
        if datatype not in DATATYPE_NUMPY:
            raise BadRequest(f"{where}: unknown datatype {datatype!r}; use one of {', '.join(DATATYPE_NUMPY)}")
        dtype = DATATYPE_NUMPY[datatype].newbyteorder("<")
        shape = _shape(raw.get("shape"), where)
        if specs is not None:
            spec = by_name.get(name)
            if spec is None:
                raise BadRequest(f"{where} is not one of the model's inputs {sorted(by_name)}")
            problem = dimension_problem(spec, datatype, shape, dynamic_max)
            if problem is not None:
                raise BadRequest(f"{where}: {problem}")
        count = _element_count(shape, where, elements_max)
        parameters = raw.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise BadRequest(f"{where}.parameters must be an object")
        binary_size = parameters.get("binary_data_size")
        if binary_size is not None:
            if isinstance(binary_size, bool) or not isinstance(binary_size, int) or binary_size < 0:
                raise BadRequest(f"{where}.binary_data_size must be a non-negative integer")
            if "data" in raw:
                raise BadRequest(f"{where} has both binary_data_size and data")
            if binary_size != count * dtype.itemsize:
                raise BadRequest(
                    f"{where}: binary_data_size {binary_size} does not match shape {list(shape)} of {datatype} "
                    f"({count * dtype.itemsize} bytes)"
                )
            if offset + binary_size > len(binary):
                raise BadRequest(f"{where}: binary data ends after the body ({len(binary)} binary bytes sent)")
            array = np.frombuffer(binary[offset : offset + binary_size], dtype=dtype).reshape(shape)
            offset += binary_size
        else:
            if "data" not in raw:
                raise BadRequest(f"{where} needs 'data' or parameters.binary_data_size")
            flat = _flatten(raw["data"], where, elements_max)
            if len(flat) != count:
                raise BadRequest(f"{where}: {len(flat)} elements in data for shape {list(shape)} ({count} expected)")
            try:
                array = np.array(flat, dtype=dtype).reshape(shape)
            except (TypeError, ValueError, OverflowError) as error:
                raise BadRequest(f"{where}: data does not fit {datatype}: {error}") from None
            if datatype == "BOOL" and not all(isinstance(v, bool) for v in flat):
                raise BadRequest(f"{where}: BOOL data must be true or false")
            if datatype.startswith(("INT", "UINT")) and not all(
                isinstance(v, int) and not isinstance(v, bool) for v in flat
            ):
                raise BadRequest(f"{where}: {datatype} data must be integers")
            if datatype.startswith("FP") and not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat
            ):
                raise BadRequest(f"{where}: {datatype} data must be numbers")
        inputs[name] = array.astype(DATATYPE_NUMPY[datatype], copy=False)
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} binary bytes after the last binary input")

    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest("parameters must be an object")
    binary_default = bool(parameters.get("binary_data_output", False))
    outputs: list[RequestedOutput] = []
    raw_outputs = header.get("outputs") or []
    if not isinstance(raw_outputs, list) or len(raw_outputs) > INPUTS_MAX:
        raise BadRequest(f"outputs must be a list of at most {INPUTS_MAX}")
    for index, raw in enumerate(raw_outputs):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise BadRequest(f"outputs[{index}] must be an object with a name")
        output_parameters = raw.get("parameters") or {}
        if not isinstance(output_parameters, dict):
            raise BadRequest(f"outputs[{index}].parameters must be an object")
        outputs.append(RequestedOutput(raw["name"], bool(output_parameters.get("binary_data", binary_default))))
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("id must be a string")
    return InferRequest(inputs, request_id, outputs, binary_default, parameters)


def encode_infer_request(
    inputs: dict[str, np.ndarray], binary: bool = True, outputs: list[RequestedOutput] | None = None,
    request_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Encode a request the way a client does (the redge client and the router use it)."""
    header: dict[str, Any] = {"inputs": []}
    if request_id is not None:
        header["id"] = request_id
    chunks: list[bytes] = []
    for name, array in inputs.items():
        array = np.ascontiguousarray(array)
        entry: dict[str, Any] = {"name": name, "datatype": NUMPY_DATATYPE[array.dtype], "shape": list(array.shape)}
        if binary:
            raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        header["inputs"].append(entry)
    if outputs:
        header["outputs"] = [{"name": o.name, "parameters": {"binary_data": o.binary}} for o in outputs]
    elif binary:
        header["parameters"] = {"binary_data_output": True}
    header_bytes = orjson.dumps(header)
    if not binary:
        return header_bytes, {"Content-Type": "application/json"}
    return header_bytes + b"".join(chunks), {
        HEADER_LENGTH: str(len(header_bytes)),
        "Content-Type": "application/octet-stream",
    }


def encode_infer_response(
    model_name: str,
    model_version: str,
    outputs: dict[str, np.ndarray],
    request: InferRequest,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Encode outputs; binary where the request asked for it. Returns (body, headers)."""
    wanted = request.outputs or [RequestedOutput(name, request.binary_output_default) for name in outputs]
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": []}
    if request.request_id is not None:
        header["id"] = request.request_id
    if parameters:
        header["parameters"] = parameters
    chunks: list[bytes] = []
    for requested in wanted:
        if requested.name not in outputs:
            raise BadRequest(f"unknown output {requested.name!r}; the model gives {sorted(outputs)}")
        array = np.ascontiguousarray(outputs[requested.name])
        entry: dict[str, Any] = {
            "name": requested.name,
            "datatype": NUMPY_DATATYPE.get(array.dtype, "FP32"),
            "shape": list(array.shape),
        }
        if requested.binary:
            raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        header["outputs"].append(entry)
    header_bytes = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header_bytes, {"Content-Type": "application/json"}
    return header_bytes + b"".join(chunks), {
        HEADER_LENGTH: str(len(header_bytes)),
        "Content-Type": "application/octet-stream",
    }


def decode_infer_response(body: bytes, header_length: str | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Decode a response into its JSON header and output arrays (clients and the router use it)."""
    if header_length is not None:
        json_length = int(header_length)
        header, binary = orjson.loads(body[:json_length]), memoryview(body)[json_length:]
    else:
        header, binary = orjson.loads(body), memoryview(b"")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for output in header.get("outputs", []):
        dtype = DATATYPE_NUMPY[output["datatype"]]
        shape = tuple(output["shape"])
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arrays[output["name"]] = np.frombuffer(binary[offset : offset + size], dtype=dtype.newbyteorder("<")).reshape(shape)
            offset += size
        else:
            arrays[output["name"]] = np.array(output["data"], dtype=dtype).reshape(shape)
    return header, arrays
