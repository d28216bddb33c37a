"""Centred-object rescaling: find the main object and frame it like a training crop.

Placeholder implementation (border-colour difference); the robustness work replaces it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from service.preprocess import Box, center_box

__all__ = ["object_box"]


def object_box(img: Image.Image, *, crop_pct: float, background: Sequence[float]) -> Box:
    """A square box around the main object, which fills ``crop_pct`` of its side."""
    arr = np.asarray(img, dtype=np.int16)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    ref = np.median(border, axis=0)
    mask = np.abs(arr - ref).max(axis=-1) > 12
    ys, xs = np.nonzero(mask)
    w, h = img.size
    if len(xs) == 0:
        return center_box(w, h, min(w, h), 1.0)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    side = max(x1 - x0, y1 - y0) / crop_pct
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return Box(cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
