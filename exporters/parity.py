"""Exports prove themselves: ONNX Runtime vs PyTorch on real photos and generated inputs.

Inputs go through :class:`service.core.preprocess.Preprocessor` (the one
preprocessing implementation the service uses) at the native resolution and
at 0.875x and 1.3x of it, because the robustness module feeds other sizes and
padding frozen at trace time silently breaks them. An export passes only if
the largest absolute logit difference is within the tolerance and the top-1
class agrees on every input.

Example:
    >>> parity = check_parity(model, onnx_bytes, card)          # doctest: +SKIP
    >>> parity.max_abs_diff < 1e-3
    True
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from service.core.card import ModelCard, Parity
from service.core.errors import ExportError, ParityError
from service.core.preprocess import Preprocessor

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = [
    "DEFAULT_TOLERANCE",
    "FP16_TOLERANCE",
    "FP16_MIN_AGREEMENT",
    "RESOLUTION_FACTORS",
    "PHOTOS",
    "parity_resolutions",
    "photo_inputs",
    "generated_inputs",
    "parity_inputs",
    "torch_logits",
    "check_parity",
]

DEFAULT_TOLERANCE = 1e-3
FP16_TOLERANCE = 0.5  # half precision drifts; what must hold is the answer (FP16_MIN_AGREEMENT)
FP16_MIN_AGREEMENT = 0.995
RESOLUTION_FACTORS = (1.0, 0.875, 1.3)
# colour photos that scikit-image ships inside its wheel (no pooch download)
PHOTOS = ("coffee", "chelsea", "astronaut", "rocket", "immunohistochemistry", "hubble_deep_field")


def parity_resolutions(native: int, factors: Sequence[float] = RESOLUTION_FACTORS) -> tuple[int, ...]:
    """The native resolution and the scaled ones, rounded, without duplicates, in order."""
    out: list[int] = []
    for factor in factors:
        size = max(8, int(round(native * factor)))
        if size not in out:
            out.append(size)
    return tuple(out)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def photo_inputs(names: Sequence[str] = PHOTOS) -> list[tuple[str, bytes]]:
    """The bundled scikit-image colour photos as PNG bytes, ``(name, bytes)``.

    Raises:
        ExportError: scikit-image is missing or none of the photos loads offline.
    """
    try:
        from skimage import data
    except ImportError as exc:
        raise ExportError("the parity check needs scikit-image for its real photos (the 'export' extra)") from exc
    photos = []
    for name in names:
        try:
            array = np.asarray(getattr(data, name)())
        except Exception:  # a photo that needs a download is skipped, never fetched  # noqa: BLE001
            continue
        if array.ndim == 3 and array.shape[2] == 3 and array.dtype == np.uint8:
            photos.append((f"skimage:{name}", _png(array)))
    if not photos:
        raise ExportError(f"none of the scikit-image photos {list(names)} is available offline")
    return photos


def generated_inputs(seed: int = 0) -> list[tuple[str, bytes]]:
    """Synthetic images that stress other statistics than photos: noise, gradients, a checkerboard."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:360, 0:480].astype(np.float32)
    gradient = np.stack([xx / 479 * 255, yy / 359 * 255, (1 - xx / 479) * 255], axis=-1).astype(np.uint8)
    checker = ((np.indices((320, 320)).sum(axis=0) // 20) % 2).astype(np.uint8)
    board = np.stack([checker * 230 + 10, (1 - checker) * 200 + 30, checker * 90 + 60], axis=-1).astype(np.uint8)
    return [("generated:noise", _png(noise)), ("generated:gradient", _png(gradient)),
            ("generated:checkerboard", _png(board))]


def parity_inputs() -> list[tuple[str, bytes]]:
    """Real photos followed by generated inputs."""
    return photo_inputs() + generated_inputs()


def torch_logits(module: "nn.Module", batch: np.ndarray) -> np.ndarray:
    """Logits from PyTorch in eval mode, without gradients."""
    import torch

    module.eval()
    with torch.no_grad():
        out = module(torch.from_numpy(batch))
    return out.detach().cpu().float().numpy().reshape(batch.shape[0], -1)


def check_parity(
    module: "nn.Module",
    onnx_bytes: bytes,
    card: ModelCard,
    *,
    resolutions: Sequence[int] | None = None,
    inputs: Sequence[tuple[str, bytes]] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    min_agreement: float = 1.0,
) -> Parity:
    """Compare ONNX Runtime with PyTorch; return the record or raise.

    Args:
        module: the PyTorch model that was exported.
        onnx_bytes: the exported model.
        card: says how to preprocess (its resolution is the native one).
        resolutions: input sizes to compare at (default: native, 0.875x, 1.3x).
        inputs: ``(name, encoded image)`` pairs (default: :func:`parity_inputs`).
        tolerance: the largest allowed absolute logit difference.
        min_agreement: the smallest allowed top-1 agreement (1.0: identical top-1
            everywhere; fp16 exports use 0.995).

    Raises:
        ParityError: a difference over ``tolerance`` or any top-1 disagreement,
            with the numbers and where they occurred.
        ExportError: the model's output does not match the card's label count.
    """
    from service.core.runtime import Classifier, RuntimeOptions

    sizes = tuple(resolutions) if resolutions else parity_resolutions(card.resolution)
    items = list(inputs) if inputs is not None else parity_inputs()
    if not items:
        raise ValueError("check_parity needs at least one input image")
    session = Classifier(onnx_bytes, card, RuntimeOptions(provider="cpu"))
    worst = 0.0
    worst_at = ""
    total = agree = 0
    disagreements: list[str] = []
    for size in sizes:
        pre = Preprocessor(card, resolution=size)
        batch = pre.to_tensor([pre.prepare(data).pixels for _, data in items])
        expected = torch_logits(module, batch)
        actual = session.logits(batch)
        if expected.shape != actual.shape:
            raise ParityError(f"at {size}px PyTorch gives logits {expected.shape}, ONNX Runtime {actual.shape}")
        if expected.shape[1] != card.num_classes:
            raise ExportError(f"the model has {expected.shape[1]} outputs but the card has {card.num_classes} labels")
        if not (np.isfinite(expected).all() and np.isfinite(actual).all()):
            raise ParityError(f"non-finite logits at {size}px")
        diff = np.abs(expected.astype(np.float64) - actual.astype(np.float64)).max(axis=1)
        for (name, _), d, e, a in zip(items, diff, expected.argmax(1), actual.argmax(1)):
            total += 1
            agree += int(e == a)
            if e != a:
                disagreements.append(f"{name}@{size}px PyTorch {int(e)} vs ONNX {int(a)}")
            if d > worst:
                worst, worst_at = float(d), f"{name}@{size}px"
    agreement = agree / total
    if worst > tolerance or agreement < min_agreement:
        shown = "; ".join(disagreements[:5]) + (" ..." if len(disagreements) > 5 else "")
        raise ParityError(
            f"ONNX Runtime differs from PyTorch: max abs logit difference {worst:.3g} at {worst_at} "
            f"(tolerance {tolerance:g}, over by {max(0.0, worst - tolerance):.3g}); top-1 agreement "
            f"{agree}/{total} = {agreement:.3f}" + (f" ({shown})" if shown else "")
        )
    return Parity(
        max_abs_diff=worst,
        top1_agreement=agreement,
        images=tuple(name for name, _ in items),
        resolutions=sizes,
        tolerance=tolerance,
    )
