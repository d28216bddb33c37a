"""``steady tune``: fine-tune a stored version into a new, parity-checked version (FixRes or consistency).

The photos are split by a seeded hash of their path (:func:`service.core.images.half_of`, the split int8 calibration uses too): the model
sees only the ``tune`` half, and its card records the split so ``steady score --split holdout``
judges it on the other half only. Training views are boxes of the photos through the one
preprocessing path (:mod:`exporters.tune_views`).

Methods (``fixres``, Touvron et al. 2019; ``consistency``, shift/zoom consistency from
unlabelled photos) and their recipes are described in :mod:`exporters.tune_train`. The teacher
is the source version's own ONNX model. Runs are deterministic for a seed on one device.

Example:
    >>> config = TuneConfig(method="consistency", steps=200)
    >>> card = tune_version(repo, "efficientnet-lite0", 1, "photos/", None, config)   # doctest: +SKIP
    >>> card.tune.holdout_images                                                       # doctest: +SKIP
    105
"""

from __future__ import annotations

import io
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from robustness.data import load_dataset, photos_fingerprint, select_split
from service.core.card import ModelCard, Source, Tune
from service.core.errors import BoundFileError, ExportError
from service.core.repository import ModelRepository, read_bound_json, sha256_bytes

from exporters.tune_train import TuneConfig, train
from exporters.tune_views import TunePhotos, onnx_teacher

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

__all__ = ["TuneConfig", "fixres_resolution", "tune_module", "tune_version"]

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- resolution, records
def fixres_resolution(repo: ModelRepository, card: ModelCard) -> tuple[int, str]:
    """The FixRes resolution from the source's ``robustness.json`` sweep and why: the most accurate
    resolution above the card's (ties: the smaller).

    Raises:
        ExportError: no current robustness.json, no labelled sweep, or no resolution above the card's.
    """
    assert card.version is not None and card.onnx_sha256 is not None
    what = f"{card.name}/{card.version}"
    try:
        doc = read_bound_json(repo.version_dir(card.name, card.version), "robustness.json", card.onnx_sha256)
    except BoundFileError as exc:
        raise ExportError(f"fixres needs --resolution N or a FixRes sweep in {what}'s robustness.json "
                          f"(`steady score --protocols resolution`): {exc}") from exc
    policy = (doc.get("chosen") or {}).get("policy", "center")
    sweep = doc.get("protocols", {}).get("resolution", {}).get(policy, {}).get("resolutions", [])
    rows = [r for r in sweep if r["resolution"] > card.resolution and r.get("accuracy")]
    if not rows:
        raise ExportError(f"{what}'s robustness.json has no labelled FixRes sweep above {card.resolution} px: "
                          "score it with labels and --protocols resolution, or pass --resolution N")
    best = sorted(rows, key=lambda r: (-r["accuracy"]["value"], r["resolution"]))[0]
    split = (doc.get("data") or {}).get("split") or {}
    why = (f"robustness.json sweep of v{card.version} ({policy}, {doc['data']['images']} photos, split "
           f"{split.get('name', 'all')}): most accurate above {card.resolution} px, top-1 "
           f"{best['accuracy']['value']:.3f} at {best['resolution']} px")
    return int(best["resolution"]), why


def _weights_bytes(module: "nn.Module") -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getvalue()


def _check_module(module: "nn.Module", card: ModelCard, repo: ModelRepository) -> None:
    """Refuse a module that is not the stored version's model (ONNX Runtime vs PyTorch on two photos)."""
    from exporters.parity import DEFAULT_TOLERANCE, check_parity, photo_inputs
    from service.core.errors import ParityError

    assert card.version is not None
    loaded = repo.load(card.name, card.version)
    tolerance = card.parity.tolerance if card.parity is not None else DEFAULT_TOLERANCE
    try:
        check_parity(module, loaded.onnx_bytes, card, resolutions=(card.resolution,), inputs=photo_inputs()[:2],
                     tolerance=tolerance, min_agreement=1.0 if card.precision == "fp32" else 0.0)
    except ParityError as exc:
        raise ExportError(f"the module is not the model of {card.name}/{card.version}: {exc}") from exc


def tune_module(
    module: "nn.Module",
    card: ModelCard,
    repo: ModelRepository,
    data: str | os.PathLike[str],
    config: TuneConfig = TuneConfig(),
    labels: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    progress: bool = False,
    save_weights: str | os.PathLike[str] | None = None,
) -> ModelCard:
    """Tune ``module`` (the PyTorch model of the stored version ``card``) and store a new version.

    Args:
        module: the model the version was exported from; checked against the stored ONNX first.
        card: the stored card of that version (with ``version`` and ``onnx_sha256``).
        repo: the repository holding it; the new version goes there too.
        data: the photo folder; only its ``tune`` half (seeded path hash) is used.
        config: method and recipe.
        labels: CSV ``file,class_index`` (fixres uses it for cross-entropy; consistency ignores it).
        name: model name of the new version (default: the source's).
        progress: a progress bar on stderr.
        save_weights: also write the tuned state dict here (its sha256 is the new card's
            ``source.weights_sha256``, so the new version can be tuned again from it).

    Returns:
        The stored card of the new version, with its ``tune`` record and parity record.

    Raises:
        ExportError: an unstored card, a module that is not the version's model, no photos in the
            tune half, a missing FixRes resolution, or a diverging loss.
        ParityError: the tuned export differs from PyTorch.
    """
    from exporters.module_export import export_module

    if card.version is None or card.onnx_sha256 is None:
        raise ExportError("tune_module needs the stored card of a version (export the module first with "
                          "exporters.module_export.export_module and pass the card it returns)")
    _check_module(module, card, repo)
    whole = load_dataset(data, labels if config.method == "fixres" else None)
    tune_set = select_split(whole, "tune", config.split_seed)
    holdout = len(whole.items) - len(tune_set.items)
    if holdout == 0:
        raise ExportError(f"the held-out half of {data} (split seed {config.split_seed}) is empty: nothing could "
                          "judge the tuned model")
    resolution, why = card.resolution, "the card's test resolution"
    if config.method == "fixres":
        resolution, why = ((config.resolution, "--resolution") if config.resolution is not None
                           else fixres_resolution(repo, card))
    elif config.resolution is not None:
        resolution, why = config.resolution, "--resolution"
    photos = TunePhotos.load(card, whole.root, tune_set.items, resolution)
    _log.info("tuning %s/%s (%s) on %d photos at %d px (%s)", card.name, card.version, config.method,
              len(photos), resolution, why)
    teacher = onnx_teacher(repo.load(card.name, card.version).onnx_bytes, card, config.threads)
    run = train(module, card, photos, teacher, config, progress=progress)
    weights = _weights_bytes(module)
    if save_weights is not None:
        Path(save_weights).write_bytes(weights)
    record = Tune(
        method=config.method, source_version=card.version, source_sha256=card.onnx_sha256,
        data_fingerprint=photos_fingerprint(whole.items), split_seed=config.split_seed,
        tune_fingerprint=photos_fingerprint(tune_set.items), tune_images=len(tune_set.items),
        holdout_images=holdout, labelled=run.labelled, resolution=resolution, steps=config.total_steps,
        batch_size=config.photos_per_step, learning_rate=config.learning_rate, loss_start=run.loss_window(False),
        loss_end=run.loss_window(True), wall_seconds=round(run.seconds, 3), seed=config.seed, device=run.device,
        source_weights_sha256=card.source.weights_sha256,
        recipe=dict(config.recipe(), resolution_from=why, **run.notes),
    )
    new = card.replace(
        test_resolution=resolution, parity=None, tune=record,
        source=Source(card.source.kind, card.source.architecture, sha256_bytes(weights)),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    return export_module(module, new, repo, name or card.name, opset=card.opset or 17, precision=card.precision)


def tune_version(repo: ModelRepository, model: str, version: int, data: str | os.PathLike[str],
                 labels: str | os.PathLike[str] | None, config: TuneConfig,
                 weights: str | os.PathLike[str] | None = None, *, name: str | None = None,
                 progress: bool = False, save_weights: str | os.PathLike[str] | None = None) -> ModelCard:
    """Rebuild a stored version's PyTorch module from its card (:func:`exporters.rebuild.rebuild_module`)
    and :func:`tune_module` it.

    Raises:
        ExportError: the version cannot be rebuilt (``onnx:`` or ``module`` source, missing or
            different weights file), or as :func:`tune_module`.
    """
    from exporters.rebuild import rebuild_module

    card = repo.load(model, version).card
    module = rebuild_module(card, weights)
    return tune_module(module, card, repo, data, config, labels, name=name, progress=progress,
                       save_weights=save_weights)
