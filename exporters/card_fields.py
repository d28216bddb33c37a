"""Card fields given by the user: a YAML file and command-line flags, merged over defaults.

Only the fields that describe how to feed and read a model may be given; the
rest (version, checksums, parity, times) is always computed. Precedence:
source defaults < YAML file < flags.

Example YAML::

    labels: [cat, dog]          # or  labels_file: labels.txt
    train_resolution: 224
    crop_pct: 0.875
    interpolation: bilinear
    mean: [123.675, 116.28, 103.53]   # on 0..255
    std: [58.395, 57.12, 57.375]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from service.core.errors import CardError

from exporters.labels import read_labels_file

__all__ = ["USER_FIELDS", "read_card_file", "parse_triple", "merge_fields"]

USER_FIELDS = ("name", "labels", "labels_file", "train_resolution", "test_resolution", "crop_pct",
               "interpolation", "mean", "std", "policy", "channel_order")


def read_card_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Card fields from a YAML (or JSON) mapping; ``labels_file`` is resolved next to the YAML.

    Raises:
        CardError: unreadable file, not a mapping, or unknown fields.
    """
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CardError(f"cannot read card file {path}: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise CardError(f"card file {path} must hold a mapping of card fields, got {type(data).__name__}")
    unknown = sorted(set(data) - set(USER_FIELDS))
    if unknown:
        raise CardError(f"card file {path} has unknown fields {unknown}: allowed are {list(USER_FIELDS)}")
    fields = dict(data)
    if "labels_file" in fields:
        labels_path = Path(str(fields.pop("labels_file")))
        if not labels_path.is_absolute():
            labels_path = Path(path).parent / labels_path
        fields["labels"] = read_labels_file(labels_path)
    return fields


def parse_triple(text: str, what: str) -> tuple[float, float, float]:
    """``"a,b,c"`` -> three floats (for --mean/--std).

    Raises:
        CardError: not exactly three numbers.
    """
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise CardError(f"--{what} needs three comma-separated numbers on 0..255, got {text!r}")
    return values  # type: ignore[return-value]


def merge_fields(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Later layers win; ``None`` values never override."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if value is not None:
                merged[key] = value
    if "labels" in merged and isinstance(merged["labels"], Sequence) and not isinstance(merged["labels"], str):
        merged["labels"] = tuple(str(x) for x in merged["labels"])
    return merged
