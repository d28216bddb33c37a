"""Graceful drain and a bounded stop: what ``steady serve`` does on SIGTERM, local or joined to a cluster.

Order (all of it within ``drain_timeout_s`` of the signal; a watchdog ends the process at that deadline):

1. **Stop admitting.** The driver sets a flag in a small Ray actor, :class:`DrainControl`
   (``steady-drain-<app>`` in namespace ``steady``, owned by the driver). Every replica keeps one call to
   it outstanding (:func:`start_drain_watch`, renewed every ``POLL_S``), so each one learns at once: its
   readiness (``/v2/health/ready``) turns 503 first, then every new inference request gets 503 with
   ``Retry-After``; requests that arrived before keep going.
2. **Finish what is in flight.** Each replica waits until no request is inside its routes (and its side
   tasks are done), then reports; the driver waits for every replica seen in the last ``2 * POLL_S``,
   except those Serve stopped meanwhile (a scale-down: the replica's ``__del__`` says it left).
3. **Stop.** On its own Ray (local mode) the driver soft-stops HAProxy first (SIGUSR1: it closes its
   listeners and finishes open connections, so a late client gets "connection refused", never a 404),
   then shuts Ray down, then kills whatever of its run directory is still alive (Ray's agents linger
   ~60 s otherwise). Joined to a cluster (``--ray-address``) it deletes its application and disconnects:
   the cluster, its Serve and its HAProxy keep running.

Serve's own ``serve.delete`` does not do step 1: its HAProxy answers 404 ``Path not found`` to requests
arriving while replicas stop (measured: 1,979 of them), so Steady drains before it deletes.

Example:
    >>> control = create_drain_control("steady")                                  # doctest: +SKIP
    >>> report = graceful_stop(settings, control, deadline, run_dir="/tmp/steady-0-8000")   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil

from service.rundir import kill_processes, run_processes

__all__ = ["DrainControl", "DrainReport", "DrainWatch", "control_name", "create_drain_control", "start_drain_watch",
           "drain_replicas", "graceful_stop", "Watchdog", "POLL_S"]

log = logging.getLogger(__name__)

NAMESPACE = "steady"
POLL_S = 5.0  # a replica renews its call to the control actor this often (it doubles as a heartbeat)
LOOKUP_RETRY_S = 10.0  # a replica without a control actor (deployed by `serve deploy`) looks again this often
HAPROXY_STOP_S = 3.0  # the longest wait for HAProxy's soft stop before Ray goes down


def control_name(app_name: str) -> str:
    return f"steady-drain-{app_name}"


class DrainControl:
    """The drain flag of one application, and the replicas' reports (a Ray actor, see :func:`create_drain_control`)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._deadline = 0.0
        self._seen: dict[str, float] = {}
        self._drained: dict[str, int] = {}
        self._left: set[str] = set()

    async def wait(self, replica: str, timeout: float) -> float | None:
        """Block until the drain starts (returns the seconds the replica has left) or ``timeout`` (None)."""
        self._seen[replica] = time.monotonic()
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except asyncio.TimeoutError:
            return None
        self._seen[replica] = time.monotonic()
        return max(0.0, self._deadline - time.time())

    async def start(self, seconds: float) -> int:
        """Start the drain; replicas have ``seconds`` to finish. Returns how many replicas are listening."""
        if not self._event.is_set():
            self._deadline = time.time() + seconds
            self._event.set()
        return len(self._expected())

    async def drained(self, replica: str, left: int) -> None:
        self._drained[replica] = left

    async def leave(self, replica: str) -> None:
        """A replica Serve is stopping (scale-down, redeploy): no longer expected to report, even when a call it
        left pending wakes up at the drain's start."""
        self._left.add(replica)

    def _expected(self) -> set[str]:
        now = time.monotonic()
        return {r for r, t in self._seen.items() if now - t < 2 * POLL_S + 1 and r not in self._left}

    async def status(self) -> dict[str, int]:
        """Replicas expected (heard from in the last ``2 * POLL_S``, or reported), drained, requests left, and
        ``done`` once every live replica reported."""
        expected = self._expected()
        return {"replicas": len(expected | set(self._drained)), "drained": len(self._drained),
                "requests_left": sum(self._drained.values()), "done": int(expected <= set(self._drained))}

    async def missing(self) -> dict[str, float]:
        """Replicas expected that have not reported: seconds since each was last heard from."""
        now = time.monotonic()
        return {r: round(now - self._seen[r], 1) for r in sorted(self._expected() - set(self._drained))}

    async def wait_drained(self, timeout: float) -> dict[str, int]:
        """Wait (at most ``timeout``) until every live replica reported; :meth:`status` then."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and not self._expected() <= set(self._drained):
            await asyncio.sleep(0.05)
        return await self.status()


_REMOTE: Any = None


def _remote_class() -> Any:
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(num_cpus=0, max_concurrency=1000)(DrainControl)
    return _REMOTE


def create_drain_control(app_name: str) -> Any:
    """The application's :class:`DrainControl`, created by the driver before ``serve.run`` (it dies with the
    driver; replicas of a later driver find its new one)."""
    return _remote_class().options(name=control_name(app_name), namespace=NAMESPACE, get_if_exists=True).remote()


# --------------------------------------------------------------------- replica side
class DrainWatch:
    """A replica's side of the drain: follows the application's flag, and says when the replica leaves."""

    def __init__(self, plane: Any, app_name: str, replica: str) -> None:
        self.plane = plane
        self.name = control_name(app_name)
        self.replica = replica
        self.control: Any = None
        self.left = False
        self.task = asyncio.get_running_loop().create_task(self._watch())

    def leave(self) -> None:
        """Serve is stopping this replica (its ``__del__``): stop watching and tell the control actor at once,
        so a drain starting in the next ``2 * POLL_S`` does not wait for a replica that is gone."""
        if self.left:
            return
        self.left = True
        log.info("leaving: Serve stops this replica")
        self.task.cancel()
        if self.control is not None:
            try:
                self.control.leave.remote(self.replica)  # fire and forget: the actor runs it either way
            except Exception:  # noqa: BLE001 - the driver is gone; nothing to tell
                pass

    async def _watch(self) -> None:
        while True:
            if self.control is None:
                self.control = await _lookup(self.name)
                if self.control is None:
                    await asyncio.sleep(LOOKUP_RETRY_S)
                    continue
            try:
                remaining = await self.control.wait.remote(self.replica, POLL_S)
            except Exception:  # noqa: BLE001 - the driver (and its control actor) went away: look again
                self.control = None
                await asyncio.sleep(1.0)
                continue
            if remaining is None:
                continue
            self.plane.begin_drain()
            left = await self.plane.wait_idle(remaining)
            log.info("drained: %d requests still inside after %.1f s", left, remaining)
            try:
                await self.control.drained.remote(self.replica, left)
            except Exception:  # noqa: BLE001 - the driver is gone; nothing to tell
                pass
            return


def start_drain_watch(plane: Any, app_name: str) -> DrainWatch:
    """In a replica: follow the application's drain flag (see the module docstring). ``plane`` is the
    :class:`~service.dataplane.DataPlane` (``begin_drain`` / ``wait_idle``)."""
    from ray import serve

    return DrainWatch(plane, app_name, serve.get_replica_context().replica_id.unique_id)


async def _lookup(name: str) -> Any:
    import ray

    def get() -> Any:
        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return None

    return await asyncio.get_running_loop().run_in_executor(None, get)


# --------------------------------------------------------------------- driver side
@dataclass
class DrainReport:
    """What a stop did, for the log line and the tests."""

    replicas: int = 0
    drained: int = 0
    requests_left: int = 0
    drain_s: float = 0.0
    stop_s: float = 0.0
    killed: list[str] = field(default_factory=list)
    clean: bool = True
    notes: list[str] = field(default_factory=list)
    since_signal_s: float | None = None

    def line(self) -> str:
        text = (f"drained {self.drained}/{self.replicas} replicas in {self.drain_s:.1f} s "
                f"({self.requests_left} requests left), stopped in {self.stop_s:.1f} s")
        if self.since_signal_s is not None:
            text += f", {self.since_signal_s:.1f} s after the signal"
        if self.killed:
            text += f"; killed {len(self.killed)} leftover processes"
        return text + "".join(f"; {n}" for n in self.notes)


def _run_bounded(fn: Callable[[], Any], timeout: float) -> bool:
    """Run ``fn`` in a daemon thread for at most ``timeout`` seconds; whether it finished."""
    done = threading.Event()

    def target() -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - reported by the caller as "did not finish cleanly"
            log.warning("%s failed: %s", getattr(fn, "__name__", fn), exc)
        finally:
            done.set()

    threading.Thread(target=target, name="steady-stop", daemon=True).start()
    return done.wait(max(0.0, timeout))


def ray_alive(main: psutil.Process | None = None, grace_s: float = 0.3) -> bool:
    """Whether this driver's own GCS and raylet still run ``grace_s`` from now (a SIGTERM to the whole process
    group reaches them together with the driver; they are gone within a few hundred milliseconds)."""
    main = main or psutil.Process()
    core = []
    for child in main.children():
        try:
            if child.name() in ("gcs_server", "raylet"):
                core.append(child)
        except psutil.Error:
            continue
    if len(core) < 2:
        return False
    gone, alive = psutil.wait_procs(core, timeout=grace_s)
    return not gone and all(p.status() != psutil.STATUS_ZOMBIE for p in alive)


def drain_replicas(control: Any, timeout: float, alive: Callable[[], bool] = lambda: True) -> dict[str, Any]:
    """Flip every replica to 503 and wait (at most ``timeout``) until their requests in flight finished.

    Polls the control actor with short timeouts, and gives up with :class:`RuntimeError` as soon as
    ``alive()`` says Ray is going down (its GCS and raylet got the same SIGTERM), instead of waiting out
    ``timeout`` on calls that cannot answer.
    """
    import ray

    end = time.monotonic() + timeout
    ray.get(control.start.remote(max(0.0, timeout)), timeout=min(2.0, max(0.5, timeout)))
    while True:
        counts = dict(ray.get(control.status.remote(), timeout=2.0))
        if counts.pop("done"):
            return counts
        if time.monotonic() >= end:
            counts["missing"] = ray.get(control.missing.remote(), timeout=2.0)
            return counts
        if not alive():
            raise RuntimeError("Ray is stopping")
        time.sleep(0.1)


def _soft_stop_haproxy(run_dir: str) -> int:
    """SIGUSR1 to this run's HAProxy processes (close listeners, finish open connections); how many."""
    procs = [p for p in run_processes(run_dir) if "haproxy" in p.name()]
    for proc in procs:
        try:
            proc.send_signal(signal.SIGUSR1)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=HAPROXY_STOP_S)
    return len(procs)


def graceful_stop(settings: Any, control: Any, deadline: float, *, run_dir: str | None,
                  stop_serve: bool = False) -> DrainReport:
    """Drain, then stop (see the module docstring) before ``deadline`` (``time.monotonic()``).

    ``run_dir`` set: this driver started Ray (local mode); None: it joined a cluster and only removes its
    application, and with ``stop_serve`` (it started Serve there) also Serve itself (controller, proxies,
    HAProxy) when no other application is left: the cluster is left as it was found.
    """
    import ray

    report = DrainReport()
    reserve = 4.0 if run_dir else 2.5  # seconds kept for stopping after the drain
    t0 = time.monotonic()
    alive = ray.is_initialized() and (run_dir is None or ray_alive())
    if control is not None and alive:
        try:
            counts = drain_replicas(control, min(settings.drain_timeout_s, deadline - t0 - reserve),
                                    alive=(lambda: ray_alive(grace_s=0.0)) if run_dir else (lambda: True))
            report.replicas, report.drained = counts["replicas"], counts["drained"]
            report.requests_left = counts["requests_left"]
            report.clean = report.drained >= report.replicas
            if counts.get("missing"):
                report.notes.append("no report from " + ", ".join(
                    f"replica {r} (last heard {s:g} s before)" for r, s in counts["missing"].items()))
        except Exception as exc:  # noqa: BLE001 - Ray going down (signal to the whole group): just stop
            report.clean = False
            report.notes.append(f"drain failed: {type(exc).__name__}")
            alive = False  # a Ray that cannot answer its own actor would only make ray.shutdown wait
    else:
        report.clean = False
        report.notes.append("Ray was already stopped: no drain")
    report.drain_s = time.monotonic() - t0
    t1 = time.monotonic()
    if run_dir is not None:
        _soft_stop_haproxy(run_dir)
        # with its GCS and raylet gone, ray.shutdown only waits for them: the kill below is the stop
        if alive and not _run_bounded(ray.shutdown, deadline - time.monotonic() - 1.0):
            report.clean = False
            report.notes.append("ray.shutdown did not finish")
        report.killed = kill_processes(run_processes(run_dir), timeout=max(0.5, deadline - time.monotonic()))
    elif ray.is_initialized():
        if not _run_bounded(lambda: _delete_app(settings.app_name, deadline - 1.5), deadline - time.monotonic() - 1.0):
            report.clean = False
            report.notes.append(f"application {settings.app_name!r} still being deleted by the cluster")
        elif stop_serve and not _run_bounded(_shutdown_idle_serve, deadline - time.monotonic() - 1.0):
            report.notes.append("Serve (started by this steady serve) still shutting down on the cluster")
        _run_bounded(ray.shutdown, deadline - time.monotonic() - 0.2)
    report.stop_s = time.monotonic() - t1
    return report


def serve_running() -> bool:
    """Whether Ray Serve's controller runs on the connected cluster."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def _shutdown_idle_serve() -> None:
    """``serve.shutdown()`` unless another application still runs (then Serve is someone else's too)."""
    from ray import serve

    if not serve.status().applications:
        serve.shutdown()


def _delete_app(app_name: str, until: float) -> None:
    """``serve.delete`` without blocking on Serve's own replica drain, then wait until the app is gone."""
    from ray import serve

    serve.delete(app_name, _blocking=False)
    while time.monotonic() < until:
        if app_name not in serve.status().applications:
            return
        time.sleep(0.2)
    raise TimeoutError(f"application {app_name!r} not deleted yet")


class Watchdog:
    """Ends the process by ``deadline`` whatever the stop is doing: half a second before it, kills the run
    directory's processes (local mode), prints one line and exits with status 1; at the deadline,
    ``faulthandler`` (a C thread that needs no GIL, in case a call into Ray holds it) prints every thread's
    stack and exits with status 1."""

    def __init__(self, deadline: float, run_dir: str | None) -> None:
        self.deadline = deadline
        self.run_dir = run_dir
        self._cancel = threading.Event()
        faulthandler.dump_traceback_later(max(0.5, deadline - time.monotonic()), exit=True)
        threading.Thread(target=self._run, name="steady-watchdog", daemon=True).start()

    def cancel(self) -> None:
        self._cancel.set()
        faulthandler.cancel_dump_traceback_later()

    def _run(self) -> None:
        if self._cancel.wait(max(0.0, self.deadline - 0.5 - time.monotonic())):
            return
        if self.run_dir is not None:
            main = psutil.Process()
            kill_processes([*main.children(recursive=True), *run_processes(self.run_dir)], timeout=0.5)
        print("steady: drain_timeout_s reached: stopped the rest by force", file=sys.stderr, flush=True)
        os._exit(1)
