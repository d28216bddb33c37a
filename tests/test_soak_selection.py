"""The soak (marker ``soak``) stays out of the default run, CI's included, and runs when ``-m`` names it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _collected(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests/reliability/test_soak.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    return done.stdout


def test_the_default_run_deselects_the_soak() -> None:
    out = _collected()
    assert "test_soak.py::test_soak" not in out and "1 deselected" in out, out[-500:]


def test_make_soak_selects_it() -> None:
    out = _collected("-m", "soak")
    assert "test_soak.py::test_soak" in out, out[-500:]
    makefile = (ROOT / "Makefile").read_text()
    assert "-m soak" in makefile
