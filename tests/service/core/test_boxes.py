"""The Renderer gives render()'s pixels bit for bit while sharing each first pass between boxes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service.core.boxes import Box, Renderer, center_box, render, shift_box, zoom_box

BACKGROUND = (123.675, 116.28, 103.53)


def _boxes(w: int, h: int, resolution: int) -> list[Box]:
    """The scorer's kinds of boxes: pan moves, zooms far out (padding) and in, ensemble copies, frames."""
    c = center_box(w, h, resolution, 0.875)
    boxes = [shift_box(c, o, o, resolution) for o in range(-4, 5)]
    boxes += [shift_box(c, o, 0, resolution) for o in range(-4, 5)]
    boxes += [shift_box(c, 0, o, resolution) for o in range(-4, 5)]
    boxes += [zoom_box(c, z) for z in (0.4, 0.425, 0.7, 0.95, 1.05, 1.15)]
    boxes += [shift_box(zoom_box(c, 0.5), 2, -1, resolution), Box(0, 0, w, h), Box(-3.5, 2.25, w + 3.5, h + 2.25)]
    return boxes


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "lanczos", "nearest"])
def test_renderer_is_render_bit_for_bit(coffee: np.ndarray, chelsea: np.ndarray, interpolation: str) -> None:
    tall = Image.fromarray(np.ascontiguousarray(coffee[:, :120]))  # 120 x 400: the vertical pass runs first
    shared = 0
    for img in (Image.fromarray(coffee), Image.fromarray(chelsea), tall):
        for resolution in (224, 96):
            renderer = Renderer(img, BACKGROUND)
            for box in _boxes(*img.size, resolution):
                want = render(img, box, resolution, interpolation, BACKGROUND)
                got = renderer.render(box, resolution, interpolation)
                assert got.dtype == np.uint8 and got.shape == (resolution, resolution, 3)
                assert np.array_equal(got, want), (img.size, resolution, box)
            shared += renderer.hits
    if interpolation != "nearest":
        assert shared > 0  # boxes with the same extent really shared their first pass


def test_renderer_cache_is_bounded_and_refuses_other_modes(coffee: np.ndarray) -> None:
    img = Image.fromarray(coffee)
    renderer = Renderer(img, BACKGROUND, cache_size=3)
    c = center_box(600, 400, 64, 0.875)
    for dx in range(8):
        renderer.render(shift_box(c, dx, 1, 64), 64, "bilinear")
    assert len(renderer._passes) == 3
    with pytest.raises(ValueError, match="RGB"):
        Renderer(img.convert("L"), BACKGROUND)
