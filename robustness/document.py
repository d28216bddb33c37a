"""Score a stored model version into its ``robustness.json`` document.

The document binds the scores to the exact model (``model_sha256``) and data (``data.fingerprint``);
:mod:`robustness.schema` describes its structure and :mod:`robustness.gate` reads it back.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from robustness.data import Dataset, load_dataset
from robustness.remedies import RemedyRule, aggregate_remedies, choose_remedy, remedy_summary
from robustness.schema import ROBUSTNESS_SCHEMA_VERSION
from robustness.scorer import (ScoreOptions, aggregate, choose, iter_progress, run_local, run_ray, summary,
                               summary_ci95)
from service.core.card import steady_version

__all__ = ["score_version"]


def score_version(repo: Any, model: str, version: int, data: str, labels: str | None, config: Any,
                         seed: int, max_images: int | None, workers: int = 0, ray_address: str | None = None,
                         progress: bool = False, batch_size: int = 32,
                         remedy_rule: RemedyRule = RemedyRule(), half: str | None = None,
                         split_seed: int = 0, preprocess_device: str = "cpu",
                         ray_timeout_s: float = 60.0) -> tuple[dict[str, Any], Dataset]:
    """Score a stored version and return the robustness.json document (and the dataset).

    ``remedies`` holds every ensemble variant against its bare policy; ``chosen.ensemble`` the one the
    cost rule picked (its measurements replace the bare policy's in ``summary``). ``half`` scores one
    half of the seeded split only; a quantized version is never scored on its calibration photos.
    ``preprocess_device``: who decodes and resamples the views (cpu: Pillow; gpu or dali-cpu: DALI).
    ``ray_timeout_s``: with Ray, fail when no 1-CPU task can start within this.
    """

    loaded = repo.load(model, version)
    card = loaded.card
    calibrated = frozenset(card.quantization.calibration_sha256) if card.quantization else frozenset()
    dataset = load_dataset(data, labels, max_images, half=half, split_seed=split_seed, exclude_sha256=calibrated)
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
                 "images": len(dataset.items), "labelled": dataset.labelled, "half": dataset.half,
                 "split_seed": dataset.split_seed, "excluded_calibration_photos": dataset.excluded},
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
