import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from exporters.module_export import export_module  # noqa: E402
from exporters.onnx_export import to_onnx  # noqa: E402
from service.core.card import METADATA_KEY, ModelCard  # noqa: E402
from service.core.errors import ExportError, InvalidName  # noqa: E402
from service.core.repository import ModelRepository  # noqa: E402
from tests.exporters.small_models import small_card  # noqa: E402


def test_export_module_stores_a_carded_parity_checked_version(small_net: nn.Module, tmp_path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    card = export_module(small_net, small_card(), repo, "my-net")
    assert (card.name, card.version, card.opset) == ("my-net", 1, 17)
    assert card.parity is not None and card.parity.max_abs_diff <= 1e-3 and card.parity.top1_agreement == 1.0
    assert card.parity.resolutions == (64, 56, 83)
    loaded = repo.load("my-net", 1)
    assert loaded.card == card
    embedded = {p.key: p.value for p in onnx.load_from_string(loaded.onnx_bytes).metadata_props}
    assert ModelCard.from_json(embedded[METADATA_KEY]).parity == card.parity
    assert export_module(small_net, small_card(), repo, "my-net").version == 2


def test_graph_io_names_and_dynamic_axes(small_net: nn.Module) -> None:
    model = onnx.load_from_string(to_onnx(small_net, 64))
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("input", "logits")
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert model.opset_import[0].version == 17


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (3, 3, 41, 41), (2, 3, 100, 72), (1, 3, 17, 130)])
def test_dynamic_batch_height_width_match_pytorch(small_net: nn.Module, shape: tuple[int, ...]) -> None:
    session = ort.InferenceSession(to_onnx(small_net, 64), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    (got,) = session.run(["logits"], {"input": x})
    with torch.no_grad():
        want = small_net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_invalid_name_is_refused_before_exporting(small_net: nn.Module, tmp_path, monkeypatch) -> None:
    import exporters.module_export as mod

    monkeypatch.setattr(mod, "to_onnx", lambda *a, **k: pytest.fail("exported despite a bad name"))
    with pytest.raises(InvalidName):
        export_module(small_net, small_card(), ModelRepository(tmp_path), "../evil")


def test_to_onnx_refuses_non_modules_and_bad_resolution(small_net: nn.Module) -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"):
        to_onnx(lambda x: x, 64)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resolution must be an integer >= 8"):
        to_onnx(small_net, 4)


def test_export_failure_is_an_export_error() -> None:
    class Unexportable(nn.Module):
        def forward(self, x: torch.Tensor) -> str:  # not a tensor: the tracer cannot export it
            return "logits"

    with pytest.raises(ExportError, match="Unexportable"):
        to_onnx(Unexportable(), 32)


def test_fp16_export_keeps_float32_io_and_records_its_parity(small_net: nn.Module, tmp_path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    card = export_module(small_net, small_card(), repo, "half", precision="fp16")
    assert card.precision == "fp16"
    assert card.parity is not None and card.parity.top1_agreement >= 0.995 and card.parity.tolerance == 0.5
    model = onnx.load_from_string(repo.load("half", 1).onnx_bytes)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    with pytest.raises(ValueError, match="precision must be fp32, fp16 or int8"):
        export_module(small_net, small_card(), repo, "half", precision="int4")
    with pytest.raises(ValueError, match="calibration photos"):
        export_module(small_net, small_card(), repo, "half", precision="int8")
