"""The documented choice rule on hand-made aggregated results."""

from __future__ import annotations

import pytest

from robustness.protocols import ProtocolConfig
from robustness.scorer import choose
from service.cli import main
from service.core.repository import ModelRepository
from tests.conftest import tiny_card


def _e(v: float, half: float = 0.02) -> dict:
    return {"value": v, "ci95": [v - half, v + half], "n": 100}


def _result(acc: dict[str, float], pan: dict[str, float], embed: dict[str, float]) -> dict:
    return {
        "accuracy": {p: {"top1": _e(a, 0.04), "top5": _e(0.95)} for p, a in acc.items()},
        "protocols": {
            "pan": {p: {"p_change": _e(v)} for p, v in pan.items()},
            "embed": {p: {"sizes": [{"size": 0.5, "accuracy": _e(0.7), "p_change": _e(v)}]} for p, v in embed.items()},
        },
    }


CFG = ProtocolConfig(protocols=("pan", "embed"))
CARD = tiny_card()


def test_equal_accuracy_prefers_the_steadier_policy() -> None:
    chosen = choose(_result({"center": 0.85, "object": 0.85}, {"center": 0.05, "object": 0.05},
                            {"center": 0.19, "object": 0.0}), CARD, CFG)
    assert (chosen["policy"], chosen["resolution"], chosen["reason"]) == ("object", 32, "steadiest")


def test_a_policy_that_flips_more_beyond_the_interval_is_not_admissible() -> None:
    chosen = choose(_result({"center": 0.85, "object": 0.95}, {"center": 0.05, "object": 0.09},
                            {"center": 0.19, "object": 0.0}), CARD, CFG)
    assert chosen["policy"] == "center" and chosen["admissible"] == [["center", 32]]


def test_clearly_more_accurate_admissible_policy_wins() -> None:
    chosen = choose(_result({"center": 0.80, "object": 0.90}, {"center": 0.05, "object": 0.06},
                            {"center": 0.19, "object": 0.20}), CARD, CFG)
    assert (chosen["policy"], chosen["reason"]) == ("object", "most accurate")


def test_less_accurate_beyond_interval_is_not_admissible() -> None:
    chosen = choose(_result({"center": 0.85, "object": 0.70}, {"center": 0.05, "object": 0.0},
                            {"center": 0.19, "object": 0.0}), CARD, CFG)
    assert chosen["policy"] == "center"


def test_bench_score_cli_prints_both_throughputs(tiny_repo: ModelRepository, image_folder: tuple,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import json

    data, _ = image_folder
    assert main(["bench", "score", "--repo", str(tiny_repo.root), "tiny", "--data", str(data), "--max-images", "2",
                 "--raw-seconds", "0.05", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"raw_ort_evals_per_s", "scorer_evals_per_s", "ratio", "batch_size"} <= set(out)
    assert out["ratio"] == pytest.approx(out["scorer_evals_per_s"] / out["raw_ort_evals_per_s"], rel=0.01, abs=1e-3)
