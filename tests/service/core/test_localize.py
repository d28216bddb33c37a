"""The object localiser: exact boxes on flat backgrounds, shift-equivariance, honest fallback."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service.core.localize import locate, object_box
from service.core.boxes import Box, center_box

MEAN = (127.0, 127.0, 127.0)


def _embedded(x: int, y: int, size: int = 40, canvas: int = 128, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.full((canvas, canvas, 3), 127, dtype=np.uint8)
    obj = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    obj[[0, -1], :, 0] = 250  # edges that surely differ from the background
    obj[:, [0, -1], 0] = 250
    arr[y:y + size, x:x + size] = obj
    return Image.fromarray(arr)


def test_locate_returns_the_exact_box_of_an_embedded_object() -> None:
    arr = np.asarray(_embedded(30, 50), dtype=np.float32)
    assert locate(arr) == (30.0, 50.0, 70.0, 90.0)


def test_object_box_frames_the_object_to_fill_crop_pct() -> None:
    box = object_box(_embedded(30, 50), crop_pct=0.8, background=MEAN, resolution=32)
    assert box == Box(25.0, 45.0, 75.0, 95.0)  # side 40 / 0.8 = 50, centred on (50, 70)


@pytest.mark.parametrize("dx,dy", [(1, 1), (3, 0), (0, 5), (-2, 7)])
def test_object_box_is_shift_equivariant(dx: int, dy: int) -> None:
    a = object_box(_embedded(40, 40), crop_pct=0.875, background=MEAN, resolution=32)
    b = object_box(_embedded(40 + dx, 40 + dy), crop_pct=0.875, background=MEAN, resolution=32)
    np.testing.assert_allclose([b.x0 - a.x0, b.y0 - a.y0, b.x1 - a.x1, b.y1 - a.y1], [dx, dy, dx, dy], atol=1e-9)


def test_flat_image_falls_back_to_the_center_box() -> None:
    img = Image.new("RGB", (120, 90), (127, 127, 127))
    assert object_box(img, crop_pct=0.875, background=MEAN, resolution=32) == center_box(120, 90, 32, 0.875)


def test_object_that_fills_the_frame_keeps_the_center_box() -> None:
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))
    assert object_box(img, crop_pct=0.875, background=MEAN, resolution=32) == center_box(96, 96, 32, 0.875)


def test_natural_photo_is_deterministic(coffee: np.ndarray) -> None:
    img = Image.fromarray(coffee)
    a = object_box(img, crop_pct=0.875, background=MEAN, resolution=224)
    b = object_box(img, crop_pct=0.875, background=MEAN, resolution=224)
    assert a == b
    assert a.width == pytest.approx(a.height)
    assert 0 < a.width <= 400


def test_frame_restricts_the_search() -> None:
    img = _embedded(30, 50, size=80, canvas=200)
    full = object_box(img, crop_pct=0.875, background=MEAN, resolution=32)
    shifted = object_box(img, crop_pct=0.875, background=MEAN, resolution=32, frame=Box(10, 10, 190, 190))
    assert shifted == full  # same object, seen through a frame that still contains it


def test_a_speck_is_not_an_object() -> None:
    img = _embedded(30, 50, size=6, canvas=200)  # 6 / 0.875 is far below min_fill of the centre crop
    assert object_box(img, crop_pct=0.875, background=MEAN, resolution=32) == center_box(200, 200, 32, 0.875)
