"""One real Ray Serve instance per test session (the ``service`` fixture, registered in tests/conftest.py), on loopback, serving small real models.

Repository served by the session:
  tiny      v1 production
  canary    v1 production, v2 candidate (different weights) -- canary mode, fraction 0.3
  shadowed  v1 production, v2 candidate (same weights)      -- shadow mode, fraction 1.0
  rolling   v1 production (the reload test promotes v2 while traffic runs)
  ensembled v1 production, served with the knight5 shift ensemble on every answer (setting model_ensemble)
  efficientnet-lite0 v1 production, when the ``lite0_repo`` fixture can export it (torch present)

Two replicas of one CPU each: the admin reload reaches one, the other follows.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from service.core.repository import ModelRepository
from service.rundir import free_port
from service.settings import ServeSettings
from tests.conftest import make_tiny_onnx, tiny_card

ADMIN_TOKEN = "test-admin-token-0123456789"


@dataclass
class Service:
    settings: ServeSettings
    repo: ModelRepository
    base: str
    metrics_url: str
    ready_s: float
    lite0: str | None

    @property
    def triton_url(self) -> str:
        return f"127.0.0.1:{self.settings.port}"


def _build_repo(root: Path, tiny_onnx: bytes) -> ModelRepository:
    repo = ModelRepository(root)
    other = make_tiny_onnx(seed=1)
    repo.add("tiny", tiny_onnx, tiny_card())
    repo.add("canary", tiny_onnx, tiny_card())
    repo.add("canary", other, tiny_card())
    repo.set_stage("canary", "production", 1)
    repo.set_stage("canary", "candidate", 2)
    repo.add("shadowed", tiny_onnx, tiny_card())
    repo.add("shadowed", tiny_onnx, tiny_card())
    repo.set_stage("shadowed", "production", 1)
    repo.set_stage("shadowed", "candidate", 2)
    repo.add("rolling", tiny_onnx, tiny_card())
    repo.set_stage("rolling", "production", 1)
    repo.add("ensembled", tiny_onnx, tiny_card("ensembled"))
    return repo


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_onnx: bytes, request: pytest.FixtureRequest) -> Iterator[Service]:
    pytest.importorskip("ray")
    root = tmp_path_factory.mktemp("serve-repo")
    repo = _build_repo(root, tiny_onnx)
    lite0: str | None = None
    try:
        lite_repo, lite0 = request.getfixturevalue("lite0_repo")
        shutil.copytree(lite_repo.model_dir(lite0), root / lite0, ignore=shutil.ignore_patterns(".lock"))
    except (pytest.skip.Exception, pytest.FixtureLookupError):
        lite0 = None
    settings = ServeSettings.build(root, environ={}, overrides={
        "port": free_port(), "metrics_port": free_port(), "object_store_mb": 128,
        "max_body_bytes": 2 * 1024 * 1024, "max_pixels": 4_000_000, "max_inflight": 16,
        "candidate_mode": "canary", "canary_fraction": 0.3, "model_candidate_mode": {"shadowed": "shadow"},
        "model_ensemble": {"ensembled": "knight5"},
        "shadow_fraction": 1.0, "live_fraction": 0.5, "max_background": 64,
        "admin_token": ADMIN_TOKEN, "seed": 0, "decode_threads": 2,
        # two replicas, so reload propagation and metric aggregation are exercised
        "num_replicas": 2, "replica_cpus": 1.0, "ort_threads": 1,
        "max_explain_inflight": 1,  # one :explain per replica, so the explain limit can be reached
    })
    # HAProxy's stats/metrics ports are fixed by default: keep parallel Ray instances apart
    os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(free_port()))
    os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(free_port()))
    # ...and so are the fallback proxy's ports behind HAProxy (8500 / 9500)
    os.environ.setdefault("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", str(free_port()))
    os.environ.setdefault("RAY_SERVE_FALLBACK_PROXY_GRPC_PORT", str(free_port()))
    from service.runner import run_service, start_ray, stop_service

    start_ray(settings, system_config={"metrics_report_interval_ms": 1000})
    try:
        ready_s = run_service(settings)
        yield Service(settings, repo, f"http://127.0.0.1:{settings.port}",
                      f"http://127.0.0.1:{settings.metrics_port}/metrics", ready_s, lite0)
    finally:
        t0 = time.perf_counter()
        stop_service()  # serve.shutdown() only while ray.is_initialized(), bounded (HAProxy drain)
        print(f"serve shutdown took {time.perf_counter() - t0:.1f} s")
