"""Finding image files: the one list of suffixes Steady reads, the one folder walk, and the one seeded
split of a folder into a tune half and a held-out half (int8 calibration and ``steady tune`` never see
the photos their version is measured on).

Example:
    >>> IMAGE_SUFFIXES
    ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif')
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

from service.core.errors import SteadyError

__all__ = ["IMAGE_SUFFIXES", "HALVES", "is_image_file", "list_images", "half_of", "calibration_order"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")  # the formats service.core.preprocess decodes


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def list_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, and every image inside given folders (recursively, sorted).

    Raises:
        SteadyError: a path does not exist.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if is_image_file(p)))
        elif path.is_file():
            found.append(path)
        else:
            raise SteadyError(f"no such file or directory: {path}")
    return found


HALVES = ("tune", "holdout")


def half_of(name: str, seed: int) -> str:
    """``tune`` or ``holdout``: the half of a folder a photo belongs to, from its relative path.

    sha256(f"{seed}:{name}") even -> tune (the photos a derived version may be fitted on: int8
    calibration, ``steady tune``), odd -> holdout (the photos that judge it). A function of the name
    alone, so the split is the same for every command and every machine, and about half of any folder
    lands on each side.

    Example:
        >>> half_of("n01440764_tench.JPEG", 0) in HALVES
        True
    """
    return HALVES[int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest(), 16) % 2]


def calibration_order(names: Sequence[str], seed: int) -> list[str]:
    """``names`` in the seeded order calibration subsets are taken from (the first N are the subset)."""
    return sorted(names, key=lambda n: hashlib.sha256(f"calib:{seed}:{n}".encode()).hexdigest())
