"""What listens where, without Ray: the HAProxy wrapper, Ray's environment, the gRPC rebind, the metrics forwarder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import httpx
import psutil
import pytest

from service.binds import (
    MetricsForwarder,
    haproxy_frontend_host,
    loopback_grpc_address,
    ray_environment,
    resolve_binds,
    serve_http_host,
    write_haproxy_wrapper,
)
from service.launcher import free_port
from service.rundir import MARKER
from service.settings import ServeSettings

# the bind lines of Ray 2.60's HAProxy template, as rendered (stats 8404, exporter 9101, HTTP 8000)
RENDERED = """global
    log /tmp/x/log.sock local0 info
frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind 127.0.0.1:8000
backend default
    server replica 127.0.0.1:30000 check
listen stats
  bind *:8404
  stats enable
frontend other
    bind *:18000
"""


def _run_wrapper(tmp_path: Path, front: str, config: str = RENDERED) -> str:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(config)
    wrapper = write_haproxy_wrapper(tmp_path / "wrap.sh", "/bin/true", front, 8000, (8404, 9101))
    subprocess.run([str(wrapper), "-db", "-f", str(cfg), "-dR"], check=True, timeout=30)
    return cfg.read_text()


def test_wrapper_binds_internal_frontends_to_loopback_and_http_to_the_host(tmp_path: Path) -> None:
    out = _run_wrapper(tmp_path, haproxy_frontend_host("0.0.0.0"))
    assert "    bind 127.0.0.1:9101\n" in out
    assert "  bind 127.0.0.1:8404\n" in out
    assert "    bind *:8000\n" in out  # the HTTP frontend on every interface, as asked
    assert "    bind *:18000\n" in out  # a port it was not told about is left alone
    assert "server replica 127.0.0.1:30000 check" in out
    out = _run_wrapper(tmp_path, haproxy_frontend_host("127.0.0.1"))
    assert "    bind 127.0.0.1:8000\n" in out and "bind *:8404" not in out and "bind :9101" not in out


def test_wrapper_keeps_haproxy_from_outliving_its_manager(tmp_path: Path) -> None:
    real = tmp_path / "fake-haproxy"
    real.write_text("#!/bin/sh\nexec sleep 120\n")
    real.chmod(0o755)
    wrapper = write_haproxy_wrapper(tmp_path / "wrap.sh", str(real), "127.0.0.1", 8000, (8404,))
    # a stand-in for Ray's HAProxyManager: starts the "HAProxy", then waits to be killed
    manager = subprocess.Popen([sys.executable, "-c",
                                f"import subprocess, time; p = subprocess.Popen([{str(wrapper)!r}, '-db']); "
                                "print(p.pid, flush=True); time.sleep(120)"], stdout=subprocess.PIPE)
    assert manager.stdout is not None
    haproxy = psutil.Process(int(manager.stdout.readline()))
    for _ in range(200):
        if haproxy.name() == "sleep":
            break
        time.sleep(0.02)
    assert haproxy.name() == "sleep"
    manager.send_signal(signal.SIGKILL)
    manager.wait(10)
    assert psutil.wait_procs([haproxy], timeout=10)[1] == [], "HAProxy outlived its manager"


def test_ray_environment_keeps_everything_under_the_run_directory(tmp_path: Path) -> None:
    settings = ServeSettings.build("/models", environ={}, overrides={
        "host": "0.0.0.0", "port": free_port(), "haproxy_stats_port": 18404, "haproxy_metrics_port": 19101})
    binds = resolve_binds(settings)
    env = ray_environment(settings, binds, tmp_path)
    assert env[MARKER] == str(tmp_path) and env["RAY_TMPDIR"] == str(tmp_path)
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # a loopback node
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404" and env["RAY_SERVE_HAPROXY_METRICS_PORT"] == "19101"
    assert env["RAY_SERVE_HAPROXY_LOG_TARGET"] == f"{tmp_path}/hap/log.sock"  # no UDP syslog sockets
    for key in ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH",
                "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE"):
        assert env[key].startswith(f"{tmp_path}/hap/"), key
    wrapper = Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"])
    assert os.access(wrapper, os.X_OK) and "18404|19101" in wrapper.read_text()
    assert "exec setpriv --pdeathsig KILL" in wrapper.read_text()
    assert serve_http_host(settings, local=True) == "127.0.0.1"  # replicas and fallback proxy on loopback
    assert serve_http_host(settings, local=False) == "0.0.0.0"
    assert binds.metrics_host == "0.0.0.0" and binds.forwards_metrics  # Ray's agent is on loopback
    uses = {u.setting: (u.host, u.port) for u in binds.port_uses()}
    assert uses["haproxy_stats_port"] == ("127.0.0.1", 18404) and uses["port"] == ("0.0.0.0", settings.port)


def test_metrics_bind_to_the_host_unless_asked_otherwise() -> None:
    loopback = resolve_binds(ServeSettings.build("/models", environ={}, overrides={"metrics_port": 18080}))
    assert loopback.ray_metrics_port == 18080 and not loopback.forwards_metrics
    wider = resolve_binds(ServeSettings.build("/models", environ={}, overrides={
        "metrics_port": 18080, "metrics_host": "0.0.0.0"}))
    assert wider.metrics_host == "0.0.0.0" and wider.ray_metrics_port != 18080


@pytest.mark.parametrize(("address", "expected"), [
    ("[::]:0", "127.0.0.1:0"), ("0.0.0.0:5000", "127.0.0.1:5000"), ("10.0.0.5:0", "10.0.0.5:0"),
    ("127.0.0.1:0", "127.0.0.1:0"),
])
def test_replica_grpc_address_moves_to_loopback(address: str, expected: str) -> None:
    assert loopback_grpc_address(address) == expected


@pytest.fixture()
def upstream() -> Iterator[int]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = b"ray_up 1\n" if self.path == "/metrics" else b"no"
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_metrics_forwarder_serves_rays_metrics_on_the_chosen_address(upstream: int) -> None:
    port = free_port()
    forwarder = MetricsForwarder("127.0.0.2", port, upstream).start()  # another loopback address stands in for a NIC
    try:
        r = httpx.get(f"http://127.0.0.2:{port}/metrics", timeout=10)
        assert r.status_code == 200 and r.text == "ray_up 1\n" and r.headers["content-type"].startswith("text/plain")
        assert httpx.get(f"http://127.0.0.2:{port}/other", timeout=10).status_code == 404
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)  # bound to 127.0.0.2 only
    finally:
        forwarder.close()
    dead = MetricsForwarder("127.0.0.1", port, free_port()).start()
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert r.status_code == 502 and "unreachable" in r.text
    finally:
        dead.close()
