"""``onnx:<file>``: no torch needed on this path."""

import sys
from pathlib import Path

import onnx
import pytest

from exporters.onnx_source import import_onnx, onnx_io
from exporters.sources import ExportOptions, export_source
from service.core.card import METADATA_KEY, ModelCard
from service.core.errors import CardError, ExportError
from service.core.repository import ModelRepository
from tests.conftest import TINY_CLASSES, make_tiny_onnx

FIELDS = {"train_resolution": 32, "mean": (127, 127, 127), "std": (128, 128, 128)}


@pytest.fixture()
def tiny_file(tmp_path: Path, tiny_onnx: bytes) -> Path:
    path = tmp_path / "tiny net.onnx"
    path.write_bytes(tiny_onnx)
    return path


def test_import_onnx_stores_card_and_embeds_it(tiny_file: Path, tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    card = import_onnx(tiny_file, {**FIELDS, "interpolation": "bilinear"}, repo)
    assert (card.name, card.version) == ("tiny-net", 1)
    assert card.labels == tuple(f"class_{i}" for i in range(TINY_CLASSES))
    assert (card.train_resolution, card.interpolation, card.mean) == (32, "bilinear", (127.0, 127.0, 127.0))
    assert card.source.kind == "onnx" and card.source.architecture == "tiny net.onnx"
    assert card.parity is None  # no PyTorch reference to compare with
    loaded = repo.load("tiny-net", 1)
    embedded = {p.key: p.value for p in onnx.load_from_string(loaded.onnx_bytes).metadata_props}
    assert ModelCard.from_json(embedded[METADATA_KEY]).train_resolution == 32


def test_onnx_path_imports_no_torch(tiny_file: Path, tmp_path: Path) -> None:
    import subprocess

    code = (
        "import sys; from exporters.sources import ExportOptions, export_source; "
        "from service.core.repository import ModelRepository; "
        f"export_source('onnx:{tiny_file}', ModelRepository({str(tmp_path / 'r')!r}), "
        "ExportOptions(resolution=32, mean=(127,127,127), std=(128,128,128))); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"


def test_card_from_yaml_with_labels_file(tiny_file: Path, tmp_path: Path) -> None:
    (tmp_path / "names.txt").write_text("\n".join(f"n{i}" for i in range(TINY_CLASSES)) + "\n")
    yaml_file = tmp_path / "card.yaml"
    yaml_file.write_text("train_resolution: 40\ncrop_pct: 1.0\nmean: [120, 110, 100]\nstd: [60, 60, 60]\n"
                         "labels_file: names.txt\n")
    options = ExportOptions(card_file=yaml_file, crop_pct=0.9)  # flags override the YAML
    card = export_source(f"onnx:{tiny_file}", ModelRepository(tmp_path / "r"), options)
    assert card.labels[3] == "n3" and card.train_resolution == 40 and card.crop_pct == 0.9
    assert card.std == (60.0, 60.0, 60.0)


def test_preprocessing_is_never_guessed(tiny_file: Path, tmp_path: Path) -> None:
    with pytest.raises(CardError, match=r"needs \['mean', 'std'\]"):
        import_onnx(tiny_file, {"train_resolution": 32}, ModelRepository(tmp_path))


def test_unknown_yaml_fields_are_refused(tiny_file: Path, tmp_path: Path) -> None:
    yaml_file = tmp_path / "card.yaml"
    yaml_file.write_text("resolution: 32\n")
    with pytest.raises(CardError, match=r"unknown fields \['resolution'\]"):
        export_source(f"onnx:{tiny_file}", ModelRepository(tmp_path), ExportOptions(card_file=yaml_file))


def test_static_height_width_fails_the_smoke_test(tmp_path: Path) -> None:
    model = onnx.load_from_string(make_tiny_onnx())
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_value = 32
    dims[3].dim_value = 32
    path = tmp_path / "static.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ExportError, match=r"failed at 42x42 \(Steady needs dynamic batch, height and width\)"):
        import_onnx(path, FIELDS, ModelRepository(tmp_path / "r"))


def test_not_onnx_is_an_export_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="ONNX checker rejected"):
        import_onnx(path, FIELDS, ModelRepository(tmp_path))
    with pytest.raises(ExportError, match="cannot read ONNX file"):
        import_onnx(tmp_path / "missing.onnx", FIELDS, ModelRepository(tmp_path))


def test_label_count_must_match_outputs(tiny_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"returns \(4, 10\), expected \(4, 3\)"):
        import_onnx(tiny_file, {**FIELDS, "labels": ("a", "b", "c")}, ModelRepository(tmp_path))


def test_onnx_io(tiny_onnx: bytes) -> None:
    assert onnx_io(tiny_onnx) == ("input", "logits", TINY_CLASSES)


def test_name_precedence_flag_then_card_file_then_source(tiny_file: Path, tmp_path: Path) -> None:
    yaml_file = tmp_path / "card.yaml"
    yaml_file.write_text("name: from-yaml\ntrain_resolution: 32\nmean: [127, 127, 127]\nstd: [128, 128, 128]\n")
    repo = ModelRepository(tmp_path / "r")
    assert export_source(f"onnx:{tiny_file}", repo, ExportOptions(card_file=yaml_file)).name == "from-yaml"
    assert export_source(f"onnx:{tiny_file}", repo, ExportOptions(card_file=yaml_file, name="flag")).name == "flag"
