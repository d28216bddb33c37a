"""deploy/docker: no Docker engine runs here, so check what can be checked without one: compose.yaml
against the Compose Specification's JSON schema (vendored by the ``check-jsonschema`` package,
offline), the files the Dockerfile copies and compose mounts exist, and the commands parse with the
real `steady` CLI. Nothing here builds the image or starts a container."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.cli import build_parser
from service.settings import ServeSettings
from tests.deploy.promql import DEPLOY, ROOT

DOCKER = DEPLOY / "docker"


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DOCKER / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_copies_existing_sources_and_runs_steady_serve() -> None:
    instructions = _instructions()
    assert instructions[0][0] == "ARG" and any(op == "FROM" for op, _ in instructions)
    for op, arg in instructions:
        if op == "COPY":
            sources = [a for a in shlex.split(arg) if not a.startswith("--")][:-1]
            for src in sources:
                if src != "README.md":  # written by the lead into the repository root
                    assert (ROOT / src).exists(), src
    (cmd,) = [arg for op, arg in instructions if op == "CMD"]
    argv = yaml.safe_load(cmd)  # JSON (exec) form
    assert argv[0] == "steady"
    args = build_parser().parse_args(argv[1:])
    assert (args.repo, args.host, args.port, args.metrics_port) == ("/models", "0.0.0.0", 8000, 8080)


def test_compose_services_and_mounts() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"steady", "prometheus", "grafana"}
    steady = services["steady"]
    assert (DOCKER / steady["build"]["context"] / steady["build"]["dockerfile"]).resolve() == (DOCKER / "Dockerfile").resolve()
    args = build_parser().parse_args(steady["command"][1:])
    assert args.metrics_port == 8080 and args.host == "0.0.0.0"
    assert steady["init"] is True  # tini forwards SIGTERM and reaps Ray's orphans
    drain = ServeSettings.build("/models", environ={}).drain_timeout_s
    assert float(steady["stop_grace_period"].removesuffix("s")) >= drain + 5  # docker stop's SIGKILL after the drain
    published = {p.split(":")[0] for p in steady["ports"]}
    assert {"8000", "8080", "9090", "3000"} <= published
    for name in ("prometheus", "grafana"):
        assert services[name]["network_mode"] == "service:steady"
        assert "ports" not in services[name]  # published on steady, whose network they share
        for volume in services[name]["volumes"]:
            src = volume.split(":")[0]
            if src.startswith("."):
                assert (DOCKER / src).exists(), src
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert "localhost:8080" in prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    assert Path(DOCKER / "../prometheus/alerts.yml").exists()


def test_compose_matches_the_compose_spec() -> None:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema not installed (pip install check-jsonschema)")
    r = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                        str(DOCKER / "compose.yaml")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
