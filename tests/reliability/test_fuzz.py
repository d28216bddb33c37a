"""Property-based fuzzing (hypothesis) of the image decoder and the KServe V2 decoder.

The property: whatever the bytes, only Steady's domain errors come out (``UnsupportedImage``,
``ImageTooLarge``, ``InvalidInput``... each with a 4xx status), never an unexpected exception,
and a decoded image is always 8-bit RGB with at most ``max_pixels`` pixels. Examples are
bounded (``max_examples``) so the module runs in seconds; the seed is derandomised so a CI
failure reproduces. The V2 fuzz goes on through the real data plane (tiny ONNX model, no Ray).
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service import v2
from service.core.errors import SteadyError
from service.core.preprocess import decode
from tests.conftest import BACKGROUND, make_tiny_onnx, tiny_card
from tests.reliability.conftest import TALLY
from tests.reliability.hostile import animated, exif_jpeg, gif_with_screen, png_with_header

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
LIMIT = 1_000_000


def _encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def _seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8))
    return [
        _encode(rgb, "JPEG", quality=80), _encode(rgb, "JPEG", progressive=True), _encode(rgb, "PNG"),
        _encode(rgb.convert("P"), "PNG"), _encode(rgb.convert("RGBA"), "PNG"), _encode(rgb, "GIF"),
        _encode(rgb, "WEBP"), _encode(rgb, "BMP"), animated("GIF"), animated("WEBP"), exif_jpeg(6),
        png_with_header(5000, 5000), gif_with_screen(4000, 4000),
    ]


SEEDS = _seeds()


def _decode_property(data: bytes, area: str) -> None:
    try:
        img = decode(data, max_pixels=LIMIT, background=BACKGROUND)
    except SteadyError as exc:
        assert 400 <= exc.status < 500, (type(exc), exc)
        TALLY.record(area, expected=True, status=exc.status)
        return
    except Exception as exc:  # pragma: no cover - the property failing
        TALLY.record(area, expected=False, crash=True)
        raise AssertionError(f"decode raised {type(exc).__name__}: {exc}") from exc
    assert img.mode == "RGB" and img.size[0] * img.size[1] <= LIMIT
    TALLY.record(area, expected=True, status=200)


@FUZZ
@given(st.binary(max_size=4096))
def test_decoder_random_bytes(data: bytes) -> None:
    _decode_property(data, "fuzz-decoder")


@FUZZ
@given(seed=st.sampled_from(SEEDS), edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255),
                                                                st.sampled_from(["flip", "cut", "insert", "zero"])),
                                                      min_size=1, max_size=6))
def test_decoder_mutated_real_images(seed: bytes, edits: list[tuple[float, int, str]]) -> None:
    data = bytearray(seed)
    for where, value, op in edits:
        i = min(int(where * len(data)), max(len(data) - 1, 0))
        if op == "flip" and data:
            data[i] ^= value or 1
        elif op == "cut":
            del data[i:]
        elif op == "insert":
            data[i:i] = bytes([value]) * (value % 17 + 1)
        elif op == "zero" and data:
            data[i:i + value] = b"\x00" * len(data[i:i + value])
    _decode_property(bytes(data), "fuzz-decoder")


@FUZZ
@given(w=st.integers(0, 2**31), h=st.integers(0, 2**31), kind=st.sampled_from(["png", "gif", "bmp"]))
def test_decoder_lying_headers(w: int, h: int, kind: str) -> None:
    if kind == "png":
        data = png_with_header(w, h)
    elif kind == "gif":
        data = gif_with_screen(w % 65536, h % 65536)
    else:
        from tests.reliability.hostile import bmp_with_header

        data = bmp_with_header(w % 2**31 - 2**30, h % 2**31 - 2**30)
    _decode_property(data, "fuzz-decoder")


@FUZZ
@given(w=st.integers(1, 300), h=st.integers(1, 300),
       mode=st.sampled_from(["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I;16", "I", "F", "PA"]),
       fmt=st.sampled_from(["PNG", "JPEG", "GIF", "WEBP", "BMP"]))
def test_decoder_valid_images_of_any_mode(w: int, h: int, mode: str, fmt: str) -> None:
    img = Image.new(mode if mode not in ("PA",) else "P", (w, h))
    try:
        data = _encode(img, fmt)
    except (OSError, ValueError, KeyError):
        return  # Pillow cannot write this mode in this format: nothing to decode
    img_out = decode(data, max_pixels=LIMIT, background=BACKGROUND)
    assert img_out.mode == "RGB" and img_out.size in ((w, h), (h, w))
    TALLY.record("fuzz-decoder", expected=True, status=200)


# ------------------------------------------------------------------ V2
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
names = st.sampled_from(["image", "input", "logits", "", "x", "input "]) | st.text(max_size=6)
datatypes = st.sampled_from(list(v2.DATATYPES) + ["BF16", "fp32", ""]) | json_values
shapes = st.lists(st.integers(-2, 70) | st.sampled_from([0, 1, 3, 8, 32, 2**31, 10**20]), max_size=5) | json_values


@st.composite
def v2_requests(draw: Any) -> tuple[bytes, int | None]:
    """An infer request that is close to valid: real keys, hostile values, a binary tail maybe."""
    inputs = []
    tail = b""
    for _ in range(draw(st.integers(0, 3))):
        entry: dict[str, Any] = {"name": draw(names), "datatype": draw(datatypes), "shape": draw(shapes)}
        if draw(st.booleans()):
            chunk = draw(st.binary(max_size=64)) if draw(st.booleans()) else \
                np.zeros(draw(st.integers(0, 3 * 8 * 8 * 2)), dtype="<f4").tobytes()
            if draw(st.booleans()):  # a BYTES-shaped chunk with a (maybe lying) length prefix
                chunk = struct.pack("<I", draw(st.integers(0, 2**32 - 1) | st.just(len(chunk)))) + chunk
            size = draw(st.just(len(chunk)) | st.integers(-5, 300) | json_values)
            entry["parameters"] = {"binary_data_size": size}
            tail += chunk
        else:
            entry["data"] = draw(st.lists(st.floats(allow_nan=True) | st.integers(-300, 300), max_size=200)
                                 | json_values)
        if draw(st.booleans()):
            entry.setdefault("parameters", {})["content_type"] = draw(st.sampled_from(["base64", "x"]))
        inputs.append(entry)
    doc: dict[str, Any] = {"inputs": inputs}
    if draw(st.booleans()):
        doc["outputs"] = draw(st.lists(st.fixed_dictionaries(
            {"name": names, "parameters": st.fixed_dictionaries({}, optional={
                "classification": st.integers(-2, 2000) | json_values, "binary_data": json_values})}), max_size=2)
            | json_values)
    if draw(st.booleans()):
        doc["parameters"] = {"binary_data_output": draw(json_values)}
    head = json.dumps(doc).encode()
    if not tail and draw(st.booleans()):
        return head, None
    length = draw(st.just(len(head)) | st.integers(0, len(head) + len(tail) + 5))
    return head + tail, length


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from service.dataplane import DataPlane
    from service.metrics import Metrics
    from service.core.repository import ModelRepository
    from service.settings import ServeSettings

    repo = ModelRepository(tmp_path_factory.mktemp("fuzz-repo"))
    repo.add("tiny", make_tiny_onnx(), tiny_card())
    settings = ServeSettings.build(repo.root, environ={}, overrides={"live_fraction": 0.0, "max_pixels": LIMIT})
    p = DataPlane(settings, repo, Metrics("memory"), rng=random.Random(0))
    p.load_all()
    return p


def _v2_property(plane: Any, body: bytes, length: int | None, area: str) -> None:
    try:
        if length is not None:
            length = v2.parse_header_length(str(length), len(body))
        request = v2.parse_infer_request(body, length)
        served, outputs, binary = asyncio.run(plane.infer_v2("tiny", None, request))
        payload, _ = v2.encode_infer_response(served.model, str(served.version), outputs, binary, request.id)
        assert payload
        TALLY.record(area, expected=True, status=200)
    except SteadyError as exc:
        assert 400 <= exc.status < 500, (type(exc), exc)
        TALLY.record(area, expected=True, status=exc.status)
    except Exception as exc:
        TALLY.record(area, expected=False, crash=True)
        raise AssertionError(f"V2 decode raised {type(exc).__name__}: {exc}") from exc


@settings(FUZZ, max_examples=400)
@given(v2_requests())
def test_v2_structured_requests(plane: Any, req: tuple[bytes, int | None]) -> None:
    _v2_property(plane, req[0], req[1], "fuzz-v2")


@FUZZ
@given(st.binary(max_size=2048), st.none() | st.integers(0, 2100))
def test_v2_random_bytes(plane: Any, body: bytes, length: int | None) -> None:
    _v2_property(plane, body, length, "fuzz-v2")


@FUZZ
@given(json_values)
def test_v2_any_json(plane: Any, doc: Any) -> None:
    _v2_property(plane, json.dumps(doc).encode(), None, "fuzz-v2")


@FUZZ
@given(st.integers(0, 10_000), st.integers(0, 255), st.integers(0, 5))
def test_v2_mutated_valid_binary_request(plane: Any, where: int, value: int, extra: int) -> None:
    img = _encode(Image.new("RGB", (20, 20), (1, 2, 3)), "PNG")
    elements = struct.pack("<I", len(img)) + img
    head = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": len(elements)}}]}).encode()
    body = bytearray(head + elements)
    body[where % len(body)] ^= value or 1
    body += bytes(extra)
    _v2_property(plane, bytes(body), len(head), "fuzz-v2")


def test_fuzz_property_holds_for_known_good_requests(plane: Any) -> None:
    """The property is not vacuous: valid requests really are answered."""
    good = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.1] * 192}]})
    request = v2.parse_infer_request(good.encode())
    served, outputs, _ = asyncio.run(plane.infer_v2("tiny", None, request))
    assert outputs[0].array is not None and outputs[0].array.shape == (1, 10)
    assert decode(SEEDS[0], background=BACKGROUND).size == (32, 24)
    assert Path(plane.repo.root).is_dir()
