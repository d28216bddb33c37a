"""Sub-commands of this package: ``score``, ``gate``, ``promote``, ``rollback``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from service.cli.args import add_model_args

__all__ = ["register"]


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in _csv(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _cmd_score(args: argparse.Namespace) -> int:
    from robustness.document import score_version
    from robustness.protocols import ProtocolConfig
    from robustness.report import terminal_table, write_html
    from robustness.scorer import thumbnails
    from service.core.errors import ScoreError
    from service.core.repository import ModelRepository, atomic_write_json

    if args.workers and args.ray_address:
        raise ScoreError("use --workers N or --ray-address ADDR, not both")
    try:
        kwargs: dict[str, Any] = {}
        if args.protocols:
            kwargs["protocols"] = _csv(args.protocols)
        if args.policies:
            kwargs["policies"] = _csv(args.policies)
        if args.translate_frames:
            kwargs["translate_frames"] = args.translate_frames
        if args.zoom_range:
            lo, hi = args.zoom_range
            kwargs["zoom_start"], kwargs["zoom_stop"] = lo, hi
        if args.embed_positions:
            kwargs["embed_positions"] = args.embed_positions
        if args.consistency_pairs:
            kwargs["consistency_pairs"] = args.consistency_pairs
        if args.resolution_factors:
            kwargs["resolution_factors"] = args.resolution_factors
        config = ProtocolConfig(**kwargs)
    except ValueError as exc:
        raise ScoreError(str(exc)) from exc
    repo = ModelRepository(args.repo)
    version = repo.resolve(args.model, args.version)
    doc, dataset = score_version(repo, args.model, version, args.data, args.labels, config, args.seed,
                                        args.max_images, args.workers, args.ray_address,
                                        progress=not args.no_progress, batch_size=args.batch_size,
                                        split=args.split, split_seed=args.split_seed)
    atomic_write_json(repo.version_dir(args.model, version) / "robustness.json", doc)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "robustness.json", doc)
        thumbs = thumbnails(dataset.root, [r["file"] for r in doc["most_flipping"]], repo.card(args.model, version))
        write_html(doc, out / "report.html", thumbs)
    if args.json:
        print(json.dumps(doc))
    else:
        print(terminal_table(doc))
        print(f"wrote {repo.version_dir(args.model, version) / 'robustness.json'}"
              + (f" and {Path(args.out) / 'report.html'}" if args.out else ""))
    return 0


def _cmd_gate(args: argparse.Namespace) -> int:
    from robustness.gate import run_gate
    from service.core.repository import ModelRepository, parse_version

    repo = ModelRepository(args.repo)
    decision, out = run_gate(repo, args.model, parse_version(args.version), args.policy)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"gate {args.model} v{out['version']} (sha256 {out['model_sha256'][:12]}) policy {args.policy}")
        for rule in out["rules"]:
            ci = rule.get("ci95")
            ci_text = f" [{ci[0]:.4f},{ci[1]:.4f}]" if ci else ""
            measured = "missing" if rule["measured"] is None else f"{rule['measured']:.4f}{ci_text}"
            print(f"  {'PASS' if rule['passed'] else 'FAIL'}  {rule['section']:<10} {rule['key']:<24} "
                  f"threshold {rule['threshold']:+g}  measured {measured}  -- {rule['reason']}")
        print(f"decision: {out['decision']}")
    return 0 if decision.passed else 1


def _cmd_promote(args: argparse.Namespace) -> int:
    from robustness.promote import promote
    from service.core.errors import PromotionRefused
    from service.core.repository import ModelRepository, parse_version

    if args.force and not args.reason:
        raise PromotionRefused("--force needs --reason TEXT")
    repo = ModelRepository(args.repo)
    version = parse_version(args.version)
    stages = promote(repo, args.model, version, stage=args.stage, force=args.force, reason=args.reason or "")
    print(json.dumps({"model": args.model, "stage": args.stage, "version": version, "forced": bool(args.force),
                      "production": stages.production, "candidate": stages.candidate}))
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from robustness.promote import rollback
    from service.core.repository import ModelRepository

    stages = rollback(ModelRepository(args.repo), args.model, args.reason)
    print(json.dumps({"model": args.model, "production": stages.production, "candidate": stages.candidate}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's sub-commands to the ``steady`` parser."""
    p = sub.add_parser("score", help="score shift/scale robustness of a model version",
                       description="Score a stored model version for flips under 1-px shifts and rescalings "
                                   "(Azulay & Weiss P(top-1 change) and MAC, ImageNet-P flip probability, Zhang consistency), choose its serving policy and resolution, "
                                   "write <repo>/<model>/<version>/robustness.json.")
    add_model_args(p)
    p.add_argument("--data", required=True, help="folder of images (ImageNet-style class folders give labels)")
    p.add_argument("--labels", help="CSV with columns file,class_index")
    p.add_argument("--out", help="also write robustness.json and a self-contained report.html here")
    p.add_argument("--protocols", help="comma list of pan,scale,embed,consistency,resolution (default all)")
    p.add_argument("--policies", help="comma list of center,object (default both)")
    p.add_argument("--max-images", type=int, help="score only the first N images (sorted)")
    p.add_argument("--seed", type=int, default=0, help="seed for positions, offsets and bootstrap (default 0)")
    p.add_argument("--workers", type=int, default=0, help="shard images over N local Ray workers")
    p.add_argument("--ray-address", help="shard images over an existing Ray cluster")
    p.add_argument("--batch-size", type=int, default=32, help="views per ONNX Runtime call (default 32)")
    p.add_argument("--translate-frames", type=int, help="ImageNet-P translate frames (default 9; the paper: 41)")
    p.add_argument("--zoom-range", type=float, nargs=2, metavar=("START", "STOP"),
                   help="zoom sequence start and stop, step 0.025 (default 0.40 1.15)")
    p.add_argument("--embed-positions", type=int, help="random positions per embed size (default 2)")
    p.add_argument("--consistency-pairs", type=int, help="random crop pairs per image (default 1)")
    p.add_argument("--resolution-factors", type=_floats, help="FixRes factors (default 0.875,1,1.15,1.3,1.5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print the robustness.json document")
    p.add_argument("--split", choices=("all", "tune", "holdout"), default="all",
                   help="score one half of the photos split by sha256(f'{seed}:{file}') (even: tune, odd: holdout); "
                        "a tuned version is scored only on its held-out half (default all)")
    p.add_argument("--split-seed", type=int, help="seed of the split (default: the tuned version's own)")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("gate", help="decide whether a scored version may be promoted",
                       description="Apply a gate policy YAML to a version's robustness.json; write gate.json. "
                                   "Exit 0 pass, 1 fail, 2 error (missing/stale scores, bad policy).")
    add_model_args(p, "positional")
    p.add_argument("--policy", required=True, help="gate policy YAML (sections max, min, regression)")
    p.add_argument("--json", action="store_true", help="print gate.json")
    p.set_defaults(func=_cmd_gate)

    p = sub.add_parser("promote", help="point a stage at a version whose gate passed",
                       description="Promote a version; refused unless its gate.json passed for its exact sha256.")
    add_model_args(p, "positional")
    p.add_argument("--stage", choices=("production", "candidate"), default="production", help="stage")
    p.add_argument("--force", action="store_true", help="promote without a passing gate (needs --reason)")
    p.add_argument("--reason", help="why (recorded in the stages history)")
    p.set_defaults(func=_cmd_promote)

    p = sub.add_parser("rollback", help="restore the previous production version",
                       description="Restore the production version that preceded the current one.")
    add_model_args(p, "none")
    p.add_argument("--reason", default="rollback", help="recorded in the stages history")
    p.set_defaults(func=_cmd_rollback)

