"""Sharding images over Ray tasks gives exactly the single-process records."""

from __future__ import annotations

from pathlib import Path

import pytest

from robustness.data import load_dataset
from robustness.protocols import ProtocolConfig
from robustness.scorer import ScoreOptions, aggregate, run_local, run_ray
from service.repository import ModelRepository


@pytest.mark.slow
def test_two_ray_workers_equal_one_process(tiny_repo: ModelRepository, image_folder: tuple[Path, Path]) -> None:
    ray = pytest.importorskip("ray")
    data, labels = image_folder
    loaded = tiny_repo.load("tiny", 1)
    ds = load_dataset(data, labels)
    cfg = ProtocolConfig(translate_frames=3, zoom_start=0.9, zoom_stop=1.1)
    local, _ = run_local(loaded.onnx_bytes, loaded.card, ds, cfg, 5, ScoreOptions(chunk_images=2))
    sharded, _ = run_ray(loaded.onnx_bytes, loaded.card, ds, cfg, 5, ScoreOptions(chunk_images=2), 2, None)
    assert not ray.is_initialized()
    assert sharded == local
    assert aggregate(sharded, loaded.card, cfg, 5, True) == aggregate(local, loaded.card, cfg, 5, True)
