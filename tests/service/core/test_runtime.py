"""ONNX Runtime sessions: shapes, validation, ranking, providers."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.errors import InvalidInput
from service.core.runtime import Classifier, RuntimeOptions, available_providers, softmax
from tests.conftest import TINY_CLASSES, tiny_card


@pytest.fixture(scope="module")
def clf(tiny_onnx: bytes) -> Classifier:
    return Classifier(tiny_onnx, tiny_card(), RuntimeOptions(provider="cpu", intra_op_threads=1))


def test_logits_shape_for_any_batch_and_size(clf: Classifier) -> None:
    rng = np.random.default_rng(0)
    for n, side in ((1, 32), (3, 40)):
        out = clf.logits(rng.normal(size=(n, 3, side, side)).astype(np.float32))
        assert out.shape == (n, TINY_CLASSES) and out.dtype == np.float32 and np.all(np.isfinite(out))
    assert clf.logits(np.zeros((0, 3, 32, 32), np.float32)).shape == (0, TINY_CLASSES)


def test_batching_does_not_change_answers(clf: Classifier) -> None:
    x = np.random.default_rng(1).normal(size=(4, 3, 32, 32)).astype(np.float32)
    one_by_one = np.concatenate([clf.logits(x[i:i + 1]) for i in range(4)])
    np.testing.assert_allclose(clf.logits(x), one_by_one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [np.zeros((1, 3, 8, 8), np.float64), np.zeros((3, 8, 8), np.float32),
                                 np.zeros((1, 4, 8, 8), np.float32), [[1.0]]])
def test_bad_inputs_are_refused(clf: Classifier, bad: object) -> None:
    with pytest.raises(InvalidInput):
        clf.logits(bad)  # type: ignore[arg-type]


def test_top_k_ranks_softmax_scores(clf: Classifier) -> None:
    logits = np.array([[0.0, 3.0, 1.0] + [-5.0] * (TINY_CLASSES - 3)], np.float32)
    (preds,) = clf.top_k(logits, 2)
    assert [p.index for p in preds] == [1, 2] and preds[0].label == "class_1"
    assert preds[0].score == pytest.approx(float(softmax(logits.copy())[0, 1]), rel=1e-6)
    with pytest.raises(InvalidInput):
        clf.top_k(logits, 0)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="provider"):
        RuntimeOptions(provider="tpu")
    with pytest.raises(ValueError, match="thread"):
        RuntimeOptions(intra_op_threads=-1)


def test_cuda_is_refused_clearly_without_a_gpu(tiny_onnx: bytes) -> None:
    if "CUDAExecutionProvider" in available_providers():
        pytest.skip("this machine has CUDA: the refusal cannot happen here (see the gpu test)")
    with pytest.raises(RuntimeError, match="cuda"):
        Classifier(tiny_onnx, tiny_card(), RuntimeOptions(provider="cuda"))
    assert Classifier(tiny_onnx, tiny_card(), RuntimeOptions(provider="auto")).providers == ["CPUExecutionProvider"]


@pytest.mark.gpu
def test_cuda_matches_cpu(tiny_onnx: bytes, clf: Classifier) -> None:
    if "CUDAExecutionProvider" not in available_providers():
        pytest.skip("no CUDA device: onnxruntime-gpu with a visible NVIDIA GPU is needed")
    gpu = Classifier(tiny_onnx, tiny_card(), RuntimeOptions(provider="cuda"))
    assert gpu.providers[0] == "CUDAExecutionProvider"
    x = np.random.default_rng(2).normal(size=(2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(gpu.logits(x), clf.logits(x), rtol=1e-3, atol=1e-3)
