"""Occlusion sensitivity (robustness/explain.py), the report's "why answers flip" section and `steady explain`."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from robustness.explain import (
    CENTRAL_FRACTION,
    OcclusionConfig,
    assemble,
    describe,
    evidence_outside,
    occluded,
    occlusion_map,
    overlay,
    png_bytes,
    top1_overlay,
)
from service.cli import main
from service.core.preprocess import Preprocessor
from service.core.repository import ModelRepository
from service.core.runtime import Classifier
from tests.conftest import TINY_CLASSES, encode, tiny_card

R = 32


def _onnx(nodes: list, inits: dict[str, np.ndarray]) -> bytes:
    """A classifier graph (N,3,H,W) 'input' -> (N,10) 'logits' from nodes and float32 initialisers."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", TINY_CLASSES])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _head(weights: np.ndarray, bias: np.ndarray) -> tuple[list, dict[str, np.ndarray]]:
    """GlobalAveragePool -> Flatten -> Gemm over 3 channels, from node 'features'."""
    from onnx import helper

    nodes = [helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])]
    return nodes, {"w": weights.astype(np.float32), "b": bias.astype(np.float32)}


def quadrant_onnx() -> bytes:
    """Answers from the bottom-right quadrant of a 32-px input only: class 0's logit is the quadrant's mean
    brightness (summed over channels), class 1 a constant 1.5, the rest -10."""
    from onnx import helper

    w = np.zeros((3, TINY_CLASSES))
    w[:, 0] = 1.0
    b = np.full(TINY_CLASSES, -10.0)
    b[0], b[1] = 0.0, 1.5
    head, inits = _head(w, b)
    nodes = [helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["features"])] + head
    inits.update(starts=np.array([16, 16], dtype=np.int64), ends=np.array([32, 32], dtype=np.int64),
                 axes=np.array([2, 3], dtype=np.int64))
    return _onnx(nodes, inits)


def parity_onnx() -> bytes:
    """Reads every other pixel (a 1x1 convolution of stride 2): red on even columns -> class 0, blue -> class 1.
    Striped images flip their answer under every 1-px move, the aliasing Azulay & Weiss describe."""
    from onnx import helper

    w = np.zeros((3, TINY_CLASSES))
    w[0, 0], w[2, 1] = 4.0, 4.0
    head, inits = _head(w, np.where(np.arange(TINY_CLASSES) < 2, 0.0, -10.0))
    nodes = [helper.make_node("Conv", ["input", "k"], ["features"], strides=[2, 2])] + head
    inits["k"] = np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1)
    return _onnx(nodes, inits)


def _bright_quadrant(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (R, R, 3), dtype=np.uint8)
    pixels[16:, 16:] = rng.integers(200, 256, (16, 16, 3), dtype=np.uint8)
    return pixels


@pytest.fixture(scope="module")
def quadrant() -> tuple[Classifier, Preprocessor]:
    card = tiny_card("quadrant", crop_pct=1.0)
    return Classifier(quadrant_onnx(), card), Preprocessor(card)


# ------------------------------------------------------------------ the map
def test_grid_defaults_are_the_paper_scale() -> None:
    g = OcclusionConfig().grid(224)
    assert (g.size, g.stride, g.rows, g.cols, g.origin, g.evaluations) == (32, 16, 13, 13, 0, 170)
    assert g.cell_box(12, 12) == (192, 192, 224, 224)
    g = OcclusionConfig().grid(260)  # 37 px square, stride 19: 12 x 12, centred (7 px margin)
    assert (g.size, g.stride, g.rows, g.origin) == (37, 19, 12, 7)
    assert g.cell_box(11, 11)[2] == 260 - 7
    g = OcclusionConfig().grid(R)
    assert (g.size, g.stride, g.rows) == (5, 2, 14)
    for bad in ({"size": 0}, {"stride": -1}, {"size": True}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            OcclusionConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="larger than"):
        OcclusionConfig(size=33).grid(R)
    with pytest.raises(ValueError, match="at most 1024"):
        OcclusionConfig(size=1, stride=1).grid(64)


def test_occluder_is_the_card_mean_colour_on_the_square_only() -> None:
    grid = OcclusionConfig(size=4, stride=4).grid(8)
    pixels = np.full((8, 8, 3), 9, dtype=np.uint8)
    out = occluded(pixels, grid, (127.4, 116.6, 104.0), [0, 3])
    assert out.shape == (2, 8, 8, 3)
    assert (out[0, :4, :4] == [127, 117, 104]).all() and (out[0, 4:] == 9).all() and (out[0, :, 4:] == 9).all()
    assert (out[1, 4:, 4:] == [127, 117, 104]).all() and (out[1, :4] == 9).all()
    assert (pixels == 9).all()  # the view itself is untouched


def test_strongest_drop_lies_in_the_quadrant_the_model_reads(quadrant: tuple[Classifier, Preprocessor]) -> None:
    clf, pre = quadrant
    omap = occlusion_map(clf, pre, _bright_quadrant())
    g = omap.grid
    assert omap.answer == 0 and omap.classes == (0,)
    drop = omap.drop()
    row, col = omap.evidence()
    x0, y0, _, _ = g.cell_box(row, col)
    assert x0 >= 16 and y0 >= 16, (row, col)  # the whole square lies in the quadrant the model reads
    assert drop[row, col] > 0.02
    outside = np.array([[g.cell_box(r, c)[2] <= 16 or g.cell_box(r, c)[3] <= 16 for c in range(g.cols)]
                        for r in range(g.rows)])
    assert outside.sum() > 100  # most positions cannot touch the quadrant...
    assert np.abs(drop[outside]).max() < 1e-6  # ...and hiding them changes nothing
    assert drop[~outside].min() > -1e-6 and (drop[~outside] > 1e-3).sum() >= 36


def test_top1_under_occlusion_is_the_paper_second_map(quadrant: tuple[Classifier, Preprocessor]) -> None:
    clf, pre = quadrant
    omap = occlusion_map(clf, pre, _bright_quadrant(), OcclusionConfig(size=16, stride=16), classes=[1])
    assert (omap.grid.rows, omap.grid.cols) == (2, 2)
    # hiding the whole quadrant takes class 0's evidence away: the constant class 1 wins there only
    assert omap.top1.tolist() == [[0, 0], [0, 1]]
    assert omap.classes == (1,) and omap.drop(0)[1, 1] < -0.3  # class 1 gains where the quadrant is hidden
    doc = describe(omap, pre.card.labels, pre.background)
    assert doc["prediction"]["index"] == 0 and doc["class"]["index"] == 1
    assert doc["grid"]["evaluations"] == 5 and doc["grid"]["fill"] == [127, 127, 127]
    assert doc["top1"] == [[0, 0], [0, 1]] and set(doc["labels"]) == {"0", "1"}
    assert np.array(doc["probability"]).shape == (2, 2)


def test_maps_are_deterministic(quadrant: tuple[Classifier, Preprocessor]) -> None:
    clf, pre = quadrant
    pixels = _bright_quadrant(3)
    a = occlusion_map(clf, pre, pixels)
    b = occlusion_map(clf, pre, pixels)
    assert np.array_equal(a.probs, b.probs) and np.array_equal(a.base, b.base)
    c = occlusion_map(clf, pre, pixels, OcclusionConfig(batch_size=7))  # other batch boundaries
    np.testing.assert_allclose(c.probs, a.probs, rtol=0, atol=1e-6)


def test_evidence_outside_the_object_or_the_central_crop() -> None:
    grid = OcclusionConfig(size=4, stride=4).grid(R)  # 8 x 8 cells

    def with_drop_at(cell: int) -> object:
        logits = np.zeros((grid.cells, TINY_CLASSES))
        logits[:, 0] = 3.0
        logits[cell, 0] = 0.0
        base = np.zeros(TINY_CLASSES)
        base[0] = 3.0
        return assemble(grid, base, logits)

    textured = np.random.default_rng(0).integers(0, 256, (R, R, 3), dtype=np.uint8)
    outside, kind, region = evidence_outside(textured, with_drop_at(0), 0)  # corner square, no object found
    half = CENTRAL_FRACTION * R / 2
    assert (outside, kind, region) == (True, "central", (16 - half, 16 - half, 16 + half, 16 + half))
    assert evidence_outside(textured, with_drop_at(3 * 8 + 3), 0)[0] is False  # centred at (14, 14)
    flat = np.full((R, R, 3), 127, dtype=np.uint8)
    flat[2:10, 2:10] = (200, 30, 30)  # an object in the top-left corner
    outside, kind, region = evidence_outside(flat, with_drop_at(0), 0)
    assert (outside, kind, region) == (False, "object", (2.0, 2.0, 10.0, 10.0))
    assert evidence_outside(flat, with_drop_at(3 * 8 + 3), 0)[0] is True  # the centre is background here


def test_overlays_have_a_colour_scale_and_are_png(quadrant: tuple[Classifier, Preprocessor]) -> None:
    clf, pre = quadrant
    pixels = _bright_quadrant()
    omap = occlusion_map(clf, pre, pixels)
    picture = overlay(pixels, omap.probability[0], omap.grid, scale=4)
    assert picture.dtype == np.uint8 and picture.shape[0] == 4 * R and picture.shape[1] > 4 * R + 10
    bar = picture[:, 4 * R + 3:4 * R + 3 + 6]
    assert not np.array_equal(bar[0], bar[-1])  # the scale runs from one colour to another
    heat = overlay(pixels, np.ones_like(omap.probability[0]), omap.grid)[:, :R]
    cold = overlay(pixels, np.zeros_like(omap.probability[0]), omap.grid)[:, :R]
    assert heat.astype(int).sum() > cold.astype(int).sum()  # viridis: 1 is bright yellow, 0 dark purple
    labels = top1_overlay(pixels, omap, (0, 1))
    assert labels.shape == (R, R, 3)
    decoded = Image.open(io.BytesIO(png_bytes(picture)))
    assert decoded.format == "PNG" and decoded.size == (picture.shape[1], picture.shape[0])


# ------------------------------------------------------------------ the report step
def _stripes(colours: tuple[tuple[int, int, int], tuple[int, int, int]]) -> np.ndarray:
    pixels = np.empty((R, R, 3), dtype=np.uint8)
    pixels[:, 0::2] = colours[0]
    pixels[:, 1::2] = colours[1]
    return pixels


@pytest.fixture()
def striped(tmp_path: Path) -> tuple[ModelRepository, Path]:
    """The parity model and four photos: three striped red/blue (they flip), one flat grey (it does not)."""
    repo = ModelRepository(tmp_path / "repo")
    repo.add("parity", parity_onnx(), tiny_card("parity", crop_pct=1.0))
    data = tmp_path / "data"
    data.mkdir()
    red, blue = (250, 0, 0), (0, 0, 250)
    Image.fromarray(_stripes((red, blue))).save(data / "a_stripes.png")
    Image.fromarray(_stripes((blue, red))).save(data / "b_stripes.png")
    Image.fromarray(np.full((R, R, 3), 127, dtype=np.uint8)).save(data / "c_flat.png")
    Image.fromarray(_stripes((red, (0, 0, 200)))).save(data / "d_stripes.png")
    return repo, data


class _Tags(HTMLParser):
    """Start tags with their attributes and the text inside each explain table cell, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.section = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "h2":
            self.section = a.get("id") == "why-flips"
        if self.section:
            self.tags.append((tag, a))


def test_report_shows_both_views_of_the_worst_flips_with_their_maps(
        striped: tuple[ModelRepository, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo, data = striped
    out = tmp_path / "out"
    code = main(["score", "--repo", str(repo.root), "parity", "--data", str(data), "--out", str(out),
                 "--protocols", "pan", "--translate-frames", "3", "--no-progress", "--explain", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "3 of 4 photos flip" in printed
    doc = json.loads((out / "robustness.json").read_text())
    expl = json.loads((out / "explanations.json").read_text())
    chosen = doc["chosen"]["policy"]
    pan = doc["protocols"]["pan"][chosen]["p_change"]
    # the scan finds exactly the disagreeing pairs pan.p_change counted for the served policy
    assert expl["flipping_pairs"] == round(pan["value"] * pan["n"]) == 3 * 8
    assert (expl["scanned"], expl["flip_prone"], expl["explained"]) == (4, 3, 2)
    assert expl["grid"]["evaluations"] == 197 and expl["evaluations"] == 4 * 9 + 2 * 2 * 197
    assert [p["file"] for p in expl["photos"]] == ["a_stripes.png", "b_stripes.png"]  # ties: dataset order
    for photo in expl["photos"]:
        assert sorted(photo["classes"]) == [0, 1] and photo["flipping_pairs"] == 8
        assert [v["answer"]["index"] for v in photo["views"]] == photo["classes"]
        assert photo["views"][1]["offset"] == [photo["views"][0]["offset"][0] + 1] * 2
    assert expl["evidence_outside"]["n"] == 2

    html = (out / "report.html").read_text()
    parser = _Tags()
    parser.feed(html)
    tags = parser.tags
    assert tags and tags[0] == ("h2", {"id": "why-flips"})
    tables = [a for t, a in tags if t == "table"]
    assert tables == [{"class": "explain"}]
    rows = [a for t, a in tags if t == "tr" and a.get("class") == "explain-view"]
    assert len(rows) == 2 * 2  # two views per explained photo
    maps = [a for t, a in tags if t == "img"]
    assert len(maps) == 4 * 4  # per view: the input, p(first answer), p(second answer), top-1 under occlusion
    for a in maps:
        assert a["class"] == "explain-map" and a["src"].startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(a["src"].split(",", 1)[1])))
        assert img.format == "PNG" and img.size[1] == R * 7  # small images at a common scale (7x the 32-px view)
    alts = [a["alt"] for a in maps]
    assert sum("p(class_0) under occlusion" in x for x in alts) == 4 and sum("p(class_1)" in x for x in alts) == 4
    assert sum(x.endswith("top-1 under occlusion") for x in alts) == 4
    section = html.split("id='why-flips'")[1]
    answers = [cell.split("<")[0] for cell in section.split("class='explain-answer'>")[1:]]
    assert len(answers) == 4 and answers[0] != answers[1] and answers[2] != answers[3]  # each pair disagrees
    assert "class='explain-summary'" in section and "n=2" in section


def test_report_without_flips_says_so(tiny_repo: ModelRepository, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(np.full((40, 40, 3), 90, dtype=np.uint8)).save(data / "flat.png")
    assert main(["score", "--repo", str(tiny_repo.root), "tiny", "--data", str(data), "--out", str(tmp_path / "o"),
                 "--protocols", "pan", "--translate-frames", "3", "--no-progress"]) == 0
    assert "0 of 1 photos flip" in capsys.readouterr().out
    html = (tmp_path / "o" / "report.html").read_text()
    assert "id='why-flips'" in html and "nothing to explain" in html and "class='explain'" not in html
    assert main(["score", "--repo", str(tiny_repo.root), "tiny", "--data", str(data), "--explain", "-1",
                 "--no-progress"]) == 2


# ------------------------------------------------------------------ steady explain
def test_cli_explain_json_png_and_the_served_resolution(quadrant: tuple[Classifier, Preprocessor], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    repo = ModelRepository(tmp_path / "repo")
    repo.add("quadrant", quadrant_onnx(), tiny_card("quadrant", crop_pct=1.0))
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode(_bright_quadrant(), "PNG"))
    png = tmp_path / "map.png"
    assert main(["explain", "--repo", str(repo.root), "quadrant", str(photo), "--json", "--out", str(png)]) == 0
    doc = json.loads(capsys.readouterr().out)
    clf, pre = quadrant
    expected = occlusion_map(clf, pre, _bright_quadrant())
    assert (doc["model"], doc["version"], doc["prediction"]["index"]) == ("quadrant", 1, 0)
    assert doc["preprocess"] == {"policy": "center", "resolution": R, "box": [0.0, 0.0, 32.0, 32.0]}
    np.testing.assert_allclose(doc["probability"], expected.probability[0], atol=1e-6)
    assert doc["evidence"]["row"] == expected.evidence()[0] and doc["evidence"]["box"][0] >= 16
    assert Image.open(png).format == "PNG"
    assert main(["explain", "--repo", str(repo.root), "quadrant", str(photo), "--size", "16", "--stride", "16",
                 "--class", "1"]) == 0
    text = capsys.readouterr().out
    assert "2x2 positions, 5 evaluations" in text and "evidence for 1 class_1" in text
    # a bound robustness.json's choice is what is explained, as the service serves it
    vdir = repo.version_dir("quadrant", 1)
    vdir.chmod(0o755)
    (vdir / "robustness.json").write_text(json.dumps({"model_sha256": repo.verify("quadrant", 1),
                                                      "chosen": {"policy": "center", "resolution": 48}}))
    assert main(["explain", "--repo", str(repo.root), "quadrant", str(photo), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["preprocess"]["resolution"] == 48 and doc["grid"]["size"] == 7  # round(32 * 48 / 224)
    assert main(["explain", "--repo", str(repo.root), "quadrant", str(photo), "--class", "10"]) == 2
    assert main(["explain", "--repo", str(repo.root), "quadrant", str(photo), "--size", "99"]) == 2
