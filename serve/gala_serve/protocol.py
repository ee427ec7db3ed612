"""Open Inference Protocol (KServe v2) tensors: JSON and the binary tensor data extension.

A binary request carries the JSON header first, its length in the ``Inference-Header-Content-
Length`` HTTP header, then the raw little-endian tensor bytes in input order; an input with
``parameters.binary_data_size`` takes its data from there. An output asked for with
``parameters.binary_data: true`` is answered the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from gala_serve.errors import RequestError

DATATYPES = {
    "FP32": np.float32,
    "FP64": np.float64,
    "FP16": np.float16,
    "INT64": np.int64,
    "INT32": np.int32,
    "INT16": np.int16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}
NAMES = {np.dtype(v): k for k, v in DATATYPES.items()}
HEADER = "Inference-Header-Content-Length"


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None  # None: all
    binary: set[str]  # outputs to answer as binary data
    binary_default: bool


def _json(data: bytes, what: str) -> dict:
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RequestError(f"{what} is not valid JSON ({err})") from err
    if not isinstance(doc, dict):
        raise RequestError(f"{what} must be a JSON object")
    return doc


def _tensor(spec: dict, binary: bytes, offset: int) -> tuple[np.ndarray, int]:
    name = spec.get("name", "?")
    for key in ("name", "shape", "datatype"):
        if key not in spec:
            raise RequestError(f"input {name!r}: missing {key!r}")
    shape, datatype = spec["shape"], spec["datatype"]
    if datatype not in DATATYPES:
        raise RequestError(f"input {name!r}: unknown datatype {datatype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise RequestError(f"input {name!r}: shape must be a list of non-negative integers")
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    count = int(np.prod(shape))
    size = (spec.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if size != count * dtype.itemsize or offset + size > len(binary):
            raise RequestError(
                f"input {name!r}: binary_data_size {size} does not fit shape "
                f"{shape} of {datatype} or the bytes sent"
            )
        array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
        return array, offset + size
    if "data" not in spec:
        raise RequestError(f"input {name!r}: no 'data' and no binary_data_size")
    try:
        array = np.asarray(spec["data"], dtype=DATATYPES[datatype])
    except (TypeError, ValueError) as err:
        raise RequestError(f"input {name!r}: data is not {datatype} ({err})") from err
    if array.size != count:
        raise RequestError(f"input {name!r}: {array.size} values for shape {shape}")
    return array.reshape(shape), offset


def parse_request(body: bytes, header_length: int | None) -> InferRequest:
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise RequestError(f"{HEADER} {header_length} does not fit a body of {len(body)} bytes")
        doc, binary = _json(body[:header_length], "request header"), body[header_length:]
    else:
        doc, binary = _json(body, "request body"), b""
    specs = doc.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise RequestError("request has no 'inputs' list")
    inputs, offset = {}, 0
    for spec in specs:
        if not isinstance(spec, dict):
            raise RequestError("each input must be a JSON object")
        array, offset = _tensor(spec, binary, offset)
        inputs[spec["name"]] = array
    binary_default = bool((doc.get("parameters") or {}).get("binary_data_output", False))
    outputs, wanted_binary = None, set()
    if doc.get("outputs"):
        outputs = []
        for out in doc["outputs"]:
            outputs.append(out["name"])
            if (out.get("parameters") or {}).get("binary_data", binary_default):
                wanted_binary.add(out["name"])
    return InferRequest(doc.get("id"), inputs, outputs, wanted_binary, binary_default)


def encode_response(
    model: str, request: InferRequest, tensors: dict[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    names = request.outputs or list(tensors)
    unknown = [n for n in names if n not in tensors]
    if unknown:
        raise RequestError(f"unknown outputs {unknown}; this model has {list(tensors)}")
    outputs, blobs = [], []
    for name in names:
        array = np.ascontiguousarray(tensors[name])
        entry = {"name": name, "datatype": NAMES[array.dtype], "shape": list(array.shape)}
        if name in request.binary or (request.outputs is None and request.binary_default):
            data = array.astype(array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    doc = {"model_name": model, "model_version": "1", "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    header = json.dumps(doc).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
