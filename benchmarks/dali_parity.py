"""The GPU path's preprocessing contract, measured: NVIDIA DALI against the CPU path on real photos.

Like the export parity, a record with stated tolerances and a verdict. For every photo:

- **tensor**: DALI's (3, R, R) input against the contract's reference,
  ``Preprocessor(card, reduced_decode=False)`` (the CPU path's semantics at full decode), in levels of
  0..255 (|difference| x std); also against the CPU path as served (with its reduced-scale JPEG
  decode, a CPU-only shortcut), for information;
- **top-1**: the model's answer on DALI's tensor against the CPU path as served and the reference,
  with 95% bootstrap intervals over photos; the disagreeing photos are listed with their top-2 margin;
- **IO binding**: logits from DALI's output bound to ONNX Runtime without a copy, against the plain
  run on the same tensor copied to the host;
- **time**: preprocessing ms per photo on this machine, DALI vs Pillow (indicative: other work may share
  the cores).

Contract (the verdict): max |difference| <= ``MAX_LEVELS`` against the reference on every photo,
and top-1 agreement with the CPU path as served >= ``MIN_AGREEMENT``.

The second half of the contract is the scorer's: ``steady score --preprocess-device gpu`` (or ``dali-cpu``)
must give flip metrics within the 95% intervals of the CPU path's ``steady score`` on the same photos and
seed; :func:`compare_scores` (``steady bench compare-scores CPU.json DEVICE.json``) checks two
``robustness.json`` documents.

Usage (exit code 0 when the contract holds)::

    steady bench parity --repo models efficientnet-lite0 --data ../shared/data/imagenet-sample \\
        [--device cpu|gpu] [--large 16] [--out benchmarks/results/dali-parity-lite0-cpu.json]
"""

from __future__ import annotations

import csv
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from service.core.images import list_images
from service.core.preprocess import Preprocessor
from service.core.repository import ModelRepository
from service.core.runtime import Classifier, RuntimeOptions

__all__ = ["MAX_LEVELS", "MIN_AGREEMENT", "dali_parity", "format_parity", "compare_scores", "format_comparison"]

MAX_LEVELS = 3.0  # the contract's pixel tolerance (levels of 0..255), every pixel of every photo
MIN_AGREEMENT = 0.99  # top-1 agreement with the CPU path as served


def _labels(data: Path, labels: str | None) -> dict[str, int]:
    path = Path(labels) if labels else data / "labels.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as fh:
        return {row["file"]: int(row["class_index"]) for row in csv.DictReader(fh)}


def _estimate(hits: np.ndarray, seed: int = 0) -> dict[str, Any]:
    from robustness.stats import ratio_estimate

    est = ratio_estimate(hits.astype(float), np.ones(len(hits)), seed=seed)
    return est.to_dict() if est is not None else {"value": None, "ci95": None, "n": 0}


def _levels(a: np.ndarray, b: np.ndarray, std: float) -> dict[str, Any]:
    d = np.abs(a - b) * std
    per = d.reshape(len(d), -1).max(axis=1)
    return {"max_levels": round(float(d.max()), 3), "mean_levels": round(float(d.mean()), 5),
            "p99_levels": round(float(np.quantile(d, 0.99)), 3),
            "photos_max_levels": {str(int(k)): int(v) for k, v in zip(*np.unique(np.round(per), return_counts=True))}}


def _time_per_image(fn: Any, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _photo_set(name: str, paths: Sequence[Path], truth: dict[str, int], card: Any, classifier: Classifier,
               device: str, batch: int, timing_rounds: int) -> dict[str, Any]:
    from service.core.gpu_preprocess import DaliPreprocessor

    dali = DaliPreprocessor(card, device=device, max_batch=batch)
    served, reference = Preprocessor(card), Preprocessor(card, reduced_decode=False)
    bodies = [p.read_bytes() for p in paths]
    items = [dali.plan(b) for b in bodies]
    ours = np.concatenate([dali.tensors(items[i:i + batch]) for i in range(0, len(items), batch)])
    ref = np.concatenate([reference(b) for b in bodies])
    cpu = np.concatenate([served(b) for b in bodies])
    reduced = [served.decode(b).size != reference.decode(b).size for b in bodies]

    def logits(x: np.ndarray) -> np.ndarray:
        return np.concatenate([classifier.logits(x[i:i + 32]) for i in range(0, len(x), 32)])

    l_ours, l_ref, l_cpu = logits(ours), logits(ref), logits(cpu)
    bound = [dali.logits(classifier, items[i:i + batch]) for i in range(0, len(items), batch)]
    l_bound = np.stack([row for b in bound for row in b.logits])
    top = {k: v.argmax(1) for k, v in (("dali", l_ours), ("reference", l_ref), ("cpu", l_cpu))}
    std = float(np.mean(card.std))
    names = [p.name for p in paths]
    labels = np.array([truth.get(n, -1) for n in names])
    labelled = bool(truth) and bool((labels >= 0).all())

    def margin(row: np.ndarray) -> float:
        p = np.exp(row - row.max())
        p /= p.sum()
        a, b = np.sort(p)[-2:]
        return round(float(b - a), 4)

    disagree = np.nonzero(top["dali"] != top["cpu"])[0]
    doc: dict[str, Any] = {
        "name": name, "photos": len(paths),
        "routed_to_cpu_path": sum(1 for it in items if it.route),
        "reduced_decode_in_cpu_path": int(sum(reduced)),
        "tensor_vs_reference": _levels(ours, ref, std),
        "tensor_vs_cpu_path": _levels(ours, cpu, std),
        "top1_agreement_vs_cpu_path": _estimate(top["dali"] == top["cpu"]),
        "top1_agreement_vs_reference": _estimate(top["dali"] == top["reference"]),
        "top1_agreement_cpu_path_vs_reference": _estimate(top["cpu"] == top["reference"]),
        "disagreements_vs_cpu_path": [{"photo": names[i], "dali": int(top["dali"][i]), "cpu": int(top["cpu"][i]),
                                       "cpu_top2_margin": margin(l_cpu[i])} for i in disagree],
        "io_binding_max_abs_logit_diff": float(np.abs(l_bound - l_ours).max()),
    }
    if labelled:
        doc["top1_accuracy"] = {k: _estimate(v == labels) for k, v in top.items()}
    if timing_rounds:
        doc["ms_per_photo"] = {
            "dali_" + device: round(1000 * _time_per_image(
                lambda: [dali.tensors([dali.plan(b) for b in bodies[i:i + batch]]) for i in range(0, len(items), batch)],
                timing_rounds) / len(items), 2),
            "pillow_cpu_path": round(1000 * _time_per_image(lambda: [served(b) for b in bodies], timing_rounds)
                                     / len(items), 2),
            "pillow_full_decode": round(1000 * _time_per_image(lambda: [reference(b) for b in bodies], timing_rounds)
                                        / len(items), 2),
        }
    return doc


def dali_parity(repo_root: str, model: str, data: str, *, version: int | None = None, labels: str | None = None,
                device: str = "cpu", large: int = 0, batch: int = 64, max_images: int = 0,
                timing_rounds: int = 2) -> dict[str, Any]:
    """Measure the contract on the photos of ``data`` (and ``large`` 12 MP photos made from them)."""
    import onnxruntime
    import PIL

    from service.core.gpu_preprocess import dali_version

    repo = ModelRepository(repo_root)
    version = repo.resolve(model, version)
    loaded = repo.load(model, version)
    card = loaded.card
    classifier = Classifier(loaded.onnx_bytes, card, RuntimeOptions(provider="cuda" if device == "gpu" else "cpu"))
    root = Path(data)
    paths = list_images([root])
    if max_images:
        paths = paths[:max_images]
    truth = _labels(root, labels)
    sets = [_photo_set("photos", paths, truth, card, classifier, device, batch, timing_rounds)]
    if large:
        from benchmarks.serve import make_large_photos

        with tempfile.TemporaryDirectory(prefix="steady-parity-") as tmp:
            big = make_large_photos(paths, Path(tmp), large)
            big_truth = {p.name: truth[src.name] for p, src in zip(big, paths) if src.name in truth}
            sets.append(_photo_set("large-12mp", big, big_truth, card, classifier, device, batch,
                                   min(timing_rounds, 1)))
    first = sets[0]
    agreement = first["top1_agreement_vs_cpu_path"]["value"]
    worst = max(s["tensor_vs_reference"]["max_levels"] for s in sets)
    return {
        "model": model, "version": version, "model_sha256": loaded.sha256,
        "card": {"resolution": card.resolution, "crop_pct": card.crop_pct, "interpolation": card.interpolation,
                 "mean": list(card.mean), "std": list(card.std), "channel_order": card.channel_order},
        "device": device, "dali": dali_version(), "pillow": PIL.__version__, "onnxruntime": onnxruntime.__version__,
        "machine": {"cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                    "platform": platform.platform(), "load_average": [round(x, 2) for x in os.getloadavg()]},
        "contract": {"max_levels_vs_reference": MAX_LEVELS, "min_top1_agreement_vs_cpu_path": MIN_AGREEMENT,
                     "reference": "Preprocessor(card, reduced_decode=False)"},
        "passed": bool(worst <= MAX_LEVELS and agreement is not None and agreement >= MIN_AGREEMENT),
        "sets": sets,
    }


def format_parity(doc: dict[str, Any]) -> str:
    lines = [f"DALI parity: {doc['model']} v{doc['version']} on {doc['device']} (DALI {doc['dali']}, "
             f"Pillow {doc['pillow']}); contract: max {doc['contract']['max_levels_vs_reference']} levels vs "
             f"full decode, top-1 agreement >= {doc['contract']['min_top1_agreement_vs_cpu_path']}"]
    for s in doc["sets"]:
        a = s["top1_agreement_vs_cpu_path"]
        lines.append(f"[{s['name']}] {s['photos']} photos ({s['routed_to_cpu_path']} routed, "
                     f"{s['reduced_decode_in_cpu_path']} reduced-decoded on the CPU path): "
                     f"max {s['tensor_vs_reference']['max_levels']} / mean {s['tensor_vs_reference']['mean_levels']} "
                     f"levels vs full decode; top-1 agreement {a['value']:.3f} {a['ci95']}; "
                     f"IO binding max logit diff {s['io_binding_max_abs_logit_diff']:.2e}"
                     + (f"; ms/photo {s['ms_per_photo']}" if "ms_per_photo" in s else ""))
    lines.append("PASSED" if doc["passed"] else "FAILED")
    return "\n".join(lines)


def _estimates(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every ``{value, ci95, n}`` estimate under ``node``, named by its path (list rows by their size/resolution)."""
    if isinstance(node, dict):
        if {"value", "ci95", "n"} <= set(node):
            yield path, node
            return
        for key, child in node.items():
            yield from _estimates(child, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for row in node:
            if isinstance(row, dict):
                tag = next((f"{k}={row[k]}" for k in ("size", "resolution") if k in row), None)
                if tag is not None:
                    yield from _estimates({k: v for k, v in row.items() if k not in ("size", "resolution")},
                                          f"{path}[{tag}]")


def compare_scores(cpu: dict[str, Any], device: dict[str, Any]) -> dict[str, Any]:
    """Every estimate (flip metrics, accuracies) both robustness.json documents have: is the device run's value
    inside the CPU run's 95% interval? Both must be of the same model, photos and seed."""
    for key in ("model_sha256", "seed"):
        if cpu.get(key) != device.get(key):
            raise ValueError(f"the two runs differ in {key}: {cpu.get(key)!r} vs {device.get(key)!r}")
    if cpu["data"]["fingerprint"] != device["data"]["fingerprint"]:
        raise ValueError("the two runs scored different photos")
    theirs = dict(_estimates({"accuracy": cpu["accuracy"], "protocols": cpu["protocols"]}, ""))
    rows = []
    for name, est in _estimates({"accuracy": device["accuracy"], "protocols": device["protocols"]}, ""):
        ref = theirs.get(name)
        if ref is None or est["value"] is None or ref["value"] is None:
            continue
        lo, hi = ref["ci95"]
        rows.append({"estimate": name, "cpu": ref["value"], "cpu_ci95": [lo, hi], "device": est["value"],
                     "device_ci95": est["ci95"], "within": bool(lo - 1e-12 <= est["value"] <= hi + 1e-12)})
    return {"model_sha256": cpu["model_sha256"], "images": cpu["data"]["images"], "seed": cpu["seed"],
            "devices": [cpu.get("preprocess", {}).get("device", "cpu"), device.get("preprocess", {}).get("device")],
            "compared": len(rows), "within": sum(r["within"] for r in rows),
            "passed": bool(rows) and all(r["within"] for r in rows), "rows": rows}


def format_comparison(doc: dict[str, Any]) -> str:
    lines = [f"{doc['devices'][1]} vs {doc['devices'][0]} on {doc['images']} photos (seed {doc['seed']}): "
             f"{doc['within']} of {doc['compared']} estimates inside the CPU run's 95% interval"]
    for r in doc["rows"]:
        lo, hi = r["cpu_ci95"]
        lines.append(f"  {'ok ' if r['within'] else 'OUT'} {r['estimate']:<52} cpu {r['cpu']:.4f} [{lo:.4f}, {hi:.4f}]"
                     f"  device {r['device']:.4f}")
    lines.append("PASSED" if doc["passed"] else "FAILED")
    return "\n".join(lines)
