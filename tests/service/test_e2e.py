"""End to end: real Ray Serve on loopback (one instance per session, see conftest.py)."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import encode, make_tiny_onnx, tiny_card
from tests.serving import ADMIN_TOKEN, Service

pytestmark = pytest.mark.e2e

JPEG = {"Content-Type": "image/jpeg"}


@pytest.fixture(scope="module")
def photo() -> bytes:
    rng = np.random.default_rng(3)
    return encode(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), "JPEG", quality=90)


def classify(service: Service, model: str, body: bytes, headers: dict[str, str] | None = None,
             **params: Any) -> httpx.Response:
    return httpx.post(f"{service.base}/v1/models/{model}:classify", content=body,
                      headers=JPEG if headers is None else headers, params=params, timeout=30)


# ------------------------------------------------------------------ REST
def test_ready_and_listing(service: Service) -> None:
    assert service.ready_s < 60
    assert httpx.get(f"{service.base}/v2/health/ready").status_code == 200
    listing = httpx.get(f"{service.base}/v1/models").json()["models"]
    names = {m["name"]: m for m in listing}
    assert {"tiny", "canary", "shadowed", "rolling"} <= set(names)
    stages = {v["stage"]: v["version"] for v in names["canary"]["versions"]}
    assert stages == {"production": 1, "candidate": 2}
    assert all("robustness" in v and "sha256" in v for m in listing for v in m["versions"])


def test_classify_raw_and_multipart(service: Service, photo: bytes) -> None:
    r = classify(service, "tiny", photo, top_k=3)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (doc["model"], doc["version"], doc["stage"]) == ("tiny", 1, "production")
    assert len(doc["predictions"]) == 3 and set(doc["predictions"][0]) == {"index", "label", "score"}
    assert doc["preprocess"]["policy"] == "center" and doc["preprocess"]["resolution"] == 32
    assert len(doc["preprocess"]["box"]) == 4
    m = httpx.post(f"{service.base}/v1/models/tiny:classify", files={"image": ("p.jpg", photo, "image/jpeg")},
                   params={"top_k": 3})
    assert m.status_code == 200, m.text
    assert m.json()["predictions"] == doc["predictions"]
    v = classify(service, "canary", photo, version="2")
    assert (v.json()["version"], v.json()["stage"]) == (2, "candidate")


def test_lite0_coffee_is_espresso(service: Service, coffee_jpeg: bytes, lite0_repo: tuple) -> None:
    # the golden answer must never pass by omission: lite0_repo fails when the export fails, and when the
    # session's service was started without lite0 (a suite that skips the export), it is added and reloaded
    lite_repo, name = lite0_repo
    if service.lite0 is None and name not in {m["name"] for m in httpx.get(f"{service.base}/v1/models").json()["models"]}:
        import shutil

        shutil.copytree(lite_repo.model_dir(name), service.repo.root / name, ignore=shutil.ignore_patterns(".lock"))
        r = httpx.post(f"{service.base}/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=120)
        assert r.status_code == 200 and not r.json()["errors"], r.text
        # the other replica follows within its reload poll (service/deployment.py RELOAD_POLL_S) plus the load
        deadline = time.monotonic() + 120
        while not all(classify(service, name, coffee_jpeg).status_code == 200 for _ in range(4)):
            assert time.monotonic() < deadline, "the second replica never served the reloaded model"
            time.sleep(1.0)
    r = classify(service, name, coffee_jpeg, top_k=5)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["index"] == 967
    assert r.json()["preprocess"]["resolution"] == 224


# ------------------------------------------------------------------ errors
def _assert_error(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]


def test_every_error_status(service: Service, photo: bytes) -> None:
    from PIL import Image

    _assert_error(classify(service, "tiny", b"definitely not an image"), 400)
    _assert_error(classify(service, "tiny", photo[: len(photo) // 3]), 400)
    _assert_error(classify(service, "tiny", b""), 400)
    _assert_error(classify(service, "tiny", photo, top_k="x"), 400)
    _assert_error(classify(service, "nope", photo), 404)
    _assert_error(classify(service, "tiny", photo, version="9"), 404)
    _assert_error(httpx.get(f"{service.base}/v2/models/nope"), 404)
    _assert_error(httpx.get(f"{service.base}/no/such/route"), 404)
    _assert_error(classify(service, "tiny", b"\xff" * (3 * 1024 * 1024)), 413)
    bomb = encode(Image.new("RGB", (3000, 2000), (10, 20, 30)), "PNG")  # 6 MP, a few kB
    _assert_error(classify(service, "tiny", bomb, headers={"Content-Type": "image/png"}), 413)
    _assert_error(classify(service, "tiny", photo, headers={"Content-Type": "text/plain"}), 415)
    # and the replica is still fine
    assert classify(service, "tiny", photo).status_code == 200


def test_overload_gets_503_with_retry_after(service: Service) -> None:
    rng = np.random.default_rng(5)
    big = encode(rng.integers(0, 255, (900, 1200, 3), dtype=np.uint8), "JPEG", quality=95)

    async def run() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            return await asyncio.gather(*(
                client.post(f"{service.base}/v1/models/tiny:classify", content=big, headers=JPEG)
                for _ in range(160)))

    responses = asyncio.run(run())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) > 0 and codes.count(200) > 0
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers.get("retry-after") == "1"
    _assert_error(rejected, 503)
    assert classify(service, "tiny", big).status_code == 200


# ------------------------------------------------------------------ KServe V2 through tritonclient
def test_v2_tritonclient(service: Service, photo: bytes) -> None:
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(url=service.triton_url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("canary", "2")
    assert not client.is_model_ready("nope")
    meta = client.get_model_metadata("tiny")
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"image": "BYTES", "input": "FP32"}
    assert meta["outputs"][0]["shape"] == [-1, 10]
    assert client.get_model_config("tiny")["max_batch_size"] == service.settings.max_batch_size
    assert client.get_server_metadata()["name"] == "steady"

    # BYTES images, binary both ways
    other = encode(np.full((50, 70, 3), 200, dtype=np.uint8), "PNG")
    images = tc.InferInput("image", [2], "BYTES")
    images.set_data_from_numpy(np.array([photo, other], dtype=np.object_), binary_data=True)
    result = client.infer("tiny", [images], outputs=[tc.InferRequestedOutput("logits", binary_data=True)])
    logits = result.as_numpy("logits")
    assert logits.shape == (2, 10) and logits.dtype == np.float32
    rest = classify(service, "tiny", photo, top_k=1).json()
    assert int(np.argmax(logits[0])) == rest["predictions"][0]["index"]
    assert result.get_response()["model_version"] == "1"

    # FP32 preprocessed input, JSON both ways, must equal the BYTES path on the same pixels
    from service.core.preprocess import Preprocessor

    card = service.repo.card("tiny", 1)
    x = Preprocessor(card)(photo)
    fp32 = tc.InferInput("input", list(x.shape), "FP32")
    fp32.set_data_from_numpy(x, binary_data=False)
    result = client.infer("tiny", [fp32], outputs=[tc.InferRequestedOutput("logits", binary_data=False)],
                          model_version="1")
    np.testing.assert_allclose(result.as_numpy("logits")[0], logits[0], rtol=1e-4, atol=1e-4)

    # FP32 binary in, classification extension out
    fp32.set_data_from_numpy(x, binary_data=True)
    result = client.infer("tiny", [fp32], outputs=[tc.InferRequestedOutput("logits", binary_data=False, class_count=3)])
    top = result.as_numpy("logits").reshape(-1)
    assert len(top) == 3
    score, index, label = (top[0].decode() if isinstance(top[0], bytes) else str(top[0])).split(":")
    assert int(index) == rest["predictions"][0]["index"] and label == f"class_{index}"
    assert float(score) == pytest.approx(rest["predictions"][0]["score"], abs=1e-4)

    # errors come back as InferenceServerException with the server's message
    bad = tc.InferInput("input", [1, 3, 32, 32], "FP32")
    bad.set_data_from_numpy(np.full((1, 3, 32, 32), np.nan, dtype=np.float32))
    with pytest.raises(InferenceServerException, match="NaN"):
        client.infer("tiny", [bad])
    with pytest.raises(InferenceServerException, match="not served"):
        client.infer("nope", [fp32])


def test_v2_lying_header_length(service: Service) -> None:
    r = httpx.post(f"{service.base}/v2/models/tiny/infer", content=b'{"inputs": []}',
                   headers={"Inference-Header-Content-Length": "999"})
    _assert_error(r, 400)


# ------------------------------------------------------------------ versions
def test_canary_split_within_tolerance(service: Service, photo: bytes) -> None:
    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=30) as client:
            sem = asyncio.Semaphore(8)

            async def one() -> dict[str, Any]:
                async with sem:
                    r = await client.post(f"{service.base}/v1/models/canary:classify", content=photo, headers=JPEG)
                    assert r.status_code == 200, r.text
                    return r.json()

            return await asyncio.gather(*(one() for _ in range(400)))

    docs = asyncio.run(run())
    answered = [(d["version"], d["stage"]) for d in docs]
    assert set(answered) == {(1, "production"), (2, "candidate")}
    share = sum(1 for v, _ in answered if v == 2) / len(answered)
    assert abs(share - 0.3) < 0.08, share  # binomial sd 0.023 at n=400


def test_reload_with_traffic_has_zero_failures(service: Service, photo: bytes) -> None:
    repo = service.repo
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    _assert_error(httpx.post(f"{service.base}/v1/admin/reload"), 401)
    _assert_error(httpx.post(f"{service.base}/v1/admin/reload", headers={"Authorization": "Bearer wrong"}), 401)

    async def run() -> tuple[list[tuple[int, int]], dict[str, Any]]:
        results: list[tuple[int, int]] = []
        stop = asyncio.Event()
        async with httpx.AsyncClient(timeout=30) as client:
            async def traffic() -> None:
                while not stop.is_set():
                    r = await client.post(f"{service.base}/v1/models/rolling:classify", content=photo, headers=JPEG)
                    results.append((r.status_code, r.json().get("version", -1) if r.status_code == 200 else -1))

            workers = [asyncio.create_task(traffic()) for _ in range(4)]
            await asyncio.sleep(0.5)
            card = repo.add("rolling", make_tiny_onnx(seed=2), tiny_card())
            repo.set_stage("rolling", "production", card.version)
            r = await client.post(f"{service.base}/v1/admin/reload", headers=headers)
            assert r.status_code == 200, r.text
            # the other replica follows within its poll interval (2 s) plus a load
            mark = len(results)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                recent = [v for _, v in results[mark:]][-20:]
                if len(recent) == 20 and set(recent) == {2}:
                    break
            stop.set()
            await asyncio.gather(*workers)
            return results, r.json()

    results, reload = asyncio.run(run())
    assert reload["served"]["rolling"]["production"] == 2 and not reload["errors"]
    assert [c for c, _ in results if c != 200] == []
    versions = [v for _, v in results]
    assert versions[0] == 1 and len(results) > 20
    assert versions[-20:] == [2] * 20  # every replica switched
    assert set(versions) == {1, 2}


# ------------------------------------------------------------------ metrics
def _scrape(service: Service) -> str:
    return httpx.get(service.metrics_url, timeout=10).text


def _value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_scraped(service: Service, photo: bytes) -> None:
    for _ in range(10):
        assert classify(service, "shadowed", photo).status_code == 200
        assert classify(service, "tiny", photo).status_code == 200
    classify(service, "tiny", b"junk")
    expected = [
        "ray_steady_requests_total", "ray_steady_request_latency_seconds_bucket", "ray_steady_preprocess_seconds_bucket",
        "ray_steady_inference_seconds_bucket", "ray_steady_batch_size_bucket", "ray_steady_queue_seconds_bucket",
        "ray_steady_live_checks_total", "ray_steady_live_flips_total", "ray_steady_shadow_checks_total",
        "ray_steady_shadow_agreements_total", "ray_steady_model_info", "ray_steady_robustness_scored",
        "ray_serve_deployment_processing_latency_ms_bucket", "ray_serve_deployment_request_counter_total",
    ]
    deadline = time.monotonic() + 40
    missing = expected
    while time.monotonic() < deadline:
        text = _scrape(service)
        names = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{", text, flags=re.M))
        missing = [n for n in expected if n not in names]
        if not missing and _value(text, "ray_steady_shadow_checks_total", model="shadowed") >= 10:
            break
        time.sleep(1)
    assert not missing, missing
    assert _value(text, "ray_steady_requests_total", model="tiny", code="200", stage="production", version="1") >= 10
    assert _value(text, "ray_steady_requests_total", model="tiny", code="400") >= 1
    checks = _value(text, "ray_steady_shadow_checks_total", model="shadowed", version="1", candidate="2")
    agreed = _value(text, "ray_steady_shadow_agreements_total", model="shadowed", version="1", candidate="2")
    assert checks >= 10 and agreed == checks  # same weights always agree
    assert _value(text, "ray_steady_live_checks_total", model="tiny", transform="shift") > 0
    # one series per replica (WorkerId label): 1 each
    assert _value(text, "ray_steady_model_info", model="canary", version="2", stage="candidate") >= 1
