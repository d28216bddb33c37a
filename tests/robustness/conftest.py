"""Fixtures for robustness tests: a small labelled image folder made in the test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture()
def image_folder(tmp_path: Path) -> tuple[Path, Path]:
    """Six images (objects on flat and textured backgrounds, varied sizes) and a labels CSV."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    root.mkdir()
    rows = ["file,class_index,name"]
    for i in range(6):
        h, w = 48 + 6 * i, 64 + 4 * i
        if i % 2:
            arr = np.full((h, w, 3), 127, dtype=np.uint8)
            s = 16 + 2 * i
            arr[10:10 + s, 12:12 + s] = rng.integers(0, 256, (s, s, 3), dtype=np.uint8)
        else:
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"img{i}.png")
        rows.append(f"img{i}.png,{i % 10},c{i}")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return root, labels
