"""One ``steady serve`` run in this process: prepare, start, record, drain and stop.

- :meth:`ServeRun.prepare` takes the run directory (:mod:`service.rundir`), kills what an earlier run of
  it left behind, resolves and checks every port (one-line :class:`~service.core.errors.PortInUse`
  naming the holder, instead of a hang until the readiness timeout), and sets the environment that keeps
  a Steady-started Ray on loopback (:mod:`service.binds`), all before ``import ray``.
- :meth:`ServeRun.start` starts (or joins) Ray, creates the drain control, deploys, waits until ready and
  records the processes and ports in the run directory.
- :meth:`ServeRun.stop` drains and stops within ``drain_timeout_s`` of the signal (:mod:`service.drain`);
  it serves both a local run and one joined to a cluster with ``--ray-address`` (then it removes only
  its application and leaves the cluster running).

Example:
    >>> run = ServeRun.prepare(settings)          # doctest: +SKIP
    >>> run.start()                               # doctest: +SKIP
    >>> print(run.stop(signalled_at).line())      # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from service.binds import Binds, MetricsForwarder, is_loopback, ray_environment, resolve_binds, serve_http_host
from service.rundir import RunDir, check_ports, default_run_dir, kill_processes, run_processes

__all__ = ["ServeRun", "RECORD_EVERY_S"]

RECORD_EVERY_S = 30.0  # state.json is refreshed this often (HAProxy reloads start new processes)


@dataclass
class ServeRun:
    """The pieces of one run; ``binds`` is None when joined to a cluster."""

    settings: Any
    run: RunDir
    binds: Binds | None
    cleaned: list[str] = field(default_factory=list)
    control: Any = None
    forwarder: MetricsForwarder | None = None
    recorded_at: float = 0.0
    started_serve: bool = False  # joined a cluster on which Serve was not running: stop it again when leaving

    @property
    def local(self) -> bool:
        return self.binds is not None

    @classmethod
    def prepare(cls, settings: Any) -> "ServeRun":
        """Own the run directory, clean up after an earlier run of it, check ports, set Ray's environment."""
        run = RunDir.acquire(settings.run_dir or default_run_dir(settings.port))
        try:
            cleaned = run.clean_leftovers()
            binds = None
            if settings.ray_address and is_loopback(settings.ray_address.rpartition(":")[0].removeprefix("ray://")):
                # a loopback head: without this, ray.init rewrites 127.0.0.1 to the machine's address
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            if not settings.ray_address:
                binds = resolve_binds(settings)
                # a process just killed releases its sockets as it dies: give them a moment
                check_ports(binds.port_uses(settings.proxy), wait_s=3.0 if cleaned else 0.0)
                os.environ.update(ray_environment(settings, binds, run.path))
        except BaseException:
            run.release()
            raise
        return cls(settings, run, binds, cleaned)

    def start(self, after_ray: Callable[[], None] | None = None) -> float:
        """Start or join Ray, deploy, wait until ready, record; seconds until ready.

        ``after_ray`` runs right after ``ray.init`` (which installs its own SIGTERM handler): the place to
        install the caller's signal handlers.
        """
        from service.drain import create_drain_control
        from service.runner import run_service, start_ray

        s = self.settings
        port = self.binds.ray_metrics_port if self.binds else None
        try:
            start_ray(s, metrics_export_port=port)
        except Exception as exc:  # noqa: BLE001 - Ray's own start-up deadline (30 s, fixed) on a starved machine
            if self.binds is None or "timed out during startup" not in str(exc):
                raise
            import ray

            print(f"steady: Ray did not start in time ({exc}); trying once more", file=sys.stderr, flush=True)
            ray.shutdown()
            kill_processes(run_processes(self.run.path))
            start_ray(s, metrics_export_port=port)
        if after_ray is not None:
            after_ray()
        if self.binds is not None and self.binds.forwards_metrics:
            self.forwarder = MetricsForwarder(self.binds.metrics_host, self.binds.metrics_port,
                                              self.binds.ray_metrics_port).start()
        self.control = create_drain_control(s.app_name)
        if not self.local:
            from service.drain import serve_running

            self.started_serve = not serve_running()
        ready_s = run_service(s, http_host=serve_http_host(s, self.local))
        self.record()
        return ready_s

    def record(self) -> dict[str, Any]:
        """Write the run's processes and ports to ``state.json`` in the run directory."""
        self.recorded_at = time.monotonic()
        ports = self.binds.as_dict() if self.binds else {"ray_address": self.settings.ray_address}
        return self.run.record(ports)

    def tick(self) -> None:
        """Called while serving: refresh the record now and then."""
        if time.monotonic() - self.recorded_at >= RECORD_EVERY_S:
            self.record()

    def stop(self, signalled_at: float | None = None, *, keep_watchdog: bool = False) -> Any:
        """Drain and stop within ``drain_timeout_s`` of ``signalled_at`` (``time.monotonic()``; default now).

        A watchdog ends the process (status 1) at that deadline whatever is still running; with
        ``keep_watchdog`` it stays armed after the stop, until the process exits (``steady serve``: Ray's own
        exit handlers cannot hang it either). The returned :class:`~service.drain.DrainReport` says what
        happened.
        """
        from service.drain import Watchdog, graceful_stop

        began = signalled_at or time.monotonic()
        deadline = began + self.settings.drain_timeout_s
        run_dir = str(self.run.path) if self.local else None
        watchdog = Watchdog(deadline, run_dir)
        try:
            report = graceful_stop(self.settings, self.control, deadline, run_dir=run_dir,
                                   stop_serve=self.started_serve)
        finally:
            if self.forwarder is not None:
                self.forwarder.close()
            self.run.release()
        if not keep_watchdog:
            watchdog.cancel()
        report.since_signal_s = time.monotonic() - began
        return report
