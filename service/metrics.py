"""Every Steady metric, in one module.

Metrics are recorded through :class:`Metrics`. In the service the backend is Ray's
(``ray.util.metrics``): each replica reports to its node's metrics agent, which
aggregates all replicas and exposes Prometheus text on the metrics port
(``steady serve --metrics-port``, default 8080, ``http://HOST:8080/metrics``) next to
Ray Serve's own ``ray_serve_*`` metrics. Values refresh about every 10 s
(``metrics_report_interval_ms``). Unit tests use the in-memory backend.

Exported names (verified by scraping in ``tests/service/test_e2e.py::test_metrics_scraped``;
Ray prefixes every custom metric with ``ray_``; every series also carries Ray's own
labels ``Component``, ``NodeAddress``, ``SessionName``, ``Version``, ``WorkerId``)::

    ray_steady_requests_total{model,version,stage,code}          counter
    ray_steady_request_latency_seconds_bucket/_sum/_count{model,version,stage}   histogram, whole request in the replica
    ray_steady_preprocess_seconds_bucket/_sum/_count{model,version}   decode + box + resample + normalise, per image
    ray_steady_inference_seconds_bucket/_sum/_count{model,version}    one ONNX Runtime call (a whole batch)
    ray_steady_batch_size_bucket/_sum/_count{model,version}          images per ONNX Runtime call
    ray_steady_queue_seconds_bucket/_sum/_count{model,version}       wait in the batch queue before inference
    ray_steady_live_checks_total{model,version,transform}         live robustness re-scores (transform: shift, zoom)
    ray_steady_live_flips_total{model,version,transform}          ... whose top-1 differed from the answer
    ray_steady_shadow_checks_total{model,version,candidate}       production answers also scored by the candidate
    ray_steady_shadow_agreements_total{model,version,candidate}   ... where the candidate's top-1 agreed
    ray_steady_background_dropped_total{kind}                     shadow/live side tasks dropped (too many in flight)
    ray_steady_explain_requests_total{model,version,code}         ``:explain`` requests (not in steady_requests_total)
    ray_steady_explain_latency_seconds_bucket/_sum/_count{model,version}   whole explain request in the replica
    ray_steady_model_info{model,version,stage,policy,resolution,sha256}   1 while served, 0 after unloading
    ray_steady_robustness_<key>{model,version,policy}             one gauge per key of robustness.json ``summary``
    ray_steady_robustness_scored{model,version,policy}            1 when the served version has a bound robustness.json, else 0

A counter series appears with its first increment (Ray refuses ``inc(0)``): until a version
has flipped once, ``ray_steady_live_flips_total`` has no series for it, so dashboards and alerts
should use ``(... or on() vector(0))`` or compare with ``ray_steady_live_checks_total``, which
always exists once checks ran; the same holds for ``ray_steady_shadow_agreements_total``.

Request labels: ``model`` is ``_unknown`` when the URL names a model that is not served (so
client-chosen names cannot create series); ``version`` and ``stage`` are ``none`` when the
request failed before a version was chosen (400/404/413/415/503 on admission or lookup).
``code`` is the HTTP status answered by the replica; 503s produced by Ray Serve's own queue
(``max_queued_requests``) never reach the replica and show in ``ray_serve_*`` metrics only.

Histogram buckets: latency/preprocess/inference/queue use ``LATENCY_BUCKETS`` (seconds),
batch size uses ``BATCH_BUCKETS``.

Robustness key mapping (:func:`robustness_metric_name`): lower-case the key, replace every
run of characters outside ``[a-z0-9]`` by one ``_``, strip ``_`` at both ends, prefix
``steady_robustness_``: ``pan.p_change`` -> ``ray_steady_robustness_pan_p_change``,
``scale.flip_prob@224`` -> ``ray_steady_robustness_scale_flip_prob_224``. Only numeric
(int, float, bool) values are exported.

Ray Serve's own metrics on the same endpoint (scraped from Ray 2.60 with the HAProxy ingress)
include ``ray_serve_num_http_requests_total``, ``ray_serve_num_http_error_requests_total``,
``ray_serve_http_request_latency_ms_{bucket,sum,count}``,
``ray_serve_deployment_request_counter_total``,
``ray_serve_deployment_processing_latency_ms_{bucket,sum,count}``,
``ray_serve_deployment_queued_queries``, ``ray_serve_replica_processing_queries``,
``ray_serve_num_ongoing_requests_at_replicas``, ``ray_serve_deployment_replica_healthy``,
``ray_serve_deployment_status``, ``ray_serve_application_status``, and for ``@serve.batch``
``ray_serve_actual_batch_size_*``, ``ray_serve_batch_wait_time_ms_*``,
``ray_serve_batch_queue_length``, ``ray_serve_batch_execution_time_ms_*``. Their labels include
``application``, ``deployment``, ``replica`` (and ``route``/``method`` for HTTP metrics).
"""

from __future__ import annotations

import re
import threading
from collections import defaultdict
from typing import Any, Mapping

__all__ = [
    "LATENCY_BUCKETS",
    "BATCH_BUCKETS",
    "EXPLAIN_BUCKETS",
    "Metrics",
    "robustness_metric_name",
]

LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64]
EXPLAIN_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0]

_COUNTERS = {
    "steady_requests": ("Requests answered, by final HTTP status code", ("model", "version", "stage", "code")),
    "steady_live_checks": ("Live robustness re-scores of production answers", ("model", "version", "transform")),
    "steady_live_flips": ("Live re-scores whose top-1 differed from the answer", ("model", "version", "transform")),
    "steady_shadow_checks": ("Production answers also scored by the shadow candidate", ("model", "version", "candidate")),
    "steady_shadow_agreements": ("Shadow scores whose top-1 agreed with production", ("model", "version", "candidate")),
    "steady_background_dropped": ("Side tasks (shadow, live) dropped because too many were in flight", ("kind",)),
    "steady_explain_requests": ("Explain requests answered, by final HTTP status code", ("model", "version", "code")),
}
_HISTOGRAMS = {
    "steady_request_latency_seconds": ("Request latency inside the replica", ("model", "version", "stage"), LATENCY_BUCKETS),
    "steady_preprocess_seconds": ("Decode and preprocessing time per image", ("model", "version"), LATENCY_BUCKETS),
    "steady_inference_seconds": ("ONNX Runtime time per batch", ("model", "version"), LATENCY_BUCKETS),
    "steady_batch_size": ("Images per ONNX Runtime call", ("model", "version"), BATCH_BUCKETS),
    "steady_queue_seconds": ("Time waiting in the batch queue", ("model", "version"), LATENCY_BUCKETS),
    "steady_explain_latency_seconds": ("Explain request latency inside the replica", ("model", "version"),
                                       EXPLAIN_BUCKETS),
}
_GAUGES = {
    "steady_model_info": ("1 while a model version is served (labels say its stage and preprocessing)",
                          ("model", "version", "stage", "policy", "resolution", "sha256")),
    "steady_robustness_scored": ("1 when the served version has a robustness.json bound to its sha256",
                                 ("model", "version", "policy")),
}
_ROBUSTNESS_TAGS = ("model", "version", "policy")


def robustness_metric_name(key: str) -> str:
    """``pan.p_change`` -> ``steady_robustness_pan_p_change`` (see the module docstring)."""
    body = re.sub(r"[^a-z0-9]+", "_", str(key).lower()).strip("_")
    if not body:
        raise ValueError(f"robustness summary key {key!r} has no usable characters")
    return f"steady_robustness_{body}"


class _MemoryBackend:
    """Records values in dicts: for unit tests and for the in-process fallback."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self.gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.observations: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = defaultdict(list)

    def inc(self, name: str, tags: Mapping[str, str], value: float = 1.0) -> None:
        with self.lock:
            self.counters[(name, tuple(sorted(tags.items())))] += value

    def set(self, name: str, tags: Mapping[str, str], value: float) -> None:
        with self.lock:
            self.gauges[(name, tuple(sorted(tags.items())))] = value

    def observe(self, name: str, tags: Mapping[str, str], value: float) -> None:
        with self.lock:
            self.observations[(name, tuple(sorted(tags.items())))].append(value)


class _RayBackend:
    """ray.util.metrics objects, created once per name inside the replica process."""

    def __init__(self) -> None:
        from ray.util import metrics as rm

        self._rm = rm
        self._metrics: dict[str, Any] = {}
        self._lock = threading.Lock()
        for name, (desc, tags) in _COUNTERS.items():
            self._metrics[name] = rm.Counter(name, description=desc, tag_keys=tags)
        for name, (desc, tags, buckets) in _HISTOGRAMS.items():
            self._metrics[name] = rm.Histogram(name, description=desc, boundaries=buckets, tag_keys=tags)
        for name, (desc, tags) in _GAUGES.items():
            self._metrics[name] = rm.Gauge(name, description=desc, tag_keys=tags)

    def _gauge(self, name: str) -> Any:
        with self._lock:
            metric = self._metrics.get(name)
            if metric is None:
                metric = self._rm.Gauge(name, description="robustness summary value of the served version",
                                        tag_keys=_ROBUSTNESS_TAGS)
                self._metrics[name] = metric
            return metric

    def inc(self, name: str, tags: Mapping[str, str], value: float = 1.0) -> None:
        if value > 0:  # Ray refuses inc(0): such a series appears with its first increment
            self._metrics[name].inc(value, tags=dict(tags))

    def set(self, name: str, tags: Mapping[str, str], value: float) -> None:
        self._gauge(name).set(value, tags=dict(tags))

    def observe(self, name: str, tags: Mapping[str, str], value: float) -> None:
        self._metrics[name].observe(value, tags=dict(tags))


class Metrics:
    """Steady's metrics with a pluggable backend: ``ray`` (service) or ``memory`` (tests).

    Example:
        >>> m = Metrics("memory")
        >>> m.request("tiny", "1", "production", 200, 0.01)
        >>> m.count("steady_requests", model="tiny", code="200")
        1.0
    """

    def __init__(self, backend: str = "memory") -> None:
        if backend not in ("memory", "ray"):
            raise ValueError(f"metrics backend must be 'memory' or 'ray', got {backend!r}")
        self.backend_name = backend
        self._backend: Any = _RayBackend() if backend == "ray" else _MemoryBackend()

    # ------------------------------------------------------------ recording
    def request(self, model: str, version: str, stage: str, code: int, latency_s: float) -> None:
        self._backend.inc("steady_requests", {"model": model, "version": version, "stage": stage, "code": str(code)})
        self._backend.observe("steady_request_latency_seconds", {"model": model, "version": version, "stage": stage},
                              latency_s)

    def preprocess(self, model: str, version: str, seconds: float) -> None:
        self._backend.observe("steady_preprocess_seconds", {"model": model, "version": version}, seconds)

    def batch(self, model: str, version: str, size: int, inference_s: float, queue_s: list[float]) -> None:
        tags = {"model": model, "version": version}
        self._backend.observe("steady_batch_size", tags, float(size))
        self._backend.observe("steady_inference_seconds", tags, inference_s)
        for q in queue_s:
            self._backend.observe("steady_queue_seconds", tags, q)

    def live_check(self, model: str, version: str, transform: str, flipped: bool) -> None:
        tags = {"model": model, "version": version, "transform": transform}
        self._backend.inc("steady_live_checks", tags)
        # touch the flip counter so the series exists (rate() needs it) even before a flip
        self._backend.inc("steady_live_flips", tags, 1.0 if flipped else 0.0)

    def shadow(self, model: str, version: str, candidate: str, agreed: bool) -> None:
        tags = {"model": model, "version": version, "candidate": candidate}
        self._backend.inc("steady_shadow_checks", tags)
        self._backend.inc("steady_shadow_agreements", tags, 1.0 if agreed else 0.0)

    def dropped(self, kind: str) -> None:
        self._backend.inc("steady_background_dropped", {"kind": kind})

    def served(self, model: str, version: str, stage: str, policy: str, resolution: int, sha256: str,
               summary: Mapping[str, Any] | None, serving: bool = True) -> None:
        """Model info and robustness gauges of a version (``serving=False`` zeroes its info gauge)."""
        self._backend.set("steady_model_info", {"model": model, "version": version, "stage": stage, "policy": policy,
                                                "resolution": str(resolution), "sha256": sha256[:12]},
                          1.0 if serving else 0.0)
        if not serving:
            return
        tags = {"model": model, "version": version, "policy": policy}
        self._backend.set("steady_robustness_scored", tags, 1.0 if summary else 0.0)
        for key, value in (summary or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, complex):
                try:
                    name = robustness_metric_name(key)
                except ValueError:
                    continue
                self._backend.set(name, tags, float(value))

    def explain(self, model: str, version: str, code: int, latency_s: float) -> None:
        """One ``:explain`` request (kept apart from ``steady_requests``: an explain costs ~170 inferences and
        would swamp the classify latency histogram)."""
        self._backend.inc("steady_explain_requests", {"model": model, "version": version, "code": str(code)})
        self._backend.observe("steady_explain_latency_seconds", {"model": model, "version": version}, latency_s)

    # ------------------------------------------------------------- reading (memory backend)
    def count(self, name: str, **tags: str) -> float:
        """Sum of a counter over series matching ``tags`` (memory backend only)."""
        backend = self._memory()
        with backend.lock:
            return sum(v for (n, t), v in backend.counters.items() if n == name and _match(t, tags))

    def gauge(self, name: str, **tags: str) -> float | None:
        backend = self._memory()
        with backend.lock:
            for (n, t), v in backend.gauges.items():
                if n == name and _match(t, tags):
                    return v
        return None

    def observations(self, name: str, **tags: str) -> list[float]:
        backend = self._memory()
        with backend.lock:
            return [x for (n, t), v in backend.observations.items() if n == name and _match(t, tags) for x in v]

    def _memory(self) -> _MemoryBackend:
        if not isinstance(self._backend, _MemoryBackend):
            raise RuntimeError("reading metrics back needs the memory backend; scrape the Ray endpoint instead")
        return self._backend


def _match(series: tuple[tuple[str, str], ...], wanted: Mapping[str, str]) -> bool:
    have = dict(series)
    return all(have.get(k) == v for k, v in wanted.items())
