"""Scoring data: a folder of images, optional labels, and a fingerprint that binds results to it.

Labels come from a CSV with columns ``file,class_index`` (extra columns ignored; ``file``
relative to the data folder) or, without a CSV, from ImageNet-style class folders
(``<data>/<wnid or index>/<image>``: the folder's position in the sorted folder list,
or its name when it is an integer).
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from service.core.images import HALVES, half_of, is_image_file
from service.core.errors import ScoreError

__all__ = ["Item", "Dataset", "load_dataset", "SPLITS", "select_split", "without_photos", "photos_fingerprint"]

SPLITS = ("all",) + HALVES  # all, tune, holdout


@dataclass(frozen=True)
class Item:
    """One image: its position in the sorted dataset (the seed key), path relative to the root, label."""

    index: int
    path: str
    label: int | None
    sha256: str = ""  # of the file's bytes


@dataclass(frozen=True)
class Dataset:
    root: Path
    items: tuple[Item, ...]
    fingerprint: str

    @property
    def labelled(self) -> bool:
        return all(item.label is not None for item in self.items) and bool(self.items)


def _read_labels(csv_path: Path) -> dict[str, int]:
    try:
        with open(csv_path, newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or "file" not in reader.fieldnames or "class_index" not in reader.fieldnames:
                raise ScoreError(f"labels CSV {csv_path} needs columns file,class_index; has {reader.fieldnames}")
            labels = {}
            for row in reader:
                try:
                    labels[row["file"]] = int(row["class_index"])
                except (TypeError, ValueError) as exc:
                    raise ScoreError(f"labels CSV {csv_path}: bad class_index {row.get('class_index')!r}") from exc
            return labels
    except OSError as exc:
        raise ScoreError(f"cannot read labels CSV {csv_path}: {exc}") from exc


def _fingerprint(items: tuple[Item, ...] | list[Item]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.path.encode() + b"\0" + bytes.fromhex(item.sha256) + str(item.label).encode() + b"\n")
    return digest.hexdigest()


def load_dataset(root: str | Path, labels_csv: str | Path | None = None, max_images: int | None = None) -> Dataset:
    """Sorted images under ``root`` (recursively), their labels, and a sha256 fingerprint.

    The fingerprint covers every selected file's relative path, bytes and label, so a
    robustness.json can be checked against the data it was measured on.
    """
    root = Path(root)
    if not root.is_dir():
        raise ScoreError(f"data folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if is_image_file(p))
    if max_images is not None:
        if max_images < 1:
            raise ScoreError(f"--max-images must be >= 1, got {max_images}")
        files = files[:max_images]
    if not files:
        raise ScoreError(f"no images in {root}")
    rel = [p.relative_to(root).as_posix() for p in files]
    labels: dict[str, int] = {}
    if labels_csv is not None:
        labels = _read_labels(Path(labels_csv))
    else:
        folders = sorted({Path(r).parent.as_posix() for r in rel if "/" in r})
        if folders and all("/" in r for r in rel):
            for r in rel:
                folder = Path(r).parent.as_posix()
                labels[r] = int(folder) if folder.isdigit() else folders.index(folder)
    items = []
    for i, (path, name) in enumerate(zip(files, rel)):
        label = labels.get(name)
        if labels_csv is not None and label is None:
            raise ScoreError(f"image {name} has no row in {labels_csv}")
        items.append(Item(i, name, label, hashlib.sha256(path.read_bytes()).hexdigest()))
    return Dataset(root, tuple(items), _fingerprint(items))


# ------------------------------------------------------------------ the tune / held-out split
# One split for everything fitted to photos (int8 calibration, steady tune): service.core.images.half_of.


def photos_fingerprint(items: tuple[Item, ...] | list[Item]) -> str:
    """A label-free fingerprint of some photos (relative paths and bytes): a tuning record stays
    comparable whether or not labels were given."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.path.encode() + b"\0" + item.sha256.encode() + b"\n")
    return digest.hexdigest()


def select_split(dataset: Dataset, split: str, seed: int, max_images: int | None = None) -> Dataset:
    """The ``tune`` or ``holdout`` half of ``dataset`` (``all``: every image), optionally only its
    first ``max_images``.

    Items keep their index (the per-image seed key), so a held-out image gets exactly the views it
    gets when the whole folder is scored. The fingerprint is that of the selected images.

    Raises:
        ScoreError: an unknown split name, or a half with no image.
    """
    if split not in SPLITS:
        raise ScoreError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if max_images is not None and max_images < 1:
        raise ScoreError(f"--max-images must be >= 1, got {max_images}")
    items = tuple(item for item in dataset.items if split == "all" or half_of(item.path, seed) == split)
    items = items[:max_images]
    if not items:
        raise ScoreError(f"the {split} half of {dataset.root} (seed {seed}) holds no image")
    return Dataset(dataset.root, items, _fingerprint(items))


def without_photos(dataset: Dataset, sha256: frozenset[str]) -> tuple[Dataset, int]:
    """``dataset`` without the images whose bytes' sha256 is in ``sha256`` (a quantized version's calibration
    photos, wherever they sit) and how many were left out; the fingerprint is that of the rest.

    Raises:
        ScoreError: nothing is left.
    """
    items = tuple(item for item in dataset.items if item.sha256 not in sha256)
    if not items:
        raise ScoreError(f"every image of {dataset.root} calibrated this version: score it on other photos")
    if len(items) == len(dataset.items):
        return dataset, 0
    return Dataset(dataset.root, items, _fingerprint(items)), len(dataset.items) - len(items)
