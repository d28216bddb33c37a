"""Remedies measured against their bare policy, and the cost term of the choice.

A remedy is a way of serving that should flip less than the bare policy: today the shift-ensemble
variants of each policy (``center+knight5@0.15``: the policy's answers averaged over whole-pixel
shifted copies where the model is unsure, :mod:`service.core.ensemble`), measured by the protocols
(:func:`robustness.protocols.plan_image`) into each record's ``remedies``. This module pools them
with 95% bootstrap intervals, compares each with its bare policy on the *same* images (paired
ratios of flip rates, the difference in top-1, answers fixed and broken against the labels, the
mean compute per answer), and applies :data:`REMEDY_RULE`: a costlier setting is chosen only when
it is within the compute budget and removes a stated fraction of the flips beyond the interval.

Example:
    >>> remedies = aggregate_remedies(records, config, seed=0, labelled=True)      # doctest: +SKIP
    >>> chosen = choose_remedy(choose(result, card, config), remedies, card)       # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from robustness.protocols import ProtocolConfig, remedy_name
from robustness.stats import Estimate, paired_estimate, ratio_estimate
from service.core.card import ModelCard

__all__ = ["RemedyRule", "REMEDY_RULE", "PAN_VARIANTS", "aggregate_remedies", "choose_remedy",
           "remedy_summary"]

# the flip metrics of the three pan directions: diagonal pairs, the horizontal translate sequence, vertical pairs
PAN_VARIANTS = ("pan.p_change", "pan.flip_probability", "pan.p_change_vertical")
_FLIP_KEYS = PAN_VARIANTS + ("pan.mac", "scale.p_change")
_ACCURACY_KEYS = ("accuracy.top1", "accuracy.top5")
# summary keys a chosen ensemble replaces (what it was measured on); the others stay the bare policy's
OVERRIDDEN = _ACCURACY_KEYS + _FLIP_KEYS + ("compute.per_answer",)


@dataclass(frozen=True)
class RemedyRule:
    """The cost term of the choice: the compute budget and the flip reduction a costlier setting must show.

    Attributes:
        max_cost: most model evaluations per answer (mean over the protocols' answers); 1 = bare only.
        min_gain: fraction of the flips a costlier setting must remove on every pan variant, beyond the
            95% interval of the paired ratio (its upper bound <= 1 - min_gain).
        tie: worst pan ratios within this of the best count as tied; the cheapest tied setting wins.
    """

    max_cost: float = 1.5
    min_gain: float = 0.25
    tie: float = 0.05

    def __post_init__(self) -> None:
        if not math.isfinite(self.max_cost) or self.max_cost < 1:
            raise ValueError(f"max_cost must be >= 1 (model evaluations per answer), got {self.max_cost}")
        if not 0 <= self.min_gain < 1:
            raise ValueError(f"min_gain must be in [0, 1), got {self.min_gain}")
        if not 0 <= self.tie < 1:
            raise ValueError(f"tie must be in [0, 1), got {self.tie}")

    def to_dict(self) -> dict[str, float]:
        return {"max_cost": self.max_cost, "min_gain": self.min_gain, "tie": self.tie}


REMEDY_RULE = (
    "Cost term: shift-ensemble settings are considered on top of the chosen policy, only at the card's test "
    "resolution. A setting is admissible when (1) its mean compute per answer (model evaluations, over the base "
    "view, the pan views and the +-5% zoom frames) is at most max_cost = {max_cost:g}; (2) on every pan variant (diagonal pan.p_change, "
    "horizontal translate pan.flip_probability, vertical pan.p_change_vertical) the 95% upper bound of its flip "
    "rate divided by the bare policy's (paired bootstrap over images) is at most 1 - min_gain = {keep:g}, i.e. it "
    "removes at least {gain:.0%} of the flips beyond the interval (a direction where the bare policy never flipped "
    "cannot show that); (3) its scale p_change (the +-5% zoom pairs) is not above the bare policy's beyond the "
    "interval (lower bound of the paired ratio <= 1); and (4) with labels, its top-1 is not lower beyond the interval (upper bound "
    "of the paired difference >= 0). Among admissible settings the lowest worst pan ratio wins; settings within "
    "{tie:g} of it count as tied and the cheapest of them wins. None admissible: the bare policy (compute 1)."
)


# ------------------------------------------------------------------ pooling
def _rows(records: Sequence[dict[str, Any]], section: str, name: str, key: str) -> np.ndarray | None:
    rows = [r.get(section, {}).get(name, {}).get(key) for r in records]
    if any(x is None for x in rows) or not rows:
        return None
    return np.asarray(rows, dtype=np.float64)


def _est(rows: np.ndarray | None, seed: int) -> dict[str, Any] | None:
    if rows is None:
        return None
    e = ratio_estimate(rows[:, 0], rows[:, 1], seed=seed)
    return None if e is None else e.to_dict()


def _paired(a: np.ndarray | None, b: np.ndarray | None, seed: int, kind: str) -> dict[str, Any] | None:
    if a is None or b is None:
        return None
    e = paired_estimate(a[:, 0], a[:, 1], b[:, 0], b[:, 1], seed=seed, kind=kind)
    return None if e is None else e.to_dict()


def aggregate_remedies(records: Sequence[dict[str, Any]], config: ProtocolConfig, seed: int,
                       labelled: bool) -> list[dict[str, Any]]:
    """Every policy's ensemble variants, pooled and compared with the bare policy on the same images."""
    records = sorted(records, key=lambda r: r["index"])
    out: list[dict[str, Any]] = []
    for policy in config.policies:
        for ens in config.ensemble_settings:
            name = remedy_name(policy, ens)
            if _rows(records, "remedies", name, "compute") is None:
                continue
            setting: dict[str, Any] = {"name": name, "policy": policy, "ensemble": ens.to_dict(),
                                       "compute": _est(_rows(records, "remedies", name, "compute"), seed),
                                       "used": _est(_rows(records, "remedies", name, "used"), seed)}
            groups: dict[str, dict[str, Any]] = {}
            vs_bare: dict[str, Any] = {}
            for key in (_ACCURACY_KEYS if labelled else ()) + _FLIP_KEYS:
                mine = _rows(records, "remedies", name, key)
                if mine is None:
                    continue
                group, _, metric = key.partition(".")
                groups.setdefault(group, {})[metric] = _est(mine, seed)
                kind = "difference" if key in _ACCURACY_KEYS else "ratio"
                vs_bare[key] = _paired(mine, _rows(records, "policies", policy, key), seed, kind)
            setting.update(groups)
            setting["vs_bare"] = vs_bare
            if labelled:
                answers = {}
                for key in ("fixed.top1", "broken.top1", "fixed.views", "broken.views"):
                    rows = _rows(records, "remedies", name, key)
                    if rows is not None:
                        answers[key.replace(".", "_")] = int(rows[:, 0].sum())
                        answers["n_" + key.partition(".")[2]] = int(rows[:, 1].sum())
                setting["answers"] = answers
            out.append(setting)
    return out


# ------------------------------------------------------------------ the choice
def _why_not(setting: dict[str, Any], rule: RemedyRule, labelled: bool) -> str | None:
    """The first unmet condition of REMEDY_RULE, or None when the setting is admissible."""
    compute = setting["compute"]["value"]
    if compute > rule.max_cost + 1e-12:
        return f"compute {compute:.3f} per answer is over max_cost {rule.max_cost:g}"
    vs = setting["vs_bare"]
    for key in PAN_VARIANTS:
        ratio = vs.get(key)
        if ratio is None:
            return f"{key}: no bare flips to compare with"
        if ratio["ci95"][1] > 1 - rule.min_gain + 1e-12:
            return (f"{key}: flip ratio {ratio['value']:.2f} [{ratio['ci95'][0]:.2f}, {ratio['ci95'][1]:.2f}] "
                    f"does not stay under {1 - rule.min_gain:g}")
    scale = vs.get("scale.p_change")
    if scale is not None and scale["ci95"][0] > 1 + 1e-12:
        return f"scale.p_change is higher than bare beyond the interval (ratio {scale['value']:.2f})"
    top1 = vs.get("accuracy.top1")
    if labelled and top1 is not None and top1["ci95"][1] < -1e-12:
        return f"top-1 is lower than bare beyond the interval ({top1['value']:+.3f})"
    return None


def _worst_ratio(setting: dict[str, Any]) -> float:
    return max(setting["vs_bare"][k]["value"] for k in PAN_VARIANTS)


def choose_remedy(chosen: dict[str, Any], remedies: Sequence[dict[str, Any]], card: ModelCard,
                  rule: RemedyRule = RemedyRule()) -> dict[str, Any]:
    """``chosen`` (policy and resolution, :func:`robustness.scorer.choose`) plus the ensemble REMEDY_RULE picks.

    Adds ``ensemble`` (None, or the setting with its ``compute``), ``remedy`` (the budget and every
    candidate's verdict) and appends the cost term to ``rule``.
    """
    labelled = bool(chosen.get("labelled"))
    verdicts = []
    admissible = []
    for setting in remedies:
        if setting["policy"] != chosen["policy"]:
            continue
        why = ("the chosen resolution is not the card's" if chosen["resolution"] != card.resolution
               else _why_not(setting, rule, labelled))
        verdicts.append({"name": setting["name"], "admissible": why is None, "why_not": why})
        if why is None:
            admissible.append(setting)
    best = None
    if admissible:
        lowest = min(_worst_ratio(s) for s in admissible)
        tied = [s for s in admissible if _worst_ratio(s) <= lowest + rule.tie + 1e-12]
        best = min(tied, key=lambda s: (s["compute"]["value"], _worst_ratio(s), s["name"]))
    text = REMEDY_RULE.format(max_cost=rule.max_cost, keep=1 - rule.min_gain, gain=rule.min_gain, tie=rule.tie)
    return dict(chosen, rule=f"{chosen['rule']} {text}",
                ensemble=None if best is None else dict(best["ensemble"], compute=best["compute"]["value"]),
                remedy={**rule.to_dict(), "chosen": None if best is None else best["name"], "candidates": verdicts})


def remedy_summary(remedies: Sequence[dict[str, Any]], chosen: dict[str, Any],
                   images: int) -> dict[str, dict[str, Any]]:
    """Summary estimates that the chosen ensemble replaces (``OVERRIDDEN`` keys), ``compute.per_answer`` always.

    The chosen ensemble was measured on the base and pan answers and the scale protocol's +-5% pairs;
    ``scale.flip_probability``, embed and consistency keep the bare policy's values.
    """
    name = (chosen.get("remedy") or {}).get("chosen")
    setting = next((s for s in remedies if s["name"] == name), None)
    if setting is None:
        return {"compute.per_answer": Estimate(1.0, (1.0, 1.0), images).to_dict()}
    out: dict[str, Any] = {"compute.per_answer": setting["compute"]}
    for key in OVERRIDDEN[:-1]:
        group, _, metric = key.partition(".")
        est = setting.get(group, {}).get(metric)
        if est is not None:
            out[key] = est
    return out
