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

__all__ = ["Estimate", "ratio_estimate", "paired_estimate", "BOOTSTRAP_SAMPLES"]

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


def paired_estimate(
    sums_a: Sequence[float], counts_a: Sequence[float], sums_b: Sequence[float], counts_b: Sequence[float], *,
    seed: int, kind: str = "ratio", samples: int = BOOTSTRAP_SAMPLES,
) -> Estimate | None:
    """Rate a (``sum(sums_a) / sum(counts_a)``) against rate b on the *same* images: their ratio a / b or
    difference a - b, with a percentile interval from resampling images once for both (a paired bootstrap).

    Rows where either count is zero are dropped. Returns None when nothing was observed, or for a
    ratio when rate b is zero (no flips to remove). ``n`` is the number of a's observations.
    """
    if kind not in ("ratio", "difference"):
        raise ValueError(f"kind must be 'ratio' or 'difference', got {kind!r}")
    arrays = [np.asarray(x, dtype=np.float64) for x in (sums_a, counts_a, sums_b, counts_b)]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
        raise ValueError(f"paired arrays must be 1-D of equal length, got {[a.shape for a in arrays]}")
    keep = (arrays[1] > 0) & (arrays[3] > 0)
    sa, ca, sb, cb = (a[keep] for a in arrays)
    if len(ca) == 0:
        return None

    def stat(idx: np.ndarray) -> np.ndarray:
        ra = sa[idx].sum(axis=-1) / ca[idx].sum(axis=-1)
        rb = sb[idx].sum(axis=-1) / cb[idx].sum(axis=-1)
        if kind == "difference":
            return ra - rb
        return np.divide(ra, rb, out=np.full_like(ra, np.nan), where=rb > 0)

    value = float(stat(np.arange(len(ca))))
    if not np.isfinite(value):
        return None
    n = int(round(ca.sum()))
    if len(ca) == 1:
        return Estimate(value, (value, value), n)
    rng = np.random.default_rng(seed)
    draws = stat(rng.integers(0, len(ca), size=(samples, len(ca))))
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    return Estimate(value, (float(lo), float(hi)), n)
