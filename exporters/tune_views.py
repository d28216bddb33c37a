"""Training views for ``steady tune``: boxes of the tuning photos through the one preprocessing path.

A view is the card policy's box of a photo moved by whole or fractional *output* pixels
(:func:`~service.core.boxes.shift_box`) and zoomed about its centre
(:func:`~service.core.boxes.zoom_box`), resampled by :func:`~service.core.boxes.render` and
normalised by :func:`~service.core.preprocess.normalise`: exactly what the scorer's protocols and
the service do, never a separate augmentation pipeline. No torch here.

Tuning draws its views from a fixed, seeded *pool* per photo, whose teacher answers (the source
version's own ONNX model, through ONNX Runtime) are computed once.

Example:
    >>> photos = TunePhotos.load(card, dataset.root, items, resolution=224)      # doctest: +SKIP
    >>> batch = photos.render([ViewSpec(0, 1.0, -2.0, 1.05)])                     # doctest: +SKIP
    >>> batch.shape
    (1, 3, 224, 224)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from robustness.data import Item
from service.core.boxes import Box, render, shift_box, zoom_box
from service.core.card import ModelCard
from service.core.preprocess import Preprocessor, normalise

__all__ = ["ENSEMBLE_OFFSETS", "Teacher", "ViewSpec", "TunePhotos", "random_views", "onnx_teacher",
           "teacher_answers", "ensemble_answers"]

Teacher = Callable[[np.ndarray], np.ndarray]
"""Normalised (N, 3, R, R) float32 inputs -> (N, classes) softmax probabilities."""

# copies of a view in whole output pixels, the bare view first: no two copies of a view and of its
# 1-px neighbour (any of the eight directions) coincide (offsets on the lattice x + 3y = 0 mod 5)
ENSEMBLE_OFFSETS: tuple[tuple[int, int], ...] = ((0, 0), (2, 1), (-1, 2), (-2, -1), (1, -2))


@dataclass(frozen=True)
class ViewSpec:
    """Photo ``photo`` moved by (dx, dy) output pixels, then zoomed by ``zoom`` (> 1 magnifies)."""

    photo: int
    dx: float = 0.0
    dy: float = 0.0
    zoom: float = 1.0

    def moved(self, dx: float, dy: float) -> "ViewSpec":
        """The same view moved by a further (dx, dy) output pixels *of this view*."""
        return ViewSpec(self.photo, self.dx + dx / self.zoom, self.dy + dy / self.zoom, self.zoom)


@dataclass
class TunePhotos:
    """Decoded tuning photos and their policy boxes, ready to render views at ``resolution``."""

    card: ModelCard
    images: list[Image.Image]
    boxes: list[Box]
    labels: list[int | None]
    resolution: int

    @classmethod
    def load(cls, card: ModelCard, root: str | Path, items: Sequence[Item], resolution: int) -> "TunePhotos":
        """Decode ``items`` once with the card's preprocessing at ``resolution``."""
        pre = Preprocessor(card, resolution=resolution)
        images, boxes = [], []
        for item in items:
            img = pre.decode((Path(root) / item.path).read_bytes())
            images.append(img)
            boxes.append(pre.box(img))
        return cls(card, images, boxes, [item.label for item in items], resolution)

    def __len__(self) -> int:
        return len(self.images)

    def box(self, view: ViewSpec) -> Box:
        """The box of ``view``: the policy box shifted by output pixels at ``self.resolution``, then zoomed
        (as the scorer does)."""
        box = shift_box(self.boxes[view.photo], view.dx, view.dy, self.resolution)
        return zoom_box(box, view.zoom) if view.zoom != 1.0 else box

    def pixels(self, views: Sequence[ViewSpec], resolution: int | None = None) -> np.ndarray:
        """(N, r, r, 3) uint8 renders of ``views``; another ``resolution`` resamples the same boxes."""
        res = resolution or self.resolution
        out = np.empty((len(views), res, res, 3), dtype=np.uint8)
        for i, view in enumerate(views):
            out[i] = render(self.images[view.photo], self.box(view), res, self.card.interpolation,
                            tuple(self.card.mean))
        return out

    def render(self, views: Sequence[ViewSpec], resolution: int | None = None) -> np.ndarray:
        """(N, 3, r, r) float32 model inputs of ``views``, normalised per the card."""
        return normalise(self.pixels(views, resolution), self.card)


def random_views(rng: np.random.Generator, photos: Sequence[int], count: int, max_shift: float, max_zoom: float,
                 first_clean: bool = True) -> list[list[ViewSpec]]:
    """``count`` views of each photo: shifts uniform in [-max_shift, max_shift] output pixels per axis,
    zooms log-uniform in [1/max_zoom, max_zoom]; with ``first_clean`` the first view is the policy's own."""
    out = []
    for photo in photos:
        views = []
        for k in range(count):
            if k == 0 and first_clean:
                views.append(ViewSpec(int(photo)))
                continue
            dx, dy = rng.uniform(-max_shift, max_shift, size=2) if max_shift > 0 else (0.0, 0.0)
            zoom = float(np.exp(rng.uniform(-np.log(max_zoom), np.log(max_zoom)))) if max_zoom > 1 else 1.0
            views.append(ViewSpec(int(photo), float(dx), float(dy), zoom))
        out.append(views)
    return out


def onnx_teacher(onnx_bytes: bytes, card: ModelCard, threads: int = 0) -> Teacher:
    """The stored version's own ONNX model as a teacher (ONNX Runtime on the CPU; ``threads`` 0: all cores)."""
    from service.core.runtime import Classifier, RuntimeOptions, softmax

    classifier = Classifier(onnx_bytes, card, RuntimeOptions(provider="cpu", intra_op_threads=threads,
                                                             allow_spinning=threads != 1))
    return lambda batch: softmax(classifier.logits(batch).astype(np.float64)).astype(np.float32)


def teacher_answers(photos: TunePhotos, views: Sequence[ViewSpec], teacher: Teacher,
                    resolution: int | None = None, batch_size: int = 32) -> np.ndarray:
    """(N, classes) teacher probabilities of ``views`` (rendered at ``resolution``)."""
    rows = [teacher(photos.render(views[i:i + batch_size], resolution)) for i in range(0, len(views), batch_size)]
    return np.concatenate(rows).astype(np.float32)


def ensemble_answers(photos: TunePhotos, views: Sequence[ViewSpec], teacher: Teacher, margin: float,
                     batch_size: int = 32) -> tuple[np.ndarray, int]:
    """The adaptive shift ensemble's answer on each view, and on how many views it averaged copies.

    The teacher answers every view; where its margin p1 - p2 is under ``margin``, the answer is the
    mean of its softmax over the view's copies at :data:`ENSEMBLE_OFFSETS` (the view itself first).
    """
    probs = teacher_answers(photos, views, teacher, batch_size=batch_size)
    top2 = np.sort(probs, axis=1)[:, -2:]
    unsure = np.flatnonzero(top2[:, 1] - top2[:, 0] < margin)
    if len(unsure):
        copies = [views[i].moved(dx, dy) for i in unsure for dx, dy in ENSEMBLE_OFFSETS[1:]]
        extra = teacher_answers(photos, copies, teacher, batch_size=batch_size)
        extra = extra.reshape(len(unsure), len(ENSEMBLE_OFFSETS) - 1, -1)
        probs[unsure] = (probs[unsure] + extra.sum(axis=1)) / len(ENSEMBLE_OFFSETS)
    return probs, int(len(unsure))
