"""The shift ensemble: settings, validation, the mean of its copies, honesty against protocol steps."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from service.core.boxes import shift_box
from service.core.ensemble import MAX_OFFSET, PRESETS, Ensemble, as_logits, margin
from service.core.errors import InvalidInput
from service.core.preprocess import Preprocessor
from service.core.runtime import Classifier, softmax
from tests.conftest import encode, tiny_card

UNIT_MOVES = [m for m in itertools.product((-1, 0, 1), repeat=2) if m != (0, 0)]


def test_parse_presets_custom_offsets_and_mappings_round_trip() -> None:
    k5 = Ensemble.parse("knight5@0.15")
    assert k5.offsets == PRESETS["knight5"] and k5.threshold == 0.15 and k5.adaptive
    assert (k5.name, k5.preset, k5.extra, k5.includes_bare) == ("knight5@0.15", "knight5", 4, True)
    assert Ensemble.parse(k5.to_dict()) == k5 and Ensemble.parse(dict(k5.to_dict(), compute=1.37)) == k5
    always = Ensemble.parse("1,1;-1,-1")
    assert (always.adaptive, always.threshold, always.name, always.includes_bare) == (False, 1.0, "1,1;-1,-1", False)
    assert Ensemble.parse("0,0;2,1;-1,2;-2,-1;1,-2@0.1").name == "knight5@0.1"  # the preset is recognised
    assert Ensemble.parse({"offsets": [[2, 0], [0, 2.0]], "threshold": 0.2}).offsets == ((2, 0), (0, 2))


@pytest.mark.parametrize("spec,match", [
    ("knight9", "unknown ensemble preset"),
    ("0,0;0.5,1", "whole pixel"),
    ("0,0;1", "is not x,y"),
    ("0,0;0,0", "distinct"),
    ("0,0", "at least 2 copies"),
    ("knight5@0", r"\(0, 1\]"),
    ("knight5@1.5", r"\(0, 1\]"),
    ("knight5@x", "not a number"),
    (f"0,0;{MAX_OFFSET + 1},0", "over"),
    ({"offsets": [[0, 0], [1.5, 0]]}, "whole output pixels"),
    ({"offsets": [[0, 0], [True, 0]]}, "whole output pixels"),
    ({"offsets": "0,0;1,1"}, "list of"),
    ({"offsets": [[0, 0], [1, 1]], "weights": [1, 2]}, "unknown ensemble field"),
    ("", "PRESET"),
])
def test_bad_settings_are_refused_naming_the_problem(spec: object, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        Ensemble.parse(spec)  # type: ignore[arg-type]


def test_combine_is_the_mean_of_the_copies_in_offset_order() -> None:
    rng = np.random.default_rng(0)
    rows = softmax(rng.normal(0, 2, (5, 10)))
    k5 = Ensemble.parse("knight5@0.15")
    np.testing.assert_allclose(k5.combine(rows[0], list(rows[1:])), rows.mean(axis=0), rtol=0, atol=1e-15)
    no_bare = Ensemble.parse("2,1;-1,2;-2,-1;1,-2")
    np.testing.assert_allclose(no_bare.combine(rows[0], list(rows[1:])), rows[1:].mean(axis=0), atol=1e-15)
    with pytest.raises(ValueError, match="4 extra copies"):
        k5.combine(rows[0], list(rows[1:3]))


def test_used_only_under_the_margin_threshold_or_always() -> None:
    sure, unsure = np.array([0.7, 0.2, 0.1]), np.array([0.45, 0.4, 0.15])
    assert margin(sure) == pytest.approx(0.5) and margin(unsure) == pytest.approx(0.05)
    adaptive = Ensemble.parse("knight5@0.1")
    assert not adaptive.used(sure) and adaptive.used(unsure)
    assert (adaptive.cost(True), adaptive.cost(False)) == (5, 1)
    always = Ensemble.parse("knight5")
    assert always.used(np.array([1.0, 0.0, 0.0])) and always.cost(True) == 5
    assert Ensemble.parse("1,1;-1,-1").cost(True) == 2  # always mode without the bare view never runs it


def test_knight_lattice_is_honest_against_every_unit_move() -> None:
    for threshold in ("", "@0.15"):
        ens = Ensemble.parse("knight5" + threshold)
        assert all(ens.lines_up(m) is None for m in UNIT_MOVES)


def test_copies_that_line_up_with_a_step_are_named() -> None:
    # the 2-copy row: neighbours one diagonal pixel apart share a copy
    assert "share a copy" in Ensemble.parse("0,0;1,1@0.1").lines_up((1, 1))  # type: ignore[operator]
    # (+-1, +-1): no shared copy, but in adaptive mode the neighbour's bare view IS a copy
    x4 = Ensemble.parse("diagonal4@0.1")
    assert "bare answer" in x4.lines_up((1, 1))  # type: ignore[operator]
    assert x4.lines_up((1, 0)) is None and Ensemble.parse("diagonal4").lines_up((1, 1)) is None
    assert Ensemble.parse("square4@0.1").lines_up((1, 1)) is None


def test_as_logits_carries_the_probabilities() -> None:
    p = np.array([0.7, 0.3, 0.0])
    logits = as_logits(p)
    assert logits.dtype == np.float32 and np.all(np.isfinite(logits))
    np.testing.assert_allclose(softmax(logits.astype(np.float64)), p, atol=1e-6)


def test_preprocessor_copies_are_the_box_moved_by_whole_output_pixels(tiny_onnx: bytes) -> None:
    rng = np.random.default_rng(3)
    card = tiny_card()
    ens = Ensemble.parse("knight5@0.15")
    pre = Preprocessor(card, ensemble=ens)
    img = pre.decode(encode(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8), "PNG"))
    box = pre.box(img)
    copies = pre.copies(img, box)
    assert copies.shape == (4, 3, pre.resolution, pre.resolution) and copies.dtype == np.float32
    for tensor, (dx, dy) in zip(copies, ens.extra_offsets):
        np.testing.assert_array_equal(tensor, pre.tensor(img, shift_box(box, dx, dy, pre.resolution)))
    # ... and the ensemble's answer is the mean softmax of the five views' own answers
    clf = Classifier(tiny_onnx, card)
    views = np.concatenate([pre.tensor(img, box)[None], copies])
    each = softmax(clf.logits(views).astype(np.float64))
    bare, extra = each[0], list(each[1:])
    np.testing.assert_allclose(ens.combine(bare, extra), each.mean(axis=0), atol=1e-15)
    with pytest.raises(ValueError, match="no ensemble"):
        Preprocessor(card).copy_boxes(box)
