"""Steady on a multi-node Ray cluster on this machine: the cluster of ``deploy/cluster/local.sh`` driven
from Python, a concurrent load that records every answer, and what ``python -m benchmarks.cluster`` measures.

The cluster is the operator's: :class:`LocalCluster` starts and stops it only through
``deploy/cluster/local.sh`` (loopback, token authentication, its own temp dir and ports), reaches it
the way an operator does (the ``serve`` CLI and the dashboard's REST API with the token, HTTP
through the head's HAProxy), and simulates the loss of a machine by SIGKILLing every process of
one worker node at once. The e2e tests (``tests/deploy/test_cluster_e2e.py``) and the measurements
below share it.

Measured by ``python -m benchmarks.cluster --repo DIR MODEL --data PHOTOS``, each on a fresh cluster:

* throughput through the head's ingress with 1, 2 and 3 nodes, one 2-CPU replica per node
  (``steady bench serve --url``); every node shares this machine's cores, so the figure shows
  the cluster's overhead and that answers stay right, not a speed-up;
* a node lost under concurrent load: failed requests (when they started, what they got),
  time until the service answered without errors again, and after the node returns, the time
  until the replica count is back at its target;
* autoscaling: from a sustained load's start until the controller raises the target and until
  a second replica runs; from the load's end until the count is back at its minimum.

Example:
    >>> cluster = LocalCluster.up(Path("/tmp/steady-c1"), workers=2)           # doctest: +SKIP
    >>> cluster.serve_deploy(cluster.serve_config(repo="/models"))            # doctest: +SKIP
    >>> cluster.down()                                                         # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from service.core.errors import SteadyError

__all__ = ["LocalCluster", "Load", "Outcome", "SCRIPT", "SERVE_YAML", "main"]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "cluster" / "local.sh"
SERVE_YAML = ROOT / "deploy" / "serve.yaml"
APP = "steady"


def _node_marker(pid: int) -> str | None:
    """The STEADY_CLUSTER_NODE value local.sh put in a process' environment (``<dir>#<node>``), if any."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            for entry in fh.read().split(b"\0"):
                if entry.startswith(b"STEADY_CLUSTER_NODE="):
                    return entry.split(b"=", 1)[1].decode(errors="replace")
    except OSError:
        pass
    return None


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class LocalCluster:
    """A cluster started by ``deploy/cluster/local.sh`` in ``dir``; everything about it is read from there."""

    dir: Path
    env: dict[str, str]
    ports: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ life cycle
    @classmethod
    def up(cls, dir: str | os.PathLike[str], workers: int = 2, *, env: Mapping[str, str] | None = None,
           timeout: float = 420.0) -> "LocalCluster":
        """``local.sh up WORKERS`` with ``STEADY_CLUSTER_DIR=dir``; the nodes import Steady from this checkout."""
        base = {k: v for k, v in (os.environ if env is None else env).items()
                if not k.startswith(("RAY_", "STEADY_"))}
        base["STEADY_CLUSTER_DIR"] = str(dir)
        base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH", "")]))
        cluster = cls(Path(dir), base)
        try:
            cluster._script("up", str(workers), timeout=timeout)
        except SteadyError:
            cluster.down()
            raise
        cluster.ports = cluster._read_ports()
        return cluster

    def _script(self, *args: str, timeout: float = 420.0) -> str:
        proc = subprocess.run(["bash", str(SCRIPT), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0:
            raise SteadyError(f"local.sh {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return proc.stdout

    def _read_ports(self) -> dict[str, int]:
        out = {}
        for line in (self.dir / "ports.env").read_text().splitlines():
            key, _, value = line.partition("=")
            out[key] = int(value)
        return out

    def down(self) -> None:
        """``local.sh down`` (SIGTERM to every node, SIGKILL to what is left)."""
        if (self.dir / "ports.env").exists():
            self._script("down", timeout=120)

    def kill(self, n: int) -> tuple[float, float]:
        """SIGKILL every process of worker ``n`` at once, as when its machine dies.

        The same as ``local.sh kill N``, done here to return exact instants (``time.time()``): when the
        signals were sent and when the last of those processes was gone (a large process takes a moment
        to exit, and until then its sockets still accept connections).
        """
        pids = self.processes(n)
        if not pids:
            raise SteadyError(f"worker {n} runs no process")
        at = time.time()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.wait(lambda: not any(_running(p) for p in pids), 30, f"worker {n}'s processes to exit", every=0.005)
        return at, time.time()

    def start_worker(self, n: int) -> None:
        """``local.sh worker N``: the lost node comes back with its old ports."""
        self._script("worker", str(n))

    def process_nodes(self) -> dict[int, int]:
        """``{pid: node}`` for every process of this cluster (node 0 is the head), by the marker local.sh sets."""
        return {pid: node for pid in _pids() if (node := self.node_of(pid)) is not None}

    def processes(self, n: int | None = None) -> list[int]:
        """Pids of this cluster (``n``: of node ``n`` only)."""
        return [pid for pid, node in self.process_nodes().items() if n is None or node == n]

    def node_of(self, pid: int) -> int | None:
        """Which node (0 head, 1.. workers) a process of this cluster belongs to (None: not the cluster's)."""
        marker = _node_marker(pid)
        if marker is None or marker.rpartition("#")[0] != str(self.dir):
            return None
        return int(marker.rpartition("#")[2])

    # ------------------------------------------------------------------ where things are
    @property
    def workers(self) -> int:
        return self.ports["WORKERS"]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['GCS']}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['DASH']}"

    @property
    def http_port(self) -> int:
        """The port chosen for Serve's HTTP ingress on the head (``http_options.port``)."""
        return self.ports["SERVE_HTTP"]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def token(self) -> str:
        return (self.dir / "token").read_text().strip()

    @property
    def metrics_targets(self) -> list[str]:
        """Every node's metrics agent (head first)."""
        return [f"127.0.0.1:{self.ports[f'MET{n}']}" for n in range(self.workers + 1)]

    @property
    def service_discovery_file(self) -> Path:
        """Ray's own Prometheus file_sd list of every node's metrics agent (written by the head's dashboard)."""
        return self.dir / "ray" / "prom_metrics_service_discovery.json"

    def client_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of a client: ``base`` (default: the cluster's) plus ``local.sh env``."""
        env = dict(self.env if base is None else base)
        for line in (self.dir / "client.env").read_text().splitlines():
            line = line.split("#", 1)[0].strip().removeprefix("export ")
            for token in shlex.split(line):
                key, _, value = token.partition("=")
                env[key] = value
        return env

    # ------------------------------------------------------------------ the dashboard's REST API
    def api(self, path: str, method: str = "GET", **kwargs: Any) -> Any:
        import httpx

        r = httpx.request(method, f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {self.token}"},
                          timeout=30, **kwargs)
        r.raise_for_status()
        return r.json() if r.content else None

    def nodes(self) -> list[dict[str, Any]]:
        """Nodes the GCS knows (``state``: ALIVE or DEAD)."""
        return list(self.api("/api/v0/nodes?detail=1")["data"]["result"]["result"])

    def alive_nodes(self) -> int:
        return sum(1 for n in self.nodes() if n["state"] == "ALIVE")

    def applications(self) -> dict[str, Any]:
        return dict(self.api("/api/serve/applications/").get("applications") or {})

    def deployment(self, app: str = APP) -> dict[str, Any] | None:
        found = self.applications().get(app)
        return None if found is None else dict(found["deployments"][APP])

    def replicas(self, app: str = APP, state: str | None = "RUNNING") -> list[dict[str, Any]]:
        dep = self.deployment(app)
        reps = [] if dep is None else list(dep["replicas"])
        return [r for r in reps if state is None or r.get("state") == state]

    def replica_ports(self, app: str = APP) -> dict[str, tuple[int, int]]:
        """``{replica id: (pid, port)}``: the port of each running replica's own HTTP server, which the
        ingress forwards to (Ray Serve's direct-ingress port pool, 30000-31000 by default)."""
        import psutil

        lo, hi = (int(os.environ.get(f"RAY_SERVE_DIRECT_INGRESS_{k}_HTTP_PORT", d)) for k, d in
                  (("MIN", 30000), ("MAX", 31000)))
        by_pid = {r["pid"]: r["replica_id"] for r in self.replicas(app)}
        out = {}
        for conn in psutil.net_connections(kind="tcp"):
            if conn.pid in by_pid and conn.status == psutil.CONN_LISTEN and lo <= conn.laddr.port <= hi:
                out[by_pid[conn.pid]] = (conn.pid, conn.laddr.port)
        return out

    def replica_nodes(self, app: str = APP) -> list[int | None]:
        """The node of every running replica."""
        return sorted((self.node_of(r["pid"]) for r in self.replicas(app)), key=lambda n: -1 if n is None else n)

    # ------------------------------------------------------------------ Serve
    def serve_config(self, **args: Any) -> dict[str, Any]:
        """``deploy/serve.yaml`` with the HTTP ingress on loopback at this cluster's port and ``args`` overriding the
        application's args (None removes one)."""
        import yaml

        config = yaml.safe_load(SERVE_YAML.read_text())
        config["http_options"].update(host="127.0.0.1", port=self.http_port)
        (app,) = config["applications"]
        for key, value in args.items():
            if value is None:
                app["args"].pop(key, None)
            else:
                app["args"][key] = value
        return config

    def serve_deploy(self, config: Mapping[str, Any], workdir: Path, timeout: float = 240.0) -> float:
        """``serve deploy`` (the dashboard's API, with the token) and wait until the application runs with its
        target replica count; returns the seconds that took."""
        import yaml

        path = workdir / "serve-deploy.yaml"
        path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
        t0 = time.perf_counter()
        self.serve_cli("deploy", str(path))
        self.wait(lambda: self._settled(), timeout, "the application to run at its target replica count")
        return time.perf_counter() - t0

    def _settled(self) -> bool:
        dep = self.deployment()
        app = self.applications().get(APP)
        if dep is None or app is None or app["status"] != "RUNNING" or dep["status"] != "HEALTHY":
            return False
        target = dep.get("target_num_replicas") or 0
        return target > 0 and len(self.replicas()) == target and len(self.replicas(state=None)) == target

    def serve_cli(self, *args: str, timeout: float = 120.0) -> str:
        proc = subprocess.run([sys.executable, "-m", "ray.serve.scripts", *args], env=self.client_env(),
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SteadyError(f"serve {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return proc.stdout + proc.stderr

    def serve_shutdown(self, timeout: float = 120.0) -> None:
        """``serve shutdown -y``: every application and Serve itself (controller, proxies, HAProxy) go; Ray stays."""
        self.serve_cli("shutdown", "-y")  # asynchronous: it returns while the controller still stops
        self.wait(lambda: not self.haproxies() and not self.applications() and not self._serve_controller(), timeout,
                  "Serve to shut down")

    def _serve_controller(self) -> bool:
        """Whether Serve's controller actor is alive (a new Serve cannot start before it is gone)."""
        actors = self.api("/api/v0/actors?detail=1&limit=10000")["data"]["result"]["result"]
        return any(a.get("name") == "SERVE_CONTROLLER_ACTOR" and a.get("state") != "DEAD" for a in actors)

    def haproxies(self) -> list[int]:
        """HAProxy processes of this cluster (their config lives under its hap/ folder)."""
        needle = f"{self.dir}/hap/".encode()
        out = []
        for pid in _pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    cmd = fh.read()
            except OSError:
                continue
            if b"haproxy" in cmd and needle in cmd:
                out.append(pid)
        return out

    @staticmethod
    def wait(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.5) -> float:
        """Poll ``condition`` until it holds; returns the seconds that took. Errors while polling count as False."""
        t0 = time.monotonic()
        last = ""
        while True:
            try:
                if condition():
                    return time.monotonic() - t0
            except Exception as exc:  # noqa: BLE001 - the cluster may be between states
                last = f" (last error: {type(exc).__name__}: {exc})"
            if time.monotonic() - t0 > timeout:
                raise SteadyError(f"timed out after {timeout:.0f} s waiting for {what}{last}")
            time.sleep(every)


# ---------------------------------------------------------------------------------------------- load
@dataclass(frozen=True)
class Outcome:
    """One request: which of the bodies it sent, when it started and ended (``time.time()``), its HTTP
    status or the exception's name, the start of its body, and the answer's top classes (None unless 200)."""

    sent: int
    start: float
    end: float
    status: int | str
    body: str
    answer: tuple[tuple[int, float], ...] | None


class Load:
    """``clients`` threads POSTing ``bodies`` in turn to ``url`` until :meth:`stop`, recording every outcome.

    ``pause_s`` between a client's requests keeps the machine from saturating (nodes must still be able
    to start while the load runs).
    """

    def __init__(self, url: str, bodies: Sequence[bytes], clients: int = 4, pause_s: float = 0.0,
                 timeout_s: float = 30.0, content_type: str = "image/jpeg") -> None:
        self.url, self.bodies, self.clients = url, list(bodies), clients
        self.pause_s, self.timeout_s, self.content_type = pause_s, timeout_s, content_type
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "Load":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self._threads:
            t.start()

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout_s + 5)
        return self.outcomes

    def _client(self, index: int) -> None:
        import httpx

        i = index
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                sent = i % len(self.bodies)
                body = self.bodies[sent]
                i += 1
                start = time.time()
                try:
                    r = client.post(self.url, content=body, headers={"Content-Type": self.content_type})
                    answer = None
                    if r.status_code == 200:
                        answer = tuple((p["index"], p["score"]) for p in r.json()["predictions"])
                    outcome = Outcome(sent, start, time.time(), r.status_code, r.text[:200], answer)
                except Exception as exc:  # noqa: BLE001 - every failure is an outcome
                    outcome = Outcome(sent, start, time.time(), type(exc).__name__, str(exc)[:200], None)
                with self._lock:
                    self.outcomes.append(outcome)
                if self.pause_s:
                    self._stop.wait(self.pause_s)

    def since(self, t: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.start >= t]


# ---------------------------------------------------------------------------------------------- measurements
def _photos(data: str, limit: int = 64) -> list[bytes]:
    from benchmarks.serve import image_paths

    return [p.read_bytes() for p in image_paths(data, limit)]


def measure_throughput(repo: str, model: str, data: str, nodes: Sequence[int], workdir: Path, duration_s: float,
                       concurrency: Sequence[int], log: Callable[[str], None]) -> list[dict[str, Any]]:
    """``steady bench serve --url`` against the head's ingress, one 2-CPU replica per node."""
    runs = []
    for n in nodes:
        cluster = LocalCluster.up(workdir / f"n{n}", workers=n - 1)
        try:
            deploy_s = cluster.serve_deploy(cluster.serve_config(repo=repo, num_replicas=n, autoscaling=None), workdir)
            placed = cluster.replica_nodes()
            log(f"{n} node(s): {n} replicas on nodes {placed}, deployed in {deploy_s:.1f} s")
            command = [sys.executable, "-m", "service.cli", "bench", "serve", "--repo", repo, model, "--data", data,
                       "--url", cluster.base, "--concurrency", ",".join(map(str, concurrency)),
                       "--duration", str(duration_s), "--json"]
            proc = subprocess.run(command, env=cluster.env, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise SteadyError(f"bench serve failed:\n{proc.stderr[-3000:]}")
            doc = json.loads(proc.stdout)
            runs.append({"nodes": n, "replicas_on_nodes": placed, "deploy_s": round(deploy_s, 1), "bench": doc})
            for run in doc["runs"]:
                log(f"  c={run['concurrency']}: {run['images_per_s']} img/s, p50 {run['p50_ms']} ms, "
                    f"top-1 agreement {doc['image_sets'][0]['top1_agreement']}")
        finally:
            cluster.down()
    return runs


def measure_node_loss(repo: str, model: str, data: str, workdir: Path, clients: int,
                      log: Callable[[str], None]) -> dict[str, Any]:
    """Three nodes, three replicas, concurrent load; worker 2 is killed, then started again."""
    cluster = LocalCluster.up(workdir / "loss", workers=2)
    try:
        cluster.serve_deploy(cluster.serve_config(repo=repo, num_replicas=3, autoscaling=None), workdir)
        url = f"{cluster.base}/v1/models/{model}:classify"
        with Load(url, _photos(data), clients=clients) as load:
            time.sleep(10)
            killed, gone = cluster.kill(2)
            log("worker 2 killed")
            dropped = cluster.wait(lambda: len(cluster.replicas()) == 2, 120, "Serve to drop the lost replica")
            time.sleep(max(0.0, 30 - (time.time() - killed)))
            back = time.time()
            cluster.start_worker(2)
            joined = time.time()
            restored = cluster.wait(lambda: len(cluster.replicas()) == 3, 300, "three running replicas")
            time.sleep(5)
        outcomes = load.outcomes
        failed = [o for o in outcomes if o.status != 200]
        answered = sorted(o.end for o in outcomes if o.status == 200 and o.start > killed)
        return {
            "clients": clients, "requests": len(outcomes), "failed": len(failed),
            "failures": [{"start_after_kill_s": round(o.start - killed, 3), "end_after_kill_s": round(o.end - killed, 3),
                          "status": o.status, "body": o.body[:80]} for o in failed],
            "failed_after_node_gone": sum(1 for o in failed if o.start >= gone),
            "node_processes_gone_s": round(gone - killed, 3),
            "first_answer_after_kill_s": round(answered[0] - killed, 3) if answered else None,
            "last_failure_after_kill_s": round(max((o.end for o in failed), default=killed) - killed, 3),
            "serve_dropped_replica_s": round(dropped + (gone - killed), 1),
            "answered_while_down": sum(1 for o in outcomes if o.status == 200 and killed < o.start < back),
            "node_start_s": round(joined - back, 1),
            "replicas_restored_after_node_start_s": round(restored, 1),
        }
    finally:
        cluster.down()


def measure_autoscaling(repo: str, model: str, data: str, workdir: Path, clients: int,
                        log: Callable[[str], None]) -> dict[str, Any]:
    """deploy/serve.yaml's autoscaling_config with short delays (min 1, max 3); a sustained load, then idle."""
    cluster = LocalCluster.up(workdir / "auto", workers=2)
    try:
        auto = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2, "upscale_delay_s": 3,
                "downscale_delay_s": 15}
        cluster.serve_deploy(cluster.serve_config(repo=repo, autoscaling=auto), workdir)
        url = f"{cluster.base}/v1/models/{model}:classify"
        t0 = time.monotonic()
        with Load(url, _photos(data), clients=clients):
            target_up = cluster.wait(lambda: ((cluster.deployment() or {}).get("target_num_replicas") or 0) > 1, 180,
                                     "the target to grow")
            second = cluster.wait(lambda: len(cluster.replicas()) >= 2, 180, "a second running replica")
            peak = len(cluster.replicas())
            log(f"autoscaling: target up after {target_up:.1f} s, 2nd replica running after {target_up + second:.1f} s")
            time.sleep(max(0.0, 40 - (time.monotonic() - t0)))
            peak = max(peak, len(cluster.replicas()))
        down = cluster.wait(lambda: len(cluster.replicas(state=None)) == 1, 300, "one replica again")
        return {"clients": clients, "config": auto, "target_up_s": round(target_up, 1),
                "second_replica_running_s": round(target_up + second, 1), "peak_running": peak,
                "back_to_min_after_load_s": round(down, 1)}
    finally:
        cluster.down()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, help="model repository (every node reads it: here, the same path)")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="photos to send")
    p.add_argument("--nodes", default="1,2,3", help="node counts for the throughput runs (default 1,2,3)")
    p.add_argument("--concurrency", default="8", help="bench serve concurrency list (default 8)")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per throughput run (default 15)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients for node loss and autoscaling")
    p.add_argument("--only", default="throughput,loss,autoscaling", help="which measurements (comma list)")
    p.add_argument("--out", help="write the JSON here")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    only = set(args.only.split(","))
    doc: dict[str, Any] = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="cb", dir="/tmp") as tmp:
        workdir = Path(tmp)
        if "throughput" in only:
            doc["throughput"] = measure_throughput(args.repo, args.model, args.data,
                                                   [int(x) for x in args.nodes.split(",")], workdir, args.duration,
                                                   [int(x) for x in args.concurrency.split(",")], log)
        if "loss" in only:
            doc["node_loss"] = measure_node_loss(args.repo, args.model, args.data, workdir, args.clients, log)
            log(json.dumps(doc["node_loss"]))
        if "autoscaling" in only:
            doc["autoscaling"] = measure_autoscaling(args.repo, args.model, args.data, workdir, args.clients, log)
            log(json.dumps(doc["autoscaling"]))
    doc["load_average_after"] = os.getloadavg()
    text = json.dumps(doc, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
