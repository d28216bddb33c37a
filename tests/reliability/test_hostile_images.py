"""Hostile images: every case of the corpus gets its exact answer, fast, and the next request succeeds.

Unit tier: the decoder itself (first frame of animations, EXIF rotations, modes, pixel limit
before decoding). e2e tier: the whole corpus through the real service (Ray Serve, HAProxy,
two replicas), each followed by a good image.
"""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from service.core.errors import ImageTooLarge, SteadyError, UnsupportedImage
from service.core.preprocess import Preprocessor, decode
from tests.conftest import BACKGROUND, tiny_card
from tests.reliability.conftest import Tally
from tests.reliability.hostile import (
    BODY_LIMIT,
    PIXEL_LIMIT,
    animated,
    exif_jpeg,
    gif_with_screen,
    image_cases,
    photo_jpeg,
    png_with_header,
)

CASES = image_cases()


# ------------------------------------------------------------------ unit: the decoder
@pytest.mark.parametrize("case", [c for c in CASES if c.status in (200, 400, 413) and len(c.body) < BODY_LIMIT],
                         ids=lambda c: c.name)
def test_decoder_answers_each_case(case, tally: Tally, monkeypatch: pytest.MonkeyPatch) -> None:
    pre = Preprocessor(tiny_card(), max_pixels=PIXEL_LIMIT)
    if case.status == 413:  # over the pixel limit: refused from the header, before any pixel is decoded
        _forbid_pixel_decoding(monkeypatch)
    try:
        tensor = pre(case.body)
        status = 200
    except SteadyError as exc:
        status = exc.status
        assert isinstance(exc, (UnsupportedImage, ImageTooLarge)), type(exc)
    tally.record("images-decoder", expected=status == case.status, status=status)
    assert status == case.status
    if status == 200:
        assert tensor.shape == (1, 3, 32, 32) and np.all(np.isfinite(tensor))


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_uses_the_first_frame(fmt: str) -> None:
    img = decode(animated(fmt), background=BACKGROUND)
    assert img.size == (40, 30) and img.mode == "RGB"
    r, g, b = np.asarray(img).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 30 and b < 30, (r, g, b)  # red: frame 0 of red, green, blue


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int) -> None:
    img = decode(exif_jpeg(orientation, 48, 32), background=BACKGROUND)
    arr = np.asarray(img).astype(int)
    assert img.size == ((48, 32) if orientation <= 4 else (32, 48))
    # where the red half (left of the stored image) ends up after the EXIF transform
    red_side = {1: "left", 2: "right", 3: "right", 4: "left", 5: "top", 6: "top", 7: "bottom", 8: "bottom"}[orientation]
    h, w = arr.shape[:2]
    halves = {"left": arr[:, : w // 2], "right": arr[:, w // 2:], "top": arr[: h // 2], "bottom": arr[h // 2:]}
    assert halves[red_side][..., 0].mean() > 200 and halves[red_side][..., 2].mean() < 60


def test_modes_become_8bit_rgb() -> None:
    rng = np.random.default_rng(0)
    gray16 = Image.fromarray(np.full((6, 8), 65535, dtype=np.uint16))
    cmyk = Image.new("CMYK", (8, 6), (0, 255, 255, 0))  # pure red in CMYK
    la = Image.fromarray(rng.integers(0, 255, (6, 8, 2), dtype=np.uint8), "LA")
    for img, fmt in ((gray16, "PNG"), (cmyk, "JPEG"), (la, "PNG"), (la.convert("P"), "PNG")):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out = decode(buf.getvalue(), background=BACKGROUND)
        assert out.mode == "RGB" and out.size == (8, 6)
    assert np.asarray(decode(_png(gray16), background=BACKGROUND)).min() == 255  # 16-bit white stays white, not clipped to 255/65535
    red = np.asarray(decode(_jpeg(cmyk), background=BACKGROUND)).reshape(-1, 3).mean(axis=0)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60, red


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _forbid_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import ImageFile

    def load(self: Any) -> None:
        raise AssertionError("pixels were decoded for an image over the pixel limit")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_pixel_limit_is_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    # a 100k x 100k PNG header over 64 bytes of data: refused from the header, without decoding a pixel
    # (so without allocating 30 GB); the limit is configurable
    with monkeypatch.context() as m:
        _forbid_pixel_decoding(m)
        _refused_from_the_header()
    assert decode(photo_jpeg(10, 10), max_pixels=100, background=BACKGROUND).size == (10, 10)


def _refused_from_the_header() -> None:
    with pytest.raises(ImageTooLarge):
        decode(png_with_header(100_000, 100_000), max_pixels=PIXEL_LIMIT, background=BACKGROUND)
    with pytest.raises(ImageTooLarge, match="over the limit of 100"):
        decode(png_with_header(11, 10), max_pixels=100, background=BACKGROUND)
    with pytest.raises(ImageTooLarge):
        decode(gif_with_screen(65535, 65535), background=BACKGROUND)


# ------------------------------------------------------------------ e2e: the real service
@pytest.mark.e2e
def test_service_answers_every_hostile_image(service, tally: Tally) -> None:
    url = f"{service.base}/v1/models/tiny:classify"
    good = photo_jpeg(64, 48, seed=1)
    failures: list[str] = []
    with httpx.Client(timeout=10) as client:
        for case in CASES:
            headers = {} if case.content_type is None else {"Content-Type": case.content_type}
            start = time.perf_counter()
            try:
                r = client.post(url, content=case.body, headers=headers)
            except httpx.HTTPError as exc:
                tally.record("images-http", expected=False, crash=True, lost=isinstance(exc, httpx.TimeoutException))
                failures.append(f"{case.name}: {type(exc).__name__}")
                continue
            elapsed = time.perf_counter() - start
            body = _json(r)
            ok = r.status_code == case.status and elapsed < 2.0
            if r.status_code >= 400:
                ok = ok and isinstance(body, dict) and set(body) == {"error"} and bool(body["error"])
            else:
                ok = ok and isinstance(body, dict) and len(body.get("predictions", [])) == 5
            tally.record("images-http", expected=ok, status=r.status_code)
            if not ok:
                failures.append(f"{case.name}: want {case.status}, got {r.status_code} in {elapsed:.2f} s: {r.text[:120]}")
            after = client.post(url, content=good, headers={"Content-Type": "image/jpeg"})
            tally.record("images-http-next-good", expected=after.status_code == 200, status=after.status_code)
            if after.status_code != 200:
                failures.append(f"after {case.name}: the next good image got {after.status_code}")
    assert not failures, "\n".join(failures)


@pytest.mark.e2e
def test_chunked_oversized_body_is_refused(service, tally: Tally) -> None:
    """No Content-Length (chunked upload): the limit is enforced while streaming."""

    def chunks():
        piece = b"\x00" * 65536
        for _ in range(BODY_LIMIT // len(piece) + 4):
            yield piece

    r = httpx.post(f"{service.base}/v1/models/tiny:classify", content=chunks(),
                   headers={"Content-Type": "image/jpeg"}, timeout=10)
    tally.record("images-http", expected=r.status_code == 413, status=r.status_code)
    assert r.status_code == 413 and set(r.json()) == {"error"}


def _json(r: httpx.Response) -> object:
    try:
        return r.json()
    except ValueError:
        return None


@pytest.mark.e2e
@pytest.mark.parametrize("top_k", ["0", "-1", "x", "\u00b2", "1001", "99999", "", "1e3", " 5"])
def test_hostile_query_parameters(service, tally: Tally, top_k: str) -> None:
    r = httpx.post(f"{service.base}/v1/models/tiny:classify", params={"top_k": top_k}, content=photo_jpeg(),
                   headers={"Content-Type": "image/jpeg"}, timeout=10)
    tally.record("images-http", expected=r.status_code == 400, status=r.status_code)
    assert r.status_code == 400 and set(r.json()) == {"error"}, (top_k, r.status_code, r.text)
