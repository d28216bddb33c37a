"""The HTTP layer without Ray: Starlette's TestClient over a real data plane (tiny model)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from starlette.testclient import TestClient

from service.dataplane import DataPlane
from service.metrics import Metrics
from service.core.repository import ModelRepository
from service.routes import build_routes
from service.settings import ServeSettings
from tests.conftest import encode


def _client(repo: ModelRepository, **overrides: object) -> tuple[TestClient, Metrics]:
    settings = ServeSettings.build(repo.root, environ={}, overrides={"live_fraction": 0.0, **overrides})
    metrics = Metrics("memory")
    plane = DataPlane(settings, repo, metrics, rng=random.Random(0))
    plane.load_all()
    return TestClient(build_routes(plane, settings, metrics), raise_server_exceptions=False), metrics


@pytest.fixture()
def photo() -> bytes:
    return encode(np.random.default_rng(2).integers(0, 255, (64, 80, 3), dtype=np.uint8), "JPEG")


def test_admin_disabled_without_token(tiny_repo: ModelRepository) -> None:
    client, _ = _client(tiny_repo)
    r = client.post("/v1/admin/reload", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 403 and set(r.json()) == {"error"}


def test_admin_token_checked(tiny_repo: ModelRepository) -> None:
    client, _ = _client(tiny_repo, admin_token="a-long-enough-token")
    assert client.post("/v1/admin/reload").status_code == 401
    assert client.post("/v1/admin/reload", headers={"Authorization": "Basic a-long-enough-token"}).status_code == 401
    r = client.post("/v1/admin/reload", headers={"Authorization": "Bearer a-long-enough-token"})
    assert r.status_code == 200 and r.json()["served"] == {"tiny": {"production": 1}}


def test_errors_share_one_shape_and_are_counted(tiny_repo: ModelRepository, photo: bytes) -> None:
    client, metrics = _client(tiny_repo, max_body_bytes=1000, max_inflight=1)
    cases = [
        (client.post("/v1/models/tiny:classify", content=b"x" * 2000, headers={"Content-Type": "image/jpeg"}), 413),
        (client.post("/v1/models/tiny:classify", content=b"xx", headers={"Content-Type": "text/csv"}), 415),
        (client.post("/v1/models/tiny:classify", content=b"xx", headers={"Content-Type": "image/png"}), 400),
        (client.post("/v1/models/a..b:classify", content=b"xx", headers={"Content-Type": "image/png"}), 400),
        (client.post("/v1/models/..%2Fetc:classify", content=b"xx", headers={"Content-Type": "image/png"}), 404),
        (client.post("/v2/models/tiny/infer", content=b"[1, 2]"), 400),
        (client.get("/v2/models/tiny/versions/3"), 404),
        (client.delete("/v1/models"), 404),
    ]
    for response, status in cases:
        assert response.status_code == status, (response.status_code, response.text)
        assert set(response.json()) == {"error"}
    assert metrics.count("steady_requests", model="tiny", code="413") == 1
    assert metrics.count("steady_requests", model="tiny", code="415") == 1


def test_classify_and_v2_json(tiny_repo: ModelRepository, photo: bytes) -> None:
    client, metrics = _client(tiny_repo)
    r = client.post("/v1/models/tiny:classify?top_k=2", content=photo, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2
    assert metrics.count("steady_requests", model="tiny", version="1", stage="production", code="200") == 1
    x = np.zeros((1, 3, 16, 16), dtype=np.float32)
    r = client.post("/v2/models/tiny/infer", json={"id": "q", "inputs": [
        {"name": "input", "shape": [1, 3, 16, 16], "datatype": "FP32", "data": x.reshape(-1).tolist()}]})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["id"] == "q" and doc["model_version"] == "1" and doc["outputs"][0]["shape"] == [1, 10]
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/tiny/config").json()["input"][0]["dims"] == [3, 32, 32]


def test_serve_yaml_builds_the_application() -> None:
    pytest.importorskip("ray")
    from pathlib import Path

    import yaml

    from service.app import build_app

    root = Path(__file__).resolve().parents[2]
    (app_cfg,) = yaml.safe_load((root / "deploy" / "serve.yaml").read_text())["applications"]
    app = build_app(app_cfg["args"])
    deployment = app._bound_deployment
    assert deployment.name == "steady"
    assert deployment.max_ongoing_requests == app_cfg["args"]["max_ongoing_requests"]
    assert deployment.ray_actor_options["num_cpus"] == app_cfg["args"]["replica_cpus"]
