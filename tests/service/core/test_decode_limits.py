"""Bounded decode work: the CPU budget, the JPEG scan cap, the EXIF cap, and which images count as heavy."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image

from benchmarks.decode import exif_png, jpeg_many_scans, png_zlib
from service.core.errors import DecodeBudgetExceeded, ImageTooLarge, UnsupportedImage
from service.core.preprocess import (
    DECODE_BLOCK,
    MAX_EXIF_BYTES,
    MAX_JPEG_SCANS,
    decode,
    jpeg_scans,
    open_image,
)
from tests.conftest import BACKGROUND, encode


def _photo(width: int, height: int, fmt: str, **params: object) -> bytes:
    rng = np.random.default_rng(0)
    return encode(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), fmt, **params)


def test_scans_are_counted_without_decoding() -> None:
    assert jpeg_scans(_photo(64, 48, "JPEG")) == 1
    progressive = _photo(64, 48, "JPEG", progressive=True)
    assert 2 < jpeg_scans(progressive) <= 12  # libjpeg's progressive script
    crafted = jpeg_many_scans(2_000_000, extra_scans=200)
    assert jpeg_scans(crafted, limit=10**6) == jpeg_scans(progressive) + 200
    assert jpeg_scans(crafted) == MAX_JPEG_SCANS + 1  # counting stops past the cap


def test_a_jpeg_with_too_many_scans_is_refused_before_decoding() -> None:
    with pytest.raises(DecodeBudgetExceeded, match=f"more than {MAX_JPEG_SCANS} scans") as info:
        open_image(jpeg_many_scans(2_000_000, extra_scans=200))
    assert info.value.status == 413
    decode(jpeg_many_scans(200_000, extra_scans=20), background=BACKGROUND)  # a few extra scans are fine


def test_the_budget_stops_a_decode_part_way() -> None:
    data = png_zlib(4_000_000)  # ~33 kB of zlib for 32 MB of 16-bit RGBA samples
    opened = open_image(data, budget_s=0.005)
    with pytest.raises(DecodeBudgetExceeded, match="decode_budget_s"):
        from service.core.preprocess import finish_image

        finish_image(opened, background=BACKGROUND)
    assert opened.source.tell() < len(data), "the whole image was decoded despite the budget"
    assert decode(data, background=BACKGROUND).size == opened.image.size  # without a budget it decodes


def test_the_budget_follows_the_image_across_threads() -> None:
    from service.core.preprocess import finish_image

    opened = open_image(_photo(640, 480, "PNG"), budget_s=100.0)
    result: list[object] = []
    worker = threading.Thread(target=lambda: result.append(finish_image(opened, background=BACKGROUND)))
    worker.start()
    worker.join(60)
    assert isinstance(result[0], Image.Image) and opened.source.spent > 0


def test_pillow_reads_small_blocks_so_the_budget_is_looked_at_often() -> None:
    opened = open_image(_photo(64, 48, "PNG"))
    assert opened.image.decodermaxblock == DECODE_BLOCK


def test_a_huge_exif_block_is_refused() -> None:
    with pytest.raises(ImageTooLarge, match=f"over the limit of {MAX_EXIF_BYTES}") as info:
        decode(exif_png(65_000), background=BACKGROUND)
    assert info.value.status == 413


def test_exif_values_that_do_not_fit_their_type_are_a_400_not_a_crash() -> None:
    # undefined-type tags with impossible values: Pillow's EXIF rewrite raised struct.error (an HTTP 500)
    with pytest.raises(UnsupportedImage):
        decode(exif_png(3000), background=BACKGROUND)  # a 36 kB block, under the size cap


@pytest.mark.parametrize(("size", "fmt", "params", "heavy"), [
    ((2500, 2000), "JPEG", {}, False),  # 5 MP baseline: reduced-scale decode, cheap
    ((2500, 2000), "JPEG", {"progressive": True}, True),
    ((2500, 2000), "PNG", {}, True),
    ((1500, 1000), "PNG", {}, False),
    ((4500, 4000), "JPEG", {}, True),  # 18 MP baseline: over 4x the threshold
])
def test_which_images_are_heavy(size: tuple[int, int], fmt: str, params: dict, heavy: bool) -> None:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, fmt, **params)
    assert open_image(buf.getvalue()).heavy(4_000_000) is heavy


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_banded_alpha_composite_gives_the_same_pixels_as_one_call(mode: str) -> None:
    from service.core.preprocess import to_rgb

    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 255, (600, 333, 4), dtype=np.uint8), "RGBA")
    img = rgba if mode == "RGBA" else rgba.convert(mode)
    whole = Image.alpha_composite(Image.new("RGBA", img.size, (124, 116, 104, 255)), img.convert("RGBA")).convert("RGB")
    assert np.array_equal(np.asarray(to_rgb(img, BACKGROUND)), np.asarray(whole))


def test_large_webp_is_refused_from_its_header() -> None:
    from service.core.preprocess import MAX_WEBP_PIXELS

    buf = io.BytesIO()
    Image.new("RGB", (2500, 2000), (1, 2, 3)).save(buf, "WEBP")
    with pytest.raises(ImageTooLarge, match="max_webp_pixels"):
        open_image(buf.getvalue(), max_webp_pixels=MAX_WEBP_PIXELS)
    assert open_image(buf.getvalue(), max_webp_pixels=6_000_000).format == "WEBP"
