"""``steady bench serve``: its statistics (unit) and its JSON shape against the session's service (e2e).

No timing asserts: the benchmark reports numbers, the tests check that they are there and sane.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from benchmarks.serve import (
    BenchOptions,
    bench_serve,
    cpu_share,
    cpu_times,
    format_report,
    latency_summary,
    make_large_photos,
    memory_of,
)
from tests.conftest import encode


def test_latency_summary_nearest_rank() -> None:
    lat = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    s = latency_summary(lat)
    assert s == {"p50_ms": 50.0, "p95_ms": 95.0, "p99_ms": 99.0, "mean_ms": 50.5}
    assert latency_summary([0.002])["p99_ms"] == 2.0
    assert latency_summary([])["p50_ms"] is None


def test_cpu_share_counts_every_process() -> None:
    before = {1: ("a", 1.0), 2: ("b", 0.0)}
    after = {1: ("a", 3.0), 2: ("b", 0.001), 3: ("c", 0.5)}  # pid 3 started during the run
    share = cpu_share(before, after, seconds=2.0)
    assert share["a"] == pytest.approx(1.0)
    assert share["c"] == pytest.approx(0.25)
    assert "b" not in share  # under 0.005 core
    assert share["total"] == pytest.approx(1.2505, abs=1e-3)


def test_memory_and_cpu_of_this_process() -> None:
    me = psutil.Process()
    mem = memory_of([me])
    assert mem["processes"] == 1
    assert 0 < mem["pss_mb"] <= mem["rss_sum_mb"]
    (name, seconds), = cpu_times([me]).values()
    assert name.startswith("python") and seconds > 0


def test_large_photos_are_12mp_jpegs(tmp_path: Path) -> None:
    src = tmp_path / "src.jpg"
    src.write_bytes(encode(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)))
    (out,) = make_large_photos([src], tmp_path / "large", 1, size=(400, 300))
    with Image.open(out) as img:
        assert (img.format, img.size) == ("JPEG", (400, 300))


def test_plain_server_answers_like_a_user_script(tiny_repo, coffee: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    """The comparison script serves the version's model with the card's resize, crop and mean/std."""
    from fastapi.testclient import TestClient

    from benchmarks.plain_server import build_app
    from service.core.preprocess import Preprocessor
    from service.core.runtime import Classifier

    card = tiny_repo.card("tiny", 1)
    client = TestClient(build_app(tiny_repo.version_dir("tiny", 1), threads=1))
    body = encode(coffee, "JPEG", quality=92)
    r = client.post("/v1/models/tiny:classify?top_k=3", content=body, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert len(preds) == 3 and preds[0]["score"] >= preds[1]["score"] >= preds[2]["score"]
    assert preds[0]["label"] == card.labels[preds[0]["index"]]
    # the same model through Steady's preprocessing (one resample of the box): the same top-1 on this photo
    loaded = tiny_repo.load("tiny", 1)
    logits = Classifier(loaded.onnx_bytes, card).logits(Preprocessor(card, policy="center")(body))
    assert preds[0]["index"] == int(np.argmax(logits[0]))
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        BenchOptions(repo="r", model="m", data="d", concurrency=(0,))
    with pytest.raises(ValueError, match="client"):
        BenchOptions(repo="r", model="m", data="d", client="ab")


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("client", ["aiohttp", "wrk"])
def test_bench_serve_json_shape(service, tmp_path: Path, client: str) -> None:  # type: ignore[no-untyped-def]
    """Both clients; with aiohttp the plain comparison server runs too, on the same version."""
    if client == "wrk" and shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    data = tmp_path / "photos"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        (data / f"p{i}.jpg").write_bytes(encode(rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)))
    opts = BenchOptions(repo=str(service.repo.root), model="tiny", data=str(data), concurrency=(1, 2),
                        duration_s=1.0, url=service.base, ceiling_s=0.2, warmup_s=0.5, client=client,
                        plain=client == "aiohttp", compare_version=1 if client == "aiohttp" else None)
    doc = bench_serve(opts, log=lambda msg: None)

    assert doc["ready_s"] is None and doc["memory"] is None  # --url: the benchmark did not start it
    assert doc["precision"] == "fp32"
    if client == "aiohttp":
        assert set(doc["vs_plain"]) == {"1", "2"}
        for run in doc["runs"]:
            assert run["plain"]["requests"] > 0 and run["plain"]["non_2xx"] == 0
            assert run["plain"]["cpu_ms_per_image"] > 0
            assert run["vs_plain"] == pytest.approx(run["images_per_s"] / run["plain"]["images_per_s"], rel=0.01, abs=1e-3)  # both rounded to 3 decimals
            assert run["compare_version"]["version"] == 1 and run["compare_version"]["requests"] > 0
        assert doc["compare_version"]["precision"] == "fp32" and set(doc["compare_version"]["vs_main"]) == {"1", "2"}
    else:
        assert doc["vs_plain"] is None and doc["compare_version"] is None
    assert set(doc["ratio"]) == {"1", "2"}
    (photos,) = doc["image_sets"]
    assert photos["top1_agreement"] >= 0.8  # served and in-process answers are the same model's
    assert photos["ceiling_batch_size"] in (1, 4, 8, 16)
    assert photos["single_image_ms"]["p50_ms"] > 0
    for run in doc["runs"]:
        assert run["client"] == client
        assert run["requests"] > 0 and run["non_2xx"] == 0 and run["socket_errors"] == 0
        assert run["images_per_s"] > 0 and run["ceiling_images_per_s"] > 0
        assert run["ratio"] == pytest.approx(run["images_per_s"] / run["ceiling_images_per_s"], rel=0.01, abs=1e-3)
        assert 0 < run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
        assert run["client_cpu"] >= 0
    assert "ratio" in format_report(doc)
