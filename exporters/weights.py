"""Reading state-dict files safely and mapping them onto a module by position.

Weights are only ever read with ``torch.load(weights_only=True)``: a ``.pth``
file is data, never code. Position mapping lets the maintained architecture
code of one library (timm) carry weights saved by another (lukemelas
EfficientNet-PyTorch) when both hold the same tensors in the same order.

Example:
    >>> state = load_state_dict(path)                         # doctest: +SKIP
    >>> module.load_state_dict(map_by_position(state, module))  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Mapping

from service.core.errors import ExportError
from service.core.repository import sha256_file

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from service.core.card import ModelCard

__all__ = ["SKIPPED_SUFFIXES", "file_sha256", "load_state_dict", "map_by_position", "infer_num_classes", "load_into"]

SKIPPED_SUFFIXES = ("num_batches_tracked",)

# one sha256 helper for the whole project: the repository's
file_sha256 = sha256_file



def load_state_dict(path: str | os.PathLike[str]) -> "OrderedDict[str, torch.Tensor]":
    """Load a state dict from ``path`` with ``weights_only=True`` onto the CPU.

    Accepts a bare state dict or a checkpoint holding one under ``state_dict``
    or ``model`` (the two common wrappers).

    Raises:
        ExportError: the file is missing, not loadable as weights, or holds no tensors.
    """
    import torch

    if not os.path.isfile(path):
        raise ExportError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError...)
        raise ExportError(f"cannot load weights from {path} (weights_only=True): {exc}") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ExportError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    tensors = OrderedDict((str(k), v) for k, v in obj.items() if isinstance(v, torch.Tensor))
    if not tensors:
        raise ExportError(f"{path} holds no tensors")
    return tensors


def _significant(state: Mapping[str, "torch.Tensor"]) -> list[tuple[str, "torch.Tensor"]]:
    return [(k, v) for k, v in state.items() if not k.endswith(SKIPPED_SUFFIXES)]


def map_by_position(source: Mapping[str, "torch.Tensor"], module: "nn.Module") -> "OrderedDict[str, torch.Tensor]":
    """Rename ``source`` tensors to ``module``'s keys, pairing them by position.

    ``num_batches_tracked`` buffers are ignored on both sides (they do not
    affect inference) and the module's own values are kept for them.

    Returns:
        A state dict with exactly the module's keys, ready for ``load_state_dict(strict=True)``.

    Raises:
        ExportError: the tensor counts differ, or any position has a different shape
            (the message names both keys and shapes).
    """
    target_state = module.state_dict()
    src = _significant(source)
    dst = _significant(target_state)
    if len(src) != len(dst):
        raise ExportError(
            f"cannot map weights by position: the file has {len(src)} tensors, "
            f"the architecture {len(dst)} (num_batches_tracked excluded)"
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict(target_state)
    for position, ((src_key, src_val), (dst_key, dst_val)) in enumerate(zip(src, dst)):
        if tuple(src_val.shape) != tuple(dst_val.shape):
            raise ExportError(
                f"cannot map weights by position: tensor {position} {src_key!r} has shape "
                f"{tuple(src_val.shape)} but the architecture's {dst_key!r} has {tuple(dst_val.shape)}"
            )
        mapped[dst_key] = src_val.to(dtype=dst_val.dtype)
    return mapped


def infer_num_classes(state: Mapping[str, "torch.Tensor"], classifier_key: str | None = None) -> int:
    """Number of classes: rows of the classifier weight.

    ``classifier_key`` names the classifier's weight (e.g. ``fc.weight``); when
    it is absent from ``state``, the last tensor of two or more dimensions whose
    name ends in ``weight`` is taken (linear or 1x1-conv heads alike).

    Raises:
        ExportError: no candidate weight exists.
    """
    if classifier_key and classifier_key in state and state[classifier_key].ndim >= 2:
        return int(state[classifier_key].shape[0])
    candidates = [v for k, v in state.items() if k.endswith("weight") and v.ndim >= 2]
    if not candidates:
        raise ExportError("cannot infer the number of classes: the weights hold no classifier weight")
    return int(candidates[-1].shape[0])


def load_into(module: "nn.Module", state: Mapping[str, "torch.Tensor"], what: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with an :class:`ExportError` naming ``what``."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        text = str(exc)
        raise ExportError(f"weights do not fit {what}: {text[:600]}{'...' if len(text) > 600 else ''}") from exc


def library_model(model: "nn.Module", state: Mapping[str, "torch.Tensor"], kind: str, arch: str, num_classes: int,
                  weights: str | os.PathLike[str], labels_file: str | os.PathLike[str] | None,
                  defaults: Mapping[str, Any]) -> tuple["nn.Module", "ModelCard"]:
    """Load ``state`` into a library architecture (``torchvision`` or ``timm``) and card it with the library's
    own preprocessing ``defaults``; returns the model in eval mode and its card."""
    from exporters.labels import resolve_labels
    from service.core.card import ModelCard, Source

    load_into(model, state, f"{kind}:{arch} with {num_classes} classes")
    model.eval()
    card = ModelCard(
        name=arch,
        labels=resolve_labels(num_classes, labels_file),
        source=Source(kind=kind, architecture=arch, weights_sha256=file_sha256(weights)),
        **defaults,
    )
    return model, card
