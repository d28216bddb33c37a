"""The ``steady`` command line.

Each package registers its own sub-commands (``exporters.cli``, ``robustness.cli``,
``service.serve_cli``, ``service.bench``); heavy imports (torch, Ray) happen inside
the command that needs them, so ``steady --help`` is fast and serving never imports torch.

Errors are one line on stderr and a non-zero exit code: 2 for bad input or usage,
1 for failures (see :mod:`service.errors`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from service.errors import SteadyError

__all__ = ["main", "build_parser", "IMAGE_SUFFIXES", "list_images"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


def list_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, and every image inside given directories (recursively, sorted)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise SteadyError(f"no such file or directory: {path}")
    return found


def _cmd_models(args: argparse.Namespace) -> int:
    from service.repository import ModelRepository, read_json

    repo = ModelRepository(args.repo)
    models = []
    for name in repo.models():
        stages = repo.stages(name)
        versions = []
        for version in repo.versions(name):
            vdir = repo.version_dir(name, version)
            card = repo.card(name, version)
            gate_file = vdir / "gate.json"
            gate = None
            if gate_file.exists():
                try:
                    data = read_json(gate_file)
                    gate = data.get("decision") if data.get("model_sha256") == card.onnx_sha256 else "stale"
                except (OSError, ValueError):
                    gate = "unreadable"
            versions.append({"version": version, "sha256": card.onnx_sha256, "created": card.created, "gate": gate})
        models.append({"name": name, "versions": versions,
                       "stages": {"production": stages.production, "candidate": stages.candidate}})
    if args.json:
        print(json.dumps({"models": models}))
        return 0
    if not models:
        print(f"no models in {args.repo}")
    for model in models:
        print(f"{model['name']}  production={model['stages']['production']}  candidate={model['stages']['candidate']}")
        for v in model["versions"]:
            print(f"  v{v['version']}  sha256={v['sha256'][:12]}  created={v['created']}  gate={v['gate'] or '-'}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from service.preprocess import Preprocessor
    from service.repository import ModelRepository
    from service.runtime import Classifier, RuntimeOptions

    repo = ModelRepository(args.repo)
    version = repo.resolve(args.model, args.version)
    classifier = Classifier.from_repository(repo, args.model, version, RuntimeOptions(provider=args.provider))
    pre = Preprocessor(classifier.card, policy=args.policy)
    files = list_images(args.paths)
    if not files:
        raise SteadyError("no images found in the given paths")
    for start in range(0, len(files), args.batch_size):
        chunk = files[start:start + args.batch_size]
        views = [pre.prepare(path.read_bytes()) for path in chunk]
        logits = classifier.logits(pre.to_tensor([v.pixels for v in views]))
        for path, preds in zip(chunk, classifier.top_k(logits, args.top_k)):
            if args.json:
                print(json.dumps({"image": str(path), "model": args.model, "version": version,
                                  "predictions": [p.to_dict() for p in preds]}))
            else:
                best = preds[0]
                print(f"{path}\t{best.index}\t{best.label}\t{best.score:.4f}")
    return 0


def _register_core(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list models, versions, stages and gate status",
                       description="List the repository's models, versions, stages and gate status.")
    p.add_argument("--repo", required=True, help="model repository folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("predict", help="classify image files with a stored model",
                       description="Classify images with the model's own preprocessing and ONNX Runtime.")
    p.add_argument("--repo", required=True, help="model repository folder")
    p.add_argument("model", help="model name")
    p.add_argument("paths", nargs="+", help="image files or folders (all images inside, sorted)")
    p.add_argument("--version", help="version (default: production, else the newest)")
    p.add_argument("--top-k", type=int, default=5, help="classes to print per image (default 5)")
    p.add_argument("--policy", choices=("center", "object"), help="override the card's serving policy")
    p.add_argument("--batch-size", type=int, default=16, help="images per ONNX Runtime call (default 16)")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto", help="execution provider")
    p.add_argument("--json", action="store_true", help="one JSON line per image")
    p.set_defaults(func=_cmd_predict)


def _registrars() -> list[Callable[[argparse._SubParsersAction], None]]:
    from exporters.cli import register as register_export
    from robustness.cli import register as register_robustness
    from service.bench import register as register_bench
    from service.serve_cli import register as register_serve

    return [_register_core, register_export, register_robustness, register_serve, register_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steady",
        description="Steady: image classifiers served so their answers do not flip when the picture moves by a pixel.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _registrars():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except SteadyError as exc:
        print(f"steady {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (OSError, ValueError) as exc:
        print(f"steady {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
