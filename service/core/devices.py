"""Which devices this process can use: CUDA for ONNX Runtime and NVIDIA DALI, and GPU readings from NVML.

``preprocess_device`` (service settings, ``steady score --preprocess-device``) names where images are
decoded and resampled:

- ``cpu``: Pillow on the host (:mod:`service.core.preprocess`), the reference path;
- ``gpu``: NVIDIA DALI on the GPU (:mod:`service.core.gpu_preprocess`), the tensor stays on the device;
- ``dali-cpu``: the same DALI pipeline on DALI's CPU backend: the GPU path's graph and routing,
  testable without a GPU (slower than ``cpu``; for tests and parity records, not for serving);
- ``auto``: ``gpu`` when ONNX Runtime runs on CUDA and DALI sees a CUDA device, else ``cpu``.

GPU memory and utilisation come from NVML through ``nvidia-ml-py`` (the ``gpu`` extra), for the GPUs
this process may use (``CUDA_VISIBLE_DEVICES``, which Ray sets for a replica with ``num_gpus``);
without NVML there are no readings. Nothing here imports DALI or NVML unless asked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

from service.core.errors import DeviceUnavailable

__all__ = ["PREPROCESS_DEVICES", "GpuReading", "resolve_preprocess_device", "dali_cuda_devices", "gpu_readings"]

PREPROCESS_DEVICES = ("auto", "cpu", "gpu", "dali-cpu")


def dali_cuda_devices() -> int:
    """CUDA devices DALI can use (0 without DALI, a driver or a visible GPU)."""
    try:
        from nvidia.dali import backend
    except ImportError:
        return 0
    try:
        return int(backend.GetCUDADeviceCount())
    except Exception:  # noqa: BLE001 - no driver: DALI raises rather than answering 0
        return 0


def resolve_preprocess_device(setting: str, providers: Sequence[str]) -> str:
    """``cpu``, ``gpu`` or ``dali-cpu`` for a ``preprocess_device`` setting, given the session's providers.

    ``auto`` looks for DALI only when ONNX Runtime already runs on CUDA, so CPU installs never import it.
    An explicit ``gpu`` or ``dali-cpu`` that cannot work raises :class:`DeviceUnavailable` saying why.
    """
    if setting not in PREPROCESS_DEVICES:
        raise ValueError(f"preprocess_device must be one of {', '.join(PREPROCESS_DEVICES)}, got {setting!r}")
    cuda = "CUDAExecutionProvider" in providers
    if setting == "auto":
        return "gpu" if cuda and dali_cuda_devices() > 0 else "cpu"
    if setting == "cpu":
        return "cpu"
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        raise DeviceUnavailable(f"preprocess_device {setting} needs NVIDIA DALI: pip install 'steady[gpu]' "
                                f"({exc})") from exc
    if setting == "gpu":
        if not cuda:
            raise DeviceUnavailable(f"preprocess_device gpu needs ONNX Runtime on CUDA (provider cuda and "
                                    f"onnxruntime-gpu); this session runs on {list(providers)}")
        if dali_cuda_devices() < 1:
            raise DeviceUnavailable("preprocess_device gpu: DALI sees no CUDA device (driver missing, or "
                                    "CUDA_VISIBLE_DEVICES hides the GPU: set replica_gpus)")
    return setting


@dataclass(frozen=True)
class GpuReading:
    """One GPU as NVML sees it now: memory in bytes, utilisation as a fraction of the last sample period."""

    index: int
    name: str
    memory_used: int
    memory_total: int
    utilization: float
    process_memory: int  # used by this process (0 when NVML cannot tell, e.g. inside some containers)


def _visible(nvml: Any) -> list[Any]:
    """NVML handles of the GPUs CUDA_VISIBLE_DEVICES lets this process use (NVML itself ignores it)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    handles = []
    for entry in (e.strip() for e in visible.split(",")):
        if not entry:
            continue
        if entry.isdigit():
            handles.append(nvml.nvmlDeviceGetHandleByIndex(int(entry)))
        else:
            handles.append(nvml.nvmlDeviceGetHandleByUUID(entry))
    return handles


def gpu_readings() -> list[GpuReading]:
    """Readings of the GPUs this process may use; [] without ``nvidia-ml-py``, a driver or a GPU."""
    try:
        import pynvml as nvml
    except ImportError:
        return []
    try:
        nvml.nvmlInit()
    except Exception:  # noqa: BLE001 - NVMLError_LibraryNotFound / DriverNotLoaded: no GPU here
        return []
    try:
        out = []
        pid = os.getpid()
        for index, handle in enumerate(_visible(nvml)):
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            util = nvml.nvmlDeviceGetUtilizationRates(handle)
            mine = 0
            try:
                for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid == pid and proc.usedGpuMemory:
                        mine += int(proc.usedGpuMemory)
            except Exception:  # noqa: BLE001 - not supported on every driver/container
                mine = 0
            name = nvml.nvmlDeviceGetName(handle)
            out.append(GpuReading(index, name.decode() if isinstance(name, bytes) else str(name), int(mem.used),
                                  int(mem.total), float(util.gpu) / 100.0, mine))
        return out
    except Exception:  # noqa: BLE001 - readings are best effort: metrics must never hurt serving
        return []
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
