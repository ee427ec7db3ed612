"""Open Inference Protocol (KServe v2) tensors, shared by HTTP and gRPC.

Over HTTP a request is JSON, or the binary tensor data extension: the JSON header first (its
length in the ``Inference-Header-Content-Length`` HTTP header), then the raw little-endian
tensor bytes in input order; an input with ``parameters.binary_data_size`` takes its data from
there, and an output asked for with ``parameters.binary_data: true`` is answered the same way.
``BYTES`` tensors travel as Triton lays them out: each element a 4-byte little-endian length and
its bytes (binary data, gRPC ``raw_input_contents``), ``bytes_contents`` over gRPC, or base64
strings in JSON (JSON strings cannot carry arbitrary bytes).

The classification extension (Triton's): an output asked for with ``parameters.classification:
k`` (gRPC: an ``int64_param``) is answered as BYTES ``[N, k]``, each element
``"<value>:<index>:<class name>"`` for the row's k highest values, best first; as JSON its
elements are plain strings, as Triton sends them.

Every field is type-checked; a wrong one raises :class:`RequestError` naming it, never anything
else, so the servers answer 400 (gRPC ``INVALID_ARGUMENT``) and not 500.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from dataclasses import dataclass, field

import numpy as np
import orjson

from gala_serve.errors import RequestError, TooLarge

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
    "BYTES": np.object_,
}
NAMES = {np.dtype(v): k for k, v in DATATYPES.items()}
HEADER = "Inference-Header-Content-Length"
MAX_ELEMENTS = 1 << 31  # no tensor this server takes comes near it; a bigger shape is refused
MAX_DIMS = 8
# Answers with more values than this are encoded (or classified) in the pool, off the event loop.
OFFLOAD_VALUES = 1 << 16
_LENGTH = struct.Struct("<I")


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]  # BYTES: an object array of bytes
    outputs: list[str] | None  # None: all
    binary: set[str]  # outputs to answer as binary data
    binary_default: bool
    classify: dict[str, int] = field(default_factory=dict)  # output -> top k, as class labels


def loads(data: bytes, what: str) -> dict:
    """A JSON object; 400 for anything else (orjson refuses NaN and numbers out of range)."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as err:
        raise RequestError(f"{what} is not valid JSON ({err})") from err
    if not isinstance(doc, dict):
        raise RequestError(f"{what} must be a JSON object, got {type(doc).__name__}")
    return doc


def _field(doc: dict, key: str, kinds: type | tuple, where: str, required: bool = False):
    value = doc.get(key)
    if value is None:
        if required:
            raise RequestError(f"{where}: missing {key!r}")
        return None
    # bool is an int in Python; a JSON true is never a count or a dimension.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _tuple(kinds)):
        names = " or ".join(k.__name__ for k in _tuple(kinds))
        raise RequestError(f"{where}: {key!r} must be {names}, got {type(value).__name__}")
    return value


def _tuple(kinds: type | tuple) -> tuple:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def check_shape(name: str, shape) -> tuple[list[int], int]:
    """The shape as ints and its element count; 400 unless a list of at most :data:`MAX_DIMS`
    non-negative ints whose product, zeros left out, stays under :data:`MAX_ELEMENTS` (Python
    ints: no int64 overflow; numpy refuses [0, 2**62, 2**62] too)."""
    where = f"input {name!r}"
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise RequestError(f"{where}: 'shape' must be a list of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise RequestError(f"{where}: {len(shape)} dimensions; at most {MAX_DIMS}")
    count = math.prod(shape)
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise TooLarge(f"{where}: shape {list(shape)[:8]} has more than {MAX_ELEMENTS} elements")
    return list(shape), count


def check_datatype(name: str, datatype) -> str:
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise RequestError(
            f"input {name!r}: unknown datatype {str(datatype)[:40]!r}; one of {sorted(DATATYPES)}"
        )
    return datatype


def split_bytes(name: str, raw: bytes | memoryview, count: int) -> np.ndarray:
    """``count`` length-prefixed elements (Triton's BYTES layout) filling ``raw`` exactly."""
    items, offset, raw = [], 0, memoryview(raw)
    for _ in range(count):
        if offset + 4 > len(raw):
            raise RequestError(f"input {name!r}: BYTES data ends inside element {len(items)}")
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise RequestError(
                f"input {name!r}: BYTES element {len(items)} claims {size} bytes, "
                f"{len(raw) - offset} are left"
            )
        items.append(bytes(raw[offset : offset + size]))
        offset += size
    if offset != len(raw):
        raise RequestError(f"input {name!r}: {len(raw) - offset} bytes after {count} elements")
    return _objects(items)


def to_raw(array: np.ndarray) -> bytes:
    """A tensor's raw bytes as the binary extension and gRPC carry them (BYTES length-prefixed)."""
    if array.dtype == object:
        return join_bytes(array.ravel())
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def join_bytes(items) -> bytes:
    return b"".join(_LENGTH.pack(len(x)) + x for x in items)


def _objects(items: list) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def from_raw(name: str, datatype: str, shape: list[int], count: int, raw) -> np.ndarray:
    """A tensor from its raw little-endian bytes (binary extension, gRPC raw contents)."""
    if datatype == "BYTES":
        return split_bytes(name, raw, count).reshape(shape)
    dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise RequestError(
            f"input {name!r}: {len(raw)} bytes of data for shape {shape} of {datatype} "
            f"({count * dtype.itemsize} expected)"
        )
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


def from_values(name: str, datatype: str, shape: list[int], count: int, values) -> np.ndarray:
    """A tensor from a list of values (JSON ``data``, gRPC typed contents)."""
    if datatype == "BYTES":
        items = list(values)
        if len(items) != count:
            raise RequestError(f"input {name!r}: {len(items)} values for shape {shape}")
        return _objects([_as_bytes(name, i, x) for i, x in enumerate(items)]).reshape(shape)
    try:
        array = np.asarray(values, dtype=DATATYPES[datatype])
    except (TypeError, ValueError, OverflowError) as err:
        raise RequestError(f"input {name!r}: 'data' is not {datatype} ({err})") from err
    if array.size != count:
        raise RequestError(f"input {name!r}: {array.size} values for shape {shape}")
    return array.reshape(shape)


def _as_bytes(name: str, index: int, value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):  # JSON: base64
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as err:
            raise RequestError(
                f"input {name!r}: element {index} is not base64 ({err}); BYTES in JSON are "
                "base64 strings"
            ) from err
    raise RequestError(f"input {name!r}: element {index} must be a string, not {type(value)}")


def parse_request(body: bytes, header_length: int | None) -> InferRequest:
    """An infer request from an HTTP body (JSON, or JSON header + binary tensors)."""
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise RequestError(f"{HEADER} {header_length} does not fit a body of {len(body)} bytes")
        doc = loads(body[:header_length], "request header")
        binary = memoryview(body)[header_length:]
    else:
        doc, binary = loads(body, "request body"), memoryview(b"")
    specs = _field(doc, "inputs", list, "request", required=True)
    if not specs:
        raise RequestError("request: 'inputs' is empty")
    inputs, offset = {}, 0
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise RequestError(f"request: inputs[{i}] must be a JSON object")
        name = _field(spec, "name", str, f"inputs[{i}]", required=True)
        if name in inputs:
            raise RequestError(f"input {name!r} appears twice")
        datatype = check_datatype(name, _field(spec, "datatype", str, f"input {name!r}", True))
        shape, count = check_shape(name, _field(spec, "shape", list, f"input {name!r}", True))
        params = _field(spec, "parameters", dict, f"input {name!r}") or {}
        size = _field(params, "binary_data_size", int, f"input {name!r} parameters")
        if size is not None:
            if size < 0 or offset + size > len(binary):
                raise RequestError(
                    f"input {name!r}: binary_data_size {size} at offset {offset} does not fit "
                    f"the {len(binary)} binary bytes sent"
                )
            inputs[name] = from_raw(name, datatype, shape, count, binary[offset : offset + size])
            offset += size
        else:
            data = _field(spec, "data", list, f"input {name!r}")
            if data is None:
                raise RequestError(f"input {name!r}: no 'data' and no binary_data_size")
            inputs[name] = from_values(name, datatype, shape, count, data)
    if offset != len(binary):
        raise RequestError(f"{len(binary) - offset} binary bytes after the last input")
    params = _field(doc, "parameters", dict, "request") or {}
    binary_default = bool(_field(params, "binary_data_output", bool, "request parameters"))
    outputs, wanted_binary, classify = None, set(), {}
    specs = _field(doc, "outputs", list, "request")
    if specs:
        outputs = []
        for i, out in enumerate(specs):
            if not isinstance(out, dict):
                raise RequestError(f"request: outputs[{i}] must be a JSON object")
            name = _field(out, "name", str, f"outputs[{i}]", required=True)
            out_params = _field(out, "parameters", dict, f"output {name!r}") or {}
            where = f"output {name!r} parameters"
            wanted = _field(out_params, "binary_data", bool, where)
            outputs.append(name)
            if binary_default if wanted is None else wanted:
                wanted_binary.add(name)
            count = _field(out_params, "classification", int, where)
            if count is not None:
                classify[name] = class_count(name, count)
    request_id = _field(doc, "id", str, "request")
    return InferRequest(request_id, inputs, outputs, wanted_binary, binary_default, classify)


def class_count(name: str, count: int) -> int:
    """The ``classification`` parameter of output ``name``: a count of at least 1."""
    if count < 1:
        raise RequestError(
            f"output {name!r} parameters: 'classification' must be >= 1, got {count}"
        )
    return count


def classified(
    request: InferRequest, tensors: dict[str, np.ndarray], names: list[str]
) -> dict[str, np.ndarray]:
    """``tensors`` with each output the request asks to classify as BYTES ``[N, k]`` labels."""
    if not request.classify:
        return tensors
    out = dict(tensors)
    for name, count in request.classify.items():
        if name not in tensors:
            continue  # select_outputs names it
        values = tensors[name]
        top = np.argsort(-values, axis=1, kind="stable")[:, :count]
        labels = np.empty(top.shape, dtype=object)
        for r, (row, order) in enumerate(zip(values, top, strict=True)):
            labels[r] = [f"{row[i]:f}:{i}:{names[i]}".encode() for i in order]
        out[name] = labels
    return out


def top_classes(adjusted: np.ndarray, raw: np.ndarray, names: list[str], k: int) -> list[dict]:
    """The ``k`` most likely classes of one row (by the re-balanced probability), with name,
    re-balanced and raw probability: the answer of ``/v1/classify`` and of gala-batch."""
    order = np.argsort(-adjusted, kind="stable")[:k]
    return [
        {
            "index": int(i),
            "class": names[i],
            "probability": float(adjusted[i]),
            "raw_probability": float(raw[i]),
        }
        for i in order
    ]


def select_outputs(request: InferRequest, tensors: dict[str, np.ndarray]) -> list[str]:
    names = request.outputs or list(tensors)
    unknown = [n for n in names if n not in tensors]
    if unknown:
        raise RequestError(f"unknown outputs {unknown[:8]}; this model has {list(tensors)}")
    return names


def encode_response(
    model: str, request: InferRequest, tensors: dict[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """The HTTP response body and, when any output is binary, the JSON header's length."""
    outputs, blobs = [], []
    for name in select_outputs(request, tensors):
        array = np.ascontiguousarray(tensors[name])
        entry = {"name": name, "datatype": NAMES[array.dtype], "shape": list(array.shape)}
        text = array.dtype == object  # BYTES: class labels
        if name in request.binary or (request.outputs is None and request.binary_default):
            data = to_raw(array)
            entry["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            entry["data"] = [x.decode() for x in array.ravel()] if text else array.ravel()
        outputs.append(entry)
    doc = {"model_name": model, "model_version": "1", "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
