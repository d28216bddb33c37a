"""`ray start` for the nodes of deploy/cluster/local.sh: several nodes on one machine, on loopback.

Two changes to what `ray start` does, both only for clusters on one machine (on real machines run
`ray start` itself with the node's own address):

* Ray 2.60 replaces 127.0.0.1 / localhost in `--address` and `--node-ip-address` by the machine's
  outbound address (ray/_private/services.py, resolve_ip_for_localhost: "Make sure localhost isn't
  resolved to the loopback ip"), so a worker told to join 127.0.0.1:PORT dials the network address,
  where nothing listens. The switch that turns this off for the head and for drivers,
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, makes a *worker* `ray start` abort ("Multi-node Ray clusters
  are not supported"). Here the given address is kept.
* The raylet waits at most 15 s (a fixed deadline in Ray 2.60) for its dashboard agent to write the
  agent's HTTP port to a file, then aborts the node; on a machine whose cores are shared by several
  nodes and other work, importing the agent alone can take longer. `ray start` knows that port
  (`--dashboard-agent-listen-port`) but does not hand it to the raylet; here it is handed over, so the
  raylet does not wait for the file.
"""

import sys

import ray._private.services as services

services.resolve_ip_for_localhost = lambda host: host

_LISTEN = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--dashboard-agent-listen-port=")]
_start_ray_process = services.start_ray_process


def _start(command, process_type, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - Ray's signature
    if process_type == "raylet" and _LISTEN and not any(c.startswith("--dashboard_agent_listen_port") for c in command):
        command = [*command, f"--dashboard_agent_listen_port={_LISTEN[0]}"]
    return _start_ray_process(command, process_type, *args, **kwargs)


services.start_ray_process = _start

from ray.scripts.scripts import main  # noqa: E402  (after the patches)

sys.argv[0] = "ray"
sys.exit(main())
