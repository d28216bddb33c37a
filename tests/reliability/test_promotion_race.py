"""Concurrent ``steady promote`` / ``steady rollback`` from several processes, and SIGKILL mid-promotion.

stages.json must never be lost or torn (readers always parse it), every successful command
must appear exactly once in its history, and a process killed while it holds the lock or is
writing must leave the previous, consistent stages.json and a free lock.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from service.core.repository import ModelRepository
from tests.conftest import make_tiny_onnx, tiny_card
from tests.reliability.conftest import TALLY

WORKERS = 6
OPS_PER_WORKER = 12

# One worker process: OPS_PER_WORKER real CLI commands (service.cli.main, the `steady` entry point),
# each printing "ok <reason>" or "refused <reason>".
_WORKER = r"""
import contextlib, io, random, sys
from service.cli import main
repo, worker, ops, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
for i in range(ops):
    reason = f"w{worker}-op{i}"
    if rng.random() < 0.3:
        argv = ["rollback", "--repo", repo, "m", "--reason", reason]
    else:
        stage = rng.choice(["production", "production", "candidate"])
        argv = ["promote", "--repo", repo, "m", str(rng.randint(1, 4)), "--stage", stage, "--force", "--reason", reason]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    print(("ok " if code == 0 else "refused ") + reason + " " + err.getvalue().strip().replace("\n", " ")[:80], flush=True)
"""


@pytest.fixture()
def repo(tmp_path: Path) -> ModelRepository:
    repo = ModelRepository(tmp_path / "repo")
    onnx = make_tiny_onnx()
    for _ in range(4):
        repo.add("m", onnx, tiny_card())
    repo.set_stage("m", "production", 1, reason="initial")
    return repo


def _stages_path(repo: ModelRepository) -> Path:
    return repo.model_dir("m") / "stages.json"


def _consistent(doc: dict) -> None:
    """production/candidate are what the history says they are."""
    assert set(doc) == {"production", "candidate", "history"}
    history = doc["history"]
    assert all({"time", "stage", "from", "to", "reason"} <= set(e) for e in history)
    last_prod = [e for e in history if e["stage"] == "production"][-1]
    assert doc["production"] == last_prod["to"]
    cand = [e for e in history if e["stage"] == "candidate"]
    if doc["candidate"] is not None:  # set by the last candidate entry (production may clear it later)
        assert cand and cand[-1]["to"] == doc["candidate"]


def test_concurrent_promote_and_rollback_lose_nothing(repo: ModelRepository) -> None:
    path = _stages_path(repo)
    before = json.loads(path.read_text())
    torn: list[str] = []
    reads = [0]
    stop = threading.Event()

    def reader() -> None:  # a server reloading in a loop: it must always parse
        last = 0
        while not stop.is_set():
            try:
                doc = json.loads(path.read_text())
                assert len(doc["history"]) >= last
                last = len(doc["history"])
                reads[0] += 1
            except Exception as exc:  # noqa: BLE001 - recorded as a torn read
                torn.append(repr(exc))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(repo.root), str(w), str(OPS_PER_WORKER), str(w)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(WORKERS)]
    # and two through the real `steady` console script, at the same time
    cli = [subprocess.Popen(["steady", "promote", "--repo", str(repo.root), "m", str(v), "--force", "--reason", f"cli{v}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in (2, 3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    cli_out = [p.communicate(timeout=60) for p in cli]
    stop.set()
    thread.join(5)
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outputs]
    ok = [line.split()[1] for out, _ in outputs for line in out.splitlines() if line.startswith("ok ")]
    refused = [line for out, _ in outputs for line in out.splitlines() if line.startswith("refused ")]
    ok += [f"cli{v}" for v, p in zip((2, 3), cli) if p.returncode == 0]
    assert all(p.returncode == 0 for p in cli), cli_out
    after = json.loads(path.read_text())
    reasons = [e["reason"] for e in after["history"][len(before["history"]):]]
    TALLY.record("promotion-race", expected=not torn, status=200)
    for _ in ok:
        TALLY.record("promotion-race", expected=True, status=200)
    for _ in refused:
        TALLY.record("promotion-race", expected=True, status=409)
    TALLY.note("promotion-race", f"{WORKERS} processes x {OPS_PER_WORKER} ops + 2 CLI: {len(ok)} applied, "
                                 f"{len(refused)} refused (nothing to roll back), {reads[0]} concurrent reads, "
                                 f"{len(torn)} torn")
    assert not torn, torn[:3]
    assert reads[0] > 10
    assert sorted(reasons) == sorted(ok), "history must hold every applied command exactly once"
    assert all("no earlier production" in r or "no production" in r for r in refused), refused[:3]
    assert after["history"][: len(before["history"])] == before["history"]
    _consistent(after)
    assert not list(path.parent.glob(".stages.json.*.tmp"))


# a child that enters set_stage and stops at a chosen point, so the parent can SIGKILL it there
_STOPPER = r"""
import os, sys, time, json
from service.core.repository import ModelRepository
import service.core.repository as r
repo, where, marker = ModelRepository(sys.argv[1]), sys.argv[2], sys.argv[3]

def hold(*args, **kwargs):
    open(marker, "w").write("here")
    time.sleep(60)

if where == "lock":        # inside the lock, before anything is written
    repo.set_stage("m", "production", 3, reason="killed", check=lambda v: hold())
elif where == "replace":   # temp file written and fsynced, not yet renamed over stages.json
    real = os.replace
    r.os.replace = lambda a, b: (hold(), real(a, b))
    repo.set_stage("m", "production", 3, reason="killed")
elif where == "dump":      # half of the JSON written to the temp file
    def half(data, fh, **kw):
        text = json.dumps(data, **kw)
        fh.write(text[: len(text) // 2]); fh.flush()
        hold()
    r.json.dump = half
    repo.set_stage("m", "production", 3, reason="killed")
"""


@pytest.mark.parametrize("where", ["lock", "replace", "dump"])
def test_sigkill_mid_promotion_leaves_a_consistent_state(repo: ModelRepository, tmp_path: Path, where: str) -> None:
    path = _stages_path(repo)
    repo.set_stage("m", "production", 2, reason="second")
    before = path.read_bytes()
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", _STOPPER, str(repo.root), where, str(marker)])
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        assert child.poll() is None, "the child ended before reaching the kill point"
        time.sleep(0.02)
    assert marker.exists()
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    # stages.json is exactly the previous one, and the lock died with the process
    assert path.read_bytes() == before
    start = time.perf_counter()
    stages = repo.set_stage("m", "production", 4, reason="after the kill")
    assert time.perf_counter() - start < 5
    assert stages.production == 4 and [e["reason"] for e in stages.history] == ["initial", "second", "after the kill"]
    _consistent(json.loads(path.read_text()))
    assert repo.rollback("m").production == 2
    TALLY.record("promotion-kill", expected=True, status=200)


def test_sigkill_storm_at_random_moments(repo: ModelRepository) -> None:
    """Many promotions killed at random instants: whatever survives is whole and consistent."""
    path = _stages_path(repo)
    rng = random.Random(11)
    applied = 0
    for i in range(16):
        p = subprocess.Popen(["steady", "promote", "--repo", str(repo.root), "m", str(rng.randint(1, 4)),
                              "--force", "--reason", f"storm{i}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.0, 0.9))
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        doc = json.loads(path.read_text())  # never torn
        _consistent(doc)
        applied = sum(1 for e in doc["history"] if e["reason"].startswith("storm"))
        TALLY.record("promotion-kill", expected=True, status=200)
    TALLY.note("promotion-kill", f"16 promotions SIGKILLed at random instants: {applied} had completed, "
                                 "stages.json parsed and consistent after every kill")
    final = repo.set_stage("m", "candidate", 4, reason="still writable")
    assert final.candidate == 4 or final.production == 4
    assert os.access(path, os.R_OK)
