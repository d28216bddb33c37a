"""Where preprocessing runs: ``preprocess_device`` resolution, and NVML readings (none without a GPU)."""

from __future__ import annotations

import importlib.util

import pytest

from service.core.devices import dali_cuda_devices, gpu_readings, resolve_preprocess_device
from service.core.errors import DeviceUnavailable
from service.core.runtime import available_providers

CPU_ONLY = ["CPUExecutionProvider"]
HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def test_auto_is_cpu_without_cuda() -> None:
    assert resolve_preprocess_device("auto", CPU_ONLY) == "cpu"
    assert resolve_preprocess_device("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == "cpu"
    with pytest.raises(ValueError, match="preprocess_device"):
        resolve_preprocess_device("tpu", CPU_ONLY)


def test_auto_on_this_machine_follows_its_devices() -> None:
    providers = available_providers()
    expected = "gpu" if "CUDAExecutionProvider" in providers and dali_cuda_devices() > 0 else "cpu"
    assert resolve_preprocess_device("auto", providers) == expected


@pytest.mark.skipif(not HAS_DALI, reason="NVIDIA DALI is not installed: pip install -e '.[test]' brings it")
def test_explicit_devices_say_why_they_cannot_run() -> None:
    assert resolve_preprocess_device("dali-cpu", CPU_ONLY) == "dali-cpu"
    with pytest.raises(DeviceUnavailable, match="ONNX Runtime on CUDA"):
        resolve_preprocess_device("gpu", CPU_ONLY)
    if dali_cuda_devices() == 0:
        with pytest.raises(DeviceUnavailable, match="no CUDA device"):
            resolve_preprocess_device("gpu", ["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_explicit_devices_without_dali(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # what a CPU install without the gpu extra has
    with pytest.raises(DeviceUnavailable, match="steady\\[gpu\\]"):
        resolve_preprocess_device("dali-cpu", CPU_ONLY)
    assert resolve_preprocess_device("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == "cpu"


def test_no_gpu_readings_without_a_gpu() -> None:
    if dali_cuda_devices() > 0:
        pytest.skip("this machine has a GPU (see the gpu test)")
    assert gpu_readings() == []


@pytest.mark.gpu
def test_gpu_readings_on_a_gpu() -> None:
    if dali_cuda_devices() < 1 and "CUDAExecutionProvider" not in available_providers():
        pytest.skip("no CUDA device: NVML readings need an NVIDIA GPU and nvidia-ml-py (pip install '.[gpu]')")
    pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed: pip install '.[gpu]'")
    (first, *_) = gpu_readings()
    assert 0 < first.memory_used <= first.memory_total and 0.0 <= first.utilization <= 1.0 and first.name
    assert resolve_preprocess_device("auto", available_providers()) == "gpu"
