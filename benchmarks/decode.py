"""Slow-to-decode inputs: the worst image of each kind at the pixel limit, and the CPU each one costs.

Kinds (each built in memory, within ``max_body_bytes`` and ``max_pixels``):

- ``progressive-jpeg``: a photo-like progressive JPEG filling the pixel limit (libjpeg's 10 scans; every
  coefficient of every scan is decoded even at a reduced DCT scale);
- ``jpeg-many-scans``: a flat progressive JPEG whose cheapest scan is repeated (a few bytes each, a full pass
  over the image each);
- ``png-zlib``: 16-bit RGBA, Paeth-filtered, every row present: the most inflate, unfilter and conversion work
  per pixel PNG allows, in a few hundred kB;
- ``gif-many-frames``: a full-canvas first frame followed by thousands of frames (only the first is decoded);
- ``exif-png``: a small PNG with an eXIf block of 65,000 tags (orientation 6, so the whole block is parsed and
  rewritten);
- ``webp``: a lossy WebP filling the pixel limit (libwebp decodes it in one call, holding Python's GIL),
  and ``webp-at-cap``: the largest WebP accepted (``MAX_WEBP_PIXELS``).

``python -m benchmarks.decode [--max-pixels 50000000] [--budget 2.0] [--json]`` decodes each through the one
preprocessing function twice: *unbounded* (the decode as it was before the limits: open, reduced-scale
draft, load, EXIF transpose, RGB) and *bounded* (``decode_budget_s``, the JPEG scan cap and the EXIF size
cap), and prints the CPU seconds of the decoding thread and the outcome of each.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import time
import warnings
import zlib
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps

from service.core.errors import SteadyError
from service.core.preprocess import DEFAULT_MAX_PIXELS, MAX_WEBP_PIXELS, Preprocessor, jpeg_scans, to_rgb

__all__ = ["KINDS", "progressive_jpeg", "jpeg_many_scans", "png_zlib", "gif_many_frames", "exif_png", "webp",
           "photo_like", "measure", "main"]

BODY_LIMIT = 20 * 1024 * 1024


def _size(max_pixels: int, aspect: float = 1.5) -> tuple[int, int]:
    height = int((max_pixels / aspect) ** 0.5)
    return int(height * aspect), height


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth colour fields plus sensor-like noise: compresses like a photo, not like noise or a flat field."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.int16)
    arr += rng.integers(-12, 12, arr.shape, dtype=np.int16)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def progressive_jpeg(max_pixels: int, body_limit: int = BODY_LIMIT) -> bytes:
    """The highest-quality progressive photo at the pixel limit that fits the body limit."""
    img = Image.fromarray(photo_like(*_size(max_pixels)))
    for quality in (95, 90, 85, 75, 60):
        data = _encode(img, "JPEG", quality=quality, progressive=True)
        if len(data) <= body_limit:
            return data
    return data


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def jpeg_many_scans(max_pixels: int, extra_scans: int = 1000) -> bytes:
    """A flat progressive JPEG at the pixel limit with its smallest AC scan repeated ``extra_scans`` times."""
    data = _encode(Image.new("RGB", _size(max_pixels), (128, 128, 128)), "JPEG", quality=90, progressive=True)
    scans: list[tuple[int, int]] = []
    pos = data.find(b"\xff\xda")
    while pos != -1:
        header = 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        end = pos + header
        while True:  # the entropy-coded data ends at the next marker that is not a stuffed byte or RST
            end = data.find(b"\xff", end)
            if data[end + 1] not in (0x00, *range(0xD0, 0xD8)):
                break
            end += 2
        components = data[pos + 4]
        if data[pos + 5 + 2 * components] > 0:  # Ss > 0: an AC scan
            scans.append((pos, end))
        pos = data.find(b"\xff\xda", end)
    start, end = min(scans, key=lambda s: s[1] - s[0])
    eoi = data.rfind(b"\xff\xd9")
    return data[:eoi] + data[start:end] * extra_scans + data[eoi:]


def png_zlib(max_pixels: int) -> bytes:
    """16-bit RGBA at the pixel limit, every row Paeth-filtered zeros: ~400 kB for 400 MB of raw samples."""
    width, height = _size(max_pixels)
    row = b"\x04" + b"\x00" * (width * 8)
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def gif_many_frames(max_pixels: int, frames: int = 10_000) -> bytes:
    """A full-canvas first frame at the pixel limit, then ``frames`` 100x100 frames."""
    side = int(max_pixels ** 0.5)
    first = _encode(Image.new("P", (side, side), 0), "GIF")
    small = _encode(Image.new("P", (100, 100), 1), "GIF")
    body = small[small.index(b"\x2c"):-1]
    control = b"\x21\xf9\x04\x00\x00\x00\x00\x00"
    return first[:-1] + (control + body) * frames + b"\x3b"


def exif_png(tags: int = 65_000) -> bytes:
    """A 400x300 photo-like PNG with an eXIf block of ``tags`` tags, orientation 6."""
    entries = [(0x0112, 3, 1, 6)] + [(0xC000 + i % 16000, 7, 4, 0) for i in range(tags - 1)]
    entries.sort()
    blob = bytearray(b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)))
    for tag, kind, count, value in entries:
        blob += struct.pack("<HHIHH", tag, kind, count, value, 0) if kind == 3 else struct.pack("<HHII", tag, kind, count, 0)
    blob += struct.pack("<I", 0)
    png = _encode(Image.fromarray(photo_like(400, 300)), "PNG")
    return png[:33] + _chunk(b"eXIf", bytes(blob)) + png[33:]


def webp(max_pixels: int) -> bytes:
    return _encode(Image.fromarray(photo_like(*_size(min(max_pixels, 16383 * 16383)))), "WEBP", quality=50)


KINDS: dict[str, Callable[[int], bytes]] = {
    "progressive-jpeg": progressive_jpeg,
    "jpeg-many-scans": jpeg_many_scans,
    "png-zlib": png_zlib,
    "gif-many-frames": gif_many_frames,
    "exif-png": lambda max_pixels: exif_png(),
    "webp": webp,
    "webp-at-cap": lambda max_pixels: webp(min(max_pixels, MAX_WEBP_PIXELS)),
}


def _unbounded(pre: Preprocessor, data: bytes) -> Any:
    """The decode as it was before the limits: open, reduced-scale draft, load, EXIF transpose, RGB, tensor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        if img.format == "JPEG":  # the decode as it was: is_animated + seek(0), one alpha_composite
            scale = min(width, height) / float(pre.decode_short_side)
            if scale >= 2:
                img.draft("RGB", (int(width / scale) + 1, int(height / scale) + 1))
        if getattr(img, "is_animated", False):
            img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img) or img
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            bg = Image.new("RGBA", img.size, tuple(int(round(c)) for c in pre.background) + (255,))
            rgb = Image.alpha_composite(bg, img.convert("RGBA")).convert("RGB")
        else:
            rgb = to_rgb(img, pre.background)
        view = pre.view(rgb)
    return pre.to_tensor(view.pixels[None])


def measure(pre: Preprocessor, data: bytes, bounded: bool) -> dict[str, Any]:
    """CPU seconds of this thread to decode and preprocess ``data``, and the outcome (``ok`` or the error)."""
    start = time.thread_time()
    try:
        pre.process(data) if bounded else _unbounded(pre, data)
        outcome = "ok"
    except SteadyError as exc:
        outcome = f"{exc.status} {type(exc).__name__}"
    except Exception as exc:  # noqa: BLE001 - unhandled by the decode path: the service answered 500
        outcome = f"500 {type(exc).__module__}.{type(exc).__name__}"
    return {"cpu_s": round(time.thread_time() - start, 3), "outcome": outcome}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    parser.add_argument("--budget", type=float, default=2.0, help="decode_budget_s of the bounded run")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    from service.core.card import ModelCard

    card = ModelCard(name="bench", labels=("a", "b"), train_resolution=args.resolution, mean=(124.0, 116.0, 104.0),
                     std=(58.0, 57.0, 57.0))
    unbounded = Preprocessor(card, max_pixels=args.max_pixels)
    bounded = Preprocessor(card, max_pixels=args.max_pixels, budget_s=args.budget)
    rows = []
    for name, build in KINDS.items():
        data = build(args.max_pixels)
        img = Image.open(io.BytesIO(data))
        row = {"kind": name, "bytes": len(data), "size": list(img.size), "mode": img.mode,
               "jpeg_scans": jpeg_scans(data, 10**6) if data[:2] == b"\xff\xd8" else None,
               "unbounded": measure(unbounded, data, bounded=False), "bounded": measure(bounded, data, bounded=True)}
        rows.append(row)
        if not args.json:
            print(f"{name:18s} {len(data) / 1e6:7.2f} MB {img.size[0]}x{img.size[1]} {img.mode:5s} "
                  f"unbounded {row['unbounded']['cpu_s']:6.2f} s ({row['unbounded']['outcome']})  "
                  f"bounded {row['bounded']['cpu_s']:6.2f} s ({row['bounded']['outcome']})", flush=True)
    if args.json:
        print(json.dumps({"max_pixels": args.max_pixels, "budget_s": args.budget, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
