"""The one preprocessing implementation: bytes -> RGB -> policy box -> model tensor.

The export parity check, the robustness scorer and the server all call this
module, configured only by the model card, so serving can never drift from
what was measured.

Every serving policy is expressed as a *box*: a square region in the decoded
image's pixel coordinates (floats) that is resampled to ``resolution`` x
``resolution`` in one Pillow call (``Image.resize(..., box=...)``). The
``center`` policy's box is exactly "resize the short side to
round(resolution / crop_pct), centre-crop resolution"; the ``object`` policy's
box comes from :mod:`service.core.localize`; robustness protocols shift or scale a
box by whole *output* pixels. Box geometry and the resampling live in
:mod:`service.core.boxes`.

Example:
    >>> pre = Preprocessor(card)                                  # doctest: +SKIP
    >>> view = pre.prepare(open("coffee.jpg", "rb").read())        # doctest: +SKIP
    >>> tensor = pre.to_tensor([view.pixels])                      # doctest: +SKIP
"""

from __future__ import annotations

import io
import re
import struct
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.core.boxes import Box, center_box, render, shift_box
from service.core.localize import object_box
from service.core.card import ModelCard
from service.core.ensemble import Ensemble
from service.core.errors import DecodeBudgetExceeded, ImageTooLarge, InvalidInput, UnsupportedImage

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "View",
    "Prepared",
    "Header",
    "read_header",
    "decode",
    "open_image",
    "finish_image",
    "jpeg_scans",
    "Opened",
    "DecodeBudget",
    "MAX_JPEG_SCANS",
    "MAX_EXIF_BYTES",
    "MAX_WEBP_PIXELS",
    "original_size",
    "to_original",
    "to_rgb",
    "normalise",
    "Preprocessor",
]

DEFAULT_MAX_PIXELS = 50_000_000  # 50 MP: any phone photo; decompression bombs are refused
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "MPO")


@dataclass(frozen=True)
class View:
    """One model input before normalisation: uint8 RGB pixels and the box they came from."""

    pixels: np.ndarray  # (resolution, resolution, 3) uint8
    box: Box


@dataclass(frozen=True)
class Prepared:
    """One image ready for the model: the decoded image (for further views of it), the policy's box
    and the normalised (3, R, R) float32 tensor."""

    image: Image.Image
    box: Box
    tensor: np.ndarray


# --------------------------------------------------------------------- decoding
MAX_JPEG_SCANS = 64  # libjpeg's progressive script writes 10 scans; every extra scan is a pass over the image
MAX_EXIF_BYTES = 65_535  # one JPEG APP1 segment; a larger EXIF block (PNG eXIf, WebP) takes seconds to parse
DECODE_BLOCK = 16 * 1024  # encoded bytes Pillow's decoders get between two looks at the CPU budget
MAX_WEBP_PIXELS = 4_000_000  # Pillow decodes a WebP in one call holding the GIL (~10 ms per megapixel here)
_COMPOSITE_ROWS = 256  # rows alpha-composited per call (see to_rgb)
_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # the end of a scan's entropy-coded data


class DecodeBudget(io.BytesIO):
    """The encoded bytes as Pillow reads them, in :data:`DECODE_BLOCK` pieces; every read checks the CPU time
    the decoding threads have spent on this image (``seconds``; None: no budget)."""

    def __init__(self, data: bytes, seconds: float | None) -> None:
        super().__init__(data)
        self.seconds = seconds
        self.spent = 0.0
        self._since = time.thread_time()

    def arm(self) -> None:
        """The work continues in this thread (it may have moved to another one)."""
        self._since = time.thread_time()

    def pause(self) -> None:
        """The work leaves this thread: bank the CPU time spent here."""
        self.spent += time.thread_time() - self._since
        self._since = time.thread_time()

    def used(self) -> float:
        return self.spent + time.thread_time() - self._since

    def check(self) -> None:
        if self.seconds is not None and self.used() > self.seconds:
            raise DecodeBudgetExceeded(f"decoding this image needs more than {self.seconds:g} s of CPU time "
                                       "(decode_budget_s): send a smaller image, or a baseline JPEG")

    def read(self, size: int | None = -1) -> bytes:
        self.check()
        return super().read(-1 if size is None else size)


@dataclass
class Opened:
    """An image whose header was read and checked, its pixels not decoded yet (:func:`open_image`)."""

    image: Image.Image
    source: DecodeBudget
    format: str
    width: int
    height: int

    @property
    def progressive(self) -> bool:
        return bool(self.image.info.get("progressive") or self.image.info.get("progression"))

    def heavy(self, pixels: int) -> bool:
        """Whether decoding it is expensive: more than ``pixels`` pixels, or ``4 * pixels`` for a baseline JPEG
        (decoded at a reduced DCT scale, ~5x cheaper per pixel than a progressive JPEG, PNG, GIF or WebP)."""
        cheap = self.format in ("JPEG", "MPO") and not self.progressive
        return self.width * self.height > (4 * pixels if cheap else pixels)


def jpeg_scans(data: bytes, limit: int = MAX_JPEG_SCANS) -> int:
    """The number of scans (SOS segments) of a JPEG's first image, counted up to ``limit + 1``, by walking its
    segments (entropy-coded data is skipped with one search; nothing is decoded)."""
    pos, scans, n = 2, 0, len(data)
    while pos + 4 <= n and scans <= limit:
        if data[pos] != 0xFF:
            break  # not a marker: Pillow will say what is wrong
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD8 or marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker == 0xD9:
            break
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xDA:
            scans += 1
            found = _JPEG_NEXT_MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
    return scans


def open_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, budget_s: float | None = None,
               max_webp_pixels: int = MAX_WEBP_PIXELS) -> Opened:
    """Read and check an image's header: format, pixel count, JPEG scans, EXIF size; decode nothing yet.

    Raises:
        UnsupportedImage: not an image, a format outside SUPPORTED_FORMATS.
        ImageTooLarge: width * height over ``max_pixels`` (``max_webp_pixels`` for a WebP: libwebp cannot be
            interrupted and Pillow keeps the GIL while it runs), or an EXIF block over :data:`MAX_EXIF_BYTES`.
        DecodeBudgetExceeded: a JPEG with more than :data:`MAX_JPEG_SCANS` scans, or over ``budget_s``.
    """
    if not data:
        raise UnsupportedImage("empty body: expected an encoded image (JPEG, PNG, WebP, BMP or GIF)")
    if data[:2] == b"\xff\xd8" and (scans := jpeg_scans(data)) > MAX_JPEG_SCANS:
        raise DecodeBudgetExceeded(f"JPEG has more than {MAX_JPEG_SCANS} scans ({scans} counted so far): each "
                                   "scan is another pass over every pixel; re-encode it")
    source = DecodeBudget(data, budget_s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns per bad EXIF tag: thousands of lines for one image
        try:
            img = Image.open(source)
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"image is over the pixel limit of {max_pixels}: {exc}") from exc
        except UnidentifiedImageError as exc:  # its text names a BytesIO object at a memory address
            raise UnsupportedImage("not an image Steady can decode: send JPEG, PNG, WebP, BMP or GIF") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise UnsupportedImage(f"cannot decode image: {_short(exc)}") from exc
    fmt = img.format or "unknown"
    if fmt not in SUPPORTED_FORMATS:
        raise UnsupportedImage(f"unsupported image format {fmt}: use one of JPEG, PNG, WebP, BMP, GIF")
    width, height = img.size
    if width < 1 or height < 1:
        raise UnsupportedImage(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    if fmt == "WEBP" and width * height > max_webp_pixels:
        raise ImageTooLarge(f"WebP image is {width}x{height} = {width * height} pixels, over the WebP limit of "
                            f"{max_webp_pixels} (max_webp_pixels): send a JPEG or PNG, or a smaller WebP")
    _check_exif(img)
    img.decodermaxblock = DECODE_BLOCK
    return Opened(img, source, fmt, width, height)


def _check_exif(img: Image.Image) -> None:
    exif = img.info.get("exif")
    if isinstance(exif, (bytes, bytearray)) and len(exif) > MAX_EXIF_BYTES:
        raise ImageTooLarge(f"EXIF block of {len(exif)} bytes is over the limit of {MAX_EXIF_BYTES}")


def finish_image(opened: Opened, *, background: Sequence[float], min_short_side: int | None = None) -> Image.Image:
    """Decode an opened image's pixels into an upright 8-bit RGB image, within its CPU budget (see :func:`decode`)."""
    img, fmt, (width, height) = opened.image, opened.format, (opened.width, opened.height)
    budget = opened.source
    budget.arm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if fmt in ("JPEG", "MPO") and min_short_side:
                scale = min(width, height) / float(min_short_side)
                if scale >= 2:
                    img.draft("RGB", (max(1, int(width / scale) + 1), max(1, int(height / scale) + 1)))
            # an animated image opens at its first frame; asking `is_animated` (it seeks to frame 1 and back)
            # made a GIF take 1.6 s instead of 0.2 s to load, in Python code holding the GIL
            if img.tell() != 0:
                img.seek(0)
            img.load()
            budget.check()
            _check_exif(img)  # a PNG's eXIf chunk after the pixels is only read now
            img = ImageOps.exif_transpose(img) or img
            budget.check()
            rgb = to_rgb(img, background)
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"image is over the pixel limit: {exc}") from exc
        except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, ZeroDivisionError,
                struct.error) as exc:  # struct.error: EXIF tags whose values do not fit their type
            raise UnsupportedImage(f"cannot decode {fmt} image: {_short(exc)}") from exc
        finally:
            budget.pause()
    # the upright size before any reduced-scale decode, so boxes can be reported in it
    swapped = (rgb.size[0] > rgb.size[1]) != (width > height) and width != height
    rgb.info["original_size"] = (height, width) if swapped else (width, height)
    return rgb


def decode(
    data: bytes,
    *,
    background: Sequence[float],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_short_side: int | None = None,
    budget_s: float | None = None,
) -> Image.Image:
    """Decode image bytes into an upright 8-bit RGB Pillow image.

    JPEG, PNG, WebP, BMP and GIF (first frame) are accepted. The pixel count is
    checked from the header before any pixel is decoded. EXIF orientation is
    applied. Alpha is composited onto ``background`` (the model's mean colour).
    With ``min_short_side``, a large JPEG is decoded at a reduced DCT scale
    (1/2, 1/4, 1/8) that still leaves at least that many pixels on the short side.
    With ``budget_s``, decoding stops once it has used that much CPU time (checked
    every :data:`DECODE_BLOCK` encoded bytes and between steps; a WebP is decoded in one call).

    Raises:
        UnsupportedImage: not an image, a format outside SUPPORTED_FORMATS, truncated.
        ImageTooLarge: width * height over ``max_pixels``; an EXIF block over :data:`MAX_EXIF_BYTES`.
        DecodeBudgetExceeded: over ``budget_s``; a JPEG with more than :data:`MAX_JPEG_SCANS` scans.
    """
    opened = open_image(data, max_pixels=max_pixels, budget_s=budget_s)
    return finish_image(opened, background=background, min_short_side=min_short_side)


@dataclass(frozen=True)
class Header:
    """What an encoded image's header says, before any pixel is decoded.

    For JPEG (and MPO) ``width`` and ``height`` are upright: EXIF orientations 5-8 swap them, as
    :func:`decode` does. Other formats may keep EXIF after the pixel data (PNG), which only decoding
    reads: their ``orientation`` is 0 (not read) and the size is as stored; so is a JPEG's whose
    EXIF block cannot be read.
    """

    format: str
    width: int
    height: int
    mode: str
    orientation: int


def read_header(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Header:
    """The header of an image :func:`decode` would accept (about 0.1 ms: no pixel is decoded).

    Raises the same errors as :func:`decode` for what Steady refuses from the header (not an image,
    a format outside SUPPORTED_FORMATS, over ``max_pixels``); a truncated body is only found by decoding.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = open_image(data, max_pixels=max_pixels).image
        orientation = 0
        if img.format in ("JPEG", "MPO"):  # EXIF sits in APP1, parsed with the header
            try:
                orientation = int(img.getexif().get(0x0112, 1) or 1)
            except Exception:  # noqa: BLE001 - a broken EXIF block: decode() decides what it means
                orientation = 0
        width, height = img.size
        if orientation in (5, 6, 7, 8):
            width, height = height, width
        return Header(img.format or "unknown", width, height, img.mode, orientation)


def original_size(img: Image.Image) -> tuple[int, int]:
    """The upright size of the encoded image (differs from ``img.size`` after a reduced decode)."""
    size = img.info.get("original_size")
    return (int(size[0]), int(size[1])) if size else img.size


def to_original(box: Box, img: Image.Image) -> Box:
    """A box in decoded pixels -> the same region in the encoded image's pixels."""
    ow, oh = original_size(img)
    sx, sy = ow / img.size[0], oh / img.size[1]
    return Box(box.x0 * sx, box.y0 * sy, box.x1 * sx, box.y1 * sy)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def to_rgb(img: Image.Image, background: Sequence[float]) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; alpha is composited onto ``background``."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img)
        arr = arr.astype(np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        fill = tuple(int(round(c)) for c in background) + (255,)
        out = Image.new("RGB", rgba.size)
        # Pillow's alpha_composite holds the GIL for its whole run (0.3 s on 12 MP, stalling every other thread
        # of the replica): composite in bands of rows, the same pixels, the GIL released between bands
        for top in range(0, rgba.size[1], _COMPOSITE_ROWS):
            band = rgba.crop((0, top, rgba.size[0], min(rgba.size[1], top + _COMPOSITE_ROWS)))
            out.paste(Image.alpha_composite(Image.new("RGBA", band.size, fill), band).convert("RGB"), (0, top))
        return out
    return img.convert("RGB")


def normalise(pixels: np.ndarray | Sequence[np.ndarray], card: ModelCard) -> np.ndarray:
    """uint8 RGB images (N, H, W, 3) -> float32 (N, 3, H, W) per the card's mean/std on 0..255."""
    batch = np.stack(pixels) if not isinstance(pixels, np.ndarray) else pixels
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise InvalidInput(f"expected images of shape (N, H, W, 3), got {batch.shape}")
    if card.channel_order == "BGR":
        batch = batch[..., ::-1]
    # transpose the uint8 pixels first (4x fewer bytes to move), then convert in place
    out = np.ascontiguousarray(batch.transpose(0, 3, 1, 2)).astype(np.float32)
    out -= np.asarray(card.mean, dtype=np.float32)[:, None, None]
    out *= (1.0 / np.asarray(card.std, dtype=np.float32))[:, None, None]
    return out


# ------------------------------------------------------------------ the facade
class Preprocessor:
    """The card's preprocessing, for one policy and resolution.

    Args:
        card: the model card.
        policy: ``center`` or ``object`` (default: the card's policy).
        resolution: the square input side (default: the card's test_resolution).
        max_pixels: refuse images with more pixels than this.
        reduced_decode: decode large JPEGs at a reduced DCT scale.
        ensemble: a shift ensemble on top of the policy (:mod:`service.core.ensemble`); its copies are
            the policy's box moved by whole output pixels (:meth:`copies`).
        budget_s: CPU seconds one image's decoding may use (None: unbounded); see :func:`decode`.
        max_webp_pixels: refuse WebP images with more pixels than this (see :func:`open_image`).
    """

    def __init__(
        self,
        card: ModelCard,
        *,
        policy: str | None = None,
        resolution: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        reduced_decode: bool = True,
        ensemble: Ensemble | None = None,
        budget_s: float | None = None,
        max_webp_pixels: int = MAX_WEBP_PIXELS,
    ) -> None:
        self.card = card
        self.ensemble = ensemble
        self.budget_s = budget_s
        self.max_webp_pixels = max_webp_pixels
        self.policy = policy or card.policy
        if self.policy not in ("center", "object"):
            raise ValueError(f"policy must be 'center' or 'object', got {self.policy!r}")
        self.resolution = int(resolution or card.resolution)
        if self.resolution < 8:
            raise ValueError(f"resolution must be >= 8, got {self.resolution}")
        self.max_pixels = max_pixels
        self.reduced_decode = reduced_decode
        self.background = tuple(card.mean)

    @property
    def decode_short_side(self) -> int:
        """Smallest short side a reduced-scale decode may produce without losing detail."""
        base = round(self.resolution / self.card.crop_pct)
        return base if self.policy == "center" else 2 * base

    def decode(self, data: bytes) -> Image.Image:
        return self.finish(self.open(data))

    def open(self, data: bytes) -> Opened:
        """Header only (checked; see :func:`open_image`): the caller may choose where to decode it."""
        return open_image(data, max_pixels=self.max_pixels, budget_s=self.budget_s, max_webp_pixels=self.max_webp_pixels)

    def finish(self, opened: Opened) -> Image.Image:
        return finish_image(opened, background=self.background,
                            min_short_side=self.decode_short_side if self.reduced_decode else None)

    def box(self, img: Image.Image) -> Box:
        """The policy's box for this image."""
        if self.policy == "object":
            return object_box(img, crop_pct=self.card.crop_pct, background=self.background, resolution=self.resolution)
        return center_box(img.size[0], img.size[1], self.resolution, self.card.crop_pct)

    def view(self, img: Image.Image, box: Box | None = None) -> View:
        box = box if box is not None else self.box(img)
        return View(render(img, box, self.resolution, self.card.interpolation, self.background), box)

    def prepare(self, data: bytes) -> View:
        """Bytes -> the policy's view."""
        return self.view(self.decode(data))

    def to_tensor(self, pixels: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        return normalise(pixels, self.card)

    def tensor(self, img: Image.Image, box: Box | None = None) -> np.ndarray:
        """The (3, R, R) tensor of ``box`` (default: the policy's box) of a decoded image."""
        return self.to_tensor(self.view(img, box).pixels[None])[0]

    def process(self, data: bytes | Opened) -> Prepared:
        """Bytes (or an :meth:`open` image) -> decoded image, the policy's box and its tensor (what the service
        keeps per request)."""
        img = self.finish(data) if isinstance(data, Opened) else self.decode(data)
        view = self.view(img)
        return Prepared(img, view.box, self.to_tensor(view.pixels[None])[0])

    def copy_boxes(self, box: Box, offsets: Sequence[tuple[int, int]] | None = None) -> list[Box]:
        """``box`` moved by each offset in whole output pixels (default: the ensemble's extra copies)."""
        if offsets is None:
            if self.ensemble is None:
                raise ValueError("this preprocessor has no ensemble")
            offsets = self.ensemble.extra_offsets
        return [shift_box(box, dx, dy, self.resolution) for dx, dy in offsets]

    def copies(self, img: Image.Image, box: Box) -> np.ndarray:
        """The (extra, 3, R, R) tensors of the ensemble's extra copies of ``box`` (the bare view is ``box``)."""
        return self.to_tensor([self.view(img, b).pixels for b in self.copy_boxes(box)])

    def batch(self, images: Sequence[bytes]) -> np.ndarray:
        """Encoded images -> one (N, 3, R, R) float32 batch of the policy's views."""
        return self.to_tensor([self.prepare(data).pixels for data in images])

    def __call__(self, data: bytes) -> np.ndarray:
        """Bytes -> a (1, 3, R, R) float32 tensor."""
        return self.to_tensor([self.prepare(data).pixels])
