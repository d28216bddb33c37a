"""The data plane without Ray or HTTP: tiny real ONNX model, real JPEGs, in-memory metrics."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service import v2
from service.dataplane import DataPlane
from service.core.errors import ImageTooLarge, InvalidInput, ModelNotFound, Overloaded, UnsupportedImage, VersionNotFound
from service.metrics import Metrics, robustness_metric_name
from service.core.repository import ModelRepository
from service.settings import ServeSettings
from tests.conftest import encode, tiny_card


@pytest.fixture()
def photo() -> bytes:
    rng = np.random.default_rng(1)
    return encode(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), "JPEG", quality=90)


def _plane(repo: ModelRepository, **overrides: Any) -> DataPlane:
    settings = ServeSettings.build(repo.root, environ={}, overrides={"seed": 0, "live_fraction": 0.0, **overrides})
    plane = DataPlane(settings, repo, Metrics("memory"), rng=random.Random(0))
    plane.load_all()
    return plane


def test_classify_matches_direct_preprocessing(tiny_repo: ModelRepository, photo: bytes) -> None:
    from service.core.preprocess import Preprocessor
    from service.core.runtime import Classifier

    plane = _plane(tiny_repo)
    served, doc = asyncio.run(plane.classify("tiny", photo, top_k=3))
    assert (doc["model"], doc["version"], doc["stage"]) == ("tiny", 1, "production")
    assert len(doc["predictions"]) == 3 and doc["preprocess"]["policy"] == "center"
    loaded = tiny_repo.load("tiny", 1)
    clf = Classifier(loaded.onnx_bytes, loaded.card)
    expected = clf.top_k(clf.logits(Preprocessor(loaded.card)(photo)), 3)[0]
    assert [p["index"] for p in doc["predictions"]] == [p.index for p in expected]
    np.testing.assert_allclose([p["score"] for p in doc["predictions"]], [p.score for p in expected], rtol=1e-5)
    x0, y0, x1, y1 = doc["preprocess"]["box"]
    assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 120
    assert plane.metrics.observations("steady_preprocess_seconds", model="tiny")


@pytest.mark.parametrize("inline", [0, 1 << 20])
def test_tiny_work_is_decoded_without_a_thread_hop(tiny_repo: ModelRepository, photo: bytes, inline: int) -> None:
    """Bodies up to ``inline_decode_bytes`` are decoded on the event loop; larger ones in the decode threads.
    Both give the same answer."""
    from concurrent.futures import ThreadPoolExecutor

    class Counting(ThreadPoolExecutor):
        submitted = 0

        def submit(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            Counting.submitted += 1
            return super().submit(*args, **kwargs)

    settings = ServeSettings.build(tiny_repo.root, environ={},
                                   overrides={"seed": 0, "live_fraction": 0.0, "inline_decode_bytes": inline})
    plane = DataPlane(settings, tiny_repo, Metrics("memory"), executor=Counting(1), rng=random.Random(0))
    plane.load_all()
    _, doc = asyncio.run(plane.classify("tiny", photo, top_k=3))
    assert Counting.submitted == (0 if inline else 1)
    _, reference = asyncio.run(_plane(tiny_repo).classify("tiny", photo, top_k=3))
    assert doc["predictions"] == reference["predictions"]


def test_lookup_errors(tiny_repo: ModelRepository) -> None:
    plane = _plane(tiny_repo)
    with pytest.raises(ModelNotFound):
        plane.route("nope", None)
    with pytest.raises(VersionNotFound):
        plane.route("tiny", "7")
    with pytest.raises(InvalidInput):
        plane.route("../etc", None)
    with pytest.raises(InvalidInput):
        plane.route("tiny", "1; drop")


def test_bad_images_and_limits(tiny_repo: ModelRepository, photo: bytes) -> None:
    plane = _plane(tiny_repo, max_pixels=10_000)
    with pytest.raises(UnsupportedImage):
        asyncio.run(plane.classify("tiny", b"not an image"))
    with pytest.raises(ImageTooLarge):
        asyncio.run(plane.classify("tiny", photo))
    with pytest.raises(InvalidInput, match="top_k"):
        asyncio.run(plane.classify("tiny", photo, top_k=0))


def test_admission_bound(tiny_repo: ModelRepository) -> None:
    plane = _plane(tiny_repo, max_inflight=2)
    plane.admit()
    plane.admit()
    with pytest.raises(Overloaded):
        plane.admit()
    plane.release()
    plane.admit()


def _two_versions(tiny_repo: ModelRepository, tiny_onnx: bytes) -> None:
    tiny_repo.add("tiny", tiny_onnx, tiny_card())
    tiny_repo.set_stage("tiny", "production", 1)
    tiny_repo.set_stage("tiny", "candidate", 2)


def test_canary_split(tiny_repo: ModelRepository, tiny_onnx: bytes) -> None:
    _two_versions(tiny_repo, tiny_onnx)
    plane = _plane(tiny_repo, candidate_mode="canary", canary_fraction=0.25)
    picks = [plane.route("tiny", None).version for _ in range(4000)]
    assert abs(picks.count(2) / len(picks) - 0.25) < 0.03
    assert plane.route("tiny", "2").stage == "candidate"


def test_shadow_and_live_counters(tiny_repo: ModelRepository, tiny_onnx: bytes, photo: bytes) -> None:
    _two_versions(tiny_repo, tiny_onnx)
    plane = _plane(tiny_repo, candidate_mode="shadow", shadow_fraction=1.0, live_fraction=1.0, max_background=64)

    async def run() -> None:
        for _ in range(5):
            served, doc = await plane.classify("tiny", photo)
            assert served.version == 1  # shadow never answers
        await plane.drain()

    asyncio.run(run())
    m = plane.metrics
    assert m.count("steady_shadow_checks", model="tiny", candidate="2") == 5
    # same weights: the candidate always agrees
    assert m.count("steady_shadow_agreements", model="tiny", candidate="2") == 5
    for transform in ("shift", "zoom"):
        assert m.count("steady_live_checks", model="tiny", version="1", transform=transform) == 5
        assert 0 <= m.count("steady_live_flips", model="tiny", transform=transform) <= 5


def test_reload_switches_after_loading_and_keeps_healthy(tiny_repo: ModelRepository, tiny_onnx: bytes) -> None:
    plane = _plane(tiny_repo)
    first = plane.lookup("tiny", None)
    tiny_repo.add("tiny", tiny_onnx, tiny_card())
    tiny_repo.set_stage("tiny", "production", 2)
    result = asyncio.run(plane.reload())
    assert plane.lookup("tiny", None).version == 2 and "tiny/2 (production)" in result["added"]
    assert plane.metrics.gauge("steady_model_info", model="tiny", version="1") == 0.0
    # corrupt version 3, promote it: reload refuses it and keeps version 2
    card = tiny_repo.add("tiny", tiny_onnx, tiny_card())
    target = tiny_repo.version_dir("tiny", card.version) / "model.onnx"
    target.chmod(0o644)
    target.write_bytes(target.read_bytes()[:-10] + b"0123456789")
    tiny_repo.set_stage("tiny", "production", card.version)
    result = asyncio.run(plane.reload())
    assert result["errors"] and plane.lookup("tiny", None).version == 2
    assert plane.lookup("tiny", None) is not first


def test_robustness_json_chooses_preprocessing(tiny_repo: ModelRepository) -> None:
    sha = tiny_repo.verify("tiny", 1)
    vdir = tiny_repo.version_dir("tiny", 1)
    vdir.chmod(0o755)
    (vdir / "robustness.json").write_text(json.dumps({
        "model_sha256": sha,
        "summary": {"pan.p_change": 0.031, "scale.flip_prob": 0.08, "accuracy": 0.9, "note": "text"},
        "chosen": {"policy": "center", "resolution": 48, "rule": "lowest flip rate"},
    }))
    plane = _plane(tiny_repo)
    sv = plane.lookup("tiny", None)
    assert sv.resolution == 48 and sv.robustness["pan.p_change"] == 0.031
    listing = plane.models()["models"][0]["versions"][0]
    assert listing["robustness"]["scale.flip_prob"] == 0.08 and listing["chosen"]["resolution"] == 48
    assert plane.metrics.gauge("steady_robustness_pan_p_change", model="tiny", version="1", policy="center") == 0.031
    assert plane.metrics.gauge("steady_robustness_note") is None
    # bound to another sha: ignored, the card's preprocessing is used
    (vdir / "robustness.json").write_text(json.dumps({"model_sha256": "0" * 64, "chosen": {"resolution": 48}}))
    assert _plane(tiny_repo).lookup("tiny", None).resolution == 32


def test_robustness_metric_names() -> None:
    assert robustness_metric_name("pan.p_change") == "steady_robustness_pan_p_change"
    assert robustness_metric_name("Scale.Flip-Prob@224") == "steady_robustness_scale_flip_prob_224"
    with pytest.raises(ValueError):
        robustness_metric_name("...")


def _v2(inputs: list[dict[str, Any]], outputs: list[dict[str, Any]] | None = None) -> v2.InferRequest:
    doc: dict[str, Any] = {"inputs": inputs}
    if outputs:
        doc["outputs"] = outputs
    return v2.parse_infer_request(json.dumps(doc).encode())


def test_v2_fp32_and_bytes(tiny_repo: ModelRepository, photo: bytes) -> None:
    import base64

    plane = _plane(tiny_repo)
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    req = _v2([{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}])
    served, outputs, binary = asyncio.run(plane.infer_v2("tiny", None, req))
    np.testing.assert_allclose(outputs[0].array, served.classifier.logits(x), rtol=1e-5, atol=1e-5)
    assert binary == [False]

    req = _v2([{"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"content_type": "base64"},
                "data": [base64.b64encode(photo).decode()]}],
              [{"name": "logits", "parameters": {"classification": 2, "binary_data": True}}])
    _, outputs, binary = asyncio.run(plane.infer_v2("tiny", "1", req))
    assert outputs[0].datatype == "BYTES" and outputs[0].shape == (1, 2) and binary == [True]
    score, index, label = outputs[0].elements[0].decode().split(":")
    assert label == f"class_{index}" and 0 < float(score) <= 1


@pytest.mark.parametrize(
    "inputs, message",
    [
        ([{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [float("nan")] + [0.0] * 3071}],
         "NaN"),
        ([{"name": "input", "shape": [1, 1, 32, 32], "datatype": "FP32", "data": [0.0] * 1024}], "shape"),
        ([{"name": "input", "shape": [1, 3, 4, 4], "datatype": "FP32", "data": [0.0] * 48}], ">= 8"),
        ([{"name": "input", "shape": [1, 3, 8, 8], "datatype": "INT32", "data": [0] * 192}], "must be FP32"),
        ([{"name": "image", "shape": [1], "datatype": "FP32", "data": [1.0]}], "must be BYTES"),
        ([{"name": "pixels", "shape": [1], "datatype": "FP32", "data": [1.0]}], "unknown input"),
        ([{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192},
          {"name": "image", "shape": [1], "datatype": "BYTES", "data": ["x"]}], "exactly one"),
        ([{"name": "input", "shape": [65, 3, 8, 8], "datatype": "FP32", "data": [0.0] * (65 * 192)}], "batch"),
    ],
)
def test_v2_validation(tiny_repo: ModelRepository, inputs: list[dict[str, Any]], message: str) -> None:
    plane = _plane(tiny_repo)
    with pytest.raises(InvalidInput, match=message):
        asyncio.run(plane.infer_v2("tiny", None, _v2(inputs)))


def test_v2_unknown_output(tiny_repo: ModelRepository) -> None:
    plane = _plane(tiny_repo)
    req = _v2([{"name": "input", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}],
              [{"name": "probs"}])
    with pytest.raises(InvalidInput, match="unknown output"):
        asyncio.run(plane.infer_v2("tiny", None, req))


def test_multipart_parsing() -> None:
    from service.routes import parse_multipart_image

    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nhello\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n\xff\xd8\x00\r\nbinary\xff\r\n--XyZ--\r\n")
    assert parse_multipart_image("multipart/form-data; boundary=XyZ", body) == b"\xff\xd8\x00\r\nbinary\xff"
    with pytest.raises(InvalidInput, match="no field"):
        parse_multipart_image("multipart/form-data; boundary=XyZ", body.replace(b'name="image"', b'name="img"'))


def test_core_modules_do_not_import_ray_or_torch() -> None:
    src = Path(__file__).resolve().parents[2] / "service"
    for module in ("dataplane.py", "v2.py", "settings.py", "metrics.py", "routes.py"):
        text = (src / module).read_text()
        assert "import ray" not in text.replace("from ray.util import metrics as rm", ""), module
        assert "import torch" not in text and "from ray import" not in text, module


def test_the_gpu_path_answers_like_the_cpu_path(tiny_repo: ModelRepository, photo: bytes) -> None:
    """preprocess_device dali-cpu: the GPU path (header and box on the host, decode + resample + ONNX Runtime
    by IO binding in the batch) on DALI's CPU backend, through the real catalog and data plane."""
    import base64

    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed: pip install -e '.[test]' brings it")
    from skimage import data as skdata

    jpeg = encode(skdata.coffee(), "JPEG", quality=90)
    gpu_path = _plane(tiny_repo, preprocess_device="dali-cpu", live_fraction=1.0)
    cpu_path = _plane(tiny_repo)
    served = gpu_path.lookup("tiny", None)
    assert served.device_pre is not None and served.device_pre.device == "cpu"
    assert cpu_path.lookup("tiny", None).device_pre is None

    async def classify(plane: DataPlane, body: bytes) -> dict[str, Any]:
        _, doc = await plane.classify("tiny", body, top_k=3)
        await plane.drain()
        return doc

    from service.core.preprocess import Preprocessor

    full_decode = Preprocessor(served.card, reduced_decode=False)  # the contract's reference (see gpu_preprocess)
    for body in (jpeg, photo):
        ours, theirs = asyncio.run(classify(gpu_path, body)), asyncio.run(classify(cpu_path, body))
        (want,) = served.classifier.top_k(served.classifier.logits(full_decode(body)), 3)
        assert [p["index"] for p in ours["predictions"]] == [p.index for p in want]
        np.testing.assert_allclose([p["score"] for p in ours["predictions"]], [p.score for p in want], atol=1e-4)
        np.testing.assert_allclose(ours["preprocess"]["box"], theirs["preprocess"]["box"], atol=0.01)
    m = gpu_path.metrics
    assert len(m.observations("steady_device_preprocess_seconds", model="tiny")) == 2
    assert m.count("steady_live_checks", model="tiny") == 4  # shift and zoom per answer, rendered by DALI too
    # formats the device does not take, and a corrupt JPEG, answer as on the CPU path
    alpha = np.zeros((40, 50, 4), np.uint8)
    alpha[10:30, 10:40] = (250, 10, 10, 255)
    png = encode(alpha, "PNG")
    # Pillow on both paths
    assert asyncio.run(classify(gpu_path, png))["predictions"] == asyncio.run(classify(cpu_path, png))["predictions"]
    assert m.count("steady_device_host_images", model="tiny", reason="routed") == 1
    with pytest.raises(UnsupportedImage, match="truncated"):
        asyncio.run(gpu_path.classify("tiny", jpeg[: len(jpeg) // 2]))
    assert m.count("steady_device_host_images", model="tiny", reason="fallback") == 1
    with pytest.raises(UnsupportedImage):
        asyncio.run(gpu_path.classify("tiny", b"not an image"))
    # KServe V2 BYTES images take the same path
    req = _v2([{"name": "image", "shape": [2], "datatype": "BYTES", "parameters": {"content_type": "base64"},
                "data": [base64.b64encode(jpeg).decode(), base64.b64encode(png).decode()]}])
    _, outputs, _ = asyncio.run(gpu_path.infer_v2("tiny", None, req))
    expected = served.classifier.logits(np.concatenate([full_decode(jpeg), Preprocessor(served.card)(png)]))
    np.testing.assert_allclose(outputs[0].array, expected, rtol=1e-4, atol=1e-4)


def test_the_gpu_path_refuses_a_card_it_cannot_reproduce(tmp_path: Path, tiny_onnx: bytes) -> None:
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed: pip install -e '.[test]' brings it")
    from service.core.errors import SteadyError

    repo = ModelRepository(tmp_path / "repo")
    repo.add("nearest", tiny_onnx, tiny_card("nearest", interpolation="nearest"))
    with pytest.raises(SteadyError, match="nearest.*no DALI filter"):
        _plane(repo, preprocess_device="dali-cpu")
    assert _plane(repo).lookup("nearest", None).device_pre is None  # auto / cpu: the CPU path serves it
