"""Promotion and rollback: stage changes that respect the gate.

A version may enter a stage only when its ``gate.json`` says ``pass`` for its exact ONNX
sha256 and the stored files still verify — checked under the model's lock by
``ModelRepository.set_stage(check=...)`` — or when forced with a reason, which is recorded
in the stages history as ``forced``.
"""

from __future__ import annotations

from typing import Any

from service.core.errors import BoundFileError, BoundFileMissing, PromotionRefused, SteadyError
from service.core.repository import ModelRepository, Stages, read_bound_json

__all__ = ["gate_check", "promote", "rollback"]


def gate_check(repo: ModelRepository, model: str) -> Any:
    """A ``check(version)`` for ``set_stage`` that raises PromotionRefused unless the gate passed."""

    def check(version: int) -> None:
        try:
            sha = repo.verify(model, version)
        except SteadyError as exc:
            raise PromotionRefused(f"refusing {model}/{version}: model files do not verify: {exc}") from exc
        try:
            gate = read_bound_json(repo.version_dir(model, version), "gate.json", sha)
        except BoundFileMissing as exc:
            raise PromotionRefused(f"refusing {model}/{version}: no gate.json (run `steady gate`), "
                                   "or use --force --reason") from exc
        except BoundFileError as exc:
            raise PromotionRefused(f"refusing {model}/{version}: {exc}") from exc
        if gate.get("decision") != "pass":
            reasons = gate.get("reasons")
            text = "; ".join(str(r) for r in reasons) if isinstance(reasons, list) and reasons else "no reasons recorded"
            raise PromotionRefused(f"refusing {model}/{version}: gate decision is "
                                   f"{gate.get('decision')!r}: {text}")

    return check


def promote(repo: ModelRepository, model: str, version: int, *, stage: str = "production", force: bool = False,
            reason: str = "") -> Stages:
    """Point ``stage`` at ``version`` if its gate passed (or ``force`` with a non-empty ``reason``)."""
    if force:
        if not reason.strip():
            raise PromotionRefused("--force needs --reason TEXT (recorded in the stages history)")
        return repo.set_stage(model, stage, version, reason=reason, forced=True)
    return repo.set_stage(model, stage, version, reason=reason or "gate passed", check=gate_check(repo, model))


def rollback(repo: ModelRepository, model: str, reason: str = "rollback") -> Stages:
    return repo.rollback(model, reason=reason)
