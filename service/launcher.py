"""``steady serve`` as a child process: start it isolated, wait until ready, look at its process tree, stop it.

The one way Steady's benchmarks and tests (and operators' scripts) run a whole service in a
subprocess. Each launch is isolated from every other Ray on the machine: its own ``RAY_TMPDIR``
(a short path: Ray's socket paths must fit in 107 bytes), free loopback ports for HTTP and
metrics and for every port Ray Serve otherwise fixes (HAProxy stats and exporter, the fallback
proxy's HTTP and gRPC ports), no inherited ``RAY_ADDRESS`` or ``STEADY_*`` variables, and its
own process group.

Example:
    >>> server = ServeProcess.start({"repo": "models"}, Path("serve.log"))   # doctest: +SKIP
    >>> server.wait_ready()                                                   # doctest: +SKIP
    >>> server.stop()                                                         # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from service.core.errors import SteadyError

__all__ = ["ServeProcess", "free_port", "isolated_environment"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def isolated_environment(ray_tmp: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an isolated ``steady serve``: own temp dir and ports, nothing inherited that joins
    or configures another instance."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith("STEADY_") and k != "RAY_ADDRESS"}
    env.update(
        RAY_TMPDIR=str(ray_tmp),
        RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()),
        RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()),
        RAY_SERVE_FALLBACK_PROXY_HTTP_PORT=str(free_port()),
        RAY_SERVE_FALLBACK_PROXY_GRPC_PORT=str(free_port()),
        PYTHONUNBUFFERED="1",
    )
    return env


@dataclass
class ServeProcess:
    """A running ``steady serve`` child (its own process group) and where to reach it."""

    proc: subprocess.Popen[bytes]
    repo: Path
    base: str
    port: int
    metrics_port: int
    log: Path
    config: Path
    env: dict[str, str]
    ray_tmp: Path
    started: float = field(default_factory=time.perf_counter)
    ready_s: float | None = None

    @classmethod
    def start(cls, settings: Mapping[str, Any], log: Path, *, config: str | os.PathLike[str] | None = None,
              env: Mapping[str, str] | None = None) -> "ServeProcess":
        """Launch ``steady serve`` with ``settings`` (over the YAML ``config``, if given) on free loopback ports.

        ``settings`` may set ``port``/``metrics_port``; the host is always 127.0.0.1. The merged settings are
        written next to ``log`` (``<log>.yaml``) and passed with ``--config``.
        """
        import yaml

        merged: dict[str, Any] = {}
        if config is not None:
            loaded = yaml.safe_load(Path(config).read_text()) or {}
            merged.update(loaded.get("steady", loaded) if isinstance(loaded, dict) else {})
        merged.update(settings)
        merged.setdefault("port", free_port())
        merged.setdefault("metrics_port", free_port())
        merged["host"] = "127.0.0.1"
        if not merged.get("repo"):
            raise SteadyError("ServeProcess.start needs settings['repo']")
        merged["repo"] = str(merged["repo"])
        log = Path(log)
        cfg = log.with_suffix(".yaml")
        cfg.write_text(yaml.safe_dump(merged))
        ray_tmp = Path(tempfile.mkdtemp(prefix="sr", dir="/tmp"))
        child_env = isolated_environment(ray_tmp, env)
        with open(log, "wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--config", str(cfg)],
                                    stdout=fh, stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
        return cls(proc, Path(merged["repo"]), f"http://127.0.0.1:{merged['port']}", int(merged["port"]), int(merged["metrics_port"]),
                   log, cfg, child_env, ray_tmp)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Seconds from launch until ``/v2/health/ready`` answered 200; raises when it exits or times out."""
        from service.runner import wait_ready

        def exited() -> str | None:
            if self.proc.poll() is None:
                return None
            return f"steady serve exited with {self.proc.returncode}:\n{self.tail()}"

        try:
            wait_ready(f"{self.base}/v2/health/ready", timeout, failed=exited)
        except SteadyError as exc:
            raise SteadyError(f"{exc}\n{self.tail()}" if self.proc.poll() is None else str(exc)) from None
        self.ready_s = time.perf_counter() - self.started
        return self.ready_s

    def processes(self) -> list[Any]:
        """The main process and every live descendant (``psutil.Process`` objects)."""
        import psutil

        try:
            main = psutil.Process(self.proc.pid)
            return [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes()]

    def descendants(self) -> list[int]:
        return self.pids()[1:]

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (steady serve shuts Serve and Ray down), then SIGKILL the group and any descendant that left
        it. Returns the exit code."""
        leftovers = self.processes()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        leftovers += self.processes()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for p in leftovers:  # Ray daemons may have left the group
            try:
                p.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            return None

    def cleanup(self) -> None:
        """Remove this launch's Ray temp dir (after :meth:`stop`)."""
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
