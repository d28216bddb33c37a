"""``steady bench score``: the scorer's model evaluations/s against raw ONNX Runtime throughput.

Raw throughput: the same session and batch size on a fixed random input at the card's
resolution (inference only). Scorer throughput: all evaluations of the scorer's protocols
at the card's resolution (the FixRes sweep is left out, as it runs other resolutions),
divided by the wall time of the whole scoring (decode, localisation, rendering, inference,
reduction). ``ratio`` = scorer / raw; ``cpu_ratio`` compares CPU ms per evaluation of this process the
same way (raw / scorer), which other work on a shared machine does not move.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from robustness.data import load_dataset
from robustness.protocols import ProtocolConfig
from robustness.scorer import ScoreOptions, score_items
from service.core.runtime import Classifier, RuntimeOptions

__all__ = ["bench_score"]


def raw_throughput(classifier: Classifier, batch_size: int, seconds: float = 3.0) -> tuple[float, float]:
    """(evaluations/s, CPU ms per evaluation of this process) of back-to-back batches of random input."""
    R = classifier.card.resolution
    x = np.random.default_rng(0).normal(size=(batch_size, 3, R, R)).astype(np.float32)
    classifier.logits(x)
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        classifier.logits(x)
        n += batch_size
    return n / (time.perf_counter() - t0), 1000 * (time.process_time() - c0) / n


def bench_score(repo: Any, model: str, version: int, data: str, *, max_images: int = 16, batch_size: int = 32,
                policies: tuple[str, ...] = ("center", "object"), seed: int = 0,
                raw_seconds: float = 3.0, overlap: bool = True) -> dict[str, Any]:
    loaded = repo.load(model, version)
    card = loaded.card
    dataset = load_dataset(data, None, max_images)
    config = ProtocolConfig(protocols=("pan", "scale", "embed", "consistency"), policies=policies)
    classifier = Classifier(loaded.onnx_bytes, card, RuntimeOptions(provider="cpu", static_sizes=(card.resolution,)))
    raw_before, raw_cpu_before = raw_throughput(classifier, batch_size, raw_seconds)
    cpu0 = time.process_time()
    _, timing = score_items(loaded.onnx_bytes, card, dataset.root, dataset.items, config, seed,
                            ScoreOptions(batch_size=batch_size, overlap=overlap))
    scorer_cpu = 1000 * (time.process_time() - cpu0) / max(1, timing["evaluations"])
    raw_after, raw_cpu_after = raw_throughput(classifier, batch_size, raw_seconds)
    raw = (raw_before + raw_after) / 2
    raw_cpu = (raw_cpu_before + raw_cpu_after) / 2
    scorer = timing["evaluations"] / timing["seconds"]
    return {
        "model": model, "version": version, "precision": card.precision, "resolution": card.resolution,
        "batch_size": batch_size,
        "images": len(dataset.items), "evaluations": int(timing["evaluations"]),
        "raw_ort_evals_per_s": round(raw, 2), "scorer_evals_per_s": round(scorer, 2),
        "ratio": round(scorer / raw, 3),
        # the same ratio in CPU time per evaluation (this process): unaffected by other work on the machine
        "raw_ort_cpu_ms_per_eval": round(raw_cpu, 2), "scorer_cpu_ms_per_eval": round(scorer_cpu, 2),
        "cpu_ratio": round(raw_cpu / scorer_cpu, 3),
        "scorer_inference_share": round(timing["infer_seconds"] / timing["seconds"], 3),
        "policies": list(policies), "overlap": overlap,
    }
