"""``steady serve``: start (or join) Ray, deploy every served model, run until interrupted."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

__all__ = ["register"]


class _StopDuringStart(Exception):
    """SIGTERM or Ctrl-C before the service was ready."""


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


def _cmd_serve(args: argparse.Namespace) -> int:
    from service.core.errors import SteadyError
    from service.lifecycle import ServeRun
    from service.runner import client_host, preflight
    from service.settings import ServeSettings

    t0 = time.perf_counter()
    settings = ServeSettings.build(
        args.repo,
        config=args.config,
        overrides={"host": args.host, "port": args.port, "metrics_port": args.metrics_port,
                   "ray_address": args.ray_address},
    )
    served = preflight(settings, check_ports=False)
    run = ServeRun.prepare(settings)  # run directory, leftovers of an earlier run, ports, Ray's environment
    if run.cleaned:
        print(f"steady: stopped {len(run.cleaned)} processes an earlier run left in {run.run.path}: "
              + "; ".join(run.cleaned)[:600], file=sys.stderr, flush=True)
    stop = threading.Event()
    signalled: list[float] = []

    def _on_signal(signum: int, frame: Any) -> None:
        signalled.append(time.monotonic())
        if not stop.is_set():
            stop.set()
            if not serving:
                raise _StopDuringStart()  # leave the readiness wait; the drain deadline already runs

    def _install() -> None:  # after ray.init, which installs its own SIGTERM handler
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)

    serving = False
    failed = 0
    try:
        run.start(after_ray=_install)
        serving = True
        ready_s = time.perf_counter() - t0
        base = f"http://{client_host(settings.host)}:{settings.port}"
        metrics_host = settings.metrics_host or settings.host
        name, _ = served[0]
        print(f"steady: serving {', '.join(f'{m} v{v}' for m, v in served)} (ready in {ready_s:.1f} s)")
        print(f"  REST      {base}/v1/models/{{model}}:classify   (models: {base}/v1/models)")
        print(f"  KServe V2 {base}/v2/models/{{model}}/infer      (ready: {base}/v2/health/ready)")
        print(f"  metrics   http://{client_host(metrics_host)}:{settings.metrics_port}/metrics")
        print(f"  try:      curl -s -H 'Content-Type: image/jpeg' --data-binary @photo.jpg "
              f"'{base}/v1/models/{name}:classify?top_k=3'")
        print(f"  run dir   {run.run.path}  (SIGTERM drains within {settings.drain_timeout_s:g} s)")
        print("  Ctrl-C to stop.", flush=True)
        while not stop.wait(0.5):
            run.tick()
        print("steady: shutting down (draining)", file=sys.stderr, flush=True)
    except _StopDuringStart:
        print("steady: stopped during start-up", file=sys.stderr, flush=True)
    except BaseException as exc:  # noqa: BLE001 - said here: the process ends below, before main() could
        failed = exc.exit_code if isinstance(exc, SteadyError) else 1
        if isinstance(exc, (SteadyError, KeyboardInterrupt)):
            print(f"steady serve: error: {exc}", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        report = run.stop(signalled[0] if signalled else None, keep_watchdog=True)
        print(f"steady: {report.line()}", file=sys.stderr, flush=True)
    # Ray is down and the run's processes are gone: its exit handlers have nothing left to do but can take
    # seconds (or hang when Ray stopped half-way), so leave now
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(failed if failed else 0 if report.clean else 1)
