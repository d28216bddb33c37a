"""Reading the deploy files the way Grafana and Prometheus do: panel expressions, template
variables, rule expressions, metric names. Shared by the static and the e2e deploy tests."""

from __future__ import annotations

import contextlib
import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

# Grafana's built-in interval variables, as Grafana would fill them for a 1-2 s scrape interval
BUILTINS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}

_LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\)$")
_METRIC = re.compile(r"\b(ray_[a-z0-9_]+|up)\b")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_targets(dash: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(panel title, refId, expr) of every target of every panel, rows included."""
    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))

    for p in walk(dash["panels"]):
        for t in p.get("targets", []):
            if t.get("expr"):
                yield p["title"], t["refId"], t["expr"]


def query_variables(dash: dict[str, Any]) -> list[tuple[str, str | None, str]]:
    """(name, selector or None, label) of every ``label_values`` query variable, in dashboard order."""
    out = []
    for v in dash["templating"]["list"]:
        if v["type"] != "query":
            continue
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = _LABEL_VALUES.match(query.strip())
        if not m:
            raise ValueError(f"variable {v['name']}: only label_values(...) queries are supported, got {query!r}")
        out.append((v["name"], m["selector"], m["label"]))
    return out


def grafana_regex(values: list[str]) -> str:
    """What Grafana puts in place of a multi-value variable inside ``=~"..."``: ``(a|b)``, regex-escaped."""
    escaped = [re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def substitute(expr: str, variables: dict[str, str]) -> str:
    out = expr
    for name, value in BUILTINS.items():
        out = out.replace(name, value)
    # longest names first so $version is not eaten by a shorter $v
    for name in sorted(variables, key=len, reverse=True):
        out = out.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    if "$" in out:
        raise ValueError(f"unsubstituted variable left in {out!r}")
    return out


def rules() -> list[dict[str, Any]]:
    """Every rule (recording and alerting) of alerts.yml."""
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (recording-rule names ``steady:...`` are not matched)."""
    return set(_METRIC.findall(expr))


class Prom:
    """A running Prometheus' HTTP API."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx.Client(base_url=url, timeout=10)

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = self.client.get("/api/v1/query", params={"query": expr})
        body = r.json()
        if r.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"query failed ({r.status_code}): {expr}\n{body.get('error')}")
        assert body["data"]["resultType"] == "vector", (expr, body["data"]["resultType"])
        return list(body["data"]["result"])

    def finite(self, expr: str) -> list[dict[str, Any]]:
        return [s for s in self.query(expr) if math.isfinite(float(s["value"][1]))]

    def get(self, path: str, **params: Any) -> Any:
        r = self.client.get(path, params=params)
        r.raise_for_status()
        return r.json()["data"]


@contextlib.contextmanager
def running_prometheus(scrape_configs: list[dict[str, Any]], tmp: Path, ready: str,
                       timeout: float = 30.0) -> Iterator[Prom]:
    """A real Prometheus on loopback (1 s scrape and evaluation, the alert rules loaded) until ``ready``
    (a PromQL expression) returns data; skipped without the binary (``.ci/run`` installs it)."""
    from service.launcher import free_port

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (apt-get install prometheus; .ci/run installs it)")
    port = free_port()
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(ALERTS)],
              "scrape_configs": scrape_configs}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp / "prometheus.log", "w")
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    prom = Prom(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()
            try:
                if prom.client.get("/-/ready").status_code == 200 and prom.query(ready):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"Prometheus: no {ready} after {timeout:.0f} s\n" + (
                tmp / "prometheus.log").read_text()
            time.sleep(0.5)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
