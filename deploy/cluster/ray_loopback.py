"""`ray start` for a worker node whose address is loopback (deploy/cluster/local.sh).

Ray 2.60 replaces 127.0.0.1 / localhost in `--address` and `--node-ip-address` by the machine's
outbound address (ray/_private/services.py, resolve_ip_for_localhost: "Make sure localhost isn't
resolved to the loopback ip"), so a worker told to join 127.0.0.1:PORT dials the network address,
where nothing listens. The switch that turns this off for the head and for drivers,
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, makes a *worker* `ray start` abort ("Multi-node Ray clusters
are not supported"). This launcher keeps the given address instead and then runs the ordinary
`ray` command line with the same arguments. Only for clusters on one machine: on real machines
run `ray start` itself with the node's own address.
"""

import sys

import ray._private.services as services

services.resolve_ip_for_localhost = lambda host: host

from ray.scripts.scripts import main  # noqa: E402  (after the patch)

sys.argv[0] = "ray"
sys.exit(main())
