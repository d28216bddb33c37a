"""``onnx:<file>``: bring an existing ONNX classifier into the repository with a card.

No PyTorch is involved, so there is no reference to prove parity against;
instead the file must pass the ONNX checker and an ONNX Runtime smoke test on
real photos at two resolutions (the native one and 1.3x), which also proves
that height and width are dynamic. The card's ``parity`` stays empty.

Example:
    >>> card = import_onnx("net.onnx", {"train_resolution": 224, "mean": (127,) * 3,
    ...                                 "std": (128,) * 3}, repo)             # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from service.core.card import ModelCard, Source
from service.core.errors import CardError, ExportError
from service.core.preprocess import Preprocessor
from service.core.repository import ModelRepository, sha256_bytes, validate_name

from exporters.labels import resolve_labels
from exporters.onnx_export import check_onnx
from exporters.parity import generated_inputs, parity_resolutions, photo_inputs

__all__ = ["REQUIRED_FIELDS", "name_from_path", "onnx_io", "smoke_test", "onnx_card", "import_onnx"]

REQUIRED_FIELDS = ("train_resolution", "mean", "std")


def onnx_io(onnx_bytes: bytes) -> tuple[str, str, int | None]:
    """Input name, output name and the class count (None when the output's last axis is symbolic)."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(model.graph.output) < 1:
        raise ExportError(f"expected one image input and a logits output, found {len(inputs)} inputs "
                          f"and {len(model.graph.output)} outputs")
    output = model.graph.output[0]
    dims = output.type.tensor_type.shape.dim
    classes = int(dims[-1].dim_value) if dims and dims[-1].HasField("dim_value") else None
    return inputs[0].name, output.name, classes


def smoke_test(onnx_bytes: bytes, card: ModelCard, resolutions: Sequence[int]) -> None:
    """Run ONNX Runtime on real photos (and generated inputs) at each resolution.

    Raises:
        ExportError: the model fails to run, returns the wrong shape, or non-finite logits.
    """
    from service.core.runtime import Classifier, RuntimeOptions

    try:
        items = photo_inputs()[:3] + generated_inputs()[:1]
    except ExportError:  # scikit-image missing: generated inputs still exercise the graph
        items = generated_inputs()
    try:
        session = Classifier(onnx_bytes, card, RuntimeOptions(provider="cpu"))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ExportError(f"ONNX Runtime cannot load the model: {exc}") from exc
    for size in resolutions:
        pre = Preprocessor(card, resolution=size)
        batch = pre.to_tensor([pre.prepare(data).pixels for _, data in items])
        try:
            logits = session.logits(batch)
        except Exception as exc:  # noqa: BLE001 - shape errors come from onnxruntime
            raise ExportError(
                f"ONNX Runtime failed at {size}x{size} (Steady needs dynamic batch, height and width): {exc}"
            ) from exc
        if logits.shape != (len(items), card.num_classes):
            raise ExportError(f"at {size}px the model returns {logits.shape}, expected {(len(items), card.num_classes)}"
                              " (batch, one logit per label)")
        if not np.isfinite(logits).all():
            raise ExportError(f"non-finite logits at {size}px")


def onnx_card(onnx_bytes: bytes, path: Path, fields: Mapping[str, Any],
              labels_file: str | os.PathLike[str] | None = None) -> ModelCard:
    """The card for an ONNX file from user fields; the graph's I/O names are taken from the file.

    Raises:
        CardError: a required field (resolution, mean, std) is missing: they are never guessed.
    """
    missing = [f for f in REQUIRED_FIELDS if fields.get(f) is None]
    if missing:
        raise CardError(f"onnx source needs {missing} (flags --resolution/--mean/--std or --card FILE): "
                        "preprocessing of an ONNX file is never guessed")
    input_name, output_name, classes = onnx_io(onnx_bytes)
    values = dict(fields)
    if "labels" not in values:
        if classes is None:
            raise CardError("the model's class count is not in its output shape: give labels (--labels or --card)")
        values["labels"] = resolve_labels(classes, labels_file)
    values.setdefault("name", name_from_path(path))
    return ModelCard(
        input_name=input_name,
        output_name=output_name,
        source=Source(kind="onnx", architecture=path.name, weights_sha256=sha256_bytes(onnx_bytes)),
        **values,
    )


def name_from_path(path: Path) -> str:
    """A valid model name from a file name: other characters become ``-``."""
    stem = "".join(c if c.isalnum() or c in "._-" else "-" for c in path.stem).strip(".-_") or "model"
    return stem[:64]


def import_onnx(
    path: str | os.PathLike[str],
    fields: Mapping[str, Any],
    repo: ModelRepository,
    name: str | None = None,
    *,
    labels_file: str | os.PathLike[str] | None = None,
) -> ModelCard:
    """Check, smoke-test and store an ONNX classifier; return the stored card.

    Raises:
        ExportError: unreadable file, checker failure, or smoke test failure.
        CardError: missing or invalid card fields.
    """
    path = Path(path)
    try:
        onnx_bytes = path.read_bytes()
    except OSError as exc:
        raise ExportError(f"cannot read ONNX file {path}: {exc}") from exc
    check_onnx(onnx_bytes)
    card = onnx_card(onnx_bytes, path, fields, labels_file)
    name = validate_name(name or card.name)
    native = card.resolution
    smoke_test(onnx_bytes, card, parity_resolutions(native, (1.0, 1.3)))
    return repo.add(name, onnx_bytes, card.replace(name=name))
