"""The robustness.json schema: version, flat summary keys, and a structural check."""

from __future__ import annotations

from typing import Any, Mapping

__all__ = ["ROBUSTNESS_SCHEMA_VERSION", "SUMMARY_KEYS", "validate"]

ROBUSTNESS_SCHEMA_VERSION = 1
SUMMARY_KEYS: tuple[str, ...] = (
    "accuracy.top1", "accuracy.top5", "pan.p_change", "pan.mac", "pan.flip_probability", "pan.p_change_vertical",
    "scale.p_change", "scale.flip_probability", "embed@0.4.p_change", "embed@0.5.p_change",
    "embed@0.7.p_change", "embed@0.5.accuracy", "consistency", "compute.per_answer",
)
_TOP = ("schema_version", "model", "version", "model_sha256", "data", "seed", "config", "accuracy",
        "protocols", "summary", "summary_ci95", "chosen", "created")


def validate(doc: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first structural problem of a robustness.json document."""
    missing = [k for k in _TOP if k not in doc]
    if missing:
        raise ValueError(f"robustness.json lacks {missing}")
    if doc["schema_version"] != ROBUSTNESS_SCHEMA_VERSION:
        raise ValueError(f"robustness.json schema_version {doc['schema_version']} is not {ROBUSTNESS_SCHEMA_VERSION}")
    for key, value in doc["summary"].items():
        if key not in SUMMARY_KEYS or not isinstance(value, (int, float)):
            raise ValueError(f"summary entry {key!r}: {value!r} is not a known key with a plain number")
    for key in ("policy", "resolution", "rule"):
        if key not in doc["chosen"]:
            raise ValueError(f"chosen lacks {key!r}")
    for key in ("fingerprint", "images", "labelled"):
        if key not in doc["data"]:
            raise ValueError(f"data lacks {key!r}")
