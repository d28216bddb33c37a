"""The one preprocessing implementation: bytes -> RGB -> policy box -> model tensor.

The export parity check, the robustness scorer and the server all call this
module, configured only by the model card, so serving can never drift from
what was measured.

Every serving policy is expressed as a *box*: a square region in the decoded
image's pixel coordinates (floats) that is resampled to ``resolution`` x
``resolution`` in one Pillow call (``Image.resize(..., box=...)``). The
``center`` policy's box is exactly "resize the short side to
round(resolution / crop_pct), centre-crop resolution"; the ``object`` policy's
box comes from :mod:`service.localize`; robustness protocols shift or scale a
box by whole *output* pixels.

Example:
    >>> pre = Preprocessor(card)                                  # doctest: +SKIP
    >>> view = pre.prepare(open("coffee.jpg", "rb").read())        # doctest: +SKIP
    >>> tensor = pre.to_tensor([view.pixels])                      # doctest: +SKIP
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.card import ModelCard
from service.errors import ImageTooLarge, InvalidInput, UnsupportedImage

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "Box",
    "View",
    "decode",
    "original_size",
    "to_original",
    "to_rgb",
    "center_box",
    "shift_box",
    "zoom_box",
    "render",
    "normalise",
    "Preprocessor",
]

DEFAULT_MAX_PIXELS = 50_000_000  # 50 MP: any phone photo; decompression bombs are refused
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "MPO")

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Box:
    """A region in image pixel coordinates: [x0, x1) x [y0, y1), floats allowed."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    def as_list(self, ndigits: int = 2) -> list[float]:
        return [round(float(v), ndigits) for v in (self.x0, self.y0, self.x1, self.y1)]


@dataclass(frozen=True)
class View:
    """One model input before normalisation: uint8 RGB pixels and the box they came from."""

    pixels: np.ndarray  # (resolution, resolution, 3) uint8
    box: Box


# --------------------------------------------------------------------- decoding
def decode(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: Sequence[float] = (124, 116, 104),
    min_short_side: int | None = None,
) -> Image.Image:
    """Decode image bytes into an upright 8-bit RGB Pillow image.

    JPEG, PNG, WebP, BMP and GIF (first frame) are accepted. The pixel count is
    checked from the header before any pixel is decoded. EXIF orientation is
    applied. Alpha is composited onto ``background`` (the model's mean colour).
    With ``min_short_side``, a large JPEG is decoded at a reduced DCT scale
    (1/2, 1/4, 1/8) that still leaves at least that many pixels on the short side.

    Raises:
        UnsupportedImage: not an image, a format outside SUPPORTED_FORMATS, truncated.
        ImageTooLarge: width * height over ``max_pixels``.
    """
    if not data:
        raise UnsupportedImage("empty body: expected an encoded image (JPEG, PNG, WebP, BMP or GIF)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
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
        try:
            if fmt in ("JPEG", "MPO") and min_short_side:
                scale = min(width, height) / float(min_short_side)
                if scale >= 2:
                    img.draft("RGB", (max(1, int(width / scale) + 1), max(1, int(height / scale) + 1)))
            if getattr(img, "is_animated", False):
                img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            rgb = to_rgb(img, background)
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"image is over the pixel limit of {max_pixels}: {exc}") from exc
        except (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, ZeroDivisionError) as exc:
            raise UnsupportedImage(f"cannot decode {fmt} image: {_short(exc)}") from exc
    # the upright size before any reduced-scale decode, so boxes can be reported in it
    swapped = (rgb.size[0] > rgb.size[1]) != (width > height) and width != height
    rgb.info["original_size"] = (height, width) if swapped else (width, height)
    return rgb


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


def to_rgb(img: Image.Image, background: Sequence[float] = (124, 116, 104)) -> Image.Image:
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
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, tuple(int(round(c)) for c in background) + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


# ------------------------------------------------------------------------ boxes
def center_box(width: int, height: int, resolution: int, crop_pct: float) -> Box:
    """Box of "resize short side to round(resolution / crop_pct), centre-crop resolution"."""
    resize_to = round(resolution / crop_pct)
    # torchvision's Resize keeps the aspect ratio with int() truncation on the long side
    new_w = resize_to if width <= height else int(resize_to * width / height)
    new_h = resize_to if height <= width else int(resize_to * height / width)
    left = int(round((new_w - resolution) / 2.0))
    top = int(round((new_h - resolution) / 2.0))
    sx = width / new_w
    sy = height / new_h
    return Box(left * sx, top * sy, (left + resolution) * sx, (top + resolution) * sy)


def shift_box(box: Box, dx: float, dy: float, resolution: int) -> Box:
    """Move a box by (dx, dy) *output* pixels."""
    px = box.width / resolution
    py = box.height / resolution
    return Box(box.x0 + dx * px, box.y0 + dy * py, box.x1 + dx * px, box.y1 + dy * py)


def zoom_box(box: Box, zoom: float) -> Box:
    """Scale a box about its centre; zoom > 1 magnifies (the box shrinks)."""
    if zoom <= 0:
        raise ValueError(f"zoom must be positive, got {zoom}")
    cx = (box.x0 + box.x1) / 2
    cy = (box.y0 + box.y1) / 2
    hw = box.width / (2 * zoom)
    hh = box.height / (2 * zoom)
    return Box(cx - hw, cy - hh, cx + hw, cy + hh)


def render(
    img: Image.Image,
    box: Box,
    resolution: int,
    interpolation: str = "bicubic",
    background: Sequence[float] = (124, 116, 104),
) -> np.ndarray:
    """Resample ``box`` of ``img`` to a (resolution, resolution, 3) uint8 array.

    Parts of the box outside the image are filled with ``background``.
    """
    resample = _RESAMPLE[interpolation]
    w, h = img.size
    if box.x0 < 0 or box.y0 < 0 or box.x1 > w or box.y1 > h:
        pad_l = int(np.ceil(max(0.0, -box.x0)))
        pad_t = int(np.ceil(max(0.0, -box.y0)))
        pad_r = int(np.ceil(max(0.0, box.x1 - w)))
        pad_b = int(np.ceil(max(0.0, box.y1 - h)))
        canvas = Image.new("RGB", (w + pad_l + pad_r, h + pad_t + pad_b), tuple(int(round(c)) for c in background))
        canvas.paste(img, (pad_l, pad_t))
        img = canvas
        box = Box(box.x0 + pad_l, box.y0 + pad_t, box.x1 + pad_l, box.y1 + pad_t)
    out = img.resize((resolution, resolution), resample, box=(box.x0, box.y0, box.x1, box.y1))
    return np.asarray(out, dtype=np.uint8)


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
    """

    def __init__(
        self,
        card: ModelCard,
        *,
        policy: str | None = None,
        resolution: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        reduced_decode: bool = True,
    ) -> None:
        self.card = card
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
        return decode(
            data,
            max_pixels=self.max_pixels,
            background=self.background,
            min_short_side=self.decode_short_side if self.reduced_decode else None,
        )

    def box(self, img: Image.Image) -> Box:
        """The policy's box for this image."""
        if self.policy == "object":
            from service.localize import object_box

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

    def __call__(self, data: bytes) -> np.ndarray:
        """Bytes -> a (1, 3, R, R) float32 tensor."""
        return self.to_tensor([self.prepare(data).pixels])
