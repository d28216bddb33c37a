from collections import OrderedDict
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from exporters.weights import file_sha256, infer_num_classes, load_into, load_state_dict, map_by_position  # noqa: E402
from service.core.errors import ExportError  # noqa: E402


def _source_net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


class _Renamed(nn.Module):
    """Same tensors as _source_net in the same order, other names."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)


def test_map_by_position_renames_every_tensor_in_order() -> None:
    torch.manual_seed(1)
    src = _source_net()
    with torch.no_grad():
        src[1].running_mean.uniform_()
    target = _Renamed()
    mapped = map_by_position(src.state_dict(), target)
    target.load_state_dict(mapped, strict=True)
    assert list(mapped) == list(target.state_dict())
    assert torch.equal(target.stem.weight, src[0].weight)
    assert torch.equal(target.norm.running_mean, src[1].running_mean)
    assert torch.equal(target.head.bias, src[3].bias)


def test_map_by_position_ignores_num_batches_tracked() -> None:
    state = OrderedDict((k, v) for k, v in _source_net().state_dict().items() if "num_batches" not in k)
    mapped = map_by_position(state, _Renamed())
    assert "norm.num_batches_tracked" in mapped


def test_map_by_position_names_the_shape_mismatch() -> None:
    state = _source_net().state_dict()
    state["3.weight"] = torch.zeros(3, 4)
    with pytest.raises(ExportError, match=r"tensor 6 '3.weight' has shape \(3, 4\).*'head.weight' has \(2, 4\)"):
        map_by_position(state, _Renamed())


def test_map_by_position_refuses_a_different_count() -> None:
    state = _source_net().state_dict()
    state.pop("3.bias")
    with pytest.raises(ExportError, match="the file has 7 tensors, the architecture 8"):
        map_by_position(state, _Renamed())


def test_load_state_dict_unwraps_checkpoints_and_hashes(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": _source_net().state_dict(), "epoch": 3}, path)
    state = load_state_dict(path)
    assert "0.weight" in state and len(state) == 9
    assert len(file_sha256(path)) == 64


def test_load_state_dict_refuses_pickled_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"model": _source_net()}, path)  # a whole module: needs unpickling of classes
    with pytest.raises(ExportError, match="weights_only=True"):
        load_state_dict(path)


def test_load_state_dict_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not found"):
        load_state_dict(tmp_path / "nope.pth")


def test_infer_num_classes_from_named_or_last_weight() -> None:
    state = {"conv.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(7, 8), "fc.bias": torch.zeros(7)}
    assert infer_num_classes(state, "fc.weight") == 7
    assert infer_num_classes(state, "absent.weight") == 7
    squeeze_head = {"features.weight": torch.zeros(8, 3, 3, 3), "classifier.1.weight": torch.zeros(5, 8, 1, 1)}
    assert infer_num_classes(squeeze_head) == 5
    with pytest.raises(ExportError, match="no classifier weight"):
        infer_num_classes({"bias": torch.zeros(3)})


def test_load_into_wraps_strict_errors() -> None:
    with pytest.raises(ExportError, match="weights do not fit net"):
        load_into(_Renamed(), _source_net().state_dict(), "net")
