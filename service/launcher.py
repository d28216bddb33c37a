"""``steady serve`` as a child process: start it isolated, wait until ready, look at its process tree and
sockets, stop or kill it, start it again.

The one way Steady's benchmarks and tests (and operators' scripts) run a whole service in a
subprocess. Each launch is isolated from every other Ray on the machine: its own run directory (a
short path under /tmp; Steady puts Ray's temp files and HAProxy's files there, and a restart in the same
directory cleans up what the previous run left), free loopback ports for HTTP and metrics and for every
port Ray Serve otherwise fixes (HAProxy stats and exporter, the fallback proxy's HTTP and gRPC ports),
no inherited ``RAY_ADDRESS`` or ``STEADY_*`` variables, and its own process group.

Example:
    >>> server = ServeProcess.start({"repo": "models"}, Path("serve.log"))   # doctest: +SKIP
    >>> server.wait_ready()                                                   # doctest: +SKIP
    >>> server.kill("kill-group"); server = server.restart()                  # doctest: +SKIP
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
from service.rundir import RunDir, free_port, kill_processes, run_processes

__all__ = ["ServeProcess", "free_port", "isolated_environment", "KILL_MODES", "Listening"]

KILL_MODES = ("term", "term-group", "kill-group", "kill-main", "kill-ray")
"""How :meth:`ServeProcess.kill` can end a server: SIGTERM to the main process or to its process group,
SIGKILL to the group or to the main process only, and SIGKILL of the main process followed by what
``ray stop --force`` does, limited to this server's own Ray processes (see :meth:`ServeProcess.kill`)."""

_PORT_SETTINGS = ("port", "metrics_port", "haproxy_stats_port", "haproxy_metrics_port", "fallback_http_port",
                  "fallback_grpc_port")


def isolated_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of an isolated ``steady serve``: nothing inherited that joins or configures another
    instance (its ports and run directory come from its settings)."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith("STEADY_") and k != "RAY_ADDRESS" and not k.startswith("RAY_SERVE_HAPROXY_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass(frozen=True)
class Listening:
    """One listening socket of a server's process tree."""

    pid: int
    name: str
    proto: str
    ip: str
    port: int

    @property
    def loopback(self) -> bool:
        return self.ip.startswith("127.") or self.ip in ("::1", "::ffff:127.0.0.1") or self.ip.startswith("::ffff:127.")


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
    run_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    ready_s: float | None = None

    @property
    def ray_tmp(self) -> Path:
        """Ray's temp dir (Steady keeps it in the run directory)."""
        return self.run_dir

    @classmethod
    def start(cls, settings: Mapping[str, Any], log: Path, *, config: str | os.PathLike[str] | None = None,
              env: Mapping[str, str] | None = None, run_dir: str | os.PathLike[str] | None = None) -> "ServeProcess":
        """Launch ``steady serve`` with ``settings`` (over the YAML ``config``, if given) on free loopback ports.

        ``settings`` may set any port (the others get free ones) and ``host`` (default 127.0.0.1). The run
        directory is ``run_dir`` (default: a new short folder under /tmp). The merged settings are written next
        to ``log`` (``<log>.yaml``) and passed with ``--config``; the log is appended to.
        """
        import yaml

        merged: dict[str, Any] = {}
        if config is not None:
            loaded = yaml.safe_load(Path(config).read_text()) or {}
            merged.update(loaded.get("steady", loaded) if isinstance(loaded, dict) else {})
        merged.update(settings)
        for name in _PORT_SETTINGS:
            if merged.get(name) is None:
                merged[name] = free_port()
        merged.setdefault("host", "127.0.0.1")
        if not merged.get("repo"):
            raise SteadyError("ServeProcess.start needs settings['repo']")
        merged["repo"] = str(merged["repo"])
        merged["run_dir"] = str(run_dir or merged.get("run_dir") or tempfile.mkdtemp(prefix="sr", dir="/tmp"))
        log = Path(log)
        cfg = log.with_suffix(".yaml")
        cfg.write_text(yaml.safe_dump(merged))
        child_env = isolated_environment(env)
        with open(log, "ab") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--config", str(cfg)],
                                    stdout=fh, stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
        host = "127.0.0.1" if merged["host"] in ("0.0.0.0", "::") else merged["host"]
        return cls(proc, Path(merged["repo"]), f"http://{host}:{merged['port']}", int(merged["port"]),
                   int(merged["metrics_port"]), log, cfg, child_env, Path(merged["run_dir"]), merged)

    def restart(self) -> "ServeProcess":
        """Start ``steady serve`` again with the same settings, ports and run directory (this one must have
        been stopped or killed; its leftovers are the new process's to clean up)."""
        return ServeProcess.start(self.settings, self.log, env=self.env, run_dir=self.run_dir)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Seconds from launch until this process recorded its run (it does so once ready) and
        ``/v2/health/ready`` answers 200; raises when it exits or times out. (A killed server's orphans may
        still answer on the port for a moment: only this process's own record counts.)"""
        from service.runner import wait_ready

        def exited() -> str | None:
            if self.proc.poll() is None:
                return None
            return f"steady serve exited with {self.proc.returncode}:\n{self.tail()}"

        deadline = time.monotonic() + timeout
        try:
            while RunDir.read_state(self.run_dir).get("pid") != self.proc.pid:
                if (reason := exited()) is not None:
                    raise SteadyError(reason)
                if time.monotonic() > deadline:
                    raise SteadyError(f"steady serve not ready after {timeout:.0f} s (no record in {self.run_dir})")
                time.sleep(0.2)
            wait_ready(f"{self.base}/v2/health/ready", max(1.0, deadline - time.monotonic()), failed=exited)
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

    def run_processes(self) -> list[Any]:
        """Every live process of this server's run directory (also those that left the tree, e.g. orphans)."""
        return run_processes(self.run_dir)

    def listening(self) -> list[Listening]:
        """Every listening socket (TCP listeners, bound UDP sockets) of the process tree and the run's processes."""
        import psutil

        procs = {p.pid: p for p in [*self.processes(), *self.run_processes()]}
        found: list[Listening] = []
        for proc in procs.values():
            try:
                name = proc.name()
                for conn in proc.net_connections("inet"):
                    udp = conn.type == socket.SOCK_DGRAM
                    if conn.laddr and (conn.status == psutil.CONN_LISTEN or (udp and not conn.raddr)):
                        found.append(Listening(proc.pid, name, "udp" if udp else "tcp", conn.laddr.ip, conn.laddr.port))
            except psutil.Error:
                continue
        return found

    def kill(self, mode: str) -> None:
        """End the server one of the :data:`KILL_MODES` ways (and return at once).

        ``kill-ray`` emulates ``SIGKILL`` of ``steady serve`` followed by ``ray stop --force``: ``ray stop``
        SIGKILLs every process on the machine whose name or command line matches Ray's own list
        (``ray.autoscaler._private.constants.RAY_PROCESSES``: raylet, gcs_server, ``ray::`` workers,
        agents...), every user's and every test run's. Here exactly that matching is applied to this
        server's run-directory processes only, so other Ray instances on the machine are never touched.
        """
        if mode not in KILL_MODES:
            raise ValueError(f"mode must be one of {KILL_MODES}, got {mode!r}")
        pid = self.proc.pid
        if mode == "term":
            self.proc.send_signal(signal.SIGTERM)
        elif mode == "term-group":
            os.killpg(pid, signal.SIGTERM)
        elif mode == "kill-group":
            os.killpg(pid, signal.SIGKILL)
        elif mode == "kill-main":
            self.proc.kill()
        else:
            self.proc.kill()
            self.proc.wait(10)
            kill_processes([p for p in self.run_processes() if _ray_stop_matches(p)], timeout=10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (steady serve drains, then stops Serve and Ray), then SIGKILL the group and any process of
        the run that is still alive. Returns the exit code."""
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
        kill_processes([*leftovers, *self.run_processes()], timeout=10)  # Ray daemons may have left the group
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            return None

    def cleanup(self) -> None:
        """Remove this launch's run directory (after :meth:`stop`)."""
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _ray_stop_matches(proc: Any) -> bool:
    """Whether ``ray stop`` would kill ``proc`` (its own matching rule over ``RAY_PROCESSES``)."""
    import psutil
    from ray.autoscaler._private.constants import RAY_PROCESSES

    try:
        name, args = proc.name(), subprocess.list2cmdline(proc.cmdline())
    except psutil.Error:
        return False
    return any(keyword in (name if by_name else args) for keyword, by_name in RAY_PROCESSES)
