import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.core.errors import ImageTooLarge, InvalidInput, UnsupportedImage
from service.core.boxes import Box, center_box, render, shift_box, zoom_box
from service.core.preprocess import Preprocessor, decode, normalise, original_size, to_original
from tests.conftest import BACKGROUND, encode, tiny_card


def _two_step_center(img: Image.Image, resolution: int, crop_pct: float) -> np.ndarray:
    """torchvision's Resize(round(R / crop_pct)) + CenterCrop(R), written out with Pillow."""
    w, h = img.size
    short = round(resolution / crop_pct)
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    resized = img.resize(size, Image.Resampling.BICUBIC)
    left = int(round((size[0] - resolution) / 2.0))
    top = int(round((size[1] - resolution) / 2.0))
    return np.asarray(resized.crop((left, top, left + resolution, top + resolution)))


@pytest.mark.parametrize("resolution", [224, 196, 291])
def test_center_policy_equals_resize_then_centre_crop(coffee: np.ndarray, resolution: int) -> None:
    img = Image.fromarray(coffee)
    ours = render(img, center_box(*img.size, resolution, 0.875), resolution, "bicubic", BACKGROUND)
    ref = _two_step_center(img, resolution, 0.875)
    assert ours.shape == (resolution, resolution, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_golden_values_of_the_center_view(coffee: np.ndarray) -> None:
    view = render(Image.fromarray(coffee), center_box(600, 400, 224, 0.875), 224, "bicubic", BACKGROUND)
    # golden: pixels of skimage's coffee through resize 256 + centre crop 224, bicubic (Pillow)
    ref = _two_step_center(Image.fromarray(coffee), 224, 0.875)
    np.testing.assert_allclose(view.mean(axis=(0, 1)), ref.mean(axis=(0, 1)), atol=0.05)
    # 600x400 -> 384x256, crop at (80, 16): in source pixels x 125..475, y 25..375
    assert center_box(600, 400, 224, 0.875) == Box(125.0, 25.0, 475.0, 375.0)


def test_normalise_matches_the_card_formula() -> None:
    card = tiny_card(mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))
    px = np.array([[[[0, 127, 255]]]], dtype=np.uint8)
    out = normalise(px, card)
    assert out.shape == (1, 3, 1, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0, 0], [-127 / 128, 0.0, 128 / 128], rtol=0, atol=1e-7)
    bgr = normalise(px, card.replace(channel_order="BGR"))
    np.testing.assert_allclose(bgr[0, :, 0, 0], out[0, ::-1, 0, 0])
    with pytest.raises(InvalidInput):
        normalise(np.zeros((2, 4, 4), dtype=np.uint8), card)


def test_exif_orientation_is_applied(coffee: np.ndarray) -> None:
    img = Image.fromarray(coffee)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode(buf.getvalue(), background=BACKGROUND)
    assert out.size == (400, 600)
    upright = np.asarray(Image.fromarray(coffee).transpose(Image.Transpose.ROTATE_270))
    assert np.abs(np.asarray(out).astype(int) - upright.astype(int)).mean() < 3


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "I;16", "RGBA", "LA", "YCbCr"])
def test_every_mode_becomes_rgb(coffee: np.ndarray, mode: str) -> None:
    img = Image.fromarray(coffee).resize((60, 40))
    if mode == "I;16":
        arr = (np.asarray(img.convert("L")).astype(np.uint16) * 257)
        src = Image.fromarray(arr)
        assert src.mode == "I;16"
        fmt = "PNG"
    else:
        src = img.convert(mode)
        fmt = "JPEG" if mode in ("CMYK", "YCbCr") else "PNG"
    if mode == "YCbCr":
        src = img
    out = decode(encode(src, fmt), background=BACKGROUND)
    assert out.mode == "RGB" and out.size == (60, 40)
    if mode == "I;16":
        gray = np.asarray(img.convert("L")).astype(int)
        assert np.abs(np.asarray(out)[..., 0].astype(int) - gray).max() <= 1


def test_alpha_is_composited_on_the_mean_colour() -> None:
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:4, :, :3] = 255
    rgba[:4, :, 3] = 255  # top half opaque white, bottom half fully transparent
    out = np.asarray(decode(encode(rgba, "PNG"), background=(10, 20, 30)))
    assert (out[:4] == 255).all()
    assert (out[4:] == [10, 20, 30]).all()
    pal = Image.fromarray(rgba).convert("RGBA").convert("P", palette=Image.Palette.ADAPTIVE)
    pal.info["transparency"] = 0
    assert decode(encode(pal, "PNG", transparency=0), background=(1, 2, 3)).mode == "RGB"


def test_gif_first_frame_webp_bmp(coffee: np.ndarray) -> None:
    a = Image.fromarray(np.full((16, 16, 3), 200, np.uint8))
    b = Image.fromarray(np.full((16, 16, 3), 20, np.uint8))
    buf = io.BytesIO()
    a.save(buf, "GIF", save_all=True, append_images=[b], duration=50, loop=0)
    first = np.asarray(decode(buf.getvalue(), background=BACKGROUND))
    assert first.mean() > 150
    for fmt in ("WEBP", "BMP"):
        assert decode(encode(coffee, fmt), background=BACKGROUND).size == (600, 400)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_pixel_limit_is_checked_before_decoding() -> None:
    bomb = _png_header_only(100_000, 100_000)
    assert len(bomb) < 200
    with pytest.raises(ImageTooLarge, match="pixel"):
        decode(bomb, background=BACKGROUND)
    with pytest.raises(ImageTooLarge):
        decode(encode(np.zeros((100, 100, 3), np.uint8), "PNG"), max_pixels=9_999, background=BACKGROUND)


@pytest.mark.parametrize("data", [b"", b"\x00" * 10, b"not an image at all", b"GIF89a\x01"])
def test_garbage_is_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedImage):
        decode(data, background=BACKGROUND)


def test_truncated_jpeg_and_png_are_refused(coffee: np.ndarray) -> None:
    for fmt in ("JPEG", "PNG"):
        data = encode(coffee, fmt)
        with pytest.raises(UnsupportedImage):
            decode(data[: len(data) // 2], background=BACKGROUND)


def test_reduced_decode_keeps_enough_pixels_and_reports_the_original_box(coffee: np.ndarray) -> None:
    big = Image.fromarray(coffee).resize((2400, 1600), Image.Resampling.BICUBIC)
    data = encode(big, "JPEG", quality=90)
    small = decode(data, min_short_side=256, background=BACKGROUND)
    assert min(small.size) >= 256 and small.size[0] < 2400
    assert original_size(small) == (2400, 1600)
    box = to_original(center_box(*small.size, 224, 0.875), small)
    ref = center_box(2400, 1600, 224, 0.875)
    assert abs(box.x0 - ref.x0) < 8 and abs(box.y1 - ref.y1) < 8


def test_box_shift_and_zoom() -> None:
    box = Box(10, 20, 110, 120)
    assert shift_box(box, 1, -2, 50) == Box(12, 16, 112, 116)
    assert zoom_box(box, 2.0) == Box(35, 45, 85, 95)
    with pytest.raises(ValueError):
        zoom_box(box, 0)


def test_render_pads_outside_the_image_with_the_background() -> None:
    img = Image.fromarray(np.zeros((10, 10, 3), np.uint8))
    out = render(img, Box(-10, 0, 10, 20), 20, "nearest", background=(9, 9, 9))
    assert (out[:, :10] == 9).all() and (out[:10, 10:] == 0).all()


def test_preprocessor_end_to_end(coffee_jpeg: bytes) -> None:
    pre = Preprocessor(tiny_card(test_resolution=40))
    view = pre.prepare(coffee_jpeg)
    assert view.pixels.shape == (40, 40, 3)
    tensor = pre(coffee_jpeg)
    assert tensor.shape == (1, 3, 40, 40) and tensor.dtype == np.float32
    with pytest.raises(ValueError):
        Preprocessor(tiny_card(), policy="zoom")
