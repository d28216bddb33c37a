"""Sub-commands of this package (filled in by its owner)."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add this package's sub-commands to the ``steady`` parser."""
