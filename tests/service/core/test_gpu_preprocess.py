"""The GPU preprocessing path (NVIDIA DALI) against the CPU path, on DALI's CPU backend (and on a GPU when present).

The contract (service/core/gpu_preprocess.py): on real photos the DALI tensor equals
``Preprocessor(card, reduced_decode=False)`` within a few levels of 0..255 and top-1 agrees; formats the
device does not take go through the CPU path; a corrupt JPEG fails only its own image.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.core.boxes import Box, center_box, shift_box, zoom_box
from service.core.errors import DeviceUnavailable, ImageTooLarge, SteadyError, UnsupportedImage
from service.core.preprocess import Preprocessor, read_header
from service.core.runtime import Classifier, RuntimeOptions, available_providers
from tests.conftest import encode, make_tiny_onnx, tiny_card

pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed: pip install -e '.[test]' brings its CPU backend")

from service.core.devices import dali_cuda_devices  # noqa: E402
from service.core.gpu_preprocess import DaliPreprocessor, dali_route, window  # noqa: E402

TOLERANCE_LEVELS = 3.0  # max |DALI - Pillow| in 0..255 levels (measured: 1-2; see benchmarks/dali_parity.py)
MEAN_LEVELS = 0.05  # mean |DALI - Pillow| in levels (measured: ~0.005)


def _card(**overrides: object):  # lite0's geometry: 224 px, crop 0.875, bicubic, mean 127 / std 128
    return tiny_card(**{"train_resolution": 224, "interpolation": "bicubic", **overrides})


def _photos() -> dict[str, bytes]:
    from skimage import data

    coffee = data.coffee()
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6  # stored sideways, shown upright
    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return {
        "coffee": encode(coffee, "JPEG", quality=90),
        "chelsea-exif6": buf.getvalue(),
        "astronaut": encode(data.astronaut(), "JPEG", quality=85),
        "rocket-progressive": encode(data.rocket(), "JPEG", quality=90, progressive=True),
        "camera-grey": encode(data.camera(), "JPEG", quality=90),
        "coffee-portrait": encode(np.ascontiguousarray(np.rot90(coffee)), "JPEG", quality=90),  # Pillow 13: rows first
    }


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return _photos()


def _levels(a: np.ndarray, b: np.ndarray, std: float = 128.0) -> np.ndarray:
    return np.abs(a - b) * std


def test_center_views_match_pillow_on_photos(photos: dict[str, bytes]) -> None:
    card = _card()
    pre = DaliPreprocessor(card, device="cpu", max_batch=4)  # 6 photos: two runs, the second one short
    ref = Preprocessor(card, reduced_decode=False)
    items = [pre.plan(d) for d in photos.values()]
    assert all(it.route == "" for it in items), [it.route for it in items]
    assert items[1].size == (300, 451)  # EXIF 6: upright size from the header
    got = pre.tensors(items)
    want = np.concatenate([ref(d) for d in photos.values()])
    diff = _levels(got, want)
    per_image = dict(zip(photos, diff.reshape(len(diff), -1).max(axis=1)))
    assert max(per_image.values()) <= TOLERANCE_LEVELS, per_image
    assert diff.mean() <= MEAN_LEVELS
    # the same images through the tiny model: every top-1 agrees
    clf = Classifier(make_tiny_onnx(), card, RuntimeOptions(provider="cpu", intra_op_threads=1))
    result = pre.logits(clf, items)
    assert result.device_images == len(items) and result.host_images == result.fallbacks == 0
    np.testing.assert_array_equal(np.argmax(np.stack(result.logits), 1), np.argmax(clf.logits(want), 1))
    # IO binding from DALI's output gives what the plain run gives on the copied tensor
    np.testing.assert_allclose(np.stack(result.logits), clf.logits(got), rtol=0, atol=1e-5)


@pytest.mark.parametrize("interpolation", ["bilinear", "lanczos"])
def test_other_filters_match_pillow(photos: dict[str, bytes], interpolation: str) -> None:
    card = _card(interpolation=interpolation, train_resolution=160)
    pre = DaliPreprocessor(card, device="cpu")
    data = [photos["coffee"], photos["coffee-portrait"], photos["camera-grey"]]
    got = pre.tensors([pre.plan(d) for d in data])
    want = np.concatenate([Preprocessor(card, reduced_decode=False)(d) for d in data])
    assert _levels(got, want).max() <= TOLERANCE_LEVELS


@pytest.mark.parametrize("name, move", [
    ("shift leaving the image", lambda b, R: shift_box(b, 60, -45, R)),
    ("half-pixel shift", lambda b, R: shift_box(b, -0.5, 0.25, R)),
    ("zoom out (mean-colour border)", lambda b, R: zoom_box(b, 0.5)),
    ("zoom in (upsampling)", lambda b, R: zoom_box(b, 2.0)),
    ("box wholly outside", lambda b, R: Box(-900.0, -900.0, -500.0, -500.0)),
])
def test_shifted_and_zoomed_boxes_match_render(photos: dict[str, bytes], name: str, move) -> None:
    """The robustness protocols' boxes, including ones that leave the image (padded with the mean)."""
    card = _card()
    pre = DaliPreprocessor(card, device="cpu")
    ref = Preprocessor(card, reduced_decode=False)
    item = pre.plan(photos["coffee"])
    box = move(item.box, card.resolution)
    img = ref.decode(photos["coffee"])
    want = ref.tensor(img, box)
    got = pre.tensor(item, box)
    assert _levels(got, want).max() <= TOLERANCE_LEVELS, name
    # the scorer's twin: views of pixels already decoded
    assert _levels(pre.render([img], [box], card.resolution)[0], want).max() <= TOLERANCE_LEVELS, name


def test_bgr_card_and_object_policy(photos: dict[str, bytes]) -> None:
    card = _card(channel_order="BGR", mean=(103.5, 116.3, 123.7), std=(57.4, 57.1, 58.4))
    pre = DaliPreprocessor(card, device="cpu")
    want = Preprocessor(card, reduced_decode=False)(photos["astronaut"])
    assert _levels(pre(photos["astronaut"]), want, 57.0).max() <= TOLERANCE_LEVELS
    # object policy: the box comes from the localiser on the host, the pixels from the device
    flat = np.full((300, 400, 3), 120, np.uint8)
    flat[100:160, 220:300] = (200, 30, 30)
    data = encode(flat, "JPEG", quality=95)
    obj = DaliPreprocessor(_card(), device="cpu", policy="object")
    cpu = Preprocessor(_card(), policy="object", reduced_decode=False)
    item = obj.plan(data)
    assert item.box == cpu.box(cpu.decode(data)) != center_box(400, 300, 224, 0.875)
    assert _levels(obj.tensor(item), cpu(data)[0]).max() <= TOLERANCE_LEVELS


def test_the_scorers_decode_equals_pillow(photos: dict[str, bytes]) -> None:
    pre = DaliPreprocessor(_card(), device="cpu")
    for name in ("chelsea-exif6", "camera-grey", "rocket-progressive"):
        ours = pre.decode(photos[name])
        want = Preprocessor(_card(), reduced_decode=False).decode(photos[name])
        assert ours.size == want.size and ours.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(want))  # the decoders agree bit for bit


# ------------------------------------------------------------------ routing
def _alpha_png() -> bytes:
    rgba = np.zeros((90, 120, 4), np.uint8)
    rgba[..., 0] = 250
    rgba[20:70, 30:90, 3] = 255  # opaque red square on a transparent field
    return encode(Image.fromarray(rgba, "RGBA"), "PNG")


def _gif() -> bytes:
    frames = [Image.new("P", (80, 60), i) for i in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    return buf.getvalue()


@pytest.mark.parametrize("kind, make, reason", [
    ("png-alpha", _alpha_png, "format PNG"),
    ("gif", _gif, "format GIF"),
    ("cmyk-jpeg", lambda: encode(Image.new("CMYK", (64, 48), (10, 200, 30, 5)), "JPEG"), "JPEG mode CMYK"),
])
def test_formats_the_device_does_not_take_use_the_cpu_path(kind: str, make, reason: str) -> None:
    card = _card(train_resolution=32)
    data = make()
    pre = DaliPreprocessor(card, device="cpu")
    item = pre.plan(data)
    assert item.route == dali_route(read_header(data)) == reason
    cpu = Preprocessor(card)
    np.testing.assert_array_equal(item.tensor, cpu(data)[0])  # exactly the CPU path (alpha on the mean colour)
    clf = Classifier(make_tiny_onnx(), card, RuntimeOptions(provider="cpu", intra_op_threads=1))
    good = pre.plan(encode(np.full((40, 50, 3), 90, np.uint8), "JPEG"))
    result = pre.logits(clf, [good, item, good])
    assert (result.device_images, result.host_images, result.fallbacks) == (2, 1, 0)
    np.testing.assert_allclose(result.logits[1], clf.logits(cpu(data))[0], rtol=1e-6, atol=1e-6)


def test_a_corrupt_jpeg_mid_batch_fails_alone(photos: dict[str, bytes]) -> None:
    card = _card(train_resolution=64)
    pre = DaliPreprocessor(card, device="cpu")
    clf = Classifier(make_tiny_onnx(), card, RuntimeOptions(provider="cpu", intra_op_threads=1))
    good = [pre.plan(photos["coffee"]), pre.plan(photos["astronaut"])]
    truncated = photos["coffee"][: len(photos["coffee"]) // 2]
    bad = pre.plan(truncated)  # the header is fine: only decoding finds the damage
    result = pre.logits(clf, [good[0], bad, good[1]])
    assert isinstance(result.logits[1], UnsupportedImage) and "truncated" in str(result.logits[1])
    assert result.fallbacks == 3 and result.device_images == 0 and pre.failures == 1
    cpu = np.concatenate([Preprocessor(card)(d) for d in (photos["coffee"], photos["astronaut"])])
    np.testing.assert_allclose(np.stack([result.logits[0], result.logits[2]]), clf.logits(cpu), rtol=1e-5, atol=1e-5)
    # the pipeline was dropped and is rebuilt: the next batch runs on the device again
    again = pre.logits(clf, good)
    assert again.device_images == 2 and again.fallbacks == 0 and pre.failures == 1
    with pytest.raises(UnsupportedImage):
        pre.tensors([bad])


def test_refused_images_fail_like_the_cpu_path(photos: dict[str, bytes]) -> None:
    pre = DaliPreprocessor(_card(), device="cpu", max_pixels=10_000)
    with pytest.raises(UnsupportedImage):
        pre.plan(b"\x89PNG but not really")
    with pytest.raises(UnsupportedImage):
        pre.plan(b"")
    with pytest.raises(ImageTooLarge):
        pre.plan(photos["coffee"])
    with pytest.raises(UnsupportedImage, match="TIFF"):
        pre.plan(encode(np.zeros((8, 8, 3), np.uint8), "TIFF"))


def test_options_are_checked() -> None:
    with pytest.raises(DeviceUnavailable, match="nearest"):
        DaliPreprocessor(_card(interpolation="nearest"), device="cpu")
    with pytest.raises(ValueError, match="device"):
        DaliPreprocessor(_card(), device="tpu")
    with pytest.raises(DeviceUnavailable, match="nearest"):
        window(Box(0, 0, 10, 10), 20, 20, 8, "nearest")


def test_window_covers_the_filter_and_stops_at_the_canvas() -> None:
    # a 400x300 image, box leaving it on the left: the slice starts at the canvas edge (-ceil(12.5))
    win = window(Box(-12.5, 10.0, 187.5, 210.0), 400, 300, 100, "bicubic")
    assert win.anchor == (10 - 2 * 2 - 2, -13) and win.shape[1] == 188 + 4 + 2 + 13
    assert win.roi_start == (6.0, 0.5) and win.roi_end == (206.0, 200.5)


# ------------------------------------------------------------------ on a GPU
def _need_gpu() -> None:
    if dali_cuda_devices() < 1 or "CUDAExecutionProvider" not in available_providers():
        pytest.skip("no CUDA device: the GPU path needs an NVIDIA GPU, onnxruntime-gpu and DALI (pip install '.[gpu]')")


@pytest.mark.gpu
def test_gpu_matches_the_cpu_backend_and_pillow(photos: dict[str, bytes]) -> None:
    _need_gpu()
    card = _card()
    gpu = DaliPreprocessor(card, device="gpu")
    items = [gpu.plan(d) for d in photos.values()]
    got = gpu.tensors(items)
    want = np.concatenate([Preprocessor(card, reduced_decode=False)(d) for d in photos.values()])
    # nvJPEG's IDCT is not libjpeg's: a few more levels than the CPU backend, never a different picture
    assert _levels(got, want).mean() <= 1.0 and _levels(got, want).max() <= 24
    clf = Classifier(make_tiny_onnx(), card, RuntimeOptions(provider="cuda"))
    result = gpu.logits(clf, items)  # DALI's device output bound to ONNX Runtime's CUDA session
    assert result.device_images == len(items)
    np.testing.assert_allclose(np.stack(result.logits), clf.logits(got), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_gpu_corrupt_jpeg_falls_back(photos: dict[str, bytes]) -> None:
    _need_gpu()
    card = _card(train_resolution=64)
    gpu = DaliPreprocessor(card, device="gpu")
    clf = Classifier(make_tiny_onnx(), card, RuntimeOptions(provider="cuda"))
    bad = gpu.plan(photos["coffee"][: len(photos["coffee"]) // 2])
    result = gpu.logits(clf, [gpu.plan(photos["coffee"]), bad])
    assert isinstance(result.logits[1], SteadyError) and isinstance(result.logits[0], np.ndarray)
