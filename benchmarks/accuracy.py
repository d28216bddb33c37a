"""Reproduce the accuracy table and the reduced-scale JPEG decode measurements.

1. Top-1 accuracy of each model through ``steady predict --json`` on the labelled
   ImageNet sample (``labels.csv``: file,class_index).
2. For the first model, the effect of reduced-scale JPEG decoding
   (``Preprocessor(reduced_decode=True/False)``) on accuracy — on the photos as
   they are, and upscaled 2x so that every photo takes the reduced path — and on
   decode + preprocess time for 12 MP JPEGs made in a temporary folder by
   upscaling sample photos (nothing is written into the repository).

Usage (export the models first, e.g. ``steady export efficientnet-lite0 --repo models``)::

    python benchmarks/accuracy.py --repo models --data ../shared/data/imagenet-sample
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from service.core.preprocess import Preprocessor
from service.core.repository import ModelRepository
from service.core.runtime import Classifier, RuntimeOptions

DEFAULT_MODELS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def read_labels(data: Path) -> dict[str, int]:
    with open(data / "labels.csv", newline="") as fh:
        return {row["file"]: int(row["class_index"]) for row in csv.DictReader(fh)}


def predict_accuracy(repo: Path, model: str, data: Path, labels: dict[str, int]) -> tuple[float, int, float]:
    """Top-1 accuracy through the real CLI (``steady predict --json``); returns (acc, n, seconds)."""
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "predict", "--repo", str(repo), model, str(data), "--json", "--top-k", "1"],
        check=True, capture_output=True, text=True,
    ).stdout
    seconds = time.perf_counter() - start
    hits = total = 0
    for line in out.splitlines():
        row = json.loads(line)
        name = Path(row["image"]).name
        if name in labels:
            total += 1
            hits += int(row["predictions"][0]["index"] == labels[name])
    if total != len(labels):
        raise SystemExit(f"{model}: predicted {total} of {len(labels)} labelled photos")
    return hits / total, total, seconds


def top1(classifier: Classifier, pre: Preprocessor, blobs: list[bytes], batch: int = 16) -> np.ndarray:
    preds = []
    for i in range(0, len(blobs), batch):
        tensor = pre.batch(blobs[i:i + batch])
        preds.append(classifier.logits(tensor).argmax(1))
    return np.concatenate(preds)


def upscale_jpeg(data: bytes, factor: float | None = None, size: tuple[int, int] | None = None,
                 quality: int = 90) -> bytes:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    target = size or (round(img.width * factor), round(img.height * factor))  # type: ignore[operator]
    buf = io.BytesIO()
    img.resize(target, Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_ms(pre: Preprocessor, data: bytes, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pre.prepare(data)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("models"), help="model repository (default: models)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/imagenet-sample"),
                        help="folder with the photos and labels.csv")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="models to measure")
    parser.add_argument("--large", type=int, default=6, help="12 MP JPEGs to time (default 6)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats per large JPEG (median)")
    args = parser.parse_args(argv)

    labels = read_labels(args.data)
    files = sorted(labels)
    print(f"## Top-1 accuracy through `steady predict --json` ({len(files)} photos in {args.data})\n")
    print("| model | version | resolution | top-1 | photos | wall s |")
    print("|---|---|---|---|---|---|")
    repo = ModelRepository(args.repo)
    for model in args.models:
        version = repo.resolve(model)
        card = repo.card(model, version)
        acc, n, seconds = predict_accuracy(args.repo, model, args.data, labels)
        print(f"| {model} | {version} | {card.resolution} | {acc:.3f} | {n} | {seconds:.1f} |", flush=True)

    model = args.models[0]
    classifier = Classifier.from_repository(repo, model, repo.resolve(model), RuntimeOptions(provider="cpu"))
    truth = np.array([labels[f] for f in files])
    blobs = [(args.data / f).read_bytes() for f in files]
    doubled = [upscale_jpeg(b, factor=2.0) for b in blobs]
    full = Preprocessor(classifier.card, reduced_decode=False)
    reduced = Preprocessor(classifier.card, reduced_decode=True)
    limit = 2 * full.decode_short_side
    print(f"\n## Reduced-scale JPEG decode, {model} (DCT scaling when the short side >= {limit} px)\n")
    print("| photos | reduced path taken | top-1 full decode | top-1 reduced | top-1 changed |")
    print("|---|---|---|---|---|")
    for title, data in (("as shipped", blobs), ("upscaled 2x", doubled)):
        taken = sum(min(Image.open(io.BytesIO(b)).size) >= limit for b in data)
        a = top1(classifier, full, data)
        b = top1(classifier, reduced, data)
        print(f"| {title} | {taken}/{len(data)} | {np.mean(a == truth):.3f} | {np.mean(b == truth):.3f} "
              f"| {int(np.sum(a != b))} |", flush=True)

    print(f"\n## Decode + preprocess time, 12 MP JPEGs (4000x3000, quality 90), one thread, median of "
          f"{args.repeats}\n")
    print("| photo | full decode ms | reduced decode ms | speed-up | same top-1 |")
    print("|---|---|---|---|---|")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        step = max(1, len(files) // max(1, args.large))
        for f in files[::step][: args.large]:
            big = upscale_jpeg((args.data / f).read_bytes(), size=(4000, 3000))
            (Path(tmp) / f).write_bytes(big)  # a real file, as a user would have it
            big = (Path(tmp) / f).read_bytes()
            t_full = decode_ms(full, big, args.repeats)
            t_reduced = decode_ms(reduced, big, args.repeats)
            same = top1(classifier, full, [big])[0] == top1(classifier, reduced, [big])[0]
            ratios.append(t_full / t_reduced)
            print(f"| {f} | {t_full:.0f} | {t_reduced:.0f} | {t_full / t_reduced:.1f}x | {'yes' if same else 'NO'} |",
                  flush=True)
    print(f"\nmedian speed-up {statistics.median(ratios):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
