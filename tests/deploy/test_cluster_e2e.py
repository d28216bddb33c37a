"""Steady on a real multi-node Ray cluster on loopback: ``deploy/cluster/local.sh`` starts a head and two
workers (token authentication, their own temp dir and ports), and the tests run what an operator runs.

One cluster for the module, used in order (each test leaves it as the next expects):

1. the cluster itself: three nodes, the token required, every socket on loopback;
2. ``steady score --ray-address`` on the empty cluster equals one process;
3. ``serve deploy deploy/serve.yaml`` (repository, ingress port and admin token overridden, its
   autoscaling_config pinned at three 2-CPU replicas): one replica per node, still every socket on loopback,
   REST and tritonclient V2 answer through the head's ingress; an admin reload reaches every replica on every
   node; the scorer, with every CPU held by the replicas, fails after its timeout instead of hanging;
4. a node lost under concurrent load, and its return;
5. after ``serve shutdown``, a cluster-joined ``steady serve`` with autoscaling in its settings: under
   sustained load the replica count grows and shrinks when idle, seen by the controller and by Prometheus
   (scraping every node's metrics agent through Ray's own service-discovery file) through the dashboard's
   replica panel; then SIGTERM ends it within its drain timeout and leaves the cluster running;
6. ``local.sh down`` stops every process of the cluster and nothing else.

The cluster tests take a few minutes (README, "Run in production", section 2, has the figures).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest

from benchmarks.cluster import LocalCluster, Load
from service.core.repository import ModelRepository
from service.drain import POLL_S
from tests.conftest import encode, make_tiny_onnx, tiny_card
from tests.deploy.promql import DEPLOY, Prom, dashboard, panel_targets, running_prometheus, substitute

pytestmark = pytest.mark.e2e

ADMIN_TOKEN = "cluster-admin-token-0123456789"
# deploy/serve.yaml's autoscaling_config with delays a test can wait for (production: 30 s up, 600 s down)
AUTOSCALING = {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2, "upscale_delay_s": 3,
               "downscale_delay_s": 15, "look_back_period_s": 10}
RELOAD_DEADLINE_S = 30.0  # README: a replica follows within RELOAD_POLL_S plus its load and warm-up
# after the lost node's processes are gone, the ingress may still route to it this long (seen: up to 0.23 s on a
# quiet machine; a busy 2-core runner is slower to notice)
INGRESS_NOTICE_S = 2.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    pytest.importorskip("ray")
    workdir = Path(tempfile.mkdtemp(prefix="c14", dir="/tmp"))  # short: Ray's socket paths
    t0 = time.perf_counter()
    c = LocalCluster.up(workdir / "cl", workers=2)
    print(f"cluster up in {time.perf_counter() - t0:.1f} s")
    try:
        yield c
    finally:
        c.down()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    """The served repository (every node reads the same path: one machine)."""
    repo = ModelRepository(tmp_path_factory.mktemp("cluster-repo"))
    repo.add("tiny", make_tiny_onnx(), tiny_card())
    return repo


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    rng = np.random.default_rng(5)
    return [encode(rng.integers(0, 255, (120 + 8 * i, 160, 3), dtype=np.uint8), "JPEG", quality=90)
            for i in range(6)]


@pytest.fixture(scope="module")
def expected(repo: ModelRepository, photos: list[bytes]) -> dict[bytes, tuple[int, ...]]:
    """Top-5 classes of each photo for version 1, computed in this process the way a replica loads it."""
    from service.catalog import load_version
    from service.settings import ServeSettings

    served = load_version(repo, "tiny", 1, "production", ServeSettings.build(repo.root, environ={}))
    return {body: tuple(int(i) for i in np.argsort(-served.classifier.logits(served.pre(body))[0],
                                                   kind="stable")[:5])
            for body in photos}


@pytest.fixture(scope="module")
def prometheus(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prom]:
    """Real Prometheus with deploy/prometheus/prometheus.yml's ``ray-cluster`` job, pointed at this cluster's
    copy of Ray's list of metrics endpoints (every node's agent)."""
    import yaml

    cluster.wait(lambda: cluster.service_discovery_file.exists(), 60, "Ray's service-discovery file")
    shipped = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    (job,) = [j for j in shipped if j["job_name"] == "ray-cluster"]
    job["file_sd_configs"] = [{**job["file_sd_configs"][0], "files": [str(cluster.service_discovery_file)],
                               "refresh_interval": "5s"}]
    with running_prometheus([job], tmp_path_factory.mktemp("prom-cluster"), ready='up{job="ray-cluster"} == 1',
                            timeout=60) as prom:
        yield prom


def _listening_beyond_loopback(pids: list[int]) -> list[str]:
    import psutil

    wanted = set(pids)
    bad = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.pid in wanted and conn.status in (psutil.CONN_LISTEN, psutil.CONN_NONE) and conn.laddr:
            host = conn.laddr.ip
            if not (host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1")):
                bad.append(f"{host}:{conn.laddr.port} pid {conn.pid} {psutil.Process(conn.pid).name()}")
    return bad


# ---------------------------------------------------------------------------------------------- 1. the cluster
def test_cluster_runs_three_nodes_with_token_auth_on_loopback(cluster: LocalCluster) -> None:
    assert cluster.alive_nodes() == 3
    # the dashboard (and with it `serve deploy`) refuses a client without the token
    assert httpx.get(f"{cluster.dashboard}/api/serve/applications/", timeout=10).status_code == 401
    wrong = httpx.get(f"{cluster.dashboard}/api/serve/applications/", timeout=10,
                      headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code in (401, 403)
    # `ray status` with the client environment of `local.sh env`, and without its token
    env = cluster.client_env()
    # `ray status` shows the autoscaler's view, refreshed every few seconds: right after `local.sh up` it may
    # list the head alone while the GCS already has all three nodes
    deadline = time.monotonic() + 60
    while True:
        ok = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "status"], env=env, capture_output=True,
                            text=True, timeout=120)
        if ok.returncode != 0 or ok.stdout.count("node_") == 3 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert ok.returncode == 0 and ok.stdout.count("node_") == 3, (ok.stdout[-2000:], ok.stderr[-2000:])
    refused = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "status"],
                             env={**env, "RAY_AUTH_TOKEN": "not-the-token"}, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode != 0 and "Authentication token is missing or incorrect" in refused.stderr
    # nothing of the cluster listens beyond loopback
    nodes = cluster.process_nodes()
    assert len(nodes) >= 12 and set(nodes.values()) == {0, 1, 2}
    assert not _listening_beyond_loopback(list(nodes))


# ---------------------------------------------------------------------------------------------- 2. scoring
def _score(cluster: LocalCluster, repo: ModelRepository, data: Path, labels: Path, *extra: str,
           timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", "score", "--repo", str(repo.root), "tiny",
                           "--data", str(data), "--labels", str(labels), "--protocols", "pan,scale,embed",
                           "--translate-frames", "3", "--zoom-range", "0.9", "1.1", "--no-progress", "--json",
                           *extra], env=cluster.client_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def score_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    root = tmp_path_factory.mktemp("score-data")
    rows = ["file,class_index"]
    for i in range(8):
        arr = rng.integers(0, 256, (48 + 4 * i, 64, 3), dtype=np.uint8)
        (root / f"img{i}.png").write_bytes(encode(arr, "PNG"))
        rows.append(f"img{i}.png,{i % 10}")
    labels = root.parent / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    return root, labels


@pytest.fixture(scope="module")
def score_repo(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    """A repository of its own: scoring writes robustness.json, whose chosen policy a served version follows."""
    repo = ModelRepository(tmp_path_factory.mktemp("score-repo"))
    repo.add("tiny", make_tiny_onnx(), tiny_card())
    return repo


def test_sharded_scoring_on_the_cluster_equals_one_process(cluster: LocalCluster, score_repo: ModelRepository,
                                                           score_data: tuple[Path, Path]) -> None:
    data, labels = score_data
    local = _score(cluster, score_repo, data, labels)
    sharded = _score(cluster, score_repo, data, labels, "--ray-address", cluster.address)
    assert local.returncode == 0, local.stderr[-3000:]
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    one, many = json.loads(local.stdout), json.loads(sharded.stdout)
    assert one["data"]["images"] == many["data"]["images"] == 8
    for key in ("summary", "summary_ci95", "protocols", "accuracy", "chosen", "most_flipping"):
        assert many[key] == one[key], key


# ---------------------------------------------------------------------------------------------- 3. serve deploy
@pytest.fixture(scope="module")
def deployed(cluster: LocalCluster, repo: ModelRepository, tmp_path_factory: pytest.TempPathFactory) -> LocalCluster:
    """``serve deploy`` of deploy/serve.yaml with the repository, the ingress port and an admin token
    overridden, and its autoscaling_config pinned at three 2-CPU replicas: one on each node, every CPU held."""
    config = cluster.serve_config(repo=str(repo.root), autoscaling={**AUTOSCALING, "min_replicas": 3},
                                  admin_token=ADMIN_TOKEN)
    seconds = cluster.serve_deploy(config, tmp_path_factory.mktemp("deploy"))
    print(f"serve deploy: three replicas running after {seconds:.1f} s")
    return cluster


def _v2_check(cluster: LocalCluster, photos: list[bytes], expected: dict[bytes, tuple[int, ...]]) -> None:
    import tritonclient.http as tc

    client = tc.InferenceServerClient(url=f"127.0.0.1:{cluster.http_port}")
    assert client.is_server_ready() and client.is_model_ready("tiny")
    images = tc.InferInput("image", [len(photos)], "BYTES")
    images.set_data_from_numpy(np.array(photos, dtype=np.object_), binary_data=True)
    out = tc.InferRequestedOutput("logits", binary_data=True)
    logits = client.infer("tiny", [images], outputs=[out]).as_numpy("logits")
    assert logits.shape == (len(photos), 10)
    for body, row in zip(photos, logits):
        assert int(np.argmax(row)) == expected[body][0]


def _rest_check(cluster: LocalCluster, photos: list[bytes], expected: dict[bytes, tuple[int, ...]]) -> None:
    for body in photos:
        r = httpx.post(f"{cluster.base}/v1/models/tiny:classify", content=body, params={"top_k": 5},
                       headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert r.status_code == 200, r.text
        assert tuple(p["index"] for p in r.json()["predictions"]) == expected[body]


def test_serve_deploy_spreads_replicas_and_answers_rest_and_v2(deployed: LocalCluster, photos: list[bytes],
                                                               expected: dict[bytes, tuple[int, ...]]) -> None:
    dep = deployed.deployment()
    assert dep is not None and dep["deployment_config"]["autoscaling_config"]["min_replicas"] == 3
    assert deployed.replica_nodes() == [0, 1, 2]
    # with replicas, proxies and HAProxy on every node, still nothing listens beyond loopback
    assert not _listening_beyond_loopback(list(deployed.process_nodes()))
    _rest_check(deployed, photos, expected)
    _v2_check(deployed, photos, expected)


def test_admin_reload_reaches_every_replica_on_every_node(deployed: LocalCluster, repo: ModelRepository) -> None:
    ports = deployed.replica_ports()
    assert len(ports) == 3 and sorted(deployed.node_of(pid) for pid, _ in ports.values()) == [0, 1, 2]
    v2 = repo.add("tiny", make_tiny_onnx(seed=2), tiny_card())
    repo.set_stage("tiny", "production", v2.version)
    r = httpx.post(f"{deployed.base}/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                   timeout=120)
    assert r.status_code == 200, r.text
    t0 = time.monotonic()
    switched: dict[str, float] = {}

    def every_replica_serves_v2() -> bool:
        for replica, (_, port) in ports.items():
            if replica not in switched and _production(port) == v2.version:
                switched[replica] = time.monotonic() - t0
        return len(switched) == len(ports)

    deployed.wait(every_replica_serves_v2, RELOAD_DEADLINE_S, "every replica to serve the reloaded version",
                  every=0.1)
    print(f"reload reached replicas after {sorted(round(s, 2) for s in switched.values())} s")
    # and back, so later tests see version 1's answers
    repo.set_stage("tiny", "production", 1)
    r = httpx.post(f"{deployed.base}/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                   timeout=120)
    assert r.status_code == 200, r.text
    deployed.wait(lambda: all(_production(port) == 1 for _, port in ports.values()), RELOAD_DEADLINE_S,
                  "every replica to serve version 1 again")


def _production(port: int) -> int | None:
    """The production version of ``tiny`` that the replica listening on ``port`` serves."""
    listing = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()["models"]
    (tiny,) = [m for m in listing if m["name"] == "tiny"]
    return {v["stage"]: v["version"] for v in tiny["versions"]}.get("production")


def test_sharded_scoring_fails_clearly_when_every_cpu_is_held(deployed: LocalCluster, score_repo: ModelRepository,
                                                              score_data: tuple[Path, Path]) -> None:
    data, labels = score_data
    t0 = time.monotonic()
    proc = _score(deployed, score_repo, data, labels, "--ray-address", deployed.address, "--ray-timeout", "5",
                  timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "could not start a 1-CPU scoring task within 5 s" in proc.stderr and "0 free" in proc.stderr
    assert time.monotonic() - t0 < 100  # a timeout, not a hang (the limit is the subprocess' own)


# ---------------------------------------------------------------------------------------------- 5. node loss
def test_node_lost_and_returned_under_concurrent_load(deployed: LocalCluster, photos: list[bytes],
                                                      expected: dict[bytes, tuple[int, ...]]) -> None:
    cluster = deployed
    (lost,) = [r for r in cluster.replicas() if cluster.node_of(r["pid"]) == 2]
    with Load(f"{cluster.base}/v1/models/tiny:classify?top_k=5", photos, clients=4, pause_s=0.05) as load:
        time.sleep(4)
        killed, gone = cluster.kill(2)
        # the lost replica cannot be replaced: every other node's CPUs are held
        cluster.wait(lambda: len(cluster.replicas()) == 2 and lost["replica_id"] not in
                     {r["replica_id"] for r in cluster.replicas(state=None)}, 60, "Serve to drop the lost replica")
        during = time.time()
        assert (cluster.deployment() or {})["target_num_replicas"] == 3
        time.sleep(3)
        answered_while_down = [o for o in load.since(during) if o.status == 200]
        back = time.time()
        cluster.start_worker(2)
        restored = cluster.wait(lambda: cluster.replica_nodes() == [0, 1, 2], 240,
                                "three running replicas, one on the returned node")
        time.sleep(2)
    print(f"node loss: worker 2 gone {gone - killed:.2f} s after SIGKILL; node back and replicas restored "
          f"{time.time() - back - 2:.1f} s after `local.sh worker 2` (replica placement {restored:.1f} s)")
    outcomes = load.outcomes
    failed = [o for o in outcomes if o.status != 200]
    assert answered_while_down, "nothing was answered while the node was down"
    assert sum(o.status == 200 for o in outcomes if o.start > back) > 0
    wrong = [o for o in outcomes if o.status == 200 and tuple(i for i, _ in o.answer or ()) != expected[photos[o.sent]]]
    assert not wrong, wrong[:3]
    # only requests in flight on the lost node may fail: sent before its processes were gone (or in the moment
    # after, before the ingress has seen the connection drop: INGRESS_NOTICE_S), at most one per client; each
    # ends with an HTTP error from the ingress or a connection the ingress closed, never a hang
    assert len(failed) <= load.clients, failed
    for o in failed:
        assert killed - 30 < o.start < gone + INGRESS_NOTICE_S, o
        assert (isinstance(o.status, int) and o.status >= 500) or o.status == "RemoteProtocolError", o
        assert o.end - o.start < 10, o
    print(f"node loss: {len(outcomes)} requests, {len(failed)} failed: "
          f"{[(round(o.start - killed, 3), o.status) for o in failed]}")


# ---------------------------------------------------------------------------------------------- 6. steady serve
@pytest.fixture(scope="module")
def joined(cluster: LocalCluster, repo: ModelRepository, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``steady serve --ray-address`` on the cluster (after ``serve shutdown``), autoscaling set in its settings."""
    from service.launcher import ServeProcess

    cluster.serve_shutdown()
    settings = {"repo": str(repo.root), "ray_address": cluster.address, "port": cluster.http_port,
                "autoscaling": AUTOSCALING, "ort_threads": 1, "decode_threads": 1}
    server = ServeProcess.start(settings, tmp_path_factory.mktemp("joined") / "serve.log", env=cluster.client_env())
    try:
        server.wait_ready(180)
        # the ingress answers before `serve.run` returns (it still waits for every node's proxy): use a
        # steady serve that has finished starting
        cluster.wait(lambda: "steady: serving" in server.tail(20000), 120, "steady serve to finish starting")
        yield server
    finally:
        server.stop()
        server.cleanup()


def _replica_panel(prom: Prom) -> tuple[float | None, float | None]:
    """The dashboard's "Replicas" panel (healthy replicas, autoscaling target) for application steady."""
    (healthy, target) = [substitute(expr, {"application": "steady"})
                         for title, _, expr in panel_targets(dashboard()) if title == "Replicas"]

    def value(expr: str) -> float | None:
        found = prom.finite(expr)
        return float(found[0]["value"][1]) if found else None

    return value(healthy), value(target)


def test_autoscaling_grows_under_load_and_shrinks_when_idle(cluster: LocalCluster, joined: Any, prometheus: Prom,
                                                            photos: list[bytes],
                                                            expected: dict[bytes, tuple[int, ...]]) -> None:
    dep = cluster.deployment()
    assert dep is not None and dep["deployment_config"]["autoscaling_config"]["max_replicas"] == 3
    _rest_check(cluster, photos[:2], expected)
    # every node's metrics agent is scraped (Ray's list also names the autoscaler and dashboard exporters)
    def every_node_scraped() -> bool:
        up = {s["metric"]["instance"]: s["value"][1] for s in prometheus.query('up{job="ray-cluster"}')}
        return all(up.get(t) == "1" for t in cluster.metrics_targets)

    cluster.wait(every_node_scraped, 90, f"Prometheus to scrape every node's agent {cluster.metrics_targets} "
                 f"(Ray's list: {cluster.service_discovery_file.read_text()})")
    cluster.wait(lambda: len(cluster.replicas(state=None)) == 1, 120, "the minimum of one replica")
    seen: list[float] = []
    with Load(f"{cluster.base}/v1/models/tiny:classify", photos, clients=8) as load:
        t0 = time.monotonic()
        grown = cluster.wait(lambda: len(cluster.replicas()) >= 2, 150, "a second running replica under load")
        print(f"autoscaling: a second replica runs {grown:.1f} s after the load started")

        def panel_grew() -> bool:
            healthy, _ = _replica_panel(prometheus)
            seen.append(healthy or 0)
            return (healthy or 0) >= 2

        cluster.wait(panel_grew, 90, "the replica panel to show two replicas")
        elapsed = time.monotonic() - t0
    answered = [o for o in load.outcomes if o.status == 200]
    assert len(answered) > 100 and len(answered) == len(load.outcomes), {o.status for o in load.outcomes}
    shrunk = cluster.wait(lambda: len(cluster.replicas(state=None)) == 1, 180, "one replica again when idle")
    print(f"autoscaling: back to one replica {shrunk:.1f} s after the load ({elapsed:.0f} s) stopped")
    cluster.wait(lambda: _replica_panel(prometheus)[0] == 1, 90, "the replica panel to show one replica")
    assert max(seen) >= 2


def test_cluster_joined_steady_serve_stops_on_sigterm(cluster: LocalCluster, joined: Any) -> None:
    from service.settings import ServeSettings

    drain = ServeSettings.model_fields["drain_timeout_s"].default
    t0 = time.monotonic()
    joined.proc.send_signal(signal.SIGTERM)
    rc = joined.proc.wait(drain + 30)
    stopped = time.monotonic() - t0
    print(f"steady serve (cluster-joined) exited {stopped:.1f} s after SIGTERM, rc {rc}")
    report = [line for line in joined.tail(20000).splitlines() if line.startswith("steady: drained")]
    print("\n".join(report))
    assert rc == 0, joined.tail()
    assert stopped <= drain + 2, f"{stopped:.1f} s, drain_timeout_s {drain}"  # its own watchdog's deadline
    # the replica the scale-down above stopped said it left: the drain did not wait out its heartbeat window
    found = re.match(r"steady: drained (\d+)/(\d+) replicas in ([\d.]+) s", report[-1]) if report else None
    assert found and found[1] == found[2] and float(found[3]) < POLL_S, report
    assert "still being deleted" not in report[-1], report
    # the dashboard's list lags Serve's own by a few seconds (the driver saw the application gone)
    cluster.wait(lambda: "steady" not in cluster.applications(), 30, "the dashboard to drop application steady")
    assert cluster.alive_nodes() == 3  # the cluster is the operator's: it keeps running
    assert not cluster.haproxies(), "an HAProxy of the Serve that steady serve started outlived it"


# ---------------------------------------------------------------------------------------------- 7. down
def test_down_stops_every_process_of_the_cluster_and_nothing_else(cluster: LocalCluster) -> None:
    # a process named like Ray's (what `ray stop` would kill by name) that is not the cluster's
    decoy = subprocess.Popen(["bash", "-c", "exec -a raylet sleep 300"])
    try:
        cluster.down()
        assert not cluster.processes() and not cluster.haproxies()
        assert decoy.poll() is None, "local.sh down killed a process it did not start"
    finally:
        decoy.kill()
        decoy.wait()
