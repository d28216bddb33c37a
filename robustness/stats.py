"""Estimates with 95% bootstrap intervals, resampling whole images.

Views of one image are correlated (the pairs of one photo flip together), so the
bootstrap resamples *images* and recomputes the ratio of summed numerators to
summed denominators (a cluster bootstrap). ``n`` is the number of observations
(pairs, frames or images) behind the value.

Example:
    >>> est = ratio_estimate([1, 0, 2], [2, 2, 2], seed=0)
    >>> round(est.value, 4), est.n
    (0.5, 6)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["Estimate", "ratio_estimate", "BOOTSTRAP_SAMPLES"]

BOOTSTRAP_SAMPLES = 1000


@dataclass(frozen=True)
class Estimate:
    """A value, its 95% bootstrap interval and the number of observations behind it."""

    value: float
    ci95: tuple[float, float]
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "ci95": [self.ci95[0], self.ci95[1]], "n": self.n}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Estimate":
        return cls(float(data["value"]), (float(data["ci95"][0]), float(data["ci95"][1])), int(data["n"]))


def ratio_estimate(
    sums: Sequence[float], counts: Sequence[float], *, seed: int, samples: int = BOOTSTRAP_SAMPLES
) -> Estimate | None:
    """sum(sums) / sum(counts) with a percentile interval from resampling the rows (images).

    Rows with a zero count carry no observation and are dropped. Returns None when
    nothing was observed. Deterministic for a seed.
    """
    s = np.asarray(sums, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    if s.shape != c.shape or s.ndim != 1:
        raise ValueError(f"sums and counts must be 1-D of equal length, got {s.shape} and {c.shape}")
    keep = c > 0
    s, c = s[keep], c[keep]
    if len(c) == 0:
        return None
    value = float(s.sum() / c.sum())
    if len(c) == 1:
        return Estimate(value, (value, value), int(round(c.sum())))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(c), size=(samples, len(c)))
    ratios = s[idx].sum(axis=1) / c[idx].sum(axis=1)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return Estimate(value, (float(lo), float(hi)), int(round(c.sum())))
