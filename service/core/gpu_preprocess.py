"""GPU preprocessing with NVIDIA DALI: the contract of :mod:`service.core.preprocess`, with the pixels on the device.

The CPU path decodes with Pillow and resamples a box with one Pillow call; on a GPU the host
cannot keep up (about 4 ms of CPU per photo). This module runs the same steps as one DALI
pipeline and leaves the model input on the device for ONNX Runtime's IO binding
(:meth:`service.core.runtime.Classifier.logits_bound`):

1. **Header, box, route (host).** :func:`~service.core.preprocess.read_header` gives the format
   and the upright size without decoding a pixel (and refuses what Steady refuses, with the same
   errors). The box comes from the one implementation: :func:`~service.core.boxes.center_box` on
   the upright size; for ``object`` the localiser (:mod:`service.core.localize`) needs pixels, so
   the host decodes (reduced scale, as the CPU path does) to find the box. Images the device
   decoder does not take like Pillow (:func:`dali_route`: anything but an RGB or grey JPEG with a
   readable orientation) go through the CPU path here, on the host.
2. **Decode (device).** ``fn.decoders.image``: nvJPEG (``mixed``) on the GPU, libjpeg-turbo on DALI's
   CPU backend; EXIF orientation applied.
3. **Box to R x R (device).** ``fn.slice`` takes the box plus the filter's reach, padding outside
   the image with the card's mean colour rounded, exactly like :func:`~service.core.boxes.render`'s
   canvas. Two ``fn.resize`` passes (antialiased; bicubic = ``INTERP_CUBIC``, bilinear =
   ``INTERP_LINEAR``, lanczos = ``INTERP_LANCZOS3``) reproduce Pillow's separable resampling with
   its uint8 result between the passes, in Pillow's own pass order (Pillow 13 resamples rows first
   when the height shrinks by more than twice the width). ``nearest`` has no matching DALI filter.
4. **Normalise (device).** ``fn.crop_mirror_normalize`` to float32 CHW with the card's mean/std.

The contract: on real photos the device tensor equals ``Preprocessor(card, reduced_decode=False)``
within a few levels of 0..255 (float weights vs Pillow's fixed point; at image borders DALI
replicates the edge where Pillow renormalises its weights), and top-1 agreement with the CPU
path is >= 0.99. ``benchmarks/dali_parity.py`` measures it; the CPU path's reduced-scale JPEG
decode is a CPU-only shortcut that the device does not take (DALI has no DCT-scaled decode).

A corrupt image fails a whole DALI batch (and poisons the pipeline): the pipeline is rebuilt and
every image of that batch is redone on the host path, so only the corrupt image's request fails.
One difference remains: a JPEG whose compressed data is damaged but decodable with warnings is
refused by Pillow (400) and decoded by DALI's CPU decoder (200); nvJPEG's answer is not measured.

DALI is imported lazily: a CPU install never needs it (``pip install 'steady[gpu]'`` brings it).

Example:
    >>> pre = DaliPreprocessor(card, device="cpu")                      # doctest: +SKIP
    >>> items = [pre.plan(data) for data in jpegs]                      # doctest: +SKIP
    >>> result = pre.logits(classifier, items)                          # doctest: +SKIP
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from service.core.boxes import Box, center_box
from service.core.card import ModelCard
from service.core.errors import DeviceUnavailable, SteadyError, UnsupportedImage
from service.core.preprocess import (DEFAULT_MAX_PIXELS, Header, Preprocessor, decode, original_size, read_header,
                                     to_original)

__all__ = ["DALI_FILTERS", "Planned", "Window", "BatchResult", "DaliPreprocessor", "dali_route", "window", "dali_version",
           "warmup_jpeg"]

# card interpolation -> (DALI interpolation type, filter radius at scale 1 in pixels)
DALI_FILTERS: dict[str, tuple[str, float]] = {
    "bilinear": ("INTERP_LINEAR", 1.0),
    "bicubic": ("INTERP_CUBIC", 2.0),
    "lanczos": ("INTERP_LANCZOS3", 3.0),
}
_DEVICE_MODES = ("RGB", "L")  # JPEG modes the device decodes to Pillow's pixels (YCbCr and grey)


def dali_version() -> str | None:
    """The installed NVIDIA DALI version, or None (without importing anything else)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover - Python < 3.8
        return None
    for dist in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def _dali() -> Any:
    try:
        import nvidia.dali as dali
    except ImportError as exc:
        raise DeviceUnavailable("GPU preprocessing needs NVIDIA DALI: pip install 'steady[gpu]' "
                                f"(or 'nvidia-dali-cuda130' for its CPU backend): {exc}") from exc
    return dali


def dali_route(header: Header) -> str:
    """Why an image goes through the host (CPU) path instead of the device; "" when the device takes it.

    The device takes baseline and progressive JPEGs in YCbCr or grey with a readable EXIF orientation:
    what nvJPEG decodes on the GPU and DALI's CPU backend decodes to exactly Pillow's pixels. PNG, WebP,
    BMP and GIF (alpha is composited onto the mean colour, animations give their first frame), CMYK
    JPEGs and multi-picture (MPO) files keep Pillow's semantics on the host.
    """
    if header.format != "JPEG":
        return f"format {header.format}"
    if header.mode not in _DEVICE_MODES:
        return f"JPEG mode {header.mode}"
    if not 1 <= header.orientation <= 8:
        return "unreadable EXIF orientation"
    return ""


# --------------------------------------------------------------------- host arithmetic
@dataclass(frozen=True)
class Window:
    """What the device reads for one view: a slice of the upright image and the box inside it.

    Coordinates are (y, x) in image pixels; the slice may leave the image (filled with the mean).
    """

    anchor: tuple[int, int]
    shape: tuple[int, int]
    roi_start: tuple[float, float]
    roi_end: tuple[float, float]
    vertical_first: bool


def _pillow_major() -> int:
    import PIL

    return int(PIL.__version__.split(".")[0])


def window(box: Box, width: int, height: int, resolution: int, interpolation: str) -> Window:
    """The slice of a ``width`` x ``height`` image that resampling ``box`` to ``resolution`` reads.

    The slice is the box plus the filter's reach (radius x downscale factor, + 2 px), clipped to the
    canvas :func:`~service.core.boxes.render` builds (the image padded by the ceiling of how far the
    box leaves it), so every pixel the filter reads is an image pixel or the fill colour, as in Pillow.
    ``vertical_first`` is Pillow's pass order for that canvas (``ImagingResampleInner``).
    """
    if interpolation not in DALI_FILTERS:
        raise DeviceUnavailable(f"interpolation {interpolation!r} has no DALI filter that matches Pillow's; "
                                f"use one of {sorted(DALI_FILTERS)} or preprocess_device: cpu")
    radius = DALI_FILTERS[interpolation][1]
    x0, y0, x1, y1 = float(box.x0), float(box.y0), float(box.x1), float(box.y1)
    pad_l, pad_t = math.ceil(max(0.0, -x0)), math.ceil(max(0.0, -y0))
    pad_r, pad_b = math.ceil(max(0.0, x1 - width)), math.ceil(max(0.0, y1 - height))
    mx = math.ceil(radius * max(1.0, (x1 - x0) / resolution)) + 2
    my = math.ceil(radius * max(1.0, (y1 - y0) / resolution)) + 2
    wx0 = max(-pad_l, math.floor(x0) - mx)
    wx1 = min(width + pad_r, math.ceil(x1) + mx)
    wy0 = max(-pad_t, math.floor(y0) - my)
    wy1 = min(height + pad_b, math.ceil(y1) + my)
    canvas_w, canvas_h = width + pad_l + pad_r, height + pad_t + pad_b
    vertical_first = _pillow_major() >= 13 and (canvas_h - resolution) > 0 and \
        (canvas_h - resolution) > (canvas_w - resolution) * 2
    return Window((wy0, wx0), (wy1 - wy0, wx1 - wx0), (y0 - wy0, x0 - wx0), (y1 - wy0, x1 - wx0), vertical_first)


def _pass_inputs(win: Window, resolution: int) -> dict[str, np.ndarray]:
    """Per-sample inputs of the two resampling passes: the first resamples one axis to ``resolution``
    and keeps the other on its pixel grid (an identity), the second resamples the other axis."""
    (y0, x0), (y1, x1) = win.roi_start, win.roi_end
    h, w = win.shape
    R = float(resolution)
    if win.vertical_first:
        size1, s1, e1, s2, e2 = (R, w), (y0, 0.0), (y1, w), (0.0, x0), (R, x1)
    else:
        size1, s1, e1, s2, e2 = (h, R), (0.0, x0), (h, x1), (y0, 0.0), (y1, R)
    f = np.float32
    return {"anchor": np.asarray(win.anchor, np.int32), "shape": np.asarray(win.shape, np.int32),
            "size1": np.asarray(size1, f), "roi1_start": np.asarray(s1, f), "roi1_end": np.asarray(e1, f),
            "size2": np.asarray((R, R), f), "roi2_start": np.asarray(s2, f), "roi2_end": np.asarray(e2, f)}


# --------------------------------------------------------------------- the DALI pipeline
class _DaliFailed(Exception):
    """A DALI run failed (a corrupt image fails the whole batch)."""


class _Pipeline:
    """One DALI pipeline, built on first use and rebuilt after a failed run (a failure poisons it).

    Hold ``lock`` from :meth:`run` until the output is consumed: the next run may reuse its memory.
    """

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build
        self._pipe: Any = None
        self.lock = threading.Lock()
        self.failures = 0

    def run(self, feeds: dict[str, list[np.ndarray]]) -> Any:
        if self._pipe is None:
            self._pipe = self._build()
        try:
            for name, data in feeds.items():
                self._pipe.feed_input(name, data)
            (out,) = self._pipe.run()
            return out
        except Exception as exc:  # noqa: BLE001 - DALI raises RuntimeError/IndexError with long texts
            self._pipe = None
            self.failures += 1
            text = str(exc).strip().splitlines()
            raise _DaliFailed(text[0][:200] if text else type(exc).__name__) from exc


def _build(source: str, device: str, card: ModelCard, max_batch: int, threads: int, device_id: int) -> Any:
    """The graph. ``source``: ``encoded`` (bytes -> tensor), ``pixels`` (HWC uint8 -> tensor) or
    ``decode`` (bytes -> upright RGB HWC uint8, for the scorer's host-side planning)."""
    _dali()  # a clear error when DALI is not installed
    from nvidia.dali import fn, pipeline_def, types

    gpu = device == "gpu"
    bgr = card.channel_order == "BGR"
    fill = [float(int(round(c))) for c in card.mean]  # render() pads with the rounded mean, in RGB order
    if bgr and source != "decode":
        fill = fill[::-1]
    interp = getattr(types, DALI_FILTERS[card.interpolation][0]) if card.interpolation in DALI_FILTERS else None

    @pipeline_def(batch_size=max_batch, num_threads=threads, device_id=device_id if gpu else None,
                  prefetch_queue_depth=1, exec_dynamic=True)
    def graph() -> Any:
        def arg(name: str, dtype: Any) -> Any:
            return fn.external_source(name=name, dtype=dtype, ndim=1)

        if source == "pixels":
            img = fn.external_source(name="pixels", dtype=types.UINT8, ndim=3, layout="HWC")
        else:
            enc = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            extra = {"jpeg_fancy_upsampling": True} if gpu else {}  # the CPU decoder's chroma upsampling
            img = fn.decoders.image(enc, device="mixed" if gpu else "cpu", adjust_orientation=True,
                                    output_type=types.BGR if bgr and source == "encoded" else types.RGB, **extra)
            if source == "decode":
                return img
        win = fn.slice(img, arg("anchor", types.INT32), arg("shape", types.INT32), axis_names="HW",
                       out_of_bounds_policy="pad", fill_values=fill)
        if gpu and source == "pixels":
            win = win.gpu()  # only the window crosses to the device
        first = fn.resize(win, size=arg("size1", types.FLOAT), roi_start=arg("roi1_start", types.FLOAT),
                          roi_end=arg("roi1_end", types.FLOAT), roi_relative=False, interp_type=interp,
                          antialias=True, dtype=types.UINT8)
        second = fn.resize(first, size=arg("size2", types.FLOAT), roi_start=arg("roi2_start", types.FLOAT),
                           roi_end=arg("roi2_end", types.FLOAT), roi_relative=False, interp_type=interp,
                           antialias=True, dtype=types.UINT8)
        return fn.crop_mirror_normalize(second, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[float(m) for m in card.mean], std=[float(s) for s in card.std])

    pipe = graph()
    pipe.build()
    return pipe


# --------------------------------------------------------------------- the facade
@dataclass(frozen=True)
class Planned:
    """One image planned on the host: its bytes, header, the policy's box in the upright encoded image's
    pixels, and the route. A routed image (``route`` says why) already has its (3, R, R) host ``tensor``."""

    data: bytes = field(repr=False)
    header: Header
    box: Box
    route: str = ""
    tensor: np.ndarray | None = field(default=None, repr=False)

    @property
    def size(self) -> tuple[int, int]:
        """Upright size of the encoded image (boxes are in these pixels)."""
        return self.header.width, self.header.height


@dataclass
class BatchResult:
    """The answer of :meth:`DaliPreprocessor.logits`: one row of logits or one error per image, and timings."""

    logits: list[np.ndarray | SteadyError]
    preprocess_s: float = 0.0  # the device pipeline: decode + resample + normalise, all device images
    inference_s: float = 0.0  # ONNX Runtime, all calls of the batch
    device_images: int = 0
    host_images: int = 0  # routed to the host by their header
    fallbacks: int = 0  # redone on the host after the device batch failed


class DaliPreprocessor:
    """The card's preprocessing as a DALI pipeline on ``device`` (``gpu``, or DALI's ``cpu`` backend for
    tests and parity checks), with the CPU path (:class:`~service.core.preprocess.Preprocessor`) for what
    the device does not take.

    Args:
        card: the model card.
        policy, resolution, max_pixels: as :class:`~service.core.preprocess.Preprocessor`.
        device: ``gpu`` (nvJPEG + CUDA kernels) or ``cpu`` (DALI's CPU backend: the same graph, slower than Pillow).
        max_batch: images per pipeline run (larger inputs are cut into runs of this size).
        threads: DALI's CPU threads (CPU stages of the hybrid JPEG decoder; all work on the CPU backend).
        device_id: the CUDA device (a Ray replica sees its own GPU as 0).
    """

    def __init__(self, card: ModelCard, *, policy: str | None = None, resolution: int | None = None,
                 device: str = "gpu", max_batch: int = 64, threads: int = 2, max_pixels: int = DEFAULT_MAX_PIXELS,
                 device_id: int = 0) -> None:
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
        if max_batch < 1 or threads < 1:
            raise ValueError("max_batch and threads must be >= 1")
        if card.interpolation not in DALI_FILTERS:
            raise DeviceUnavailable(f"model {card.name}: interpolation {card.interpolation!r} has no DALI filter "
                                    f"that matches Pillow's ({sorted(DALI_FILTERS)}); use preprocess_device: cpu")
        self.card = card
        self.host = Preprocessor(card, policy=policy, resolution=resolution, max_pixels=max_pixels)
        self.device = device
        self.max_batch = int(max_batch)
        self.threads = int(threads)
        self.device_id = int(device_id)
        self._pipes: dict[str, _Pipeline] = {}
        self._lock = threading.Lock()

    @property
    def policy(self) -> str:
        return self.host.policy

    @property
    def resolution(self) -> int:
        return self.host.resolution

    def _pipe(self, source: str) -> _Pipeline:
        with self._lock:
            pipe = self._pipes.get(source)
            if pipe is None:
                pipe = self._pipes[source] = _Pipeline(
                    lambda: _build(source, self.device, self.card, self.max_batch, self.threads, self.device_id))
            return pipe

    @property
    def failures(self) -> int:
        """Failed pipeline runs so far (each drops the pipeline; the next run builds a new one)."""
        return sum(p.failures for p in self._pipes.values())

    # ----------------------------------------------------------------- host side
    def plan(self, data: bytes) -> Planned:
        """Header, box and route of one image, on the host (about 0.1 ms for ``center``).

        Raises what the CPU path raises for images Steady refuses (400 / 413). Routed images are
        preprocessed here by the CPU path; for ``object`` the host decodes to locate the object.
        """
        header = read_header(data, max_pixels=self.host.max_pixels)
        route = dali_route(header)
        if route:
            prepared = self.host.process(data)
            return Planned(data, header, to_original(prepared.box, prepared.image), route, prepared.tensor)
        if self.policy == "object":
            img = self.host.decode(data)
            return Planned(data, header, to_original(self.host.box(img), img))
        return Planned(data, header, center_box(header.width, header.height, self.resolution, self.card.crop_pct))

    def _host_tensor(self, item: Planned, box: Box | None = None) -> np.ndarray:
        """The CPU path's (3, R, R) tensor of ``box`` (default: the planned box) of an image."""
        if box is None and item.tensor is not None:
            return item.tensor
        img = self.host.decode(item.data)
        return self.host.tensor(img, _in_decoded(box if box is not None else item.box, img))

    # ----------------------------------------------------------------- device runs
    @contextmanager
    def _views(self, source: str, inputs: Sequence[np.ndarray], windows: Sequence[Window],
               resolution: int) -> Iterator[Any]:
        """Run one pipeline batch (at most ``max_batch``) and yield its output while holding the pipeline."""
        feeds: dict[str, list[np.ndarray]] = {"pixels" if source == "pixels" else "encoded": list(inputs)}
        for win in windows:
            for name, value in _pass_inputs(win, resolution).items():
                feeds.setdefault(name, []).append(value)
        pipe = self._pipe(source)
        with pipe.lock:
            yield pipe.run(feeds)

    def _windows(self, items: Sequence[Planned], boxes: Sequence[Box]) -> list[Window]:
        return [window(b, it.header.width, it.header.height, self.resolution, self.card.interpolation)
                for it, b in zip(items, boxes)]

    def logits(self, classifier: Any, items: Sequence[Planned]) -> BatchResult:
        """Logits of planned images: the device images in one DALI run per ``max_batch`` whose output goes to
        ONNX Runtime by IO binding (no host copy of the tensor), the routed ones in one host batch.

        A failed device run (a corrupt JPEG) is redone image by image on the host path, so only the
        broken image gets an error (``UnsupportedImage``). Errors of ONNX Runtime itself propagate.
        """
        result = BatchResult([None] * len(items))  # type: ignore[list-item]
        device = [i for i, it in enumerate(items) if not it.route]
        host = [i for i, it in enumerate(items) if it.route]
        result.host_images = len(host)
        for start in range(0, len(device), self.max_batch):
            chunk = device[start:start + self.max_batch]
            try:
                t0 = time.perf_counter()
                with self._views("encoded", [np.frombuffer(items[i].data, np.uint8) for i in chunk],
                                 self._windows([items[i] for i in chunk], [items[i].box for i in chunk]),
                                 self.resolution) as out:
                    t1 = time.perf_counter()
                    rows = classifier.logits_bound(out.as_tensor())
                    t2 = time.perf_counter()
            except _DaliFailed:
                host.extend(chunk)
                result.fallbacks += len(chunk)
                continue
            result.preprocess_s += t1 - t0
            result.inference_s += t2 - t1
            result.device_images += len(chunk)
            for row, i in enumerate(chunk):
                result.logits[i] = rows[row]
        tensors, rows_of = [], []
        for i in sorted(host):
            try:
                tensors.append(self._host_tensor(items[i]))
                rows_of.append(i)
            except SteadyError as exc:
                result.logits[i] = exc
        if tensors:
            t0 = time.perf_counter()
            rows = classifier.logits(np.stack(tensors))
            result.inference_s += time.perf_counter() - t0
            for row, i in enumerate(rows_of):
                result.logits[i] = rows[row]
        return result

    def tensors(self, items: Sequence[Planned], boxes: Sequence[Box | None] | None = None) -> np.ndarray:
        """(N, 3, R, R) float32 on the host: the device tensors copied back (parity checks, side traffic).

        ``boxes`` (default: each planned box) are in the upright encoded image's pixels. A failed device
        run is redone on the host path; the first image the host cannot decode raises its error.
        """
        chosen = [b if b is not None else it.box for it, b in zip(items, boxes or [None] * len(items))]
        out = np.empty((len(items), 3, self.resolution, self.resolution), np.float32)
        device = [i for i, it in enumerate(items) if not it.route]
        host = [i for i, it in enumerate(items) if it.route]
        for start in range(0, len(device), self.max_batch):
            chunk = device[start:start + self.max_batch]
            try:
                with self._views("encoded", [np.frombuffer(items[i].data, np.uint8) for i in chunk],
                                 self._windows([items[i] for i in chunk], [chosen[i] for i in chunk]),
                                 self.resolution) as res:
                    out[chunk] = _to_host(res)
            except _DaliFailed:
                host.extend(chunk)
        for i in host:
            out[i] = self._host_tensor(items[i], None if boxes is None or boxes[i] is None else chosen[i])
        return out

    def tensor(self, item: Planned, box: Box | None = None) -> np.ndarray:
        """One (3, R, R) host tensor of ``box`` (default: the planned box): the data plane's side traffic."""
        return self.tensors([item], [box])[0]

    def __call__(self, data: bytes) -> np.ndarray:
        """Bytes -> a (1, 3, R, R) float32 host tensor (like ``Preprocessor.__call__``)."""
        return self.tensors([self.plan(data)])

    # ----------------------------------------------------------------- the scorer's views
    def decode(self, data: bytes) -> Image.Image:
        """Upright RGB at full size, decoded by the device for JPEGs the device takes (the host otherwise);
        the robustness scorer plans its views on it (``steady score --preprocess-device``)."""
        header = read_header(data, max_pixels=self.host.max_pixels)
        if not dali_route(header):
            try:
                with self._views("decode", [np.frombuffer(data, np.uint8)], [], self.resolution) as out:
                    arr = np.array(out.as_cpu().at(0))
                img = Image.fromarray(arr, "RGB")
                img.info["original_size"] = img.size
                return img
            except _DaliFailed:
                pass  # the host decoder says what is wrong with it
        return decode(data, background=self.host.background, max_pixels=self.host.max_pixels)

    def render(self, images: Sequence[Image.Image | np.ndarray], boxes: Sequence[Box], resolution: int) -> np.ndarray:
        """(N, 3, R, R) float32 on the host: each box of each decoded RGB image, resampled on the device.

        The device twin of ``normalise([render(img, box, R, ...)])`` for views of images already decoded.
        """
        out = np.empty((len(images), 3, resolution, resolution), np.float32)
        bgr = self.card.channel_order == "BGR"
        for start in range(0, len(images), self.max_batch):
            idx = range(start, min(len(images), start + self.max_batch))
            arrays, windows = [], []
            for i in idx:
                arr = np.asarray(images[i], dtype=np.uint8)
                if arr.ndim != 3 or arr.shape[2] != 3:
                    raise UnsupportedImage(f"expected an RGB image, got shape {arr.shape}")
                arrays.append(np.ascontiguousarray(arr[..., ::-1] if bgr else arr))
                windows.append(window(boxes[i], arr.shape[1], arr.shape[0], resolution, self.card.interpolation))
            try:
                with self._views("pixels", arrays, windows, resolution) as res:
                    out[start:start + len(arrays)] = _to_host(res)
            except _DaliFailed as exc:  # pixels cannot be corrupt: this is a bug or a broken device
                raise SteadyError(f"DALI failed to resample decoded pixels: {exc}") from exc
        return out


def warmup_jpeg(width: int = 640, height: int = 480) -> bytes:
    """A real photo-sized JPEG (smooth gradients and noise) to warm a pipeline's buffers up with."""
    import io

    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).integers(0, 32, size=(height, width, 3))
    arr = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], axis=-1) // 2 + noise
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _to_host(out: Any) -> np.ndarray:
    return np.array(out.as_cpu().as_tensor(), dtype=np.float32)


def _in_decoded(box: Box, img: Image.Image) -> Box:
    """A box in the upright encoded image's pixels -> the pixels of ``img`` (maybe decoded at reduced scale);
    the inverse of :func:`~service.core.preprocess.to_original`."""
    ow, oh = original_size(img)
    sx, sy = img.size[0] / ow, img.size[1] / oh
    return box if (sx, sy) == (1.0, 1.0) else Box(box.x0 * sx, box.y0 * sy, box.x1 * sx, box.y1 * sy)
