"""PyTorch module -> checked ONNX bytes with dynamic batch, height and width.

Uses the TorchScript-based exporter (``dynamo=False``): it needs no extra
package and traces shape arithmetic (such as TF-"SAME" padding) into the
graph, so the exported model stays correct at every input size. The parity
check (:mod:`exporters.parity`) proves that at several resolutions.

Example:
    >>> onnx_bytes = to_onnx(model.eval(), resolution=224)     # doctest: +SKIP
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

from service.core.errors import ExportError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["DEFAULT_OPSET", "INPUT_NAME", "OUTPUT_NAME", "DYNAMIC_AXES", "to_onnx", "check_onnx"]

DEFAULT_OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DYNAMIC_AXES = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch"}}


def check_onnx(onnx_bytes: bytes) -> None:
    """Run the ONNX checker (full check, with shape inference).

    Raises:
        ExportError: the bytes are not a valid ONNX model.
    """
    import onnx

    try:
        model = onnx.load_from_string(onnx_bytes)
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, InferenceError...
        raise ExportError(f"ONNX checker rejected the model: {exc}") from exc


def to_onnx(module: "nn.Module", resolution: int, *, opset: int = DEFAULT_OPSET) -> bytes:
    """Export ``module`` (put in eval mode) to ONNX and check it.

    The graph has input ``input`` (N, 3, H, W) float32 and output ``logits``
    (N, classes), with N, H and W dynamic. ``resolution`` is only the size of
    the tracing example.

    Raises:
        ExportError: tracing/export failed or the checker rejected the result.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an integer >= 8, got {resolution!r}")
    if not 13 <= opset <= 23:
        raise ValueError(f"opset must be between 13 and 23, got {opset}")
    module.eval()
    example = torch.zeros(1, 3, resolution, resolution)
    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # shape arithmetic traced on purpose (dynamic H/W); parity proves the result
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # dynamo=False is deliberate (see the module docstring); torch's legacy exporter
            # warns about itself and its own internals
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module,
                (example,),
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=DYNAMIC_AXES,
                do_constant_folding=True,
            )
    except Exception as exc:  # the exporter raises many types
        raise ExportError(f"torch.onnx.export failed for {type(module).__name__}: {exc}") from exc
    onnx_bytes = buf.getvalue()
    check_onnx(onnx_bytes)
    return onnx_bytes
