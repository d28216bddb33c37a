from pathlib import Path

import pytest

from exporters.card_fields import merge_fields, parse_triple, read_card_file
from exporters.labels import imagenet_labels, read_labels_file, resolve_labels
from exporters.sources import default_name, parse_source
from service.core.errors import CardError, ExportError


def test_imagenet_labels_in_index_order() -> None:
    names = imagenet_labels()
    assert len(names) == 1000
    assert (names[0], names[281], names[967], names[999]) == ("tench", "tabby", "espresso", "toilet tissue")


def test_shipped_imagenet_labels_equal_torchvision() -> None:
    meta = pytest.importorskip("torchvision.models._meta")
    assert imagenet_labels() == tuple(meta._IMAGENET_CATEGORIES)


def test_resolve_labels(tmp_path: Path) -> None:
    assert resolve_labels(3) == ("class_0", "class_1", "class_2")
    path = tmp_path / "l.txt"
    path.write_text(" a \n\nb\nc\n")
    assert read_labels_file(path) == ("a", "b", "c")
    assert resolve_labels(3, path) == ("a", "b", "c")
    with pytest.raises(ExportError, match="has 3 names but the model has 4 classes"):
        resolve_labels(4, path)
    path.write_text("\n")
    with pytest.raises(ExportError, match="holds no class names"):
        read_labels_file(path)


def test_card_file_and_merging(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train_resolution: 64\nlabels: [x, y]\n")
    fields = read_card_file(path)
    merged = merge_fields({"crop_pct": 0.875, "train_resolution": 224}, fields, {"train_resolution": None})
    assert merged == {"crop_pct": 0.875, "train_resolution": 64, "labels": ("x", "y")}
    path.write_text("- a list\n")
    with pytest.raises(CardError, match="must hold a mapping"):
        read_card_file(path)


def test_parse_triple() -> None:
    assert parse_triple("127, 127,127.5", "mean") == (127.0, 127.0, 127.5)
    for bad in ("1,2", "a,b,c", "1,2,3,4"):
        with pytest.raises(CardError, match="--std needs three"):
            parse_triple(bad, "std")


def test_sources_and_default_names() -> None:
    assert parse_source("efficientnet-lite1") == ("efficientnet-lite", "efficientnet-lite1")
    assert parse_source("timm:resnet10t") == ("timm", "resnet10t")
    assert default_name("efficientnet-lite0") == "efficientnet-lite0"
    assert default_name("torchvision:mobilenet_v3_small") == "mobilenet_v3_small"
    assert default_name("onnx:/some/dir/My Model (v2).onnx") == "My-Model--v2"
    for bad in ("efficientnet-lite3", "onnx:", "keras:x"):
        with pytest.raises(ExportError, match="unknown source"):
            parse_source(bad)
