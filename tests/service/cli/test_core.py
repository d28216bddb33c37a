import json
import os
from pathlib import Path

import numpy as np
import pytest

from service.cli import main
from service.core.repository import ModelRepository
from tests.conftest import encode


@pytest.fixture()
def images(tmp_path: Path, coffee: np.ndarray, chelsea: np.ndarray) -> Path:
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b_coffee.jpg").write_bytes(encode(coffee))
    (folder / "sub" / "a_cat.png").write_bytes(encode(chelsea, "PNG"))
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_models_json_shape(tiny_repo: ModelRepository, capsys: pytest.CaptureFixture[str]) -> None:
    tiny_repo.set_stage("tiny", "production", 1)
    assert main(["models", "--repo", str(tiny_repo.root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (model,) = out["models"]
    assert model["name"] == "tiny"
    assert model["stages"] == {"production": 1, "candidate": None}
    (version,) = model["versions"]
    assert set(version) == {"version", "sha256", "created", "gate", "verified"}
    assert version["sha256"] == tiny_repo.verify("tiny", 1) and version["verified"] is True
    assert main(["models", "--repo", str(tiny_repo.root)]) == 0
    assert "production=1" in capsys.readouterr().out


def _writable(path: Path) -> Path:
    os.chmod(path, 0o644)
    return path


@pytest.mark.parametrize("content, shown", [("[1]", "unreadable"), ("{not json", "unreadable"),
                                            ('{"model_sha256": "abc", "decision": "pass"}', "stale")])
def test_models_reports_bad_gate_files_in_one_word(tiny_repo: ModelRepository, capsys: pytest.CaptureFixture[str],
                                                    content: str, shown: str) -> None:
    (tiny_repo.version_dir("tiny", 1) / "gate.json").write_text(content)
    assert main(["models", "--repo", str(tiny_repo.root), "--json"]) == 0
    (version,) = json.loads(capsys.readouterr().out)["models"][0]["versions"]
    assert version["gate"] == shown


def test_models_verifies_each_model_file(tiny_repo: ModelRepository, capsys: pytest.CaptureFixture[str]) -> None:
    path = _writable(tiny_repo.version_dir("tiny", 1) / "model.onnx")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    assert main(["models", "--repo", str(tiny_repo.root), "--json"]) == 0
    (version,) = json.loads(capsys.readouterr().out)["models"][0]["versions"]
    assert version["verified"] is False and version["sha256"] is None and "checksum" in version["error"]
    assert main(["models", "--repo", str(tiny_repo.root)]) == 0
    assert "CHECKSUM ERROR" in capsys.readouterr().out


def test_predict_json_lines_for_files_and_folders(
    tiny_repo: ModelRepository, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["predict", "--repo", str(tiny_repo.root), "tiny", str(images), "--json", "--top-k", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [Path(x["image"]).name for x in lines] == ["b_coffee.jpg", "a_cat.png"]
    for line in lines:
        assert line["model"] == "tiny" and line["version"] == 1
        assert len(line["predictions"]) == 3
        scores = [p["score"] for p in line["predictions"]]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
        assert line["predictions"][0]["label"] == f"class_{line['predictions'][0]['index']}"


def test_predict_refuses_a_corrupted_model(
    tiny_repo: ModelRepository, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tiny_repo.version_dir("tiny", 1) / "model.onnx"
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    assert main(["predict", "--repo", str(tiny_repo.root), "tiny", str(images)]) == 1
    err = capsys.readouterr().err
    assert "checksum" in err and len(err.strip().splitlines()) == 1


def test_errors_are_one_line_with_nonzero_exit(tiny_repo: ModelRepository, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--repo", str(tiny_repo.root), "nope", "x.jpg"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["predict", "--repo", str(tiny_repo.root), "tiny", "/does/not/exist.jpg"]) == 1
    assert main(["predict", "--repo", str(tiny_repo.root), "../etc", "x.jpg"]) == 2
    assert "invalid model name" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["models", "predict", "export", "score", "gate", "promote", "rollback", "serve"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: steady" in capsys.readouterr().out
