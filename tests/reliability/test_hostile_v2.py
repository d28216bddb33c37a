"""Hostile KServe V2 requests: lying sizes and headers, bad shapes and datatypes, NaN, bad BYTES.

The same table runs twice: through Starlette's TestClient over a real data plane (no Ray),
and against the real service (e2e). Each case must get its exact status with a
``{"error": ...}`` body within two seconds, and a good request must succeed after it.
"""

from __future__ import annotations

import json
import random
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

import httpx
import numpy as np
import pytest

from tests.reliability.conftest import Tally
from tests.reliability.hostile import BODY_LIMIT, photo_jpeg, png_with_header

PATH = "/v2/models/tiny/infer"


@dataclass(frozen=True)
class V2Case:
    name: str
    body: bytes
    headers: dict[str, str]
    status: int
    path: str = PATH


def _fp32(shape: list[int], fill: float = 0.0) -> bytes:
    return np.full(shape, fill, dtype="<f4").tobytes()


def _binary(doc: dict[str, Any], *chunks: bytes, header: str | None = None) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(doc).encode()
    return head + b"".join(chunks), {"Inference-Header-Content-Length": header if header is not None else str(len(head))}


def _inp(name: str, datatype: str, shape: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, **extra}


def _bin(size: Any) -> dict[str, Any]:
    return {"parameters": {"binary_data_size": size}}


def _bytes_elements(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def v2_cases() -> list[V2Case]:
    x = _fp32([1, 3, 32, 32])
    n = len(x)
    photo = photo_jpeg(40, 30)
    img = _bytes_elements(photo)
    cases: list[V2Case] = []

    def add(name: str, body_headers: tuple[bytes, dict[str, str]] | bytes, status: int, path: str = PATH) -> None:
        body, headers = body_headers if isinstance(body_headers, tuple) else (body_headers, {})
        cases.append(V2Case(name, body, headers, status, path))

    def js(doc: Any) -> bytes:
        return json.dumps(doc).encode()

    # controls: these must work
    add("ok-json-fp32", js({"inputs": [_inp("input", "FP32", [1, 3, 8, 8], data=[0.5] * 192)]}), 200)
    add("ok-binary-image", _binary({"inputs": [_inp("image", "BYTES", [1], **_bin(len(img)))]}, img), 200)
    # binary_data_size lies
    add("binary-size-larger-than-data", _binary({"inputs": [_inp("input", "FP32", [1, 3, 32, 32], **_bin(n + 4))]}, x), 400)
    add("binary-size-smaller-than-data", _binary({"inputs": [_inp("input", "FP32", [1, 3, 32, 32], **_bin(n - 4))]}, x), 400)
    add("binary-size-leaves-trailing-bytes", _binary({"inputs": [_inp("input", "FP32", [1, 3, 32, 32], **_bin(n))]}, x, b"junk"), 400)
    add("binary-size-negative", _binary({"inputs": [_inp("input", "FP32", [1, 3, 32, 32], **_bin(-1))]}, x), 400)
    add("binary-size-string", _binary({"inputs": [_inp("input", "FP32", [1, 3, 32, 32], **_bin(str(n)))]}, x), 400)
    add("binary-size-float", _binary({"inputs": [_inp("input", "FP32", [1, 3, 32, 32], **_bin(float(n)))]}, x), 400)
    add("binary-size-bool", _binary({"inputs": [_inp("input", "FP32", [1, 3, 32, 32], **_bin(True))]}, x), 400)
    add("binary-size-huge", _binary({"inputs": [_inp("input", "FP32", [1, 3, 32, 32], **_bin(10**18))]}, x), 400)
    add("binary-size-wrong-for-shape", _binary({"inputs": [_inp("input", "FP32", [1, 3, 16, 16], **_bin(n))]}, x), 400)
    # Inference-Header-Content-Length lies
    doc = {"inputs": [_inp("input", "FP32", [1, 3, 32, 32], **_bin(n))]}
    for label, value in (("beyond-body", "99999999"), ("negative", "-5"), ("not-a-number", "abc"),
                         ("superscript-digit", b"\xb2"), ("zero", "0"), ("float", "12.5"), ("hex", "0x10"),
                         ("too-many-digits", "1" * 40), ("cuts-json", "10"), ("empty", "")):
        add(f"header-length-{label}", _binary(doc, x, header=value), 400)
    add("header-length-on-json-request", (js({"inputs": []}), {"Inference-Header-Content-Length": "999"}), 400)
    # shapes, datatypes, element counts
    add("shape-rank-3", _binary({"inputs": [_inp("input", "FP32", [3, 32, 32], **_bin(n))]}, x), 400)
    add("shape-one-channel", _binary({"inputs": [_inp("input", "FP32", [3, 1, 32, 32], **_bin(n))]}, x), 400)
    add("shape-not-a-list", js({"inputs": [_inp("input", "FP32", "1,3,8,8", data=[0.0])]}), 400)
    add("shape-negative-dim", js({"inputs": [_inp("input", "FP32", [1, 3, -8, 8], data=[0.0])]}), 400)
    add("shape-float-dim", js({"inputs": [_inp("input", "FP32", [1, 3, 8.0, 8], data=[0.0])]}), 400)
    add("shape-zero-and-huge-dims", js({"inputs": [_inp("input", "FP32", [0, 10**30], data=[])]}), 400)
    add("shape-tiny-image", js({"inputs": [_inp("input", "FP32", [1, 3, 2, 2], data=[0.0] * 12)]}), 400)
    add("shape-huge-image", _binary({"inputs": [_inp("input", "FP32", [1, 3, 200, 200], **_bin(480000))]},
                                    _fp32([1, 3, 200, 200])), 413)
    add("datatype-int32", js({"inputs": [_inp("input", "INT32", [1, 3, 8, 8], data=[0] * 192)]}), 400)
    add("datatype-fp64", js({"inputs": [_inp("input", "FP64", [1, 3, 8, 8], data=[0.0] * 192)]}), 400)
    add("datatype-unknown", js({"inputs": [_inp("input", "FP33", [1, 3, 8, 8], data=[0.0] * 192)]}), 400)
    add("datatype-not-a-string", js({"inputs": [_inp("input", ["FP32"], [1, 3, 8, 8], data=[0.0] * 192)]}), 400)
    add("image-as-fp32", js({"inputs": [_inp("image", "FP32", [1], data=[1.0])]}), 400)
    add("element-count-short", js({"inputs": [_inp("input", "FP32", [1, 3, 8, 8], data=[0.0] * 191)]}), 400)
    add("element-count-long", js({"inputs": [_inp("input", "FP32", [1, 3, 8, 8], data=[0.0] * 193)]}), 400)
    add("data-strings", js({"inputs": [_inp("input", "FP32", [1, 3, 8, 8], data=["0"] * 192)]}), 400)
    add("data-null", js({"inputs": [_inp("input", "FP32", [1, 3, 8, 8], data=[None] * 192)]}), 400)
    add("data-missing", js({"inputs": [_inp("input", "FP32", [1, 3, 8, 8])]}), 400)
    add("data-overflows-fp32", js({"inputs": [_inp("input", "FP32", [1, 3, 8, 8], data=[1e300] * 192)]}), 400)
    # NaN / Inf
    add("nan-binary", _binary({"inputs": [_inp("input", "FP32", [1, 3, 32, 32], **_bin(n))]}, _fp32([1, 3, 32, 32], np.nan)), 400)
    add("inf-binary", _binary({"inputs": [_inp("input", "FP32", [1, 3, 32, 32], **_bin(n))]}, _fp32([1, 3, 32, 32], np.inf)), 400)
    add("nan-json", b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,3,8,8],"data":[' + b",".join([b"NaN"] * 192) + b"]}]}", 400)
    add("inf-json", b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,3,8,8],"data":[' + b",".join([b"-Infinity"] * 192) + b"]}]}", 400)
    # BYTES length prefixes
    add("bytes-prefix-beyond-data", _binary({"inputs": [_inp("image", "BYTES", [1], **_bin(14))]}, struct.pack("<I", 1000) + b"x" * 10), 400)
    add("bytes-prefix-truncated", _binary({"inputs": [_inp("image", "BYTES", [1], **_bin(2))]}, b"\x05\x00"), 400)
    add("bytes-prefix-max-uint32", _binary({"inputs": [_inp("image", "BYTES", [1], **_bin(8))]}, b"\xff\xff\xff\xff" + b"abcd"), 400)
    add("bytes-fewer-elements-than-shape", _binary({"inputs": [_inp("image", "BYTES", [2], **_bin(len(img)))]}, img), 400)
    add("bytes-more-elements-than-shape", _binary({"inputs": [_inp("image", "BYTES", [1], **_bin(2 * len(img)))]}, img + img), 400)
    add("bytes-empty-element", _binary({"inputs": [_inp("image", "BYTES", [1], **_bin(4))]}, b"\x00\x00\x00\x00"), 400)
    add("bytes-random-element", _binary({"inputs": [_inp("image", "BYTES", [1], **_bin(104))]}, _bytes_elements(random.Random(1).randbytes(100))), 400)
    bomb = png_with_header(100_000, 100_000)
    add("bytes-decompression-bomb", _binary({"inputs": [_inp("image", "BYTES", [1], **_bin(len(bomb) + 4))]}, _bytes_elements(bomb)), 413)
    add("bytes-json-not-base64", js({"inputs": [_inp("image", "BYTES", [1], data=["not an image"])]}), 400)
    add("bytes-json-bad-base64", js({"inputs": [_inp("image", "BYTES", [1], data=["!!!"], parameters={"content_type": "base64"})]}), 400)
    # names of inputs and outputs
    add("unknown-input", js({"inputs": [_inp("pixels", "FP32", [1, 3, 8, 8], data=[0.0] * 192)]}), 400)
    add("unknown-output", js({"inputs": [_inp("input", "FP32", [1, 3, 8, 8], data=[0.0] * 192)], "outputs": [{"name": "probs"}]}), 400)
    add("output-without-name", js({"inputs": [_inp("input", "FP32", [1, 3, 8, 8], data=[0.0] * 192)], "outputs": [{}]}), 400)
    add("classification-negative", js({"inputs": [_inp("input", "FP32", [1, 3, 8, 8], data=[0.0] * 192)],
                                       "outputs": [{"name": "logits", "parameters": {"classification": -1}}]}), 400)
    add("both-image-and-input", _binary({"inputs": [_inp("image", "BYTES", [1], **_bin(len(img))),
                                                    _inp("input", "FP32", [1, 3, 32, 32], **_bin(n))]}, img, x), 400)
    add("neither-image-nor-input", js({"inputs": []}), 400)
    add("inputs-missing", js({"id": "x"}), 400)
    add("input-twice", js({"inputs": [_inp("input", "FP32", [1, 3, 8, 8], data=[0.0] * 192)] * 2}), 400)
    # batch dimension
    add("batch-huge-shape", _binary({"inputs": [_inp("input", "FP32", [100_000, 3, 32, 32], **_bin(n))]}, x), 400)
    add("batch-2-pow-40", js({"inputs": [_inp("input", "FP32", [2**40], data=[0.0])]}), 400)
    add("batch-65-fp32", _binary({"inputs": [_inp("input", "FP32", [65, 3, 8, 8], **_bin(65 * 768))]}, _fp32([65, 3, 8, 8])), 400)
    add("batch-65-images", _binary({"inputs": [_inp("image", "BYTES", [65], **_bin(65 * len(img)))]}, img * 65), 400)
    add("batch-zero", _binary({"inputs": [_inp("input", "FP32", [0, 3, 32, 32], **_bin(0))]}), 400)
    # not JSON at all
    add("empty-body", b"", 400)
    add("json-array", b"[1, 2]", 400)
    add("json-garbage", b"{inputs: nope", 400)
    add("json-deeply-nested", b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400)
    add("json-utf16", '{"inputs": []}'.encode("utf-16"), 400)
    add("json-invalid-utf8", b'{"inputs": "\xff\xfe"}', 400)
    add("body-over-limit", b"{" + b" " * (BODY_LIMIT + 10) + b"}", 413)
    # versions in the path
    ok_doc = js({"inputs": [_inp("input", "FP32", [1, 3, 8, 8], data=[0.5] * 192)]})
    add("version-not-a-number", ok_doc, 400, "/v2/models/tiny/versions/abc/infer")
    add("version-zero", ok_doc, 400, "/v2/models/tiny/versions/0/infer")
    add("version-not-served", ok_doc, 404, "/v2/models/tiny/versions/99/infer")
    add("version-ok", ok_doc, 200, "/v2/models/tiny/versions/1/infer")
    return cases


CASES = v2_cases()
GOOD = json.dumps({"inputs": [_inp("input", "FP32", [1, 3, 8, 8], data=[0.25] * 192)]}).encode()


def _check_all(post: Callable[[str, bytes, dict[str, str]], httpx.Response], tally: Tally, area: str) -> list[str]:
    failures: list[str] = []
    for case in CASES:
        start = time.perf_counter()
        try:
            r = post(case.path, case.body, case.headers)
        except httpx.HTTPError as exc:
            tally.record(area, expected=False, crash=True, lost=isinstance(exc, httpx.TimeoutException))
            failures.append(f"{case.name}: {type(exc).__name__}: {exc}")
            continue
        elapsed = time.perf_counter() - start
        ok = r.status_code == case.status and elapsed < 2.0
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = None
            ok = ok and isinstance(body, dict) and set(body) == {"error"} and bool(body["error"])
        tally.record(area, expected=ok, status=r.status_code)
        if not ok:
            failures.append(f"{case.name}: want {case.status}, got {r.status_code} in {elapsed:.2f} s: {r.text[:150]}")
        after = post(PATH, GOOD, {})
        if after.status_code != 200:
            failures.append(f"after {case.name}: a good request got {after.status_code}")
    return failures


def test_v2_table_without_ray(tiny_repo, tally: Tally) -> None:
    from starlette.testclient import TestClient

    from service.dataplane import DataPlane
    from service.metrics import Metrics
    from service.routes import build_routes
    from service.settings import ServeSettings

    settings = ServeSettings.build(tiny_repo.root, environ={}, overrides={
        "live_fraction": 0.0, "max_body_bytes": BODY_LIMIT, "max_pixels": 4_000_000})
    metrics = Metrics("memory")
    plane = DataPlane(settings, tiny_repo, metrics, rng=random.Random(0))
    plane.load_all()
    client = TestClient(build_routes(plane, settings, metrics), raise_server_exceptions=True)
    failures = _check_all(lambda path, body, headers: client.post(path, content=body, headers=headers), tally, "v2-unit")
    assert not failures, "\n".join(failures)


@pytest.mark.e2e
def test_v2_table_against_the_service(service, tally: Tally) -> None:
    with httpx.Client(base_url=service.base, timeout=10) as client:
        failures = _check_all(lambda path, body, headers: client.post(path, content=body, headers=headers), tally, "v2-http")
    assert not failures, "\n".join(failures)
