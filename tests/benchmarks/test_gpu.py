"""``steady bench gpu`` and ``steady bench parity``: their logic and records, on the CPU.

The GPU measurement itself needs a GPU (README "GPU"); here the parity record is made on DALI's CPU backend
with the tiny model and scikit-image photos, and the GPU benchmark's verdicts are checked on given numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.gpu import GpuBenchOptions, _targets, format_gpu_report
from service.cli import main
from service.core.repository import ModelRepository
from tests.conftest import encode, make_tiny_onnx, tiny_card


def _run(device: str, photos: str, c: int, images_per_s: float, ratio: float) -> dict:
    return {"preprocess_device": device, "photos": photos, "concurrency": c, "images_per_s": images_per_s,
            "ratio_to_raw": ratio, "p50_ms": 10.0, "p99_ms": 30.0, "gpu": None, "client_cpu": 0.4,
            "client_threads": 4, "non_2xx": 0, "socket_errors": 0}


def test_targets_compare_gpu_preprocessing_with_raw_and_with_cpu_preprocessing() -> None:
    opts = GpuBenchOptions(repo="r", model="m", data="d")
    runs = [_run("cpu", "photos", 64, 3000.0, 0.3), _run("gpu", "photos", 64, 7000.0, 0.7),
            _run("cpu", "photos", 256, 3500.0, 0.35), _run("gpu", "photos", 256, 6000.0, 0.6)]
    t64, t256 = _targets(runs, {"images_per_s": 10000.0}, opts)
    assert (t64["ratio_met"], t64["speedup_vs_cpu_preprocessing"], t64["speedup_met"]) == (True, 2.333, True)
    assert (t256["ratio_met"], t256["speedup_vs_cpu_preprocessing"], t256["speedup_met"]) == (False, 1.714, False)
    doc = {"model": "m", "version": 1, "precision": "fp16", "resolution": 224, "provider": "cuda", "dali": "2.4.0",
           "cpus": 16, "client": "wrk", "raw": {"batch": 64, "images_per_s": 10000.0}, "runs": runs,
           "targets": [t64, t256]}
    text = format_gpu_report(doc)
    assert "0.7 of raw (met >= 0.7)" in text and "1.714x CPU preprocessing (missed >= 2.0)" in text


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="devices"):
        GpuBenchOptions(repo="r", model="m", data="d", devices=("tpu",))
    with pytest.raises(ValueError, match="concurrency"):
        GpuBenchOptions(repo="r", model="m", data="d", concurrency=(0,))
    with pytest.raises(ValueError, match="provider"):
        GpuBenchOptions(repo="r", model="m", data="d", provider="rocm")


def test_parity_record_on_dalis_cpu_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed: pip install -e '.[test]' brings it")
    from skimage import data as skdata

    repo = ModelRepository(tmp_path / "repo")
    repo.add("tiny224", make_tiny_onnx(), tiny_card("tiny224", train_resolution=224, interpolation="bicubic"))
    photos = tmp_path / "photos"
    photos.mkdir()
    rows = ["file,class_index"]
    for i, (name, arr) in enumerate((("coffee", skdata.coffee()), ("chelsea", skdata.chelsea()),
                                      ("rocket", skdata.rocket()))):
        (photos / f"{name}.jpg").write_bytes(encode(arr, "JPEG", quality=90))
        rows.append(f"{name}.jpg,{i}")
    (photos / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "parity.json"
    code = main(["bench", "parity", "--repo", str(repo.root), "tiny224", "--data", str(photos), "--out", str(out)])
    assert code == 0, capsys.readouterr().out
    doc = json.loads(out.read_text())
    (s,) = doc["sets"]
    assert doc["passed"] and doc["device"] == "cpu" and s["photos"] == 3
    assert s["tensor_vs_reference"]["max_levels"] <= doc["contract"]["max_levels_vs_reference"] == 3.0
    assert s["top1_agreement_vs_cpu_path"]["value"] == 1.0 and s["top1_agreement_vs_cpu_path"]["n"] == 3
    assert s["io_binding_max_abs_logit_diff"] < 1e-5 and set(s["top1_accuracy"]) == {"dali", "reference", "cpu"}
    assert "PASSED" in capsys.readouterr().out
    # a contract the pixels cannot meet fails with exit code 1
    import benchmarks.dali_parity as parity

    monkeypatch.setattr(parity, "MAX_LEVELS", -1.0)
    assert main(["bench", "parity", "--repo", str(repo.root), "tiny224", "--data", str(photos)]) == 1
    assert "FAILED" in capsys.readouterr().out
    assert np.isfinite(s["ms_per_photo"]["dali_cpu"])


def _doc(device: str, pan: float, embed: float, seed: int = 0) -> dict:
    def est(v: float, lo: float, hi: float) -> dict:
        return {"value": v, "ci95": [lo, hi], "n": 400}

    return {"model_sha256": "ab" * 32, "seed": seed, "data": {"fingerprint": "f", "images": 200},
            "preprocess": {"device": device},
            "accuracy": {"center": {"top1": est(0.895, 0.85, 0.935), "top5": None}},
            "protocols": {"pan": {"center": {"p_change": est(pan, 0.021, 0.049), "translate_offsets": [-1, 0, 1]}},
                          "embed": {"center": {"sizes": [{"size": 0.5, "accuracy": None,
                                                          "p_change": est(embed, 0.142, 0.230)}],
                                               "positions": 2}}}}


def test_compare_scores_checks_every_estimate_against_the_cpu_intervals(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.dali_parity import compare_scores

    cpu, same = _doc("cpu", 0.034, 0.185), _doc("dali-cpu", 0.036, 0.190)
    doc = compare_scores(cpu, same)
    assert doc["passed"] and doc["compared"] == 3 and doc["devices"] == ["cpu", "dali-cpu"]
    names = [r["estimate"] for r in doc["rows"]]
    assert names == ["accuracy.center.top1", "protocols.pan.center.p_change",
                     "protocols.embed.center.sizes[size=0.5].p_change"]
    out = compare_scores(cpu, _doc("gpu", 0.034, 0.25))
    assert not out["passed"] and [r["within"] for r in out["rows"]] == [True, True, False]
    with pytest.raises(ValueError, match="seed"):
        compare_scores(cpu, _doc("gpu", 0.034, 0.185, seed=1))
    a, b = tmp_path / "cpu.json", tmp_path / "gpu.json"
    a.write_text(json.dumps(cpu))
    b.write_text(json.dumps(_doc("gpu", 0.034, 0.25)))
    assert main(["bench", "compare-scores", str(a), str(b)]) == 1
    assert "OUT protocols.embed.center.sizes[size=0.5].p_change" in capsys.readouterr().out
    b.write_text(json.dumps(same))
    assert main(["bench", "compare-scores", str(a), str(b), "--out", str(tmp_path / "cmp.json")]) == 0
    assert json.loads((tmp_path / "cmp.json").read_text())["within"] == 3
