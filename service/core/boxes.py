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

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

__all__ = ["INTERPOLATIONS", "Box", "center_box", "shift_box", "zoom_box", "render"]

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


INTERPOLATIONS = tuple(_RESAMPLE)
