"""``timm:<arch> --weights FILE``: a timm architecture with a local state dict.

Built with ``pretrained=False`` (nothing is downloaded). The number of
classes is read from the classifier weight timm's pretrained config names;
card defaults (input size, crop_pct, interpolation, mean/std converted to
0..255) come from that config too.

Example:
    >>> model, card = build_timm("resnet10t", "w.pth")           # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping

from service.core.card import INTERPOLATIONS, ModelCard
from service.core.errors import ExportError

from exporters.weights import infer_num_classes, library_model, load_state_dict

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["timm_defaults", "build_timm"]


def timm_defaults(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Card fields from a timm ``pretrained_cfg``: train size, crop_pct, interpolation, mean/std on 0..255."""
    input_size = cfg.get("input_size") or (3, 224, 224)
    interpolation = str(cfg.get("interpolation") or "bicubic")
    return dict(
        train_resolution=int(input_size[-1]),
        crop_pct=float(cfg.get("crop_pct") or 0.875),
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
        mean=tuple(float(m) * 255 for m in cfg.get("mean") or (0.485, 0.456, 0.406)),
        std=tuple(float(s) * 255 for s in cfg.get("std") or (0.229, 0.224, 0.225)),
    )


def build_timm(
    arch: str, weights: str | os.PathLike[str], labels_file: str | os.PathLike[str] | None = None
) -> tuple["nn.Module", ModelCard]:
    """The eval-mode model with the file's weights, and its default card.

    Raises:
        ExportError: unknown architecture, or weights that do not fit it.
    """
    import timm

    if not timm.is_model(arch):
        raise ExportError(f"unknown timm architecture {arch!r} (see timm.list_models())")
    state = load_state_dict(weights)
    probe = timm.create_model(arch, pretrained=False)
    cfg = dict(probe.pretrained_cfg or {})
    classifier = cfg.get("classifier")
    key = f"{classifier}.weight" if isinstance(classifier, str) else None
    num_classes = infer_num_classes(state, key)
    model = probe if num_classes == probe.num_classes else timm.create_model(arch, pretrained=False,
                                                                             num_classes=num_classes)
    return library_model(model, state, "timm", arch, num_classes, weights, labels_file, timm_defaults(cfg))
