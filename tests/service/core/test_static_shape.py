"""A graph specialised for one input size gives the same logits, refuses other sizes, and keeps int8 integer."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

from service.core.static_shape import shape_nodes, specialise
from tests.conftest import make_same_padding_onnx as same_padding_net
from tests.conftest import make_tiny_onnx, tiny_card


def _run(onnx_bytes: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _ops(onnx_bytes: bytes) -> collections.Counter[str]:
    import onnx

    return collections.Counter(n.op_type for n in onnx.load_from_string(onnx_bytes).graph.node)


@pytest.mark.parametrize("size", [31, 32])
def test_specialised_graph_gives_the_same_logits_and_refuses_other_sizes(size: int) -> None:
    net = same_padding_net()
    x = np.random.default_rng(size).normal(size=(3, 3, size, size)).astype(np.float32)
    fixed = specialise(net, size, size)
    assert np.array_equal(_run(fixed, x), _run(net, x))
    assert _ops(fixed)["Shape"] == 0 and _ops(net)["Shape"] == 1  # the arithmetic is gone
    with pytest.raises(Exception, match="(?i)dimension|shape|invalid"):
        _run(fixed, x[:, :, :size - 2, :size - 2])


def test_shape_nodes_are_the_pad_arithmetic_only() -> None:
    import onnx

    names = shape_nodes(onnx.load_from_string(same_padding_net()))
    assert "Pad" not in " ".join(names) and len(names) == 3 + 2 * 13 + 1  # Shape, 2 Gathers, per axis, Concat
    assert shape_nodes(onnx.load_from_string(make_tiny_onnx())) == []


def test_int8_graph_specialised_keeps_its_integer_pipeline(tmp_path: Path) -> None:
    """Quantized with the pad arithmetic left float (as exporters.quantize does), then specialised: the
    DequantizeLinear -> Pad -> QuantizeLinear round trip becomes an integer Pad, with identical logits."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    net = same_padding_net()
    rng = np.random.default_rng(0)
    calib = [rng.normal(size=(1, 3, 32, 32)).astype(np.float32) for _ in range(8)]

    class Reader:
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.it, None)
            return None if x is None else {"input": x}

    from onnxruntime.quantization.shape_inference import quant_pre_process

    (tmp_path / "fp32.onnx").write_bytes(net)
    quant_pre_process(str(tmp_path / "fp32.onnx"), str(tmp_path / "pre.onnx"))
    quantize_static(str(tmp_path / "pre.onnx"), str(tmp_path / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    nodes_to_exclude=shape_nodes(onnx.load(str(tmp_path / "pre.onnx"))))
    int8 = (tmp_path / "int8.onnx").read_bytes()
    fixed = specialise(int8, 32, 32)
    x = rng.normal(size=(4, 3, 32, 32)).astype(np.float32)
    assert np.array_equal(_run(fixed, x), _run(int8, x))
    pads = [n for n in onnx.load_from_string(fixed).graph.node if n.op_type == "Pad"]
    assert len(pads) == 1 and pads[0].name.endswith("__integer")  # no float round trip around it
    assert _ops(fixed)["QuantizeLinear"] < _ops(int8)["QuantizeLinear"]


def test_classifier_runs_its_static_sizes_on_their_own_sessions() -> None:
    from service.core.runtime import Classifier, RuntimeOptions

    card = tiny_card(labels=tuple("abcd"))
    clf = Classifier(same_padding_net(), card, RuntimeOptions(provider="cpu", static_sizes=(32,)))
    plain = Classifier(same_padding_net(), card, RuntimeOptions(provider="cpu"))
    assert clf.static_sizes == (32,) and plain.static_sizes == ()
    for size in (32, 40):  # 40: the general session
        x = np.random.default_rng(size).normal(size=(2, 3, size, size)).astype(np.float32)
        assert np.array_equal(clf.logits(x), plain.logits(x))
    with pytest.raises(ValueError, match="static sizes"):
        RuntimeOptions(static_sizes=(4,))
