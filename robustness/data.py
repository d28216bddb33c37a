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

__all__ = ["Item", "Dataset", "load_dataset"]


@dataclass(frozen=True)
class Item:
    """One image: its position in the sorted dataset (the seed key), path relative to the root, label."""

    index: int
    path: str
    label: int | None


@dataclass(frozen=True)
class Dataset:
    root: Path
    items: tuple[Item, ...]
    fingerprint: str
    half: str | None = None   # the half of the seeded split scored (None: every image)
    split_seed: int = 0
    excluded: int = 0         # images left out because they calibrated the version

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


def load_dataset(root: str | Path, labels_csv: str | Path | None = None, max_images: int | None = None, *,
                 half: str | None = None, split_seed: int = 0, exclude_sha256: frozenset[str] = frozenset()) -> Dataset:
    """Sorted images under ``root`` (recursively), their labels, and a sha256 fingerprint.

    The fingerprint covers every selected file's relative path, bytes and label, so a
    robustness.json can be checked against the data it was measured on. ``half`` keeps one half
    of the seeded split (:func:`service.core.images.half_of`, the split int8 calibration uses);
    images whose sha256 is in ``exclude_sha256`` (a quantized version's calibration photos) are
    left out, before ``max_images`` applies.
    """
    root = Path(root)
    if not root.is_dir():
        raise ScoreError(f"data folder {root} does not exist")
    if half is not None and half not in HALVES:
        raise ScoreError(f"half must be one of {', '.join(HALVES)}, got {half!r}")
    files = sorted(p for p in root.rglob("*") if is_image_file(p))
    if half is not None:
        files = [p for p in files if half_of(p.relative_to(root).as_posix(), split_seed) == half]
    excluded = 0
    if exclude_sha256:
        kept = [p for p in files if hashlib.sha256(p.read_bytes()).hexdigest() not in exclude_sha256]
        excluded, files = len(files) - len(kept), kept
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
    digest = hashlib.sha256()
    items = []
    for i, (path, name) in enumerate(zip(files, rel)):
        label = labels.get(name)
        if labels_csv is not None and label is None:
            raise ScoreError(f"image {name} has no row in {labels_csv}")
        digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest() + str(label).encode() + b"\n")
        items.append(Item(i, name, label))
    return Dataset(root, tuple(items), digest.hexdigest(), half, split_seed, excluded)
