"""Prometheus config and rules, checked by the real promtool (Debian package ``prometheus``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from robustness.schema import SUMMARY_KEYS
from service import metrics
from tests.deploy.promql import ALERTS, DEPLOY, dashboard, metric_names, panel_targets, rules

PROM = DEPLOY / "prometheus"
promtool_missing = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (apt-get install prometheus; .ci/run installs it)",
)


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@promtool_missing
def test_check_config() -> None:
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout and "rule files found" in r.stdout


@promtool_missing
def test_check_kubernetes_config(tmp_path: Path) -> None:
    """The KubeRay scrape config. Debian builds Prometheus without Kubernetes service discovery;
    there the job is checked with its ``kubernetes_sd_configs`` swapped for a static target, so
    the relabelling and everything else still meet the real parser."""
    r = promtool("check", "config", "prometheus-kubernetes.yml")
    if r.returncode != 0 and "field kubernetes_sd_configs not found" in r.stdout + r.stderr:
        doc = yaml.safe_load((PROM / "prometheus-kubernetes.yml").read_text())
        (job,) = doc["scrape_configs"]
        assert job["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["steady"]}}]
        del job["kubernetes_sd_configs"]
        job["static_configs"] = [{"targets": ["ray-head:8080"]}]
        doc["rule_files"] = [str(ALERTS)]
        (tmp_path / "k8s.yml").write_text(yaml.safe_dump(doc))
        r = promtool("check", "config", "k8s.yml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


@promtool_missing
def test_check_rules() -> None:
    r = promtool("check", "rules", "alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules())} rules found" in r.stdout


@promtool_missing
def test_rule_unit_tests() -> None:
    r = promtool("test", "rules", "alerts.test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_has_a_firing_and_a_silent_unit_test() -> None:
    alerts = {r["alert"] for r in rules() if "alert" in r}
    tests = yaml.safe_load((PROM / "alerts.test.yml").read_text())["tests"]
    fired: set[str] = set()
    silent: set[str] = set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (fired if case["exp_alerts"] else silent).add(case["alertname"])
    required = {"SteadyErrorRatioHigh", "SteadyLatencyP99High", "SteadyLoadShedding", "SteadyRequestsQueued",
                "SteadyServedVersionUnscored", "SteadyLiveFlipRateAboveGate", "SteadyShadowDisagreementHigh",
                "SteadyNoReadyReplicas"}
    assert required <= alerts
    assert fired == alerts, alerts - fired
    assert silent == alerts, alerts - silent
    for r in rules():
        if "alert" in r:
            assert r["labels"]["severity"] in ("critical", "warning", "info")
            assert r["annotations"]["summary"] and r["annotations"]["description"]


def _exported_names() -> set[str]:
    """Names service/metrics.py documents as exported (histograms expanded, robustness keys mapped)."""
    doc = metrics.__doc__ or ""
    names: set[str] = set()
    for name in re.findall(r"\bray_[a-z0-9_]+(?:\{bucket,sum,count\})?", doc):
        if name.endswith("{bucket,sum,count}"):
            base = name[: -len("{bucket,sum,count}")]
            names |= {base + s for s in ("bucket", "sum", "count")}
        elif name.endswith("_bucket"):
            base = name[: -len("bucket")]
            names |= {base + s for s in ("bucket", "sum", "count")}
        else:
            names.add(name)
    names |= {"ray_" + metrics.robustness_metric_name(k) for k in SUMMARY_KEYS}
    return names


# Ray Serve names outside metrics.py's (non-exhaustive) list; the e2e test proves they return data
_ALSO_EXPORTED = {"ray_serve_autoscaling_target_replicas"}


def test_rules_and_dashboard_use_exported_metric_names() -> None:
    known = _exported_names() | _ALSO_EXPORTED | {"up"}
    used = {(f"rule {r.get('alert') or r.get('record')}", n) for r in rules() for n in metric_names(r["expr"])}
    used |= {(f"panel {title!r}", n) for title, _, expr in panel_targets(dashboard()) for n in metric_names(expr)}
    unknown = sorted((where, n) for where, n in used if n not in known)
    assert not unknown, unknown
    # the names really carry Ray's prefix and Prometheus' conventions
    assert all(n.startswith("ray_") or n == "up" for _, n in used)
    assert "ray_steady_robustness_pan_p_change" in known and "ray_steady_live_flips_total" in known
