"""deploy/grafana: the dashboard's structure and its provisioning (its queries run in the e2e test)."""

from __future__ import annotations

import yaml

from tests.deploy.promql import DEPLOY, dashboard, grafana_regex, panel_targets, query_variables, substitute

GRAFANA = DEPLOY / "grafana"


def test_dashboard_panels() -> None:
    dash = dashboard()
    panels = dash["panels"]
    assert len(panels) >= 8
    assert len({p["id"] for p in panels}) == len(panels)
    titles = " | ".join(p["title"].lower() for p in panels)
    for needed in ("requests/s", "latency", "error ratio", "batch size", "queue time", "robustness",
                   "live flip rate", "shadow agreement", "replicas", "explain"):
        assert needed in titles, needed
    for p in panels:
        assert p["targets"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0
    # no two panels overlap
    cells = [(x, y) for p in panels for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
             for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])]
    assert len(cells) == len(set(cells))


def test_template_variables() -> None:
    dash = dashboard()
    variables = {name: (selector, label) for name, selector, label in query_variables(dash)}
    assert variables["model"] == ("ray_steady_model_info", "model")
    assert variables["version"][1] == "version" and "$model" in (variables["version"][0] or "")
    kinds = {v["name"]: v["type"] for v in dash["templating"]["list"]}
    assert kinds["datasource"] == "datasource"
    # every variable a query uses is defined, and filters use regex matchers (multi-value, All)
    for title, ref, expr in panel_targets(dash):
        substitute(expr, {name: "x" for name in kinds})  # raises on an undefined variable
        for name in ("model", "version", "application"):
            assert f'="${name}"' not in expr, (title, ref, "use =~ for a multi-value variable")


def test_grafana_regex_escapes_like_grafana() -> None:
    assert grafana_regex(["tiny"]) == "tiny"
    assert grafana_regex(["a", "efficientnet-lite0"]) == "(a|efficientnet-lite0)"
    assert grafana_regex(["v1.2"]) == "v1\\\\.2"


def test_provisioning() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (source,) = ds["datasources"]
    assert ds["apiVersion"] == 1 and source["type"] == "prometheus" and source["url"].endswith(":9090")
    boards = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "steady.yaml").read_text())
    (provider,) = boards["providers"]
    assert boards["apiVersion"] == 1 and provider["type"] == "file"
    # compose mounts dashboard.json into the folder the provider reads
    compose = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    mounts = [v.split(":") for v in compose["services"]["grafana"]["volumes"]]
    assert any(src.endswith("grafana/dashboard.json") and dst.startswith(provider["options"]["path"] + "/")
               for src, dst, *_ in mounts)
