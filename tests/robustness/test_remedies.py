"""Shift-ensemble variants in the scorer and the cost term of the choice."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from robustness.data import load_dataset
from robustness.protocols import ProtocolConfig
from robustness.remedies import RemedyRule, aggregate_remedies, choose_remedy, remedy_summary
from robustness.scorer import score_items
from service.cli import main
from service.core.repository import ModelRepository
from tests.conftest import tiny_card

FAST = dict(translate_frames=3, zoom_start=0.9, zoom_stop=1.1, protocols=("pan", "scale"), policies=("center",))
CARD = tiny_card()


# ------------------------------------------------------------------ honesty
@pytest.mark.parametrize("spec,direction", [
    ("diagonal4@0.1", "diagonal"),      # the (+-1, +-1): its (1, 1) copy is the diagonal step
    ("0,0;1,1", "diagonal"),            # the flattered 2-copy row: neighbours share a copy
    ("0,0;2,0;3,0@0.2", "horizontal"),  # two copies one pixel apart horizontally
    ("0,0;0,-1@0.1", "vertical"),
])
def test_copies_that_line_up_with_a_pan_step_are_refused(spec: str, direction: str) -> None:
    with pytest.raises(ValueError, match=f"refused: its offsets line up with the {direction} pan step"):
        ProtocolConfig(ensembles=(spec,))


def test_default_and_contrast_settings_are_honest() -> None:
    cfg = ProtocolConfig(ensembles=("knight5@0.1", "knight5@0.15", "knight5@0.2", "square4@0.1", "diagonal4"))
    assert [e.name for e in cfg.ensemble_settings][-1] == "diagonal4"  # always mode: no bare answer to meet
    assert cfg.to_dict()["ensembles"][0]["offsets"] == [[0, 0], [2, 1], [-1, 2], [-2, -1], [1, -2]]
    with pytest.raises(ValueError, match="twice"):
        ProtocolConfig(ensembles=("knight5@0.1", "0,0;2,1;-1,2;-2,-1;1,-2@0.1"))


def test_cli_refuses_a_flattering_ensemble_with_exit_2(tiny_repo: ModelRepository, image_folder: tuple[Path, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    data, _ = image_folder
    assert main(["score", "--repo", str(tiny_repo.root), "tiny", "--data", str(data), "--no-progress",
                 "--ensembles", "diagonal4@0.1"]) == 2
    assert "diagonal pan step" in capsys.readouterr().err


# ------------------------------------------------------------------ measured through the one path
def _records(tiny_repo: ModelRepository, image_folder: tuple[Path, Path], **cfg: Any) -> tuple[list, dict, Any]:
    data, labels = image_folder
    loaded = tiny_repo.load("tiny", 1)
    ds = load_dataset(data, labels)
    config = ProtocolConfig(**{**FAST, **cfg})
    records, timing = score_items(loaded.onnx_bytes, loaded.card, ds.root, ds.items, config, 0)
    return records, timing, config


def test_variant_answers_are_the_served_answers(tiny_repo: ModelRepository, image_folder: tuple[Path, Path]) -> None:
    from service.dataplane import DataPlane
    from service.metrics import Metrics
    from service.settings import ServeSettings

    records, _, _ = _records(tiny_repo, image_folder, ensembles=("knight5",))
    settings = ServeSettings.build(tiny_repo.root, environ={}, overrides={"ensemble": "knight5", "live_fraction": 0})
    plane = DataPlane(settings, tiny_repo, Metrics("memory"), rng=random.Random(0))
    plane.load_all()
    data, _ = image_folder
    for rec in records:
        _, doc = asyncio.run(plane.classify("tiny", (data / rec["file"]).read_bytes(), top_k=1))
        assert doc["preprocess"]["ensemble"]["used"] is True
        assert rec["remedies"]["center+knight5"]["top1_class"] == doc["predictions"][0]["index"], rec["file"]


def test_copies_are_evaluated_once_and_only_for_unsure_views(tiny_repo: ModelRepository,
                                                             image_folder: tuple[Path, Path]) -> None:
    bare, t_bare, _ = _records(tiny_repo, image_folder, ensembles=())
    always, t_always, _ = _records(tiny_repo, image_folder, ensembles=("knight5", "knight5@0.5"))
    # distinct answer views: diagonal -4..4 (the base view among them), translate -1 and 1, vertical
    # -4..4 but (0, 0), the zoom frames 0.95 and 1.05
    n_answers = 9 + 2 + 8 + 2
    assert always[0]["remedies"]["center+knight5"]["compute"][1] == n_answers
    extra = t_always["evaluations"] - t_bare["evaluations"]
    # every copy of every answer view at most once: fewer than 4 per answer view (copies coincide with views)
    assert 0 < extra < 4 * n_answers * len(bare)
    for rec, ref in zip(always, bare):
        assert rec["policies"] == ref["policies"]  # the bare measurements do not change
        full, adaptive = rec["remedies"]["center+knight5"], rec["remedies"]["center+knight5@0.5"]
        assert full["compute"] == [5.0 * n_answers, n_answers] and full["used"] == [float(n_answers), n_answers]
        used = adaptive["used"][0]
        assert adaptive["compute"] == [n_answers + 4 * used, n_answers]


def test_scoring_with_ensembles_is_deterministic_and_documented(tiny_repo: ModelRepository,
                                                                image_folder: tuple[Path, Path],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    data, labels = image_folder
    argv = ["score", "--repo", str(tiny_repo.root), "tiny", "--data", str(data), "--labels", str(labels), "--json",
            "--no-progress", "--translate-frames", "3", "--zoom-range", "0.9", "1.1", "--ensembles",
            "knight5@0.3,knight5", "--max-cost", "6"]
    docs = []
    for _ in range(2):
        assert main(argv) == 0
        docs.append(json.loads(capsys.readouterr().out))
    for doc in docs:
        doc.pop("timing"), doc.pop("created")
    assert docs[0] == docs[1]
    doc = docs[0]
    names = [s["name"] for s in doc["remedies"]]
    assert names == ["center+knight5@0.3", "center+knight5", "object+knight5@0.3", "object+knight5"]
    full = doc["remedies"][1]
    assert full["compute"]["value"] == 5.0 and full["ensemble"]["offsets"][0] == [0, 0]
    assert set(full["vs_bare"]) >= {"pan.p_change", "pan.flip_probability", "pan.p_change_vertical",
                                    "scale.p_change", "accuracy.top1"}
    assert set(full["answers"]) == {"fixed_top1", "broken_top1", "n_top1", "fixed_views", "broken_views", "n_views"}
    assert doc["chosen"]["remedy"]["max_cost"] == 6 and "max_cost = 6" in doc["chosen"]["rule"]
    assert len(doc["chosen"]["remedy"]["candidates"]) == 2  # the chosen policy's settings only
    assert doc["summary"]["compute.per_answer"] == (1.0 if doc["chosen"]["ensemble"] is None
                                                    else doc["chosen"]["ensemble"]["compute"])
    assert doc["protocols"]["pan"]["center"]["p_change_vertical"]["n"] == 6 * 8


# ------------------------------------------------------------------ the cost term of the choice
def _e(v: float, lo: float, hi: float) -> dict[str, Any]:
    return {"value": v, "ci95": [lo, hi], "n": 100}


def _setting(name: str, compute: float, ratios: tuple[float, float, float], upper: float = 0.6,
             dtop1: tuple[float, float, float] = (0.005, -0.01, 0.02), policy: str = "center") -> dict[str, Any]:
    vs = {k: _e(r, r / 2, upper) for k, r in zip(("pan.p_change", "pan.flip_probability", "pan.p_change_vertical"), ratios)}
    vs["scale.p_change"] = _e(0.9, 0.6, 1.1)
    vs["accuracy.top1"] = _e(*dtop1)
    return {"name": f"{policy}+{name}", "policy": policy, "ensemble": {"name": name, "offsets": [[0, 0], [2, 1]],
                                                                       "threshold": 0.1},
            "compute": _e(compute, compute - 0.1, compute + 0.1), "vs_bare": vs,
            "pan": {"p_change": _e(0.014, 0.006, 0.023)}}


BASE = {"policy": "center", "resolution": 32, "rule": "R.", "labelled": True}


def test_costlier_setting_only_within_budget_and_with_the_gain_beyond_the_interval() -> None:
    cheap = _setting("a@0.1", 1.26, (0.50, 0.47, 0.37))
    mid = _setting("a@0.15", 1.37, (0.41, 0.49, 0.37))
    dear = _setting("a@0.2", 1.62, (0.30, 0.30, 0.30))
    chosen = choose_remedy(BASE, [cheap, mid, dear], CARD)
    # mid's worst ratio 0.49 and cheap's 0.50 tie (within 0.05): the cheaper wins; dear is over the budget
    assert chosen["ensemble"]["name"] == "a@0.1" and chosen["ensemble"]["compute"] == 1.26
    verdicts = {c["name"]: c for c in chosen["remedy"]["candidates"]}
    assert verdicts["center+a@0.2"]["why_not"] == "compute 1.620 per answer is over max_cost 1.5"
    assert chosen["rule"].startswith("R. Cost term:") and "max_cost = 1.5" in chosen["rule"]
    # a larger budget lets the clearly steadier one win
    assert choose_remedy(BASE, [cheap, mid, dear], CARD, RemedyRule(max_cost=2))["ensemble"]["name"] == "a@0.2"


@pytest.mark.parametrize("setting,why", [
    (_setting("u", 1.3, (0.4, 0.4, 0.4), upper=0.8), "does not stay under 0.75"),
    (_setting("t", 1.3, (0.4, 0.4, 0.4), dtop1=(-0.03, -0.05, -0.01)), "top-1 is lower"),
])
def test_not_admissible_without_a_clear_gain_or_with_lower_accuracy(setting: dict[str, Any], why: str) -> None:
    chosen = choose_remedy(BASE, [setting], CARD)
    assert chosen["ensemble"] is None and why in chosen["remedy"]["candidates"][0]["why_not"]
    assert remedy_summary([setting], chosen, 200) == {"compute.per_answer": {"value": 1.0, "ci95": [1.0, 1.0],
                                                                             "n": 200}}


def test_only_the_chosen_policy_at_the_card_resolution() -> None:
    other = _setting("a@0.1", 1.2, (0.4, 0.4, 0.4), policy="object")
    assert choose_remedy(BASE, [other], CARD)["remedy"]["candidates"] == []
    at_other_resolution = choose_remedy(dict(BASE, resolution=48), [_setting("a@0.1", 1.2, (0.4, 0.4, 0.4))], CARD)
    assert at_other_resolution["ensemble"] is None
    chosen = choose_remedy(BASE, [_setting("a@0.1", 1.2, (0.4, 0.4, 0.4))], CARD)
    flat = remedy_summary([_setting("a@0.1", 1.2, (0.4, 0.4, 0.4))], chosen, 200)
    assert flat["compute.per_answer"]["value"] == 1.2 and flat["pan.p_change"]["value"] == 0.014


def test_paired_ratios_of_the_pooled_records() -> None:
    rng = np.random.default_rng(0)
    records = []
    for i in range(40):
        bare, ens = int(rng.integers(0, 3)), int(rng.integers(0, 2))
        records.append({"index": i, "policies": {"center": {"pan.p_change": [bare, 8]}},
                        "remedies": {"center+knight5@0.1": {"pan.p_change": [ens, 8], "compute": [27 + 4 * ens, 27],
                                                            "used": [ens, 27]}}})
    cfg = ProtocolConfig(policies=("center",), ensembles=("knight5@0.1",))
    (setting,) = aggregate_remedies(records, cfg, seed=0, labelled=False)
    ratio = setting["vs_bare"]["pan.p_change"]
    expected = sum(r["remedies"]["center+knight5@0.1"]["pan.p_change"][0] for r in records) / sum(
        r["policies"]["center"]["pan.p_change"][0] for r in records)
    assert ratio["value"] == pytest.approx(expected) and ratio["ci95"][0] <= expected <= ratio["ci95"][1]
    assert setting["compute"]["value"] == pytest.approx(1 + 4 * setting["used"]["value"])
