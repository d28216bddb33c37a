"""``steady bench``: the benchmarks (their code lives in the ``benchmarks`` package)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from service.cli.args import add_model_args

__all__ = ["register"]


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``steady bench score``, ``serve``, ``gpu``, ``parity`` and ``compare-scores`` to the ``steady`` parser."""
    bench = sub.add_parser("bench", help="benchmarks", description="Benchmarks.")
    bench.set_defaults(func=lambda a: (bench.print_help(), 2)[1])
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    _add_score(bench_sub)
    _add_serve(bench_sub)
    _add_gpu(bench_sub)
    _add_parity(bench_sub)
    _add_compare_scores(bench_sub)


def _cmd_bench_score(args: argparse.Namespace) -> int:
    from benchmarks.score import bench_score
    from service.core.repository import ModelRepository

    repo = ModelRepository(args.repo)
    version = repo.resolve(args.model, args.version)
    out = bench_score(repo, args.model, version, args.data, max_images=args.max_images, batch_size=args.batch_size,
                      policies=_csv(args.policies), raw_seconds=args.raw_seconds)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:<26}{v}")
    return 0


def _add_score(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("score", help="scorer throughput vs raw ONNX Runtime",
                             description="Scorer model-evaluations/s vs raw ONNX Runtime at the same batch size.")
    add_model_args(p)
    p.add_argument("--data", required=True, help="folder of images")
    p.add_argument("--max-images", type=int, default=16, help="images to score (default 16)")
    p.add_argument("--batch-size", type=int, default=32, help="ONNX Runtime batch size (default 32)")
    p.add_argument("--policies", default="center,object", help="policies (default center,object)")
    p.add_argument("--raw-seconds", type=float, default=3.0, help="seconds per raw ORT measurement (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_bench_score)


def _add_serve(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "serve", help="served images/s vs the in-process ceiling, latency, ready time, memory",
        description="Start `steady serve` (or use --url), drive it over HTTP with wrk and measure, in the same "
                    "run, the in-process ceiling (decode + preprocess + ONNX Runtime, best batch size).")
    add_model_args(p)
    p.add_argument("--data", required=True, help="folder of images (JPEG photos)")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated connection counts (default 1,8,32)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per served run (default 15)")
    p.add_argument("--url", help="base URL of a running service (default: start one)")
    p.add_argument("--config", help="settings YAML for the started service (and the ceiling's thread counts)")
    p.add_argument("--max-images", type=int, default=64, help="images cycled through (default 64)")
    p.add_argument("--large", action="store_true", help="also run with 12 MP JPEGs generated into a temp dir")
    p.add_argument("--large-images", type=int, default=8, help="how many 12 MP JPEGs (default 8)")
    p.add_argument("--ceiling-seconds", type=float, default=4.0, help="seconds per ceiling measurement (default 4)")
    p.add_argument("--client", choices=("auto", "wrk", "aiohttp"), default="auto", help="load generator")
    p.add_argument("--plain", action="store_true",
                   help="also start benchmarks/plain_server.py (FastAPI + ONNX Runtime + Pillow, no batching) on the "
                        "same version and drive it right after each served run")
    p.add_argument("--compare-url", help="base URL of an already running plain server to drive the same way")
    p.add_argument("--compare-version", type=int, metavar="V",
                   help="another version the service serves (production or candidate, e.g. an int8 one), driven "
                        "with ?version=V right after each served run")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.add_argument("--out", help="also write the JSON to this file")
    p.set_defaults(func=_cmd_bench_serve)


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    from benchmarks.serve import BenchOptions, bench_serve, format_report

    try:
        concurrency = tuple(int(x) for x in args.concurrency.split(",") if x.strip())
    except ValueError as exc:
        raise ValueError(f"--concurrency must be comma-separated integers, got {args.concurrency!r}") from exc
    opts = BenchOptions(repo=args.repo, model=args.model, version=args.version, data=args.data,
                        concurrency=concurrency, duration_s=args.duration, url=args.url, config=args.config,
                        max_images=args.max_images, large=args.large, large_images=args.large_images,
                        ceiling_s=args.ceiling_seconds, client=args.client, plain=args.plain,
                        compare_url=args.compare_url, compare_version=args.compare_version)
    doc = bench_serve(opts)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2) if args.json else format_report(doc))
    return 0


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _csv(text))
    except ValueError as exc:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from exc


def _add_gpu(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "gpu", help="on a GPU: raw ONNX Runtime at batch 64 vs served images/s with CPU, then GPU preprocessing",
        description="One run on a GPU machine: raw ONNX Runtime CUDA images/s at batch 64, then `steady serve` "
                    "driven by wrk with CPU preprocessing and with GPU preprocessing (DALI): images/s, ratio to raw, "
                    "p50/p99, GPU utilisation and memory, client CPU; photos and 12 MP JPEGs. "
                    "Without a GPU: --provider cpu --devices cpu,dali-cpu --config deploy/steady.yaml.")
    add_model_args(p)
    p.add_argument("--data", required=True, help="folder of images (JPEG photos)")
    p.add_argument("--config", default="deploy/steady-gpu.yaml", help="settings YAML (default deploy/steady-gpu.yaml)")
    p.add_argument("--provider", choices=("cuda", "cpu"), default="cuda", help="ONNX Runtime provider (default cuda)")
    p.add_argument("--devices", default="cpu,gpu", help="preprocess_device per served run (default cpu,gpu)")
    p.add_argument("--concurrency", default="64,256", help="comma-separated connection counts (default 64,256)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per served run (default 20)")
    p.add_argument("--raw-seconds", type=float, default=5.0, help="seconds of the raw measurement (default 5)")
    p.add_argument("--max-images", type=int, default=64, help="photos cycled through (default 64)")
    p.add_argument("--large-images", type=int, default=16, help="12 MP JPEGs made from the photos (0: none)")
    p.add_argument("--client-threads", type=int, default=4, help="wrk threads (default 4)")
    p.add_argument("--cpu-threads", type=int, help="decode threads when preprocessing on the CPU (default: all "
                                                    "cores but the client's)")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    p.add_argument("--out", help="also write the JSON to this file")
    p.set_defaults(func=_cmd_bench_gpu)


def _cmd_bench_gpu(args: argparse.Namespace) -> int:
    from benchmarks.gpu import GpuBenchOptions, bench_gpu_serve, format_gpu_report

    opts = GpuBenchOptions(repo=args.repo, model=args.model, data=args.data,
                           version=args.version, config=args.config or None,
                           provider=args.provider, devices=_csv(args.devices),
                           concurrency=_ints(args.concurrency, "--concurrency"), duration_s=args.duration,
                           raw_seconds=args.raw_seconds, max_images=args.max_images, large=args.large_images > 0,
                           large_images=max(1, args.large_images), client_threads=args.client_threads,
                           cpu_threads=args.cpu_threads)
    doc = bench_gpu_serve(opts)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2) if args.json else format_gpu_report(doc))
    return 0


def _add_parity(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "parity", help="the GPU path's preprocessing (DALI) against the CPU path: pixels and top-1",
        description="DALI's preprocessing against the CPU path on real photos: pixel difference to the full-decode "
                    "reference (contract: <= 3 levels), top-1 agreement with the CPU path (contract: >= 0.99), "
                    "IO binding. Exit 0 when the contract holds, 1 otherwise.")
    add_model_args(p)
    p.add_argument("--data", required=True, help="folder of photos (labels.csv inside gives accuracy)")
    p.add_argument("--labels", help="CSV with columns file,class_index (default: DATA/labels.csv)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="DALI's backend (default cpu)")
    p.add_argument("--large", type=int, default=0, help="also N 12 MP photos made from the first N")
    p.add_argument("--max-images", type=int, default=0, help="only the first N photos (default all)")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.add_argument("--out", help="also write the record to this file")
    p.set_defaults(func=_cmd_bench_parity)


def _cmd_bench_parity(args: argparse.Namespace) -> int:
    from benchmarks.dali_parity import dali_parity, format_parity

    doc = dali_parity(args.repo, args.model, args.data, version=args.version,
                      labels=args.labels, device=args.device, large=args.large, max_images=args.max_images)
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1) if args.json else format_parity(doc))
    return 0 if doc["passed"] else 1


def _add_compare_scores(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "compare-scores", help="is every estimate of a GPU-path steady score inside the CPU run's intervals",
        description="Compare two robustness.json documents of the same model, photos and seed (steady score, then "
                    "steady score --preprocess-device gpu|dali-cpu): every flip metric and accuracy of the second must "
                    "lie inside the first's 95% interval. Exit 0 when all do, 1 otherwise.")
    p.add_argument("cpu", help="robustness.json of the CPU path")
    p.add_argument("device", help="robustness.json of the GPU path (gpu or dali-cpu)")
    p.add_argument("--out", help="also write the comparison as JSON")
    p.set_defaults(func=_cmd_compare_scores)


def _cmd_compare_scores(args: argparse.Namespace) -> int:
    from benchmarks.dali_parity import compare_scores, format_comparison

    doc = compare_scores(json.loads(Path(args.cpu).read_text()), json.loads(Path(args.device).read_text()))
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(format_comparison(doc))
    return 0 if doc["passed"] else 1

