"""Why an answer flips: occlusion sensitivity maps (Zeiler & Fergus, ECCV 2014).

Zeiler & Fergus slide a grey square over the image and plot, for every position of the
square, the probability of the class of interest and the most probable class. Where the
probability drops most is where the model's evidence lies: on the object or in the background.

Here the square is painted over the *served view* (the policy's box of the photo, resampled to
the served resolution by :mod:`service.core.preprocess`, the one preprocessing path), in the
card's mean colour (the colour that normalises to zero, the paper's grey), so what is explained is
exactly what the service classifies. The square's side and stride are in input pixels; the
defaults are 32 px at stride 16 for a 224-px input (13 x 13 = 169 positions, plus the unoccluded
view: 170 evaluations), scaled to the test resolution (:meth:`OcclusionConfig.grid`). Positions
are batched through ONNX Runtime; the result is deterministic (no randomness; the same batches
give bit-identical maps).

:func:`explain_flips` is the report step: it finds, for each photo, a 1-px pair of the served
policy whose answers disagree (the pan protocol's diagonal pairs, as ``pan.p_change`` counts
them), maps both views for both competing classes, and says whether the evidence for the answer
lies outside the located object (or, when no object stands out, outside the central crop).

Example:
    >>> grid = OcclusionConfig().grid(224)
    >>> (grid.rows, grid.cols, grid.size, grid.stride, grid.evaluations)
    (13, 13, 32, 16, 170)
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from service.core.boxes import Box, center_box, shift_box
from service.core.localize import locate, object_box
from service.core.preprocess import Preprocessor
from service.core.runtime import Classifier, softmax

__all__ = [
    "PAPER_RESOLUTION",
    "PAPER_SIZE",
    "PAPER_STRIDE",
    "MAX_CELLS",
    "CENTRAL_FRACTION",
    "OcclusionConfig",
    "Grid",
    "OcclusionMap",
    "occluded",
    "assemble",
    "occlusion_map",
    "describe",
    "overlay",
    "top1_overlay",
    "png_bytes",
    "scaled",
    "moved_box",
    "evidence_outside",
    "FlipExplanation",
    "FlipReport",
    "explain_flips",
]

PAPER_RESOLUTION = 224  # the defaults below are for this input side and scale with the test resolution
PAPER_SIZE = 32
PAPER_STRIDE = 16
MAX_CELLS = 1024  # positions per map (a 32 x 32 grid): bounds the cost of one explanation
CENTRAL_FRACTION = 0.5  # the central crop: the centred square of half the view's side (a quarter of its area)


@dataclass(frozen=True)
class Grid:
    """Where the square goes: ``rows x cols`` positions, ``stride`` apart, the first at ``origin``.

    Cell (r, c) covers input pixels ``[origin + c*stride, +size) x [origin + r*stride, +size)``.
    """

    resolution: int
    size: int
    stride: int
    rows: int
    cols: int
    origin: int

    @property
    def cells(self) -> int:
        return self.rows * self.cols

    @property
    def evaluations(self) -> int:
        """Model evaluations of one map: every position plus the unoccluded view."""
        return self.cells + 1

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the square at cell (row, col), in input pixels."""
        x0 = self.origin + col * self.stride
        y0 = self.origin + row * self.stride
        return x0, y0, x0 + self.size, y0 + self.size

    def to_dict(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "size": self.size, "stride": self.stride, "rows": self.rows,
                "cols": self.cols, "origin": [self.origin, self.origin], "evaluations": self.evaluations}


@dataclass(frozen=True)
class OcclusionConfig:
    """The square's side and stride in input pixels (None: the paper-scale defaults for the resolution).

    Attributes:
        size: side of the square (default ``round(32 * R / 224)``, at least 1).
        stride: step between positions (default ``round(16 * R / 224)``, at least 1).
        batch_size: occluded views per ONNX Runtime call.
    """

    size: int | None = None
    stride: int | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("size", "stride"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"occlusion {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"occlusion batch_size must be an integer >= 1, got {self.batch_size!r}")

    def grid(self, resolution: int) -> Grid:
        """The positions for a ``resolution``-px input; the grid is centred when the stride does not divide evenly."""
        size = self.size if self.size is not None else max(1, round(PAPER_SIZE * resolution / PAPER_RESOLUTION))
        stride = self.stride if self.stride is not None else max(1, round(PAPER_STRIDE * resolution / PAPER_RESOLUTION))
        if size > resolution:
            raise ValueError(f"occlusion size {size} is larger than the {resolution}-px input")
        if stride > resolution:
            raise ValueError(f"occlusion stride {stride} is larger than the {resolution}-px input")
        n = (resolution - size) // stride + 1
        if n * n > MAX_CELLS:
            raise ValueError(f"occlusion size {size} and stride {stride} give {n}x{n} = {n * n} positions at "
                             f"{resolution} px; at most {MAX_CELLS}")
        origin = (resolution - size - (n - 1) * stride) // 2
        return Grid(resolution, size, stride, n, n, origin)


def _fill(background: Sequence[float]) -> np.ndarray:
    return np.asarray([round(c) for c in background], dtype=np.uint8)


def occluded(pixels: np.ndarray, grid: Grid, fill: Sequence[float], cells: Iterable[int]) -> np.ndarray:
    """Copies of the (R, R, 3) uint8 view with the square painted in ``fill`` at each cell (row-major index)."""
    cells = list(cells)
    if pixels.shape != (grid.resolution, grid.resolution, 3):
        raise ValueError(f"view must be ({grid.resolution}, {grid.resolution}, 3), got {pixels.shape}")
    out = np.repeat(pixels[None], len(cells), axis=0)
    colour = _fill(fill)
    for j, cell in enumerate(cells):
        x0, y0, x1, y1 = grid.cell_box(*divmod(cell, grid.cols))
        out[j, y0:y1, x0:x1] = colour
    return out


@dataclass(frozen=True)
class OcclusionMap:
    """The paper's two maps for one view.

    Attributes:
        grid: where the square went.
        base: softmax of the unoccluded view (num_classes,).
        probs: (rows, cols, num_classes) softmax with the square at each cell.
        classes: the classes of interest (default: the unoccluded answer).
        seconds: wall time of the evaluations.
    """

    grid: Grid
    base: np.ndarray
    probs: np.ndarray
    classes: tuple[int, ...]
    seconds: float = field(default=0.0, compare=False)

    @property
    def answer(self) -> int:
        """The unoccluded view's top-1 class."""
        return int(np.argmax(self.base))

    @property
    def probability(self) -> np.ndarray:
        """(len(classes), rows, cols): the probability of each class of interest with the square at each cell."""
        return np.stack([self.probs[..., c] for c in self.classes])

    @property
    def top1(self) -> np.ndarray:
        """(rows, cols): the most probable class with the square at each cell."""
        return np.argmax(self.probs, axis=-1)

    @property
    def top1_probability(self) -> np.ndarray:
        return np.max(self.probs, axis=-1)

    def with_classes(self, classes: Sequence[int]) -> OcclusionMap:
        """The same evaluations, about other classes of interest."""
        return replace(self, classes=_checked(classes, self.base.shape[0]))

    def drop(self, k: int = 0) -> np.ndarray:
        """(rows, cols) unoccluded minus occluded probability of ``classes[k]`` (positive: the square hurt it)."""
        c = self.classes[k]
        return self.base[c] - self.probs[..., c]

    def evidence(self, k: int = 0) -> tuple[int, int]:
        """(row, col) of the square that lowers ``classes[k]`` most (the first such cell in row-major order)."""
        return divmod(int(np.argmax(self.drop(k))), self.grid.cols)


def _checked(classes: Sequence[int], num_classes: int) -> tuple[int, ...]:
    chosen = tuple(int(c) for c in classes)
    bad = [c for c in chosen if not 0 <= c < num_classes]
    if bad or not chosen:
        raise ValueError(f"class {bad[0] if bad else None} is not in [0, {num_classes})")
    return chosen


def assemble(grid: Grid, base_logits: np.ndarray, cell_logits: np.ndarray, classes: Sequence[int] | None = None,
             seconds: float = 0.0) -> OcclusionMap:
    """Build the maps from the unoccluded logits (num_classes,) and the cells' logits (cells, num_classes)."""
    if cell_logits.shape[0] != grid.cells:
        raise ValueError(f"expected logits for {grid.cells} cells, got {cell_logits.shape[0]}")
    base = softmax(np.asarray(base_logits, dtype=np.float64)[None])[0]
    probs = softmax(np.asarray(cell_logits, dtype=np.float64)).reshape(grid.rows, grid.cols, -1)
    chosen = _checked(classes if classes else (int(np.argmax(base)),), base.shape[0])
    return OcclusionMap(grid, base, probs, chosen, seconds)


def occlusion_map(classifier: Classifier, pre: Preprocessor, pixels: np.ndarray, config: OcclusionConfig = OcclusionConfig(),
                  classes: Sequence[int] | None = None) -> OcclusionMap:
    """The occlusion maps of one served view (uint8 (R, R, 3)), batched through ONNX Runtime. Blocking."""
    grid = config.grid(pre.resolution)
    t0 = time.perf_counter()
    base = classifier.logits(pre.to_tensor(pixels[None]))[0]
    rows = []
    for start in range(0, grid.cells, config.batch_size):
        cells = range(start, min(start + config.batch_size, grid.cells))
        rows.append(classifier.logits(pre.to_tensor(occluded(pixels, grid, pre.background, cells))))
    return assemble(grid, base, np.concatenate(rows), classes, time.perf_counter() - t0)


def _label(labels: Sequence[str], index: int) -> str:
    return labels[index] if 0 <= index < len(labels) else str(index)


def describe(omap: OcclusionMap, labels: Sequence[str], fill: Sequence[float]) -> dict[str, Any]:
    """The JSON document of a map (what ``:explain`` and ``steady explain --json`` return, less the model fields)."""
    answer = omap.answer
    cls = omap.classes[0]
    row, col = omap.evidence(0)
    seen = sorted({int(c) for c in np.unique(omap.top1)} | {answer, cls})
    return {
        "prediction": {"index": answer, "label": _label(labels, answer), "score": float(omap.base[answer])},
        "class": {"index": cls, "label": _label(labels, cls), "score": float(omap.base[cls])},
        "grid": dict(omap.grid.to_dict(), fill=[int(v) for v in _fill(fill)]),
        "probability": np.round(omap.probability[0], 6).tolist(),
        "top1": omap.top1.astype(int).tolist(),
        "top1_probability": np.round(omap.top1_probability, 6).tolist(),
        "labels": {str(c): _label(labels, c) for c in seen},
        "evidence": {"row": row, "col": col, "box": list(omap.grid.cell_box(row, col)),
                     "drop": round(float(omap.drop(0)[row, col]), 6)},
        "seconds": round(omap.seconds, 4),
    }


# ------------------------------------------------------------------ pictures
def _cell_index(grid: Grid) -> np.ndarray:
    """For each input pixel along one axis, the cell whose square is centred nearest to it."""
    centre0 = grid.origin + grid.size / 2.0
    idx = np.rint((np.arange(grid.resolution) + 0.5 - centre0) / grid.stride)
    return np.clip(idx, 0, grid.rows - 1).astype(int)


def _bar(height: int, colours: np.ndarray, labels: tuple[str, str]) -> np.ndarray:
    """A vertical colour bar (top = high) with its two end labels, as RGB pixels."""
    from PIL import ImageDraw

    width = max(6, height // 12)
    strip = np.repeat(colours[::-1][np.linspace(0, len(colours) - 1, height).astype(int)][:, None], width, axis=1)
    text_w = max(14, height // 5)
    canvas = Image.new("RGB", (width + 2 + text_w, height), (255, 255, 255))
    canvas.paste(Image.fromarray(strip), (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((width + 2, 0), labels[0], fill=(0, 0, 0))
    draw.text((width + 2, max(0, height - 11)), labels[1], fill=(0, 0, 0))
    return np.asarray(canvas)


def overlay(pixels: np.ndarray, values: np.ndarray, grid: Grid, *, vmin: float = 0.0, vmax: float = 1.0,
            cmap: str = "viridis", alpha: float = 0.6, scale: int = 1) -> np.ndarray:
    """The view with a (rows, cols) map blended over it and a colour bar on the right (RGB uint8).

    Each input pixel shows the value of the position whose square is centred nearest to it.
    """
    import matplotlib

    colours = (np.asarray(matplotlib.colormaps[cmap](np.linspace(0, 1, 256)))[:, :3] * 255).astype(np.uint8)
    idx = _cell_index(grid)
    norm = np.clip((np.asarray(values, dtype=np.float64) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    heat = colours[np.rint(norm * 255).astype(int)][idx[:, None], idx[None, :]]
    blended = np.rint((1 - alpha) * pixels.astype(np.float64) + alpha * heat).astype(np.uint8)
    return _with_bar(blended, colours, (f"{vmax:g}", f"{vmin:g}"), scale)


def top1_overlay(pixels: np.ndarray, omap: OcclusionMap, classes: Sequence[int], *, alpha: float = 0.6,
                 scale: int = 1) -> np.ndarray:
    """The paper's second map: the most probable class at each position, ``classes[0]`` blue, ``classes[1]``
    orange, any other class grey."""
    palette = np.array([[31, 119, 180], [255, 127, 14], [150, 150, 150]], dtype=np.uint8)
    codes = np.full(omap.top1.shape, 2)
    for k, c in reversed(list(enumerate(classes[:2]))):
        codes[omap.top1 == c] = k
    idx = _cell_index(omap.grid)
    heat = palette[codes][idx[:, None], idx[None, :]]
    blended = np.rint((1 - alpha) * pixels.astype(np.float64) + alpha * heat).astype(np.uint8)
    return scaled(blended, scale)


def scaled(pixels: np.ndarray, scale: int) -> np.ndarray:
    """Enlarge RGB pixels ``scale`` times (nearest neighbour: each input pixel stays a visible square)."""
    if scale == 1:
        return pixels
    img = Image.fromarray(pixels)
    return np.asarray(img.resize((img.size[0] * scale, img.size[1] * scale), Image.Resampling.NEAREST))


def _with_bar(pixels: np.ndarray, colours: np.ndarray, labels: tuple[str, str], scale: int) -> np.ndarray:
    pixels = scaled(pixels, scale)
    bar = _bar(pixels.shape[0], colours, labels)
    gap = np.full((pixels.shape[0], 3, 3), 255, dtype=np.uint8)
    return np.concatenate([pixels, gap, bar], axis=1)


def png_bytes(pixels: np.ndarray) -> bytes:
    """RGB uint8 pixels -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------ flips and their evidence
def moved_box(pre: Preprocessor, img: Image.Image, dx: float, dy: float) -> Box:
    """The served policy's box after the camera moved by (dx, dy) output pixels, as the pan protocol moves it:
    ``center`` shifts its box; ``object`` runs the localiser again on the shifted frame."""
    w, h = img.size
    base = center_box(w, h, pre.resolution, pre.card.crop_pct)
    if pre.policy == "center":
        return shift_box(base, dx, dy, pre.resolution)
    px = base.width / pre.resolution
    frame = Box(dx * px, dy * px, w + dx * px, h + dy * px)
    return object_box(img, crop_pct=pre.card.crop_pct, background=pre.background, frame=frame,
                      resolution=pre.resolution)


def evidence_outside(pixels: np.ndarray, omap: OcclusionMap, k: int = 0) -> tuple[bool, str, tuple[float, ...]]:
    """Whether the square that lowers ``classes[k]`` most is centred outside the object region of the view.

    The region is the located object's box (:func:`service.core.localize.locate` on the view: an object that
    stands out from a flat border) or, when none stands out, the central crop (the centred square of
    :data:`CENTRAL_FRACTION` of the side). Returns (outside, "object" or "central", region box).
    """
    R = omap.grid.resolution
    found = locate(pixels)
    if found is not None:
        region, kind = tuple(float(v) for v in found), "object"
    else:
        region, kind = _central_region(R), "central"
    x0, y0, x1, y1 = omap.grid.cell_box(*omap.evidence(k))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    inside = region[0] <= cx <= region[2] and region[1] <= cy <= region[3]
    return (not inside), kind, region


def _central_region(resolution: int) -> tuple[float, float, float, float]:
    half = CENTRAL_FRACTION * resolution / 2
    return (resolution / 2 - half, resolution / 2 - half, resolution / 2 + half, resolution / 2 + half)


def _chance_outside(grid: Grid, region: tuple[float, ...]) -> float:
    """Share of positions whose square is centred outside ``region`` (the rate a random evidence cell would give)."""
    centres = grid.origin + grid.size / 2.0 + grid.stride * np.arange(grid.rows)
    inx = (centres >= region[0]) & (centres <= region[2])
    iny = (centres >= region[1]) & (centres <= region[3])
    return 1.0 - float(np.outer(iny, inx).mean())


@dataclass(frozen=True)
class FlipExplanation:
    """One photo's 1-px pair that disagrees, and the maps of both views for both competing classes."""

    file: str
    label: int | None
    offsets: tuple[tuple[int, int], tuple[int, int]]  # (dx, dy) of view A and view B
    flipping_pairs: int  # how many of the photo's diagonal pairs disagree
    views: tuple[np.ndarray, np.ndarray] = field(repr=False, compare=False)
    maps: tuple[OcclusionMap, OcclusionMap] = field(repr=False, compare=False)
    outside: bool = False  # view A's evidence for its own answer lies outside the object region
    region_kind: str = "central"

    @property
    def classes(self) -> tuple[int, int]:
        """(answer of view A, answer of view B): the two competing classes."""
        return self.maps[0].answer, self.maps[1].answer

    def to_dict(self, labels: Sequence[str]) -> dict[str, Any]:
        a, b = self.classes
        views = []
        for off, omap in zip(self.offsets, self.maps):
            row, col = omap.evidence(0)
            views.append({
                "offset": list(off), "answer": {"index": omap.answer, "label": _label(labels, omap.answer),
                                                 "score": float(omap.base[omap.answer])},
                "probability": {str(c): np.round(p, 4).tolist() for c, p in zip(omap.classes, omap.probability)},
                "evidence": {"row": row, "col": col, "box": list(omap.grid.cell_box(row, col))},
            })
        return {"file": self.file, "label": self.label, "classes": [a, b],
                "class_labels": [_label(labels, a), _label(labels, b)], "flipping_pairs": self.flipping_pairs,
                "evidence_outside": self.outside, "region": self.region_kind, "views": views}


@dataclass(frozen=True)
class FlipReport:
    """The report step's explanations and its summary number for one version."""

    policy: str
    resolution: int
    grid: Grid
    scanned: int  # photos whose diagonal pairs were checked
    flip_prone: int  # ... with at least one disagreeing pair
    flipping_pairs: int  # disagreeing pairs over all scanned photos (the numerator of pan.p_change)
    explained: tuple[FlipExplanation, ...]
    outside: dict[str, Any] | None  # Estimate dict: share of explained photos with evidence outside
    chance: float  # the share a uniformly random evidence cell would give (central crop)
    evaluations: int
    seconds: float
    labels: tuple[str, ...] = field(default=(), repr=False)

    def label(self, index: int) -> str:
        return _label(self.labels, index)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "occlusion sensitivity (Zeiler & Fergus 2014): the card's mean colour painted over the served view",
            "policy": self.policy, "resolution": self.resolution, "grid": self.grid.to_dict(),
            "scanned": self.scanned, "flip_prone": self.flip_prone, "flipping_pairs": self.flipping_pairs,
            "explained": len(self.explained),
            "evidence_outside": self.outside, "chance_outside_central": round(self.chance, 4),
            "central_fraction": CENTRAL_FRACTION, "evaluations": self.evaluations,
            "seconds": round(self.seconds, 2), "photos": [e.to_dict(self.labels) for e in self.explained],
        }


def explain_flips(onnx_bytes: bytes, card: Any, chosen: dict[str, Any], root: str | Path, files: Sequence[tuple[str, int | None]],
                  *, pan_offsets: Sequence[int], limit: int = 8, seed: int = 0,
                  config: OcclusionConfig = OcclusionConfig(),
                  progress: Callable[[int], None] | None = None) -> FlipReport:
    """Find the photos whose served answer flips under a 1-px diagonal move and explain the worst ``limit``.

    Every photo's diagonal pan views (offsets ``o`` and ``o + 1`` for ``o`` in ``pan_offsets``) are classified
    under the chosen policy and resolution (cost: ``len(offsets) + 1`` evaluations per photo). The photos with
    the most disagreeing pairs (ties: dataset order) are explained: both views of their first disagreeing
    pair get a map of both competing classes (2 x (grid cells + 1) evaluations per photo).

    The summary number: the share of explained photos whose evidence for view A's answer lies outside the
    object region (:func:`evidence_outside`), with a 95% bootstrap interval over photos.
    """
    from robustness.stats import ratio_estimate
    from service.core.runtime import RuntimeOptions

    classifier = Classifier(onnx_bytes, card, RuntimeOptions(provider="cpu"))
    pre = Preprocessor(card, policy=chosen["policy"], resolution=int(chosen["resolution"]))
    grid = config.grid(pre.resolution)
    offs = sorted(set(pan_offsets) | {o + 1 for o in pan_offsets})
    t0 = time.perf_counter()
    evaluations = 0
    prone: list[tuple[int, int, str, int | None, int]] = []  # (-pairs, order, file, label, first flipping offset)
    for order, (name, label) in enumerate(files):
        img = pre.decode((Path(root) / name).read_bytes())
        pixels = np.stack([pre.view(img, moved_box(pre, img, o, o)).pixels for o in offs])
        top1 = dict(zip(offs, np.argmax(classifier.logits(pre.to_tensor(pixels)), axis=1).tolist()))
        evaluations += len(offs)
        flips = [o for o in pan_offsets if top1[o] != top1[o + 1]]
        if flips:
            prone.append((-len(flips), order, name, label, flips[0]))
        if progress is not None:
            progress(1)
    explained: list[FlipExplanation] = []
    for neg_pairs, _, name, label, o in sorted(prone)[:max(0, limit)]:
        img = pre.decode((Path(root) / name).read_bytes())
        views = [pre.view(img, moved_box(pre, img, d, d)).pixels for d in (o, o + 1)]
        first = [occlusion_map(classifier, pre, v, config) for v in views]
        maps = [m.with_classes((first[0].answer, first[1].answer)) for m in first]
        evaluations += 2 * grid.evaluations
        outside, kind, _ = evidence_outside(views[0], maps[0], 0)
        explained.append(FlipExplanation(name, label, ((o, o), (o + 1, o + 1)), -neg_pairs, (views[0], views[1]),
                                         (maps[0], maps[1]), outside, kind))
    est = ratio_estimate([float(e.outside) for e in explained], [1.0] * len(explained), seed=seed)
    chance = _chance_outside(grid, _central_region(grid.resolution))
    return FlipReport(pre.policy, pre.resolution, grid, len(files), len(prone), -sum(p[0] for p in prone),
                      tuple(explained), None if est is None else est.to_dict(), chance, evaluations,
                      time.perf_counter() - t0, tuple(card.labels))
