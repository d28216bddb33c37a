"""Reading the deploy files the way Grafana and Prometheus do: panel expressions, template
variables, rule expressions, metric names. Shared by the static and the e2e deploy tests."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

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
