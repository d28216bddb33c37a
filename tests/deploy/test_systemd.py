"""deploy/systemd/steady.service: stops the way Steady drains (KillMode=mixed, enough time), runs the real
CLI with a valid run directory, and passes ``systemd-analyze verify``."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.cli import build_parser
from service.settings import ServeSettings
from tests.deploy.promql import DEPLOY

UNIT = DEPLOY / "systemd" / "steady.service"


def _unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def _seconds(value: str) -> float:
    return float(value[:-1]) if value.endswith("s") else float(value)


def test_stop_lets_steady_drain() -> None:
    service = _unit()["Service"]
    assert service["KillMode"] == ["mixed"]  # SIGTERM to steady serve only; SIGKILL to the cgroup at the end
    assert service["KillSignal"] == ["SIGTERM"]
    config = yaml.safe_load((DEPLOY / "steady.yaml").read_text())
    drain = ServeSettings.build("/models", config=config, environ={}).drain_timeout_s
    assert _seconds(service["TimeoutStopSec"][0]) >= drain + 5


def test_exec_start_and_run_directory() -> None:
    service = _unit()["Service"]
    argv = shlex.split(service["ExecStart"][0])
    args = build_parser().parse_args(argv[1:])
    assert args.func.__module__ == "service.cli.serve" and args.config == "/etc/steady/steady.yaml"
    env = dict(e.split("=", 1) for e in service["Environment"])
    assert env["STEADY_RUN_DIR"] == f"/run/{service['RuntimeDirectory'][0]}"
    settings = ServeSettings.build("/models", environ=env)  # the run directory is a valid setting
    assert settings.run_dir == "/run/steady"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = UNIT.read_text().replace("/opt/steady/venv/bin/steady", sys.executable)  # an executable that exists
    unit = tmp_path / "steady.service"
    unit.write_text(text)
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
