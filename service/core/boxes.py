"""Boxes: square regions of an image in pixel coordinates, and the one resampling of a box.

Every serving policy and every robustness protocol is a box: ``center_box`` is "resize the
short side to round(R / crop_pct), centre-crop R"; the localiser (:mod:`service.core.localize`)
returns the box of a located object; protocols move a box by whole *output* pixels
(``shift_box``) or zoom it about its centre (``zoom_box``). :func:`render` resamples a box to
R x R in one Pillow call. Both :mod:`service.core.preprocess` and :mod:`service.core.localize`
build on this module; neither imports the other's internals.

Example:
    >>> box = center_box(600, 400, 224, 0.875)
    >>> shifted = shift_box(box, 1, 1, 224)
    >>> round(shifted.x0 - box.x0, 4) == round(box.width / 224, 4)
    True
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

__all__ = ["INTERPOLATIONS", "Box", "center_box", "shift_box", "zoom_box", "render", "Renderer"]

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
    interpolation: str,
    background: Sequence[float],
) -> np.ndarray:
    """Resample ``box`` of ``img`` to a (resolution, resolution, 3) uint8 array.

    Parts of the box outside the image are filled with ``background``.
    """
    resample = _RESAMPLE[interpolation]
    w, h = img.size
    if box.x0 < 0 or box.y0 < 0 or box.x1 > w or box.y1 > h:
        pad_l, pad_t, pad_r, pad_b = _pads(box, w, h)
        canvas = Image.new("RGB", (w + pad_l + pad_r, h + pad_t + pad_b), _fill(background))
        canvas.paste(img, (pad_l, pad_t))
        img = canvas
        box = Box(box.x0 + pad_l, box.y0 + pad_t, box.x1 + pad_l, box.y1 + pad_t)
    out = img.resize((resolution, resolution), resample, box=(box.x0, box.y0, box.x1, box.y1))
    return np.asarray(out, dtype=np.uint8)


def _pads(box: Box, w: int, h: int) -> tuple[int, int, int, int]:
    """Whole pixels of background :func:`render` adds left, top, right and bottom of a w x h image for ``box``."""
    return (int(np.ceil(max(0.0, -box.x0))), int(np.ceil(max(0.0, -box.y0))),
            int(np.ceil(max(0.0, box.x1 - w))), int(np.ceil(max(0.0, box.y1 - h))))


def _fill(background: Sequence[float]) -> tuple[int, ...]:
    return tuple(int(round(c)) for c in background)


class Renderer:
    """:func:`render` for many boxes of one image: the same pixels, bit for bit, with less work.

    Pillow resamples a box in two separable passes (horizontal, then vertical; vertical first for a
    much taller than wide input), rounding to 8 bits in between. The first pass depends only on the
    box's extent along its own axis, the input size along it and the output size. So boxes that
    share that extent (views moved only across the first pass's axis, such as vertical pan views,
    or localiser frames with the same horizontal shift) share the first pass: the renderer runs
    it once, as a one-axis Pillow resize, on the rows (or columns) of the photo only, and the
    padding rows of background once as a single row; the second pass is a one-axis Pillow resize
    of the stacked result. Each pass gets the same coordinates, sizes and 8-bit input as inside
    one :func:`render` call, so the output is identical (checked against :func:`render` in
    ``tests/service/core/test_boxes.py``). The first passes are kept in a small LRU cache.

    Example:
        >>> r = Renderer(img, background=card.mean)                                    # doctest: +SKIP
        >>> views = [r.render(shift_box(box, 0, dy, 224), 224, "bilinear") for dy in range(-4, 5)]  # doctest: +SKIP
    """

    def __init__(self, img: Image.Image, background: Sequence[float], cache_size: int = 48) -> None:
        if img.mode != "RGB":
            raise ValueError(f"Renderer needs an RGB image, got mode {img.mode}")
        self.img = img
        self.background = tuple(background)
        self.fill = _fill(background)
        self.cache_size = cache_size
        self._passes: OrderedDict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._padded: dict[tuple[int, ...], Image.Image] = {}
        self.hits = 0

    def render(self, box: Box, resolution: int, interpolation: str) -> np.ndarray:
        """Exactly ``render(self.img, box, resolution, interpolation, background)``."""
        img = self.img
        w, h = img.size
        R = resolution
        pad_l, pad_t, pad_r, pad_b = _pads(box, w, h)
        wc, hc = w + pad_l + pad_r, h + pad_t + pad_b
        x0, y0, x1, y1 = box.x0 + pad_l, box.y0 + pad_t, box.x1 + pad_l, box.y1 + pad_t
        # Pillow's own tests (Resample.c): which passes run, and in which order; box corners are C floats
        f = np.float32
        need_h = R != wc or f(x0) != 0 or f(x1) != R
        need_v = R != hc or f(y0) != 0 or f(y1) != R
        if interpolation == "nearest" or not (need_h and need_v):  # one pass (or none): nothing to share
            return render(img, box, R, interpolation, self.background)
        resample = _RESAMPLE[interpolation]
        if not ((hc - R) > 0 and (hc - R) > (wc - R) * 2):  # horizontal first
            key = ("h", interpolation, R, pad_l, pad_r, x0, x1)
            first, row = self._first(key, lambda: self._pass(
                self._photo((pad_l, 0, pad_r, 0), (wc, h)), (R, h), (x0, 0, x1, h), resample, (wc, 1), (R, 1)))
            if pad_t or pad_b:
                first = np.concatenate([np.broadcast_to(row, (pad_t, R, 3)), first,
                                        np.broadcast_to(row, (pad_b, R, 3))])
            out = Image.fromarray(first).resize((R, R), resample, box=(0, y0, R, y1))
        else:  # vertical first
            key = ("v", interpolation, R, pad_t, pad_b, y0, y1)
            first, col = self._first(key, lambda: self._pass(
                self._photo((0, pad_t, 0, pad_b), (w, hc)), (w, R), (0, y0, w, y1), resample, (1, hc), (1, R)))
            if pad_l or pad_r:
                first = np.concatenate([np.broadcast_to(col, (R, pad_l, 3)), first,
                                        np.broadcast_to(col, (R, pad_r, 3))], axis=1)
            out = Image.fromarray(np.ascontiguousarray(first)).resize((R, R), resample, box=(x0, 0, x1, R))
        return np.asarray(out, dtype=np.uint8)

    def _first(self, key: tuple[Any, ...], compute: Any) -> tuple[np.ndarray, np.ndarray]:
        got = self._passes.get(key)
        if got is not None:
            self.hits += 1
            self._passes.move_to_end(key)
            return got
        got = compute()
        self._passes[key] = got
        if len(self._passes) > self.cache_size:
            self._passes.popitem(last=False)
        return got

    def _photo(self, pads: tuple[int, int, int, int], size: tuple[int, int]) -> Image.Image:
        """The image with background added on two opposite sides only (the first pass's axis)."""
        if not any(pads):
            return self.img
        img = self._padded.get(pads)
        if img is None:
            img = Image.new("RGB", size, self.fill)
            img.paste(self.img, pads[:2])
            if len(self._padded) >= self.cache_size:
                self._padded.clear()
            self._padded[pads] = img
        return img

    def _pass(self, src: Image.Image, size: tuple[int, int], box: tuple[float, float, float, float],
              resample: Any, bg_size: tuple[int, int], bg_out: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """The first pass over the photo's rows (or columns), and over one row (column) of background."""
        first = np.asarray(src.resize(size, resample, box=box))
        bg_box = (box[0], 0, box[2], 1) if bg_size[1] == 1 else (0, box[1], 1, box[3])
        line = np.asarray(Image.new("RGB", bg_size, self.fill).resize(bg_out, resample, box=bg_box))
        return first, line


INTERPOLATIONS = tuple(_RESAMPLE)
