"""ONNX Runtime sessions for classifiers: load verified bytes, run batches, rank classes.

No Ray, no HTTP: the model core the scorer, the CLI and the service share.

Example:
    >>> clf = Classifier.from_repository(repo, "lite0", 1)       # doctest: +SKIP
    >>> logits = clf.logits(tensor)                               # doctest: +SKIP
    >>> top = clf.top_k(logits, 5)                                # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from service.core.card import ModelCard
from service.core.errors import InvalidInput
from service.core.static_shape import specialise

_log = logging.getLogger(__name__)

__all__ = ["Prediction", "RuntimeOptions", "Classifier", "softmax", "available_providers"]


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    score: float

    def to_dict(self) -> dict[str, object]:
        return {"index": self.index, "label": self.label, "score": self.score}


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run ONNX Runtime: threads and execution provider.

    ``provider`` is ``auto`` (CUDA when onnxruntime-gpu sees a GPU, else CPU), ``cpu`` or ``cuda``.
    ``intra_op_threads`` 0 means "all cores of this process". ``allow_spinning`` False stops
    idle intra-op threads from busy-waiting (they would steal CPU from decoding on small machines).
    ``static_sizes``: square input sides that get a session of their own, specialised for that size
    (:mod:`service.core.static_shape`: the same logits, 1.5-2x faster on EfficientNet-Lite); any other
    size runs on the general session.
    """

    provider: str = "auto"
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    allow_spinning: bool = True
    static_sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.provider not in ("auto", "cpu", "cuda"):
            raise ValueError(f"provider must be auto, cpu or cuda, got {self.provider!r}")
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ValueError("thread counts must be >= 0")
        if any(not isinstance(s, int) or s < 8 for s in self.static_sizes):
            raise ValueError(f"static sizes must be integers >= 8, got {self.static_sizes}")


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def _providers(option: str) -> list[str]:
    available = available_providers()
    if option == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(f"provider 'cuda' requested but ONNX Runtime offers only {available}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if option == "auto" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Classifier:
    """An ONNX Runtime session plus the card that says how to feed and read it."""

    def __init__(self, onnx_bytes: bytes, card: ModelCard, options: RuntimeOptions | None = None) -> None:
        self.card = card
        self.options = options or RuntimeOptions()
        self._bytes = onnx_bytes
        self._session: Any = None
        self._static: dict[int, Any] = {}
        for size in dict.fromkeys(self.options.static_sizes):
            try:
                self._static[size] = self._new_session(specialise(onnx_bytes, size, size))
            except Exception as exc:  # noqa: BLE001 - a graph it cannot specialise runs as it is
                _log.warning("no %dpx session of its own for %s (%s): the general session serves that size",
                             size, card.name, exc)
        first = next(iter(self._static.values()), None) or self.session
        self.providers = first.get_providers()
        inputs = first.get_inputs()
        outputs = first.get_outputs()
        self.input_name = card.input_name if card.input_name in {i.name for i in inputs} else inputs[0].name
        self.output_name = card.output_name if card.output_name in {o.name for o in outputs} else outputs[0].name

    def _new_session(self, onnx_bytes: bytes) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        threads = self.options.intra_op_threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0)
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = self.options.inter_op_threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if not self.options.allow_spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(onnx_bytes, sess_options=so, providers=_providers(self.options.provider))

    @property
    def session(self) -> Any:
        """The general session (any input size), created on first use."""
        if self._session is None:
            self._session = self._new_session(self._bytes)
        return self._session

    @property
    def static_sizes(self) -> tuple[int, ...]:
        """The sizes that run on a session of their own."""
        return tuple(self._static)

    @classmethod
    def from_repository(cls, repo: object, name: str, version: int, options: RuntimeOptions | None = None) -> "Classifier":
        """Load a checksum-verified version from a :class:`~service.core.repository.ModelRepository`."""
        loaded = repo.load(name, version)  # type: ignore[attr-defined]
        return cls(loaded.onnx_bytes, loaded.card, options)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, H, W) float32 -> (N, num_classes) float32 logits."""
        if not isinstance(batch, np.ndarray) or batch.dtype != np.float32:
            raise InvalidInput("input must be a float32 array")
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise InvalidInput(f"input must have shape (N, 3, H, W), got {list(batch.shape)}")
        if batch.shape[0] == 0:
            return np.zeros((0, self.card.num_classes), dtype=np.float32)
        h, w = batch.shape[2], batch.shape[3]
        session = self._static.get(h, self.session) if h == w else self.session
        (out,) = session.run([self.output_name], {self.input_name: batch})
        return np.asarray(out, dtype=np.float32).reshape(batch.shape[0], -1)

    def logits_bound(self, tensor: Any) -> np.ndarray:
        """A (N, 3, H, W) float32 tensor where it lives (a CUDA device or the host) -> (N, num_classes) host logits.

        The device path of :mod:`service.core.gpu_preprocess`: any DLPack producer (a DALI output) is
        wrapped by ``OrtValue.from_dlpack`` and bound with IO binding, so ONNX Runtime reads the input
        in place (no host round trip); only the logits are copied to the host. The caller keeps
        ``tensor`` alive until this returns.
        """
        import onnxruntime as ort

        binding = self.session.io_binding()
        shape = _bind_input(ort, binding, self.input_name, tensor)
        if len(shape) != 4 or shape[1] != 3:
            raise InvalidInput(f"input must have shape (N, 3, H, W), got {shape}")
        if shape[0] == 0:
            return np.zeros((0, self.card.num_classes), dtype=np.float32)
        binding.bind_output(self.output_name, "cpu")
        self.session.run_with_iobinding(binding)
        (out,) = binding.copy_outputs_to_cpu()
        return np.asarray(out, dtype=np.float32).reshape(shape[0], -1)


    def top_k(self, logits: np.ndarray, k: int = 5) -> list[list[Prediction]]:
        """Softmax scores of the k best classes per row."""
        if k < 1:
            raise InvalidInput(f"top_k must be >= 1, got {k}")
        k = min(k, logits.shape[-1])
        probs = softmax(logits.astype(np.float32, copy=True))
        idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        labels: Sequence[str] = self.card.labels
        return [
            [Prediction(int(i), labels[int(i)] if int(i) < len(labels) else str(int(i)), float(p[int(i)])) for i in row]
            for row, p in zip(idx, probs)
        ]


def _bind_input(ort: Any, binding: Any, name: str, tensor: Any, use_dlpack: bool = True) -> list[int]:
    """Bind ``tensor`` as input ``name`` without copying it; returns its shape.

    ``OrtValue.from_dlpack`` where ONNX Runtime has it; otherwise the raw pointer from the array
    interface (``__cuda_array_interface__`` on a GPU, ``__array_interface__`` on the host).
    """
    if use_dlpack and hasattr(ort.OrtValue, "from_dlpack") and hasattr(tensor, "__dlpack__"):
        value = ort.OrtValue.from_dlpack(tensor)
        if value.data_type() != "tensor(float)":
            raise InvalidInput(f"input must be float32, got {value.data_type()}")
        binding.bind_ortvalue_input(name, value)
        return [int(d) for d in value.shape()]
    iface = getattr(tensor, "__cuda_array_interface__", None)
    device = "cuda"
    if iface is None:
        iface, device = getattr(tensor, "__array_interface__", None), "cpu"
    if iface is None:
        raise InvalidInput(f"cannot bind a {type(tensor).__name__}: it offers neither DLPack nor an array interface")
    if np.dtype(iface["typestr"]) != np.float32:
        raise InvalidInput(f"input must be float32, got {np.dtype(iface['typestr'])}")
    if iface.get("strides") is not None:
        raise InvalidInput("input must be a dense (C-contiguous) tensor")
    shape = [int(d) for d in iface["shape"]]
    binding.bind_input(name, device, 0, np.float32, shape, int(iface["data"][0]))
    return shape
