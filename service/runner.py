"""Run the service in this process: start (or join) Ray, deploy the application, wait until ready, stop.

``steady serve`` (:mod:`service.cli.serve`) and the test fixtures call these; a subprocess
``steady serve`` is driven by :mod:`service.launcher`.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

from service.core.errors import SteadyError

__all__ = ["start_ray", "run_service", "stop_service", "proxy_environment", "preflight", "client_host",
           "wait_ready"]

CONTROL_LOOP_INTERVAL_S = "0.5"  # Ray Serve controller loop period when Steady starts Ray (Ray's default: 0.1)


def proxy_environment(proxy: str) -> dict[str, str]:
    """Environment Ray Serve reads at start-up for the chosen ingress (``haproxy`` or ``default``)."""
    if proxy == "haproxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    return {}


def start_ray(settings: Any, system_config: dict[str, Any] | None = None, *, metrics_export_port: int | None = None) -> None:
    """``ray.init`` with a small object store, no dashboard, the metrics port fixed (``metrics_export_port``
    when Steady forwards ``metrics_port`` to Ray's agent, see :mod:`service.binds`)."""
    for key, value in proxy_environment(settings.proxy).items():
        os.environ.setdefault(key, value)  # before ray.serve reads its constants; workers inherit it
    os.environ.setdefault("RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE", "1")
    # Serve's controller loops every 0.1 s by default: 0.034 core idle on a 2-core machine, with
    # the GCS traffic it causes. Every 0.5 s: 0.013 core, ready time unchanged (measured,
    # README.md, "Performance"). Only when Steady starts Ray; the environment overrides it.
    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", CONTROL_LOOP_INTERVAL_S)
    if not settings.ray_address:
        # Serve keeps a stopping ingress replica reachable for this long behind HAProxy (default 30 s):
        # every serve.shutdown() took 30 s and lost the race with ray.shutdown() in stop_service
        from service.binds import DRAINING_PERIOD_S

        os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", DRAINING_PERIOD_S)
    import ray

    if settings.ray_address:
        ray.init(address=settings.ray_address, log_to_driver=False)
    else:
        ray.init(
            object_store_memory=settings.object_store_mb * 1024 * 1024,
            include_dashboard=False,
            _metrics_export_port=metrics_export_port or settings.metrics_port,
            log_to_driver=False,
            configure_logging=False,
            _system_config=system_config,
        )


def run_service(settings: Any, http_host: str | None = None) -> float:
    """Deploy the application on a running Ray; returns seconds until every replica was ready.

    ``http_host``: Serve's ``http_options.host`` when it differs from ``settings.host`` (behind Steady's
    HAProxy wrapper, :func:`service.binds.serve_http_host`).
    """
    from ray import serve

    from service.app import application

    start = time.perf_counter()
    serve.start(http_options={"host": http_host or settings.host, "port": settings.port})
    serve.run(application(settings), name=settings.app_name, route_prefix="/", blocking=False)
    wait_ready(f"http://{client_host(settings.host)}:{settings.port}/v2/health/ready", timeout=120)
    return time.perf_counter() - start


def stop_service(timeout_s: float = 8.0) -> None:
    """``serve.shutdown()`` then ``ray.shutdown()``, bounded.

    With the HAProxy ingress, Ray 2.60's controller waits its full 30 s drain deadline
    before it stops the replicas (measured with a one-route Starlette app, no traffic);
    the default proxy stops in ~2 s. So serve.shutdown runs in a thread for at most
    ``timeout_s`` and ``ray.shutdown()`` then ends every Ray process of this session.
    """
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    worker = threading.Thread(target=serve.shutdown, name="steady-serve-shutdown", daemon=True)
    worker.start()
    worker.join(timeout_s)
    ray.shutdown()


def client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def wait_ready(url: str, timeout: float, failed: Callable[[], str | None] | None = None) -> None:
    """Poll ``url`` (``/v2/health/ready``) until it answers 200.

    ``failed()`` is asked before every poll; a message from it ends the wait with that error (the
    launcher uses it to notice that its ``steady serve`` child exited).
    """
    import httpx

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if failed is not None and (reason := failed()):
            raise SteadyError(reason)
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise SteadyError(f"service not ready after {timeout:.0f} s ({url}: {last})")


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def preflight(settings: Any, *, check_ports: bool = True) -> list[tuple[str, int]]:
    """Verify in the driver what the replicas will load, to fail fast with a clear message.

    ``check_ports=False`` when the caller checks every port itself (``steady serve``, after cleaning up
    its run directory: :func:`service.rundir.check_ports`).
    """
    from service.core.repository import ModelRepository

    if not settings.ray_address and check_ports:
        # a busy metrics port makes Ray's agent (and with it the raylet) die during ray.init
        for what, host, port in (("HTTP", settings.host, settings.port), ("metrics", "0.0.0.0", settings.metrics_port)):
            if not _port_free(host, port):
                raise SteadyError(f"{what} port {port} is already in use: pick another with --"
                                  f"{'port' if what == 'HTTP' else 'metrics-port'}")

    repo = ModelRepository(settings.repo)
    if not repo.root.is_dir():
        raise SteadyError(f"model repository {settings.repo} does not exist")
    served = []
    for name in repo.models():
        versions = repo.versions(name)
        if not versions:
            continue
        version = repo.resolve(name)
        repo.verify(name, version)
        served.append((name, version))
    if not served:
        raise SteadyError(f"no models in {settings.repo}: export one first (steady export ...)")
    if settings.preprocess_device in ("gpu", "dali-cpu") and not settings.ray_address:
        from service.core.errors import DeviceUnavailable
        from service.core.gpu_preprocess import dali_version

        if dali_version() is None:  # fail here, not in every replica
            raise DeviceUnavailable(f"preprocess_device {settings.preprocess_device} needs NVIDIA DALI: "
                              "pip install 'steady[gpu]'")
    return served


