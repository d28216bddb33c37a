"""Fixtures of the reliability tests, and the session's tally of everything they tried.

Every hostile input, fuzz example and load request is recorded in :data:`TALLY` with what it
had to get and what it got; at the end of the session pytest prints one summary table
(``inputs tried / as expected / crashes / requests lost`` per area) and, when
``STEADY_RELIABILITY_SUMMARY`` names a file, writes it there as JSON. The numbers in
README.md ("Reliability") come from that table.

The session's real Ray Serve service (the ``service`` fixture of ``tests/serving.py``) is shared;
tests that must break a server (kill replicas, corrupt its repository) start their own
``steady serve`` in a subprocess (:class:`service.launcher.ServeProcess`).
"""

from __future__ import annotations

import json
import os
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

import psutil

from service.launcher import ServeProcess


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
def cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def rss_mb(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return 0.0


@pytest.fixture(scope="module")
def private_server_factory() -> Iterator[Any]:
    """Start ``steady serve`` subprocesses (:class:`service.launcher.ServeProcess`) that are stopped and
    cleaned up when the module ends."""
    started: list[ServeProcess] = []

    def start(repo: Path, log: Path, config: dict[str, Any]) -> ServeProcess:
        server = ServeProcess.start({"repo": str(repo), "object_store_mb": 96, **config}, log)
        started.append(server)
        try:
            server.wait_ready(150)
        except Exception:
            server.stop()
            raise
        return server

    yield start
    for server in started:
        server.stop()
        server.cleanup()
