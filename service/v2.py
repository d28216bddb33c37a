"""KServe V2 / Open Inference Protocol codec: pure functions, no HTTP, no Ray.

Covers what ``tritonclient[http]`` sends and expects (the Open Inference Protocol plus Triton's binary-data and classification extensions): JSON tensors,
the binary-data extension both ways (``Inference-Header-Content-Length``, per-tensor
``binary_data_size``), BYTES elements as ``<uint32 LE length><bytes>``, and the
classification extension (``"<score>:<index>:<label>"``).

In JSON mode a BYTES element is a string; an image sent that way must be base64
(``"parameters": {"content_type": "base64"}`` on the input, or any string that is
valid base64 of at least 8 bytes is decoded as such).

Example:
    >>> req = parse_infer_request(b'{"inputs":[{"name":"input","shape":[1,3,1,1],"datatype":"FP32","data":[1,2,3]}]}')
    >>> req.inputs[0].array.shape
    (1, 3, 1, 1)
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from service.core.errors import InvalidInput

__all__ = [
    "DATATYPES",
    "HEADER_LENGTH",
    "InputTensor",
    "OutputRequest",
    "InferRequest",
    "OutputTensor",
    "parse_header_length",
    "parse_infer_request",
    "encode_infer_response",
    "encode_bytes_elements",
    "decode_bytes_elements",
    "classification_strings",
    "server_metadata",
    "model_metadata",
    "model_config",
]

HEADER_LENGTH = "inference-header-content-length"
MAX_ELEMENTS = 64 * 1024 * 1024  # refuse absurd shapes before allocating anything

DATATYPES: dict[str, np.dtype[Any] | None] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": None,
}


@dataclass
class InputTensor:
    """One decoded input: a numpy array, or a list of byte strings for BYTES."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray | None = None
    elements: list[bytes] | None = None


@dataclass
class OutputRequest:
    name: str
    binary: bool | None = None
    classification: int = 0


@dataclass
class InferRequest:
    inputs: list[InputTensor]
    outputs: list[OutputRequest] = field(default_factory=list)
    id: str | None = None
    binary_output: bool = False  # request-level default for outputs
    binary_request: bool = False  # the request itself used the binary extension


@dataclass
class OutputTensor:
    """One output to encode: numeric array, or BYTES elements (classification)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray | None = None
    elements: list[bytes] | None = None


# ---------------------------------------------------------------- requests
def parse_header_length(value: str | None, body_length: int) -> int | None:
    """Validate ``Inference-Header-Content-Length`` against the body."""
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 12:  # "²".isdigit() is True
        raise InvalidInput(f"Inference-Header-Content-Length must be a non-negative integer, got {value[:20]!r}")
    length = int(value)
    if length > body_length:
        raise InvalidInput(
            f"Inference-Header-Content-Length {length} is beyond the body of {body_length} bytes"
        )
    return length


def parse_infer_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Decode an infer request body (JSON, or JSON + binary tensors when ``header_length`` is given)."""
    json_part = body if header_length is None else body[:header_length]
    binary = memoryview(body)[header_length:] if header_length is not None else memoryview(b"")
    try:
        doc = json.loads(json_part)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise InvalidInput(f"infer request is not valid JSON: {str(exc)[:120]}") from exc
    if not isinstance(doc, dict):
        raise InvalidInput("infer request must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("infer request needs a non-empty 'inputs' list")
    params = _params(doc)
    offset = 0
    inputs: list[InputTensor] = []
    for raw in raw_inputs:
        tensor, used = _parse_input(raw, binary, offset)
        offset += used
        inputs.append(tensor)
    if offset != len(binary):
        raise InvalidInput(
            f"binary data is {len(binary)} bytes but the inputs' binary_data_size add up to {offset}"
        )
    outputs = [_parse_output(o) for o in _list(doc.get("outputs", []), "outputs")]
    request_id = doc.get("id")
    return InferRequest(
        inputs=inputs,
        outputs=outputs,
        id=str(request_id) if request_id is not None else None,
        binary_output=bool(params.get("binary_data_output", False)),
        binary_request=header_length is not None,
    )


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidInput(f"'{what}' must be a list")
    return value


def _params(obj: dict[str, Any]) -> dict[str, Any]:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    return params


def _shape(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in raw):
        raise InvalidInput(f"input {name!r}: shape must be a list of integers, got {str(raw)[:60]}")
    if any(d < 0 or d > MAX_ELEMENTS for d in raw):  # bounded even next to a 0 dimension
        raise InvalidInput(f"input {name!r}: shape dimensions must be >= 0 and at most {MAX_ELEMENTS}, got {str(raw)[:60]}")
    count = 1
    for d in raw:
        count *= d
        if count > MAX_ELEMENTS:
            raise InvalidInput(f"input {name!r}: shape {raw} has more than {MAX_ELEMENTS} elements")
    return tuple(raw)


def _parse_input(raw: Any, binary: memoryview, offset: int) -> tuple[InputTensor, int]:
    if not isinstance(raw, dict):
        raise InvalidInput("each input must be a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput("each input needs a 'name'")
    datatype = raw.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise InvalidInput(f"input {name[:40]!r}: unknown datatype {str(datatype)[:20]!r}; use one of {sorted(DATATYPES)}")
    shape = _shape(raw.get("shape"), name)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    params = _params(raw)
    size = params.get("binary_data_size")
    tensor = InputTensor(name=name, datatype=datatype, shape=shape)
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}")
        if offset + size > len(binary):
            raise InvalidInput(
                f"input {name!r}: binary_data_size {size} is beyond the {len(binary) - offset} binary bytes left"
            )
        chunk = bytes(binary[offset:offset + size])
        if datatype == "BYTES":
            tensor.elements = decode_bytes_elements(chunk, count, name)
        else:
            dtype = DATATYPES[datatype]
            assert dtype is not None
            if size != count * dtype.itemsize:
                raise InvalidInput(
                    f"input {name!r}: {datatype} shape {list(shape)} needs {count * dtype.itemsize} bytes, "
                    f"binary_data_size is {size}"
                )
            tensor.array = np.frombuffer(chunk, dtype=dtype).reshape(shape)
        return tensor, size
    if "data" not in raw:
        raise InvalidInput(f"input {name!r} has neither 'data' nor parameters.binary_data_size")
    data = raw["data"]
    if datatype == "BYTES":
        flat = _flatten(data)
        if len(flat) != count:
            raise InvalidInput(f"input {name!r}: shape {list(shape)} needs {count} elements, got {len(flat)}")
        b64 = params.get("content_type") == "base64"
        tensor.elements = [_json_bytes(x, name, b64) for x in flat]
        return tensor, 0
    dtype = DATATYPES[datatype]
    assert dtype is not None
    flat = _flatten(data)
    if len(flat) != count:
        raise InvalidInput(f"input {name!r}: shape {list(shape)} needs {count} elements, got {len(flat)}")
    if any(isinstance(x, (str, bytes, dict, list)) or x is None for x in flat):
        raise InvalidInput(f"input {name!r}: {datatype} data must be numbers")
    try:
        with np.errstate(over="raise", invalid="raise"):  # 1e300 as FP16: refused, not a silent inf
            tensor.array = np.asarray(flat, dtype=dtype).reshape(shape)
    except (ValueError, OverflowError, TypeError, FloatingPointError) as exc:
        raise InvalidInput(f"input {name!r}: data does not fit {datatype}: {str(exc)[:80]}") from exc
    return tensor, 0


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _json_bytes(value: Any, name: str, b64: bool) -> bytes:
    if not isinstance(value, str):
        raise InvalidInput(f"input {name!r}: BYTES elements in JSON must be strings")
    if b64 or len(value) >= 12:
        try:
            decoded = base64.b64decode(value, validate=True)
            if b64 or len(decoded) >= 8:
                return decoded
        except (binascii.Error, ValueError) as exc:
            if b64:
                raise InvalidInput(f"input {name!r}: element is not valid base64") from exc
    return value.encode("utf-8")


def decode_bytes_elements(chunk: bytes, count: int, name: str = "input") -> list[bytes]:
    """Split ``<uint32 LE length><bytes>``... into exactly ``count`` elements."""
    out: list[bytes] = []
    pos = 0
    n = len(chunk)
    while pos < n:
        if pos + 4 > n:
            raise InvalidInput(f"input {name!r}: BYTES element length prefix is truncated at byte {pos}")
        (length,) = struct.unpack_from("<I", chunk, pos)
        pos += 4
        if pos + length > n:
            raise InvalidInput(f"input {name!r}: BYTES element of {length} bytes runs past the data at byte {pos}")
        out.append(chunk[pos:pos + length])
        pos += length
    if len(out) != count:
        raise InvalidInput(f"input {name!r}: shape needs {count} BYTES elements, got {len(out)}")
    return out


def encode_bytes_elements(elements: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _parse_output(raw: Any) -> OutputRequest:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise InvalidInput("each requested output must be an object with a 'name'")
    params = _params(raw)
    k = params.get("classification", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise InvalidInput(f"output {raw['name'][:40]!r}: classification must be a non-negative integer, got {k!r}")
    binary = params.get("binary_data")
    return OutputRequest(name=raw["name"], binary=None if binary is None else bool(binary), classification=k)


# --------------------------------------------------------------- responses
def classification_strings(logits: np.ndarray, k: int, labels: Sequence[str], scores: np.ndarray | None = None) -> list[bytes]:
    """Rows of ``logits`` -> ``N * k`` strings ``"<score>:<index>:<label>"`` (best first, row-major).

    Like Triton, the score is the output value (here: the softmax probability when
    ``scores`` is given, else the raw logit).
    """
    values = scores if scores is not None else logits
    k = min(k, logits.shape[-1])
    order = np.argsort(-values, axis=-1, kind="stable")[:, :k]
    out: list[bytes] = []
    for row, idx in zip(values, order):
        for i in idx:
            label = labels[int(i)] if int(i) < len(labels) else str(int(i))
            out.append(f"{float(row[int(i)]):f}:{int(i)}:{label}".encode())
    return out


def encode_infer_response(
    model_name: str,
    model_version: str,
    outputs: Sequence[OutputTensor],
    binary: Sequence[bool],
    request_id: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Encode a response; returns (body, header length or None when no output is binary)."""
    json_outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out, as_binary in zip(outputs, binary):
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        if out.datatype == "BYTES":
            elements = out.elements or []
            if as_binary:
                raw = encode_bytes_elements(elements)
                entry["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                entry["data"] = [e.decode("utf-8", "replace") for e in elements]
        else:
            assert out.array is not None
            arr = out.array
            if as_binary:
                dtype = DATATYPES[out.datatype]
                assert dtype is not None
                raw = np.ascontiguousarray(arr, dtype=dtype).tobytes()
                entry["parameters"] = {"binary_data_size": len(raw)}
                chunks.append(raw)
            else:
                entry["data"] = [_json_number(x) for x in arr.reshape(-1).tolist()]
        json_outputs.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": json_outputs}
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = parameters
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def _json_number(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ---------------------------------------------------------------- metadata
def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "steady", "version": version, "extensions": ["binary_tensor_data", "classification", "model_configuration"]}


def model_metadata(name: str, versions: Sequence[int], num_classes: int) -> dict[str, Any]:
    return {
        "name": name,
        "versions": [str(v) for v in versions],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "input", "datatype": "FP32", "shape": [-1, 3, -1, -1]},
        ],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, num_classes]}],
    }


def model_config(name: str, max_batch_size: int, num_classes: int, resolution: int, policy: str) -> dict[str, Any]:
    """Triton-style config (what Triton's image_client reads)."""
    return {
        "name": name,
        "platform": "onnxruntime_onnx",
        "max_batch_size": max_batch_size,
        "input": [
            {"name": "input", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": [3, resolution, resolution]},
            {"name": "image", "data_type": "TYPE_STRING", "format": "FORMAT_NONE", "dims": [1]},
        ],
        "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [num_classes]}],
        "parameters": {"policy": {"string_value": policy}, "resolution": {"string_value": str(resolution)}},
        "dynamic_batching": {},
    }
