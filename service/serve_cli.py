"""``steady serve``: start (or join) Ray, deploy every served model, run until interrupted."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any

from service.errors import SteadyError

__all__ = ["register", "start_ray", "run_service", "stop_service", "proxy_environment"]

CONTROL_LOOP_INTERVAL_S = "0.5"  # Ray Serve controller loop period when Steady starts Ray (Ray's default: 0.1)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``steady serve`` to the ``steady`` parser."""
    p = sub.add_parser(
        "serve",
        help="serve the repository's models over HTTP (REST + KServe V2) with Ray Serve",
        description="Deploy every model's production version (and candidate) from the repository with Ray Serve; "
                    "runs in the foreground until Ctrl-C or SIGTERM.",
    )
    p.add_argument("--repo", help="model repository folder (or `repo:` in the config)")
    p.add_argument("--host", help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--metrics-port", type=int, help="Prometheus metrics port of Ray's agent (default 8080)")
    p.add_argument("--config", help="YAML settings file (see service/settings.py and deploy/serve.yaml)")
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting one")
    p.set_defaults(func=_cmd_serve)


def proxy_environment(proxy: str) -> dict[str, str]:
    """Environment Ray Serve reads at start-up for the chosen ingress (``haproxy`` or ``default``)."""
    if proxy == "haproxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    return {}


def start_ray(settings: Any, system_config: dict[str, Any] | None = None) -> None:
    """``ray.init`` with a small object store, no dashboard, the metrics port fixed."""
    for key, value in proxy_environment(settings.proxy).items():
        os.environ.setdefault(key, value)  # before ray.serve reads its constants; workers inherit it
    os.environ.setdefault("RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE", "1")
    # Serve's controller loops every 0.1 s by default: 0.034 core idle on a 2-core machine, with
    # the GCS traffic it causes. Every 0.5 s: 0.013 core, ready time unchanged (measured,
    # README.md, "Performance"). Only when Steady starts Ray; the environment overrides it.
    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", CONTROL_LOOP_INTERVAL_S)
    import ray

    if settings.ray_address:
        ray.init(address=settings.ray_address, log_to_driver=False)
    else:
        ray.init(
            object_store_memory=settings.object_store_mb * 1024 * 1024,
            include_dashboard=False,
            _metrics_export_port=settings.metrics_port,
            log_to_driver=False,
            configure_logging=False,
            _system_config=system_config,
        )


def run_service(settings: Any) -> float:
    """Deploy the application on a running Ray; returns seconds until every replica was ready."""
    from ray import serve

    from service.app import application

    start = time.perf_counter()
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(application(settings), name=settings.app_name, route_prefix="/", blocking=False)
    _wait_ready(f"http://{_client_host(settings.host)}:{settings.port}/v2/health/ready", timeout=120)
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


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _wait_ready(url: str, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
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


def _preflight(settings: Any) -> list[tuple[str, int]]:
    """Verify in the driver what the replicas will load, to fail fast with a clear message."""
    from service.repository import ModelRepository

    if not settings.ray_address:
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
    return served


def _cmd_serve(args: argparse.Namespace) -> int:
    from service.settings import ServeSettings

    t0 = time.perf_counter()
    settings = ServeSettings.build(
        args.repo,
        config=args.config,
        overrides={"host": args.host, "port": args.port, "metrics_port": args.metrics_port,
                   "ray_address": args.ray_address},
    )
    served = _preflight(settings)
    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    start_ray(settings)
    # after ray.init, which installs its own SIGTERM handler
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    import ray
    from ray import serve

    try:
        run_service(settings)
        ready_s = time.perf_counter() - t0
        base = f"http://{_client_host(settings.host)}:{settings.port}"
        name, _ = served[0]
        print(f"steady: serving {', '.join(f'{m} v{v}' for m, v in served)} (ready in {ready_s:.1f} s)")
        print(f"  REST      {base}/v1/models/{{model}}:classify   (models: {base}/v1/models)")
        print(f"  KServe V2 {base}/v2/models/{{model}}/infer      (ready: {base}/v2/health/ready)")
        print(f"  metrics   http://{_client_host(settings.host)}:{settings.metrics_port}/metrics")
        print(f"  try:      curl -s -H 'Content-Type: image/jpeg' --data-binary @photo.jpg "
              f"'{base}/v1/models/{name}:classify?top_k=3'")
        print("  Ctrl-C to stop.", flush=True)
        while not stop.wait(0.5):
            pass
        print("steady: shutting down", file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if settings.ray_address:
            if ray.is_initialized():
                serve.delete(settings.app_name)  # leave the shared cluster and its Serve running
                ray.shutdown()
        else:
            stop_service()
    return 0
