"""Soak: ten minutes of mixed traffic against a private ``steady serve``; memory and file descriptors stay flat.

Traffic: REST, KServe V2 JSON and binary, and bad inputs (truncated JPEG, wrong media type, unknown model,
a pixel bomb), from four clients back to back; the candidate answers a canary share; every minute the
candidate changes (v2 <-> v3 in ``stages.json``) and ``/v1/admin/reload`` rolls it out. Every 10 s the
resident memory and open file descriptors of the whole process tree are sampled.

Passes when: no answer is a 5xx other than 503 and none is lost; every answer has the status its kind must
get (or 503); resident memory grows by less than 3 MB/min and file descriptors by less than 1/min
(least-squares slopes over the second half: the first half warms up, ~85 MB in the first minutes), and
the last minute has fewer than 16 descriptors more than the first. The report also gives each
process's own slope.

Deselected by default (marker ``soak``): ``make soak``, or ``python3 -m pytest -m soak -s``.
``STEADY_SOAK_S`` sets the length (default 600); ``STEADY_SOAK_REPORT`` names a JSON file for the figures.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import psutil
import pytest

from service.core.repository import ModelRepository
from service.launcher import ServeProcess
from tests.conftest import encode, make_tiny_onnx, tiny_card
from tests.reliability.hostile import png_with_header
from tests.reliability.traffic import Traffic, bad, rest, v2_binary, v2_json

pytestmark = [pytest.mark.soak, pytest.mark.slow, pytest.mark.e2e]

SOAK_S = float(os.environ.get("STEADY_SOAK_S", "600"))
SAMPLE_S = 10.0
RELOAD_S = 60.0
TOKEN = "soak-admin-token-4c1e9b7a"
RSS_SLOPE_MB_MIN = 3.0
FD_SLOPE_MIN = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, ModelRepository]]:
    root = tmp_path_factory.mktemp("soak")
    repo = ModelRepository(root / "repo")
    for seed in (0, 1, 2):
        repo.add("tiny", make_tiny_onnx(seed=seed), tiny_card())
    repo.set_stage("tiny", "production", 1, reason="soak")
    repo.set_stage("tiny", "candidate", 2, reason="soak")
    server = ServeProcess.start({
        "repo": str(repo.root), "app_name": "steadysoak", "object_store_mb": 96, "num_replicas": 2,
        "replica_cpus": 0.5, "ort_threads": 1, "decode_threads": 1, "candidate_mode": "canary",
        "canary_fraction": 0.3, "live_fraction": 0.05, "admin_token": TOKEN, "max_pixels": 4_000_000,
        "max_inflight": 64,
    }, root / "soak-serve.log")
    try:
        server.wait_ready(150)
        yield server, repo
    finally:
        server.stop()
        server.cleanup()


def _sample(server: ServeProcess, per_process: dict[str, list[tuple[float, float]]], t: float) -> dict[str, float]:
    rss = fds = 0
    procs = {p.pid: p for p in [*server.processes(), *server.run_processes()]}
    for proc in procs.values():
        try:
            mb = proc.memory_info().rss / 2**20
            rss += mb
            fds += proc.num_fds()
            per_process.setdefault(f"{proc.name()[:40]} ({proc.pid})", []).append((t, mb))
        except psutil.Error:
            continue
    return {"rss_mb": rss, "fds": fds, "processes": len(procs)}


def _slope_per_min(t: list[float], y: list[float]) -> float:
    return float(np.polyfit(np.asarray(t) / 60.0, np.asarray(y), 1)[0])


@pytest.mark.timeout(SOAK_S + 900)
def test_soak(server: tuple[ServeProcess, ModelRepository]) -> None:
    serve, repo = server
    rng = np.random.default_rng(9)
    photo = encode(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8), "JPEG", quality=90)
    kinds = [rest("rest", photo), v2_json("v2-json", photo), v2_binary("v2-binary", photo),
             rest("rest-png", encode(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), "PNG")),
             bad("truncated", photo[: len(photo) // 3], 400), bad("media-type", photo, 415, "text/plain"),
             bad("unknown-model", photo, 404, model="nope"), bad("pixel-bomb", png_with_header(100_000, 100_000), 413)]
    traffic = Traffic(serve.base, kinds, clients=4, timeout=60).start()
    samples: list[dict[str, float]] = []
    per_process: dict[str, list[tuple[float, float]]] = {}
    reloads: list[dict[str, Any]] = []
    began = time.monotonic()
    next_reload = began + RELOAD_S
    candidate = 2
    try:
        while (now := time.monotonic()) - began < SOAK_S:
            samples.append({"t": now - began, **_sample(serve, per_process, now - began)})
            if now >= next_reload:
                candidate = 3 if candidate == 2 else 2
                repo.set_stage("tiny", "candidate", candidate, reason="soak reload")
                r = httpx.post(f"{serve.base}/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"},
                               timeout=120)
                reloads.append({"t": round(now - began), "status": r.status_code, "candidate": candidate})
                next_reload += RELOAD_S
            time.sleep(SAMPLE_S)
        end = time.monotonic() - began
        samples.append({"t": end, **_sample(serve, per_process, end)})
    finally:
        outcomes = traffic.stop()
    # the first half warms up (allocator arenas, Ray's caches, every code path once): slopes over the second
    half = samples[-1]["t"] / 2
    steady = [s for s in samples if s["t"] >= half]
    t = [s["t"] for s in steady]
    rss_slope = _slope_per_min(t, [s["rss_mb"] for s in steady])
    fd_slope = _slope_per_min(t, [s["fds"] for s in steady])
    whole_slope = _slope_per_min([s["t"] for s in samples], [s["rss_mb"] for s in samples])
    first = [s for s in samples if s["t"] < 60.0]
    last = [s for s in samples if s["t"] >= samples[-1]["t"] - 60.0]
    growth = {}
    for name, points in per_process.items():
        late = [(x, y) for x, y in points if x >= half]
        if len(late) >= 3:
            growth[name] = {"first_mb": round(points[0][1], 1), "last_mb": round(points[-1][1], 1),
                            "second_half_mb_per_min": round(_slope_per_min([x for x, _ in late], [y for _, y in late]), 2)}
    statuses = Counter(str(o.status) for o in outcomes)
    wrong = [o for o in outcomes if not (o.status == next(k.status for k in kinds if k.name == o.kind) or o.status == 503)]
    server_errors = [o for o in outcomes if isinstance(o.status, int) and o.status >= 500 and o.status != 503]
    report = {
        "seconds": round(samples[-1]["t"]), "requests": len(outcomes),
        "requests_per_s": round(len(outcomes) / samples[-1]["t"], 1), "statuses": dict(statuses),
        "by_kind": {k.name: dict(Counter(str(o.status) for o in outcomes if o.kind == k.name)) for k in kinds},
        "reloads": reloads,
        "rss_mb": {"first_minute": round(float(np.mean([s["rss_mb"] for s in first])), 1),
                   "last_minute": round(float(np.mean([s["rss_mb"] for s in last])), 1),
                   "slope_mb_per_min": round(rss_slope, 2), "whole_run_slope_mb_per_min": round(whole_slope, 2)},
        "rss_growth_by_process": dict(sorted(growth.items(), key=lambda kv: -kv[1]["second_half_mb_per_min"])[:6]),
        "fds": {"first_minute": round(float(np.mean([s["fds"] for s in first])), 1),
                "last_minute": round(float(np.mean([s["fds"] for s in last])), 1),
                "slope_per_min": round(fd_slope, 2)},
        "processes": sorted({int(s["processes"]) for s in samples}),
        "samples": [{k: round(v, 1) for k, v in s.items()} for s in samples],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    if os.environ.get("STEADY_SOAK_REPORT"):
        Path(os.environ["STEADY_SOAK_REPORT"]).write_text(json.dumps(report, indent=1) + "\n")
    assert not server_errors, f"5xx other than 503: {server_errors[:5]}"
    assert not [o for o in outcomes if o.status == "timeout"], "requests lost (no answer within 60 s)"
    assert not wrong, f"answers with another status than their kind's: {wrong[:5]}"
    assert all(r["status"] == 200 for r in reloads) and len(reloads) >= int(SOAK_S // RELOAD_S) - 1, reloads
    assert rss_slope < RSS_SLOPE_MB_MIN, report["rss_mb"]
    assert fd_slope < FD_SLOPE_MIN, report["fds"]
    assert report["fds"]["last_minute"] < report["fds"]["first_minute"] + 16, report["fds"]

