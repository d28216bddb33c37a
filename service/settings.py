"""Typed serving settings, built once from defaults < YAML file < environment < command line.

Every knob of ``steady serve`` and of ``deploy/serve.yaml`` lives here, with defaults
sized for a 2-core machine. The settings object is frozen and passed explicitly
(to the Ray deployment as a plain dict, see :meth:`ServeSettings.to_dict`).

Environment: ``STEADY_ADMIN_TOKEN`` sets the admin token; any other field can be set as
``STEADY_<FIELD>`` in upper case (``STEADY_MAX_BATCH_SIZE=16``).

Example:
    >>> s = ServeSettings.build(repo="/models", overrides={"max_batch_size": 4}, environ={})
    >>> s.max_batch_size, s.port
    (4, 8000)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from service.errors import InvalidInput

__all__ = ["ServeSettings", "CANDIDATE_MODES", "PROXIES"]

CANDIDATE_MODES = ("off", "canary", "shadow")
PROXIES = ("haproxy", "default")


@dataclass(frozen=True)
class ServeSettings:
    """Everything the service needs, typed and validated.

    Attributes:
        repo: the model repository folder.
        host, port: HTTP address of the service.
        metrics_port: Prometheus endpoint of Ray's metrics agent.
        ray_address: join this Ray cluster instead of starting one.
        object_store_mb: Ray object store size when Steady starts Ray.
        proxy: ``haproxy`` (Ray's HAProxy ingress + throughput-optimised data plane) or ``default``.
        num_replicas: fixed replica count (ignored when ``autoscaling`` is set).
        autoscaling: Ray Serve ``autoscaling_config`` dict (min_replicas, max_replicas, ...).
        replica_cpus: ``num_cpus`` of each replica (ORT + decode threads run inside it).
        replica_gpus: ``num_gpus`` of each replica (set with ``provider: cuda`` and onnxruntime-gpu).
        max_batch_size, batch_wait_timeout_s: ``@serve.batch`` parameters. The wait defaults to 0: a batch
            takes whatever queued while the previous one ran (natural batching under load), and a lone
            request does not wait for company (it cost 4 ms at concurrency 1; README.md, "Performance").
        max_ongoing_requests: per replica, Ray Serve's concurrency cap (>= max_batch_size).
        max_queued_requests: Ray Serve's bounded queue in front of the replicas (503 beyond).
        max_inflight: Steady's own bound per replica; over it a request gets 503 + Retry-After.
        ort_threads: ONNX Runtime intra-op threads per replica (0: all cores of the replica).
        ort_spinning: let idle ONNX Runtime threads busy-wait (lower latency, steals CPU from decoding).
        decode_threads: threads decoding/preprocessing images per replica.
        provider: ONNX Runtime provider ``auto``, ``cpu`` or ``cuda``.
        max_body_bytes: request bodies over this get 413.
        max_pixels: images over this pixel count get 413.
        warmup_batch_sizes: batch sizes run once per version before readiness (empty: 1 and max).
        candidate_mode: ``off``, ``canary`` or ``shadow``.
        model_candidate_mode: per-model override of ``candidate_mode`` ({model: mode}).
        canary_fraction: share of requests answered by the candidate in canary mode.
        shadow_fraction: share of production requests the candidate also scores in shadow mode.
        live_fraction: share of production requests re-scored shifted and zoomed (each check costs two
            extra inferences: 0.01 adds 2% to the inference work, 0.05 added 10%).
        live_shift_px, live_zoom: the live robustness transforms.
        max_background: side tasks (shadow, live) in flight per replica; more are dropped.
        admin_token: bearer token of ``/v1/admin/*``; admin endpoints are off without one.
        retry_after_s: Retry-After of 503 answers.
        seed: seed of the traffic sampler (None: random).
    """

    repo: str
    host: str = "127.0.0.1"
    port: int = 8000
    metrics_port: int = 8080
    ray_address: str | None = None
    object_store_mb: int = 256
    proxy: str = "haproxy"
    app_name: str = "steady"
    num_replicas: int = 1
    autoscaling: dict[str, Any] | None = None
    replica_cpus: float = 2.0
    replica_gpus: float = 0.0
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.0
    max_ongoing_requests: int = 64
    max_queued_requests: int = 256
    max_inflight: int = 128
    ort_threads: int = 2
    ort_spinning: bool = False
    decode_threads: int = 2
    provider: str = "auto"
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000
    warmup_batch_sizes: tuple[int, ...] = ()
    candidate_mode: str = "canary"
    model_candidate_mode: dict[str, str] | None = None
    canary_fraction: float = 0.1
    shadow_fraction: float = 1.0
    live_fraction: float = 0.01
    live_shift_px: int = 1
    live_zoom: float = 1.05
    max_background: int = 8
    admin_token: str | None = field(default=None, repr=False)
    retry_after_s: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "repo", str(self.repo))
        object.__setattr__(self, "warmup_batch_sizes", tuple(int(x) for x in self.warmup_batch_sizes))
        _positive_int(self, "port", "metrics_port", "object_store_mb", "num_replicas", "max_batch_size",
                      "max_ongoing_requests", "max_inflight", "decode_threads", "max_body_bytes", "max_pixels",
                      "max_background", "retry_after_s")
        if self.max_queued_requests < -1:
            raise InvalidInput(f"max_queued_requests must be >= -1 (-1: unbounded), got {self.max_queued_requests}")
        if self.ort_threads < 0:
            raise InvalidInput(f"ort_threads must be >= 0, got {self.ort_threads}")
        if self.max_ongoing_requests < self.max_batch_size:
            raise InvalidInput(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                f"({self.max_batch_size}) or batches never fill"
            )
        if not 0 <= self.batch_wait_timeout_s <= 1:
            raise InvalidInput(f"batch_wait_timeout_s must be in [0, 1], got {self.batch_wait_timeout_s}")
        if self.replica_cpus <= 0:
            raise InvalidInput(f"replica_cpus must be > 0, got {self.replica_cpus}")
        if self.replica_gpus < 0:
            raise InvalidInput(f"replica_gpus must be >= 0, got {self.replica_gpus}")
        if self.proxy not in PROXIES:
            raise InvalidInput(f"proxy must be one of {PROXIES}, got {self.proxy!r}")
        if self.provider not in ("auto", "cpu", "cuda"):
            raise InvalidInput(f"provider must be auto, cpu or cuda, got {self.provider!r}")
        if self.candidate_mode not in CANDIDATE_MODES:
            raise InvalidInput(f"candidate_mode must be one of {CANDIDATE_MODES}, got {self.candidate_mode!r}")
        for model, mode in (self.model_candidate_mode or {}).items():
            if mode not in CANDIDATE_MODES:
                raise InvalidInput(f"model_candidate_mode[{model!r}] must be one of {CANDIDATE_MODES}, got {mode!r}")
        for name in ("canary_fraction", "shadow_fraction", "live_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InvalidInput(f"{name} must be in [0, 1], got {value}")
        if self.live_zoom <= 0:
            raise InvalidInput(f"live_zoom must be > 0, got {self.live_zoom}")
        if any(b < 1 for b in self.warmup_batch_sizes):
            raise InvalidInput(f"warmup_batch_sizes must be >= 1, got {self.warmup_batch_sizes}")
        if self.autoscaling is not None and not isinstance(self.autoscaling, dict):
            raise InvalidInput(f"autoscaling must be a mapping, got {type(self.autoscaling).__name__}")
        if self.admin_token is not None and len(self.admin_token) < 8:
            raise InvalidInput("admin_token must be at least 8 characters")

    # ----------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        repo: str | os.PathLike[str] | None = None,
        *,
        config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> "ServeSettings":
        """Defaults < ``config`` (YAML path or mapping) < ``environ`` < ``overrides`` (None values skipped)."""
        values: dict[str, Any] = {}
        if config is not None:
            values.update(_load_yaml(config) if not isinstance(config, Mapping) else dict(config))
        values.update(_from_environ(os.environ if environ is None else environ))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        if repo is not None:
            values["repo"] = str(repo)
        if not values.get("repo"):
            raise InvalidInput("a model repository is required (--repo or `repo:` in the config)")
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ServeSettings":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise InvalidInput(f"unknown serve settings {unknown}; known: {sorted(known)}")
        try:
            return cls(**dict(data))
        except TypeError as exc:
            raise InvalidInput(f"invalid serve settings: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain data (picklable, JSON-able) to hand to the Ray deployment."""
        data = dataclasses.asdict(self)
        data["warmup_batch_sizes"] = list(self.warmup_batch_sizes)
        return data

    def replace(self, **changes: Any) -> "ServeSettings":
        return dataclasses.replace(self, **changes)

    def candidate_mode_of(self, model: str) -> str:
        return (self.model_candidate_mode or {}).get(model, self.candidate_mode)

    @property
    def batch_sizes_to_warm(self) -> tuple[int, ...]:
        sizes = self.warmup_batch_sizes or (1, self.max_batch_size)
        return tuple(sorted(set(sizes)))

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options``."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.replica_cpus, **({"num_gpus": self.replica_gpus} if self.replica_gpus else {})},
            "health_check_period_s": 5,
            "graceful_shutdown_timeout_s": 10,
        }
        if self.autoscaling:
            options["autoscaling_config"] = dict(self.autoscaling)
        else:
            options["num_replicas"] = self.num_replicas
        return options


def _positive_int(settings: ServeSettings, *names: str) -> None:
    for name in names:
        value = getattr(settings, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidInput(f"{name} must be an integer >= 1, got {value!r}")


def _load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise InvalidInput(f"cannot read config {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise InvalidInput(f"config {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidInput(f"config {path} must be a mapping of settings")
    # a config may nest the settings under `steady:` (so it can share a file)
    if set(data) == {"steady"} and isinstance(data["steady"], dict):
        data = data["steady"]
    return dict(data)


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(ServeSettings)}
    for name, f in fields.items():
        raw = environ.get(f"STEADY_{name.upper()}")
        if raw is None or raw == "":
            continue
        out[name] = _parse_env(name, str(f.type), raw)
    return out


def _parse_env(name: str, type_name: str, raw: str) -> Any:
    try:
        if type_name.startswith("bool"):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
        if type_name.startswith("tuple"):
            return tuple(int(x) for x in raw.split(",") if x.strip())
        if type_name.startswith("dict"):
            import yaml

            return yaml.safe_load(raw)
    except ValueError as exc:
        raise InvalidInput(f"environment STEADY_{name.upper()}={raw!r} is not a valid {type_name}") from exc
    return raw
