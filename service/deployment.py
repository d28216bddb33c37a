"""The thin Ray Serve deployment: one ingress class wrapping the data plane, with ``@serve.batch``.

Every request enters the replica's Starlette app (:mod:`service.routes`); each image
tensor goes through one ``@serve.batch`` queue (shared by every served version; a batch is
split by version and shape before ONNX Runtime runs), so dynamic batching happens where
the model lives and nothing crosses a process boundary twice.

Reload with several replicas: ``POST /v1/admin/reload`` reaches one replica, which loads and
warms the new versions, switches, then bumps a counter held by a small named Ray actor
(``steady-reload-<app>`` in namespace ``steady``, created only when more than one replica
can exist); every other replica polls it every ``RELOAD_POLL_S`` and reloads itself the same
way, so each switch is load-then-swap and no request fails. A replica that starts later
reads the repository's current stages.

Example:
    >>> app = SteadyServer.options(**s.deployment_options()).bind(s.to_dict())   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import ray
from ray import serve

from service.binds import bind_replica_grpc_to_loopback
from service.catalog import ServedVersion
from service.drain import start_drain_watch
from service.dataplane import DataPlane
from service.metrics import Metrics
from service.core.devices import gpu_readings
from service.core.repository import ModelRepository
from service.routes import build_routes
from service.settings import ServeSettings

__all__ = ["SteadyServer"]

log = logging.getLogger(__name__)

GAUGE_REFRESH_S = 2.0  # Ray evicts gauges not re-set within two report intervals
RELOAD_POLL_S = 2.0  # how often replicas look for a reload done by another replica


@ray.remote(num_cpus=0)
class _ReloadGeneration:
    """A counter shared by the replicas of one application: ``/v1/admin/reload`` reaches one
    replica; it reloads, bumps the counter, and the others reload when they see it move."""

    def __init__(self) -> None:
        self.generation = 0

    def bump(self) -> int:
        self.generation += 1
        return self.generation

    def get(self) -> int:
        return self.generation


@serve.deployment(name="steady")
@serve.ingress()
class SteadyServer:
    """Loads, verifies and warms every served version in ``__init__``: a replica is ready only after."""

    async def __init__(self, settings: dict[str, Any]) -> None:
        bind_replica_grpc_to_loopback()  # before Serve starts the replica's gRPC server (service/binds.py)
        self.settings = ServeSettings.from_dict(settings)
        self.metrics = Metrics("ray")
        self._infer_pool = ThreadPoolExecutor(1, thread_name_prefix="steady-ort")
        self._generation: Any = None
        self._seen_generation = 0
        self.plane = DataPlane(self.settings, ModelRepository(self.settings.repo), self.metrics, infer=self._infer,
                               after_reload=self._announce_reload, device_infer=self._infer_encoded)
        self._batched.set_max_batch_size(self.settings.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self._batched_encoded.set_max_batch_size(self.settings.max_batch_size)
        self._batched_encoded.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.plane.load_all)
        if self.settings.autoscaling or self.settings.num_replicas > 1:
            self._generation = _ReloadGeneration.options(
                name=f"steady-reload-{self.settings.app_name}", namespace="steady", get_if_exists=True,
                lifetime="detached").remote()
            self._seen_generation = await self._generation.get.remote()
        self._gauges = asyncio.get_running_loop().create_task(self._background_loop())
        self._drain_watch = start_drain_watch(self.plane, self.settings.app_name)  # SIGTERM of steady serve
        log.info("steady replica ready: %s", {m: {s: v.version for s, v in st.items()}
                                              for m, st in self.plane.catalog.models.items()})

    def __del__(self) -> None:
        """Serve stops this replica (scale-down, redeploy, delete): a drain must not wait for it."""
        watch = getattr(self, "_drain_watch", None)
        if watch is not None:
            try:
                watch.leave()
            except RuntimeError:  # the event loop is already closed (garbage collection at process exit)
                pass

    def __serve_build_asgi_app__(self) -> Any:
        return build_routes(self.plane, self.settings, self.metrics)

    async def _background_loop(self) -> None:
        """Re-publish gauges; follow reloads another replica announced."""
        while True:
            try:
                self.plane.publish_gauges()
                if self.settings.replica_gpus or any(sv.device_pre is not None for sv in self.plane.catalog.all()):
                    self.metrics.gpu(await asyncio.get_running_loop().run_in_executor(None, gpu_readings))
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                log.exception("publishing gauges failed")
            if self._generation is not None:
                try:
                    generation = await self._generation.get.remote()
                    if generation > self._seen_generation:
                        self._seen_generation = generation
                        result = await self.plane.reload(propagate=False)
                        log.info("reloaded after generation %d: %s", generation, result)
                except Exception:  # noqa: BLE001 - keep serving what is loaded
                    log.exception("following a reload failed")
            await asyncio.sleep(min(GAUGE_REFRESH_S, RELOAD_POLL_S))

    async def _announce_reload(self) -> None:
        if self._generation is not None:
            self._seen_generation = await self._generation.bump.remote()

    def check_health(self) -> None:
        if not self.plane.ready:
            raise RuntimeError("models are not loaded")

    async def _infer(self, served: ServedVersion, tensor: np.ndarray) -> np.ndarray:
        result = await self._batched(served, tensor, time.perf_counter())
        if isinstance(result, BaseException):
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)  # both re-set from the settings in __init__
    async def _batched(self, served: list[ServedVersion], tensors: list[np.ndarray], enqueued: list[float]) -> list[Any]:
        start = time.perf_counter()
        groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        for i, (sv, t) in enumerate(zip(served, tensors)):
            groups.setdefault((id(sv), t.shape), []).append(i)
        results: list[Any] = [None] * len(tensors)
        loop = asyncio.get_running_loop()
        for idx in groups.values():
            sv = served[idx[0]]
            batch = np.stack([tensors[i] for i in idx])
            t0 = time.perf_counter()
            try:
                logits = await loop.run_in_executor(self._infer_pool, sv.classifier.logits, batch)
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request
                for i in idx:
                    results[i] = exc
                continue
            self.metrics.batch(sv.model, str(sv.version), len(idx), time.perf_counter() - t0,
                               [max(0.0, start - enqueued[i]) for i in idx])
            for row, i in enumerate(idx):
                results[i] = logits[row]
        return results

    # ------------------------------------------------------------------ the device path (preprocess_device gpu)
    async def _infer_encoded(self, served: ServedVersion, planned: Any) -> np.ndarray:
        result = await self._batched_encoded(served, planned, time.perf_counter())
        if isinstance(result, BaseException):
            raise result
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)  # both re-set from the settings in __init__
    async def _batched_encoded(self, served: list[ServedVersion], planned: list[Any], enqueued: list[float]) -> list[Any]:
        """Encoded images planned on the host -> logits: one DALI run and one IO-bound ONNX Runtime call per
        version (``DaliPreprocessor.logits``); a corrupt image fails only its own request."""
        groups: dict[int, list[int]] = {}
        for i, sv in enumerate(served):
            groups.setdefault(id(sv), []).append(i)
        results: list[Any] = [None] * len(planned)
        loop = asyncio.get_running_loop()
        for idx in groups.values():
            sv = served[idx[0]]
            t0 = time.perf_counter()
            try:
                batch = await loop.run_in_executor(self._infer_pool, sv.device_pre.logits, sv.classifier,
                                                   [planned[i] for i in idx])
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request
                for i in idx:
                    results[i] = exc
                continue
            self.metrics.batch(sv.model, str(sv.version), len(idx), batch.inference_s,
                               [max(0.0, t0 - enqueued[i]) for i in idx])
            self.metrics.device_batch(sv.model, str(sv.version), batch)
            for row, i in zip(batch.logits, idx):
                results[i] = row
        return results

