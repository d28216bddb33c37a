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

import os
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.core.ensemble import Ensemble
from service.core.errors import InvalidInput

__all__ = ["ServeSettings", "CANDIDATE_MODES", "PROXIES"]

CANDIDATE_MODES = ("off", "canary", "shadow")
PROXIES = ("haproxy", "default")
CandidateMode = Literal["off", "canary", "shadow"]
_SECRETS = frozenset({"admin_token"})  # never echoed in error messages
RUN_DIR_MAX_CHARS = 32  # <run_dir>/hap/<56-hex node id>/admin.sock must fit a unix socket path (107 bytes)
_PORT_FIELDS = ("port", "metrics_port", "haproxy_stats_port", "haproxy_metrics_port", "fallback_http_port",
                "fallback_grpc_port")


class ServeSettings(BaseModel):
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
        inline_decode_bytes: bodies up to this size are decoded and preprocessed on the replica's event loop,
            without a hop to a decode thread (tiny work; 0: always in a decode thread).
        access_log: Ray Serve's access log line per request (its log file); off saves its formatting and
            writing on the hot path (README.md, "Performance"); Steady's request metrics count every answer
            either way.
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
        run_dir: where ``steady serve`` keeps its lock, the record of the processes and ports it started,
            Ray's temp files and HAProxy's files; a restart cleans up what the previous run of the same
            directory left behind (default ``/tmp/steady-<uid>-<port>``; at most 32 characters: Ray and
            HAProxy put unix sockets under it).
        metrics_host: the address of the metrics port (default: ``host``); set it wider than ``host``
            only when a scraper on another machine needs it.
        haproxy_stats_port, haproxy_metrics_port: HAProxy's stats page and Prometheus exporter (bound to
            127.0.0.1; default: free ports chosen at start and recorded in the run directory).
        fallback_http_port, fallback_grpc_port: Ray Serve's fallback proxy behind HAProxy (127.0.0.1;
            default: free ports chosen at start).
        drain_timeout_s: on SIGTERM, the most seconds until ``steady serve`` has exited: readiness and
            admission turn to 503 first, requests in flight finish, then Serve and Ray stop.
        decode_budget_s: CPU seconds decoding one image may use; beyond it the request gets 413.
        heavy_decode_pixels: images over this many pixels (4x for baseline JPEGs) are decoded in a separate
            low-priority thread, one at a time per replica, so a few expensive images cannot starve the rest.
        max_heavy_decodes: expensive images waiting or decoding per replica; more get 503 + Retry-After.
        max_webp_pixels: WebP images over this pixel count get 413 (libwebp decodes in one call that keeps
            Python's GIL: ~10 ms per megapixel during which no other thread of the replica runs).
        max_explain_inflight: per replica, ``:explain`` requests in flight (each costs ~170 inferences at
            224 px); over it an explain gets 503 + Retry-After while ``:classify`` keeps its own ``max_inflight``.
        ensemble: the shift ensemble on top of each version's policy: ``chosen`` (what its bound
            robustness.json chose, ``chosen.ensemble``; none without one), ``off``, or a setting
            ``PRESET[@MARGIN]`` / ``x,y;x,y;...[@MARGIN]`` (:mod:`service.core.ensemble`) for every version.
        model_ensemble: per-model override of ``ensemble`` ({model: setting}).
        preprocess_device: where images are decoded and resampled: ``cpu`` (Pillow), ``gpu`` (NVIDIA DALI on the
            replica's GPU, tensor fed to ONNX Runtime on the device; needs ``provider`` cuda or auto and
            ``replica_gpus``), ``dali-cpu`` (the GPU path's DALI pipeline on DALI's CPU backend: tests only)
            or ``auto`` (gpu when ONNX Runtime runs on CUDA and DALI sees the GPU, else cpu; a card DALI cannot
            reproduce, interpolation nearest, stays on the CPU).
            See :mod:`service.core.devices`; a GPU config is ``deploy/steady-gpu.yaml``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    repo: str
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    metrics_port: int = Field(8080, ge=1, le=65535)
    ray_address: str | None = None
    object_store_mb: int = Field(256, ge=1)
    proxy: Literal["haproxy", "default"] = "haproxy"
    app_name: str = "steady"
    num_replicas: int = Field(1, ge=1)
    autoscaling: dict[str, Any] | None = None
    replica_cpus: float = Field(2.0, gt=0)
    replica_gpus: float = Field(0.0, ge=0)
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=1)
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(256, ge=-1)
    max_inflight: int = Field(128, ge=1)
    ort_threads: int = Field(2, ge=0)
    ort_spinning: bool = False
    decode_threads: int = Field(2, ge=1)
    provider: Literal["auto", "cpu", "cuda"] = "auto"
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_pixels: int = Field(50_000_000, ge=1)
    warmup_batch_sizes: tuple[int, ...] = ()
    candidate_mode: CandidateMode = "canary"
    model_candidate_mode: dict[str, CandidateMode] | None = None
    canary_fraction: float = Field(0.1, ge=0, le=1)
    shadow_fraction: float = Field(1.0, ge=0, le=1)
    live_fraction: float = Field(0.01, ge=0, le=1)
    live_shift_px: int = 1
    live_zoom: float = Field(1.05, gt=0)
    max_background: int = Field(8, ge=1)
    admin_token: str | None = Field(None, repr=False, min_length=8)
    retry_after_s: int = Field(1, ge=1)
    seed: int | None = None
    run_dir: str | None = None
    metrics_host: str | None = None
    haproxy_stats_port: int | None = Field(None, ge=1, le=65535)
    haproxy_metrics_port: int | None = Field(None, ge=1, le=65535)
    fallback_http_port: int | None = Field(None, ge=1, le=65535)
    fallback_grpc_port: int | None = Field(None, ge=1, le=65535)
    drain_timeout_s: float = Field(15.0, ge=2, le=3600)
    decode_budget_s: float = Field(2.0, gt=0)
    heavy_decode_pixels: int = Field(4_000_000, ge=1)
    max_heavy_decodes: int = Field(8, ge=1)
    max_webp_pixels: int = Field(4_000_000, ge=1)
    max_explain_inflight: int = Field(2, ge=1)
    ensemble: str = "chosen"
    model_ensemble: dict[str, str] | None = None
    inline_decode_bytes: int = Field(0, ge=0)
    access_log: bool = True

    @field_validator("ensemble", mode="before")
    @classmethod
    def _ensemble_setting(cls, value: Any) -> Any:
        return _ensemble_spec(value)

    @field_validator("model_ensemble", mode="before")
    @classmethod
    def _model_ensemble_settings(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        return {model: _ensemble_spec(spec) for model, spec in value.items()}
    preprocess_device: Literal["auto", "cpu", "gpu", "dali-cpu"] = "auto"

    @field_validator("autoscaling")
    @classmethod
    def _autoscaling(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value:
            _check_autoscaling(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ServeSettings":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}) or batches never fill")
        if any(b < 1 for b in self.warmup_batch_sizes):
            raise ValueError(f"warmup_batch_sizes must be >= 1, got {self.warmup_batch_sizes}")
        if self.preprocess_device == "gpu" and self.provider == "cpu":
            raise ValueError("preprocess_device gpu needs provider cuda or auto: the tensor stays on the GPU "
                             "for ONNX Runtime")
        if self.preprocess_device == "gpu" and self.replica_gpus <= 0:
            raise ValueError("preprocess_device gpu needs replica_gpus > 0, so Ray reserves a GPU for each replica")
        if self.run_dir is not None and (not self.run_dir.startswith("/") or len(self.run_dir) > RUN_DIR_MAX_CHARS):
            raise ValueError(f"run_dir must be an absolute path of at most {RUN_DIR_MAX_CHARS} characters (Ray and "
                             f"HAProxy put unix sockets under it, 107 bytes at most), got {self.run_dir!r}")
        ports = {name: getattr(self, name) for name in _PORT_FIELDS if getattr(self, name) is not None}
        for name, port in ports.items():
            clash = [other for other, p in ports.items() if p == port and other != name]
            if clash:
                raise ValueError(f"{name} and {clash[0]} are both {port}: every port must differ")
        return self

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
        from_env = _from_environ(os.environ if environ is None else environ)
        values.update(from_env)
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        if repo is not None:
            values["repo"] = str(repo)
        if not values.get("repo"):
            raise InvalidInput("a model repository is required (--repo or `repo:` in the config)")
        env_only = {k: (os.environ if environ is None else environ)[f"STEADY_{k.upper()}"]
                    for k in from_env if k not in (overrides or {}) or (overrides or {})[k] is None}
        return cls.from_dict(values, environment=env_only)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, environment: Mapping[str, str] | None = None) -> "ServeSettings":
        """Validate plain data; any problem is one :class:`InvalidInput` line naming the setting and value."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise InvalidInput(_one_line(exc, data, environment or {})) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (picklable, JSON-able) to hand to the Ray deployment."""
        return self.model_dump(mode="json")

    def replace(self, **changes: Any) -> "ServeSettings":
        return self.from_dict({**self.to_dict(), **changes})

    def candidate_mode_of(self, model: str) -> str:
        return (self.model_candidate_mode or {}).get(model, self.candidate_mode)

    def ensemble_of(self, model: str, chosen: Mapping[str, Any] | None) -> Ensemble | None:
        """The ensemble a version of ``model`` serves: the setting, or its robustness.json choice (``chosen``)."""
        spec = (self.model_ensemble or {}).get(model, self.ensemble)
        if spec == "off":
            return None
        if spec != "chosen":
            return Ensemble.parse(spec)
        picked = (chosen or {}).get("ensemble")
        return None if not picked else Ensemble.parse(picked)

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
        if not self.access_log:
            options["logging_config"] = {"enable_access_log": False}
        if self.autoscaling:
            options["autoscaling_config"] = dict(self.autoscaling)
        else:
            options["num_replicas"] = self.num_replicas
        return options


def _ensemble_spec(value: Any) -> Any:
    """``chosen``, ``off`` or a valid ensemble setting (ValueError naming the problem otherwise).

    YAML reads a bare ``off`` as false: that is ``off`` too.
    """
    if value is False:
        return "off"
    if not isinstance(value, str):
        return value  # pydantic's own type error names it
    value = value.strip()
    if value not in ("chosen", "off"):
        Ensemble.parse(value)
    return value


def _check_autoscaling(config: Mapping[str, Any]) -> None:
    """``autoscaling`` through Ray Serve's own ``AutoscalingConfig``; also refuses unknown keys, which Ray
    silently ignores (a misspelt ``max_replica`` would leave the deployment at one replica)."""
    from ray.serve.config import AutoscalingConfig

    unknown = sorted(set(config) - set(AutoscalingConfig.model_fields))
    if unknown:
        raise ValueError(f"unknown keys {unknown}; known: {sorted(AutoscalingConfig.model_fields)}")
    try:
        AutoscalingConfig(**config)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        errors = getattr(exc, "errors", lambda: [])()
        first = errors[0] if errors else {"loc": (), "msg": str(exc)}
        where = ".".join(str(x) for x in first["loc"])
        raise ValueError(f"{where + ': ' if where else ''}{str(first['msg']).removeprefix('Value error, ')}") from None


def _one_line(exc: ValidationError, data: Mapping[str, Any], environment: Mapping[str, str]) -> str:
    """The first problem of a validation error, as one line that names the setting and the bad value."""
    errors = exc.errors()
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        return f"unknown serve settings {unknown}; known: {sorted(ServeSettings.model_fields)}"
    first = errors[0]
    name = ".".join(str(x) for x in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    if not first["loc"]:  # a cross-field rule
        return message
    top = str(first["loc"][0])
    if top in environment:
        return f"environment STEADY_{top.upper()}={environment[top]!r} is not valid: {message}"
    shown = "<hidden>" if top in _SECRETS else repr(first.get("input"))[:80]
    return f"{name}: {message}, got {shown}"


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
    """``STEADY_<FIELD>`` variables: strings, except ``1,2,4`` lists for tuple settings and YAML for mappings
    (pydantic converts the rest)."""
    out: dict[str, Any] = {}
    for name, info in ServeSettings.model_fields.items():
        raw = environ.get(f"STEADY_{name.upper()}")
        if raw is None or raw == "":
            continue
        kind = str(info.annotation)
        if kind.startswith("tuple"):
            out[name] = [x.strip() for x in raw.split(",") if x.strip()]
        elif kind.startswith("dict"):
            import yaml

            out[name] = yaml.safe_load(raw)
        else:
            out[name] = raw
    return out
