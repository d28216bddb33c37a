"""Operations against a private ``steady serve`` (its own Ray and run directory, in a subprocess):

- every listening socket of its process tree is on loopback with ``--host 127.0.0.1``;
- SIGTERM under load drains: requests already in flight finish with the right answer, later ones get 503 with
  ``Retry-After`` (or a refused connection once the listener closed), and it exits within ``drain_timeout_s``;
- killed in each of the five ways (SIGTERM to the main process or its group, SIGKILL to the group or the
  main process only, SIGKILL plus ``ray stop --force``), it starts again on the same ports and becomes ready,
  ``STEADY_RESTART_ROUNDS`` rounds (default 2: ten restarts) in one session; nothing of another run
  directory is ever touched.

``ray stop --force`` would kill every Ray on this shared machine (other engineers' test runs included), so
the ``kill-ray`` mode applies ``ray stop``'s own matching to this server's run-directory processes only
(:meth:`service.launcher.ServeProcess.kill`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import psutil
import pytest

from service.core.repository import ModelRepository
from service.launcher import KILL_MODES, ServeProcess
from service.rundir import MARKER
from tests.conftest import encode, make_tiny_onnx, tiny_card
from tests.reliability.conftest import TALLY
from tests.reliability.traffic import Traffic, rest, v2_binary, v2_json

pytestmark = [pytest.mark.e2e]

DRAIN_TIMEOUT_S = 15.0
READY_TIMEOUT_S = 150.0
ROUNDS = int(os.environ.get("STEADY_RESTART_ROUNDS", "2"))
CONNECTION_CLOSED = {"ConnectError", "RemoteProtocolError", "ReadError", "WriteError"}


def _photo(width: int, height: int, seed: int, fmt: str = "PNG") -> bytes:
    """Noise photos: PNG is decoded at full size (no reduced-scale JPEG path), so a request takes a while."""
    return encode(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8), fmt)


class Slot:
    """The module's one server: the current ``steady serve`` of one run directory, on fixed ports."""

    def __init__(self, root: Path) -> None:
        repo = ModelRepository(root / "repo")
        repo.add("tiny", make_tiny_onnx(), tiny_card())
        repo.set_stage("tiny", "production", 1, reason="initial")
        self.server = ServeProcess.start({
            "repo": str(repo.root), "app_name": "steadyops", "object_store_mb": 96, "num_replicas": 1,
            "replica_cpus": 1.0, "ort_threads": 1, "decode_threads": 2, "live_fraction": 0.0,
            "candidate_mode": "off", "max_inflight": 64, "drain_timeout_s": DRAIN_TIMEOUT_S,
        }, root / "ops-serve.log")
        self.server.wait_ready(READY_TIMEOUT_S)

    def running(self) -> ServeProcess:
        if self.server.proc.poll() is not None:
            self.server = self.server.restart()
            self.server.wait_ready(READY_TIMEOUT_S)
        return self.server


@pytest.fixture(scope="module")
def slot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slot]:
    slot = Slot(tmp_path_factory.mktemp("ops"))
    yield slot
    slot.server.stop()
    assert slot.server.run_processes() == [], "processes of the run outlived its stop"
    slot.server.cleanup()


def _classify(server: ServeProcess, photo: bytes) -> httpx.Response:
    return httpx.post(f"{server.base}/v1/models/tiny:classify", content=photo,
                      headers={"Content-Type": "image/png"}, timeout=30)


# ------------------------------------------------------------------ bind only where asked
def test_every_listening_socket_is_on_loopback(slot: Slot) -> None:
    server = slot.running()
    photo = _photo(64, 48, 0)
    traffic = Traffic(server.base, [rest("rest", photo), v2_json("v2", photo), v2_binary("v2b", photo)]).learn()
    assert len(traffic.expected) == 3  # every server the requests need has started
    sockets = server.listening()
    wide = [s for s in sockets if not s.loopback]
    assert not wide, f"listening beyond loopback: {wide}"
    ports = {s.port for s in sockets if s.proto == "tcp"}
    s = server.settings
    for name in ("port", "metrics_port", "haproxy_stats_port", "haproxy_metrics_port"):
        assert s[name] in ports, f"{name} {s[name]} not among the listening sockets found: the listing is incomplete"
    names = {x.name for x in sockets}
    assert {"gcs_server", "raylet", "haproxy"} <= names, names
    assert not [x for x in sockets if x.proto == "udp"], "HAProxy's syslog must not open UDP sockets"
    TALLY.record("ops: binds", expected=True)
    TALLY.note("ops: binds", f"{len(sockets)} listening sockets in {len({x.pid for x in sockets})} processes, "
                                    "all on loopback")


def test_the_public_ports_follow_the_host_and_the_rest_stays_on_127_0_0_1(tmp_path: Path) -> None:
    """``host``/``metrics_host`` 127.0.0.2 stands in for a network address: only the HTTP frontend and the
    metrics forwarder may listen there, everything else on 127.0.0.1."""
    repo = ModelRepository(tmp_path / "repo")
    repo.add("tiny", make_tiny_onnx(), tiny_card())
    repo.set_stage("tiny", "production", 1, reason="initial")
    server = ServeProcess.start({"repo": str(repo.root), "host": "127.0.0.2", "metrics_host": "127.0.0.2",
                                 "object_store_mb": 96, "replica_cpus": 1.0, "ort_threads": 1, "live_fraction": 0.0,
                                 "candidate_mode": "off"}, tmp_path / "host-serve.log")
    try:
        server.wait_ready(READY_TIMEOUT_S)
        assert _classify(server, _photo(64, 48, 7)).status_code == 200
        metrics = httpx.get(f"http://127.0.0.2:{server.metrics_port}/metrics", timeout=30)
        assert metrics.status_code == 200 and "ray_" in metrics.text
        sockets = server.listening()
        public = {(x.ip, x.port) for x in sockets if not x.ip.endswith("127.0.0.1")}
        assert public == {("127.0.0.2", server.port), ("127.0.0.2", server.metrics_port)}, sockets
        assert not [x for x in sockets if not x.loopback]
        TALLY.record("ops: binds", expected=True)
    finally:
        server.stop()
        server.cleanup()


# ------------------------------------------------------------------ graceful drain
def test_sigterm_under_load_finishes_what_is_in_flight(slot: Slot) -> None:
    server = slot.running()
    small, large = _photo(64, 48, 1), _photo(1400, 1000, 2)
    batch = _photo(700, 500, 3)
    kinds = [rest("rest-large", large), v2_binary("v2b-large", large), v2_json("v2-small", small)]
    traffic = Traffic(server.base, kinds, clients=6, timeout=30).learn()
    # a slow kind that keeps work inside the replica: 16 images in one V2 call
    slow = Traffic(server.base, [v2_binary("v2b-batch16", batch, count=16)], clients=2, timeout=30)
    traffic.start()
    slow.start()
    time.sleep(4.0)
    signalled = time.monotonic()
    server.kill("term")
    try:
        rc = server.proc.wait(DRAIN_TIMEOUT_S + 30)
    finally:
        time.sleep(1.0)
        outcomes = traffic.stop() + slow.stop()
    exited = time.monotonic() - signalled
    before = [o for o in outcomes if o.start < signalled]
    after = [o for o in outcomes if o.start >= signalled]
    finished_during_drain = [o for o in before if o.end >= signalled and o.status == 200]
    print(f"drain: exit after {exited:.1f} s, rc {rc}; {len(before)} requests before the signal "
          f"({len(finished_during_drain)} answered 200 after it), {len(after)} after")
    print(server.tail(400))
    bad_before = [o for o in before if not ((o.status == 200 and o.right is not False)
                                            or (o.status == 503 and o.retry_after))]
    # sent after the signal: answered right (the flip reaches the replica a moment later), 503 + Retry-After, or
    # refused once HAProxy closed its listener
    bad_after = [o for o in after if not ((o.status == 200 and o.right is not False)
                                          or (o.status == 503 and o.retry_after) or o.status in CONNECTION_CLOSED)]
    for area, group, wrong in (("ops: in flight", before, bad_before),
                               ("ops: after SIGTERM", after, bad_after)):
        for o in group:
            TALLY.record(area, expected=o not in wrong, status=o.status if isinstance(o.status, int) else None,
                         lost=o.status == "timeout")
    assert rc == 0, f"steady serve exited with {rc} (1: the drain was not clean or the watchdog ended it)"
    assert "drained 1/1 replicas" in server.tail(2000)
    assert not bad_before, f"requests in flight at SIGTERM answered wrongly or lost: {bad_before[:5]}"
    assert not bad_after, f"requests after SIGTERM answered wrongly or not with 503 + Retry-After: {bad_after[:5]}"
    assert finished_during_drain, "no request was still in flight at the signal: the test proved nothing"
    assert any(o.status == 503 for o in after), "no request was refused while draining"
    assert all(o.right for o in outcomes if o.status == 200 and o.kind in traffic.expected)
    TALLY.note("ops: in flight", f"exit {exited:.1f} s after SIGTERM; {len(finished_during_drain)} in-flight "
                                    f"requests finished 200 during the drain")


# ------------------------------------------------------------------ restart after every kind of stop
@pytest.fixture()
def bystanders(tmp_path: Path) -> Iterator[list[psutil.Process]]:
    """Processes of another run directory (its Ray marker, its HAProxy): a restart must never touch them."""
    other = str(tmp_path / "other-run")
    fake_haproxy = tmp_path / "haproxy"
    fake_haproxy.symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != MARKER}
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"], env={**env, MARKER: other}),
             subprocess.Popen([str(fake_haproxy), "-c", "import time; time.sleep(3600)", "-f",
                               f"{other}/hap/node/haproxy.cfg"], env=env)]
    yield [psutil.Process(p.pid) for p in procs]
    for p in procs:
        p.kill()
        p.wait(10)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ten start-ups: ~3 min on a quiet 2-core machine, far more on a starved one
def test_restart_on_the_same_ports_after_every_kind_of_stop(slot: Slot, bystanders: list[psutil.Process]) -> None:
    photo = _photo(64, 48, 4)
    server = slot.running()
    expected = _classify(server, photo).json()["predictions"][0]["index"]
    rows: list[dict[str, Any]] = []
    began = time.monotonic()
    for i in range(ROUNDS * len(KILL_MODES)):
        mode = KILL_MODES[i % len(KILL_MODES)]
        server = slot.running()
        t0 = time.monotonic()
        server.kill(mode)
        rc = server.proc.wait(DRAIN_TIMEOUT_S + 30)
        stopped_s = time.monotonic() - t0
        left = [p.name() for p in server.run_processes() if p.is_running()]
        log_from = server.log.stat().st_size
        slot.server = server = server.restart()
        ready_s = server.wait_ready(READY_TIMEOUT_S)
        try:
            answer = _classify(server, photo)
            status, top1 = answer.status_code, answer.json()["predictions"][0]["index"] if answer.status_code == 200 else None
        except httpx.HTTPError as exc:
            status, top1 = type(exc).__name__, None
        new_log = server.log.read_bytes()[log_from:].decode(errors="replace")
        cleaned = next((line for line in new_log.splitlines() if "an earlier run left" in line), "")
        rows.append({"mode": mode, "rc": rc, "stopped_s": round(stopped_s, 1), "left_at_restart": sorted(left),
                     "cleaned": cleaned[:160], "ready_s": round(ready_s, 1), "status": status})
        print(rows[-1], flush=True)
        ok = status == 200 and top1 == expected
        TALLY.record("ops: restarts", expected=ok, status=status if isinstance(status, int) else None)
        assert ok, f"after {mode}: {status}\n{new_log[-3000:]}"
        if mode == "term":
            assert rc == 0, f"SIGTERM to the main process: exit {rc}\n{new_log[-1500:]}"
    total = time.monotonic() - began
    for row in rows:
        print(row)
    print(f"{len(rows)} restarts in {total:.0f} s; ready in {min(r['ready_s'] for r in rows)}-"
          f"{max(r['ready_s'] for r in rows)} s")
    TALLY.note("ops: restarts", f"{len(rows)} kills and restarts on the same ports ({ROUNDS} rounds of "
                                       f"{', '.join(KILL_MODES)}) in {total:.0f} s; ready in "
                                       f"{min(r['ready_s'] for r in rows)}-{max(r['ready_s'] for r in rows)} s")
    for proc in bystanders:
        assert proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE, "a restart killed another run's process"
