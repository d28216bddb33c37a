"""``steady models`` and ``steady predict``: look into a repository, classify files."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.core.repository import ModelRepository

from service.cli.args import add_model_args

__all__ = ["register"]


def _version_status(repo: "ModelRepository", name: str, version: int) -> dict[str, Any]:
    """One version as ``steady models`` shows it: verified sha256 (or the checksum error) and gate status."""
    from service.core.errors import BoundFileError, BoundFileMissing, BoundFileStale, ChecksumError
    from service.core.repository import read_bound_json

    try:
        sha = repo.verify(name, version)
    except ChecksumError as exc:
        return {"version": version, "sha256": None, "created": None, "verified": False, "error": str(exc),
                "gate": None}
    card = repo.card(name, version)
    try:
        gate: str | None = str(read_bound_json(repo.version_dir(name, version), "gate.json", sha).get("decision"))
    except BoundFileMissing:
        gate = None
    except BoundFileStale:
        gate = "stale"
    except BoundFileError:
        gate = "unreadable"
    return {"version": version, "sha256": sha, "created": card.created, "verified": True, "gate": gate}


def _cmd_models(args: argparse.Namespace) -> int:
    from service.core.repository import ModelRepository

    repo = ModelRepository(args.repo)
    models = []
    for name in repo.models():
        stages = repo.stages(name)
        models.append({"name": name, "versions": [_version_status(repo, name, v) for v in repo.versions(name)],
                       "stages": {"production": stages.production, "candidate": stages.candidate}})
    if args.json:
        print(json.dumps({"models": models}))
        return 0
    if not models:
        print(f"no models in {args.repo}")
    for model in models:
        print(f"{model['name']}  production={model['stages']['production']}  candidate={model['stages']['candidate']}")
        for v in model["versions"]:
            if not v["verified"]:
                print(f"  v{v['version']}  CHECKSUM ERROR: {v['error']}")
                continue
            print(f"  v{v['version']}  sha256={v['sha256'][:12]}  created={v['created']}  gate={v['gate'] or '-'}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from service.core.errors import SteadyError
    from service.core.images import list_images
    from service.core.preprocess import Preprocessor
    from service.core.repository import ModelRepository
    from service.core.runtime import Classifier, RuntimeOptions

    repo = ModelRepository(args.repo)
    version = repo.resolve(args.model, args.version)
    classifier = Classifier.from_repository(repo, args.model, version, RuntimeOptions(provider=args.provider))
    pre = Preprocessor(classifier.card, policy=args.policy)
    files = list_images(args.paths)
    if not files:
        raise SteadyError("no images found in the given paths")
    for start in range(0, len(files), args.batch_size):
        chunk = files[start:start + args.batch_size]
        logits = classifier.logits(pre.batch([path.read_bytes() for path in chunk]))
        for path, preds in zip(chunk, classifier.top_k(logits, args.top_k)):
            if args.json:
                print(json.dumps({"image": str(path), "model": args.model, "version": version,
                                  "predictions": [p.to_dict() for p in preds]}))
            else:
                best = preds[0]
                print(f"{path}\t{best.index}\t{best.label}\t{best.score:.4f}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list models, versions, stages and gate status",
                       description="List the repository's models, versions, stages and gate status.")
    p.add_argument("--repo", required=True, help="model repository folder")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("predict", help="classify image files with a stored model",
                       description="Classify images with the model's own preprocessing and ONNX Runtime.")
    add_model_args(p)
    p.add_argument("paths", nargs="+", help="image files or folders (all images inside, sorted)")
    p.add_argument("--top-k", type=int, default=5, help="classes to print per image (default 5)")
    p.add_argument("--policy", choices=("center", "object"), help="override the card's serving policy")
    p.add_argument("--batch-size", type=int, default=16, help="images per ONNX Runtime call (default 16)")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto", help="execution provider")
    p.add_argument("--json", action="store_true", help="one JSON line per image")
    p.set_defaults(func=_cmd_predict)


