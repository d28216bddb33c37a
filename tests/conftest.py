"""Fixtures shared by every test tier: a tiny real ONNX classifier, real images, a repository."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.core.card import ModelCard, Source
from service.core.repository import ModelRepository

TINY_CLASSES = 10
BACKGROUND = (124.0, 116.0, 104.0)  # a mean colour for decode/render calls outside a card


def make_tiny_onnx(num_classes: int = TINY_CLASSES, seed: int = 0) -> bytes:
    """A real ONNX classifier (N,3,H,W) -> (N,num_classes): colour statistics through a linear layer.

    Dynamic batch, height and width, like Steady's exports.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 1, (16, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 1, (16, num_classes)).astype(np.float32)
    b2 = rng.normal(0, 0.1, (num_classes,)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["p1"]),
        helper.make_node("Flatten", ["p1"], ["f1"]),
        helper.make_node("Gemm", ["f1", "w2", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b2, "b2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_same_padding_onnx() -> bytes:
    """A stride-1 Conv + ReLU6, then TF-"SAME" padding computed from Shape at run time (as timm's
    EfficientNet-Lite exports it), a stride-2 Conv, ReLU6 (Clip), average pooling and a linear layer:
    (N, 3, H, W) -> (N, 4)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    w0 = rng.normal(0, 0.5, (3, 3, 3, 3)).astype(np.float32)
    w1 = rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32)
    w2 = rng.normal(0, 1, (8, 4)).astype(np.float32)
    b2 = rng.normal(0, 0.1, (4,)).astype(np.float32)
    c = {"two": np.array(2.0, np.float32), "k": np.array(3.0, np.float32), "one": np.array(1.0, np.float32),
         "zero": np.array(0.0, np.float32), "idx2": np.array([2], np.int64), "idx3": np.array([3], np.int64),
         "zeros2": np.zeros(2, np.int64), "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
    nodes = [
        helper.make_node("Shape", ["input"], ["shape"]),
        helper.make_node("Gather", ["shape", "idx2"], ["h_i"]),
        helper.make_node("Gather", ["shape", "idx3"], ["w_i"]),
    ]
    for axis in ("h", "w"):  # pad = max((ceil(x / 2) - 1) * 2 + 3 - x, 0); before = pad // 2, after = pad - before
        nodes += [
            helper.make_node("Cast", [f"{axis}_i"], [f"{axis}_f"], to=TensorProto.FLOAT),
            helper.make_node("Div", [f"{axis}_f", "two"], [f"{axis}_half"]),
            helper.make_node("Ceil", [f"{axis}_half"], [f"{axis}_ceil"]),
            helper.make_node("Sub", [f"{axis}_ceil", "one"], [f"{axis}_m1"]),
            helper.make_node("Mul", [f"{axis}_m1", "two"], [f"{axis}_m2"]),
            helper.make_node("Add", [f"{axis}_m2", "k"], [f"{axis}_span"]),
            helper.make_node("Sub", [f"{axis}_span", f"{axis}_f"], [f"{axis}_raw"]),
            helper.make_node("Max", [f"{axis}_raw", "zero"], [f"{axis}_pad"]),
            helper.make_node("Div", [f"{axis}_pad", "two"], [f"{axis}_b0"]),
            helper.make_node("Floor", [f"{axis}_b0"], [f"{axis}_before_f"]),
            helper.make_node("Sub", [f"{axis}_pad", f"{axis}_before_f"], [f"{axis}_after_f"]),
            helper.make_node("Cast", [f"{axis}_before_f"], [f"{axis}_before"], to=TensorProto.INT64),
            helper.make_node("Cast", [f"{axis}_after_f"], [f"{axis}_after"], to=TensorProto.INT64),
        ]
    nodes += [
        helper.make_node("Concat", ["zeros2", "h_before", "w_before", "zeros2", "h_after", "w_after"], ["pads"], axis=0),
        helper.make_node("Conv", ["input", "w0"], ["c0"], pads=[1, 1, 1, 1]),  # a stride-1 layer first
        helper.make_node("Clip", ["c0", "lo", "hi"], ["r0"]),
        helper.make_node("Pad", ["r0", "pads"], ["padded"], mode="constant"),
        helper.make_node("Conv", ["padded", "w1"], ["c1"], strides=[2, 2]),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["p1"]),
        helper.make_node("Flatten", ["p1"], ["f1"]),
        helper.make_node("Gemm", ["f1", "w2", "b2"], ["logits"]),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in c.items()]
    inits += [numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
              numpy_helper.from_array(b2, "b2")]
    for k, node in enumerate(nodes):
        node.name = f"{node.op_type.lower()}_{k}"
    graph = helper.make_graph(nodes, "same", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                           ["batch", 3, "height", "width"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def tiny_card(name: str = "tiny", **overrides: object) -> ModelCard:
    fields: dict[str, object] = dict(
        name=name,
        labels=tuple(f"class_{i}" for i in range(TINY_CLASSES)),
        train_resolution=32,
        crop_pct=0.875,
        interpolation="bilinear",
        mean=(127.0, 127.0, 127.0),
        std=(128.0, 128.0, 128.0),
        source=Source(kind="onnx", architecture="tiny-test"),
    )
    fields.update(overrides)
    return ModelCard(**fields)  # type: ignore[arg-type]


def encode(img: Image.Image | np.ndarray, fmt: str = "JPEG", **params: object) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_onnx() -> bytes:
    return make_tiny_onnx()


@pytest.fixture()
def tiny_repo(tmp_path: Path, tiny_onnx: bytes) -> ModelRepository:
    """A repository holding model ``tiny`` at version 1."""
    repo = ModelRepository(tmp_path / "repo")
    repo.add("tiny", tiny_onnx, tiny_card())
    return repo


@pytest.fixture(scope="session")
def coffee() -> np.ndarray:
    """skimage's coffee photo (400x600 RGB): lite0 says 967 espresso."""
    from skimage import data

    return data.coffee()


@pytest.fixture(scope="session")
def chelsea() -> np.ndarray:
    """skimage's cat photo (300x451 RGB)."""
    from skimage import data

    return data.chelsea()


@pytest.fixture(scope="session")
def coffee_jpeg(coffee: np.ndarray) -> bytes:
    return encode(coffee, "JPEG", quality=92)


@pytest.fixture(scope="session")
def lite0_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelRepository, str]:
    """efficientnet-lite0 exported once per session by ``steady export``: ``(repository, model name)``.

    Version 1 of ``efficientnet-lite0`` in a fresh repository; tests may add stages or
    versions but should not rely on another test's changes. Skipped only without torch.
    """
    pytest.importorskip("torch", reason="exporting efficientnet-lite0 needs torch (the 'export' extra)")
    import contextlib

    from service.cli import main

    root = tmp_path_factory.mktemp("lite0-repo")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the real command: steady export efficientnet-lite0 --repo ROOT
        code = main(["export", "efficientnet-lite0", "--repo", str(root)])
    if code != 0:
        pytest.fail(f"steady export efficientnet-lite0 failed with exit code {code}")
    name, _, version = out.getvalue().strip().partition("/")
    assert version == "1", out.getvalue()
    return ModelRepository(root), name


# The session's one real Ray Serve (defined in tests/serving.py so every folder shares one instance).
from tests.serving import service  # noqa: E402,F401  (fixture registration)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Soak tests run only when a ``-m`` expression names them (``make soak``): never in the default run."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    soak = [item for item in items if item.get_closest_marker("soak")]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]
