"""The tune / held-out split of a photo folder, and scoring a tuned version only on its held-out half."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from robustness.data import load_dataset, photos_fingerprint, select_split
from service.core.images import half_of
from robustness.document import score_version
from robustness.protocols import ProtocolConfig
from service.core.card import Tune
from service.core.errors import ScoreError
from service.core.repository import ModelRepository
from tests.conftest import make_tiny_onnx, tiny_card

NAMES = [f"n{i // 10:08d}/ILSVRC2012_val_{i:08d}.JPEG" for i in range(200)]


def test_the_split_is_the_parity_of_a_seeded_hash_of_the_path() -> None:
    for name in NAMES[:20]:
        even = int(hashlib.sha256(f"0:{name}".encode()).hexdigest(), 16) % 2 == 0
        assert half_of(name, 0) == ("tune" if even else "holdout")


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_halves_never_overlap_and_cover_everything(seed: int) -> None:
    tune = {n for n in NAMES if half_of(n, seed) == "tune"}
    holdout = {n for n in NAMES if half_of(n, seed) == "holdout"}
    assert not tune & holdout
    assert tune | holdout == set(NAMES)
    assert 70 <= len(tune) <= 130  # a fair coin per photo: 100 +- 30 is over 4 standard deviations


def test_another_seed_gives_another_split() -> None:
    assert [half_of(n, 0) for n in NAMES] != [half_of(n, 1) for n in NAMES]
    assert [half_of(n, 3) for n in NAMES] == [half_of(n, 3) for n in NAMES]


def test_select_split_keeps_indices_and_fingerprints_the_selected_photos(image_folder: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:
    root, labels = image_folder
    whole = load_dataset(root, labels)
    halves = {s: select_split(whole, s, 0) for s in ("tune", "holdout")}
    assert sorted(i.index for h in halves.values() for i in h.items) == list(range(len(whole.items)))
    assert not {i.path for i in halves["tune"].items} & {i.path for i in halves["holdout"].items}
    # the half's fingerprint is that of a folder holding only its photos
    copy = tmp_path / "holdout-only"
    copy.mkdir()
    for item in halves["holdout"].items:
        shutil.copy(root / item.path, copy / item.path)
    rows = [line for line in labels.read_text().splitlines()[1:]
            if line.split(",")[0] in {i.path for i in halves["holdout"].items}]
    (tmp_path / "holdout.csv").write_text("file,class_index,name\n" + "\n".join(rows) + "\n")
    assert load_dataset(copy, tmp_path / "holdout.csv").fingerprint == halves["holdout"].fingerprint
    # --max-images on the whole folder is what it always was
    assert select_split(whole, "all", 0, 3).fingerprint == load_dataset(root, labels, 3).fingerprint
    with pytest.raises(ScoreError, match="unknown split"):
        select_split(whole, "train", 0)


def test_photos_fingerprint_ignores_labels(image_folder: tuple[Path, Path]) -> None:
    root, labels = image_folder
    labelled, bare = load_dataset(root, labels), load_dataset(root)
    assert labelled.fingerprint != bare.fingerprint
    assert photos_fingerprint(labelled.items) == photos_fingerprint(bare.items)


def _tuned_repo(tmp_path: Path, root: Path, split_seed: int = 0) -> ModelRepository:
    """Version 1 untuned, version 2 with a tune record naming the photos of ``root``."""
    repo = ModelRepository(tmp_path / "repo")
    onnx = make_tiny_onnx()
    repo.add("tiny", onnx, tiny_card())
    whole = load_dataset(root)
    tune_half = select_split(whole, "tune", split_seed)
    record = Tune(method="consistency", source_version=1, source_sha256="ab" * 32,
                  data_fingerprint=photos_fingerprint(whole.items), split_seed=split_seed,
                  tune_fingerprint=photos_fingerprint(tune_half.items), tune_images=len(tune_half.items),
                  holdout_images=len(whole.items) - len(tune_half.items), labelled=False, resolution=32, steps=1,
                  batch_size=1, learning_rate=1e-5, loss_start=1.0, loss_end=0.5, wall_seconds=1.0, seed=0,
                  device="cpu")
    repo.add("tiny", onnx, tiny_card(tune=record))
    return repo


CONFIG = ProtocolConfig(protocols=("pan",), policies=("center",), translate_frames=2)


def test_a_tuned_version_is_scored_only_on_its_held_out_half(image_folder: tuple[Path, Path], tmp_path: Path) -> None:
    root, labels = image_folder
    repo = _tuned_repo(tmp_path, root)
    holdout = select_split(load_dataset(root, labels), "holdout", 0)
    assert 0 < len(holdout.items) < 6
    doc, scored = score_version(repo, "tiny", 2, str(root), str(labels), CONFIG, 0, None, split="holdout")
    assert [i.path for i in scored.items] == [i.path for i in holdout.items]
    assert doc["data"]["images"] == len(holdout.items)
    assert doc["data"]["split"] == {"name": "holdout", "seed": 0,
                                    "folder_fingerprint": load_dataset(root, labels).fingerprint}
    assert doc["accuracy"]["center"]["top1"]["n"] == len(holdout.items)
    for split, seed in (("all", None), ("tune", None), ("holdout", 1)):
        with pytest.raises(ScoreError, match="tuned on half of these photos"):
            score_version(repo, "tiny", 2, str(root), str(labels), CONFIG, 0, None, split=split, split_seed=seed)


def test_other_photos_and_untuned_versions_may_be_scored_whole(image_folder: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    root, labels = image_folder
    repo = _tuned_repo(tmp_path, root)
    other = tmp_path / "other"
    shutil.copytree(root, other)
    (other / "img0.png").unlink()
    doc, _ = score_version(repo, "tiny", 2, str(other), None, CONFIG, 0, None)
    assert doc["data"]["images"] == 5 and doc["data"]["split"]["name"] == "all"
    doc, _ = score_version(repo, "tiny", 1, str(root), str(labels), CONFIG, 0, None)
    assert doc["data"]["images"] == 6
    with pytest.raises(ScoreError, match="needs --split-seed"):
        score_version(repo, "tiny", 1, str(root), str(labels), CONFIG, 0, None, split="holdout")
    doc, _ = score_version(repo, "tiny", 1, str(root), str(labels), CONFIG, 0, None, split="holdout", split_seed=0)
    assert doc["data"]["images"] == len(select_split(load_dataset(root), "holdout", 0).items)
