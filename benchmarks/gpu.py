"""GPU benchmarks: the model alone through ONNX Runtime's CUDA execution provider, and the whole service.

1. ``python -m benchmarks.gpu --model DIR [--model DIR] --provider cuda``: model-only images/s at batch 1, 8
   and 64 for each ONNX file given (e.g. an fp32 and an fp16 export of the same model), the input already on
   the GPU (IO binding), and top-1 agreement between the first file and the others on photos (``--data``),
   preprocessed by Steady's one preprocessing path. Prints one JSON object.
2. ``steady bench gpu`` (:func:`bench_gpu_serve`): in one run on a GPU machine, raw ONNX Runtime CUDA images/s
   at batch 64 (the limit), then ``steady serve`` driven over HTTP by wrk at concurrency 64 and 256, first with
   CPU preprocessing (Pillow on every host core but the client's), then with GPU preprocessing (DALI, the tensor
   bound to ONNX Runtime on the device): images/s, ratio to raw, p50/p99 latency, GPU utilisation and memory
   (NVML, sampled every 0.5 s), the service's and the client's CPU (a saturated client shows), on photos and on
   12 MP phone-size JPEGs. Targets (issue 16): GPU preprocessing served >= 0.7x raw and >= 2x CPU preprocessing.
   Without a GPU, ``--provider cpu --devices cpu,dali-cpu`` runs the same script end to end on the CPU.

Usage::

    python -m benchmarks.gpu --model models/efficientnet-lite0/1 --model models/lite0-fp16/1 \
        --data ../shared/data/imagenet-sample [--provider cuda|cpu] [--seconds 3]
    steady bench gpu --repo models lite0-fp16 --data ../shared/data/imagenet-sample \
        [--config deploy/steady-gpu.yaml] [--concurrency 64,256] [--duration 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from service.core.card import ModelCard
from service.core.errors import SteadyError
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


# ------------------------------------------------------------------------ the whole service on a GPU
TARGET_RATIO_TO_RAW = 0.7  # served with GPU preprocessing / raw ONNX Runtime at batch 64 (issue 16)
TARGET_SPEEDUP = 2.0  # served with GPU preprocessing / served with CPU preprocessing


@dataclass(frozen=True)
class GpuBenchOptions:
    """What ``steady bench gpu`` measures (see the module docstring).

    Attributes:
        repo, model, version, data: the served model and the photos (read by path, never copied).
        config: settings YAML for ``steady serve`` (default ``deploy/steady-gpu.yaml``).
        provider: ONNX Runtime provider of the raw measurement and the service (``cuda``; ``cpu`` to test).
        devices: ``preprocess_device`` of each served run, in order (``cpu,gpu``; ``cpu,dali-cpu`` to test).
        concurrency: wrk connections, one run each; duration_s: seconds per run.
        raw_batch, raw_seconds: the raw ONNX Runtime measurement (batch 64: the limit).
        large, large_images: also 12 MP JPEGs made from the photos.
        client_threads: wrk threads (the client must not be the bottleneck: its CPU is reported).
        cpu_threads: decode threads and CPUs of the replica when preprocessing on the CPU
            (default: every host core the client leaves).
        overrides: more settings for every served run.
    """

    repo: str
    model: str
    data: str
    version: int | None = None
    config: str | None = "deploy/steady-gpu.yaml"
    provider: str = "cuda"
    devices: tuple[str, ...] = ("cpu", "gpu")
    concurrency: tuple[int, ...] = (64, 256)
    duration_s: float = 20.0
    warmup_s: float = 3.0
    raw_batch: int = 64
    raw_seconds: float = 5.0
    max_images: int = 64
    large: bool = True
    large_images: int = 16
    client_threads: int = 4
    cpu_threads: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.devices or any(d not in ("cpu", "gpu", "dali-cpu") for d in self.devices):
            raise ValueError(f"devices must be some of cpu, gpu, dali-cpu, got {self.devices}")
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency must be integers >= 1, got {self.concurrency}")
        if self.provider not in ("cuda", "cpu"):
            raise ValueError(f"provider must be cuda or cpu, got {self.provider!r}")


class _GpuSampler:
    """NVML readings every ``interval`` seconds in a thread: GPU utilisation and memory during a run."""

    def __init__(self, interval: float = 0.5) -> None:
        import threading

        self.interval = interval
        self.samples: list[list[Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-gpu-sampler", daemon=True)

    def _run(self) -> None:
        from service.core.devices import gpu_readings

        while not self._stop.is_set():
            readings = gpu_readings()
            if readings:
                self.samples.append(readings)
            self._stop.wait(self.interval)

    def __enter__(self) -> "_GpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any] | None:
        """Mean and max utilisation and peak memory used per GPU; None without NVML readings."""
        if not self.samples:
            return None
        out: dict[str, Any] = {}
        for index in sorted({r.index for s in self.samples for r in s}):
            rows = [r for s in self.samples for r in s if r.index == index]
            util = [r.utilization for r in rows]
            out[str(index)] = {"name": rows[0].name, "utilization_mean": round(float(np.mean(util)), 3),
                               "utilization_max": round(float(np.max(util)), 3),
                               "memory_used_max_mb": round(max(r.memory_used for r in rows) / 2**20, 1),
                               "memory_total_mb": round(rows[0].memory_total / 2**20, 1), "samples": len(rows)}
        return out


def _host_top1(card: Any, onnx_bytes: bytes, bodies: Sequence[bytes]) -> list[int]:
    """The CPU path's answers in this process (ONNX Runtime on the CPU: the GPU stays free for the service)."""
    clf = Classifier(onnx_bytes, card, RuntimeOptions(provider="cpu"))
    pre = Preprocessor(card)
    return [int(np.argmax(clf.logits(pre(b))[0])) for b in bodies]


def bench_gpu_serve(opts: GpuBenchOptions, log: Any = None) -> dict[str, Any]:
    """Raw ONNX Runtime at batch 64, then the service with each preprocessing device, in one run."""
    import gc
    import os
    import shutil
    import sys
    import tempfile

    from benchmarks.serve import (check_answers, cpu_share, cpu_times, image_paths, make_large_photos, memory_of,
                                  run_aiohttp, run_wrk)
    from service.core.gpu_preprocess import dali_version
    from service.core.repository import ModelRepository
    from service.launcher import ServeProcess

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    repo = ModelRepository(opts.repo)
    version = repo.resolve(opts.model, opts.version)
    loaded = repo.load(opts.model, version)
    card = loaded.card
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    device = "cuda" if opts.provider == "cuda" else "cpu"
    clf = Classifier(loaded.onnx_bytes, card, RuntimeOptions(provider=opts.provider))
    if opts.provider == "cuda" and clf.providers[0] != "CUDAExecutionProvider":
        raise SteadyError(f"ONNX Runtime runs on {clf.providers}, not CUDA: install the gpu extra on a GPU machine")
    raw = _throughput(clf, opts.raw_batch, opts.raw_seconds, device)
    raw["providers"] = clf.providers
    del clf
    gc.collect()  # free the session's device memory before the service takes the GPU
    log(f"raw ONNX Runtime ({opts.provider}) at batch {opts.raw_batch}: {raw['images_per_s']} images/s")
    client = "wrk" if shutil.which("wrk") else "aiohttp"
    cpu_threads = opts.cpu_threads or max(1, cpus - opts.client_threads)
    runs: list[dict[str, Any]] = []
    services: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="steady-bench-gpu-") as tmp:
        workdir = Path(tmp)
        sets = {"photos": image_paths(opts.data, opts.max_images)}
        if opts.large:
            log(f"generating {opts.large_images} 12 MP JPEGs ...")
            sets["large-12mp"] = make_large_photos(sets["photos"], workdir / "large", opts.large_images)
        bodies = {name: [p.read_bytes() for p in paths] for name, paths in sets.items()}
        expected = {name: _host_top1(card, loaded.onnx_bytes, b[:32]) for name, b in bodies.items()}
        for where in opts.devices:
            settings: dict[str, Any] = {"repo": str(opts.repo), "provider": opts.provider,
                                        "preprocess_device": where, **opts.overrides}
            if where == "cpu":  # Pillow gets every core the client leaves
                settings.update({"decode_threads": cpu_threads, "replica_cpus": float(cpu_threads)})
            log(f"[{where}] starting steady serve ...")
            service = ServeProcess.start(settings, workdir / f"serve-{where}.log", config=opts.config)
            try:
                ready_s = service.wait_ready()
                url = f"{service.base}/v1/models/{opts.model}:classify"
                log(f"[{where}] ready in {ready_s:.1f} s")
                for name, paths in sets.items():
                    agreement = check_answers(url, bodies[name][:32], expected[name])

                    def load(c: int, seconds: float) -> dict[str, Any]:
                        if client == "wrk":
                            return run_wrk(url, paths, c, seconds, workdir, threads=min(opts.client_threads, c))
                        return run_aiohttp(url, paths, c, seconds)

                    load(max(opts.concurrency), opts.warmup_s)
                    for c in opts.concurrency:
                        procs = service.processes()
                        cpu0, t0 = cpu_times(procs), time.perf_counter()
                        with _GpuSampler() as sampler:
                            served = load(c, opts.duration_s)
                        seconds = time.perf_counter() - t0
                        svc = cpu_share(cpu0, cpu_times(service.processes()), seconds)
                        threads = min(opts.client_threads, c) if client == "wrk" else 1
                        run = {"preprocess_device": where, "photos": name, "concurrency": c, **served,
                               "ratio_to_raw": round(served["images_per_s"] / raw["images_per_s"], 3),
                               "top1_agreement_with_cpu_path": round(agreement, 4),
                               "gpu": sampler.summary(), "service_cpu_cores": svc,
                               "service_cpu_ms_per_image": round(1000 * svc["total"] * seconds
                                                                 / max(1, served["requests"]), 2),
                               "client_threads": threads,
                               "client_saturated": served["client_cpu"] >= 0.9 * threads}
                        util = next(iter((run["gpu"] or {}).values()), {}).get("utilization_mean")
                        log(f"[{where}] {name} c={c}: {served['images_per_s']} img/s ({run['ratio_to_raw']} of raw), "
                            f"p50/p99 {served['p50_ms']}/{served['p99_ms']} ms, GPU util {util}, "
                            f"client {served['client_cpu']} core of {threads}, errors "
                            f"{served['non_2xx'] + served['socket_errors']}")
                        runs.append(run)
                services[where] = {"ready_s": round(ready_s, 2), "memory": memory_of(service.processes()),
                                   "settings": {k: v for k, v in settings.items() if k != "repo"}}
            finally:
                service.stop()
                service.cleanup()
    return {
        "model": opts.model, "version": version, "precision": card.precision, "resolution": card.resolution,
        "provider": opts.provider, "dali": dali_version(), "client": client, "cpus": cpus,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "raw": raw, "services": services, "runs": runs,
        # the targets judge a GPU run; a CPU run (provider cpu, dali-cpu) only proves the script works
        "targets": _targets(runs, raw, opts) if opts.provider == "cuda" and "gpu" in opts.devices else [],
    }


def _targets(runs: list[dict[str, Any]], raw: dict[str, Any], opts: GpuBenchOptions) -> list[dict[str, Any]]:
    """Served images/s with device preprocessing against raw ORT and against CPU preprocessing, per set and c."""
    device = next((d for d in opts.devices if d != "cpu"), None)
    out = []
    for r in runs:
        if r["preprocess_device"] != device:
            continue
        cpu = next((x for x in runs if x["preprocess_device"] == "cpu" and x["photos"] == r["photos"]
                    and x["concurrency"] == r["concurrency"]), None)
        speedup = round(r["images_per_s"] / cpu["images_per_s"], 3) if cpu and cpu["images_per_s"] else None
        out.append({"photos": r["photos"], "concurrency": r["concurrency"], "ratio_to_raw": r["ratio_to_raw"],
                    "ratio_met": r["ratio_to_raw"] >= TARGET_RATIO_TO_RAW, "speedup_vs_cpu_preprocessing": speedup,
                    "speedup_met": speedup is not None and speedup >= TARGET_SPEEDUP})
    return out


def format_gpu_report(doc: dict[str, Any]) -> str:
    lines = [f"steady bench gpu: {doc['model']} v{doc['version']} ({doc['precision']}, {doc['resolution']} px), "
             f"provider {doc['provider']}, DALI {doc['dali']}, {doc['cpus']} CPUs, client {doc['client']}",
             f"raw ONNX Runtime at batch {doc['raw']['batch']}: {doc['raw']['images_per_s']} images/s"]
    lines.append(f"{'preprocess':>10} {'photos':>10} {'conc':>5} {'img/s':>9} {'of raw':>7} {'p50 ms':>8} "
                 f"{'p99 ms':>8} {'GPU util':>8} {'client':>9} {'errors':>6}")
    for r in doc["runs"]:
        util = next(iter((r["gpu"] or {}).values()), {}).get("utilization_mean")
        lines.append(f"{r['preprocess_device']:>10} {r['photos']:>10} {r['concurrency']:>5} {r['images_per_s']:>9.1f} "
                     f"{r['ratio_to_raw']:>7.3f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
                     f"{'-' if util is None else f'{util:.2f}':>8} {r['client_cpu']:>5.2f}/{r['client_threads']:<3} "
                     f"{r['non_2xx'] + r['socket_errors']:>6}")
    if not doc["targets"]:
        lines.append(f"targets (>= {TARGET_RATIO_TO_RAW}x raw, >= {TARGET_SPEEDUP}x CPU preprocessing) judge a GPU run "
                     "(provider cuda, devices cpu,gpu) only")
    for t in doc["targets"]:
        lines.append(f"target {t['photos']} c={t['concurrency']}: {t['ratio_to_raw']} of raw "
                     f"({'met' if t['ratio_met'] else 'missed'} >= {TARGET_RATIO_TO_RAW}), "
                     f"{t['speedup_vs_cpu_preprocessing']}x CPU preprocessing "
                     f"({'met' if t['speedup_met'] else 'missed'} >= {TARGET_SPEEDUP})")
    return "\n".join(lines)


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
