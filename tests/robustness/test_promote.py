"""Promotion needs a passing gate for the exact sha256 (or --force --reason); rollback restores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.cli import main
from service.core.repository import ModelRepository, atomic_write_json
from tests.conftest import tiny_card


def _gate(repo: ModelRepository, version: int, decision: str = "pass", sha: str | None = None) -> None:
    atomic_write_json(repo.version_dir("tiny", version) / "gate.json",
                      {"decision": decision, "reasons": [] if decision == "pass" else ["pan.p_change too high"],
                       "model_sha256": sha or repo.verify("tiny", version)})


def _stages(repo: ModelRepository) -> dict:
    return json.loads((repo.model_dir("tiny") / "stages.json").read_text())


def test_promote_refused_without_gate(tiny_repo: ModelRepository, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["promote", "--repo", str(tiny_repo.root), "tiny", "1"]) == 1
    assert "no gate.json" in capsys.readouterr().err
    assert _stages(tiny_repo)["production"] is None


@pytest.mark.parametrize("decision,sha,message", [("fail", None, "gate decision is 'fail'"),
                                                  ("pass", "0" * 64, "another model")])
def test_promote_refused_for_failed_or_stale_gate(tiny_repo: ModelRepository, capsys: pytest.CaptureFixture[str],
                                                  decision: str, sha: str | None, message: str) -> None:
    _gate(tiny_repo, 1, decision, sha)
    assert main(["promote", "--repo", str(tiny_repo.root), "tiny", "1"]) == 1
    assert message in capsys.readouterr().err
    assert _stages(tiny_repo)["production"] is None


def test_promote_refused_when_model_file_is_corrupt(tiny_repo: ModelRepository,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _gate(tiny_repo, 1)
    path = tiny_repo.version_dir("tiny", 1) / "model.onnx"
    path.chmod(0o644)
    path.write_bytes(path.read_bytes() + b"x")
    assert main(["promote", "--repo", str(tiny_repo.root), "tiny", "1"]) == 1
    assert "do not verify" in capsys.readouterr().err


def test_promote_with_passing_gate_then_rollback(tiny_repo: ModelRepository, tiny_onnx: bytes,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tiny_repo.root)
    tiny_repo.add("tiny", tiny_onnx, tiny_card(crop_pct=0.9))
    _gate(tiny_repo, 1)
    _gate(tiny_repo, 2)
    assert main(["promote", "--repo", root, "tiny", "2", "--stage", "candidate"]) == 0
    assert _stages(tiny_repo)["candidate"] == 2
    assert main(["promote", "--repo", root, "tiny", "1"]) == 0
    assert main(["promote", "--repo", root, "tiny", "2"]) == 0
    stages = _stages(tiny_repo)
    assert stages["production"] == 2 and stages["candidate"] is None
    assert main(["rollback", "--repo", root, "tiny"]) == 0
    stages = _stages(tiny_repo)
    assert stages["production"] == 1 and stages["history"][-1]["rollback"] is True
    capsys.readouterr()
    assert main(["rollback", "--repo", root, "tiny"]) == 1  # nothing before v1
    assert "no earlier production" in capsys.readouterr().err


def test_forced_promotion_is_recorded(tiny_repo: ModelRepository, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tiny_repo.root)
    assert main(["promote", "--repo", root, "tiny", "1", "--force"]) == 1
    assert "--reason" in capsys.readouterr().err
    assert main(["promote", "--repo", root, "tiny", "1", "--force", "--reason", "hotfix INC-7"]) == 0
    entry = _stages(tiny_repo)["history"][-1]
    assert entry["forced"] is True and entry["reason"] == "hotfix INC-7" and entry["to"] == 1


def test_models_shows_gate_status(tiny_repo: ModelRepository, capsys: pytest.CaptureFixture[str]) -> None:
    _gate(tiny_repo, 1)
    assert main(["models", "--repo", str(tiny_repo.root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"][0]["versions"][0]["gate"] == "pass"
    _gate(tiny_repo, 1, sha="1" * 64)
    assert main(["models", "--repo", str(Path(tiny_repo.root)), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["models"][0]["versions"][0]["gate"] == "stale"


@pytest.mark.parametrize("content", ["[1]", "{not json", '"pass"'])
def test_promote_refuses_a_gate_json_that_is_not_an_object(tiny_repo: ModelRepository, capsys: pytest.CaptureFixture[str],
                                                            content: str) -> None:
    (tiny_repo.version_dir("tiny", 1) / "gate.json").write_text(content)
    assert main(["promote", "--repo", str(tiny_repo.root), "tiny", "1"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "gate.json" in err and "Traceback" not in err
    assert _stages(tiny_repo)["production"] is None
