"""The ``steady`` command line: the one entry module, on top of every package.

It builds every command group; each group lives in a CLI module (``service.cli.core``,
``exporters.cli``, ``robustness.cli``, ``service.cli.serve``, ``service.cli.bench``) that only
parses arguments and calls library code, so no library module ever imports a CLI module.
Heavy imports (torch, Ray) happen inside the command that needs them, so ``steady --help`` is
fast and serving never imports torch.

Errors are one line on stderr and a non-zero exit code: 2 for bad input or usage,
1 for failures (see :mod:`service.core.errors`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from service.core.errors import SteadyError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steady",
        description="Steady: image classifiers served so their answers do not flip when the picture moves by a pixel.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from exporters.cli import register as register_export
    from robustness.cli import register as register_robustness
    from service.cli.bench import register as register_bench
    from service.cli.core import register as register_core
    from service.cli.serve import register as register_serve

    for register in (register_core, register_export, register_robustness, register_serve, register_bench):
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


