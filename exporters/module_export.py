"""The Python API: any ``nn.Module`` -> a parity-checked, carded version in a repository.

Every other PyTorch source (EfficientNet-Lite, torchvision, timm) builds a
module and a card, then comes here.

Example:
    >>> from service.core.card import ModelCard
    >>> from service.core.repository import ModelRepository
    >>> card = ModelCard(name="my-net", labels=("cat", "dog"), train_resolution=224,
    ...                  mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4))  # doctest: +SKIP
    >>> final = export_module(net, card, ModelRepository("models"))                     # doctest: +SKIP
    >>> final.version, final.parity.max_abs_diff                                        # doctest: +SKIP
    (1, 4.3e-06)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from service.core.card import ModelCard
from service.core.repository import ModelRepository, validate_name

from exporters.onnx_export import DEFAULT_OPSET, INPUT_NAME, OUTPUT_NAME, to_onnx
from exporters.parity import DEFAULT_TOLERANCE, FP16_MIN_AGREEMENT, FP16_TOLERANCE, check_parity

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["export_module"]

_log = logging.getLogger(__name__)


def export_module(
    module: "nn.Module",
    card: ModelCard,
    repo: ModelRepository,
    name: str | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    resolutions: Sequence[int] | None = None,
    tolerance: float | None = None,
    precision: str = "fp32",
    calibration: str | Path | None = None,
    quantize: Any = None,
) -> ModelCard:
    """Export ``module`` to ONNX, prove parity, and store a new version.

    Args:
        module: a classifier taking (N, 3, H, W) float32 normalised per ``card``
            and returning (N, len(card.labels)) logits. It is put in eval mode.
        card: how to feed the model (labels, resolution, crop_pct, interpolation,
            mean/std on 0..255, source). ``version``, ``onnx_sha256``, ``opset``
            and ``parity`` are filled in here.
        repo: where to store the version.
        name: model name in the repository (default: ``card.name``).
        opset: ONNX opset.
        resolutions: parity resolutions (default: native, 0.875x, 1.3x).
        tolerance: largest allowed absolute logit difference (default 1e-3 for fp32,
            0.5 for fp16).
        precision: ``fp32``, or ``fp16``: weights and activations in half precision
            inside the graph (inputs and logits stay float32), for GPUs. An fp16 export is
            compared with the float32 PyTorch module and must agree on top-1 for at least
            99.5% of the inputs. ``int8``: the fp32 export (parity-checked against PyTorch) is
            quantized by :mod:`exporters.quantize` on the photos in ``calibration``; only the int8
            version is stored, with its parity against the fp32 graph.
        calibration: the folder of photos an int8 export is calibrated on.
        quantize: :class:`exporters.quantize.QuantizeOptions` of an int8 export (default: its defaults).

    Returns:
        The stored card, with its version and parity record.

    Raises:
        InvalidName: ``name`` is not a valid model name (checked before exporting).
        ExportError: export or the ONNX checker failed.
        ParityError: ONNX Runtime and PyTorch disagree, with the numbers.
    """
    name = validate_name(name or card.name)
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    if precision == "int8" and calibration is None:
        raise ValueError("an int8 export needs the calibration photos (calibration=FOLDER)")
    card = card.replace(name=name, opset=opset, input_name=INPUT_NAME, output_name=OUTPUT_NAME,
                        precision="fp32" if precision == "int8" else precision)
    module.eval()
    if precision == "fp16":
        onnx_bytes = to_onnx(_half_precision(module), card.resolution, opset=opset)
        parity = check_parity(module, onnx_bytes, card, resolutions=resolutions,
                              tolerance=FP16_TOLERANCE if tolerance is None else tolerance,
                              min_agreement=FP16_MIN_AGREEMENT)
    else:
        onnx_bytes = to_onnx(module, card.resolution, opset=opset)
        parity = check_parity(module, onnx_bytes, card, resolutions=resolutions,
                              tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance)
    _log.info("%s parity: max abs logit difference %.3g, top-1 agreement %.3f on %d inputs at %s px",
              name, parity.max_abs_diff, parity.top1_agreement, len(parity.images), parity.resolutions)
    if precision == "int8":
        from exporters.quantize import QuantizeOptions, quantize_onnx

        int8, quantization, parity = quantize_onnx(onnx_bytes, card, calibration, quantize or QuantizeOptions())
        return repo.add(name, int8, card.replace(precision="int8", quantization=quantization, parity=parity))
    return repo.add(name, onnx_bytes, card.replace(parity=parity))


def _half_precision(module: "nn.Module") -> "nn.Module":
    """A float32-in, float32-out wrapper around a half-precision copy of ``module``."""
    import copy

    import torch

    class HalfPrecision(torch.nn.Module):
        def __init__(self, inner: "nn.Module") -> None:
            super().__init__()
            self.inner = copy.deepcopy(inner).half().eval()

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            return self.inner(x.half()).float()

    return HalfPrecision(module).eval()
