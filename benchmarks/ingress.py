"""The ingress paths Ray Serve offers, measured on a trivial handler: what a request costs before any model runs.

Each variant serves ``POST /v1/models/m:classify`` that reads the body and answers a small JSON
document (the shape of Steady's answer), in a fresh Ray instance of its own (isolated temp dir and
ports, as ``steady serve`` starts it), one replica, ``max_ongoing_requests`` 64. ``wrk`` drives it
at one concurrency; the CPU time of every process of the instance (replica, HAProxy, controller,
GCS, raylet, agents...) is divided by the requests answered. ``uvicorn`` is the same Starlette app
without Ray: the floor of a Python ASGI server.

    python -m benchmarks.ingress --rounds 2
    python -m benchmarks.ingress --steady-route models efficientnet-lite0 photo.jpg   # Steady's own share

Variants:
    starlette       ``@serve.ingress`` with a Starlette app (Steady's layout), HAProxy + direct ingress
    raw-asgi        the same hook returning a bare ASGI callable (no Starlette routing or middleware)
    call            no ASGI app: ``async def __call__(self, request)``; Ray builds the Request and
                    turns the returned Response into ASGI messages
    no-access-log   ``starlette`` with the deployment's ``logging_config.enable_access_log`` off
    no-ingress-metrics  ``starlette`` with ``RAY_SERVE_HAPROXY_METRICS_ENABLED=0``: HAProxy no longer sends
                    a log datagram per request for the HAProxy manager to turn into ``ray_serve_*`` metrics
    default-proxy   ``starlette`` behind Ray's Python proxy actor (no HAProxy, no direct ingress)
    uvicorn         the Starlette app in plain uvicorn, no Ray
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["VARIANTS", "measure", "steady_route_cost"]

VARIANTS = ("starlette", "raw-asgi", "call", "no-access-log", "no-ingress-metrics", "default-proxy", "uvicorn")
ANSWER = {"model": "m", "version": 1, "stage": "production",
          "predictions": [{"index": 967, "label": "espresso", "score": 0.95}],
          "preprocess": {"policy": "center", "resolution": 224, "box": [0.0, 0.0, 10.0, 10.0]}}


def _starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def classify(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse(ANSWER)

    async def ready(request: Request) -> JSONResponse:
        return JSONResponse({"ready": True})

    return Starlette(routes=[Route("/v1/models/{model}:classify", classify, methods=["POST"]),
                             Route("/v2/health/ready", ready, methods=["GET"])])


def _raw_app() -> Any:
    body = json.dumps(ANSWER, separators=(",", ":")).encode()
    length = str(len(body)).encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        # a new message each time: Ray's request-id middleware appends a header to it
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", length)]})
        await send({"type": "http.response.body", "body": body})

    return app


def _application(variant: str) -> Any:
    from ray import serve

    options: dict[str, Any] = {"max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 1}}
    if variant == "no-access-log":
        options["logging_config"] = {"enable_access_log": False}
    if variant == "call":
        from starlette.requests import Request
        from starlette.responses import JSONResponse

        @serve.deployment(**options)
        class Call:
            async def __call__(self, request: Request) -> JSONResponse:
                await request.body()
                return JSONResponse(ANSWER)

        return Call.bind()

    build = _raw_app if variant == "raw-asgi" else _starlette_app

    @serve.deployment(**options)
    @serve.ingress()
    class Ingress:
        def __serve_build_asgi_app__(self) -> Any:
            return build()

    return Ingress.bind()


def _serve(variant: str, port: int) -> None:
    """The child: start Ray and Serve with this variant, print READY, sleep until killed."""
    if variant == "uvicorn":
        import uvicorn

        print("READY", flush=True)
        uvicorn.run(_starlette_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False)
        return
    import ray
    from ray import serve

    ray.init(object_store_memory=128 * 1024 * 1024, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(_application(variant), name="ingress", route_prefix="/", blocking=False)
    print("READY", flush=True)
    while True:
        time.sleep(3600)


def measure(variant: str, concurrency: int, seconds: float, workdir: Path) -> dict[str, Any]:
    """Start ``variant`` in a child process, load it with wrk, return requests/s and CPU ms per request."""
    import httpx
    import psutil

    from benchmarks.serve import cpu_share, cpu_times, run_wrk
    from service.launcher import free_port, isolated_environment
    from service.runner import proxy_environment

    port = free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="ing-", dir="/tmp"))
    env = isolated_environment(ray_tmp)
    env.update(RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE="1", RAY_SERVE_CONTROL_LOOP_INTERVAL_S="0.5")
    if variant != "default-proxy":
        env.update(proxy_environment("haproxy"))
    if variant == "no-ingress-metrics":
        env["RAY_SERVE_HAPROXY_METRICS_ENABLED"] = "0"
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.ingress", "--child", variant, "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=(workdir / f"{variant}.log").open("wb"),
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"READY":
            raise RuntimeError(f"{variant} did not start; see {workdir / (variant + '.log')}")
        url = f"http://127.0.0.1:{port}/v1/models/m:classify"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.post(url, content=b"x" * 100, timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        body = workdir / "body.jpg"
        body.write_bytes(os.urandom(100_000))  # a photo-sized body
        run_wrk(url, [body], concurrency, 3, workdir)  # warm up
        procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
        c0, t0 = cpu_times(procs), time.perf_counter()
        result = run_wrk(url, [body], concurrency, seconds, workdir)
        elapsed = time.perf_counter() - t0
        share = cpu_share(c0, cpu_times(procs), elapsed)
        per = {k: round(v * elapsed * 1000 / max(1, result["requests"]), 3) for k, v in share.items()}
        return {"variant": variant, "requests_per_s": result["images_per_s"], "p50_ms": result["p50_ms"],
                "cpu_ms_per_request": per["total"], "cpu_ms_by_process": per, "errors": result["non_2xx"]}
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def steady_route_cost(repo: str, model: str, body: bytes, requests: int = 2000, rounds: int = 3,
                      settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Steady's own CPU per ``POST /v1/models/MODEL:classify``, in this process, without Ray or a socket.

    The Starlette app of :func:`service.routes.build_routes` is called as ASGI with the real data plane
    (validation, routing, admission, decode + preprocessing of ``body`` in the decode threads, top-k,
    JSON, metrics in memory) and an ``infer`` that returns the model's warm-up answer (no model time).
    Eight requests are in flight at a time. Returns the CPU ms per request of this process (the best of
    ``rounds``) with the preprocessing share measured apart."""
    import asyncio
    import random

    import numpy as np

    from service.core.repository import ModelRepository
    from service.dataplane import DataPlane
    from service.metrics import Metrics
    from service.routes import build_routes
    from service.settings import ServeSettings

    s = ServeSettings.build(repo, environ={}, overrides={"live_fraction": 0.0, "seed": 0, **(settings or {})})
    logits: dict[str, np.ndarray] = {}

    async def infer(served: Any, tensor: np.ndarray) -> np.ndarray:
        return logits.setdefault(served.model, np.zeros(served.card.num_classes, dtype=np.float32))

    plane = DataPlane(s, ModelRepository(repo), Metrics("memory"), infer=infer, rng=random.Random(0))
    plane.load_all()
    app = build_routes(plane, s, Metrics("memory"))
    path = f"/v1/models/{model}:classify"

    async def one() -> int:
        sent = False
        status = 0

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": path, "raw_path": path.encode(), "query_string": b"top_k=5", "root_path": "",
                 "headers": [(b"content-type", b"image/jpeg"), (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        await app(scope, receive, send)
        return status

    async def run(n: int) -> float:
        c0 = time.process_time()
        for start in range(0, n, 8):
            codes = await asyncio.gather(*(one() for _ in range(min(8, n - start))))
            if any(code != 200 for code in codes):
                raise RuntimeError(f"classify answered {codes}")
        return 1000 * (time.process_time() - c0) / n

    async def main_() -> dict[str, float]:
        await run(50)  # warm
        route = min([await run(requests) for _ in range(rounds)])
        served = plane.lookup(model, None)
        c0 = time.process_time()
        for _ in range(200):
            served.pre.process(body)
        pre = 1000 * (time.process_time() - c0) / 200
        return {"cpu_ms_per_request": round(route, 3), "preprocess_cpu_ms": round(pre, 3),
                "steady_own_cpu_ms": round(route - pre, 3)}

    return {"variant": "steady-route", "model": model, "body_bytes": len(body), "settings": settings or {},
            **asyncio.run(main_())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=1, help="measure every variant this many times, interleaved")
    parser.add_argument("--steady-route", nargs=3, metavar=("REPO", "MODEL", "IMAGE"),
                        help="instead: Steady's own CPU per classify request in process (no Ray), for IMAGE")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="with --steady-route: a serve setting (repeatable), e.g. inline_decode_bytes=65536")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _serve(args.child, args.port)
        return
    if args.steady_route:
        repo, model, image = args.steady_route
        overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
        print(json.dumps(steady_route_cost(repo, model, Path(image).read_bytes(), settings=overrides)))
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        parser.error(f"unknown variants {bad}: use some of {', '.join(VARIANTS)}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="steady-ingress-") as tmp:
        for _ in range(args.rounds):
            for variant in variants:
                try:
                    print(json.dumps(measure(variant, args.concurrency, args.duration, Path(tmp))), flush=True)
                except RuntimeError as exc:  # one variant that did not start (a busy machine) ends nothing else
                    print(json.dumps({"variant": variant, "error": str(exc)}), flush=True)


if __name__ == "__main__":
    main()
