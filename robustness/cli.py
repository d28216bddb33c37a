"""Sub-commands of this package: ``score``, ``gate``, ``promote``, ``rollback``, ``explain``."""

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
    from robustness.remedies import RemedyRule
    from robustness.report import explanation_summary, terminal_table, write_html
    from robustness.scorer import thumbnails
    from service.core.errors import InvalidInput, ScoreError
    from service.core.repository import ModelRepository, atomic_write_json

    if args.workers and args.ray_address:
        raise ScoreError("use --workers N or --ray-address ADDR, not both")
    if args.ray_timeout <= 0:
        raise InvalidInput(f"--ray-timeout must be > 0 seconds, got {args.ray_timeout:g}")
    if args.explain < 0:
        raise ScoreError(f"--explain must be >= 0, got {args.explain}")
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
        if args.ensembles is not None:
            kwargs["ensembles"] = () if args.ensembles.strip() == "none" else _csv(args.ensembles)
        config = ProtocolConfig(**kwargs)
        remedy_rule = RemedyRule(max_cost=args.max_cost, min_gain=args.min_gain)
    except ValueError as exc:
        raise ScoreError(str(exc)) from exc
    repo = ModelRepository(args.repo)
    version = repo.resolve(args.model, args.version)
    doc, dataset = score_version(repo, args.model, version, args.data, args.labels, config, args.seed,
                                        args.max_images, args.workers, args.ray_address,
                                        progress=not args.no_progress, batch_size=args.batch_size,
                                        remedy_rule=remedy_rule, split=args.split, split_seed=args.split_seed,
                                        preprocess_device=args.preprocess_device, ray_timeout_s=args.ray_timeout)
    atomic_write_json(repo.version_dir(args.model, version) / "robustness.json", doc)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "robustness.json", doc)
        thumbs = thumbnails(dataset.root, [r["file"] for r in doc["most_flipping"]], repo.card(args.model, version))
        explanations = _explain_flips(repo, args, version, doc, dataset) if args.explain else None
        if explanations is not None:
            atomic_write_json(out / "explanations.json", explanations.to_dict())
        write_html(doc, out / "report.html", thumbs, explanations=explanations)
    if args.json:
        print(json.dumps(doc))
    else:
        print(terminal_table(doc))
        if args.out and args.explain:
            print(explanation_summary(explanations))
        print(f"wrote {repo.version_dir(args.model, version) / 'robustness.json'}"
              + (f" and {Path(args.out) / 'report.html'}" if args.out else ""))
    return 0


def _explain_flips(repo: Any, args: argparse.Namespace, version: int, doc: dict[str, Any], dataset: Any) -> Any:
    """The report step's occlusion maps of the photos that flip most (see robustness.explain.explain_flips)."""
    from robustness.explain import explain_flips
    from robustness.scorer import iter_progress

    loaded = repo.load(args.model, version)
    files = [(item.path, item.label) for item in dataset.items]
    with iter_progress(len(files), not args.no_progress) as bar:
        return explain_flips(loaded.onnx_bytes, loaded.card, doc["chosen"], dataset.root, files,
                             pan_offsets=doc["config"]["pan_offsets"], limit=args.explain, seed=doc["seed"],
                             progress=bar.update)


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


def _cmd_explain(args: argparse.Namespace) -> int:
    from collections import Counter

    from robustness.explain import OcclusionConfig, describe, occlusion_map, overlay, png_bytes
    from service.catalog import read_robustness, served_preprocessing
    from service.core.errors import InvalidInput
    from service.core.preprocess import Preprocessor, to_original
    from service.core.repository import ModelRepository
    from service.core.runtime import Classifier

    repo = ModelRepository(args.repo)
    version = repo.resolve(args.model, args.version)
    loaded = repo.load(args.model, version)
    _, chosen = read_robustness(loaded.path, loaded.sha256)
    policy, resolution = served_preprocessing(loaded.card, chosen)
    pre = Preprocessor(loaded.card, policy=policy, resolution=resolution)
    classifier = Classifier(loaded.onnx_bytes, loaded.card)
    try:
        config = OcclusionConfig(size=args.size, stride=args.stride, batch_size=args.batch_size)
        config.grid(resolution)
        if args.class_index is not None and not 0 <= args.class_index < loaded.card.num_classes:
            raise ValueError(f"--class must be in [0, {loaded.card.num_classes}), got {args.class_index}")
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc
    image = pre.decode(Path(args.image).read_bytes())
    view = pre.view(image)
    omap = occlusion_map(classifier, pre, view.pixels, config,
                         None if args.class_index is None else [args.class_index])
    doc = {"model": args.model, "version": version, **describe(omap, loaded.card.labels, pre.background),
           "preprocess": {"policy": policy, "resolution": resolution, "box": to_original(view.box, image).as_list()}}
    if args.out:
        scale = max(1, round(224 / resolution))
        Path(args.out).write_bytes(png_bytes(overlay(view.pixels, omap.probability[0], omap.grid, scale=scale)))
    if args.json:
        print(json.dumps(doc))
        return 0
    g, ev, cls, pred = doc["grid"], doc["evidence"], doc["class"], doc["prediction"]
    print(f"{args.model} v{version}  policy={policy} resolution={resolution}  {args.image}")
    print(f"answer: {pred['index']} {pred['label']} {pred['score']:.3f}")
    print(f"occlusion: {g['size']} px square of colour {tuple(g['fill'])}, stride {g['stride']}, "
          f"{g['rows']}x{g['cols']} positions, {g['evaluations']} evaluations in {doc['seconds']:.2f} s")
    low = cls["score"] - ev["drop"]
    print(f"evidence for {cls['index']} {cls['label']}: the square at row {ev['row']}, col {ev['col']} "
          f"(view pixels {ev['box']}) lowers p from {cls['score']:.3f} to {low:.3f}")
    counts = Counter(int(c) for row in doc["top1"] for c in row)
    print("top-1 under occlusion: " + ", ".join(f"{c} {doc['labels'][str(c)]} at {n}" for c, n in counts.most_common(4))
          + f" of {g['rows'] * g['cols']} positions")
    if args.out:
        print(f"wrote {args.out}")
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
    p.add_argument("--ray-timeout", type=float, default=60.0,
                   help="fail when the Ray cluster cannot start a scoring task within S seconds (default 60)")
    p.add_argument("--batch-size", type=int, default=32, help="views per ONNX Runtime call (default 32)")
    p.add_argument("--translate-frames", type=int, help="ImageNet-P translate frames (default 9; the paper: 41)")
    p.add_argument("--zoom-range", type=float, nargs=2, metavar=("START", "STOP"),
                   help="zoom sequence start and stop, step 0.025 (default 0.40 1.15)")
    p.add_argument("--embed-positions", type=int, help="random positions per embed size (default 2)")
    p.add_argument("--consistency-pairs", type=int, help="random crop pairs per image (default 1)")
    p.add_argument("--resolution-factors", type=_floats, help="FixRes factors (default 0.875,1,1.15,1.3,1.5)")
    p.add_argument("--ensembles", help="comma list of shift-ensemble settings measured as variants of every policy, "
                                       "PRESET[@MARGIN] or x,y;x,y;...[@MARGIN] (presets knight5, square4, diagonal4; "
                                       "default knight5@0.1,knight5@0.15,knight5@0.2; 'none' for none)")
    p.add_argument("--max-cost", type=float, default=1.5,
                   help="compute budget of the choice: model evaluations per answer (default 1.5; keep it equal "
                        "to the gate's max compute.per_answer)")
    p.add_argument("--min-gain", type=float, default=0.25,
                   help="fraction of the flips a costlier setting must remove on every pan variant, beyond the "
                        "95%% interval (default 0.25)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", help="print the robustness.json document")
    p.add_argument("--explain", type=int, default=8, metavar="N",
                   help="with --out: occlusion maps of the N photos that flip most under 1-px moves (default 8; "
                        "0: none). Costs 9 evaluations per photo to find them, then 340 per explained photo at 224 px")
    p.add_argument("--preprocess-device", choices=("cpu", "gpu", "dali-cpu"), default="cpu",
                   help="decode and resample the views with Pillow (cpu, default), NVIDIA DALI on the GPU (gpu) "
                        "or DALI's CPU backend (dali-cpu)")
    p.add_argument("--split", choices=("all", "tune", "holdout"), default="all",
                   help="score one half of the photos split by sha256(f'{seed}:{file}') (even: tune, odd: holdout): "
                        "holdout for like-for-like comparisons of a tuned or int8 version with its source; a tuned "
                        "version is refused on its tuning photos, a quantized one never sees its calibration "
                        "photos (default all)")
    p.add_argument("--split-seed", type=int, help="seed of the split (default: the tuned or quantized version's own)")
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

    p = sub.add_parser("explain", help="occlusion sensitivity map of one image (Zeiler & Fergus)",
                       description="Slide a square of the card's mean colour over the served view of IMAGE (the policy "
                                   "and resolution robustness.json chose, as the service does) and report, per "
                                   "position, the probability of the class and the top-1 class under occlusion.")
    add_model_args(p)
    p.add_argument("image", help="image file")
    p.add_argument("--class", dest="class_index", type=int, help="class of interest (default: the answer)")
    p.add_argument("--size", type=int, help="square side in input pixels (default 32 at 224 px, scaled)")
    p.add_argument("--stride", type=int, help="step between positions in input pixels (default 16 at 224 px, scaled)")
    p.add_argument("--batch-size", type=int, default=32, help="occluded views per ONNX Runtime call (default 32)")
    p.add_argument("--out", help="write the map over the view, with a colour scale, as PNG here")
    p.add_argument("--json", action="store_true", help="print the JSON document of POST /v1/models/{m}:explain")
    p.set_defaults(func=_cmd_explain)

