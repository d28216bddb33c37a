"""The hostile-input corpus shared by the unit and end-to-end reliability tests.

Every case is built in memory (no fixtures on disk) and says what Steady must answer:
``accept`` (HTTP 200, a classification) or the exact 4xx status with a JSON error. The
corpus is sized for a server whose ``max_pixels`` is :data:`PIXEL_LIMIT` and whose
``max_body_bytes`` is :data:`BODY_LIMIT` (the session service of ``tests/service``).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["Case", "PIXEL_LIMIT", "BODY_LIMIT", "image_cases", "png_with_header", "gif_with_screen",
           "exif_jpeg", "photo_jpeg", "animated"]

PIXEL_LIMIT = 4_000_000  # the session service's max_pixels
BODY_LIMIT = 2 * 1024 * 1024  # the session service's max_body_bytes


@dataclass(frozen=True)
class Case:
    """One hostile request body: what it is, how it is sent, what must come back."""

    name: str
    body: bytes
    content_type: str | None  # None: no Content-Type header at all
    status: int  # 200: accepted and classified; else the exact 4xx


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def photo_jpeg(width: int = 96, height: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return _encode(Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)), "JPEG", quality=90)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_header(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A valid-looking PNG whose IHDR claims ``width`` x ``height`` but carries almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = idat if idat is not None else zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def png_zlib_bomb(width: int, height: int) -> bytes:
    """A real compression bomb: every row present, all zeros, deflated to a few kB."""
    raw = zlib.compress(b"\x00" * ((width * 3 + 1) * height), 9)
    return png_with_header(width, height, raw)


def gif_with_screen(screen_w: int, screen_h: int) -> bytes:
    """A GIF89a whose logical screen is huge while its one image is 1x1."""
    header = b"GIF89a" + struct.pack("<HHBBB", screen_w, screen_h, 0x80, 0, 0)  # global table of 2 colours
    palette = b"\x00\x00\x00\xff\xff\xff"
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return header + palette + image + b"\x3b"


def bmp_with_header(width: int, height: int) -> bytes:
    """A BMP header claiming ``width`` x ``height`` 24-bit pixels, followed by a few bytes."""
    pixels = b"\x00" * 16
    dib = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    head = b"BM" + struct.pack("<IHHI", 14 + len(dib) + len(pixels), 0, 0, 14 + len(dib))
    return head + dib + pixels


def exif_jpeg(orientation: int, width: int = 48, height: int = 32) -> bytes:
    """A JPEG with an EXIF Orientation tag; the left half is red so the rotation is visible."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, : width // 2] = (255, 0, 0)
    arr[:, width // 2:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(img, "JPEG", quality=95, exif=exif.tobytes())


def animated(fmt: str) -> bytes:
    """Three frames (red, green, blue) as an animated GIF or WebP."""
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    params: dict[str, object] = {"save_all": True, "append_images": frames[1:], "duration": 50, "loop": 0}
    if fmt == "WEBP":
        params["lossless"] = True
    return _encode(frames[0], fmt, **params)


def image_cases() -> list[Case]:
    """The hostile image corpus (each case once; see the module docstring for the limits)."""
    rng = np.random.default_rng(7)
    jpeg = photo_jpeg(160, 120)
    png = _encode(Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)), "PNG")
    J, P, G, W = "image/jpeg", "image/png", "image/gif", "image/webp"
    rgba = Image.fromarray(rng.integers(0, 255, (40, 50, 4), dtype=np.uint8), "RGBA")
    gray16 = Image.fromarray((rng.integers(0, 65535, (30, 40))).astype(np.uint16))
    palette = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 0
    cases = [
        # broken or not images at all
        Case("empty-body", b"", J, 400),
        Case("random-bytes", os.urandom(4096), J, 400),
        Case("random-bytes-octet-stream", os.urandom(512), "application/octet-stream", 400),
        Case("text-as-image", b"hello, this is not a picture\n" * 20, P, 400),
        Case("svg-as-image", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "image/svg+xml", 400),
        Case("truncated-jpeg-third", jpeg[: len(jpeg) // 3], J, 400),
        Case("truncated-jpeg-header-only", jpeg[:200], J, 400),
        Case("truncated-png-half", png[: len(png) // 2], P, 400),
        Case("truncated-png-signature", png[:12], P, 400),
        Case("png-bad-crc", png[:30] + bytes([png[30] ^ 0xFF]) + png[31:], P, 400),
        Case("png-zero-width", png_with_header(0, 10), P, 400),
        Case("tiff-unsupported", _encode(Image.new("RGB", (8, 8)), "TIFF"), "image/tiff", 400),
        Case("ico-unsupported", _encode(Image.new("RGB", (16, 16)), "ICO"), "image/x-icon", 400),
        # decompression bombs: refused from the header, before any pixel is decoded
        Case("png-header-bomb-100k-square", png_with_header(100_000, 100_000), P, 413),
        Case("png-header-bomb-over-limit", png_with_header(2001, 2000), P, 413),
        Case("png-zlib-bomb-6mp", png_zlib_bomb(3000, 2000), P, 413),
        Case("gif-huge-logical-screen", gif_with_screen(65535, 65535), G, 413),
        Case("gif-screen-over-limit", gif_with_screen(3000, 2000), G, 413),
        Case("bmp-header-bomb", bmp_with_header(50_000, 50_000), "image/bmp", 413),
        # odd but valid images: answered
        Case("jpeg-1x1", _encode(Image.new("RGB", (1, 1), (9, 9, 9)), "JPEG"), J, 200),
        Case("png-1x1", _encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), P, 200),
        Case("png-1x5000", _encode(Image.new("RGB", (1, 5000), (20, 40, 60)), "PNG"), P, 200),
        Case("png-5000x1", _encode(Image.new("RGB", (5000, 1), (20, 40, 60)), "PNG"), P, 200),
        Case("jpeg-2x3000", _encode(Image.new("RGB", (2, 3000), (200, 10, 10)), "JPEG"), J, 200),
        Case("gif-animated", animated("GIF"), G, 200),
        Case("webp-animated", animated("WEBP"), W, 200),
        Case("jpeg-cmyk", _encode(Image.new("CMYK", (40, 30), (10, 200, 30, 5)), "JPEG"), J, 200),
        Case("png-16bit-gray", _encode(gray16, "PNG"), P, 200),
        Case("png-rgba", _encode(rgba, "PNG"), P, 200),
        Case("png-LA", _encode(rgba.convert("LA"), "PNG"), P, 200),
        Case("png-palette", _encode(palette, "PNG"), P, 200),
        Case("png-palette-transparency", _encode(palette_t, "PNG", transparency=0), P, 200),
        Case("png-1bit", _encode(Image.new("1", (33, 17), 1), "PNG"), P, 200),
        Case("jpeg-grayscale", _encode(Image.new("L", (40, 30), 77), "JPEG"), J, 200),
        Case("bmp", _encode(Image.new("RGB", (20, 10), (1, 2, 3)), "BMP"), "image/bmp", 200),
        Case("png-sent-as-jpeg", png, J, 200),
        Case("jpeg-octet-stream", jpeg, "application/octet-stream", 200),
        *(Case(f"jpeg-exif-orientation-{o}", exif_jpeg(o), J, 200) for o in range(1, 9)),
        Case("jpeg-exif-orientation-bogus-99", exif_jpeg(99), J, 200),
        # wrong Content-Type
        Case("content-type-text-plain", jpeg, "text/plain", 415),
        Case("content-type-json", jpeg, "application/json", 415),
        Case("content-type-missing", jpeg, None, 415),
        Case("content-type-multipart-mixed", jpeg, "multipart/mixed; boundary=x", 415),
        # oversized body (the limit is configurable: max_body_bytes)
        Case("body-over-limit", b"\xff\xd8" + b"\x00" * (BODY_LIMIT + 10), J, 413),
    ]
    return cases
