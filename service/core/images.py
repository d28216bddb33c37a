"""Finding image files: the one list of suffixes Steady reads and the one folder walk.

Example:
    >>> IMAGE_SUFFIXES
    ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif')
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from service.core.errors import SteadyError

__all__ = ["IMAGE_SUFFIXES", "is_image_file", "list_images"]

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
