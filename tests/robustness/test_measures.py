"""Metric definitions (Azulay & Weiss, ImageNet-P, Zhang 2019) on hand-made predictions, against golden values."""

from __future__ import annotations

import numpy as np
import pytest

from robustness import measures
from robustness.stats import Estimate, ratio_estimate


def test_p_change_counts_pairs_whose_top1_differs() -> None:
    assert measures.p_change([1, 2, 3, 4], [1, 2, 0, 5]) == (2.0, 4)


def test_p_change_rejects_unequal_pairs() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        measures.p_change([1, 2], [1])


def test_mac_uses_the_first_views_top_class() -> None:
    a = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    b = np.array([[0.4, 0.5, 0.1], [0.2, 0.2, 0.6]])
    total, n = measures.mac(a, b)
    # pair 1: c* = 0, |0.7 - 0.4| = 0.3; pair 2: c* = 2, |0.6 - 0.6| = 0
    np.testing.assert_allclose(total / n, 0.15, rtol=0, atol=1e-12)
    assert n == 2


def test_flip_probability_is_per_sequence_mean_of_consecutive_changes() -> None:
    np.testing.assert_array_equal(measures.flips_along([3, 3, 5, 5, 3]), [0, 1, 0, 1])
    assert measures.flip_probability([3, 3, 5, 5, 3]) == (0.5, 1)
    with pytest.raises(ValueError, match="at least 2 frames"):
        measures.flip_probability([1])


def test_sequences_are_weighted_equally_when_pooled() -> None:
    seqs = [[1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 2]]  # FP 0 (8 transitions) and FP 1 (1 transition)
    pairs = [measures.flip_probability(s) for s in seqs]
    est = ratio_estimate([p[0] for p in pairs], [p[1] for p in pairs], seed=0)
    assert est is not None and est.value == pytest.approx(0.5, abs=1e-12)  # not 1/9


def test_consistency_counts_agreeing_pairs() -> None:
    assert measures.consistency([1, 2, 3], [1, 0, 3]) == (2.0, 3)


def test_top_k_hits() -> None:
    logits = np.array([[0.1, 0.9, 0.0, 0.5], [0.8, 0.1, 0.05, 0.05]])
    assert measures.top_k_hits(logits, [1, 3], 1) == (1.0, 2)
    assert measures.top_k_hits(logits, [3, 3], 2) == (1.0, 2)


def test_bootstrap_is_deterministic_and_brackets_the_value() -> None:
    rng = np.random.default_rng(1)
    sums = rng.integers(0, 9, 50).astype(float)
    counts = np.full(50, 8.0)
    a = ratio_estimate(sums, counts, seed=7)
    b = ratio_estimate(sums, counts, seed=7)
    c = ratio_estimate(sums, counts, seed=8)
    assert a == b
    assert a is not None and c is not None and a.ci95 != c.ci95
    assert a.ci95[0] <= a.value <= a.ci95[1]
    assert a.n == 400
    np.testing.assert_allclose(a.value, sums.sum() / 400, rtol=1e-12)


def test_bootstrap_edge_cases() -> None:
    assert ratio_estimate([], [], seed=0) is None
    assert ratio_estimate([1.0, 0.0], [0.0, 0.0], seed=0) is None
    one = ratio_estimate([1.0], [4.0], seed=0)
    assert one == Estimate(0.25, (0.25, 0.25), 4)
    with pytest.raises(ValueError, match="equal length"):
        ratio_estimate([1.0], [1.0, 2.0], seed=0)
