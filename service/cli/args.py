"""Arguments every command group spells the same way: the repository, the model and its version."""

from __future__ import annotations

import argparse

__all__ = ["add_model_args"]


def add_model_args(p: argparse.ArgumentParser, version: str = "option") -> None:
    """``--repo DIR MODEL`` plus the version: ``option`` (``--version V``, default production, else the newest),
    ``positional`` (``VERSION``, required) or ``none``."""
    p.add_argument("--repo", required=True, help="model repository folder")
    p.add_argument("model", help="model name")
    if version == "option":
        p.add_argument("--version", help="version (default: production, else the newest)")
    elif version == "positional":
        p.add_argument("version", help="version")
    elif version != "none":
        raise ValueError(f"version must be option, positional or none, got {version!r}")
