"""The data plane: validation, version routing and side traffic over the served catalog. No Ray, no HTTP.

Routes decode HTTP and call :class:`DataPlane`; the data plane validates, picks the
version (production, a canary draw of the candidate, or the one asked for), runs the
card's preprocessing in a thread pool and hands one image tensor at a time to an
``infer`` coroutine: in the service that is the deployment's ``@serve.batch`` method,
in unit tests a direct ONNX Runtime call. A version serving a shift ensemble
(:mod:`service.core.ensemble`) answers the bare view first; only when its top-1 margin is under the
ensemble's threshold are the extra copies rendered and sent through the same ``infer`` (the same
batch queue), and the answer is their mean softmax, carried as ``log(p)`` where logits are expected.
Shadow scoring and live robustness checks run as background tasks after the answer is ready,
bounded by ``max_background``.

Example:
    >>> plane = DataPlane(settings, ModelRepository(root), Metrics("memory"))   # doctest: +SKIP
    >>> plane.load_all()                                                         # doctest: +SKIP
    >>> await plane.classify("lite0", jpeg_bytes, top_k=5)                       # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Awaitable, Callable

import numpy as np

from robustness.explain import OcclusionConfig, assemble, describe, occluded, overlay, png_bytes
from service import v2
from service.catalog import Catalog, CatalogLoader, ServedVersion
from service.core.boxes import Box, shift_box, zoom_box
from service.core.ensemble import as_logits, margin
from service.core.errors import ImageTooLarge, InvalidInput, Overloaded, VersionNotFound
from service.core.gpu_preprocess import Planned
from service.core.preprocess import Opened, Prepared, to_original
from service.core.repository import ModelRepository, parse_version, validate_name
from service.core.runtime import softmax
from service.metrics import Metrics
from service.settings import ServeSettings

__all__ = ["DataPlane", "InferFn", "DeviceInferFn", "MAX_V2_BATCH"]

log = logging.getLogger(__name__)

InferFn = Callable[["ServedVersion", np.ndarray], Awaitable[np.ndarray]]
"""(served version, one (3, H, W) float32 tensor) -> (num_classes,) float32 logits."""

DeviceInferFn = Callable[["ServedVersion", Any], Awaitable[np.ndarray]]
"""(served version, one image planned on the host (gpu_preprocess.Planned)) -> (num_classes,) float32 logits:
decoded, resampled and classified on the device (versions with ``device_pre``)."""

MAX_V2_BATCH = 64
ENSEMBLE_V2_IMAGES = 8  # decoded images one V2 request holds at once while its ensemble may need copies
HEAVY_NICE = 19  # nice value of the heavy-decode thread: ~1.5% of a core while other work wants the CPU


def _lower_priority() -> None:
    """Run this thread at nice HEAVY_NICE (Linux: a thread's nice value is its own)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HEAVY_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: keep the priority
        pass


class DataPlane:
    """Validation, routing and side traffic over a swappable :class:`Catalog`."""

    def __init__(
        self,
        settings: ServeSettings,
        repo: ModelRepository,
        metrics: Metrics,
        infer: InferFn | None = None,
        executor: Executor | None = None,
        rng: random.Random | None = None,
        after_reload: Callable[[], Awaitable[None]] | None = None,
        device_infer: DeviceInferFn | None = None,
    ) -> None:
        self.settings = settings
        self.repo = repo
        self.metrics = metrics
        self.executor = executor or ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="steady-pre")
        # expensive images (Opened.heavy) decode here: one at a time, at a lower CPU priority
        self.heavy_executor = ThreadPoolExecutor(1, thread_name_prefix="steady-heavy", initializer=_lower_priority)
        self.heavy_waiting = 0
        self.infer: InferFn = infer or self._direct_infer
        self.rng = rng or random.Random(settings.seed)
        self.loader = CatalogLoader(repo, settings, metrics)
        self.catalog = Catalog({})
        self.ready = False
        self.inflight = 0
        self.active = 0  # inference requests inside the routes (admitted or not yet); drained on SIGTERM
        self.draining = False
        self._background: set[asyncio.Task[Any]] = set()
        self._reload_lock = asyncio.Lock()
        self.after_reload = after_reload
        self.device_infer: DeviceInferFn = device_infer or self._direct_device_infer

    # ------------------------------------------------------------------ the catalog
    def load_all(self) -> Catalog:
        """Load every model's production (and candidate) version; readiness turns on after. Blocking."""
        self.catalog = self.loader.load_all()
        self.ready = True
        return self.catalog

    async def reload(self, *, propagate: bool = True) -> dict[str, Any]:
        """Re-read stages and switch to the new catalog (see :meth:`CatalogLoader.reload`).

        With ``propagate`` the ``after_reload`` hook runs afterwards (the deployment uses it to
        tell the other replicas to reload too).
        """
        async with self._reload_lock:
            self.catalog, result = await self.loader.reload(self.catalog)
        if propagate and self.after_reload is not None:
            await self.after_reload()
        return result

    def publish_gauges(self) -> None:
        """Re-set the model info and robustness gauges (Ray drops gauges not refreshed for ~2 report intervals)."""
        self.loader.publish(self.catalog)

    # ------------------------------------------------------------------ routing
    def models(self) -> dict[str, Any]:
        """``GET /v1/models``."""
        return {
            "models": [
                {"name": name, "versions": [sv.describe() for sv in stages.values()]}
                for name, stages in sorted(self.catalog.models.items())
            ]
        }

    def lookup(self, model: str, version: str | int | None) -> ServedVersion:
        """The served version asked for (404 when not served), without canary routing."""
        validate_name(model)
        stages = self.catalog.get(model)
        if version is None or version == "":
            return stages["production"]
        wanted = parse_version(version)
        for sv in stages.values():
            if sv.version == wanted:
                return sv
        raise VersionNotFound(f"model {model!r} does not serve version {wanted}; served: {sorted(s.version for s in stages.values())}")

    def route(self, model: str, version: str | int | None) -> ServedVersion:
        """The version to answer with: the one asked for, else a canary draw, else production."""
        if version is not None and version != "":
            return self.lookup(model, version)
        validate_name(model)
        stages = self.catalog.get(model)
        candidate = stages.get("candidate")
        if (candidate is not None and self.settings.candidate_mode_of(model) == "canary"
                and self.rng.random() < self.settings.canary_fraction):
            return candidate
        return stages["production"]

    def versions_of(self, model: str) -> list[ServedVersion]:
        validate_name(model)
        return list(self.catalog.get(model).values())

    # ------------------------------------------------------------------ admission
    def admit(self) -> None:
        if not self.ready:
            raise Overloaded("models are still loading")
        if self.inflight >= self.settings.max_inflight:
            raise Overloaded(f"over {self.settings.max_inflight} requests in flight; retry later")
        self.inflight += 1

    def release(self) -> None:
        self.inflight -= 1

    # ------------------------------------------------------------------ REST
    async def classify(self, model: str, data: bytes, top_k: int = 5, version: str | None = None) -> tuple[ServedVersion, dict[str, Any]]:
        """Bytes of one image -> (served version, response document)."""
        if not isinstance(top_k, int) or top_k < 1 or top_k > 1000:
            raise InvalidInput(f"top_k must be an integer in [1, 1000], got {top_k!r}")
        served = self.route(model, version)
        if served.device_pre is not None:  # decoded and resampled on the device, inside the batch (no ensemble)
            prepared, logits = await self._device_classify(served, data)
            box, ensemble = prepared.box, None  # already in the encoded image's pixels
        else:
            prepared = await self._prepare(served, data)
            logits, ensemble = await self._answer(served, prepared.image, prepared.box, prepared.tensor)
            box = to_original(prepared.box, prepared.image)
        preds = served.classifier.top_k(logits[None, :], top_k)[0]
        self._side_traffic(served, prepared, logits)
        preprocess = {
            "policy": served.policy,
            "resolution": served.resolution,
            "box": box.as_list(),
        }
        if ensemble is not None:
            preprocess["ensemble"] = ensemble
        return served, {
            "model": served.model,
            "version": served.version,
            "stage": served.stage,
            "predictions": [p.to_dict() for p in preds],
            "preprocess": preprocess,
        }

    async def _answer(self, served: ServedVersion, image: Any, box: Box, tensor: np.ndarray,
                      count: bool = True) -> tuple[np.ndarray, dict[str, Any] | None]:
        """One answer of ``served`` for the view ``box`` of ``image`` (``tensor`` is that view):
        (logits, or log of the ensemble's mean softmax; what the ensemble did, None without one).

        ``count``: record the answer in the ensemble metrics (client answers, not side traffic).
        """
        ens = served.ensemble
        if ens is None:
            return await self.infer(served, tensor), None
        bare = None
        if ens.adaptive or ens.includes_bare:
            logits = await self.infer(served, tensor)
            bare = softmax(logits.astype(np.float64))
        used = ens.used(bare) if bare is not None else True
        info: dict[str, Any] = {"name": ens.name, "used": used, "copies": len(ens.offsets) if used else 1,
                                "inferences": ens.cost(used),
                                "margin": None if bare is None else round(float(margin(bare)), 6)}
        if count:
            self.metrics.ensemble(served.model, str(served.version), used, ens.cost(used) - 1)
        if not used:
            return logits, info
        loop = asyncio.get_running_loop()
        copies = await loop.run_in_executor(self.executor, served.pre.copies, image, box)
        rows = await asyncio.gather(*(self.infer(served, t) for t in copies))
        probs = ens.combine(bare, [softmax(r.astype(np.float64)) for r in rows])  # type: ignore[arg-type]
        return as_logits(probs), info

    async def _prepare(self, served: ServedVersion, data: bytes) -> Prepared:
        """Decode and preprocess in the decode threads (bodies up to ``inline_decode_bytes`` on the event loop:
        a thread hop would cost more than the work); an expensive image (its header says so) moves to the
        heavy lane (one low-priority thread, at most ``max_heavy_decodes`` waiting: 503 beyond)."""
        loop = asyncio.get_running_loop()
        if len(data) <= self.settings.inline_decode_bytes:
            result = self._prepare_light(served, data)
        else:
            result = await loop.run_in_executor(self.executor, self._prepare_light, served, data)
        if isinstance(result, Prepared):
            return result
        if self.heavy_waiting >= self.settings.max_heavy_decodes:
            raise Overloaded(f"over {self.settings.max_heavy_decodes} large images being decoded; retry later")
        self.heavy_waiting += 1
        try:
            return await loop.run_in_executor(self.heavy_executor, self._prepare_sync, served, result)
        finally:
            self.heavy_waiting -= 1

    def _prepare_light(self, served: ServedVersion, data: bytes) -> Prepared | Opened:
        start = time.perf_counter()
        opened = served.pre.open(data)
        if opened.heavy(self.settings.heavy_decode_pixels):
            return opened
        prepared = served.pre.process(opened)
        self.metrics.preprocess(served.model, str(served.version), time.perf_counter() - start)
        return prepared

    def _prepare_sync(self, served: ServedVersion, data: bytes | Opened) -> Prepared:
        start = time.perf_counter()
        prepared = served.pre.process(data)
        self.metrics.preprocess(served.model, str(served.version), time.perf_counter() - start)
        return prepared

    async def _direct_infer(self, served: ServedVersion, tensor: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        logits = await loop.run_in_executor(None, served.classifier.logits, tensor[None])
        self.metrics.batch(served.model, str(served.version), 1, time.perf_counter() - start, [0.0])
        return logits[0]

    # ------------------------------------------------------------------ side traffic
    def _side_traffic(self, served: ServedVersion, prepared: Prepared, logits: np.ndarray) -> None:
        if served.stage != "production":
            return
        stages = self.catalog.models.get(served.model, {})
        candidate = stages.get("candidate")
        s = self.settings
        if candidate is not None and s.candidate_mode_of(served.model) == "shadow" and self.rng.random() < s.shadow_fraction:
            self._spawn("shadow", self._shadow(served, candidate, prepared, int(np.argmax(logits))))
        if s.live_fraction > 0 and self.rng.random() < s.live_fraction:
            self._spawn("live", self._live(served, prepared, int(np.argmax(logits))))

    def _spawn(self, kind: str, coro: Awaitable[None]) -> None:
        if len(self._background) >= self.settings.max_background:
            self.metrics.dropped(kind)
            coro.close()  # type: ignore[attr-defined]
            return
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shadow(self, served: ServedVersion, candidate: ServedVersion, prepared: Prepared, top1: int) -> None:
        try:
            image = prepared.image
            if prepared.tensor is not None and (candidate.policy, candidate.resolution) == (served.policy, served.resolution) \
                    and candidate.card.mean == served.card.mean and candidate.card.std == served.card.std:
                box, tensor = prepared.box, prepared.tensor
            else:
                loop = asyncio.get_running_loop()
                if isinstance(image, Planned):  # the device path kept the encoded image: decode it on the host
                    image = await loop.run_in_executor(self.executor, candidate.pre.decode, image.data)
                box = await loop.run_in_executor(self.executor, candidate.pre.box, image)
                tensor = await loop.run_in_executor(self.executor, candidate.pre.tensor, image, box)
            cand_logits, _ = await self._answer(candidate, image, box, tensor, count=False)
            self.metrics.shadow(served.model, str(served.version), str(candidate.version),
                                int(np.argmax(cand_logits)) == top1)
        except Exception:  # noqa: BLE001 - side traffic must never hurt the answer
            log.exception("shadow scoring failed for %s/%s", candidate.model, candidate.version)

    async def _live(self, served: ServedVersion, prepared: Prepared, top1: int) -> None:
        s = self.settings
        boxes = {
            "shift": shift_box(prepared.box, s.live_shift_px, s.live_shift_px, served.resolution),
            "zoom": zoom_box(prepared.box, s.live_zoom),
        }
        loop = asyncio.get_running_loop()
        for transform, box in boxes.items():
            try:
                tensor = await loop.run_in_executor(self.executor, self._render, served, prepared.image, box)
                other, _ = await self._answer(served, prepared.image, box, tensor, count=False)
                self.metrics.live_check(served.model, str(served.version), transform, int(np.argmax(other)) != top1)
            except Exception:  # noqa: BLE001 - side traffic must never hurt the answer
                log.exception("live robustness check failed for %s/%s", served.model, served.version)

    @staticmethod
    def _render(served: ServedVersion, image: Any, box: Box) -> np.ndarray:
        if isinstance(image, Planned):  # the device path keeps the encoded image, not its pixels
            if served.device_pre is not None:
                return served.device_pre.tensor(image, box)
            image = served.pre.decode(image.data)
        return served.pre.tensor(image, box)

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait for side tasks (tests, shutdown)."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout)

    # ------------------------------------------------------------------ V2
    async def infer_v2(self, model: str, version: str | None, request: v2.InferRequest) -> tuple[ServedVersion, list[v2.OutputTensor], list[bool]]:
        """A decoded V2 request -> (served version, outputs, binary flag per output)."""
        served = self.route(model, version)
        names = [t.name for t in request.inputs]
        unknown = sorted(set(names) - {"image", "input"})
        if unknown:
            raise InvalidInput(f"unknown input {unknown[0][:40]!r}: model {model!r} takes 'image' (BYTES) or 'input' (FP32)")
        if len(names) != 1:
            raise InvalidInput("supply exactly one input: 'image' (BYTES, encoded images) or 'input' (FP32, preprocessed)")
        tensor = request.inputs[0]
        if tensor.name == "image":
            if tensor.datatype != "BYTES" or tensor.elements is None:
                raise InvalidInput(f"input 'image' must be BYTES, got {tensor.datatype}")
            if not tensor.elements:
                raise InvalidInput("input 'image' has no elements")
            if len(tensor.elements) > MAX_V2_BATCH:
                raise InvalidInput(f"input 'image' has {len(tensor.elements)} images; at most {MAX_V2_BATCH} per request")
            if served.device_pre is not None:  # decoded and resampled on the device, inside the batch
                logits = np.stack([row for _, row in await asyncio.gather(
                    *(self._device_classify(served, e) for e in tensor.elements))])
            elif served.ensemble is not None:  # copies need the decoded image: hold a few at a time
                logits = np.stack(await self._answer_images(served, tensor.elements))
            else:
                # keep only each tensor: holding up to MAX_V2_BATCH decoded full-size images at once
                # would let one small body of compressible JPEGs take gigabytes
                rows = list(await asyncio.gather(*(self._tensor_of(served, e) for e in tensor.elements)))
                logits = np.stack(await asyncio.gather(*(self.infer(served, r) for r in rows)))
        else:  # preprocessed tensors: no image to move, so always the bare model
            rows = self._validate_fp32(served, tensor)
            logits = np.stack(await asyncio.gather(*(self.infer(served, r) for r in rows)))
        outputs, binary = self._v2_outputs(served, logits, request)
        return served, outputs, binary

    async def _tensor_of(self, served: ServedVersion, data: bytes) -> np.ndarray:
        return (await self._prepare(served, data)).tensor

    async def _answer_images(self, served: ServedVersion, elements: list[bytes]) -> list[np.ndarray]:
        """Answers (logits or log mean softmax) of encoded images by a version serving an ensemble."""
        held = asyncio.Semaphore(ENSEMBLE_V2_IMAGES)

        async def one(data: bytes) -> np.ndarray:
            async with held:
                prepared = await self._prepare(served, data)
                logits, _ = await self._answer(served, prepared.image, prepared.box, prepared.tensor)
                return logits

        return list(await asyncio.gather(*(one(e) for e in elements)))

    def _validate_fp32(self, served: ServedVersion, tensor: v2.InputTensor) -> list[np.ndarray]:
        if tensor.datatype != "FP32" or tensor.array is None:
            raise InvalidInput(f"input 'input' must be FP32, got {tensor.datatype}")
        arr = tensor.array
        if arr.ndim != 4 or arr.shape[1] != 3:
            raise InvalidInput(f"input 'input' must have shape [N, 3, H, W], got {list(arr.shape)}")
        n, _, h, w = arr.shape
        if n < 1 or n > MAX_V2_BATCH:
            raise InvalidInput(f"input 'input' batch dimension must be in [1, {MAX_V2_BATCH}], got {n}")
        if h < 8 or w < 8:
            raise InvalidInput(f"input 'input' height and width must be >= 8, got {h}x{w}")
        limit = 4 * served.resolution
        if h > limit or w > limit:
            raise ImageTooLarge(f"input 'input' is {h}x{w}; at most {limit}x{limit} for this model")
        if not np.all(np.isfinite(arr)):
            raise InvalidInput("input 'input' contains NaN or infinite values")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        return [arr[i] for i in range(n)]

    def _v2_outputs(self, served: ServedVersion, logits: np.ndarray, request: v2.InferRequest) -> tuple[list[v2.OutputTensor], list[bool]]:
        wanted = request.outputs or [v2.OutputRequest(name="logits")]
        outputs: list[v2.OutputTensor] = []
        binary: list[bool] = []
        for out in wanted:
            if out.name != "logits":
                raise InvalidInput(f"unknown output {out.name[:40]!r}: model {served.model!r} has output 'logits'")
            as_binary = out.binary if out.binary is not None else request.binary_output
            if out.classification:
                k = min(out.classification, served.card.num_classes)
                strings = v2.classification_strings(logits, k, served.card.labels, softmax(logits.copy()))
                outputs.append(v2.OutputTensor("logits", "BYTES", (logits.shape[0], k), elements=strings))
            else:
                outputs.append(v2.OutputTensor("logits", "FP32", tuple(logits.shape), array=logits))
            binary.append(bool(as_binary))
        return outputs, binary

    # ------------------------------------------------------------------ drain (SIGTERM, service.drain)
    def enter(self) -> None:
        """An inference request arrives: 503 + Retry-After once draining, else counted until :meth:`leave`."""
        if self.draining:
            raise Overloaded("shutting down: retry, another instance will answer")
        self.active += 1

    def leave(self) -> None:
        self.active -= 1

    def begin_drain(self) -> None:
        """Readiness and admission turn to 503; requests already inside keep going."""
        self.draining = True

    async def wait_idle(self, timeout: float) -> int:
        """Wait (at most ``timeout`` s) until no request is inside, then for side tasks; returns those left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.active > 0 and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if self._background:
            await asyncio.wait(list(self._background), timeout=max(0.0, deadline - loop.time()))
        return self.active

    # ------------------------------------------------------------------ explain (occlusion sensitivity)
    explain_inflight: int = 0  # ``:explain`` requests holding a slot (apart from ``inflight``)

    def admit_explain(self) -> None:
        """Take one of the ``max_explain_inflight`` slots (503 beyond); classify's slots are not touched."""
        if not self.ready:
            raise Overloaded("models are still loading")
        if self.explain_inflight >= self.settings.max_explain_inflight:
            raise Overloaded(f"over {self.settings.max_explain_inflight} explain requests in flight on this replica; "
                             "retry later (classify is not affected)")
        self.explain_inflight += 1

    def release_explain(self) -> None:
        self.explain_inflight -= 1

    async def explain(self, model: str, data: bytes, *, version: str | None = None, class_index: int | None = None,
                      size: int | None = None, stride: int | None = None, png: bool = False,
                      ) -> tuple[ServedVersion, dict[str, Any], bytes | None]:
        """Occlusion sensitivity of one image's served view -> (served version, JSON document, PNG or None).

        The version is production unless one is asked for (no canary draw: an explanation names what it
        explains). The occluded views go through ``infer`` (the deployment's ``@serve.batch`` queue) in chunks
        of ``max_batch_size``, so classify requests interleave with an explanation instead of queueing behind
        its ~170 inferences.
        """
        served = self.lookup(model, version)
        try:
            grid = OcclusionConfig(size=size, stride=stride).grid(served.resolution)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc
        if class_index is not None and not 0 <= class_index < served.card.num_classes:
            raise InvalidInput(f"class must be in [0, {served.card.num_classes}), got {class_index}")
        loop = asyncio.get_running_loop()
        prepared, view = await loop.run_in_executor(self.executor, self._explain_view, served, data)
        start = time.perf_counter()
        base = await self.infer(served, prepared.tensor)
        rows: list[np.ndarray] = []
        step = self.settings.max_batch_size
        for first in range(0, grid.cells, step):
            cells = range(first, min(first + step, grid.cells))
            batch = await loop.run_in_executor(
                self.executor, lambda c=cells: served.pre.to_tensor(occluded(view, grid, served.pre.background, c)))
            rows.extend(await asyncio.gather(*(self.infer(served, t) for t in batch)))
        omap = assemble(grid, base, np.stack(rows), None if class_index is None else [class_index],
                        time.perf_counter() - start)
        doc = {"model": served.model, "version": served.version, "stage": served.stage,
               **describe(omap, served.card.labels, served.pre.background),
               "preprocess": {"policy": served.policy, "resolution": served.resolution,
                              "box": to_original(prepared.box, prepared.image).as_list()}}
        picture = None
        if png:
            scale = max(1, round(224 / served.resolution))
            picture = await loop.run_in_executor(
                self.executor, lambda: png_bytes(overlay(view, omap.probability[0], grid, scale=scale)))
        return served, doc, picture

    def _explain_view(self, served: ServedVersion, data: bytes) -> tuple[Prepared, np.ndarray]:
        """Decode and render the served view once: its uint8 pixels are what the square is painted on."""
        start = time.perf_counter()
        image = served.pre.decode(data)
        view = served.pre.view(image)
        prepared = Prepared(image, view.box, served.pre.to_tensor(view.pixels[None])[0])
        self.metrics.preprocess(served.model, str(served.version), time.perf_counter() - start)
        return prepared, view.pixels

    # ------------------------------------------------------------------ the device path (preprocess_device gpu)
    async def _device_classify(self, served: ServedVersion, data: bytes) -> tuple[Prepared, np.ndarray]:
        """Plan on the host (header, box, route: 400/413 as on the CPU path), then decode, resample and
        classify on the device in the batch. The Prepared keeps the plan (no pixels, no host tensor)."""
        loop = asyncio.get_running_loop()
        planned = await loop.run_in_executor(self.executor, self._plan_sync, served, data)
        logits = await self.device_infer(served, planned)
        return Prepared(planned, planned.box, None), logits  # type: ignore[arg-type]

    def _plan_sync(self, served: ServedVersion, data: bytes) -> Planned:
        start = time.perf_counter()
        planned = served.device_pre.plan(data)
        self.metrics.preprocess(served.model, str(served.version), time.perf_counter() - start)
        return planned

    async def _direct_device_infer(self, served: ServedVersion, planned: Planned) -> np.ndarray:
        """One image through the device path without a batcher (unit tests; the service batches)."""
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, served.device_pre.logits, served.classifier, [planned])
        self.metrics.batch(served.model, str(served.version), 1, result.inference_s, [0.0])
        self.metrics.device_batch(served.model, str(served.version), result)
        (row,) = result.logits
        if isinstance(row, BaseException):
            raise row
        return row

