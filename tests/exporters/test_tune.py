"""``steady tune``: a new version with its tune record, refusals, determinism, the losses, the view pool."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from exporters.module_export import export_module  # noqa: E402
from exporters.rebuild import rebuild_module  # noqa: E402
from exporters.sources import ExportOptions, export_source  # noqa: E402
from exporters.tune import TuneConfig, fixres_resolution, tune_module, tune_version  # noqa: E402
from exporters.tune_train import _js, _kl, _prefix, _suffix, train  # noqa: E402
from exporters.tune_views import ENSEMBLE_OFFSETS, TunePhotos, ViewSpec, ensemble_answers  # noqa: E402
from robustness.data import load_dataset, photos_fingerprint, select_split  # noqa: E402
from service.cli import main  # noqa: E402
from service.core.errors import ExportError  # noqa: E402
from service.core.repository import ModelRepository, atomic_write_json, sha256_file  # noqa: E402
from tests.conftest import make_tiny_onnx, tiny_card  # noqa: E402
from tests.exporters.small_models import make_small_net, small_card  # noqa: E402


@pytest.fixture()
def photos(tmp_path: Path) -> tuple[Path, Path]:
    """Ten generated photos (textures and blobs in four colours) with a labels CSV of four classes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    root.mkdir()
    rows = ["file,class_index"]
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    for i in range(10):
        h, w = 80 + 4 * i, 100 + 6 * i
        arr = rng.integers(0, 80, (h, w, 3)).astype(np.uint8)
        y, x = rng.integers(5, 30, size=2)
        arr[y:y + 40, x:x + 50] = colours[i % 4]
        Image.fromarray(arr).save(root / f"p{i}.png")
        rows.append(f"p{i}.png,{i % 4}")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return root, labels


@pytest.fixture()
def small_repo(tmp_path: Path) -> tuple[ModelRepository, Any, Any]:
    """SmallNet exported as version 1: ``(repo, module, stored card)``."""
    repo = ModelRepository(tmp_path / "repo")
    net = make_small_net()
    card = export_module(net, small_card(), repo)
    return repo, net, card


FAST = dict(steps=6, batch_size=4, pool_views=3, device="cpu")


def test_tune_module_stores_a_new_version_with_its_tune_record(small_repo: tuple, photos: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    repo, net, card = small_repo
    root, labels = photos
    saved = tmp_path / "tuned.pth"
    config = TuneConfig(method="fixres", resolution=80, lr=1e-2, **FAST)
    new = tune_module(net, card, repo, root, config, labels, save_weights=saved)
    assert (new.name, new.version) == ("small", 2)
    assert new.test_resolution == 80 and new.train_resolution == 64
    assert new.parity is not None and new.parity.resolutions == (80, 70, 104)
    tune = new.tune
    assert tune is not None
    whole = load_dataset(root)
    tune_half = select_split(whole, "tune", 0)
    assert (tune.method, tune.source_version, tune.source_sha256) == ("fixres", 1, card.onnx_sha256)
    assert tune.data_fingerprint == photos_fingerprint(whole.items)
    assert tune.tune_fingerprint == photos_fingerprint(tune_half.items)
    assert (tune.tune_images, tune.holdout_images) == (len(tune_half.items), 10 - len(tune_half.items))
    assert tune.labelled and tune.resolution == 80 and tune.steps == 6 and tune.learning_rate == 1e-2
    assert np.isfinite([tune.loss_start, tune.loss_end]).all() and tune.wall_seconds > 0
    assert tune.recipe["resolution_from"] == "--resolution" and tune.recipe["calibration_views"] == 3 * len(tune_half.items)
    assert new.source.weights_sha256 == sha256_file(saved) != card.source.weights_sha256
    assert repo.load("small", 2).card == new  # verified, immutable, loadable
    # the saved weights are the tuned model: ONNX Runtime on the stored version agrees with them
    again = make_small_net()
    again.load_state_dict(torch.load(saved, weights_only=True))
    from exporters.parity import check_parity
    check_parity(again, repo.load("small", 2).onnx_bytes, new, resolutions=(80,))


def test_consistency_on_a_plain_module_renders_views_every_step(small_repo: tuple, photos: tuple[Path, Path]) -> None:
    repo, net, card = small_repo
    root, _ = photos
    new = tune_module(net, card, repo, root, TuneConfig(method="consistency", loss="ensemble+js", views=2,
                                                        late_fraction=0.5, early_lr_mult=1.0, lr=1e-3, **FAST))
    assert new.tune is not None and new.tune.method == "consistency" and not new.tune.labelled
    recipe = new.tune.recipe
    assert recipe["loss"] == "ensemble+js" and recipe["cached_blocks"] is None
    assert recipe["ensemble_offsets"] == [list(o) for o in ENSEMBLE_OFFSETS]
    assert 0 <= recipe["ensemble_averaged"] <= recipe["pool_views_total"] == 3 * new.tune.tune_images
    assert new.test_resolution == card.test_resolution


def _tuned_weights(net: Any, card: Any, root: Path, seed: int) -> tuple[list[float], dict[str, Any]]:
    module = make_small_net()
    module.load_state_dict(net.state_dict())
    items = select_split(load_dataset(root), "tune", 0).items
    photos = TunePhotos.load(card, root, items, card.resolution)
    teacher = _torch_teacher(net)
    run = train(module, card, photos, teacher, TuneConfig(method="consistency", loss="js", seed=seed,
                                                          early_lr_mult=1.0, lr=1e-3, **FAST))
    return run.losses, {k: v.clone() for k, v in module.state_dict().items()}


def _torch_teacher(net: Any) -> Any:
    def teacher(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.softmax(net(torch.from_numpy(batch)), dim=1).numpy()
    return teacher


def test_tuning_is_deterministic_for_a_seed(small_repo: tuple, photos: tuple[Path, Path]) -> None:
    _, net, card = small_repo
    root, _ = photos
    losses_a, state_a = _tuned_weights(net, card, root, seed=3)
    losses_b, state_b = _tuned_weights(net, card, root, seed=3)
    losses_c, state_c = _tuned_weights(net, card, root, seed=4)
    assert losses_a == losses_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert losses_a != losses_c
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    assert not torch.are_deterministic_algorithms_enabled()  # the global flag is restored


def test_onnx_sources_are_refused_with_a_clear_message(tiny_repo: ModelRepository, photos: tuple[Path, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = photos
    with pytest.raises(ExportError, match="imported from an ONNX file"):
        tune_version(tiny_repo, "tiny", 1, root, None, TuneConfig(**FAST))
    code = main(["tune", "--repo", str(tiny_repo.root), "tiny", "--data", str(root), "--method", "consistency"])
    assert code == 1
    err = capsys.readouterr().err
    assert "steady tune: error:" in err and "no PyTorch module to tune" in err and len(err.strip().splitlines()) == 1


def test_module_sources_and_foreign_modules_are_refused(small_repo: tuple, photos: tuple[Path, Path]) -> None:
    repo, _, card = small_repo
    root, _ = photos
    with pytest.raises(ExportError, match="tune_module"):
        tune_version(repo, "small", 1, root, None, TuneConfig(**FAST))
    with pytest.raises(ExportError, match="not the model of small/1"):
        tune_module(make_small_net(seed=5), card, repo, root, TuneConfig(**FAST))
    with pytest.raises(ExportError, match="stored card"):
        tune_module(make_small_net(), small_card(), repo, root, TuneConfig(**FAST))


@pytest.fixture()
def timm_repo(tmp_path: Path) -> tuple[ModelRepository, Path]:
    """A timm mobilenetv3_small_050 with 4 classes, exported at 64 px from a weights file."""
    torch.manual_seed(0)
    weights = tmp_path / "mv3.pth"
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=4)
    with torch.no_grad():
        model.get_classifier().bias.copy_(torch.linspace(-1.0, 1.0, 4))
    torch.save(model.state_dict(), weights)
    repo = ModelRepository(tmp_path / "repo")
    export_source("timm:mobilenetv3_small_050", repo, ExportOptions(name="mv3", weights=weights, resolution=64))
    return repo, weights


def test_steady_tune_rebuilds_a_timm_version_from_its_weights_file(timm_repo: tuple, photos: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    repo, weights = timm_repo
    root, labels = photos
    card = repo.card("mv3", 1)
    with pytest.raises(ExportError, match="needs --weights FILE"):
        rebuild_module(card)
    other = tmp_path / "other.pth"
    other.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(ExportError, match="pass --weights FILE with the exact weights"):
        rebuild_module(card, other)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["tune", "--repo", str(repo.root), "mv3", "--data", str(root), "--labels", str(labels),
                     "--method", "consistency", "--loss", "js", "--views", "2", "--resolution", "72", "--steps", "3",
                     "--batch-size", "3", "--pool-views", "2", "--early-lr-mult", "1", "--weights", str(weights),
                     "--device", "cpu", "--threads", "1", "--no-progress", "--summary"])
    assert code == 0, out.getvalue()
    lines = out.getvalue().splitlines()
    assert lines[0] == "mv3/2" and "consistency from v1" in lines[1] and "at 72 px on cpu: 3 steps" in lines[1]
    new = repo.load("mv3", 2).card
    assert new.tune is not None and new.tune.source_weights_sha256 == sha256_file(weights)
    assert new.source.kind == "timm" and new.test_resolution == 72
    # a tuned version is not its source's weights file
    with pytest.raises(ExportError, match="tuned version"):
        rebuild_module(new, weights)
    # and it is scored only on its held-out half
    score = ["score", "--repo", str(repo.root), "mv3", "--version", "2", "--data", str(root), "--labels", str(labels),
             "--protocols", "pan", "--policies", "center", "--translate-frames", "2", "--no-progress", "--json"]
    assert main(score) == 2
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(score + ["--split", "holdout"]) == 0
    assert f'"images": {new.tune.holdout_images}' in out.getvalue()


def test_fixres_takes_the_most_accurate_resolution_above_the_card_from_the_sweep(small_repo: tuple) -> None:
    repo, _, card = small_repo
    with pytest.raises(ExportError, match="--resolution N or a FixRes sweep"):
        fixres_resolution(repo, card)
    rows = [{"resolution": r, "accuracy": {"value": a}} for r, a in ((56, 0.9), (64, 0.8), (74, 0.7), (83, 0.75),
                                                                      (96, 0.75))]
    doc = {"model_sha256": card.onnx_sha256, "chosen": {"policy": "center"}, "data": {"images": 50},
           "protocols": {"resolution": {"center": {"resolutions": rows}}}}
    atomic_write_json(repo.version_dir("small", 1) / "robustness.json", doc)
    resolution, why = fixres_resolution(repo, card)
    assert resolution == 83 and "0.750 at 83 px" in why


def test_the_losses() -> None:
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert torch.allclose(_kl(p, p.log()), torch.zeros(2), atol=1e-6)
    q = torch.tensor([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    assert float(_kl(p, q.log())[0]) == pytest.approx(float((p[0] * (p[0] / q[0]).log()).sum()), rel=1e-5)
    same = torch.stack([p.log(), p.log(), p.log()], dim=1)
    assert torch.allclose(_js(same), torch.zeros(2), atol=1e-6)
    mixed = torch.stack([p.log(), q.log()], dim=1)
    m = (p + q) / 2
    expected = 0.5 * ((p * (p / m).log()).sum(1) + (q * (q / m).log()).sum(1))
    assert torch.allclose(_js(mixed), expected, atol=1e-6)


def test_the_cached_prefix_and_the_suffix_make_the_whole_efficientnet() -> None:
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for cut in (0, 4, len(model.blocks)):
            assert torch.allclose(_suffix(model, cut, _prefix(model, cut, x)), model(x), atol=1e-5)


def test_the_adaptive_ensemble_averages_copies_only_where_the_teacher_is_unsure(photos: tuple[Path, Path]) -> None:
    root, _ = photos
    card = small_card()
    photo_set = TunePhotos.load(card, root, load_dataset(root).items[:3], 64)

    def teacher(batch: np.ndarray) -> np.ndarray:  # margin grows with the red channel's mean
        s = batch[:, 0].mean(axis=(1, 2)) * 3
        e = np.exp(np.stack([s, -s, np.zeros_like(s)], axis=1))
        return e / e.sum(axis=1, keepdims=True)

    views = [ViewSpec(0), ViewSpec(1, 2.0, -1.0, 1.05), ViewSpec(2, -3.0, 0.0)]
    bare = teacher(photo_set.render(views))
    top = np.sort(bare, axis=1)
    margin = float(np.median(top[:, -1] - top[:, -2]))
    answers, averaged = ensemble_answers(photo_set, views, teacher, margin)
    for i, view in enumerate(views):
        if top[i, -1] - top[i, -2] < margin:
            copies = [view.moved(dx, dy) for dx, dy in ENSEMBLE_OFFSETS]
            assert np.allclose(answers[i], teacher(photo_set.render(copies)).mean(axis=0), atol=1e-6)
        else:
            assert np.allclose(answers[i], bare[i])
    assert averaged == int((top[:, -1] - top[:, -2] < margin).sum()) == 1


def test_a_moved_view_moves_by_output_pixels_of_the_zoomed_view(photos: tuple[Path, Path]) -> None:
    root, _ = photos
    photo_set = TunePhotos.load(small_card(), root, load_dataset(root).items[:1], 64)
    view = ViewSpec(0, 1.0, 2.0, 1.25)
    a, b = photo_set.box(view), photo_set.box(view.moved(2, -1))
    assert (b.x0 - a.x0, b.y0 - a.y0) == pytest.approx((2 * a.width / 64, -a.height / 64))
    assert b.width == pytest.approx(a.width)


@pytest.mark.slow
def test_tuning_lite0_for_a_few_steps_lowers_the_loss(lite0_repo: tuple, tmp_path: Path) -> None:
    """The real model on real photos: both methods' losses fall within a few steps."""
    from skimage import data

    repo, name = lite0_repo
    root = tmp_path / "photos"
    root.mkdir()
    for photo in ("coffee", "chelsea", "astronaut", "rocket", "motorcycle_left", "hubble_deep_field"):
        with contextlib.suppress(Exception):  # a photo scikit-image would have to download is skipped
            Image.fromarray(np.asarray(getattr(data, photo)())[..., :3]).save(root / f"{photo}.png")
    card = repo.load(name, 1).card
    module = rebuild_module(card)
    items = select_split(load_dataset(root), "tune", 0).items
    assert len(items) >= 2
    photos = TunePhotos.load(card, root, items, card.resolution)
    from exporters.tune_views import onnx_teacher

    teacher = onnx_teacher(repo.load(name, 1).onnx_bytes, card)
    for config in (TuneConfig(method="consistency", loss="ensemble+js", steps=8, batch_size=2, pool_views=4,
                              lr=1e-4, device="cpu"),
                   # every step sees the whole pool (2 photos x 2 views), so the loss is measured on the same views
                   # throughout; with a random half of a larger pool per step it rose and fell with the views drawn
                   TuneConfig(method="fixres", resolution=256, steps=8, batch_size=4, pool_views=2, lr=1e-2,
                              device="cpu")):
        fresh = rebuild_module(card) if config.method == "fixres" else module
        run = train(fresh, card, photos, teacher, config)
        first, last = np.mean(run.losses[:3]), np.mean(run.losses[-3:])
        assert last < first, (config.method, run.losses)


def test_cuda_is_refused_clearly_without_a_gpu(small_repo: tuple, photos: tuple[Path, Path]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot happen here (see the gpu test)")
    repo, net, card = small_repo
    root, _ = photos
    with pytest.raises(ExportError, match="--device cuda: torch sees no CUDA device"):
        tune_module(net, card, repo, root, TuneConfig(**dict(FAST, device="cuda")))


@pytest.mark.gpu
def test_tuning_on_cuda_is_deterministic_and_exports(small_repo: tuple, photos: tuple[Path, Path]) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: torch with a visible NVIDIA GPU is needed")
    repo, net, card = small_repo
    root, _ = photos
    items = select_split(load_dataset(root), "tune", 0).items
    photo_set = TunePhotos.load(card, root, items, card.resolution)
    runs = []
    for _ in range(2):
        module = make_small_net()
        module.load_state_dict(net.state_dict())
        config = TuneConfig(method="consistency", loss="ensemble+js", early_lr_mult=1.0, lr=1e-3,
                            **dict(FAST, device="cuda"))
        runs.append((train(module, card, photo_set, _torch_teacher(net), config), module.state_dict()))
    assert runs[0][0].device == "cuda" and runs[0][0].losses == runs[1][0].losses
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    new = tune_module(net, card, repo, root, TuneConfig(**dict(FAST, device="cuda")))
    assert new.tune is not None and new.tune.device == "cuda"
