"""What the service serves: verified, warmed model versions, loaded and reloaded from the repository.

A :class:`Catalog` is an immutable snapshot (model -> stage -> :class:`ServedVersion`) that the
data plane swaps whole. :class:`CatalogLoader` builds it: every model's production version (the
newest when none is promoted) and its candidate, each checksum-verified, with the serving policy
and resolution its bound ``robustness.json`` chose, warmed at every batch size before it can
answer. On reload a version that fails to load never replaces a healthy one. No Ray, no HTTP.

Example:
    >>> loader = CatalogLoader(ModelRepository(root), settings, Metrics("memory"))   # doctest: +SKIP
    >>> catalog = loader.load_all()                                                  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import numpy as np

from service.core.card import ModelCard
from service.core.ensemble import Ensemble
from service.core.errors import BoundFileError, BoundFileMissing, InvalidInput, ModelNotFound, SteadyError
from service.core.preprocess import Preprocessor
from service.core.repository import ModelRepository, read_bound_json
from service.core.runtime import Classifier, RuntimeOptions
from service.metrics import Metrics
from service.settings import ServeSettings

__all__ = ["ServedVersion", "Catalog", "CatalogLoader", "load_version", "read_robustness", "served_preprocessing"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedVersion:
    """One loaded, verified and warmed-up model version."""

    model: str
    version: int
    stage: str
    card: ModelCard
    sha256: str
    classifier: Classifier = field(repr=False, compare=False)
    pre: Preprocessor = field(repr=False, compare=False)
    robustness: dict[str, Any] | None = None
    chosen: dict[str, Any] | None = None
    device_pre: Any = field(default=None, repr=False, compare=False)  # a DaliPreprocessor: preprocessing on the device

    @property
    def policy(self) -> str:
        return self.pre.policy

    @property
    def resolution(self) -> int:
        return self.pre.resolution

    @property
    def ensemble(self) -> Ensemble | None:
        return self.pre.ensemble

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "stage": self.stage,
            "sha256": self.sha256,
            "policy": self.policy,
            "resolution": self.resolution,
            "ensemble": None if self.ensemble is None else self.ensemble.to_dict(),
            "num_classes": self.card.num_classes,
            "robustness": self.robustness,
            "chosen": self.chosen,
        }


@dataclass(frozen=True)
class Catalog:
    """An immutable snapshot of what is served: swapped whole on reload."""

    models: Mapping[str, Mapping[str, ServedVersion]]  # model -> stage -> served

    def get(self, model: str) -> Mapping[str, ServedVersion]:
        entry = self.models.get(model)
        if not entry or "production" not in entry:
            raise ModelNotFound(f"model {model!r} is not served")
        return entry

    def all(self) -> list[ServedVersion]:
        return [sv for stages in self.models.values() for sv in stages.values()]


def read_robustness(version_dir: Any, sha256: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(summary, chosen) from the version's bound ``robustness.json``; (None, None) when it cannot be used.

    A version without scores is served with its card's policy; a stale or malformed file is logged
    and ignored the same way (the gate refuses such versions, but a forced promotion may serve one).
    """
    try:
        data = read_bound_json(version_dir, "robustness.json", sha256)
    except BoundFileMissing:
        return None, None
    except BoundFileError as exc:
        log.warning("ignoring robustness.json: %s", exc)
        return None, None
    summary = data.get("summary") if isinstance(data.get("summary"), dict) else None
    chosen = data.get("chosen") if isinstance(data.get("chosen"), dict) else None
    return summary, chosen


def served_preprocessing(card: ModelCard, chosen: dict[str, Any] | None) -> tuple[str, int]:
    """(policy, resolution) a version is served with: robustness.json's ``chosen``, else the card's."""
    policy, resolution = card.policy, card.resolution
    if chosen:
        if chosen.get("policy") in ("center", "object"):
            policy = chosen["policy"]
        if isinstance(chosen.get("resolution"), int) and chosen["resolution"] >= 8:
            resolution = chosen["resolution"]
    return policy, resolution


def load_version(repo: ModelRepository, model: str, version: int, stage: str, settings: ServeSettings) -> ServedVersion:
    """Load (checksum-verified), build the preprocessing and warm up at every batch size. Blocking."""
    loaded = repo.load(model, version)
    card = loaded.card
    summary, chosen = read_robustness(loaded.path, loaded.sha256)
    policy, resolution = served_preprocessing(card, chosen)
    classifier = Classifier(
        loaded.onnx_bytes, card,
        RuntimeOptions(provider=settings.provider, intra_op_threads=settings.ort_threads, inter_op_threads=1,
                       allow_spinning=settings.ort_spinning, static_sizes=(resolution,)),
    )
    try:
        ensemble = settings.ensemble_of(model, chosen)
    except InvalidInput as exc:  # a malformed chosen.ensemble: serve the bare policy, like an unusable robustness.json
        log.warning("ignoring the ensemble of %s/%s: %s", model, version, exc)
        ensemble = None
    pre = Preprocessor(card, policy=policy, resolution=resolution, max_pixels=settings.max_pixels, ensemble=ensemble,
                       budget_s=settings.decode_budget_s, max_webp_pixels=settings.max_webp_pixels)
    for size in settings.batch_sizes_to_warm:
        warm = np.zeros((size, 3, resolution, resolution), dtype=np.float32)
        logits = classifier.logits(warm)
        if logits.shape != (size, card.num_classes) or not np.all(np.isfinite(logits)):
            raise SteadyError(f"{model}/{version} failed warm-up at batch {size}: logits {logits.shape}")
    device_pre = _device_preprocessor(card, policy, resolution, settings, classifier, ensemble)
    return ServedVersion(model, version, stage, card, loaded.sha256, classifier, pre, summary, chosen, device_pre)


def _device_preprocessor(card: ModelCard, policy: str, resolution: int, settings: ServeSettings,
                         classifier: Classifier, ensemble: Ensemble | None = None) -> Any:
    """The DALI preprocessing of a version when ``preprocess_device`` resolves to gpu or dali-cpu (else None),
    warmed up at every batch size with a real JPEG so its buffers exist before traffic. A version serving a
    shift ensemble is preprocessed on the CPU: its copies are rendered from the decoded image."""
    from service.core.devices import resolve_preprocess_device

    where = resolve_preprocess_device(settings.preprocess_device, classifier.providers)
    if where == "cpu":
        return None
    if ensemble is not None:
        log.warning("%s/%s serves the shift ensemble %s: preprocessing on the CPU (the copies need the decoded "
                    "image), inference on %s", card.name, card.version, ensemble.name, classifier.providers[0])
        return None
    from service.core.errors import DeviceUnavailable
    from service.core.gpu_preprocess import DaliPreprocessor, warmup_jpeg

    try:
        device_pre = DaliPreprocessor(card, policy=policy, resolution=resolution,
                                      device="gpu" if where == "gpu" else "cpu", max_batch=settings.max_batch_size,
                                      threads=settings.decode_threads, max_pixels=settings.max_pixels)
    except DeviceUnavailable as exc:  # a card DALI cannot reproduce (nearest): auto keeps it on the CPU
        if settings.preprocess_device != "auto":
            raise
        log.warning("%s/%s: %s; preprocessing on the CPU", card.name, card.version, exc)
        return None
    item = device_pre.plan(warmup_jpeg())
    for size in settings.batch_sizes_to_warm:
        result = device_pre.logits(classifier, [item] * size)
        if result.device_images != size or not all(isinstance(r, np.ndarray) and np.all(np.isfinite(r))
                                                   for r in result.logits):
            raise SteadyError(f"{card.name}/{card.version}: {where} preprocessing failed warm-up at batch {size}")
    log.info("%s/%s: images decoded and resampled on %s (DALI)", card.name, card.version, where)
    return device_pre


class CatalogLoader:
    """Builds :class:`Catalog` snapshots from the repository and publishes what is served as metrics."""

    def __init__(self, repo: ModelRepository, settings: ServeSettings, metrics: Metrics) -> None:
        self.repo = repo
        self.settings = settings
        self.metrics = metrics

    def load_all(self) -> Catalog:
        """Every model's production (and candidate) version, all or nothing. Blocking."""
        catalog, errors = self._build_catalog(Catalog({}))
        if errors:
            raise SteadyError("; ".join(errors))
        if not catalog.models:
            raise SteadyError(f"no models to serve in {self.repo.root}")
        self._install(catalog)
        return catalog

    async def reload(self, old: Catalog) -> tuple[Catalog, dict[str, Any]]:
        """Re-read stages; load and warm new versions before switching; never replace a healthy one with a
        broken one. Returns the new catalog and a report (served, added, removed, errors)."""
        loop = asyncio.get_running_loop()
        catalog, errors = await loop.run_in_executor(None, self._build_catalog, old)
        self._install(catalog, previous=old)
        before = {(sv.model, sv.version, sv.stage) for sv in old.all()}
        after = {(sv.model, sv.version, sv.stage) for sv in catalog.all()}
        return catalog, {
            "served": {m: {s: sv.version for s, sv in stages.items()} for m, stages in catalog.models.items()},
            "added": [f"{m}/{v} ({s})" for m, v, s in sorted(after - before)],
            "removed": [f"{m}/{v} ({s})" for m, v, s in sorted(before - after)],
            "errors": errors,
        }

    def _build_catalog(self, old: Catalog) -> tuple[Catalog, list[str]]:
        models: dict[str, dict[str, ServedVersion]] = {}
        errors: list[str] = []
        reusable = {(sv.model, sv.version, sv.sha256): sv for sv in old.all()}
        for name in self.repo.models():
            try:
                versions = self.repo.versions(name)
                if not versions:
                    continue
                stages = self.repo.stages(name)
                wanted = {"production": stages.production if stages.production is not None else versions[-1]}
                if stages.candidate is not None and stages.candidate != wanted["production"]:
                    wanted["candidate"] = stages.candidate
            except SteadyError as exc:
                errors.append(f"{name}: {exc}")
                if name in old.models:
                    models[name] = dict(old.models[name])
                continue
            entry: dict[str, ServedVersion] = {}
            for stage, version in wanted.items():
                try:
                    sha = self.repo.verify(name, version)
                    served = reusable.get((name, version, sha))
                    if served is None:
                        served = load_version(self.repo, name, version, stage, self.settings)
                    elif served.stage != stage:
                        served = replace(served, stage=stage)
                    entry[stage] = served
                except SteadyError as exc:
                    errors.append(f"{name}/{version}: {exc}")
                    previous = old.models.get(name, {}).get(stage)
                    if previous is not None:  # keep serving the healthy one
                        entry[stage] = previous
            if entry:
                models[name] = entry
        return Catalog(models), errors

    def _install(self, catalog: Catalog, previous: Catalog | None = None) -> None:
        now = {(sv.model, sv.version, sv.stage) for sv in catalog.all()}
        for sv in (previous.all() if previous else []):
            if (sv.model, sv.version, sv.stage) not in now:
                self.metrics.served(sv.model, str(sv.version), sv.stage, sv.policy, sv.resolution, sv.sha256, None,
                                    serving=False)
        for sv in catalog.all():
            self.metrics.served(sv.model, str(sv.version), sv.stage, sv.policy, sv.resolution, sv.sha256, sv.robustness)

    def publish(self, catalog: Catalog) -> None:
        """Re-set the model info and robustness gauges (Ray drops gauges not refreshed for ~2 report intervals)."""
        for sv in catalog.all():
            self.metrics.served(sv.model, str(sv.version), sv.stage, sv.policy, sv.resolution, sv.sha256, sv.robustness)
