"""Sharding images over Ray tasks gives exactly the single-process records (ensemble variants included).

Runs in a fresh interpreter: it starts a Ray of its own (2 workers), which must not be the test
session's shared Ray Serve instance (whose replicas hold its CPUs).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from service.core.repository import ModelRepository

SCRIPT = textwrap.dedent(
    """
    import sys
    import ray
    from robustness.data import load_dataset
    from robustness.protocols import ProtocolConfig
    from robustness.scorer import ScoreOptions, aggregate, run_local, run_ray
    from service.core.repository import ModelRepository

    repo, data, labels = sys.argv[1:4]
    loaded = ModelRepository(repo).load("tiny", 1)
    ds = load_dataset(data, labels)
    cfg = ProtocolConfig(translate_frames=3, zoom_start=0.9, zoom_stop=1.1, ensembles=("knight5@0.3", "knight5"))
    local, _ = run_local(loaded.onnx_bytes, loaded.card, ds, cfg, 5, ScoreOptions(chunk_images=2))
    sharded, _ = run_ray(loaded.onnx_bytes, loaded.card, ds, cfg, 5, ScoreOptions(chunk_images=2), 2, None)
    assert not ray.is_initialized(), "run_ray left the Ray it started running"
    assert len(sharded) == len(local) == 6
    assert sharded == local, "sharded records differ from the single-process ones"
    assert all(r["remedies"]["center+knight5"]["compute"] == [5.0 * n, n] for r in local
               for n in [r["remedies"]["center+knight5"]["compute"][1]]), "the always-mode ensemble ran every copy"
    assert aggregate(sharded, loaded.card, cfg, 5, True) == aggregate(local, loaded.card, cfg, 5, True)
    print("identical", len(local))
    """
)


def _run(script: str, repo: ModelRepository, folder: tuple[Path, Path]) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh interpreter (a Ray of its own) with the repository, images and labels as arguments."""
    data, labels = folder
    proc = subprocess.run([sys.executable, "-c", script, str(repo.root), str(data), str(labels)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_ray_workers_equal_one_process(tiny_repo: ModelRepository, image_folder: tuple[Path, Path]) -> None:
    pytest.importorskip("ray")
    proc = _run(SCRIPT, tiny_repo, image_folder)
    assert "identical 6" in proc.stdout


HELD = textwrap.dedent(
    """
    import sys, time
    import ray
    from robustness.data import load_dataset
    from robustness.protocols import ProtocolConfig
    from robustness.scorer import ScoreOptions, run_ray
    from service.core.errors import ClusterUnavailable
    from service.core.repository import ModelRepository

    repo, data, labels = sys.argv[1:4]
    loaded = ModelRepository(repo).load("tiny", 1)
    ray.init(num_cpus=1, object_store_memory=100 * 1024 * 1024, include_dashboard=False, log_to_driver=False)


    @ray.remote(num_cpus=1)
    class Holder:
        def ping(self):
            return 1


    holder = Holder.remote()
    ray.get(holder.ping.remote())  # the only CPU is held, as Serve replicas hold a cluster's
    t0 = time.monotonic()
    try:
        run_ray(loaded.onnx_bytes, loaded.card, load_dataset(data, labels), ProtocolConfig(), 5,
                ScoreOptions(ray_timeout_s=3), 1, None)
    except ClusterUnavailable as exc:
        print("refused after", round(time.monotonic() - t0, 1), "s:", exc)
    """
)


@pytest.mark.slow
def test_held_cpus_fail_clearly_after_the_timeout(tiny_repo: ModelRepository, image_folder: tuple[Path, Path]) -> None:
    pytest.importorskip("ray")
    proc = _run(HELD, tiny_repo, image_folder)
    assert "could not start a 1-CPU scoring task within 3 s: it has 1 CPUs, 0 free" in proc.stdout, proc.stdout
