"""Class names for exported models, in index order.

ImageNet-1k names are shipped with the package, in the standard index order
(sorted WordNet ids), exactly as torchvision lists them; nothing is downloaded.

Example:
    >>> imagenet_labels()[967]                                    # doctest: +SKIP
    'espresso'
"""

from __future__ import annotations

import os
from pathlib import Path

from service.core.errors import ExportError

__all__ = ["IMAGENET_CLASSES", "IMAGENET_FILE", "imagenet_labels", "read_labels_file", "resolve_labels"]

IMAGENET_CLASSES = 1000
IMAGENET_FILE = "imagenet_classes.txt"


def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order (0 tench ... 967 espresso ... 999 toilet tissue).

    Read from ``imagenet_classes.txt`` shipped with this package (a copy of
    torchvision's ``_IMAGENET_CATEGORIES``; a test keeps them equal), so the
    ``onnx:`` source needs no torch.
    """
    text = (Path(__file__).with_name(IMAGENET_FILE)).read_text(encoding="utf-8")
    names = tuple(line for line in text.splitlines() if line)
    if len(names) != IMAGENET_CLASSES:
        raise ExportError(f"expected {IMAGENET_CLASSES} ImageNet class names in {IMAGENET_FILE}, found {len(names)}")
    return names


def read_labels_file(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """One class name per line, in index order; blank lines and surrounding spaces are dropped.

    Raises:
        ExportError: the file is missing or has no names.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ExportError(f"cannot read labels file {path}: {exc}") from exc
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not names:
        raise ExportError(f"labels file {path} holds no class names")
    return names


def resolve_labels(num_classes: int, labels_file: str | os.PathLike[str] | None = None) -> tuple[str, ...]:
    """Labels for a model with ``num_classes`` outputs.

    A labels file wins; otherwise ImageNet names when there are 1000 classes,
    else ``class_<i>``.

    Raises:
        ExportError: the labels file's count does not match ``num_classes``.
    """
    if num_classes < 1:
        raise ExportError(f"a classifier needs at least one class, got {num_classes}")
    if labels_file is not None:
        names = read_labels_file(labels_file)
        if len(names) != num_classes:
            raise ExportError(f"labels file {labels_file} has {len(names)} names but the model has {num_classes} classes")
        return names
    if num_classes == IMAGENET_CLASSES:
        return imagenet_labels()
    return tuple(f"class_{i}" for i in range(num_classes))
