import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from exporters.efficientnet_lite import LITE_VARIANTS, build_lite, lite_card, lite_weights_path  # noqa: E402
from exporters.weights import file_sha256, load_state_dict  # noqa: E402
from service.core.card import ModelCard  # noqa: E402
from service.cli import main  # noqa: E402
from service.core.errors import ExportError  # noqa: E402
from service.core.preprocess import Preprocessor  # noqa: E402
from service.core.repository import ModelRepository  # noqa: E402
from tests.conftest import encode  # noqa: E402

CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat


@pytest.mark.parametrize("name,resolution", [("efficientnet-lite0", 224), ("efficientnet-lite1", 240),
                                             ("efficientnet-lite2", 260)])
def test_card_of_each_variant(name: str, resolution: int) -> None:
    card = lite_card(name, "ab" * 32)
    assert (card.train_resolution, card.test_resolution) == (resolution, resolution)
    assert (card.crop_pct, card.interpolation) == (0.875, "bicubic")
    assert card.mean == (127.0, 127.0, 127.0) and card.std == (128.0, 128.0, 128.0)
    assert card.num_classes == 1000
    assert (card.labels[0], card.labels[967], card.labels[999]) == ("tench", "espresso", "toilet tissue")
    assert card.source.kind == "efficientnet-lite" and card.source.weights_sha256 == "ab" * 32


@pytest.mark.parametrize("name", sorted(LITE_VARIANTS))
def test_package_weights_fit_timm_by_position(name: str) -> None:
    state = load_state_dict(lite_weights_path(name))
    src = [(k, tuple(v.shape)) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    arch = timm.create_model(LITE_VARIANTS[name].timm_arch, pretrained=False)
    dst = [(k, tuple(v.shape)) for k, v in arch.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(src) == len(dst) == LITE_VARIANTS[name].tensors
    assert [s for _, s in src] == [s for _, s in dst]
    assert src[0][0] == "_conv_stem.weight" and src[-1][0] == "_fc.bias"  # lukemelas format


def test_wrong_variant_weights_fail_clearly() -> None:
    with pytest.raises(ExportError, match=r"cannot map weights by position: tensor \d+ '.*' has shape"):
        build_lite("efficientnet-lite2", lite_weights_path("efficientnet-lite1"))
    with pytest.raises(ExportError, match="the file has 322 tensors, the architecture 247"):
        build_lite("efficientnet-lite0", lite_weights_path("efficientnet-lite2"))
    with pytest.raises(ExportError, match="unknown EfficientNet-Lite variant 'efficientnet-lite9'"):
        lite_card("efficientnet-lite9")


@pytest.mark.slow
def test_position_mapping_reproduces_every_tensor_and_classifies_real_photos(coffee: np.ndarray,
                                                                             chelsea: np.ndarray) -> None:
    model, card = build_lite("efficientnet-lite0")
    path = lite_weights_path("efficientnet-lite0")
    assert card.source.weights_sha256 == file_sha256(path)
    source = [v for k, v in load_state_dict(path).items() if not k.endswith("num_batches_tracked")]
    mapped = [v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert all(torch.equal(a, b) for a, b in zip(source, mapped))
    assert isinstance(model.bn1.act, torch.nn.ReLU6)  # a swish here silently drops accuracy below 10%
    pre = Preprocessor(card)
    batch = pre.to_tensor([pre.prepare(encode(img, "PNG")).pixels for img in (coffee, chelsea)])
    with torch.no_grad():
        logits = model(torch.from_numpy(batch)).numpy()
    assert logits.argmax(1)[0] == 967  # espresso
    assert logits.argmax(1)[1] in CAT_CLASSES
    assert torch.nn.functional.softmax(torch.from_numpy(logits[0]), 0)[967] > 0.5


@pytest.mark.slow
def test_lite0_repo_fixture_predicts_espresso(lite0_repo: tuple[ModelRepository, str], coffee: np.ndarray,
                                              tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    repo, name = lite0_repo
    assert name == "efficientnet-lite0"  # the CLI's default name is the source
    card: ModelCard = repo.load(name, 1).card
    assert card.source.kind == "efficientnet-lite" and card.train_resolution == 224
    assert card.parity is not None
    assert card.parity.max_abs_diff <= 1e-3 and card.parity.top1_agreement == 1.0
    assert card.parity.resolutions == (224, 196, 291)
    assert len(card.parity.images) >= 7
    image = tmp_path / "coffee.png"
    image.write_bytes(encode(coffee, "PNG"))
    assert main(["predict", "--repo", str(repo.root), name, str(image), "--top-k", "1"]) == 0
    assert capsys.readouterr().out.split("\t")[1:3] == ["967", "espresso"]


@pytest.mark.slow
@pytest.mark.parametrize("resolution", [224, 257])
def test_timm_with_mapped_weights_equals_an_independent_reference(resolution: int, coffee: np.ndarray,
                                                                  chelsea: np.ndarray) -> None:
    from tests.exporters.lite_reference import lite0_reference

    model, card = build_lite("efficientnet-lite0")
    state = load_state_dict(lite_weights_path("efficientnet-lite0"))
    pre = Preprocessor(card, resolution=resolution)
    batch = torch.from_numpy(pre.to_tensor([pre.prepare(encode(img, "PNG")).pixels for img in (coffee, chelsea)]))
    with torch.no_grad():
        got = model(batch)
        want = lite0_reference(state, batch)
    assert torch.equal(got.argmax(1), want.argmax(1)) and int(want.argmax(1)[0]) == 967
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
