import io

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import exporters.parity as parity_mod  # noqa: E402
from exporters.onnx_export import to_onnx  # noqa: E402
from exporters.parity import check_parity, generated_inputs, parity_resolutions, photo_inputs  # noqa: E402
from service.core.errors import ExportError, ParityError  # noqa: E402
from tests.exporters.small_models import small_card  # noqa: E402


def test_parity_resolutions_native_then_scaled() -> None:
    assert parity_resolutions(224) == (224, 196, 291)
    assert parity_resolutions(260) == (260, 228, 338)
    assert parity_resolutions(8, (1.0, 0.9)) == (8,)


def test_parity_inputs_are_real_skimage_photos_and_generated() -> None:
    photos = photo_inputs()
    names = [n for n, _ in photos]
    assert {"skimage:coffee", "skimage:chelsea", "skimage:astronaut", "skimage:rocket"} <= set(names)
    coffee = Image.open(io.BytesIO(dict(photos)["skimage:coffee"]))
    assert coffee.size == (600, 400) and coffee.mode == "RGB"
    assert [n for n, _ in generated_inputs()] == ["generated:noise", "generated:gradient", "generated:checkerboard"]


def test_check_parity_passes_and_records(small_net: nn.Module) -> None:
    card = small_card()
    parity = check_parity(small_net, to_onnx(small_net, 64), card)
    assert parity.max_abs_diff <= 1e-5
    assert parity.top1_agreement == 1.0
    assert parity.resolutions == (64, 56, 83)
    assert "skimage:coffee" in parity.images and "generated:noise" in parity.images


def test_parity_error_states_by_how_much(small_net: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    onnx_bytes = to_onnx(small_net, 64)
    real = parity_mod.torch_logits

    def drifted(module: nn.Module, batch: np.ndarray) -> np.ndarray:
        return real(module, batch) + np.float32(0.25)  # same top-1, logits off by 0.25

    monkeypatch.setattr(parity_mod, "torch_logits", drifted)
    with pytest.raises(ParityError, match=r"max abs logit difference 0\.25 .*tolerance 0\.001, over by 0\.249"):
        check_parity(small_net, onnx_bytes, small_card())


def test_parity_error_on_top1_disagreement(small_net: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    onnx_bytes = to_onnx(small_net, 64)
    real = parity_mod.torch_logits

    def reversed_classes(module: nn.Module, batch: np.ndarray) -> np.ndarray:
        return real(module, batch)[:, ::-1].copy()

    monkeypatch.setattr(parity_mod, "torch_logits", reversed_classes)
    with pytest.raises(ParityError, match=r"top-1 agreement \d+/27"):
        check_parity(small_net, onnx_bytes, small_card(), tolerance=1e9)


class _FrozenShape(nn.Module):
    """Reads the input width as a Python int: tracing freezes it, so other sizes export wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = int(x.shape[-1])
        return self.fc(x.mean(dim=(2, 3))) * (width / 64.0)


def test_shape_frozen_at_trace_time_fails_parity_at_other_resolutions() -> None:
    torch.manual_seed(0)
    net = _FrozenShape().eval()
    onnx_bytes = to_onnx(net, 64)
    # at the traced size the export is exact ...
    assert check_parity(net, onnx_bytes, small_card(), resolutions=[64]).max_abs_diff < 1e-5
    # ... but the 0.875x / 1.3x checks catch it
    with pytest.raises(ParityError, match=r"max abs logit difference .* at .*@(56|83)px"):
        check_parity(net, onnx_bytes, small_card())


def test_label_count_must_match_outputs(small_net: nn.Module) -> None:
    with pytest.raises(ExportError, match="4 outputs but the card has 3 labels"):
        check_parity(small_net, to_onnx(small_net, 64), small_card(classes=3))
