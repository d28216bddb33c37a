"""Graceful drain without Ray: the routes and data plane over a tiny model, and the drain control's logic."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest

from service import drain
from service.core.repository import ModelRepository
from service.dataplane import DataPlane
from service.drain import DrainControl, DrainReport
from service.metrics import Metrics
from service.routes import build_routes
from service.settings import ServeSettings
from tests.conftest import encode


def _plane(repo: ModelRepository) -> tuple[DataPlane, asyncio.Event, list[int]]:
    """A data plane whose inference waits for ``gate`` (so a request can be held in flight)."""
    settings = ServeSettings.build(repo.root, environ={}, overrides={"live_fraction": 0.0, "retry_after_s": 3})
    gate = asyncio.Event()
    calls: list[int] = []

    async def infer(served, tensor):  # type: ignore[no-untyped-def]
        calls.append(1)
        await gate.wait()
        return served.classifier.logits(tensor[None])[0]

    plane = DataPlane(settings, repo, Metrics("memory"), infer=infer, rng=random.Random(0))
    plane.load_all()
    return plane, gate, calls


def test_drain_refuses_new_requests_and_finishes_the_ones_inside(tiny_repo: ModelRepository) -> None:
    photo = encode(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8), "JPEG")

    async def scenario() -> None:
        plane, gate, calls = _plane(tiny_repo)
        app = build_routes(plane, plane.settings, plane.metrics)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            gate.set()
            expected = await client.post("/v1/models/tiny:classify", content=photo, headers={"Content-Type": "image/jpeg"})
            assert expected.status_code == 200
            gate.clear()
            inside = asyncio.ensure_future(client.post("/v1/models/tiny:classify", content=photo,
                                                       headers={"Content-Type": "image/jpeg"}))
            while len(calls) < 2:  # the held request reached inference
                await asyncio.sleep(0.01)
            assert plane.active == 1
            plane.begin_drain()
            ready = await client.get("/v2/health/ready")
            assert ready.status_code == 503 and ready.json()["ready"] is False
            assert (await client.get("/v2/models/tiny/ready")).status_code == 503
            assert (await client.get("/v2/health/live")).status_code == 200
            refused = await client.post("/v1/models/tiny:classify", content=photo, headers={"Content-Type": "image/jpeg"})
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "3"
            assert "shutting down" in refused.json()["error"]
            v2 = await client.post("/v2/models/tiny/infer", content=b"{}")
            assert v2.status_code == 503
            explain = await client.post("/v1/models/tiny:explain", content=photo, headers={"Content-Type": "image/jpeg"})
            assert explain.status_code == 503 and explain.headers["Retry-After"] == "3"
            idle = asyncio.ensure_future(plane.wait_idle(5.0))
            await asyncio.sleep(0.1)
            assert not idle.done()  # still waiting for the request inside
            gate.set()
            answer = await inside
            assert await idle == 0
            assert answer.status_code == 200 and answer.json()["predictions"] == expected.json()["predictions"]
            assert len(calls) == 2  # the refused requests never reached inference

    asyncio.run(scenario())


def test_wait_idle_gives_up_at_its_timeout(tiny_repo: ModelRepository) -> None:
    async def scenario() -> int:
        plane, _, _ = _plane(tiny_repo)
        plane.enter()  # a request that never finishes
        plane.begin_drain()
        with pytest.raises(Exception, match="shutting down"):
            plane.enter()
        return await plane.wait_idle(0.2)

    assert asyncio.run(scenario()) == 1


def test_control_expects_the_replicas_it_heard_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(drain, "POLL_S", 0.2)

    async def scenario() -> None:
        control = DrainControl()
        assert await control.wait("gone", 0.01) is None  # a replica that stops renewing its call
        waiters = [asyncio.ensure_future(control.wait(r, 5.0)) for r in ("a", "b")]
        await asyncio.sleep(0.05)
        assert await control.start(7.0) == 3  # "gone" is still inside its heartbeat window
        remaining = await asyncio.gather(*waiters)
        assert all(6.0 < r <= 7.0 for r in remaining)
        await control.drained("a", 0)
        partial = await control.wait_drained(0.2)
        assert partial == {"replicas": 3, "drained": 1, "requests_left": 0, "done": 0}
        await control.drained("b", 2)
        await asyncio.sleep(1.5)  # "gone" drops out of the window (2 * POLL_S + 1 = 1.4 s)
        assert await control.wait_drained(1.0) == {"replicas": 2, "drained": 2, "requests_left": 2, "done": 1}
        assert await control.wait("late", 5.0) is not None  # a replica asking after the start learns at once

    asyncio.run(scenario())


def test_a_replica_serve_stopped_is_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scale-down a few seconds before SIGTERM: the stopped replica said it left, the drain ends at once."""
    monkeypatch.setattr(drain, "POLL_S", 5.0)

    class Method:
        """An actor method: the call runs on in the actor even when the caller stops awaiting it."""

        def __init__(self, fn: Any) -> None:
            self.fn = fn

        def remote(self, *args: Any) -> Any:
            return asyncio.shield(asyncio.ensure_future(self.fn(*args)))

    control = DrainControl()
    calls: list[tuple[str, str]] = []

    async def leave(replica: str) -> None:
        calls.append(("leave", replica))
        await control.leave(replica)

    fake = SimpleNamespace(wait=Method(control.wait), leave=Method(leave), drained=Method(control.drained))

    async def lookup(name: str) -> Any:
        assert name == "steady-drain-steady"
        return fake

    monkeypatch.setattr(drain, "_lookup", lookup)

    async def scenario() -> dict[str, int]:
        plane = SimpleNamespace(begin_drain=lambda: None, wait_idle=lambda s: asyncio.sleep(0, result=0))
        stopped, staying = drain.DrainWatch(plane, "steady", "r1"), drain.DrainWatch(plane, "steady", "r2")
        await asyncio.sleep(0.05)  # both hold a call to the control actor
        stopped.leave()
        stopped.leave()  # Serve's __del__, then garbage collection's: told once
        await asyncio.sleep(0.05)
        assert stopped.task.cancelled()
        # its last call is still pending in the actor: the drain's start must not count it in again
        assert await control.start(5.0) == 1
        status = await control.wait_drained(2.0)
        await staying.task
        return status

    assert asyncio.run(scenario()) == {"replicas": 1, "drained": 1, "requests_left": 0, "done": 1}
    assert calls == [("leave", "r1")]


def test_report_line_names_what_happened() -> None:
    report = DrainReport(replicas=2, drained=2, requests_left=0, drain_s=0.4, stop_s=1.6, killed=["pid 1 (x)"])
    assert report.line() == ("drained 2/2 replicas in 0.4 s (0 requests left), stopped in 1.6 s; "
                             "killed 1 leftover processes")
