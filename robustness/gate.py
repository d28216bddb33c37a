"""The promotion gate: robustness scores + a policy -> pass/fail with reasons.

:func:`decide` is a pure function (no I/O). :func:`run_gate` reads the version's
robustness.json (refusing a missing or stale one), the policy YAML and production's
scores, calls :func:`decide`, and writes ``gate.json`` next to the model.

Policy YAML (keys are robustness.json ``summary`` keys; values numbers)::

    max:        {pan.p_change: 0.08, scale.flip_probability: 0.15, compute.per_answer: 1.5}
    min:        {accuracy.top1: 0.70}
    regression: {pan.p_change: 0.01, accuracy.top1: -0.01}   # allowed change vs production
    steadier:                                                # optional: a remedy must beat production
      margin: 0.25                                           # each flip key <= (1 - margin) x production's
      flips: [pan.p_change, pan.flip_probability, pan.p_change_vertical]
      accuracy: [accuracy.top1]                              # not below production's 95% interval

A ``regression`` limit is the allowed change ``candidate - production``: for a key where lower
is better (flip metrics) the limit is an allowed increase (>= 0); for a key where higher is
better (accuracy, consistency) it is an allowed decrease, written as a negative number.

``compute.per_answer`` is the compute budget: model evaluations per answer of the serving setting
``steady score`` chose (1 for a bare policy, more with a shift ensemble).

``steadier`` requires the candidate to flip less than production by a margin on every listed flip
key, with every listed accuracy key not lower than production's beyond production's 95% interval
(value >= its lower bound). Without a production version to compare with it passes, like
``regression``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from service.core.errors import GateError

__all__ = ["SECTIONS", "HIGHER_IS_BETTER", "GatePolicy", "Steadier", "Rule", "Decision", "parse_policy",
           "load_policy", "decide", "run_gate", "GATE_SCHEMA_VERSION"]

SECTIONS = ("max", "min", "regression", "steadier")
GATE_SCHEMA_VERSION = 1
_EPS = 1e-9  # float noise in differences like 0.85 - 0.86
HIGHER_IS_BETTER_PREFIXES = ("accuracy.", "consistency")
HIGHER_IS_BETTER = "accuracy.*, embed@*.accuracy, consistency"


def higher_is_better(key: str) -> bool:
    return key.startswith(HIGHER_IS_BETTER_PREFIXES) or key.endswith(".accuracy")


@dataclass(frozen=True)
class Steadier:
    """Flip keys must be at most ``(1 - margin)`` x production's; accuracy keys not below its interval."""

    margin: float
    flips: tuple[str, ...]
    accuracy: tuple[str, ...] = ()


@dataclass(frozen=True)
class GatePolicy:
    max: Mapping[str, float] = field(default_factory=dict)
    min: Mapping[str, float] = field(default_factory=dict)
    regression: Mapping[str, float] = field(default_factory=dict)
    steadier: Steadier | None = None


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
    for section in SECTIONS[:3]:
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
    return GatePolicy(**sections, steadier=_parse_steadier(data.get("steadier"), known_keys))


def _parse_steadier(body: Any, known_keys: tuple[str, ...] | None) -> Steadier | None:
    if body is None:
        return None
    if not isinstance(body, Mapping):
        raise GateError("gate policy section 'steadier' must be a mapping with margin, flips and accuracy")
    unknown = sorted(str(k) for k in body if k not in ("margin", "flips", "accuracy"))
    if unknown:
        raise GateError(f"unknown field(s) {unknown} in section 'steadier': use margin, flips, accuracy")
    margin = body.get("margin")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < 1:
        raise GateError(f"steadier.margin must be a number in [0, 1) (the fraction of production's flips to "
                        f"remove), got {margin!r}")
    lists: dict[str, tuple[str, ...]] = {}
    for name in ("flips", "accuracy"):
        keys = body.get(name) or []
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise GateError(f"steadier.{name} must be a list of summary keys, got {keys!r}")
        for key in keys:
            if known_keys is not None and key not in known_keys:
                raise GateError(f"unknown summary key {key!r} in steadier.{name}: use one of {list(known_keys)}")
            if higher_is_better(key) != (name == "accuracy") or key == "compute.per_answer":
                kind = "an accuracy (higher is better)" if name == "accuracy" else "a flip metric (lower is better)"
                raise GateError(f"steadier.{name} lists {key!r}, which is not {kind}")
        lists[name] = tuple(keys)
    if not lists["flips"]:
        raise GateError("steadier.flips must name at least one flip metric")
    return Steadier(float(margin), lists["flips"], lists["accuracy"])


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


def decide(summary: Mapping[str, float], policy: GatePolicy, production: Mapping[str, float] | None = None,
           production_ci95: Mapping[str, Any] | None = None) -> Decision:
    """Pure: apply every rule of ``policy`` to ``summary`` (and production's summary for regressions).

    A key the policy names but the summary lacks fails its rule (a gate never passes by omission).
    Regression and steadier rules pass when there is no production version to compare with; a
    steadier accuracy rule needs production's 95% interval (``production_ci95``, its ``summary_ci95``).
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
    if policy.steadier is not None:
        rules.extend(_steadier(summary, policy.steadier, production, production_ci95 or {}))
    return Decision(all(r.passed for r in rules), tuple(rules))


def _steadier(summary: Mapping[str, float], rule: Steadier, production: Mapping[str, float] | None,
              production_ci95: Mapping[str, Any]) -> list[Rule]:
    out: list[Rule] = []
    for key in rule.flips + rule.accuracy:
        v = summary.get(key)
        if production is None:
            out.append(Rule("steadier", key, rule.margin, v, None, True, f"{key}: no production version to compare with"))
            continue
        base = production.get(key)
        if v is None or base is None:
            out.append(Rule("steadier", key, rule.margin, v, base, False,
                            f"{key} missing in {'candidate' if v is None else 'production'} scores"))
            continue
        if key in rule.flips:
            limit = (1 - rule.margin) * base
            ok = v <= limit + _EPS
            out.append(Rule("steadier", key, rule.margin, v, base, ok,
                            f"{key} = {v:.4f} {'<=' if ok else '>'} (1 - {rule.margin:g}) x production {base:.4f}"))
            continue
        ci = production_ci95.get(key)
        if not ci:
            out.append(Rule("steadier", key, rule.margin, v, base, False,
                            f"{key}: production's 95% interval is unknown (score it again)"))
            continue
        ok = v >= float(ci[0]) - _EPS
        out.append(Rule("steadier", key, rule.margin, v, base, ok,
                        f"{key} = {v:.4f} {'>=' if ok else '<'} production's lower bound {float(ci[0]):.4f} "
                        f"(production {base:.4f} [{float(ci[0]):.4f}, {float(ci[1]):.4f}])"))
    return out


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
    production_ci95: dict[str, Any] = {}
    prod_version = repo.stages(model).production
    if (policy.regression or policy.steadier) and prod_version is not None and prod_version != version:
        try:
            prod_doc = read_scores(repo, model, prod_version, repo.verify(model, prod_version))
        except SteadyError as exc:
            raise GateError(f"cannot compare with production v{prod_version}: {exc}") from exc
        production = prod_doc["summary"]
        production_ci95 = prod_doc.get("summary_ci95") if isinstance(prod_doc.get("summary_ci95"), dict) else {}
    decision = decide(doc["summary"], policy, production, production_ci95)
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
