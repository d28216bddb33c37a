"""The gate: the pure decision, policy validation, and the CLI's exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robustness.gate import GatePolicy, decide, parse_policy
from robustness.schema import SUMMARY_KEYS
from service.cli import main
from service.core.errors import GateError
from service.core.repository import ModelRepository, atomic_write_json

SCORES = {"accuracy.top1": 0.85, "pan.p_change": 0.05, "scale.flip_probability": 0.10}
POLICY = GatePolicy(max={"pan.p_change": 0.08, "scale.flip_probability": 0.15}, min={"accuracy.top1": 0.70},
                    regression={"pan.p_change": 0.01, "accuracy.top1": -0.01})


def test_decide_passes_within_limits() -> None:
    d = decide(SCORES, POLICY, None)
    assert d.passed and d.decision == "pass" and d.reasons == []
    assert len(d.rules) == 5
    assert any("no production version" in r.reason for r in d.rules)


def test_decide_fails_with_reasons_naming_key_value_and_threshold() -> None:
    d = decide(dict(SCORES, **{"pan.p_change": 0.09, "accuracy.top1": 0.6}), POLICY, None)
    assert not d.passed and d.decision == "fail"
    assert d.reasons == ["pan.p_change = 0.0900 > max 0.08", "accuracy.top1 = 0.6000 < min 0.7"]


def test_decide_regression_directions() -> None:
    prod = {"accuracy.top1": 0.86, "pan.p_change": 0.045}
    assert decide(SCORES, POLICY, prod).passed  # accuracy -0.01 allowed, p_change +0.005 <= +0.01
    worse = decide(dict(SCORES, **{"accuracy.top1": 0.84, "pan.p_change": 0.06}), POLICY, prod)
    assert [r.key for r in worse.rules if not r.passed] == ["pan.p_change", "accuracy.top1"]


def test_missing_measurement_fails() -> None:
    d = decide({"accuracy.top1": 0.9}, GatePolicy(max={"pan.p_change": 0.1}), None)
    assert not d.passed and "not measured" in d.reasons[0]
    assert not decide({"accuracy.top1": 0.9}, GatePolicy(regression={"pan.p_change": 0.1}), {"pan.p_change": 0.0}).passed


@pytest.mark.parametrize("data,match", [
    ({"maximum": {}}, "unknown gate policy section"),
    ({"max": {"pan.flips": 0.1}}, "unknown summary key"),
    ({"max": {"pan.p_change": "low"}}, "finite number"),
    ({"min": {"accuracy.top1": True}}, "finite number"),
    ({"regression": {"accuracy.top1": 0.01}}, "must be <= 0"),
    ({"regression": {"pan.p_change": -0.01}}, "must be >= 0"),
    ([1, 2], "mapping"),
])
def test_bad_policies_are_refused(data: object, match: str) -> None:
    with pytest.raises(GateError, match=match):
        parse_policy(data, SUMMARY_KEYS)


def _write_scores(repo: ModelRepository, version: int, summary: dict, sha: str | None = None) -> None:
    atomic_write_json(repo.version_dir("tiny", version) / "robustness.json",
                      {"model_sha256": sha or repo.verify("tiny", version), "summary": summary,
                       "data": {"fingerprint": "f"}})


def _policy(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gate.yaml"
    path.write_text(text)
    return str(path)


GOOD_YAML = "max: {pan.p_change: 0.08}\nmin: {accuracy.top1: 0.7}\nregression: {accuracy.top1: -0.01}\n"


def test_gate_cli_exit_codes(tiny_repo: ModelRepository, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tiny_repo.root)
    policy = _policy(tmp_path, GOOD_YAML)
    assert main(["gate", "--repo", root, "tiny", "1", "--policy", policy]) == 2  # no robustness.json
    assert "no robustness.json" in capsys.readouterr().err
    _write_scores(tiny_repo, 1, SCORES, sha="0" * 64)
    assert main(["gate", "--repo", root, "tiny", "1", "--policy", policy]) == 2  # stale
    assert "stale" in capsys.readouterr().err
    _write_scores(tiny_repo, 1, SCORES)
    assert main(["gate", "--repo", root, "tiny", "1", "--policy", policy]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "pan.p_change" in out and "decision: pass" in out
    gate = json.loads((tiny_repo.version_dir("tiny", 1) / "gate.json").read_text())
    assert gate["decision"] == "pass" and gate["model_sha256"] == tiny_repo.verify("tiny", 1)
    assert len(gate["policy_sha256"]) == 64 and gate["reasons"] == [] and gate["time"]
    _write_scores(tiny_repo, 1, dict(SCORES, **{"pan.p_change": 0.2}))
    assert main(["gate", "--repo", root, "tiny", "1", "--policy", policy]) == 1
    assert json.loads((tiny_repo.version_dir("tiny", 1) / "gate.json").read_text())["decision"] == "fail"
    assert main(["gate", "--repo", root, "tiny", "1", "--policy", _policy(tmp_path, "max: {nope: 1}\n")]) == 2
    assert main(["gate", "--repo", root, "tiny", "1", "--policy", _policy(tmp_path, "max: [unclosed\n")]) == 2
    assert main(["gate", "--repo", root, "tiny", "1", "--policy", str(tmp_path / "absent.yaml")]) == 2
    assert main(["gate", "--repo", root, "tiny", "7", "--policy", policy]) == 2


def test_gate_regression_against_production(tiny_repo: ModelRepository, tiny_onnx: bytes, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import tiny_card

    tiny_repo.add("tiny", tiny_onnx, tiny_card(crop_pct=0.9))
    _write_scores(tiny_repo, 1, SCORES)
    tiny_repo.set_stage("tiny", "production", 1, forced=True, reason="seed")
    _write_scores(tiny_repo, 2, dict(SCORES, **{"accuracy.top1": 0.83}))
    policy = _policy(tmp_path, GOOD_YAML)
    assert main(["gate", "--repo", str(tiny_repo.root), "tiny", "2", "--policy", policy, "--json"]) == 1
    gate = json.loads(capsys.readouterr().out)
    assert gate["production_version"] == 1
    assert gate["reasons"] == ["accuracy.top1 changed -0.0200 vs production 0.8500 (allowed -0.01)"]


def test_shipped_policy_parses() -> None:
    from robustness.gate import load_policy

    policy, sha = load_policy(Path(__file__).parents[2] / "deploy" / "gate.yaml", SUMMARY_KEYS)
    assert policy.max and policy.min and policy.regression and len(sha) == 64
    # a new version (an int8 one above all) is compared with production on accuracy and every flip metric
    flips = {k for k in SUMMARY_KEYS if k.startswith(("pan.", "scale.")) or k.endswith(".p_change")}
    assert flips | {"accuracy.top1", "consistency"} <= set(policy.regression)


@pytest.mark.parametrize("content", ["[1]", "{not json", "null"])
def test_gate_refuses_a_robustness_json_that_is_not_an_object(tiny_repo: ModelRepository, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str], content: str) -> None:
    (tiny_repo.version_dir("tiny", 1) / "robustness.json").write_text(content)
    assert main(["gate", "--repo", str(tiny_repo.root), "tiny", "1", "--policy", _policy(tmp_path, GOOD_YAML)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "robustness.json" in err and "Traceback" not in err


# ------------------------------------------------------------------ the cost budget and `steadier`
STEADIER = parse_policy({"max": {"compute.per_answer": 1.5},
                         "steadier": {"margin": 0.25, "flips": ["pan.p_change", "pan.p_change_vertical"],
                                      "accuracy": ["accuracy.top1"]}}, SUMMARY_KEYS)
PROD = {"pan.p_change": 0.04, "pan.p_change_vertical": 0.02, "accuracy.top1": 0.89, "compute.per_answer": 1.0}
PROD_CI = {"accuracy.top1": [0.85, 0.93]}


def test_the_compute_budget_is_a_max_rule() -> None:
    assert decide({"compute.per_answer": 1.37}, GatePolicy(max={"compute.per_answer": 1.5})).passed
    d = decide({"compute.per_answer": 1.62}, GatePolicy(max={"compute.per_answer": 1.5}))
    assert not d.passed and d.reasons == ["compute.per_answer = 1.6200 > max 1.5"]


def test_steadier_needs_the_margin_on_every_flip_key_and_accuracy_within_the_interval() -> None:
    good = {"pan.p_change": 0.03, "pan.p_change_vertical": 0.015, "accuracy.top1": 0.86, "compute.per_answer": 1.4}
    d = decide(good, STEADIER, PROD, PROD_CI)  # 0.03 <= 0.75 x 0.04, 0.015 <= 0.75 x 0.02, 0.86 >= 0.85
    assert d.passed, d.reasons
    assert [r.section for r in d.rules] == ["max", "steadier", "steadier", "steadier"]
    not_enough = decide(dict(good, **{"pan.p_change_vertical": 0.016}), STEADIER, PROD, PROD_CI)
    assert not_enough.reasons == ["pan.p_change_vertical = 0.0160 > (1 - 0.25) x production 0.0200"]
    worse = decide(dict(good, **{"accuracy.top1": 0.84}), STEADIER, PROD, PROD_CI)
    assert [r.key for r in worse.rules if not r.passed] == ["accuracy.top1"]
    assert "lower bound 0.8500" in worse.reasons[0]
    assert not decide(good, STEADIER, PROD, {}).passed  # no interval for production: cannot judge accuracy
    assert not decide(dict(good, **{"compute.per_answer": 1.6}), STEADIER, PROD, PROD_CI).passed
    alone = decide(good, STEADIER, None)
    assert alone.passed and all("no production" in r.reason for r in alone.rules if r.section == "steadier")


@pytest.mark.parametrize("body,match", [
    ({"margin": 1.0, "flips": ["pan.p_change"]}, r"margin must be a number in \[0, 1\)"),
    ({"margin": "a lot", "flips": ["pan.p_change"]}, "margin"),
    ({"margin": 0.2, "flips": []}, "at least one"),
    ({"margin": 0.2, "flips": ["accuracy.top1"]}, "not a flip metric"),
    ({"margin": 0.2, "flips": ["compute.per_answer"]}, "not a flip metric"),
    ({"margin": 0.2, "flips": ["pan.p_change"], "accuracy": ["pan.mac"]}, "not an accuracy"),
    ({"margin": 0.2, "flips": ["pan.flips"]}, "unknown summary key"),
    ({"margin": 0.2, "flips": "pan.p_change"}, "list of summary keys"),
    ({"margin": 0.2, "flips": ["pan.p_change"], "by": 2}, "unknown field"),
    ([0.2], "must be a mapping"),
])
def test_bad_steadier_sections_are_refused(body: object, match: str) -> None:
    with pytest.raises(GateError, match=match):
        parse_policy({"steadier": body}, SUMMARY_KEYS)


def test_gate_cli_steadier_than_production_reads_its_intervals(tiny_repo: ModelRepository, tiny_onnx: bytes,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import tiny_card

    tiny_repo.add("tiny", tiny_onnx, tiny_card(crop_pct=0.9))
    atomic_write_json(tiny_repo.version_dir("tiny", 1) / "robustness.json",
                      {"model_sha256": tiny_repo.verify("tiny", 1), "summary": PROD, "summary_ci95": PROD_CI})
    tiny_repo.set_stage("tiny", "production", 1, forced=True, reason="seed")
    candidate = {"pan.p_change": 0.02, "pan.p_change_vertical": 0.018, "accuracy.top1": 0.9, "compute.per_answer": 1.3}
    _write_scores(tiny_repo, 2, candidate)
    policy = _policy(tmp_path, "max: {compute.per_answer: 1.5}\nsteadier:\n  margin: 0.25\n"
                               "  flips: [pan.p_change, pan.p_change_vertical]\n  accuracy: [accuracy.top1]\n")
    assert main(["gate", "--repo", str(tiny_repo.root), "tiny", "2", "--policy", policy, "--json"]) == 1
    gate = json.loads(capsys.readouterr().out)
    assert gate["production_version"] == 1
    assert gate["reasons"] == ["pan.p_change_vertical = 0.0180 > (1 - 0.25) x production 0.0200"]
    _write_scores(tiny_repo, 2, dict(candidate, **{"pan.p_change_vertical": 0.012}))
    assert main(["gate", "--repo", str(tiny_repo.root), "tiny", "2", "--policy", policy]) == 0
    assert "steadier" in capsys.readouterr().out
