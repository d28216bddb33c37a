"""Compare tuned versions with their source on the held-out half: the README's "Tuning a steadier model" table.

For each ``MODEL:VERSION`` given, reads its ``robustness.json`` (bound to its sha256; score it first with
``steady score ... --policies center --protocols pan,scale --split holdout``) and prints, for the
``center`` policy: top-1, pan P(top-1 change) on diagonal 1-px pairs, the horizontal translate flip
probability, the scale flip probability, and the scale +-5% P(change), each with its 95% interval.
Against the first version given (the source), it also counts on the held-out photos, through the
one preprocessing path and ONNX Runtime:

- answers fixed / broken against the labels, on the served view and on the 9 diagonal pan windows
  (offsets -4..4 output pixels) of every photo, each version at its own card's resolution;
- the ratio of diagonal pan flips to the source's (8 pairs per photo, the scorer's pairs), with a
  paired bootstrap interval over photos (both versions on the same photos).

Every version must have been scored on the same photos (same ``data.fingerprint``).

Usage::

    python -m benchmarks.tune --repo models --data ../shared/data/imagenet-sample \\
        --labels ../shared/data/imagenet-sample/labels.csv efficientnet-lite0:1 efficientnet-lite0:2 ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from robustness.data import load_dataset, select_split
from service.core.boxes import shift_box
from service.core.preprocess import Preprocessor
from service.core.repository import ModelRepository, read_bound_json
from service.core.runtime import Classifier, RuntimeOptions

PAN_OFFSETS = tuple(range(-4, 5))  # windows; pairs (o, o + 1) for o in -4..3, as the scorer's pan protocol
BOOTSTRAP = 2000


def _answers(repo: ModelRepository, model: str, version: int, root: Path, items: list[Any]) -> np.ndarray:
    """(photos, windows) top-1 classes on the diagonal pan windows (offset 0 is the served view)."""
    loaded = repo.load(model, version)
    pre = Preprocessor(loaded.card, policy="center")
    clf = Classifier(loaded.onnx_bytes, loaded.card, RuntimeOptions(provider="cpu"))
    out = np.empty((len(items), len(PAN_OFFSETS)), dtype=np.int64)
    for i, item in enumerate(items):
        img = pre.decode((root / item.path).read_bytes())
        box = pre.box(img)
        batch = pre.to_tensor([pre.view(img, shift_box(box, o, o, pre.resolution)).pixels for o in PAN_OFFSETS])
        out[i] = clf.logits(batch).argmax(axis=1)
    return out


def _paired_ratio(tuned: np.ndarray, source: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """sum(tuned) / sum(source) over photos with a percentile interval from resampling photos."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(source), size=(BOOTSTRAP, len(source)))
    s, t = source[idx].sum(axis=1), tuned[idx].sum(axis=1)
    keep = s > 0
    lo, hi = np.percentile(t[keep] / s[keep], [2.5, 97.5])
    return float(tuned.sum() / max(source.sum(), 1)), float(lo), float(hi)


def _fmt(est: dict[str, Any] | None, digits: int = 4) -> str:
    if est is None:
        return "-"
    lo, hi = est["ci95"]
    return f"{est['value']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--labels", required=True)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("versions", nargs="+", metavar="MODEL:VERSION", help="the source first")
    args = parser.parse_args(argv)
    repo = ModelRepository(args.repo)
    held = select_split(load_dataset(args.data, args.labels), "holdout", args.split_seed)
    items = list(held.items)
    labels = np.asarray([item.label for item in items])
    rows = []
    base_answers = None
    fingerprint = None
    for spec in args.versions:
        model, _, version_text = spec.rpartition(":")
        version = int(version_text)
        card = repo.card(model, version)
        doc = read_bound_json(repo.version_dir(model, version), "robustness.json", repo.verify(model, version))
        if fingerprint is None:
            fingerprint = doc["data"]["fingerprint"]
        elif doc["data"]["fingerprint"] != fingerprint:
            raise SystemExit(f"{spec} was scored on other photos than {args.versions[0]}")
        if doc["data"]["fingerprint"] != held.fingerprint:
            raise SystemExit(f"{spec}'s robustness.json is not of the held-out half (split seed {args.split_seed})")
        pan, scale = doc["protocols"]["pan"]["center"], doc["protocols"]["scale"]["center"]
        answers = _answers(repo, model, version, Path(args.data), items)
        row: dict[str, Any] = {
            "version": spec, "resolution": card.resolution,
            "tune": None if card.tune is None else {"method": card.tune.method, "steps": card.tune.steps,
                                                     "wall_seconds": card.tune.wall_seconds,
                                                     "recipe": card.tune.recipe},
            "top1": doc["accuracy"]["center"]["top1"], "pan_p_change": pan["p_change"],
            "translate_fp": pan["flip_probability"], "scale_fp": scale["flip_probability"],
            "scale_p_change": scale["p_change"], "photos": len(items),
        }
        flips = (answers[:, :-1] != answers[:, 1:]).sum(axis=1)
        if base_answers is None:
            base_answers, base_flips = answers, flips
        else:
            right_before, right_now = base_answers == labels[:, None], answers == labels[:, None]
            row["served_fixed"] = int((~right_before[:, 4] & right_now[:, 4]).sum())
            row["served_broken"] = int((right_before[:, 4] & ~right_now[:, 4]).sum())
            row["windows_fixed"] = int((~right_before & right_now).sum())
            row["windows_broken"] = int((right_before & ~right_now).sum())
            row["pan_flip_ratio"] = _paired_ratio(flips, base_flips)
        row["pan_flips"] = int(flips.sum())
        rows.append(row)
    print(f"held-out half: {len(items)} photos (split seed {args.split_seed}); center policy; each version at "
          "its card's resolution; flips per 8 diagonal pairs per photo")
    print("| version | res | top-1 | pan P(change) diagonal | translate FP (horizontal) | scale FP | "
          "scale +-5% P(change) | diagonal flips / ratio to source [95%] | fixed / broken: served (windows) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = row.get("pan_flip_ratio")
        ratio_text = f"{row['pan_flips']}" + (f" / {ratio[0]:.2f} [{ratio[1]:.2f}, {ratio[2]:.2f}]" if ratio else "")
        fixed = (f"{row['served_fixed']} / {row['served_broken']} ({row['windows_fixed']} / {row['windows_broken']})"
                 if "served_fixed" in row else "-")
        print(f"| {row['version']} | {row['resolution']} | {_fmt(row['top1'], 3)} | {_fmt(row['pan_p_change'])} | "
              f"{_fmt(row['translate_fp'])} | {_fmt(row['scale_fp'])} | {_fmt(row['scale_p_change'])} | "
              f"{ratio_text} | {fixed} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
