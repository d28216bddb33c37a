import json
from pathlib import Path

import numpy as np
import pytest

from service.cli import main
from service.core.repository import ModelRepository
from tests.conftest import encode


def test_export_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["export", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "torchvision:<arch>" in out and "--weights FILE" in out and "onnx:<file>" in out


def test_export_onnx_prints_name_and_version(tiny_onnx: bytes, tmp_path: Path, coffee: np.ndarray,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "tiny.onnx"
    model.write_bytes(tiny_onnx)
    repo = tmp_path / "repo"
    args = ["export", f"onnx:{model}", "--repo", str(repo), "--resolution", "32", "--mean", "127,127,127",
            "--std", "128,128,128", "--interpolation", "bilinear", "--crop-pct", "0.9"]
    assert main(args) == 0
    assert capsys.readouterr().out == "tiny/1\n"
    assert main(args + ["--name", "tiny"]) == 0
    assert capsys.readouterr().out == "tiny/2\n"
    card = ModelRepository(repo).load("tiny", 2).card
    assert (card.crop_pct, card.interpolation, card.opset) == (0.9, "bilinear", 17)
    image = tmp_path / "coffee.jpg"
    image.write_bytes(encode(coffee))
    assert main(["predict", "--repo", str(repo), "tiny", str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 2


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["nonsense"], 1, "unknown source 'nonsense'"),
        (["torchvision:resnet18"], 1, "needs --weights FILE"),
        (["onnx:/no/such.onnx", "--resolution", "32", "--mean", "1,2,3", "--std", "1,1,1"], 1, "cannot read ONNX"),
        (["onnx:x.onnx", "--mean", "1,2"], 2, "--mean needs three comma-separated numbers"),
        (["efficientnet-lite0", "--name", "../up"], 2, "invalid model name"),
    ],
)
def test_export_errors_are_one_line(args: list[str], code: int, message: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", *args, "--repo", str(tmp_path)]) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("steady export: error: ") and message in captured.err
    assert captured.err.count("\n") == 1


def test_export_rejects_bad_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["export", "efficientnet-lite0", "--repo", str(tmp_path), "--resolution", "0"])
    assert exc.value.code == 2
    assert "expected an integer >= 1" in capsys.readouterr().err


def test_export_command_imports_torch_lazily() -> None:
    import subprocess
    import sys

    code = "import sys; from service.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"
