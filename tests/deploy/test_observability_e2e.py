"""Real Prometheus scraping the session's real Steady: every dashboard query returns data and every
alert rule evaluates.

One Ray per session: the ``service`` fixture (tests/serving.py) is shared with the service
tests. This module adds a model ``scored`` (v1 production, v2 candidate, each with a robustness.json
bound to its sha256) and reloads, so the robustness panels have a scored version to show; it leaves
the other models alone.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

from tests.conftest import encode, make_tiny_onnx, tiny_card
from tests.deploy.promql import (
    Prom, dashboard, grafana_regex, panel_targets, query_variables, rules, running_prometheus, substitute,
)
from tests.serving import ADMIN_TOKEN, Service

pytestmark = pytest.mark.e2e

JPEG = {"Content-Type": "image/jpeg"}
SCORED = "scored"
# robustness.json summary of the scored versions (plain numbers, keys of robustness.schema)
SUMMARIES = {
    1: {"accuracy.top1": 0.885, "accuracy.top5": 0.97, "pan.p_change": 0.036, "pan.mac": 0.03,
        "pan.flip_probability": 0.031, "scale.p_change": 0.052, "scale.flip_probability": 0.11,
        "consistency": 0.91, "compute.per_answer": 1.0},
    2: {"accuracy.top1": 0.87, "accuracy.top5": 0.96, "pan.p_change": 0.024, "pan.mac": 0.02,
        "pan.flip_probability": 0.022, "scale.p_change": 0.047, "scale.flip_probability": 0.10,
        "consistency": 0.93, "compute.per_answer": 1.0},
}


def _robustness_doc(model: str, version: int, sha256: str) -> dict[str, Any]:
    """A robustness.json that robustness.schema.validate accepts, bound to ``sha256``."""
    return {
        "schema_version": 1, "model": model, "version": version, "model_sha256": sha256,
        "data": {"fingerprint": "test", "images": 100, "labelled": 100}, "seed": 0, "config": {},
        "accuracy": {}, "protocols": {}, "summary": SUMMARIES[version],
        "summary_ci95": {}, "chosen": {"policy": "center", "resolution": 32, "rule": "test"},
        "created": "2026-11-22T00:00:00Z",
    }


@pytest.fixture(scope="module")
def scored(service: Service) -> Service:
    """Add model ``scored`` with robustness scores to the served repository and reload."""
    from robustness.schema import validate

    repo = service.repo
    if SCORED not in repo.models():
        repo.add(SCORED, make_tiny_onnx(seed=0), tiny_card(SCORED))
        repo.add(SCORED, make_tiny_onnx(seed=1), tiny_card(SCORED))
        for version in (1, 2):
            doc = _robustness_doc(SCORED, version, repo.verify(SCORED, version))
            validate(doc)
            (repo.version_dir(SCORED, version) / "robustness.json").write_text(json.dumps(doc))
        repo.set_stage(SCORED, "production", 1)
        repo.set_stage(SCORED, "candidate", 2)
    r = httpx.post(f"{service.base}/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                   timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["served"][SCORED] == {"production": 1, "candidate": 2}, r.json()
    # the reload reached one replica; the others follow it within a few seconds
    deadline = time.monotonic() + 30
    streak = 0
    while streak < 10:
        listing = httpx.get(f"{service.base}/v1/models", timeout=10).json()["models"]
        streak = streak + 1 if SCORED in {m["name"] for m in listing} else 0
        assert time.monotonic() < deadline, "not every replica serves the reloaded model after 30 s"
        time.sleep(0.1)
    return service


@pytest.fixture(scope="module")
def prometheus(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prom]:
    scrape = {"job_name": "steady", "static_configs": [{"targets": [f"127.0.0.1:{service.settings.metrics_port}"]}]}
    with running_prometheus([scrape], tmp_path_factory.mktemp("prometheus"), ready='up{job="steady"} == 1') as prom:
        yield prom


def _traffic(service: Service, burst: bool = True) -> None:
    """Good and bad requests over REST and V2, and (``burst``) a burst over max_inflight for 503s."""
    rng = np.random.default_rng(11)
    photos = [encode(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), "JPEG", quality=90) for _ in range(4)]
    big = encode(rng.integers(0, 255, (900, 1200, 3), dtype=np.uint8), "JPEG", quality=95)
    x = rng.normal(0, 1, (1, 3, 32, 32)).astype(np.float32)

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=service.base, timeout=60,
                                     limits=httpx.Limits(max_connections=100)) as client:
            async def classify(model: str, body: bytes, headers: dict[str, str] = JPEG) -> int:
                return (await client.post(f"/v1/models/{model}:classify", content=body, headers=headers)).status_code

            codes: list[int] = []
            for i in range(12):  # concurrent, so batches form
                codes += await asyncio.gather(*(classify(m, photos[(i + j) % 4])
                                                for j, m in enumerate(["tiny", "shadowed", "canary", SCORED] * 2
                                                                      + ["ensembled"])))
            # V2 JSON: good, and NaN input (400)
            body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                "data": x.reshape(-1).tolist()}]}
            for model in ("tiny", SCORED):
                r = await client.post(f"/v2/models/{model}/infer", json=body)
                assert r.status_code == 200, r.text
            nan = {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                               "data": [float("nan")] * 3072}]}
            assert (await client.post("/v2/models/tiny/infer", content=json.dumps(nan))).status_code == 400
            # an occlusion map (the explain panel's series)
            assert (await client.post("/v1/models/tiny:explain", content=photos[1], headers=JPEG)).status_code == 200
            # bad requests: not an image (400), unknown model (404), wrong media type (415)
            assert await classify("tiny", b"junk") == 400
            assert await classify(SCORED, b"junk") == 400
            assert await classify("no-such-model", photos[0]) == 404
            assert await classify("tiny", photos[0], {"Content-Type": "text/plain"}) in (400, 415)
            # a burst over max_inflight: Steady answers 503 + Retry-After
            for _ in range(3 if burst else 0):
                answers = await asyncio.gather(*(classify("tiny", big) for _ in range(64)))
                codes += answers
                if 503 in answers:
                    break
            return codes

    codes = asyncio.run(run())
    assert codes.count(200) >= 96 and (503 in codes or not burst), sorted(set(codes))


@pytest.fixture(scope="module")
def traffic(scored: Service, prometheus: Prom) -> Service:
    """Two waves of traffic a few seconds apart, while Prometheus scrapes: rate() sees counters move."""
    for _ in range(2):
        _traffic(scored)
        time.sleep(3)
    return scored


def _poll(what: str, check: Any, timeout: float, service: Service | None = None) -> Any:
    """``check()`` until it returns something truthy; light traffic meanwhile keeps rate windows filled."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what} after {timeout:.0f} s")
        if service is not None:
            _traffic(service, burst=False)
        time.sleep(1)


def _variables(prom: Prom, dash: dict[str, Any]) -> dict[str, list[str]]:
    """Real values of each template variable, resolved in order like Grafana (All selected)."""
    values: dict[str, list[str]] = {}
    for name, selector, label in query_variables(dash):
        sel = substitute(selector, {k: grafana_regex(v) for k, v in values.items()}) if selector else None
        params = {"match[]": sel} if sel else {}
        found = sorted(prom.get(f"/api/v1/label/{label}/values", **params))
        assert found, f"template variable {name}: label_values({selector}, {label}) is empty"
        values[name] = found
    return values


def test_every_panel_query_returns_data(traffic: Service, prometheus: Prom) -> None:
    service = traffic
    dash = dashboard()
    targets = list(panel_targets(dash))
    assert len({t for t, _, _ in targets}) >= 8

    deadline = time.monotonic() + 60  # Ray refreshes every second here (10 s by default)
    while True:
        values = _variables(prometheus, dash)
        everything = {k: grafana_regex(v) for k, v in values.items()}
        empty = [(title, ref, substitute(expr, everything)) for title, ref, expr in targets
                 if not prometheus.finite(substitute(expr, everything))]
        if not empty and SCORED in values["model"]:
            break
        if time.monotonic() > deadline:
            pytest.fail("panel queries without data after 60 s (All selected):\n"
                        + "\n".join(f"  {t} [{r}]: {e}" for t, r, e in empty) + f"\nvariables: {values}")
        _traffic(service, burst=False)  # keep the rate windows filled while Ray's metrics catch up
        time.sleep(2)

    assert {"tiny", "shadowed", "canary", SCORED} <= set(values["model"])
    assert {"1", "2"} <= set(values["version"]) and values["application"] == ["steady"]

    # one model and one version at a time: every query returns data for at least one served pair
    served = {(s["metric"]["model"], s["metric"]["version"])
              for s in prometheus.query("max by (model, version) (ray_steady_model_info) == 1")}
    answered: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for model, version in sorted(served):
        single = {"model": grafana_regex([model]), "version": grafana_regex([version]), "application": "steady"}
        for title, ref, expr in targets:
            if prometheus.finite(substitute(expr, single)):
                answered.setdefault((title, ref), set()).add((model, version))
    silent = [(t, r) for t, r, _ in targets if (t, r) not in answered]
    assert not silent, f"no data for any single (model, version) of {sorted(served)}: {silent}"

    # values, not just presence: the robustness gauges carry the bound robustness.json
    pan = prometheus.query(f'max by (version) (ray_steady_robustness_pan_p_change{{model="{SCORED}"}})')
    assert {s["metric"]["version"]: float(s["value"][1]) for s in pan} == pytest.approx(
        {"1": SUMMARIES[1]["pan.p_change"], "2": SUMMARIES[2]["pan.p_change"]})
    scored_flag = prometheus.query('max by (model, version) (ray_steady_robustness_scored)')
    flags = {(s["metric"]["model"], s["metric"]["version"]): float(s["value"][1]) for s in scored_flag}
    assert flags[(SCORED, "1")] == 1.0 and flags[("tiny", "1")] == 0.0
    rps = prometheus.query(substitute(
        'sum(rate(ray_steady_requests_total{model="tiny", code="200"}[$__rate_interval]))', {}))
    assert float(rps[0]["value"][1]) > 0


def test_every_alert_rule_evaluates(traffic: Service, prometheus: Prom) -> None:
    for rule in rules():
        prometheus.query(rule["expr"])  # raises with Prometheus' error when it does not parse or evaluate

    # the same rules, loaded by Prometheus from alerts.yml, evaluate cleanly against the real series
    deadline = time.monotonic() + 30
    while True:
        loaded = [r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]]
        if len(loaded) == len(rules()) and all(r.get("lastEvaluation", "").startswith("20") and
                                               r["evaluationTime"] > 0 for r in loaded):
            break
        assert time.monotonic() < deadline, loaded
        time.sleep(1)
    unhealthy = [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"]
    assert not unhealthy, unhealthy

    # real data through the recording rules: the gated value of the scored version, per transform,
    # and the live checks of its production answers
    gated = _poll("no steady:gated_flip_ratio for the scored version", lambda: prometheus.query(
        f'steady:gated_flip_ratio{{model="{SCORED}", version="1"}}'), 30)
    assert {s["metric"]["transform"]: float(s["value"][1]) for s in gated} == pytest.approx(
        {"shift": SUMMARIES[1]["pan.p_change"], "zoom": SUMMARIES[1]["scale.p_change"]})
    _poll("no live flip ratio for the scored version", lambda: prometheus.finite(
        f'steady:live_flip_ratio:1h{{model="{SCORED}", version="1"}}'), 30, traffic)

    # and an alert goes pending on the real series: unscored served versions, never the scored ones
    deadline = time.monotonic() + 20
    while True:
        alerts = prometheus.get("/api/v1/alerts")["alerts"]
        unscored = {(a["labels"]["model"], a["labels"]["version"]) for a in alerts
                    if a["labels"]["alertname"] == "SteadyServedVersionUnscored"}
        if ("tiny", "1") in unscored or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert ("tiny", "1") in unscored and ("shadowed", "2") in unscored, unscored
    assert not {(SCORED, "1"), (SCORED, "2")} & unscored
    assert all(a["state"] in ("pending", "firing") for a in alerts)
