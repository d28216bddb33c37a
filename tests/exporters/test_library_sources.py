from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

from exporters.sources import ExportOptions, export_source  # noqa: E402
from exporters.timm_source import build_timm, timm_defaults  # noqa: E402
from exporters.torchvision_source import build_torchvision, torchvision_defaults  # noqa: E402
from service.core.errors import ExportError  # noqa: E402
from service.core.repository import ModelRepository  # noqa: E402


@pytest.fixture(scope="module")
def tv_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tv") / "mobilenet_v3_small-7.pth"
    model = torchvision.models.mobilenet_v3_small(num_classes=7)
    with torch.no_grad():  # random init gives near-equal logits; spread them so top-1 is never a float tie
        model.classifier[-1].bias.copy_(torch.linspace(-1.0, 1.0, 7))
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("timm") / "mobilenetv3_small_050-5.pth"
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=5)
    with torch.no_grad():
        model.get_classifier().bias.copy_(torch.linspace(-1.0, 1.0, 5))
    torch.save(model.state_dict(), path)
    return path


def test_torchvision_source_exports_with_inferred_classes(tv_weights: Path, tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path)
    card = export_source("torchvision:mobilenet_v3_small", repo, ExportOptions(weights=tv_weights))
    assert (card.name, card.version, card.num_classes) == ("mobilenet_v3_small", 1, 7)
    assert card.labels == tuple(f"class_{i}" for i in range(7))
    assert (card.train_resolution, card.crop_pct, card.interpolation) == (224, 0.875, "bilinear")
    assert card.mean == pytest.approx((123.675, 116.28, 103.53))
    assert card.source.kind == "torchvision" and card.source.architecture == "mobilenet_v3_small"
    assert card.parity is not None and card.parity.max_abs_diff <= 1e-3 and card.parity.top1_agreement == 1.0
    repo.load("mobilenet_v3_small", 1)


def test_timm_source_exports_with_labels_and_overrides(timm_weights: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("ant\nbee\ncat\ndog\neel\n")
    options = ExportOptions(name="mv3", weights=timm_weights, labels_file=labels, resolution=96,
                            interpolation="bilinear")
    card = export_source("timm:mobilenetv3_small_050", ModelRepository(tmp_path / "r"), options)
    assert (card.name, card.labels) == ("mv3", ("ant", "bee", "cat", "dog", "eel"))
    assert (card.train_resolution, card.test_resolution, card.interpolation) == (96, 96, "bilinear")
    assert card.crop_pct == 0.875  # from timm's pretrained_cfg
    assert card.mean == pytest.approx((0.485 * 255, 0.456 * 255, 0.406 * 255))
    assert card.parity is not None and card.parity.resolutions == (96, 84, 125)


def test_1000_classes_get_imagenet_names(tmp_path: Path) -> None:
    path = tmp_path / "sq.pth"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)  # 1x1-conv head, 1000 classes
    _, card = build_torchvision("squeezenet1_1", path)
    assert card.num_classes == 1000 and card.labels[967] == "espresso"


def test_defaults_from_library_configs() -> None:
    assert torchvision_defaults("efficientnet_b0")["interpolation"] == "bicubic"
    cfg = timm.create_model("resnet10t", pretrained=False).pretrained_cfg
    fields = timm_defaults(cfg)
    assert fields["train_resolution"] == 176 and fields["crop_pct"] == 0.875
    assert fields["std"] == pytest.approx((58.395, 57.12, 57.375))


def test_weights_that_do_not_fit_fail_clearly(tv_weights: Path) -> None:
    with pytest.raises(ExportError, match="weights do not fit timm:resnet10t"):
        build_timm("resnet10t", tv_weights)
    with pytest.raises(ExportError, match="unknown torchvision architecture 'nope'"):
        build_torchvision("nope", tv_weights)
    with pytest.raises(ExportError, match="unknown timm architecture 'nope'"):
        build_timm("nope", tv_weights)


def test_library_sources_need_weights(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="needs --weights FILE"):
        export_source("timm:resnet10t", ModelRepository(tmp_path), ExportOptions())


def test_labels_count_must_match(tv_weights: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\n")
    with pytest.raises(ExportError, match="labels file .* has 2 names but the model has 7 classes"):
        build_torchvision("mobilenet_v3_small", tv_weights, labels)
