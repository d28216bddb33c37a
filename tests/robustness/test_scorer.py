"""`steady score` on the tiny model: schema, determinism, labels, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from robustness.data import load_dataset
from robustness.protocols import ProtocolConfig
from robustness.schema import SUMMARY_KEYS, validate
from robustness.scorer import shard
from service.cli import main
from service.core.repository import ModelRepository

FAST = ["--translate-frames", "3", "--zoom-range", "0.9", "1.1", "--no-progress"]


def _score(capsys: pytest.CaptureFixture[str], repo: ModelRepository, data: Path, *extra: str) -> dict:
    code = main(["score", "--repo", str(repo.root), "tiny", "--data", str(data), "--json", *FAST, *extra])
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_score_writes_schema_bound_to_sha_and_data(tiny_repo: ModelRepository, image_folder: tuple[Path, Path],
                                                   capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data, labels = image_folder
    doc = _score(capsys, tiny_repo, data, "--labels", str(labels), "--out", str(tmp_path / "out"))
    validate(doc)
    stored = json.loads((tiny_repo.version_dir("tiny", 1) / "robustness.json").read_text())
    assert stored["model_sha256"] == tiny_repo.verify("tiny", 1) == doc["model_sha256"]
    assert stored["data"]["fingerprint"] == load_dataset(data, labels).fingerprint
    assert set(doc["summary"]) == set(SUMMARY_KEYS)
    assert all(isinstance(v, float) for v in doc["summary"].values())
    for protocol in ("pan", "scale", "embed", "consistency", "resolution"):
        assert set(doc["protocols"][protocol]) == {"center", "object"}
    sizes = doc["protocols"]["embed"]["center"]["sizes"]
    assert [s["size"] for s in sizes] == [0.4, 0.5, 0.7, 1.0]
    assert set(sizes[1]["p_change"]) == {"value", "ci95", "n"}
    assert sizes[1]["p_change"]["n"] == 6 * 2  # 6 images x 2 positions
    assert doc["protocols"]["pan"]["center"]["p_change"]["n"] == 6 * 8  # A&W: 8 pairs per image
    # the localiser follows the pasted object pixel for pixel: the object policy's view does not change
    for row in doc["protocols"]["embed"]["object"]["sizes"][:3]:
        assert row["p_change"]["value"] == 0.0
    assert set(doc["chosen"]) >= {"policy", "resolution", "rule"}
    html = (tmp_path / "out" / "report.html").read_text()
    assert "data:image/png;base64," in html and "Azulay" in html
    assert "<script" not in html and "http" not in html.split("<body>")[1].split("Anchors")[0]


def test_score_is_deterministic_per_seed(tiny_repo: ModelRepository, image_folder: tuple[Path, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    data, labels = image_folder
    a = _score(capsys, tiny_repo, data, "--labels", str(labels), "--seed", "3")
    b = _score(capsys, tiny_repo, data, "--labels", str(labels), "--seed", "3")
    for doc in (a, b):
        doc.pop("timing"), doc.pop("created")
    assert a == b


def test_unlabelled_summary_has_no_accuracy_and_a_subset_of_protocols(
        tiny_repo: ModelRepository, image_folder: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    data, _ = image_folder
    doc = _score(capsys, tiny_repo, data, "--protocols", "pan,embed", "--policies", "center")
    assert set(doc["summary"]) == {"pan.p_change", "pan.mac", "pan.flip_probability", "pan.p_change_vertical",
                                   "embed@0.4.p_change", "embed@0.5.p_change", "embed@0.7.p_change",
                                   "compute.per_answer"}
    assert set(doc["protocols"]) == {"pan", "embed"}
    assert doc["chosen"]["policy"] == "center" and doc["chosen"]["labelled"] is False


def test_score_errors_exit_2(tiny_repo: ModelRepository, tmp_path: Path, image_folder: tuple[Path, Path],
                             capsys: pytest.CaptureFixture[str]) -> None:
    data, _ = image_folder
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["score", "--repo", str(tiny_repo.root), "tiny", "--data", str(empty), "--no-progress"]) == 2
    assert main(["score", "--repo", str(tiny_repo.root), "tiny", "--data", str(data), "--protocols", "spin",
                 "--no-progress"]) == 2
    assert "spin" in capsys.readouterr().err


def test_class_folder_labels(tmp_path: Path, image_folder: tuple[Path, Path]) -> None:
    data, _ = image_folder
    root = tmp_path / "folders"
    for i, f in enumerate(sorted(data.iterdir())):
        (root / f"n0{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"n0{i % 2}" / f.name).write_bytes(f.read_bytes())
    ds = load_dataset(root)
    assert ds.labelled and [it.label for it in ds.items] == [0, 0, 0, 1, 1, 1]


def test_config_validation_and_sequences() -> None:
    cfg = ProtocolConfig()
    assert len(cfg.zooms) == 31 and cfg.zooms[0] == 0.4 and cfg.zooms[-1] == 1.15  # ImageNet-P scale
    assert cfg.translate_offsets == (-4, -3, -2, -1, 0, 1, 2, 3, 4)
    with pytest.raises(ValueError, match="unknown protocols"):
        ProtocolConfig(protocols=("pan", "tilt"))
    with pytest.raises(ValueError, match="0.95 and 1.05"):
        ProtocolConfig(zoom_start=0.97)


def test_shards_cover_items_in_order() -> None:
    items = list(range(10))
    parts = shard(items, 3)  # type: ignore[arg-type]
    assert [x for p in parts for x in p] == items and len(parts) == 3


def test_overlapped_and_serial_scoring_give_the_same_records(tiny_repo: ModelRepository,
                                                             image_folder: tuple[Path, Path]) -> None:
    from robustness.scorer import ScoreOptions, score_items

    data, labels = image_folder
    loaded = tiny_repo.load("tiny", 1)
    ds = load_dataset(data, labels)
    cfg = ProtocolConfig(translate_frames=3, zoom_start=0.9, zoom_stop=1.1)
    a, _ = score_items(loaded.onnx_bytes, loaded.card, ds.root, ds.items, cfg, 1, ScoreOptions(overlap=True))
    b, _ = score_items(loaded.onnx_bytes, loaded.card, ds.root, ds.items, cfg, 1,
                       ScoreOptions(overlap=False, batch_size=7, chunk_images=3))
    assert a == b and [r["index"] for r in a] == list(range(6))


def test_a_decode_error_in_the_producer_surfaces(tiny_repo: ModelRepository, image_folder: tuple[Path, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    data, _ = image_folder
    (data / "broken.png").write_bytes(b"not an image")
    assert main(["score", "--repo", str(tiny_repo.root), "tiny", "--data", str(data), "--no-progress"]) == 2
    assert "decode" in capsys.readouterr().err


@pytest.mark.parametrize("net", ["tiny", "same-padding"])
def test_shared_views_and_renderer_give_the_unoptimised_records(tiny_repo: ModelRepository,
                                                               image_folder: tuple[Path, Path],
                                                               coffee: np.ndarray, chelsea: np.ndarray,
                                                               net: str) -> None:
    """Every optimisation of the scorer (a view asked for twice is evaluated once, embed canvases drawn
    twice are one, the Renderer shares resampling passes, the localiser analyses frames through it) keeps
    every record identical to the unoptimised path, which evaluates every request on its own with
    plain ``render`` calls on the stored graph; and it really evaluates fewer views. ``same-padding``: a
    graph with TF-"SAME" pad arithmetic, which the scorer runs specialised per resolution."""
    from PIL import Image

    from robustness.scorer import ScoreOptions, score_items

    data, labels = image_folder
    Image.fromarray(coffee).save(data / "coffee.jpg", quality=90)
    Image.fromarray(chelsea).save(data / "chelsea.jpg", quality=90)
    with labels.open("a") as f:
        f.write("coffee.jpg,7,espresso\nchelsea.jpg,3,cat\n")
    if net == "same-padding":
        from tests.conftest import make_same_padding_onnx, tiny_card

        tiny_repo.add("tiny", make_same_padding_onnx(), tiny_card(labels=tuple("abcd")))
    loaded = tiny_repo.load("tiny", 1 if net == "tiny" else 2)
    ds = load_dataset(data, labels)
    cfg = ProtocolConfig(translate_frames=5, zoom_start=0.4, zoom_stop=1.1, zoom_step=0.05,
                         ensembles=("knight5@0.5", "knight5@0.9"))
    fast, t_fast = score_items(loaded.onnx_bytes, loaded.card, ds.root, ds.items, cfg, 2, ScoreOptions(overlap=False))
    plain, t_plain = score_items(loaded.onnx_bytes, loaded.card, ds.root, ds.items, cfg, 2,
                                 ScoreOptions(overlap=False, share=False))
    assert len(fast) == 8 and fast == plain
    assert any(r["remedies"]["center+knight5@0.5"]["used"][0] > 0 for r in fast)  # the second stage ran
    assert t_fast["evaluations"] < 0.75 * t_plain["evaluations"]

def _photo_folder(tmp_path: Path) -> Path:
    from skimage import data as skdata

    from tests.conftest import encode

    folder = tmp_path / "photos"
    folder.mkdir()
    for name, arr in (("coffee", skdata.coffee()), ("chelsea", skdata.chelsea()), ("rocket", skdata.rocket())):
        (folder / f"{name}.jpg").write_bytes(encode(arr, "JPEG", quality=90))
    (folder / "flat.png").write_bytes(encode(np.full((60, 80, 3), 90, np.uint8), "PNG"))  # routed to Pillow
    return folder


def test_every_protocol_view_through_dali_matches_pillow(tmp_path: Path) -> None:
    """The scorer's views (shifts, zooms, embed canvases, the resolution sweep; both policies) rendered by the GPU
    path's DALI pipeline (CPU backend) equal Pillow's within the contract's tolerance."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed: pip install -e '.[test]' brings it")
    from robustness.protocols import plan_image
    from robustness.scorer import _batches
    from service.core.gpu_preprocess import DaliPreprocessor
    from service.core.preprocess import Preprocessor
    from tests.conftest import tiny_card

    card = tiny_card(train_resolution=64, interpolation="bicubic")
    dali = DaliPreprocessor(card, device="cpu", max_batch=32)
    pillow = Preprocessor(card, reduced_decode=False)
    config = ProtocolConfig(translate_frames=3, zoom_start=0.9, zoom_stop=1.1)
    views = 0
    for path in sorted(_photo_folder(tmp_path).iterdir()):
        img = dali.decode(path.read_bytes())
        np.testing.assert_array_equal(np.asarray(img), np.asarray(pillow.decode(path.read_bytes())))
        plans = [plan_image(img, card, config, 0, np.random.default_rng([0, 0]))]
        for (entries, ours), (_, theirs) in zip(_batches(plans, card, 32, dali.render), _batches(plans, card, 32)):
            assert np.abs(ours - theirs).max() * 128 <= 3.0, path.name
            views += len(entries)
    assert views > 4 * 60


def test_score_runs_on_the_gpu_paths_pipeline(tiny_repo: ModelRepository, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed: pip install -e '.[test]' brings it")
    folder = _photo_folder(tmp_path)
    cpu = _score(capsys, tiny_repo, folder)
    dali = _score(capsys, tiny_repo, folder, "--preprocess-device", "dali-cpu")
    validate(dali)
    assert (cpu["preprocess"]["device"], dali["preprocess"]["device"]) == ("cpu", "dali-cpu")
    assert dali["summary"].keys() == cpu["summary"].keys()
    assert dali["timing"]["evaluations"] == cpu["timing"]["evaluations"]  # the same views, rendered elsewhere
