"""``POST /v1/models/{m}:explain`` without Ray: the data plane and the routes over the tiny model."""

from __future__ import annotations

import asyncio
import io
import random
from typing import Any

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from robustness.explain import occlusion_map
from service.catalog import ServedVersion
from service.dataplane import DataPlane
from service.metrics import Metrics
from service.core.repository import ModelRepository
from service.routes import build_routes
from service.settings import ServeSettings
from tests.conftest import encode

JPEG = {"Content-Type": "image/jpeg"}


@pytest.fixture()
def photo() -> bytes:
    return encode(np.random.default_rng(4).integers(0, 255, (60, 90, 3), dtype=np.uint8), "JPEG", quality=90)


def _plane(repo: ModelRepository, **overrides: Any) -> DataPlane:
    settings = ServeSettings.build(repo.root, environ={}, overrides={"live_fraction": 0.0, **overrides})
    plane = DataPlane(settings, repo, Metrics("memory"), rng=random.Random(0))
    plane.load_all()
    return plane


def _client(plane: DataPlane) -> TestClient:
    return TestClient(build_routes(plane, plane.settings, plane.metrics), raise_server_exceptions=False)


def test_explain_json_is_the_library_map_of_the_served_view(tiny_repo: ModelRepository, photo: bytes) -> None:
    plane = _plane(tiny_repo)
    r = _client(plane).post("/v1/models/tiny:explain", content=photo, headers=JPEG)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    doc = r.json()
    assert {"model", "version", "stage", "prediction", "class", "grid", "probability", "top1", "top1_probability",
            "labels", "evidence", "seconds", "preprocess"} == set(doc)
    assert (doc["model"], doc["version"], doc["stage"]) == ("tiny", 1, "production")
    assert doc["grid"] == {"resolution": 32, "size": 5, "stride": 2, "rows": 14, "cols": 14, "origin": [0, 0],
                           "evaluations": 197, "fill": [127, 127, 127]}
    served = plane.lookup("tiny", None)
    view = served.pre.view(served.pre.decode(photo))
    expected = occlusion_map(served.classifier, served.pre, view.pixels)
    assert doc["prediction"]["index"] == expected.answer == doc["class"]["index"]
    np.testing.assert_allclose(doc["probability"], expected.probability[0], atol=1e-5)
    assert np.array_equal(np.array(doc["top1"]), expected.top1)
    assert (doc["evidence"]["row"], doc["evidence"]["col"]) == expected.evidence()
    classified = _client(plane).post("/v1/models/tiny:classify", content=photo, headers=JPEG).json()
    assert classified["predictions"][0]["index"] == doc["prediction"]["index"]
    assert classified["preprocess"] == doc["preprocess"]
    # explain requests have their own metrics; the classify latency histogram does not see them
    m = plane.metrics
    assert m.count("steady_explain_requests", model="tiny", version="1", code="200") == 1
    assert len(m.observations("steady_explain_latency_seconds", model="tiny")) == 1
    assert m.count("steady_requests", model="tiny") == 1


def test_explain_png_multipart_and_parameters(tiny_repo: ModelRepository, photo: bytes) -> None:
    client = _client(_plane(tiny_repo))
    r = client.post("/v1/models/tiny:explain?class=3&size=8&stride=8", files={"image": ("p.jpg", photo, "image/jpeg")},
                    headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert r.headers["x-steady-class"] == "3" and r.headers["x-steady-prediction"].isdigit()
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "PNG" and img.size[1] == 32 * 7  # the 32-px view enlarged 7x, a colour bar beside it
    r = client.post("/v1/models/tiny:explain?class=3&size=8&stride=8", content=photo,
                    headers={**JPEG, "Accept": "application/json, image/png;q=0.5"})
    assert r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["class"]["index"] == 3 and doc["grid"]["rows"] == 4 and doc["grid"]["evaluations"] == 17


@pytest.mark.parametrize("query, headers, status, message", [
    ("", {"Content-Type": "text/plain"}, 415, "Content-Type"),
    ("?class=10", JPEG, 400, "class must be in [0, 10)"),
    ("?class=-1", JPEG, 400, "class must be a non-negative integer"),
    ("?size=0", JPEG, 400, "size must be an integer >= 1"),
    ("?size=40", JPEG, 400, "larger than the 32-px input"),
    ("?stride=x", JPEG, 400, "stride must be a non-negative integer"),
    ("?version=9", JPEG, 404, "does not serve version 9"),
])
def test_explain_errors(tiny_repo: ModelRepository, photo: bytes, query: str, headers: dict[str, str], status: int,
                        message: str) -> None:
    plane = _plane(tiny_repo)
    r = _client(plane).post(f"/v1/models/tiny:explain{query}", content=photo, headers=headers)
    assert r.status_code == status and set(r.json()) == {"error"} and message in r.json()["error"], r.text
    assert plane.metrics.count("steady_explain_requests", code=str(status)) == 1
    assert plane.explain_inflight == 0


def test_explain_errors_on_bodies(tiny_repo: ModelRepository) -> None:
    client = _client(_plane(tiny_repo, max_body_bytes=1000))
    assert client.post("/v1/models/tiny:explain", content=b"x" * 2000, headers=JPEG).status_code == 413
    assert client.post("/v1/models/tiny:explain", content=b"not an image", headers=JPEG).status_code == 400
    assert client.post("/v1/models/nope:explain", content=b"x", headers=JPEG).status_code == 404


def test_the_explain_limit_gives_503_while_classify_keeps_serving(tiny_repo: ModelRepository, photo: bytes) -> None:
    plane = _plane(tiny_repo, max_explain_inflight=2, max_inflight=1)
    client = _client(plane)
    plane.admit_explain()
    plane.admit_explain()  # two explanations in flight: the limit
    r = client.post("/v1/models/tiny:explain", content=photo, headers=JPEG)
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "explain" in r.json()["error"]
    assert client.post("/v1/models/tiny:classify", content=photo, headers=JPEG).status_code == 200
    assert plane.inflight == 0 and plane.explain_inflight == 2
    plane.release_explain()
    assert client.post("/v1/models/tiny:explain", content=photo, headers=JPEG).status_code == 200
    assert plane.explain_inflight == 1
    assert plane.metrics.count("steady_explain_requests", model="tiny", code="503") == 1
    assert plane.metrics.count("steady_requests", model="tiny", code="503") == 0


def test_explain_feeds_the_batch_queue_in_chunks(tiny_repo: ModelRepository, photo: bytes) -> None:
    """The occluded views go through ``infer`` (the deployment's ``@serve.batch`` method) at most
    ``max_batch_size`` at a time, so a classify request never waits behind a whole explanation."""
    pending, peak, calls = 0, 0, 0

    async def infer(served: ServedVersion, tensor: np.ndarray) -> np.ndarray:
        nonlocal pending, peak, calls
        pending += 1
        calls += 1
        peak = max(peak, pending)
        await asyncio.sleep(0)
        pending -= 1
        return served.classifier.logits(tensor[None])[0]

    settings = ServeSettings.build(tiny_repo.root, environ={}, overrides={"live_fraction": 0.0, "max_batch_size": 4})
    plane = DataPlane(settings, tiny_repo, Metrics("memory"), infer=infer)
    plane.load_all()
    _, doc, picture = asyncio.run(plane.explain("tiny", photo))
    assert picture is None and calls == doc["grid"]["evaluations"] == 197
    assert peak == 4
