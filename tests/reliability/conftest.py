"""Fixtures of the reliability tests, and the session's tally of everything they tried.

Every hostile input, fuzz example and load request is recorded in :data:`TALLY` with what it
had to get and what it got; at the end of the session pytest prints one summary table
(``inputs tried / as expected / crashes / requests lost`` per area) and, when
``STEADY_RELIABILITY_SUMMARY`` names a file, writes it there as JSON. The numbers in
README.md ("Reliability") come from that table.

The session's real Ray Serve service (the ``service`` fixture of ``tests/serving.py``) is shared;
tests that must break a server (kill replicas, corrupt its repository) start their own
``steady serve`` in a subprocess (:func:`serve_subprocess`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from service.bench import descendants
from tests.serving import ADMIN_TOKEN, free_port


@pytest.fixture(scope="session")
def lite0_repo() -> None:
    """The reliability suite serves only the tiny models: skip the (slow) efficientnet-lite0 export."""
    pytest.skip("tests/reliability does not need efficientnet-lite0")


# ------------------------------------------------------------------ the tally
@dataclass
class _Area:
    tried: int = 0
    as_expected: int = 0
    rejected_4xx: int = 0
    accepted_2xx: int = 0
    crashes: int = 0  # 5xx, an unexpected exception, or a dead connection
    lost: int = 0  # a request that got no answer at all within its timeout
    notes: list[str] = field(default_factory=list)


class Tally:
    """Thread-safe counters per area (``images``, ``v2``, ``names``, ``fuzz-decoder``...)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.areas: dict[str, _Area] = defaultdict(_Area)

    def record(self, area: str, *, expected: bool, status: int | None = None, crash: bool = False,
               lost: bool = False) -> None:
        with self._lock:
            a = self.areas[area]
            a.tried += 1
            a.as_expected += int(expected)
            if status is not None:
                a.rejected_4xx += int(400 <= status < 500)
                a.accepted_2xx += int(200 <= status < 300)
                crash = crash or status >= 500 and status != 503
            a.crashes += int(crash)
            a.lost += int(lost)

    def note(self, area: str, text: str) -> None:
        with self._lock:
            self.areas[area].notes.append(text)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {k: vars(v) | {"notes": list(v.notes)} for k, v in sorted(self.areas.items())}


TALLY = Tally()


@pytest.fixture(scope="session")
def tally() -> Tally:
    return TALLY


def pytest_terminal_summary(terminalreporter: Any) -> None:
    data = TALLY.as_dict()
    if not data:
        return
    tr = terminalreporter
    tr.section("Steady reliability tally")
    tr.write_line(f"{'area':<22}{'tried':>8}{'expected':>10}{'4xx':>7}{'2xx':>7}{'crashes':>9}{'lost':>6}")
    total = _Area()
    for name, a in data.items():
        tr.write_line(f"{name:<22}{a['tried']:>8}{a['as_expected']:>10}{a['rejected_4xx']:>7}{a['accepted_2xx']:>7}"
                      f"{a['crashes']:>9}{a['lost']:>6}")
        for key in ("tried", "as_expected", "rejected_4xx", "accepted_2xx", "crashes", "lost"):
            setattr(total, key, getattr(total, key) + a[key])
    tr.write_line(f"{'TOTAL':<22}{total.tried:>8}{total.as_expected:>10}{total.rejected_4xx:>7}"
                  f"{total.accepted_2xx:>7}{total.crashes:>9}{total.lost:>6}")
    for name, a in data.items():
        for text in a["notes"]:
            tr.write_line(f"  {name}: {text}")
    target = os.environ.get("STEADY_RELIABILITY_SUMMARY")
    if target:
        Path(target).write_text(json.dumps({"areas": data, "total": vars(total) | {"notes": []}}, indent=2) + "\n")


# ------------------------------------------------------------------ a private server
@dataclass
class Subprocess:
    """A ``steady serve`` running in its own process group (its own Ray)."""

    proc: subprocess.Popen[bytes]
    base: str
    repo: Path
    port: int
    log: Path
    env: dict[str, str]
    ray_tmp: Path  # RAY_TMPDIR of this server: its session logs are under it

    def descendants(self) -> list[int]:
        return descendants(self.proc.pid)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def serve_subprocess(repo: Path, log: Path, config: dict[str, Any], timeout: float = 150) -> Subprocess:
    """Start ``steady serve`` on free loopback ports with ``config`` (YAML settings); wait until ready."""
    import httpx
    import yaml

    port = free_port()
    settings = {"repo": str(repo), "host": "127.0.0.1", "port": port, "metrics_port": free_port(),
                "object_store_mb": 96, **config}
    cfg = log.with_suffix(".yaml")
    cfg.write_text(yaml.safe_dump(settings))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STEADY_")}
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="sr", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    # every port Ray Serve fixes by default, so concurrent Ray instances on one machine never cross-talk
    # (with the HAProxy ingress the Serve proxy listens on RAY_SERVE_FALLBACK_PROXY_HTTP_PORT, default 8500)
    env.update(RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()), RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
               RAY_SERVE_FALLBACK_PROXY_HTTP_PORT=str(free_port()), RAY_SERVE_FALLBACK_PROXY_GRPC_PORT=str(free_port()),
               PYTHONUNBUFFERED="1", RAY_TMPDIR=str(ray_tmp))
    env.pop("RAY_ADDRESS", None)  # never join the session's own Ray
    fh = open(log, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--config", str(cfg)],
                            stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    fh.close()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"steady serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200:
                return Subprocess(proc, base, repo, port, log, env, ray_tmp)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_subprocess(Subprocess(proc, base, repo, port, log, env, ray_tmp))
    raise RuntimeError(f"steady serve not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def stop_subprocess(server: Subprocess) -> None:
    """SIGTERM (steady serve shuts Serve and Ray down), then SIGKILL the whole process group."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
    leftovers = server.descendants()
    try:
        os.killpg(server.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in leftovers:  # Ray daemons may have left the group
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    server.proc.wait(10)


@pytest.fixture(scope="module")
def private_server_factory() -> Iterator[Any]:
    started: list[Subprocess] = []

    def start(repo: Path, log: Path, config: dict[str, Any]) -> Subprocess:
        server = serve_subprocess(repo, log, config)
        started.append(server)
        return server

    yield start
    import shutil

    for server in started:
        stop_subprocess(server)
        shutil.rmtree(server.ray_tmp, ignore_errors=True)
