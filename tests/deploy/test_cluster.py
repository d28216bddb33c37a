"""deploy/cluster/local.sh without starting Ray: the README shows its commands, it refuses what would
break Ray, it never stops Ray by name. The cluster itself is tested in test_cluster_e2e.py."""

from __future__ import annotations

import os
import subprocess

from benchmarks.cluster import SCRIPT, SERVE_YAML
from tests.deploy.promql import ROOT


def _commands() -> str:
    script = SCRIPT.read_text()
    block = script[script.index("# >>> cluster commands"):script.index("# <<< cluster commands")]
    return "\n".join(block.splitlines()[1:]).strip()


def test_the_readme_shows_exactly_the_commands_the_script_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### 2. A Ray cluster"):readme.index("### 3. Kubernetes with KubeRay")]
    commands = _commands()
    assert "ray_loopback.py\" start --head" in commands and "ray_loopback.py\" start --block --address" in commands
    assert "RAY_AUTH_MODE=token" in commands
    assert commands in section, "README's cluster commands differ from deploy/cluster/local.sh: copy its block"


def test_the_script_parses_and_never_stops_ray_by_name() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    code = "\n".join(line.split("#", 1)[0] for line in SCRIPT.read_text().splitlines())
    for banned in ("ray stop", "pkill", "killall"):
        assert banned not in code, banned


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STEADY_")}
    return subprocess.run(["bash", str(SCRIPT), *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=60)


def test_the_script_refuses_a_temp_dir_too_long_for_rays_sockets(tmp_path: object) -> None:
    long_dir = "/tmp/" + "x" * 60
    proc = _run("up", STEADY_CLUSTER_DIR=long_dir)
    assert proc.returncode == 1 and "at most 40" in proc.stderr
    assert not os.path.exists(long_dir)
    proc = _run("up", STEADY_CLUSTER_DIR="relative/dir")
    assert proc.returncode == 1 and "absolute" in proc.stderr


def test_the_script_needs_a_cluster_for_every_other_command() -> None:
    for cmd in (["down"], ["env"], ["worker", "1"], ["kill", "1"]):
        proc = _run(*cmd, STEADY_CLUSTER_DIR="/tmp/steady-no-such-cluster")
        assert proc.returncode == 1 and "no cluster in /tmp/steady-no-such-cluster" in proc.stderr, (cmd, proc.stderr)
    usage = _run("frobnicate")
    assert usage.returncode == 2 and "local.sh up [WORKERS]" in usage.stderr


def test_serve_yaml_carries_an_autoscaling_config_steady_accepts() -> None:
    import yaml

    from service.settings import ServeSettings

    (app,) = yaml.safe_load(SERVE_YAML.read_text())["applications"]
    args = dict(app["args"])
    settings = ServeSettings.build(args.pop("repo"), overrides=args, environ={})
    auto = settings.deployment_options()["autoscaling_config"]
    assert auto["min_replicas"] >= 1 and auto["max_replicas"] > auto["min_replicas"]
    assert "num_replicas" not in settings.deployment_options()
