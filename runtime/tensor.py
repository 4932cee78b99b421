"""Tensor specs in the Open Inference Protocol's words, and input validation against them.

The HTTP layer speaks KServe v2 datatypes (FP32, INT64, ...), the backends speak numpy.
This module is the one place that maps between the two and that decides whether a
caller's tensors fit a model: a bad input must become an `InvalidInput` (a 4xx), never an
exception deep inside torch or a crashed host. Pure: no I/O, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from redge.runtime.errors import InvalidInput, ManifestInvalid

# KServe v2 datatype -> numpy dtype. BYTES is not supported by the tensor backends here.
DATATYPE_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NUMPY_DATATYPE: dict[np.dtype, str] = {dtype: name for name, dtype in DATATYPE_NUMPY.items()}

DIMENSIONS_MAX = 8
# One request's tensors may not exceed this unless the caller says otherwise.
INPUT_BYTES_MAX_DEFAULT = 256 * 1024 * 1024


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: datatype and shape, -1 marking a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 128:
            raise ManifestInvalid("tensor.name", f"must be 1 to 128 characters, got {self.name!r}")
        if self.datatype not in DATATYPE_NUMPY:
            raise ManifestInvalid(
                f"tensor {self.name}.datatype",
                f"{self.datatype!r} is not one of {', '.join(DATATYPE_NUMPY)}",
            )
        if len(self.shape) > DIMENSIONS_MAX:
            raise ManifestInvalid(f"tensor {self.name}.shape", f"more than {DIMENSIONS_MAX} dimensions")
        for dimension in self.shape:
            if not isinstance(dimension, int) or isinstance(dimension, bool) or dimension < -1 or dimension == 0:
                raise ManifestInvalid(
                    f"tensor {self.name}.shape", f"dimensions must be positive or -1, got {self.shape}"
                )

    @property
    def numpy_dtype(self) -> np.dtype:
        return DATATYPE_NUMPY[self.datatype]

    def example(self, batch_size: int = 1) -> np.ndarray:
        """A zero tensor of this spec, dynamic dimensions set to `batch_size`: for warm-up."""
        shape = tuple(batch_size if dimension == -1 else dimension for dimension in self.shape)
        return np.zeros(shape, dtype=self.numpy_dtype)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, value: Any) -> TensorSpec:
        if not isinstance(value, dict):
            raise ManifestInvalid("tensor", f"must be an object, got {type(value).__name__}")
        try:
            return cls(name=value["name"], datatype=value["datatype"], shape=tuple(value["shape"]))
        except KeyError as missing:
            raise ManifestInvalid("tensor", f"missing key {missing}") from None
        except TypeError as error:
            raise ManifestInvalid("tensor", str(error)) from None


def check_inputs(
    specs: tuple[TensorSpec, ...],
    inputs: Mapping[str, Any],
    input_bytes_max: int = INPUT_BYTES_MAX_DEFAULT,
) -> list[np.ndarray]:
    """Return the inputs as contiguous arrays in the specs' order, or raise `InvalidInput`."""
    expected = {spec.name for spec in specs}
    for name in inputs:
        if name not in expected:
            raise InvalidInput(name, f"unexpected; the model takes {sorted(expected)}")
    arrays: list[np.ndarray] = []
    bytes_total = 0
    for spec in specs:
        if spec.name not in inputs:
            raise InvalidInput(spec.name, "missing")
        value = inputs[spec.name]
        if not isinstance(value, np.ndarray):
            raise InvalidInput(spec.name, f"must be a numpy array, got {type(value).__name__}")
        if value.dtype != spec.numpy_dtype:
            datatype = NUMPY_DATATYPE.get(value.dtype, str(value.dtype))
            raise InvalidInput(spec.name, f"datatype {datatype}, expected {spec.datatype}")
        if value.ndim != len(spec.shape):
            raise InvalidInput(spec.name, f"shape {list(value.shape)}, expected {list(spec.shape)}")
        for actual, wanted in zip(value.shape, spec.shape, strict=True):
            if wanted != -1 and actual != wanted:
                raise InvalidInput(spec.name, f"shape {list(value.shape)}, expected {list(spec.shape)}")
            if actual == 0:
                raise InvalidInput(spec.name, f"shape {list(value.shape)} is empty")
        bytes_total += value.nbytes
        if bytes_total > input_bytes_max:
            raise InvalidInput(spec.name, f"inputs exceed {input_bytes_max} bytes")
        arrays.append(np.ascontiguousarray(value))
    return arrays
