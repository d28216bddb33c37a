"""``torchvision:<arch> --weights FILE``: a torchvision architecture with a local state dict.

The number of classes is read from the classifier weight in the file. Card
defaults come from the transforms torchvision documents for the architecture's
DEFAULT ImageNet weights (crop and resize size, interpolation, mean/std),
which needs no download; anything may be overridden.

Example:
    >>> model, card = build_torchvision("mobilenet_v3_small", "w.pth")   # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from service.core.card import ModelCard
from service.core.errors import ExportError

from exporters.weights import infer_num_classes, library_model, load_state_dict

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["torchvision_defaults", "build_torchvision"]

_FALLBACK: dict[str, Any] = dict(train_resolution=224, crop_pct=0.875, interpolation="bilinear",
                                 mean=(0.485 * 255, 0.456 * 255, 0.406 * 255),
                                 std=(0.229 * 255, 0.224 * 255, 0.225 * 255))


def _last_weight_key(module: "nn.Module") -> str | None:
    keys = [k for k, v in module.state_dict().items() if k.endswith("weight") and v.ndim >= 2]
    return keys[-1] if keys else None


def torchvision_defaults(arch: str) -> dict[str, Any]:
    """Card fields from the DEFAULT weights' documented transforms (no download), else ImageNet defaults."""
    import torchvision

    try:
        transforms = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        crop = int(transforms.crop_size[0])
        resize = int(transforms.resize_size[0])
        return dict(
            train_resolution=crop,
            crop_pct=round(crop / resize, 6),
            interpolation=str(transforms.interpolation.value),
            mean=tuple(float(m) * 255 for m in transforms.mean),
            std=tuple(float(s) * 255 for s in transforms.std),
        )
    except (ValueError, KeyError, AttributeError, TypeError, IndexError):
        return dict(_FALLBACK)


def build_torchvision(
    arch: str, weights: str | os.PathLike[str], labels_file: str | os.PathLike[str] | None = None
) -> tuple["nn.Module", ModelCard]:
    """The eval-mode model with the file's weights, and its default card.

    Raises:
        ExportError: unknown architecture, or weights that do not fit it.
    """
    import torchvision

    if arch not in torchvision.models.list_models():
        raise ExportError(f"unknown torchvision architecture {arch!r} (see torchvision.models.list_models())")
    state = load_state_dict(weights)
    probe = torchvision.models.get_model(arch, weights=None)
    num_classes = infer_num_classes(state, _last_weight_key(probe))
    model = probe if num_classes == 1000 else torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    return library_model(model, state, "torchvision", arch, num_classes, weights, labels_file, torchvision_defaults(arch))
