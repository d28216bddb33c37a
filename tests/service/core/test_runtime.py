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


# ------------------------------------------------------------------ IO binding (the GPU path's hand-off)
def test_io_binding_from_dlpack_equals_the_plain_run(clf: Classifier) -> None:
    import onnxruntime as ort

    from service.core.runtime import _bind_input

    x = np.random.default_rng(3).normal(size=(3, 3, 40, 32)).astype(np.float32)
    plain = clf.logits(x)
    np.testing.assert_array_equal(clf.logits_bound(x), plain)  # numpy is a DLPack producer too
    value = ort.OrtValue.from_dlpack(x)  # the zero-copy wrapper the GPU path uses
    assert value.data_ptr() == x.ctypes.data
    # the raw-pointer binding (for ONNX Runtime builds without from_dlpack) gives the same logits
    binding = clf.session.io_binding()
    assert _bind_input(ort, binding, clf.input_name, x, use_dlpack=False) == [3, 3, 40, 32]
    binding.bind_output(clf.output_name, "cpu")
    clf.session.run_with_iobinding(binding)
    np.testing.assert_array_equal(binding.copy_outputs_to_cpu()[0], plain)
    assert clf.logits_bound(np.zeros((0, 3, 32, 32), np.float32)).shape == (0, TINY_CLASSES)
    with pytest.raises(InvalidInput, match="float32"):
        clf.logits_bound(x.astype(np.float64))
    with pytest.raises(InvalidInput, match="shape"):
        clf.logits_bound(np.zeros((2, 4, 8, 8), np.float32))
    with pytest.raises(InvalidInput, match="dense"):
        _bind_input(ort, clf.session.io_binding(), clf.input_name, x[:, :, ::2], use_dlpack=False)


def test_io_binding_of_a_dali_output_equals_the_plain_run(clf: Classifier) -> None:
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed: pip install -e '.[test]' brings it")
    from nvidia.dali import fn, pipeline_def, types

    x = np.random.default_rng(4).normal(size=(2, 3, 32, 32)).astype(np.float32)

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def echo():  # type: ignore[no-untyped-def]
        return fn.external_source(name="x", dtype=types.FLOAT, ndim=3)

    pipe = echo()
    pipe.build()
    pipe.feed_input("x", [x[0], x[1]])
    (out,) = pipe.run()
    tensor = out.as_tensor()  # DALI's dense (N, 3, H, W) TensorCPU, bound without a copy
    np.testing.assert_array_equal(clf.logits_bound(tensor), clf.logits(x))


@pytest.mark.gpu
def test_io_binding_of_a_cuda_tensor(tiny_onnx: bytes, clf: Classifier) -> None:
    if "CUDAExecutionProvider" not in available_providers():
        pytest.skip("no CUDA device: onnxruntime-gpu with a visible NVIDIA GPU is needed")
    import onnxruntime as ort

    gpu = Classifier(tiny_onnx, tiny_card(), RuntimeOptions(provider="cuda"))
    x = np.random.default_rng(5).normal(size=(4, 3, 32, 32)).astype(np.float32)
    on_device = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
    assert on_device.device_name().lower() == "cuda"
    binding = gpu.session.io_binding()
    binding.bind_ortvalue_input(gpu.input_name, on_device)
    binding.bind_output(gpu.output_name, "cpu")
    gpu.session.run_with_iobinding(binding)
    np.testing.assert_allclose(binding.copy_outputs_to_cpu()[0], clf.logits(x), rtol=1e-3, atol=1e-3)
