"""The promotion gate: robustness scores + a policy -> pass/fail with reasons.

:func:`decide` is a pure function (no I/O). :func:`run_gate` reads the version's
robustness.json (refusing a missing or stale one), the policy YAML and production's
scores, calls :func:`decide`, and writes ``gate.json`` next to the model.

Policy YAML (keys are robustness.json ``summary`` keys; values numbers)::

    max:        {pan.p_change: 0.08, scale.flip_probability: 0.15}
    min:        {accuracy.top1: 0.70}
    regression: {pan.p_change: 0.01, accuracy.top1: -0.01}   # allowed change vs production

A ``regression`` limit is the allowed change ``candidate - production``: for a key where lower
is better (flip metrics) the limit is an allowed increase (>= 0); for a key where higher is
better (accuracy, consistency) it is an allowed decrease, written as a negative number.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from service.core.errors import GateError

__all__ = ["SECTIONS", "HIGHER_IS_BETTER", "GatePolicy", "Rule", "Decision", "parse_policy", "load_policy",
           "decide", "run_gate", "GATE_SCHEMA_VERSION"]

SECTIONS = ("max", "min", "regression")
GATE_SCHEMA_VERSION = 1
_EPS = 1e-9  # float noise in differences like 0.85 - 0.86
HIGHER_IS_BETTER_PREFIXES = ("accuracy.", "consistency")
HIGHER_IS_BETTER = "accuracy.*, embed@*.accuracy, consistency"


def higher_is_better(key: str) -> bool:
    return key.startswith(HIGHER_IS_BETTER_PREFIXES) or key.endswith(".accuracy")


@dataclass(frozen=True)
class GatePolicy:
    max: Mapping[str, float] = field(default_factory=dict)
    min: Mapping[str, float] = field(default_factory=dict)
    regression: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Rule:
    section: str
    key: str
    threshold: float
    measured: float | None
    baseline: float | None
    passed: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"section": self.section, "key": self.key, "threshold": self.threshold, "measured": self.measured,
                "baseline": self.baseline, "passed": self.passed, "reason": self.reason}


@dataclass(frozen=True)
class Decision:
    passed: bool
    rules: tuple[Rule, ...]

    @property
    def decision(self) -> str:
        return "pass" if self.passed else "fail"

    @property
    def reasons(self) -> list[str]:
        return [r.reason for r in self.rules if not r.passed]


def parse_policy(data: Any, known_keys: tuple[str, ...] | None = None) -> GatePolicy:
    """Validate a loaded policy mapping; raise :class:`GateError` naming the bad section, key or value."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise GateError(f"gate policy must be a mapping of sections {SECTIONS}, got {type(data).__name__}")
    unknown = [s for s in data if s not in SECTIONS]
    if unknown:
        raise GateError(f"unknown gate policy section(s) {unknown}: use {list(SECTIONS)}")
    sections: dict[str, dict[str, float]] = {}
    for section in SECTIONS:
        body = data.get(section) or {}
        if not isinstance(body, Mapping):
            raise GateError(f"gate policy section {section!r} must be a mapping of summary key -> number")
        parsed = {}
        for key, value in body.items():
            if not isinstance(key, str) or (known_keys is not None and key not in known_keys):
                raise GateError(f"unknown summary key {key!r} in section {section!r}: use one of {list(known_keys or ())}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise GateError(f"gate policy {section}.{key} must be a finite number, got {value!r}")
            parsed[key] = float(value)
        sections[section] = parsed
    for key, value in sections["regression"].items():
        if higher_is_better(key) and value > 0:
            raise GateError(f"regression.{key} = {value}: higher is better for {key}, so the allowed change "
                            "must be <= 0 (e.g. -0.01)")
        if not higher_is_better(key) and value < 0:
            raise GateError(f"regression.{key} = {value}: lower is better for {key}, so the allowed change "
                            "must be >= 0 (e.g. 0.01)")
    return GatePolicy(**sections)


def load_policy(path: str | Path, known_keys: tuple[str, ...] | None = None) -> tuple[GatePolicy, str]:
    """Parse a policy YAML file; returns the policy and the file's sha256."""
    import yaml

    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise GateError(f"cannot read gate policy {path}: {exc}") from exc
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise GateError(f"gate policy {path} is not valid YAML: {exc}") from exc
    return parse_policy(data, known_keys), hashlib.sha256(raw).hexdigest()


def decide(summary: Mapping[str, float], policy: GatePolicy, production: Mapping[str, float] | None = None) -> Decision:
    """Pure: apply every rule of ``policy`` to ``summary`` (and production's summary for regressions).

    A key the policy names but the summary lacks fails its rule (a gate never passes by omission).
    Regression rules pass when there is no production version to compare with.
    """
    rules: list[Rule] = []
    for key, limit in policy.max.items():
        v = summary.get(key)
        ok = v is not None and v <= limit + _EPS
        rules.append(Rule("max", key, limit, v, None, ok,
                          f"{key} = {_f(v)} {'<=' if ok else '>'} max {limit:g}" if v is not None
                          else f"{key} was not measured (max {limit:g})"))
    for key, limit in policy.min.items():
        v = summary.get(key)
        ok = v is not None and v >= limit - _EPS
        rules.append(Rule("min", key, limit, v, None, ok,
                          f"{key} = {_f(v)} {'>=' if ok else '<'} min {limit:g}" if v is not None
                          else f"{key} was not measured (min {limit:g})"))
    for key, allowed in policy.regression.items():
        v = summary.get(key)
        base = None if production is None else production.get(key)
        if production is None:
            rules.append(Rule("regression", key, allowed, v, None, True,
                              f"{key}: no production version to compare with"))
            continue
        if v is None or base is None:
            rules.append(Rule("regression", key, allowed, v, base, False,
                              f"{key} missing in {'candidate' if v is None else 'production'} scores"))
            continue
        change = v - base
        ok = change >= allowed - _EPS if higher_is_better(key) else change <= allowed + _EPS
        rules.append(Rule("regression", key, allowed, v, base, ok,
                          f"{key} changed {change:+.4f} vs production {base:.4f} (allowed {allowed:+g})"))
    return Decision(all(r.passed for r in rules), tuple(rules))


def _f(v: float | None) -> str:
    return "missing" if v is None else f"{v:.4f}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_scores(repo: Any, model: str, version: int, sha256: str) -> dict[str, Any]:
    """The version's robustness.json, refusing a missing, stale or malformed one (GateError)."""
    from service.core.errors import BoundFileError, BoundFileMissing, BoundFileStale
    from service.core.repository import read_bound_json

    try:
        doc = read_bound_json(repo.version_dir(model, version), "robustness.json", sha256)
    except BoundFileMissing as exc:
        raise GateError(f"{model}/{version} has no robustness.json: run `steady score` first") from exc
    except BoundFileStale as exc:
        raise GateError(f"{exc}; score again") from exc
    except BoundFileError as exc:
        raise GateError(str(exc)) from exc
    if not isinstance(doc.get("summary"), dict):
        raise GateError(f"robustness.json of {model}/{version} has no summary object")
    return doc


def run_gate(repo: Any, model: str, version: int, policy_path: str | Path) -> tuple[Decision, dict[str, Any]]:
    """Read scores and policy, decide, write gate.json; returns the decision and the gate.json content."""
    from robustness.schema import SUMMARY_KEYS
    from service.core.errors import SteadyError
    from service.core.repository import atomic_write_json

    try:
        sha = repo.verify(model, version)
    except SteadyError as exc:
        raise GateError(f"cannot gate {model}/{version}: {exc}") from exc
    doc = read_scores(repo, model, version, sha)
    policy, policy_sha = load_policy(policy_path, SUMMARY_KEYS)
    production = None
    prod_version = repo.stages(model).production
    if policy.regression and prod_version is not None and prod_version != version:
        try:
            production = read_scores(repo, model, prod_version, repo.verify(model, prod_version))["summary"]
        except SteadyError as exc:
            raise GateError(f"cannot compare with production v{prod_version}: {exc}") from exc
    decision = decide(doc["summary"], policy, production)
    intervals = doc.get("summary_ci95", {})
    out = {
        "schema_version": GATE_SCHEMA_VERSION,
        "model": model,
        "version": version,
        "decision": decision.decision,
        "reasons": decision.reasons,
        "rules": [dict(r.to_dict(), ci95=intervals.get(r.key)) for r in decision.rules],
        "policy_file": str(policy_path),
        "policy_sha256": policy_sha,
        "model_sha256": sha,
        "robustness_data_fingerprint": doc.get("data", {}).get("fingerprint"),
        "production_version": prod_version if production is not None else None,
        "time": _now(),
    }
    atomic_write_json(repo.version_dir(model, version) / "gate.json", out)
    return decision, out
