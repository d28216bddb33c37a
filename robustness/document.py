"""Score a stored model version into its ``robustness.json`` document.

The document binds the scores to the exact model (``model_sha256``) and data (``data.fingerprint``);
:mod:`robustness.schema` describes its structure and :mod:`robustness.gate` reads it back.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from robustness.data import Dataset, load_dataset, photos_fingerprint, select_split, without_photos
from robustness.remedies import RemedyRule, aggregate_remedies, choose_remedy, remedy_summary
from robustness.schema import ROBUSTNESS_SCHEMA_VERSION
from robustness.scorer import (ScoreOptions, aggregate, choose, iter_progress, run_local, run_ray, summary,
                               summary_ci95)
from service.core.card import ModelCard, steady_version
from service.core.errors import ScoreError

__all__ = ["score_version", "scoring_split"]


def scoring_split(card: ModelCard, dataset: Dataset, split: str,
                  split_seed: int | None) -> tuple[Dataset, int | None]:
    """The part of ``dataset`` (a whole folder) to score and the split seed used (``None`` for ``all``).

    A tuned version (its card has a ``tune`` record) is never scored on its tuning photos: on the
    folder it was tuned on (same label-free fingerprint) only ``holdout`` with the tune's seed is
    accepted. Any version may be scored on a half, given ``split_seed`` (default: the tune's seed, or
    the calibration seed of a quantized version).

    Raises:
        ScoreError: the tuning photos would be scored, or a half without a seed.
    """
    tune = card.tune
    own = tune.split_seed if tune is not None else card.quantization.seed if card.quantization is not None else None
    seed = split_seed if split_seed is not None else own
    if tune is not None and photos_fingerprint(dataset.items) == tune.data_fingerprint:
        if split != "holdout" or seed != tune.split_seed:
            raise ScoreError(
                f"{card.name}/{card.version} was tuned on half of these photos (split seed {tune.split_seed}): "
                f"score it with --split holdout{'' if split_seed is None else f' --split-seed {tune.split_seed}'}, "
                f"never on the photos it was tuned on")
    if split == "all":
        return dataset, None
    if seed is None:
        raise ScoreError(f"--split {split} needs --split-seed S ({card.name}/{card.version} has no tune or "
                         "quantization record)")
    return select_split(dataset, split, seed), seed


def score_version(repo: Any, model: str, version: int, data: str, labels: str | None, config: Any,
                         seed: int, max_images: int | None, workers: int = 0, ray_address: str | None = None,
                         progress: bool = False, batch_size: int = 32,
                         remedy_rule: RemedyRule = RemedyRule(), split: str = "all",
                         split_seed: int | None = None, preprocess_device: str = "cpu",
                         ray_timeout_s: float = 60.0) -> tuple[dict[str, Any], Dataset]:
    """Score a stored version and return the robustness.json document (and the dataset).

    ``remedies`` holds every ensemble variant against its bare policy; ``chosen.ensemble`` the one the
    cost rule picked (its measurements replace the bare policy's in ``summary``). ``split``/``split_seed``
    score one half of the folder (see :func:`scoring_split`); a tuned version is never scored on its
    tuning photos, a quantized one never on its calibration photos (left out wherever they sit).
    ``preprocess_device``: who decodes and resamples the views (cpu: Pillow; gpu or dali-cpu: DALI).
    ``ray_timeout_s``: with Ray, fail when no 1-CPU task can start within this.
    """

    loaded = repo.load(model, version)
    card = loaded.card
    whole = load_dataset(data, labels)  # the whole folder: a tuned version's tuning photos are recognised in it
    dataset, seed_used = scoring_split(card, whole, split, split_seed)
    calibrated = frozenset(card.quantization.calibration_sha256) if card.quantization else frozenset()
    dataset, excluded = without_photos(dataset, calibrated)
    if max_images is not None:
        dataset = select_split(dataset, "all", 0, max_images)
    options = ScoreOptions(batch_size=batch_size, preprocess_device=preprocess_device, ray_timeout_s=ray_timeout_s)
    with iter_progress(len(dataset.items), progress) as bar:
        if workers > 0 or ray_address:
            records, timing = run_ray(loaded.onnx_bytes, card, dataset, config, seed, options, max(workers, 1),
                                      ray_address, bar.update)
        else:
            records, timing = run_local(loaded.onnx_bytes, card, dataset, config, seed, options, bar.update)
    result = aggregate(records, card, config, seed, dataset.labelled)
    remedies = aggregate_remedies(records, config, seed, dataset.labelled)
    chosen = choose_remedy(choose(result, card, config), remedies, card, remedy_rule)
    stats = remedy_summary(remedies, chosen, len(dataset.items))
    flat = dict(summary(result, chosen, card), **{k: float(v["value"]) for k, v in stats.items()})
    intervals = dict(summary_ci95(result, chosen, card), **{k: v["ci95"] for k, v in stats.items()})
    doc = {
        "schema_version": ROBUSTNESS_SCHEMA_VERSION,
        "model": model,
        "version": version,
        "model_sha256": loaded.sha256,
        "card": {"train_resolution": card.train_resolution, "test_resolution": card.resolution,
                 "crop_pct": card.crop_pct, "interpolation": card.interpolation, "policy": card.policy},
        "data": {"path": str(Path(data).resolve()), "fingerprint": dataset.fingerprint,
                 "images": len(dataset.items), "labelled": dataset.labelled,
                 "split": {"name": split, "seed": seed_used, "folder_fingerprint": whole.fingerprint},
                 "excluded_calibration_photos": excluded},
        "precision": card.precision,
        "seed": seed,
        "config": config.to_dict(),
        "accuracy": result["accuracy"],
        "protocols": result["protocols"],
        "summary": flat,
        "summary_ci95": intervals,
        "chosen": chosen,
        "remedies": remedies,
        "most_flipping": result["most_flipping"],
        "timing": {"seconds": round(timing["seconds"], 3), "evaluations": int(timing["evaluations"]),
                   "infer_seconds": None if timing["infer_seconds"] != timing["infer_seconds"]
                   else round(timing["infer_seconds"], 3),
                   "evaluations_per_s": round(timing["evaluations"] / max(timing["seconds"], 1e-9), 2),
                   "workers": workers or None, "ray_address": ray_address},
        "preprocess": {"device": preprocess_device},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "steady_version": steady_version(),
    }
    return doc, dataset
