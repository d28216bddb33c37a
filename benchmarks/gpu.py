"""GPU throughput of a stored model through ONNX Runtime's CUDA execution provider, with IO binding.

Measures model-only images/s at batch 1, 8 and 64 for each ONNX file given (e.g. an fp32 and an
fp16 export of the same model), the input already on the GPU (IO binding), and top-1 agreement
between the first file and the others on photos (``--data``), preprocessed by Steady's one
preprocessing path. Prints one JSON object.

Usage::

    python benchmarks/gpu.py --model models/efficientnet-lite0/1 --model models/lite0-fp16/1 \
        --data ../shared/data/imagenet-sample [--provider cuda|cpu] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from service.core.card import ModelCard
from service.core.images import list_images
from service.core.preprocess import Preprocessor
from service.core.runtime import Classifier, RuntimeOptions


def _load(folder: Path, provider: str) -> Classifier:
    card = ModelCard.from_json((folder / "card.json").read_bytes())
    return Classifier((folder / "model.onnx").read_bytes(), card, RuntimeOptions(provider=provider))


def _throughput(clf: Classifier, batch: int, seconds: float, device: str) -> dict[str, float]:
    import onnxruntime as ort

    res = clf.card.resolution
    x = np.random.default_rng(0).standard_normal((batch, 3, res, res)).astype(np.float32)
    binding = clf.session.io_binding()
    x_dev = ort.OrtValue.ortvalue_from_numpy(x, device, 0)
    binding.bind_ortvalue_input(clf.input_name, x_dev)
    binding.bind_output(clf.output_name, device, 0)
    for _ in range(5):
        clf.session.run_with_iobinding(binding)
    runs = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        clf.session.run_with_iobinding(binding)
        runs += 1
    binding.copy_outputs_to_cpu()
    elapsed = time.perf_counter() - start
    return {"batch": batch, "images_per_s": round(runs * batch / elapsed, 1),
            "latency_ms": round(1000 * elapsed / runs, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, type=Path, help="a version folder")
    parser.add_argument("--data", type=Path, help="photos for the top-1 agreement check")
    parser.add_argument("--provider", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batches", default="1,8,64")
    args = parser.parse_args()
    device = "cuda" if args.provider == "cuda" else "cpu"
    models = [_load(folder, args.provider) for folder in args.model]
    report: dict[str, object] = {"providers": models[0].providers}
    try:
        import onnxruntime as ort

        report["onnxruntime"] = ort.__version__
        report["device"] = ort.get_device()
    except Exception:  # pragma: no cover - informational only
        pass
    report["throughput"] = {
        f"{m.card.name}/{m.card.version} ({m.card.precision})": [
            _throughput(m, int(b), args.seconds, device) for b in args.batches.split(",")
        ]
        for m in models
    }
    if args.data and len(models) > 1:
        pre = Preprocessor(models[0].card)
        files = list_images([args.data])
        top1 = []
        for m in models:
            preds = []
            for i in range(0, len(files), 32):
                batch = pre.batch([f.read_bytes() for f in files[i:i + 32]])
                preds.append(m.logits(batch).argmax(1))
            top1.append(np.concatenate(preds))
        report["top1_agreement_vs_first"] = {
            f"{m.card.name}/{m.card.version}": round(float((t == top1[0]).mean()), 4) for m, t in zip(models, top1)
        }
        report["images"] = len(files)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
