"""The flip and accuracy measures, as pure functions of predictions.

Each returns ``(sum, count)`` for one image so that :mod:`robustness.stats` can
pool images and bootstrap over them; the metric's value is ``sum / count``.

- P(top-1 change) (Azulay & Weiss): mean over pairs (x, x') of 1[f(x) != f(x')].
- MAC (Azulay & Weiss): mean over pairs of |p_c*(x) - p_c*(x')|, c* = f(x).
- Flip probability (ImageNet-P ``flip_prob``): P(f(x_j) != f(x_{j-1})) over consecutive
  frames; every sequence (image) is weighted equally, so one image contributes (FP_i, 1).
- Consistency (Zhang 2019): P(f(crop o1) == f(crop o2)).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["p_change", "mac", "flip_probability", "consistency", "flips_along", "top_k_hits"]


def p_change(top1_a: Sequence[int], top1_b: Sequence[int]) -> tuple[float, int]:
    """Pairs (a[i], b[i]): number of top-1 changes and number of pairs."""
    a, b = np.asarray(top1_a), np.asarray(top1_b)
    if a.shape != b.shape:
        raise ValueError(f"pair arrays differ in shape: {a.shape} vs {b.shape}")
    return float(np.sum(a != b)), int(a.size)


def mac(probs_a: np.ndarray, probs_b: np.ndarray) -> tuple[float, int]:
    """Pairs of softmax rows: summed |p_c*(a) - p_c*(b)| with c* = argmax(a), and the pair count."""
    pa, pb = np.atleast_2d(probs_a), np.atleast_2d(probs_b)
    if pa.shape != pb.shape:
        raise ValueError(f"pair arrays differ in shape: {pa.shape} vs {pb.shape}")
    c = np.argmax(pa, axis=1)
    rows = np.arange(len(c))
    return float(np.abs(pa[rows, c] - pb[rows, c]).sum()), int(len(c))


def flips_along(top1_sequence: Sequence[int]) -> np.ndarray:
    """1 where frame j's top-1 differs from frame j-1's (length = frames - 1)."""
    seq = np.asarray(top1_sequence)
    if seq.ndim != 1 or seq.size < 2:
        raise ValueError(f"a sequence needs at least 2 frames, got shape {seq.shape}")
    return (seq[1:] != seq[:-1]).astype(np.int64)


def flip_probability(top1_sequence: Sequence[int]) -> tuple[float, int]:
    """One sequence: (its flip probability, 1) so that sequences are weighted equally."""
    return float(flips_along(top1_sequence).mean()), 1


def consistency(top1_a: Sequence[int], top1_b: Sequence[int]) -> tuple[float, int]:
    """Pairs of random crops: number that agree and the pair count."""
    changed, n = p_change(top1_a, top1_b)
    return float(n - changed), n


def top_k_hits(logits_or_probs: np.ndarray, labels: Sequence[int], k: int) -> tuple[float, int]:
    """Rows whose label is among the k highest scores, and the row count."""
    x = np.atleast_2d(logits_or_probs)
    y = np.asarray(labels)
    k = min(k, x.shape[1])
    top = np.argpartition(-x, k - 1, axis=1)[:, :k]
    return float(np.sum(np.any(top == y[:, None], axis=1))), int(len(y))
