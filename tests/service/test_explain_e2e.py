"""``:explain`` end to end: real Ray Serve on loopback (the session's service, tests/serving.py)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import encode
from tests.serving import Service

pytestmark = pytest.mark.e2e

JPEG = {"Content-Type": "image/jpeg"}


@pytest.fixture(scope="module")
def photo() -> bytes:
    return encode(np.random.default_rng(6).integers(0, 255, (120, 160, 3), dtype=np.uint8), "JPEG", quality=90)


def explain(service: Service, body: bytes, headers: dict[str, str] | None = None, **params: object) -> httpx.Response:
    return httpx.post(f"{service.base}/v1/models/tiny:explain", content=body, headers={**JPEG, **(headers or {})},
                      params=params, timeout=60)


def test_explain_answers_json_and_png(service: Service, photo: bytes) -> None:
    r = explain(service, photo)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    doc = r.json()
    assert (doc["model"], doc["version"], doc["stage"]) == ("tiny", 1, "production")
    assert doc["grid"]["evaluations"] == 197 and np.array(doc["probability"]).shape == (14, 14)
    classified = httpx.post(f"{service.base}/v1/models/tiny:classify", content=photo, headers=JPEG).json()
    assert classified["predictions"][0]["index"] == doc["prediction"]["index"]
    again = explain(service, photo).json()  # through the batch queue, possibly batched with other traffic
    np.testing.assert_allclose(again["probability"], doc["probability"], atol=1e-5)
    png = explain(service, photo, {"Accept": "image/png"}, **{"class": 2})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["x-steady-class"] == "2"
    assert Image.open(io.BytesIO(png.content)).format == "PNG"
    multipart = httpx.post(f"{service.base}/v1/models/tiny:explain", files={"image": ("p.jpg", photo, "image/jpeg")},
                           timeout=60)
    assert multipart.status_code == 200, multipart.text
    np.testing.assert_allclose(multipart.json()["probability"], doc["probability"], atol=1e-5)


def test_tritonclient_users_reach_explain_on_the_same_address(service: Service, photo: bytes) -> None:
    """Triton has no explain verb; the V1 path answers on the address tritonclient is given, through the
    client's own connection (and its plugins, e.g. auth headers)."""
    import tritonclient.http as tc

    client = tc.InferenceServerClient(url=service.triton_url)
    try:
        response = client._post("v1/models/tiny:explain", photo, {"Content-Type": "image/jpeg"}, {"class": 1})
        assert response.status_code == 200
        doc = json.loads(response.read())
        assert doc["class"]["index"] == 1 and doc["grid"]["rows"] == 14
    finally:
        client.close()


def test_the_explain_limit_gives_503_while_classify_keeps_serving(service: Service, photo: bytes) -> None:
    # 1025 evaluations each (a 1-px square at stride 1 over the 32-px view): long enough to overlap
    url = f"{service.base}/v1/models/tiny:explain?size=1&stride=1"

    async def run() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=50)) as client:
            explains = [asyncio.ensure_future(client.post(url, content=photo, headers=JPEG)) for _ in range(8)]
            await asyncio.sleep(0.2)
            classifies = await asyncio.gather(*(client.post(f"{service.base}/v1/models/tiny:classify", content=photo,
                                                            headers=JPEG) for _ in range(6)))
            return list(await asyncio.gather(*explains)), list(classifies)

    explains, classifies = asyncio.run(run())
    codes = [r.status_code for r in explains]
    assert set(codes) <= {200, 503}, codes
    assert 1 <= codes.count(200) and codes.count(503) >= 4, codes  # 2 replicas x max_explain_inflight 1
    rejected = next(r for r in explains if r.status_code == 503)
    assert rejected.headers.get("retry-after") == "1" and "explain" in rejected.json()["error"]
    assert [r.status_code for r in classifies] == [200] * 6
    assert explain(service, photo).status_code == 200  # the slots are released


def test_explain_metrics_are_scraped(service: Service, photo: bytes) -> None:
    assert explain(service, photo).status_code == 200
    assert explain(service, photo, **{"class": 99}).status_code == 400
    wanted = {("ray_steady_explain_requests_total", "200"), ("ray_steady_explain_requests_total", "400"),
              ("ray_steady_explain_latency_seconds_bucket", None)}
    deadline = time.monotonic() + 40
    found: set[tuple[str, str | None]] = set()
    while time.monotonic() < deadline and not wanted <= found:
        for line in httpx.get(service.metrics_url, timeout=10).text.splitlines():
            name = line.split("{", 1)[0]
            if name.startswith("ray_steady_explain_") and 'model="tiny"' in line:
                code = re.search(r'code="(\d+)"', line)
                found.add((name, code.group(1) if code else None))
        time.sleep(1)
    assert wanted <= found, found
