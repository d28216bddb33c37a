"""Run the protocols over a dataset through ONNX Runtime in batches, and pool the results.

Work is split into per-image *records* (pure data: sums and counts per metric), computed
in image order with a seed derived from (seed, image index), so a shard computed on a Ray
worker gives exactly the record a single process would. Pooling and bootstrapping happen
once, over all records, in :func:`aggregate`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from robustness.data import Dataset, Item
from robustness.protocols import ImagePlan, ProtocolConfig, plan_image
from robustness.stats import Estimate, ratio_estimate
from service.core.card import ModelCard
from service.core.boxes import render
from service.core.preprocess import Preprocessor, normalise
from service.core.runtime import Classifier, RuntimeOptions, softmax
from service.core.errors import ClusterUnavailable

__all__ = ["ScoreOptions", "score_items", "aggregate", "choose", "CHOICE_RULE"]


@dataclass(frozen=True)
class ScoreOptions:
    batch_size: int = 32
    chunk_images: int = 4  # images whose views are batched together
    threads: int = 0       # ONNX Runtime intra-op threads (0: all cores)
    overlap: bool = True   # prepare the next batches in a thread while ORT runs
    share: bool = True     # shared views, Renderer, specialised sessions (False: the unoptimised reference)
    preprocess_device: str = "cpu"  # cpu (Pillow) | gpu | dali-cpu: who decodes and resamples (service.core.devices)
    ray_timeout_s: float = 60.0  # Ray: fail when no 1-CPU task can start within this (the cluster's CPUs are held)


def _record(item: Item, plan: ImagePlan, probs: dict[Any, np.ndarray]) -> dict[str, Any]:
    rec: dict[str, Any] = {"index": item.index, "file": item.path, "label": item.label, "policies": {}}
    for reduce in plan.reducers:
        for policy, values in reduce(probs).items():
            dst = rec["policies"].setdefault(policy, {"flips": 0})
            for key, value in values.items():
                if key == "flips":
                    dst["flips"] += value
                else:
                    dst[key] = value
    if plan.remedy_reducers:
        rec["remedies"] = {name: values for reduce in plan.remedy_reducers for name, values in reduce(probs).items()}
    return rec


def _evaluate_followups(classifier: Classifier, card: ModelCard, plans: Sequence[ImagePlan],
                        probs: list[dict[Any, np.ndarray]], batch_size: int,
                        views: Callable[..., np.ndarray] | None = None) -> tuple[int, float]:
    """The second stage: views the plans ask for after seeing their first rows (ensemble copies of unsure
    views), each key not yet evaluated once; rows are added to ``probs``. Returns (evaluations, seconds)."""
    stage = []
    for i, plan in enumerate(plans):
        extra = ImagePlan()
        for ask in plan.followups:
            for key, spec in ask(probs[i]).items():
                if key not in probs[i]:
                    extra.views.setdefault(key, spec)
        stage.append(extra)
    evaluations, seconds = 0, 0.0
    for entries, tensor in _batches(stage, card, batch_size, views):
        seconds += _infer_into(classifier, entries, tensor, probs)
        evaluations += len(entries)
    return evaluations, seconds


def _infer_into(classifier: Classifier, entries: list[tuple[int, Any]], tensor: np.ndarray,
                probs: list[dict[Any, np.ndarray]]) -> float:
    """Run one batch and store each entry's softmax row in ``probs[image][key]``; returns ORT seconds."""
    t1 = time.perf_counter()
    logits = classifier.logits(tensor)
    seconds = time.perf_counter() - t1
    p = softmax(logits.astype(np.float64))
    for j, (i, key) in enumerate(entries):
        while len(probs) <= i:
            probs.append({})
        probs[i][key] = p[j]
    return seconds


def _batches(plans: Sequence[ImagePlan], card: ModelCard, batch_size: int,
             views: Callable[..., np.ndarray] | None = None) -> Iterable[tuple[list[tuple[int, Any]], np.ndarray]]:
    """(entries, normalised tensor) batches of the plans' views, grouped by resolution (``views``: the device's
    renderer, ``DaliPreprocessor.render``, instead of Pillow's)."""
    bg = tuple(card.mean)
    groups: dict[int, list[tuple[int, Any]]] = {}
    for i, plan in enumerate(plans):
        for key, spec in plan.views.items():
            groups.setdefault(spec.resolution, []).append((i, key))
    for res, entries in sorted(groups.items()):
        for start in range(0, len(entries), batch_size):
            chunk = entries[start:start + batch_size]
            if views is not None:
                specs = [plans[i].views[key] for i, key in chunk]
                yield chunk, views([v.image for v in specs], [v.box for v in specs], res)
                continue
            pixels = np.empty((len(chunk), res, res, 3), dtype=np.uint8)
            for j, (i, key) in enumerate(chunk):
                pixels[j] = plans[i].views[key].pixels(card.interpolation, bg)
            yield chunk, normalise(pixels, card)


class _SerialQueue:
    """The consumer's ``get`` pulls the next item straight from the producer generator."""

    def __init__(self, source: Iterable[tuple[str, Any]]) -> None:
        self._it = iter(source)

    def get(self, timeout: float | None = None) -> tuple[str, Any]:
        return next(self._it)


def score_items(
    onnx_bytes: bytes,
    card: ModelCard,
    root: str | Path,
    items: Sequence[Item],
    config: ProtocolConfig,
    seed: int,
    options: ScoreOptions = ScoreOptions(),
    progress: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Records for ``items`` (in order) and timing counters. Safe to run on a Ray worker.

    With ``options.overlap`` a producer thread decodes, localises and renders the next batches while
    ONNX Runtime (which releases the GIL) runs the current one; results do not depend on it
    (``steady bench score`` on 2 pinned cores: ratio 0.705 with overlap, 0.627 serial).
    """
    import queue
    import threading

    # sessions specialised per resolution (service.core.static_shape: the same logits); the reference path runs
    # the stored graph as it is
    sizes = (card.resolution,) + (config.resolutions(card) if "resolution" in config.protocols else ())
    classifier = Classifier(onnx_bytes, card, RuntimeOptions(provider="cpu", intra_op_threads=options.threads,
                                                             static_sizes=tuple(dict.fromkeys(sizes)) if options.share
                                                             else ()))
    pre = Preprocessor(card, policy="object", resolution=max(config.resolutions(card) + (card.resolution,)))
    decode, views = pre.decode, None
    if options.preprocess_device != "cpu":  # the GPU path's decoder and resampler (full-size decode)
        from service.core.gpu_preprocess import DaliPreprocessor

        dali = DaliPreprocessor(card, device="gpu" if options.preprocess_device == "gpu" else "cpu",
                                max_batch=options.batch_size)
        decode, views = dali.decode, dali.render
    todo: queue.Queue[Any] = queue.Queue(maxsize=4)
    stop = threading.Event()

    def produce_iter() -> Iterable[tuple[str, Any]]:
        for start in range(0, len(items), options.chunk_images):
            chunk = items[start:start + options.chunk_images]
            plans = []
            for item in chunk:
                img = decode((Path(root) / item.path).read_bytes())
                rng = np.random.default_rng([seed, item.index])
                plans.append(plan_image(img, card, config, item.label, rng, share=options.share))
            for batch in _batches(plans, card, options.batch_size, views):
                yield ("batch", batch)
            yield ("chunk", (chunk, plans))
        yield ("end", None)

    def produce() -> None:
        try:
            for entry in produce_iter():
                if stop.is_set():
                    return
                todo.put(entry)
        except BaseException as exc:  # handed to the consumer, re-raised there
            todo.put(("error", exc))

    records: list[dict[str, Any]] = []
    evaluations, infer = 0, 0.0
    probs: list[dict[Any, np.ndarray]] = []
    t0 = time.perf_counter()
    producer = threading.Thread(target=produce, name="steady-score-producer", daemon=True)
    if options.overlap:
        producer.start()
    else:  # serial: the same producer, run to completion chunk by chunk (no competition with ORT's threads)
        todo = _SerialQueue(produce_iter())  # type: ignore[assignment]
    try:
        while True:
            kind, payload = todo.get()
            if kind == "error":
                raise payload
            if kind == "end":
                break
            if kind == "batch":
                entries, tensor = payload
                infer += _infer_into(classifier, entries, tensor, probs)
                evaluations += len(entries)
            else:
                chunk, plans = payload
                while len(probs) < len(plans):
                    probs.append({})
                more, seconds = _evaluate_followups(classifier, card, plans, probs, options.batch_size, views)
                evaluations, infer = evaluations + more, infer + seconds
                for k, (item, plan) in enumerate(zip(chunk, plans)):
                    records.append(_record(item, plan, probs[k]))
                probs = []
                if progress is not None:
                    progress(len(chunk))
    finally:
        stop.set()
        while options.overlap and producer.is_alive():
            try:
                todo.get(timeout=0.05)
            except queue.Empty:
                pass
        if options.overlap:
            producer.join()
    wall = time.perf_counter() - t0
    return records, {"seconds": wall, "evaluations": evaluations, "infer_seconds": infer}


# ------------------------------------------------------------------ pooling
def _est(records: Sequence[dict[str, Any]], policy: str, key: str, seed: int) -> Estimate | None:
    pairs = [r["policies"].get(policy, {}).get(key) for r in records]
    pairs = [p for p in pairs if p is not None]
    if not pairs:
        return None
    arr = np.asarray(pairs, dtype=np.float64)
    return ratio_estimate(arr[:, 0], arr[:, 1], seed=seed)


def _d(e: Estimate | None) -> dict[str, Any] | None:
    return None if e is None else e.to_dict()


def _curve(records: Sequence[dict[str, Any]], policy: str, key: str) -> list[float] | None:
    rows = [r["policies"].get(policy, {}).get(key) for r in records]
    rows = [x for x in rows if x is not None]
    return np.mean(np.asarray(rows, dtype=np.float64), axis=0).tolist() if rows else None


def aggregate(records: Sequence[dict[str, Any]], card: ModelCard, config: ProtocolConfig, seed: int,
              labelled: bool) -> dict[str, Any]:
    """Pool records into ``accuracy`` and ``protocols.<protocol>.<policy>`` with bootstrap intervals."""
    records = sorted(records, key=lambda r: r["index"])
    accuracy: dict[str, Any] = {}
    protocols: dict[str, dict[str, Any]] = {p: {} for p in config.protocols}
    for policy in config.policies:
        if labelled:
            accuracy[policy] = {"top1": _d(_est(records, policy, "accuracy.top1", seed)),
                                "top5": _d(_est(records, policy, "accuracy.top5", seed))}
        if "pan" in config.protocols:
            protocols["pan"][policy] = {
                "p_change": _d(_est(records, policy, "pan.p_change", seed)),
                "mac": _d(_est(records, policy, "pan.mac", seed)),
                "flip_probability": _d(_est(records, policy, "pan.flip_probability", seed)),
                "p_change_vertical": _d(_est(records, policy, "pan.p_change_vertical", seed)),
                "translate_offsets": list(config.translate_offsets),
                "translate_flip_curve": _curve(records, policy, "curve.translate"),
            }
        if "scale" in config.protocols:
            protocols["scale"][policy] = {
                "p_change": _d(_est(records, policy, "scale.p_change", seed)),
                "flip_probability": _d(_est(records, policy, "scale.flip_probability", seed)),
                "zooms": list(config.zooms),
                "zoom_flip_curve": _curve(records, policy, "curve.zoom"),
            }
        if "embed" in config.protocols:
            sizes = []
            for size in config.embed_sizes:
                acc = _est(records, policy, f"embed@{size:g}.accuracy", seed) if labelled else None
                sizes.append({"size": size, "accuracy": _d(acc),
                              "p_change": _d(_est(records, policy, f"embed@{size:g}.p_change", seed))})
            protocols["embed"][policy] = {"sizes": sizes, "positions": config.embed_positions}
        if "consistency" in config.protocols:
            protocols["consistency"][policy] = {"consistency": _d(_est(records, policy, "consistency", seed))}
        if "resolution" in config.protocols:
            rows = []
            for r in config.resolutions(card):
                rows.append({
                    "resolution": r, "factor": r / card.train_resolution,
                    "accuracy": _d(_est(records, policy, f"resolution@{r}.accuracy", seed)) if labelled else None,
                    "top5": _d(_est(records, policy, f"resolution@{r}.top5", seed)) if labelled else None,
                    "p_change": _d(_est(records, policy, f"resolution@{r}.p_change", seed)),
                })
            protocols["resolution"][policy] = {"resolutions": rows}
    most = sorted(records, key=lambda r: (-sum(p.get("flips", 0) for p in r["policies"].values()), r["index"]))
    flippers = [{"file": r["file"], "label": r["label"],
                 "flips": {p: v.get("flips", 0) for p, v in r["policies"].items()},
                 "top1": {p: v.get("top1_class") for p, v in r["policies"].items()}} for r in most[:8]]
    return {"accuracy": accuracy, "protocols": protocols, "most_flipping": flippers}


# ------------------------------------------------------------------ the choice
CHOICE_RULE = (
    "Candidates are (policy, test resolution) pairs: every policy at the card's test resolution and every "
    "resolution of the FixRes sweep. Baseline: center at the card's test resolution. A candidate is admissible "
    "when none of its flip metrics (pan p_change at its resolution; for its policy pan p_change, scale "
    "flip_probability and embed@0.5 p_change) is worse than the baseline's beyond the baseline's 95% interval "
    "(value <= upper bound) and, with labels, its top-1 accuracy is not below the baseline's lower bound. "
    "Among admissible candidates: the most accurate one if its gain over the baseline is at least half the "
    "baseline's interval half-width; otherwise the steadiest policy at the card's resolution (lowest mean of "
    "its pan p_change, scale flip_probability and embed@0.5 p_change), so a resolution other than the card's "
    "is only chosen for a clear accuracy gain. Without labels: the steadiest at the card's resolution. "
    "Ties go to center."
)


def _v(e: dict[str, Any] | None) -> float | None:
    return None if e is None else float(e["value"])


def choose(result: dict[str, Any], card: ModelCard, config: ProtocolConfig) -> dict[str, Any]:
    """Apply :data:`CHOICE_RULE` to aggregated results; returns ``{"policy", "resolution", "rule", ...}``."""
    R = card.resolution
    pr = result["protocols"]
    acc = result.get("accuracy", {})
    baseline_policy = "center" if "center" in config.policies else config.policies[0]

    def policy_flips(policy: str) -> dict[str, dict[str, Any] | None]:
        out: dict[str, dict[str, Any] | None] = {}
        if "scale" in pr:
            out["scale"] = pr["scale"][policy]["flip_probability"]
        if "embed" in pr:
            out["embed"] = next((row["p_change"] for row in pr["embed"][policy]["sizes"]
                                 if abs(row["size"] - 0.5) < 1e-9), None)
        return out

    def pan_at(policy: str, res: int) -> dict[str, Any] | None:
        if res == R and "pan" in pr:
            return pr["pan"][policy]["p_change"]
        for row in pr.get("resolution", {}).get(policy, {}).get("resolutions", []):
            if row["resolution"] == res:
                return row["p_change"]
        return None

    def acc_at(policy: str, res: int) -> dict[str, Any] | None:
        if res == R:
            return acc.get(policy, {}).get("top1")
        for row in pr.get("resolution", {}).get(policy, {}).get("resolutions", []):
            if row["resolution"] == res:
                return row["accuracy"]
        return None

    candidates = [(p, R) for p in config.policies]
    for p in config.policies:
        for row in pr.get("resolution", {}).get(p, {}).get("resolutions", []):
            if row["resolution"] != R:
                candidates.append((p, row["resolution"]))

    def flips(c: tuple[str, int]) -> dict[str, dict[str, Any] | None]:
        return dict(policy_flips(c[0]), pan=pan_at(*c))

    def base_flips(c: tuple[str, int]) -> dict[str, dict[str, Any] | None]:
        # a resolution candidate is compared with the baseline's sweep row at R (same one-pair protocol)
        out = flips((baseline_policy, R))
        if c[1] != R and "resolution" in pr:
            row = next((x for x in pr["resolution"][baseline_policy]["resolutions"] if x["resolution"] == R), None)
            if row is not None:
                out["pan"] = row["p_change"]
        return out

    baseline = (baseline_policy, R)
    base_acc = acc_at(*baseline)
    labelled = base_acc is not None and all(acc_at(*c) is not None for c in candidates)

    def admissible(c: tuple[str, int]) -> bool:
        if c == baseline:
            return True
        mine, base = flips(c), base_flips(c)
        for key, est in mine.items():
            ref = base.get(key)
            if est is not None and ref is not None and est["value"] > ref["ci95"][1]:
                return False
        if labelled:
            a = acc_at(*c)
            assert a is not None and base_acc is not None
            if a["value"] < base_acc["ci95"][0]:
                return False
        return True

    def steadiness(c: tuple[str, int]) -> float:
        values = [e["value"] for e in flips(c).values() if e is not None]
        return float(np.mean(values)) if values else 0.0

    def tie(c: tuple[str, int]) -> tuple[int, int]:
        return (0 if c[0] == "center" else 1, abs(c[1] - R))

    ok = [c for c in candidates if admissible(c)]
    best = None
    reason = "steadiest"
    if labelled:
        assert base_acc is not None
        top = sorted(ok, key=lambda c: (-acc_at(*c)["value"], *tie(c)))[0]  # type: ignore[index]
        half = (base_acc["ci95"][1] - base_acc["ci95"][0]) / 2
        if top != baseline and acc_at(*top)["value"] - base_acc["value"] >= max(0.5 * half, 1e-12):  # type: ignore[index]
            best, reason = top, "most accurate"
    if best is None:
        at_r = [c for c in ok if c[1] == R]
        best = sorted(at_r, key=lambda c: (round(steadiness(c), 12), *tie(c)))[0]
    return {"policy": best[0], "resolution": int(best[1]), "rule": CHOICE_RULE, "labelled": labelled,
            "reason": reason, "admissible": [[p, r] for p, r in ok],
            "baseline": {"policy": baseline_policy, "resolution": R}}


def _summary_stats(result: dict[str, Any], chosen: dict[str, Any], card: ModelCard) -> dict[str, dict[str, Any]]:
    """The summary keys of the chosen policy and resolution -> their ``{value, ci95, n}`` records."""
    p = chosen["policy"]
    r = chosen["resolution"]
    pr = result["protocols"]
    out: dict[str, Any] = {}
    acc = result.get("accuracy", {}).get(p)
    if acc:
        top1, top5 = acc["top1"], acc["top5"]
        if r != card.resolution and "resolution" in pr:
            row = next(x for x in pr["resolution"][p]["resolutions"] if x["resolution"] == r)
            top1, top5 = row["accuracy"], row["top5"]
        out["accuracy.top1"] = top1
        out["accuracy.top5"] = top5
    if "pan" in pr:
        for k in ("p_change", "mac", "flip_probability", "p_change_vertical"):
            out[f"pan.{k}"] = pr["pan"][p].get(k)
    if "scale" in pr:
        for k in ("p_change", "flip_probability"):
            out[f"scale.{k}"] = pr["scale"][p][k]
    if "embed" in pr:
        for row in pr["embed"][p]["sizes"]:
            if row["size"] in (0.4, 0.5, 0.7):
                out[f"embed@{row['size']:g}.p_change"] = row["p_change"]
            if row["size"] == 0.5:
                out["embed@0.5.accuracy"] = row["accuracy"]
    if "consistency" in pr:
        out["consistency"] = pr["consistency"][p]["consistency"]
    return {k: v for k, v in out.items() if v is not None}


def summary(result: dict[str, Any], chosen: dict[str, Any], card: ModelCard) -> dict[str, float]:
    """The flat summary for the chosen policy (plain numbers; absent when a protocol was not run)."""
    return {k: float(v["value"]) for k, v in _summary_stats(result, chosen, card).items()}


def summary_ci95(result: dict[str, Any], chosen: dict[str, Any], card: ModelCard) -> dict[str, Any]:
    """The 95% intervals of the summary values (same keys), for the gate's printout."""
    return {k: v["ci95"] for k, v in _summary_stats(result, chosen, card).items()}


def run_local(onnx_bytes: bytes, card: ModelCard, dataset: Dataset, config: ProtocolConfig, seed: int,
              options: ScoreOptions, progress: Callable[[int], None] | None = None
              ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    return score_items(onnx_bytes, card, dataset.root, dataset.items, config, seed, options, progress)


def shard(items: Sequence[Item], n: int) -> list[list[Item]]:
    """Contiguous shards of nearly equal size (order preserved)."""
    n = max(1, min(n, len(items)))
    bounds = np.linspace(0, len(items), n + 1).round().astype(int)
    return [list(items[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def run_ray(onnx_bytes: bytes, card: ModelCard, dataset: Dataset, config: ProtocolConfig, seed: int,
            options: ScoreOptions, workers: int, address: str | None,
            progress: Callable[[int], None] | None = None) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Shard images over Ray tasks; the records equal :func:`run_local`'s for the same seed."""
    import ray

    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
                     log_to_driver=False)
        started = True
    try:
        _wait_for_a_cpu(ray, options.ray_timeout_s, address)
        task = ray.remote(num_cpus=1)(score_items)
        model_ref = ray.put(onnx_bytes)
        t0 = time.perf_counter()
        worker_opts = ScoreOptions(options.batch_size, options.chunk_images, threads=1,
                                   preprocess_device=options.preprocess_device)
        pieces = [(len(s), task.remote(model_ref, card, str(dataset.root), s, config, seed, worker_opts))
                  for s in shard(dataset.items, 4 * max(workers, int(ray.cluster_resources().get("CPU", 1))))]
        records: list[dict[str, Any]] = []
        evaluations = 0.0
        pending = {ref: n for n, ref in pieces}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                recs, timing = ray.get(ref)
                records.extend(recs)
                evaluations += timing["evaluations"]
                if progress is not None:
                    progress(pending[ref])
                del pending[ref]
        wall = time.perf_counter() - t0
        return sorted(records, key=lambda r: r["index"]), {"seconds": wall, "evaluations": evaluations,
                                                          "infer_seconds": float("nan")}
    finally:
        if started:
            ray.shutdown()


def _wait_for_a_cpu(ray: Any, timeout_s: float, address: str | None) -> None:
    """Start one 1-CPU task first: on a cluster whose CPUs are all held (Serve replicas, other jobs) the shards
    would wait forever, so fail after ``timeout_s`` with what the cluster has instead."""
    probe = ray.remote(num_cpus=1)(_nothing).remote()
    done, _ = ray.wait([probe], timeout=timeout_s)
    if done:
        return
    ray.cancel(probe)
    total, free = ray.cluster_resources().get("CPU", 0.0), ray.available_resources().get("CPU", 0.0)
    raise ClusterUnavailable(f"the Ray cluster {address or '(local)'} could not start a 1-CPU scoring task within "
                             f"{timeout_s:g} s: it has {total:g} CPUs, {free:g} free (Serve replicas or other jobs "
                             f"hold them); free CPUs, add nodes, or wait longer with --ray-timeout")


def _nothing() -> None:
    return None


def iter_progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm
    import sys

    return tqdm(total=total, unit="img", file=sys.stderr, disable=not enabled, desc="scoring", leave=False)


def thumbnails(dataset_root: Path, files: Iterable[str], card: ModelCard, side: int = 96) -> dict[str, np.ndarray]:
    """Small previews for the report: the centre square of each image, through the same renderer."""
    from service.core.boxes import center_box
    from service.core.preprocess import decode

    out = {}
    for f in files:
        img = decode((dataset_root / f).read_bytes(), background=card.mean, min_short_side=side)
        out[f] = render(img, center_box(img.size[0], img.size[1], side, 1.0), side, "bilinear", card.mean)
    return out
