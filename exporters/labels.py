"""Class names for exported models, in index order.

ImageNet-1k names come from the installed torchvision (its weight metadata
lists them in the standard index order, i.e. sorted WordNet ids), falling back
to timm's ImageNetInfo; nothing is downloaded.

Example:
    >>> imagenet_labels()[967]                                    # doctest: +SKIP
    'espresso'
"""

from __future__ import annotations

import os
from pathlib import Path

from service.errors import ExportError

__all__ = ["IMAGENET_CLASSES", "imagenet_labels", "read_labels_file", "resolve_labels"]

IMAGENET_CLASSES = 1000


def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order (0 tench ... 967 espresso ... 999 toilet tissue).

    Raises:
        ExportError: neither torchvision nor timm is installed.
    """
    try:
        from torchvision.models._meta import _IMAGENET_CATEGORIES

        names = tuple(str(n) for n in _IMAGENET_CATEGORIES)
    except ImportError:
        try:
            from timm.data import ImageNetInfo
        except ImportError as exc:
            raise ExportError("ImageNet class names need torchvision or timm (the 'export' extra)") from exc
        info = ImageNetInfo("imagenet-1k")
        names = tuple(info.index_to_description(i).split(",")[0].strip() for i in range(IMAGENET_CLASSES))
    if len(names) != IMAGENET_CLASSES:
        raise ExportError(f"expected {IMAGENET_CLASSES} ImageNet class names, found {len(names)}")
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
