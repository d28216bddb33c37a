"""The KServe V2 codec: pure functions, no server."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from service import v2
from service.core.errors import InvalidInput


def _binary_request(header: dict, *chunks: bytes) -> tuple[bytes, int]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), len(head)


def test_json_fp32_round_trip() -> None:
    data = np.arange(6, dtype=np.float32).reshape(1, 3, 1, 2)
    body = json.dumps({"id": "r1", "inputs": [{"name": "input", "shape": [1, 3, 1, 2], "datatype": "FP32",
                                               "data": data.reshape(-1).tolist()}]}).encode()
    req = v2.parse_infer_request(body)
    assert req.id == "r1" and not req.binary_request
    np.testing.assert_array_equal(req.inputs[0].array, data)


def test_json_nested_data_is_flattened_row_major() -> None:
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 1, 1], "datatype": "FP32",
                                   "data": [[[[1.0]], [[2.0]], [[3.0]]]]}]}).encode()
    assert v2.parse_infer_request(body).inputs[0].array.reshape(-1).tolist() == [1.0, 2.0, 3.0]


def test_binary_bytes_and_fp32_inputs() -> None:
    images = [b"\xff\xd8first", b"second-image"]
    raw = v2.encode_bytes_elements(images)
    body, n = _binary_request({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                           "parameters": {"binary_data_size": len(raw)}}],
                               "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}, raw)
    req = v2.parse_infer_request(body, v2.parse_header_length(str(n), len(body)))
    assert req.inputs[0].elements == images
    assert req.outputs[0].binary is True and req.binary_request

    arr = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32)
    body, n = _binary_request({"inputs": [{"name": "input", "shape": [2, 3, 4, 4], "datatype": "FP32",
                                           "parameters": {"binary_data_size": arr.nbytes}}]}, arr.tobytes())
    np.testing.assert_array_equal(v2.parse_infer_request(body, n).inputs[0].array, arr)


@pytest.mark.parametrize(
    "header, chunk, message",
    [
        ({"inputs": [{"name": "input", "shape": [1, 3, 2, 2], "datatype": "FP32",
                      "parameters": {"binary_data_size": 40}}]}, b"\0" * 40, "needs 48 bytes"),
        ({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32",
                      "parameters": {"binary_data_size": 8}}]}, b"\0" * 4, "beyond"),
        ({"inputs": [{"name": "input", "shape": [1], "datatype": "FP32",
                      "parameters": {"binary_data_size": 4}}]}, b"\0" * 8, "add up to"),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                      "parameters": {"binary_data_size": 6}}]}, struct.pack("<I", 99) + b"ab", "runs past"),
        ({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                      "parameters": {"binary_data_size": 6}}]}, struct.pack("<I", 2) + b"ab", "needs 2 BYTES"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP99", "data": [1]}]}, b"", "unknown datatype"),
        ({"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}, b"", ">= 0"),
        ({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]}, b"", "needs 2 elements"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": ["a"]}]}, b"", "must be numbers"),
        ({"inputs": [{"name": "x", "shape": [1 << 20, 1 << 20], "datatype": "FP32", "data": []}]}, b"", "more than"),
        ({"inputs": []}, b"", "non-empty"),
    ],
)
def test_bad_requests_name_the_problem(header: dict, chunk: bytes, message: str) -> None:
    body, n = _binary_request(header, chunk)
    with pytest.raises(InvalidInput, match=message):
        v2.parse_infer_request(body, n if chunk else None)


def test_header_length_validation() -> None:
    assert v2.parse_header_length(None, 10) is None
    assert v2.parse_header_length("10", 10) == 10
    for bad in ("11", "-1", "abc", ""):
        with pytest.raises(InvalidInput):
            v2.parse_header_length(bad, 10)
    with pytest.raises(InvalidInput, match="not valid JSON"):
        v2.parse_infer_request(b"{not json")


def test_json_bytes_base64() -> None:
    import base64

    payload = b"\x89PNG\r\n\x1a\n binary"
    body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"content_type": "base64"},
                                   "data": [base64.b64encode(payload).decode()]}]}).encode()
    assert v2.parse_infer_request(body).inputs[0].elements == [payload]


def test_encode_response_binary_and_json() -> None:
    logits = np.array([[0.5, 2.0, -1.0]], dtype=np.float32)
    out = v2.OutputTensor("logits", "FP32", logits.shape, array=logits)
    body, n = v2.encode_infer_response("m", "3", [out], [True], "id7")
    assert n is not None
    head = json.loads(body[:n])
    assert head["model_version"] == "3" and head["id"] == "id7"
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 12
    np.testing.assert_array_equal(np.frombuffer(body[n:], dtype="<f4"), logits.reshape(-1))

    body, n = v2.encode_infer_response("m", "3", [out], [False])
    assert n is None
    assert json.loads(body)["outputs"][0]["data"] == pytest.approx([0.5, 2.0, -1.0])


def test_classification_strings() -> None:
    logits = np.array([[0.1, 0.7, 0.2], [0.9, 0.05, 0.05]], dtype=np.float32)
    strings = v2.classification_strings(logits, 2, ("a", "b", "c"))
    assert strings == [b"0.700000:1:b", b"0.200000:2:c", b"0.900000:0:a", b"0.050000:1:b"]


def test_metadata_shapes() -> None:
    meta = v2.model_metadata("m", [1, 2], 10)
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "image": ("BYTES", [-1]), "input": ("FP32", [-1, 3, -1, -1])}
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    cfg = v2.model_config("m", 8, 10, 224, "center")
    assert cfg["max_batch_size"] == 8 and cfg["input"][0]["format"] == "FORMAT_NCHW"
