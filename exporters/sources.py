"""One entry point for every export source named on the command line.

``SOURCE`` is one of ``efficientnet-lite0|1|2``, ``torchvision:<arch>``,
``timm:<arch>`` or ``onnx:<file>``. :class:`ExportOptions` is the typed
configuration the CLI builds once and passes here.

Example:
    >>> card = export_source("efficientnet-lite0", ModelRepository("models"), ExportOptions())  # doctest: +SKIP
    >>> f"{card.name}/{card.version}"                                                          # doctest: +SKIP
    'efficientnet-lite0/1'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.core.card import ModelCard
from service.core.errors import ExportError, InvalidInput
from service.core.repository import ModelRepository, validate_name

from exporters.card_fields import merge_fields, read_card_file
from exporters.labels import read_labels_file

__all__ = ["SOURCE_KINDS", "ExportOptions", "parse_source", "default_name", "export_source"]

SOURCE_KINDS = ("efficientnet-lite", "torchvision", "timm", "onnx")
_LITE = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


@dataclass(frozen=True)
class ExportOptions:
    """Everything ``steady export`` accepts besides SOURCE and --repo.

    ``None`` means "use the source's default". ``mean``/``std`` are on 0..255.
    """

    name: str | None = None
    weights: Path | None = None
    card_file: Path | None = None
    labels_file: Path | None = None
    resolution: int | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    opset: int = 17
    precision: str = "fp32"
    calibration: Path | None = None  # int8: the folder of photos to calibrate on
    quantize: Any = None  # int8: exporters.quantize.QuantizeOptions (default: its defaults)

    def user_fields(self) -> dict[str, Any]:
        """Card fields from the YAML file, overridden by flags."""
        flags: dict[str, Any] = dict(train_resolution=self.resolution, crop_pct=self.crop_pct,
                                     interpolation=self.interpolation, mean=self.mean, std=self.std)
        if self.labels_file is not None:
            flags["labels"] = read_labels_file(self.labels_file)
        if self.resolution is not None:
            flags["test_resolution"] = self.resolution
        return merge_fields(read_card_file(self.card_file) if self.card_file else None, flags)


def parse_source(source: str) -> tuple[str, str]:
    """``SOURCE`` -> ``(kind, argument)``.

    Raises:
        ExportError: an unknown form (the message lists the accepted ones).
    """
    if source in _LITE:
        return "efficientnet-lite", source
    kind, sep, arg = source.partition(":")
    if sep and kind in ("torchvision", "timm", "onnx") and arg:
        return kind, arg
    raise ExportError(
        f"unknown source {source!r}: use efficientnet-lite0|1|2, torchvision:<arch>, timm:<arch> or onnx:<file>"
    )


def default_name(source: str) -> str:
    """The repository name a source gets without --name: lite -> itself, lib:<arch> -> arch, onnx -> file stem."""
    kind, arg = parse_source(source)
    if kind == "efficientnet-lite":
        return arg
    if kind == "onnx":
        from exporters.onnx_source import name_from_path

        return name_from_path(Path(arg))
    return arg


def export_source(source: str, repo: ModelRepository, options: ExportOptions) -> ModelCard:
    """Export ``source`` into ``repo``; return the stored card (with its version).

    Raises:
        ExportError: bad source, missing weights, export or smoke-test failure.
        ParityError: ONNX Runtime and PyTorch disagree.
        CardError: invalid card fields.
    """
    kind, arg = parse_source(source)
    fields = options.user_fields()
    # --name, else the card file's name, else the source's; checked before any slow work
    name = validate_name(options.name or fields.pop("name", None) or default_name(source))
    if kind == "onnx":
        from exporters.onnx_source import import_onnx

        if options.precision != "fp32":
            raise ExportError("--precision applies to PyTorch sources; an onnx: file is stored as it is "
                              "(steady quantize makes an int8 version of a stored fp32 one)")
        return import_onnx(arg, fields, repo, name)
    if options.precision == "int8" and options.calibration is None:
        raise InvalidInput("--precision int8 needs --data DIR: the photos to calibrate on")

    from exporters.module_export import export_module

    if kind == "efficientnet-lite":
        from exporters.efficientnet_lite import build_lite

        module, card = build_lite(arg, options.weights)
    else:
        if options.weights is None:
            raise ExportError(f"{source} needs --weights FILE (a state dict; nothing is downloaded)")
        if kind == "torchvision":
            from exporters.torchvision_source import build_torchvision

            module, card = build_torchvision(arg, options.weights, options.labels_file)
        else:
            from exporters.timm_source import build_timm

            module, card = build_timm(arg, options.weights, options.labels_file)
    if "labels" in fields and len(fields["labels"]) != card.num_classes:
        raise ExportError(f"{len(fields['labels'])} labels given but the model has {card.num_classes} classes")
    if "train_resolution" in fields and "test_resolution" not in fields:
        fields["test_resolution"] = fields["train_resolution"]
    return export_module(module, card.replace(**fields), repo, name, opset=options.opset, precision=options.precision,
                         calibration=options.calibration, quantize=options.quantize)
