"""Serving a shift ensemble through the data plane (no Ray, no HTTP): tiny real ONNX model, real photos.

The bare view goes first; only when its margin is under the threshold do the extra copies go through
the same ``infer`` coroutine; the answer is their mean softmax, counted in the metrics.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
from typing import Any

import numpy as np
import pytest

from service import v2
from service.core.boxes import shift_box
from service.core.ensemble import Ensemble, margin
from service.core.errors import InvalidInput
from service.core.repository import ModelRepository
from service.core.runtime import softmax
from service.dataplane import DataPlane
from service.metrics import Metrics
from service.settings import ServeSettings
from tests.conftest import encode


@pytest.fixture()
def photo() -> bytes:
    rng = np.random.default_rng(1)
    return encode(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8), "JPEG", quality=90)


def _plane(repo: ModelRepository, **overrides: Any) -> tuple[DataPlane, list[tuple[int, Any]]]:
    """A data plane whose ``infer`` records (version, tensor) of every call."""
    settings = ServeSettings.build(repo.root, environ={}, overrides={"seed": 0, "live_fraction": 0.0, **overrides})
    plane = DataPlane(settings, repo, Metrics("memory"), rng=random.Random(0))
    calls: list[tuple[int, Any]] = []
    direct = plane.infer

    async def counting(served: Any, tensor: np.ndarray) -> np.ndarray:
        calls.append((served.version, tensor))
        return await direct(served, tensor)

    plane.infer = counting
    plane.load_all()
    return plane, calls


def _bare_margin(repo: ModelRepository, photo: bytes) -> float:
    plane, _ = _plane(repo)
    served = plane.lookup("tiny", None)
    return float(margin(softmax(served.classifier.logits(served.pre(photo)).astype(np.float64))[0]))


def test_adaptive_path_runs_the_copies_only_under_the_threshold(tiny_repo: ModelRepository, photo: bytes) -> None:
    m = _bare_margin(tiny_repo, photo)
    assert 0.01 < m < 0.99, m  # the photo leaves room for a threshold on either side
    above, below = f"knight5@{min(1.0, m + 0.005):.6f}", f"knight5@{m - 0.005:.6f}"

    plane, calls = _plane(tiny_repo, ensemble=above)
    _, doc = asyncio.run(plane.classify("tiny", photo, top_k=3))
    assert len(calls) == 5  # bare + 4 copies, all through infer (the deployment's @serve.batch)
    ens = doc["preprocess"]["ensemble"]
    assert (ens["used"], ens["copies"], ens["inferences"]) == (True, 5, 5) and ens["margin"] == pytest.approx(m, abs=1e-5)
    assert plane.metrics.count("steady_ensemble_answers", model="tiny", version="1", used="true") == 1
    assert plane.metrics.count("steady_ensemble_extra_inferences", model="tiny", version="1") == 4

    plane, calls = _plane(tiny_repo, ensemble=below)
    _, doc = asyncio.run(plane.classify("tiny", photo, top_k=3))
    assert len(calls) == 1
    assert doc["preprocess"]["ensemble"] == {"name": Ensemble.parse(below).name, "used": False, "copies": 1, "inferences": 1,
                                             "margin": pytest.approx(m, abs=1e-5)}
    assert plane.metrics.count("steady_ensemble_answers", model="tiny", used="false") == 1
    assert plane.metrics.count("steady_ensemble_extra_inferences", model="tiny") == 0


def test_served_answer_is_the_mean_softmax_of_the_copies(tiny_repo: ModelRepository, photo: bytes) -> None:
    plane, calls = _plane(tiny_repo, ensemble="knight5")
    served, doc = asyncio.run(plane.classify("tiny", photo, top_k=10))
    pre = served.pre
    img = pre.decode(photo)
    box = pre.box(img)
    views = np.stack([pre.tensor(img, shift_box(box, dx, dy, pre.resolution)) for dx, dy in served.ensemble.offsets])
    np.testing.assert_array_equal(np.stack([t for _, t in calls]), views)  # exactly the five copies
    mean = softmax(served.classifier.logits(views).astype(np.float64)).mean(axis=0)
    scores = {p["index"]: p["score"] for p in doc["predictions"]}
    np.testing.assert_allclose([scores[i] for i in range(10)], mean, atol=1e-6)
    assert [p["index"] for p in doc["predictions"]] == list(np.argsort(-mean, kind="stable"))
    assert doc["preprocess"]["policy"] == "center" and doc["preprocess"]["ensemble"]["used"] is True


def test_v2_image_answers_carry_log_of_the_mean_softmax(tiny_repo: ModelRepository, photo: bytes) -> None:
    plane, calls = _plane(tiny_repo, ensemble="knight5")
    _, rest = asyncio.run(plane.classify("tiny", photo, top_k=10))
    calls.clear()
    req = v2.parse_infer_request(json.dumps({"inputs": [
        {"name": "image", "shape": [2], "datatype": "BYTES", "parameters": {"content_type": "base64"},
         "data": [base64.b64encode(photo).decode()] * 2}]}).encode())
    served, outputs, _ = asyncio.run(plane.infer_v2("tiny", None, req))
    assert len(calls) == 10 and outputs[0].array.shape == (2, 10)
    probs = softmax(outputs[0].array.astype(np.float64))
    by_index = {p["index"]: p["score"] for p in rest["predictions"]}
    np.testing.assert_allclose(probs[0], [by_index[i] for i in range(10)], atol=1e-6)
    np.testing.assert_allclose(np.exp(outputs[0].array[1]), probs[1], atol=1e-6)  # rows are log(p)
    # classification extension: the scores are the ensemble's probabilities
    req.outputs = [v2.OutputRequest(name="logits", classification=1)]
    _, outputs, _ = asyncio.run(plane.infer_v2("tiny", None, req))
    score, index, _ = outputs[0].elements[0].decode().split(":")
    assert int(index) == rest["predictions"][0]["index"] and float(score) == pytest.approx(by_index[int(index)], abs=1e-5)
    # preprocessed FP32 input: nothing to move, the bare model answers
    calls.clear()
    x = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)
    req = v2.parse_infer_request(json.dumps({"inputs": [
        {"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": x.reshape(-1).tolist()}]}).encode())
    _, outputs, _ = asyncio.run(plane.infer_v2("tiny", None, req))
    assert len(calls) == 1
    np.testing.assert_allclose(outputs[0].array, served.classifier.logits(x), rtol=1e-5, atol=1e-5)
    assert plane.metrics.count("steady_ensemble_answers", model="tiny", used="true") == 1 + 2 + 2


def test_live_checks_answer_like_the_service_and_are_not_counted(tiny_repo: ModelRepository, photo: bytes) -> None:
    plane, calls = _plane(tiny_repo, ensemble="knight5", live_fraction=1.0, max_background=64)

    async def run() -> None:
        await plane.classify("tiny", photo)
        await plane.drain()

    asyncio.run(run())
    assert len(calls) == 3 * 5  # the answer, and the shifted and zoomed live views, each through the ensemble
    assert plane.metrics.count("steady_ensemble_answers", model="tiny") == 1
    assert plane.metrics.count("steady_live_checks", model="tiny") == 2


def test_robustness_json_chooses_the_ensemble_and_settings_override_it(tiny_repo: ModelRepository,
                                                                        photo: bytes) -> None:
    vdir = tiny_repo.version_dir("tiny", 1)
    vdir.chmod(0o755)
    chosen = Ensemble.parse("knight5@0.2")
    (vdir / "robustness.json").write_text(json.dumps({
        "model_sha256": tiny_repo.verify("tiny", 1), "summary": {"compute.per_answer": 1.4},
        "chosen": {"policy": "center", "resolution": 32, "rule": "test", "ensemble": dict(chosen.to_dict(), compute=1.4)},
    }))
    plane, _ = _plane(tiny_repo)
    assert plane.lookup("tiny", None).ensemble == chosen
    assert plane.models()["models"][0]["versions"][0]["ensemble"]["name"] == "knight5@0.2"
    assert _plane(tiny_repo, ensemble="off")[0].lookup("tiny", None).ensemble is None
    assert _plane(tiny_repo, model_ensemble={"tiny": "square4@0.1"})[0].lookup("tiny", None).ensemble.name == "square4@0.1"
    # a malformed choice is ignored (logged): the bare policy is served
    (vdir / "robustness.json").write_text(json.dumps({
        "model_sha256": tiny_repo.verify("tiny", 1),
        "chosen": {"policy": "center", "resolution": 32, "rule": "test", "ensemble": {"offsets": [[0, 0]]}}}))
    assert _plane(tiny_repo)[0].lookup("tiny", None).ensemble is None
    # no ensemble: the response says nothing about one
    _, doc = asyncio.run(_plane(tiny_repo)[0].classify("tiny", photo))
    assert "ensemble" not in doc["preprocess"]


@pytest.mark.parametrize("overrides,match", [
    ({"ensemble": "knight5@2"}, "ensemble: .*threshold"),
    ({"ensemble": "1,0;1,0"}, "ensemble: .*distinct"),
    ({"model_ensemble": {"tiny": "0,0;0.5,0"}}, "model_ensemble"),
])
def test_bad_ensemble_settings_are_one_line_errors(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        ServeSettings.build("/models", environ={}, overrides=overrides)


def test_yaml_off_is_off(tmp_path: Any) -> None:
    config = tmp_path / "steady.yaml"
    config.write_text("ensemble: off\nmodel_ensemble: {tiny: knight5@0.15, other: off}\n")  # YAML reads off as false
    s = ServeSettings.build("/models", config=config, environ={})
    assert s.ensemble == "off" and s.model_ensemble == {"tiny": "knight5@0.15", "other": "off"}
    assert s.ensemble_of("other", {"ensemble": {"offsets": [[0, 0], [2, 1]]}}) is None
    assert s.ensemble_of("tiny", None) == Ensemble.parse("knight5@0.15")
