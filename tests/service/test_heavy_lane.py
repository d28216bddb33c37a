"""Expensive images decode in their own low-priority lane, bounded; cheap ones never wait behind them. No Ray."""

from __future__ import annotations

import asyncio
import os
import random
import threading

import numpy as np
import pytest

from service.core.errors import Overloaded
from service.core.repository import ModelRepository
from service.dataplane import HEAVY_NICE, DataPlane
from service.metrics import Metrics
from service.settings import ServeSettings
from tests.conftest import encode


def _plane(repo: ModelRepository, **overrides: object) -> DataPlane:
    settings = ServeSettings.build(repo.root, environ={}, overrides={"live_fraction": 0.0, **overrides})
    plane = DataPlane(settings, repo, Metrics("memory"), rng=random.Random(0))
    plane.load_all()
    return plane


def _png(width: int, height: int) -> bytes:
    return encode(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8), "PNG")


def test_heavy_images_take_the_low_priority_lane(tiny_repo: ModelRepository) -> None:
    plane = _plane(tiny_repo, heavy_decode_pixels=10_000)
    served = plane.route("tiny", None)
    threads: dict[str, str] = {}
    nice: list[int] = []
    process = served.pre.process

    def spy(data):  # type: ignore[no-untyped-def]
        threads[threading.current_thread().name.split("_")[0]] = "yes"
        if threading.current_thread().name.startswith("steady-heavy"):
            nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return process(data)

    served.pre.process = spy  # type: ignore[method-assign]
    small, large = _png(64, 48), _png(200, 100)  # 3,072 and 20,000 pixels
    a = asyncio.run(plane._prepare(served, small))
    b = asyncio.run(plane._prepare(served, large))
    assert a.tensor.shape == b.tensor.shape == (3, 32, 32)
    assert set(threads) == {"steady-pre", "steady-heavy"}
    assert nice == [HEAVY_NICE]


def test_waiting_heavy_images_are_bounded(tiny_repo: ModelRepository) -> None:
    plane = _plane(tiny_repo, heavy_decode_pixels=10_000, max_heavy_decodes=1)
    served = plane.route("tiny", None)
    gate = threading.Event()
    process = served.pre.process

    def slow(data):  # type: ignore[no-untyped-def]
        gate.wait(30)
        return process(data)

    served.pre.process = slow  # type: ignore[method-assign]

    async def scenario() -> None:
        first = asyncio.ensure_future(plane._prepare(served, _png(200, 100)))
        while plane.heavy_waiting == 0:
            await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="large images"):
            await plane._prepare(served, _png(200, 100))
        gate.set()
        assert (await first).tensor.shape == (3, 32, 32)
        assert plane.heavy_waiting == 0

    asyncio.run(scenario())
